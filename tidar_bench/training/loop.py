"""The one training loop every recipe uses (AR, TiDAR, block diffusion, EAGLE head, ...).

An `Objective` says what is trained (`module()`), how a batch becomes a loss (`loss`) and how
the result is saved (`save`); this loop does the rest: AdamW, linear warm-up + cosine decay,
gradient accumulation, clipping, bf16 autocast on CUDA, a progress bar with the objective's
metrics and the throughput (tokens/s, MFU for a given peak FLOPS, peak memory), `train_log.jsonl` +
`loss.png`, periodic evaluation, resumable checkpoints and the final HF-layout checkpoint.

Under `torchrun` (WORLD_SIZE > 1) each rank takes its rows of every global batch and either
- `shard="ddp"` (default): a full replica per rank, gradients all-reduced once per optimiser step
  (accumulation micro-steps run under `no_sync`), or
- `shard="fsdp"`: FSDP2 (`torch.distributed.fsdp.fully_shard`), every transformer block and the
  root sharded over the ranks (parameters, gradients and AdamW states: 1/world each), bf16
  parameters/compute with fp32 gradient reduction and fp32 master weights when the compute dtype
  is bf16. Saving gathers the full state dict on rank 0, which writes the ordinary checkpoint.
`activation_checkpointing` recomputes each block's activations in the backward pass (torch's
checkpoint_wrapper, non-reentrant).

Checkpoints (`save_every`), format "full": `out/checkpoints/step-NNNNNNNN/` holds the objective's HF-layout
checkpoint plus the training state (`trainable.safetensors`, `optimizer.safetensors` +
`optimizer.json`, `rng.safetensors`, `trainer_state.json`: step, data position, logs); each is
written to a temp dir and renamed, and only the newest `keep_checkpoints` are kept. `resume`
continues from the newest one: weights, AdamW moments, schedule, RNG and data position, so an
interrupted run ends at the weights of an uninterrupted one. State dicts go through
`torch.distributed.checkpoint.state_dict` (full, CPU-offloaded, broadcast from rank 0 on load), so a
run may resume under another world size or shard mode. Logged metrics are averaged over the ranks.
Format "sharded" (`_checkpoint_sharded`): torch.distributed.checkpoint, each rank writes its own
shards and nothing is gathered; it too resumes under any world size, and `export_checkpoint`
(`tidar-bench export`) turns it into the HF-layout checkpoint afterwards.
With save_every the last step is checkpointed too, so a finished run can be extended: a resume with
a larger `steps` re-plans the schedule from the resumed step (`TrainConfig.replan`, printed and kept
in train_config.json / trainer_state.json as `replans`); any other change of options is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import UserError
from .data import PackedDataset

log = logging.getLogger(__name__)

SHARD_MODES = ("auto", "ddp", "fsdp")
CHECKPOINT_FORMATS = ("full", "sharded")
DCP_DIR, EXPORT_DIR = "dcp", "export"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# trainer_state entries a resumed run must share with the run it continues
# (steps may grow: the run is extended and the schedule re-planned, see `TrainConfig.replan`)
RESUME_KEYS = ("objective", "seq_len", "batch_size", "grad_accum", "seed", "data_sequences", "doc_attention", "loss_on")
NOT_LOSS = ("step", "lr", "tokens", "tokens_per_s", "mfu", "peak_mem_gb")


class Objective(Protocol):
    name: str

    def module(self) -> nn.Module:
        """What is optimised (its parameters with requires_grad)."""
        ...

    def loss(self, trainable: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch [B, S] token ids -> (scalar loss, detached metrics). `trainable` is module(),
        possibly wrapped in DDP: call it for the forward."""
        ...

    def save(self, out_dir: Path) -> None:
        """Write an HF-layout checkpoint (+ side config, tokenizer) into out_dir."""
        ...


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # global batch (all ranks) per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    dtype: str = "auto"  # compute dtype of the forward: auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    progress: bool = True
    shard: str = "auto"  # auto (= ddp under torchrun) | ddp | fsdp (FSDP2, needs torchrun)
    activation_checkpointing: bool = False
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept (0 = all)
    peak_tflops: float = 0.0  # per-device peak for MFU (0 = no MFU)
    eval_every: int = 0  # run the evaluator every N steps (and at the end); needs an evaluator
    checkpoint_format: str = "full"  # full (gathered on rank 0) | sharded (torch.distributed.checkpoint, per rank)
    replans: list = field(default_factory=list)  # [step, lr there, new steps, old steps] per extension (`replan`)

    def autocast(self, device: torch.device):
        """The autocast context for `dtype` on `device` (weights stay in their own dtype, fp32 for
        the recipes here, so the optimiser updates full-precision master weights)."""
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise UserError(f"unknown training dtype {self.dtype!r}; use auto, float32 or bfloat16 "
                            "(float16 would need loss scaling, which this loop does not do)")
        bf16 = self.bf16(device)
        if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("bfloat16 is not supported on this GPU; use --dtype float32")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def bf16(self, device: torch.device) -> bool:
        return self.dtype in ("bfloat16", "bf16") or (self.dtype == "auto" and device.type == "cuda")

    def check(self) -> None:
        """Option errors that need no model or data (a bad run fails before anything is loaded)."""
        if self.shard not in SHARD_MODES:
            raise UserError(f"unknown --shard {self.shard!r}; use {', '.join(SHARD_MODES)}")
        if self.shard == "fsdp" and dist_info()[1] == 1:
            raise UserError("--shard fsdp needs several processes: launch with torchrun --nproc_per_node N "
                            "-m tidar_bench.cli train ...")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise UserError(f"unknown --checkpoint-format {self.checkpoint_format!r}; use {' or '.join(CHECKPOINT_FORMATS)}")
        if min(self.save_every, self.keep_checkpoints, self.eval_every) < 0 or self.peak_tflops < 0:
            raise UserError("--save-every, --keep-checkpoints, --eval-every and --peak-tflops must be >= 0")

    def lr_at(self, step: int) -> float:
        for start, lr0, end, _ in reversed(self.replans):  # an extended run: cosine from lr0 at start to the floor
            if step >= start:
                lo = self.lr * self.min_lr_ratio
                t = (step - start) / max(1, end - start)
                return lo + (lr0 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        steps = self.replans[0][3] if self.replans else self.steps  # the first plan's length
        t = (step - self.warmup_steps) / max(1, steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def replan(self, step: int, old_steps: int) -> str:
        """Extend a run planned for old_steps to self.steps from `step` (a resume): the learning rate
        goes on from its value at `step` under the old plan and decays by cosine to lr * min_lr_ratio
        at the new last step (no jump; a finished run's lr is already at the floor and stays there).
        Returns the log line."""
        plan = TrainConfig(lr=self.lr, min_lr_ratio=self.min_lr_ratio, warmup_steps=self.warmup_steps,
                           steps=old_steps, replans=list(self.replans))
        lr0 = plan.lr_at(step)
        self.replans = [*self.replans, [step, lr0, self.steps, old_steps]]
        return (f"extending the run from {old_steps} to {self.steps} steps: the learning rate is re-planned from step "
                f"{step} ({lr0:.3g}), cosine to {self.lr * self.min_lr_ratio:.3g} at step {self.steps}")


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty (continue a stopped run with --resume)")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in out/checkpoints (temp dirs of an interrupted save are not)."""
    done = sorted(p for p in (Path(out) / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def check_resume(out: Path) -> Path:
    """The checkpoint --resume continues from, or a UserError saying there is none."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise UserError(f"--resume: no checkpoint to resume from in {out} (checkpoints are written by --save-every N "
                        f"into {Path(out) / CHECKPOINTS})")
    return ckpt


def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------- sharding


def _blocks(objective: Objective, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each transformer block: the objective's `block_names()` when it has
    one, else every child of an nn.ModuleList (Transformer.model.layers)."""
    names = objective.block_names() if hasattr(objective, "block_names") else None
    if names is not None:
        return [(module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    return [(m, str(i)) for m in module.modules() if isinstance(m, nn.ModuleList) for i in range(len(m))]


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of module's structure with every tensor on the meta device (no memory): rank 0 loads
    a gathered full state dict into it to run the objective's own `save` under FSDP."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class _Runner:
    """Owns the distributed setup of one training run: wrapping, state dicts, saving."""

    def __init__(self, objective: Objective, cfg: TrainConfig):
        self.objective, self.cfg = objective, cfg
        self.rank, self.world = dist_info()
        self.module = objective.module()
        self.device = next(self.module.parameters()).device
        self.fsdp = cfg.shard == "fsdp"
        self.own_group = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.own_group = True
        if self.fsdp and not any(v is self.module for v in vars(objective).values()):
            raise UserError(f"--shard fsdp: the {objective.name} objective does not keep module() as an attribute, "
                            "so its save() cannot be given the gathered weights")
        self.template = _meta_copy(self.module) if self.fsdp and self.rank == 0 else None
        # the module's structure (meta, no memory) for the export template of sharded checkpoints
        self.skeleton = _meta_copy(self.module) if self.rank == 0 and any(
            v is self.module for v in vars(objective).values()) else None
        blocks = _blocks(objective, self.module)
        if cfg.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for parent, name in blocks:
                parent.register_module(name, checkpoint_wrapper(getattr(parent, name)))
        self.trainable: nn.Module = self.module
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if cfg.bf16(self.device) else MixedPrecisionPolicy())
            for parent, name in blocks:
                fully_shard(getattr(parent, name), mp_policy=mp)
            fully_shard(self.module, mp_policy=mp)
        elif self.world > 1:
            self.trainable = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sync_grads(self, on: bool):
        """Context for one micro-step: gradients are reduced across ranks only when `on`."""
        if self.world == 1 or on:
            if self.fsdp:
                self.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            self.module.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.trainable.no_sync()

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the ranks (their equal shards of the global batch)."""
        if self.world == 1:
            return metrics
        import torch.distributed as dist

        t = torch.tensor(list(metrics.values()), dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return dict(zip(metrics, (t / self.world).tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _options(self, load: bool = False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if load:
            return StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world > 1)
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (gathered, CPU) state dict of the trained module; complete on rank 0."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=self._options())

    def save_objective(self, path: Path, state: dict[str, torch.Tensor], module: nn.Module | None = None) -> None:
        """Rank 0: the objective's own checkpoint; under FSDP from a meta copy filled with `state`;
        with `module`, of that module in place of the trained one."""
        if module is None and self.template is None:
            self.objective.save(path)
            return
        if module is None:
            self.template.load_state_dict(state, assign=True)
        swapped = [k for k, v in vars(self.objective).items() if v is self.module]
        for k in swapped:
            setattr(self.objective, k, module if module is not None else self.template)
        try:
            self.objective.save(path)
        finally:
            for k in swapped:
                setattr(self.objective, k, self.module)
            if module is None:
                self.template = _meta_copy(self.template)  # drop the gathered tensors

    def save_export_template(self, path: Path) -> None:
        """Rank 0: the objective's checkpoint with every tensor EMPTY (config, tokenizer, side config
        and the weight names and dtypes it writes): `export` fills it from a sharded checkpoint."""
        if self.skeleton is None:
            return
        tpl = _meta_copy(self.skeleton)
        for m in tpl.modules():
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is not None:
                        e = torch.empty(0, dtype=t.dtype)
                        store[k] = nn.Parameter(e, requires_grad=False) if isinstance(t, nn.Parameter) else e
        self.save_objective(path, {}, module=tpl)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            del self.trainable  # DDP's reducer goes first, while its process group is still registered
            dist.barrier()
            if self.own_group:
                dist.destroy_process_group()


# ----------------------------------------------------------------------------- training state


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): later sharers become copies."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v.contiguous()
        seen.add(key)
    return out


def _save_training_state(path: Path, model_state: dict, optim_state: dict, rng: dict, trainer: dict) -> None:
    from safetensors.torch import save_file

    save_file(_unshared(model_state), str(path / "trainable.safetensors"))
    tensors = {f"{fqn}/{k}": v.detach().cpu().contiguous() for fqn, st in optim_state["state"].items()
               for k, v in st.items()}
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps({"param_groups": optim_state["param_groups"]}, indent=1))
    save_file(rng, str(path / "rng.safetensors"))
    (path / STATE_FILE).write_text(json.dumps(trainer, indent=1))  # last: marks the checkpoint complete


def _load_optimizer_state(path: Path) -> dict:
    from safetensors.torch import load_file

    state: dict[str, dict] = {}
    for key, v in load_file(str(path / "optimizer.safetensors")).items():
        fqn, _, k = key.rpartition("/")
        state.setdefault(fqn, {})[k] = v
    return {"state": state, **json.loads((path / "optimizer.json").read_text())}


def _generators(objective: Objective) -> dict[str, torch.Generator]:
    """The objective's own torch.Generator attributes (e.g. a noise sampler): saved like the global RNG."""
    return {f"objective.{k}": v for k, v in vars(objective).items() if isinstance(v, torch.Generator)}


def _rng_states(runner: _Runner) -> dict[str, torch.Tensor]:
    """Every rank's CPU (and CUDA) generator state and the objective's generators, gathered on all ranks."""
    mine = {"cpu": torch.get_rng_state()}
    if runner.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(runner.device)
    mine.update({k: g.get_state() for k, g in _generators(runner.objective).items()})
    states = [mine]
    if runner.world > 1:
        import torch.distributed as dist

        states = [None] * runner.world
        dist.all_gather_object(states, mine)
    return {f"{k}.rank{r}": v for r, s in enumerate(states) for k, v in s.items()}


def _set_rng(rng: dict[str, torch.Tensor], runner: _Runner) -> None:
    """This rank's saved generators (rank 0's when the run had fewer ranks)."""
    r = runner.rank if f"cpu.rank{runner.rank}" in rng else 0
    torch.set_rng_state(rng[f"cpu.rank{r}"])
    if runner.device.type == "cuda" and f"cuda.rank{r}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.rank{r}"], runner.device)
    for k, g in _generators(runner.objective).items():
        if f"{k}.rank{r}" in rng:
            g.set_state(rng[f"{k}.rank{r}"])


# ----------------------------------------------------------------------------- logs and plots


def _write_logs(path: Path, objective: Objective, history: list[dict], evals: list[dict], cfg: TrainConfig) -> None:
    (path / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if evals:
        (path / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (path / "train_config.json").write_text(json.dumps({"objective": objective.name, **asdict(cfg)}, indent=2))
    _plot(history, evals, path / "loss.png", objective.name)


def _plot(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    steps = [h["step"] for h in history]
    for key in [k for k in history[0] if k not in NOT_LOSS]:
        ax.plot(steps, [h.get(key, float("nan")) for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{title} training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        ax = axes[0][1]
        for key in [k for k in evals[0] if k != "step"]:
            ax.plot([e["step"] for e in evals], [e[key] for e in evals], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_title("held-out evaluation")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: this process's peak RSS (ru_maxrss would carry over the peak of a parent that forked it)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------- the loop


def train(objective: Objective, data: PackedDataset, out_dir: str | Path, cfg: TrainConfig,
          evaluator: Callable[[Path], dict[str, float]] | None = None) -> list[dict]:
    """Run cfg.steps optimiser steps (from the newest checkpoint with cfg.resume); returns the
    logged history (also in out_dir/train_log.jsonl). `evaluator(checkpoint_dir) -> metrics` runs on
    rank 0 every cfg.eval_every steps on a checkpoint of the current weights."""
    out = Path(out_dir)
    cfg.check()
    resume_from = check_resume(out) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    run = _Runner(objective, cfg)
    params = [p for p in run.module.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the objective's module has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)
    trainer = {"objective": objective.name, "seq_len": data.seq_len, "batch_size": cfg.batch_size,
               "grad_accum": cfg.grad_accum, "seed": cfg.seed, "steps": cfg.steps, "data_sequences": len(data),
               "doc_attention": getattr(data, "doc_attention", False), "loss_on": getattr(data, "loss_on", "all")}
    history: list[dict] = []
    evals: list[dict] = []
    start = 0
    if resume_from is not None:
        start, history, evals = _resume(run, opt, resume_from, trainer)
    batches = data.batches(cfg.batch_size, run.rank, run.world, start=start * cfg.grad_accum)
    autocast = cfg.autocast(run.device)
    step_tokens = cfg.batch_size * cfg.grad_accum * data.seq_len
    bar = None
    if cfg.progress and run.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {objective.name}", unit="step")
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    flops_per_step = 0.0
    window = [time.perf_counter(), 0]  # (start time, steps) since the last log line
    run.module.train()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(run.device)
            count = step == start and micro == 0 and cfg.peak_tflops > 0
            counter = contextlib.nullcontext()
            if count:
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
            with counter, run.sync_grads(micro == cfg.grad_accum - 1):
                with autocast:
                    loss, metrics = objective.loss(run.trainable, batch)
                (loss / cfg.grad_accum).backward()
            if count:  # forward + backward FLOPs of this rank's micro-batch, activation recompute included
                flops_per_step = counter.get_total_flops() * cfg.grad_accum * run.world
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window[1] += 1
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            sums = run.mean_over_ranks(sums)
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            dt = (time.perf_counter() - window[0]) / window[1]
            speed = {"tokens_per_s": step_tokens / dt, "peak_mem_gb": _peak_mem_gb(run.device)}
            if flops_per_step:
                speed["mfu"] = flops_per_step / dt / (cfg.peak_tflops * 1e12 * run.world)
            history.append({"step": step, "lr": cfg.lr_at(step), "tokens": (step + 1) * step_tokens, **sums, **speed})
            window = [time.perf_counter(), 0]
            if bar is not None:
                show = {k: f"{v:.3f}" for k, v in sums.items()}
                show["tok/s"] = f"{speed['tokens_per_s']:.0f}"
                show["mem"] = f"{speed['peak_mem_gb']:.1f}G"
                if "mfu" in speed:
                    show["mfu"] = f"{100 * speed['mfu']:.1f}%"
                bar.set_postfix(show)
        if bar is not None:
            bar.update(1)
        done = step + 1
        if evaluator is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            evals.append({"step": step, **_evaluate(run, evaluator, out)})
            if bar is not None:
                bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in evals[-1].items() if k != "step"))
            window = [time.perf_counter(), 0]
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):  # the last one: to extend the run
            _checkpoint(run, opt, out, {**trainer, "step": done, "micro_batches": done * cfg.grad_accum,
                                        "replans": cfg.replans, "history": history, "evals": evals})
            window = [time.perf_counter(), 0]
    if bar is not None:
        bar.close()
    run.module.eval()
    _save_final(run, out, history, evals)
    run.close()
    return history


def _resume(run: _Runner, opt, ckpt: Path, trainer: dict) -> tuple[int, list[dict], list[dict]]:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = json.loads((ckpt / STATE_FILE).read_text())
    defaults = {"doc_attention": False, "loss_on": "all"}  # checkpoints from before these options
    for k in RESUME_KEYS:
        if saved.get(k, defaults.get(k)) != trainer[k]:
            raise UserError(f"--resume: {ckpt} was trained with {k}={saved.get(k, defaults.get(k))!r}, this run has "
                            f"{trainer[k]!r}; resume with the same data and options (only --steps may grow)")
    if trainer["steps"] < saved["steps"]:
        raise UserError(f"--resume: {ckpt} belongs to a run of {saved['steps']} steps; --steps {trainer['steps']} "
                        "would shorten it (a run can only be extended)")
    cfg = run.cfg
    cfg.replans = [list(r) for r in saved.get("replans", [])]
    extended = trainer["steps"] > saved["steps"]
    if extended:
        line = cfg.replan(saved["step"], saved["steps"])
        if run.rank == 0:
            log.info(line)
    if (ckpt / DCP_DIR).is_dir():  # sharded: each rank reads what it holds, whatever world size wrote it
        import torch.distributed.checkpoint as dcp

        state = _dcp_state(run, opt)
        dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), no_dist=run.world == 1)
        set_model_state_dict(run.module, state["model"])
        set_optimizer_state_dict(run.module, opt, state["optim"])
    else:
        full = run.rank == 0 or run.world == 1  # with several ranks, rank 0 reads and broadcasts
        model_state = load_file(str(ckpt / "trainable.safetensors")) if full else {}
        set_model_state_dict(run.module, model_state, options=run._options(load=True))
        optim_state = _load_optimizer_state(ckpt) if full else {}
        set_optimizer_state_dict(run.module, opt, optim_state, options=run._options(load=True))
    _set_rng(load_file(str(ckpt / "rng.safetensors")), run)
    if run.rank == 0:
        log.info(f"resuming from {ckpt} (step {saved['step']} of {trainer['steps']})")
    return saved["step"], saved["history"], saved["evals"]


def _checkpoint(run: _Runner, opt, out: Path, trainer: dict) -> None:
    """Write out/checkpoints/step-N atomically (temp dir + rename), then drop all but the newest
    keep_checkpoints. Collective: every rank calls it (full: the state dicts are gathered)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if run.cfg.checkpoint_format == "sharded":
        return _checkpoint_sharded(run, opt, out, trainer)
    model_state = run.model_state()
    optim_state = get_optimizer_state_dict(run.module, opt, options=run._options())
    rng = _rng_states(run)
    if run.rank == 0:
        final, tmp = _step_dirs(out, trainer["step"])
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        run.save_objective(tmp, model_state)
        _write_logs(tmp, run.objective, trainer["history"], trainer["evals"], run.cfg)
        _save_training_state(tmp, model_state, optim_state, rng, trainer)
        _finish_checkpoint(run, tmp, final)
    run.barrier()


def _step_dirs(out: Path, step: int) -> tuple[Path, Path]:
    root = out / CHECKPOINTS
    final = root / f"step-{step:08d}"
    return final, root / f".{final.name}.tmp"


def _finish_checkpoint(run: _Runner, tmp: Path, final: Path) -> None:
    """Rank 0: rename the complete temp dir into place and drop all but the newest keep_checkpoints."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    keep = run.cfg.keep_checkpoints
    done = sorted(p for p in final.parent.glob("step-*") if p.is_dir())
    for old in done[: -keep] if keep else []:
        shutil.rmtree(old)


def _dcp_state(run: _Runner, opt) -> dict:
    """This rank's model and optimizer state as torch.distributed.checkpoint saves and loads it:
    FSDP2 parameters as DTensor shards (each rank writes its own), replicas deduplicated."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(run.module), "optim": get_optimizer_state_dict(run.module, opt)}


def _checkpoint_sharded(run: _Runner, opt, out: Path, trainer: dict) -> None:
    """A sharded checkpoint: step-N/dcp (every rank writes its shards of weights and AdamW moments,
    nothing is gathered), the RNG states, logs, trainer state and `export/` (the objective's
    checkpoint with empty tensors, for `tidar-bench export`). Loads under any world size."""
    import torch.distributed.checkpoint as dcp

    final, tmp = _step_dirs(out, trainer["step"])
    if run.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    run.barrier()
    dcp.save(_dcp_state(run, opt), checkpoint_id=str(tmp / DCP_DIR), no_dist=run.world == 1)
    rng = _rng_states(run)
    if run.rank == 0:
        from safetensors.torch import save_file

        run.save_export_template(tmp / EXPORT_DIR)
        _write_logs(tmp, run.objective, trainer["history"], trainer["evals"], run.cfg)
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(trainer, indent=1))  # last: marks the checkpoint complete
        _finish_checkpoint(run, tmp, final)
    run.barrier()


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """The HF-layout checkpoint of a sharded training checkpoint (`tidar-bench export`): the
    export template's files with its weights read from the DCP shards (in one process, any world
    size it was written with), written to a temp dir and renamed."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / STATE_FILE).is_file() or not (ckpt / DCP_DIR).is_dir() or not (ckpt / EXPORT_DIR).is_dir():
        raise UserError(f"{ckpt} is not a complete sharded training checkpoint (out/checkpoints/step-N written with "
                        "--checkpoint-format sharded)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty")
    with safe_open(str(ckpt / EXPORT_DIR / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    meta = dcp.FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata
    missing = [k for k in dtypes if f"model.{k}" not in meta]
    if missing:
        raise UserError(f"{ckpt}: the shards lack {len(missing)} weights of the export template, e.g. {missing[0]}")
    state = {"model": {k: torch.empty(meta[f"model.{k}"].size, dtype=meta[f"model.{k}"].properties.dtype)
                       for k in dtypes}}
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), no_dist=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(ckpt / EXPORT_DIR, tmp)
    save_file(_unshared({k: v.to(_ST_DTYPES[dtypes[k]]) for k, v in state["model"].items()}),
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
              "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


def _evaluate(run: _Runner, evaluator, out: Path) -> dict[str, float]:
    """Save the current weights to out/.eval (collective), evaluate them on rank 0."""
    state = run.model_state() if run.fsdp else {}
    metrics: dict[str, float] = {}
    if run.rank == 0:
        path = out / ".eval"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        run.save_objective(path, state)
        metrics = evaluator(path)
        shutil.rmtree(path)
    run.barrier()
    return metrics


def _save_final(run: _Runner, out: Path, history: list[dict], evals: list[dict]) -> None:
    """The final checkpoint into `out`: written to a temp dir inside it, then each file renamed into
    place (a reader never sees half a file; checkpoints/ stays)."""
    state = run.model_state() if run.fsdp else {}
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        run.save_objective(tmp, state)
        _write_logs(tmp, run.objective, history, evals, run.cfg)
        for f in sorted(tmp.iterdir()):
            dest = out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        tmp.rmdir()
    run.barrier()
