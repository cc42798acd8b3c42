"""The one training loop every recipe uses (TiDAR, block diffusion, EAGLE head).

An `Objective` says what is trained (`module()`), how a batch becomes a loss (`loss`) and how
the result is saved (`save`); this loop does the rest: AdamW, linear warm-up + cosine decay,
gradient accumulation, clipping, bf16 autocast on CUDA, a progress bar with the objective's
metrics, `train_log.jsonl` + `loss.png`, and an atomic checkpoint. Multi-process data parallel
(DDP) when launched by `torchrun`: each rank takes its rows of every global batch, gradients are
averaged (once per optimiser step: accumulation micro-steps run under `no_sync`), only rank 0
writes, and the logged metrics are rank 0's (its shard of each batch). Metrics are deliberately not
all-reduced: a gloo collective on a Python-owned tensor right before teardown can deadlock
torch's process-group destructor against its work thread (seen with torch 2.13).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..errors import UserError
from .data import PackedDataset


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

    def autocast(self, device: torch.device):
        """The autocast context for `dtype` on `device` (weights stay in their own dtype, fp32 for
        the recipes here, so the optimiser updates full-precision master weights)."""
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise UserError(f"unknown training dtype {self.dtype!r}; use auto, float32 or bfloat16 "
                            "(float16 would need loss scaling, which this loop does not do)")
        bf16 = self.dtype in ("bfloat16", "bf16") or (self.dtype == "auto" and device.type == "cuda")
        if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("bfloat16 is not supported on this GPU; use --dtype float32")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty")


def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _save(objective: Objective, out: Path, history: list[dict], cfg: TrainConfig) -> None:
    """Checkpoint into a temp dir beside `out`, then rename (a reader never sees half a checkpoint)."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    objective.save(tmp)
    (tmp / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (tmp / "train_config.json").write_text(json.dumps({"objective": objective.name, **asdict(cfg)}, indent=2))
    _plot(history, tmp / "loss.png", objective.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in [k for k in history[0] if k not in ("step", "lr", "tokens")]:
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{title} training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(objective: Objective, data: PackedDataset, out_dir: str | Path, cfg: TrainConfig) -> list[dict]:
    """Run cfg.steps optimiser steps; returns the logged history (also in out_dir/train_log.jsonl)."""
    out = Path(out_dir)
    rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    module = objective.module()
    device = next(module.parameters()).device
    trainable: nn.Module = module
    own_group = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            own_group = True
        trainable = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the objective's module has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)
    batches = data.batches(cfg.batch_size, rank, world)
    autocast = cfg.autocast(device)
    history: list[dict] = []
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"train {objective.name}", unit="step")
    module.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(device)
            # DDP: all-reduce gradients only on the last micro-step (they accumulate locally before)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if world == 1 or last else trainable.no_sync()
            with sync:
                with autocast:
                    loss, metrics = objective.loss(trainable, batch)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "lr": cfg.lr_at(step),
                            "tokens": (step + 1) * cfg.batch_size * cfg.grad_accum * data.seq_len, **sums})
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()})
            bar.update(1)
        if cfg.save_every and rank == 0 and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save(objective, out, history, cfg)
    if bar is not None:
        bar.close()
    module.eval()
    if rank == 0:
        _save(objective, out, history, cfg)
    if world > 1:
        del trainable  # DDP's reducer goes first, while its process group is still registered
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return history
