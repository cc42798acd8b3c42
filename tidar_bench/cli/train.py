"""`tidar-bench train ...`: the project's training recipes, all through one loop
(tidar_bench/training/loop.py). Under `torchrun --nproc_per_node N -m tidar_bench.cli train ...`
the loop runs data-parallel (DDP)."""

from __future__ import annotations

import functools
import inspect
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import typer

from .app import app
from ..errors import UserError

train_app = typer.Typer(help="Train models with the project's recipes (continued pretraining from an AR checkpoint).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

DATA_HELP = ("training data, repeatable: .jsonl/.json (field --text-field), .parquet, .arrow, plain text "
             "(documents separated by two blank lines), a datasets directory, a Hugging Face dataset NAME[:CONFIG], "
             "or a token-shard folder written by `tidar-bench tokenize` (streamed, not loaded)")

FIELD_HELP = "record field holding the text, or a chat (list of role/content messages, rendered with the chat template)"


@dataclass
class ScaleOptions:
    """The options every recipe shares beyond its own (sharding, resume, data mixing, logging,
    evaluation); `scale_options` adds them to a Typer command, which passes them to run_recipe."""

    shard: str = "auto"
    doc_attention: bool = False
    loss_on: str = "all"
    attention_masks: str = "dense"
    checkpoint_format: str = "full"
    activation_checkpointing: bool = False
    resume: bool = False
    keep_checkpoints: int = 2
    data_weights: str = ""
    data_split: str = "train"
    streaming: bool = False
    max_docs: int = 0
    peak_tflops: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    eval_prompts: Path | None = None
    eval_limit: int = 32
    eval_max_new_tokens: int = 64


_SCALE_HELP = {
    "shard": "auto (DDP under torchrun) | ddp | fsdp (FSDP2 fully_shard per block, bf16 params with fp32 master "
             "weights on CUDA; needs torchrun)",
    "doc_attention": "in packed sequences attend only within each document (positions and blocks restart per "
                     "document; a document's last token predicts nothing)",
    "loss_on": "all | completion: loss only on assistant turns of chats (not system/user turns or the assistant "
               "header) and on the completion of prompt/completion records; plain text counts whole",
    "attention_masks": "dense (boolean n x n masks, SDPA) | block (FlexAttention block masks built from the document "
                       "and block structure: no n x n mask, for long --seq-len; compiled kernel on CUDA)",
    "checkpoint_format": "full (rank 0 gathers weights and AdamW state, writes safetensors + the HF layout) | sharded "
                         "(torch.distributed.checkpoint: each rank writes its shards; resumes under any world size; "
                         "`tidar-bench export` writes the HF layout)",
    "activation_checkpointing": "recompute each block's activations in the backward pass (less memory, ~1/3 more compute)",
    "resume": "continue from the newest checkpoint in --out/checkpoints (model, optimizer, schedule, RNG, data position)",
    "keep_checkpoints": "keep the newest N checkpoints of --save-every (0 = all)",
    "data_weights": "mixing weights of the --data sources, comma-separated (default: one sequence stream, sources concatenated)",
    "data_split": "split of Hugging Face / directory datasets",
    "streaming": "stream Hugging Face datasets (with --max-docs: read only that many records)",
    "max_docs": "read at most N records per source (0 = all)",
    "peak_tflops": "peak TFLOPS of one device (e.g. 989 for H100 SXM bf16 dense) to log MFU; 0 = no MFU",
    "log_every": "log (train_log.jsonl, progress bar) every N steps",
    "eval_every": "evaluate on --eval-prompts every N steps (and at the end)",
    "eval_prompts": "held-out prompts (.jsonl with 'prompt', optional 'answer') for --eval-every",
    "eval_limit": "evaluate on the first N prompts",
    "eval_max_new_tokens": "tokens generated per evaluation prompt",
}


def scale_options(fn):
    """Add ScaleOptions' fields as Typer options to command `fn`; they reach it as `scale=` (a dict
    of run_recipe keyword arguments)."""
    sig = inspect.signature(fn)
    types = typing.get_type_hints(ScaleOptions)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=types[f.name],
                               default=typer.Option(f.default, help=_SCALE_HELP[f.name]))
             for f in fields(ScaleOptions)]
    params = [p for p in sig.parameters.values() if p.name != "scale"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        scale = {f.name: kwargs.pop(f.name) for f in fields(ScaleOptions)}
        return fn(*args, **kwargs, scale=scale)

    wrapper.__signature__ = sig.replace(parameters=params + extra)
    return wrapper


def run_recipe(make_objective: Callable[[object, str], object], base: Path, data: list[Path], out: Path, *,
               field: str, seq_len: int, batch_size: int, grad_accum: int, lr: float, warmup_steps: int, steps: int,
               seed: int, device: str, dtype: str = "auto", save_every: int = 0, shard: str = "auto",
               doc_attention: bool = False, loss_on: str = "all", attention_masks: str = "dense",
               checkpoint_format: str = "full",
               activation_checkpointing: bool = False, resume: bool = False, keep_checkpoints: int = 2,
               data_weights: str = "", data_split: str = "train", streaming: bool = False, max_docs: int = 0,
               peak_tflops: float = 0.0, log_every: int = 10, eval_every: int = 0, eval_prompts: Path | None = None, eval_limit: int = 32,
               eval_max_new_tokens: int = 64) -> list[dict]:
    """Shared by every `train` command: checks, tokenizer, data, objective, loop.

    `make_objective(tokenizer, device)` builds the objective on `device` (under torchrun on CUDA,
    this process's GPU). Warm-up is capped at a tenth of the steps so short runs reach the peak lr.
    Every check that needs no model (options, output folder, resume point, data) runs first, so a
    mistake costs no model load and writes nothing."""
    import torch

    from ..model import read_config, resolve_device
    from ..registry import load_tokenizer
    from ..training.data import LOSS_ON, MixedDataset, PackedDataset, read_texts
    from ..training.masking import MASK_KINDS
    from ..training.shards import ShardDataset, is_shard_dir
    from ..training.evaluate import check_eval_prompts, make_evaluator
    from ..training.loop import TrainConfig, check_out_dir, check_resume, dist_info, train

    read_config(base)  # a clear error for a missing or broken base checkpoint
    if min(seq_len, batch_size, grad_accum, steps, log_every) < 1:
        raise UserError("--seq-len, --batch-size, --grad-accum, --steps and --log-every must be >= 1")
    cfg = TrainConfig(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup_steps=min(warmup_steps, max(1, steps // 10)) if warmup_steps else 0, steps=steps,
                      seed=seed, save_every=save_every, dtype=dtype, progress=dist_info()[0] == 0, shard=shard,
                      activation_checkpointing=activation_checkpointing, resume=resume,
                      keep_checkpoints=keep_checkpoints, peak_tflops=peak_tflops, eval_every=eval_every,
                      log_every=log_every, checkpoint_format=checkpoint_format)
    cfg.check()
    if loss_on not in LOSS_ON:
        raise UserError(f"unknown --loss-on {loss_on!r}; use {' or '.join(LOSS_ON)}")
    if attention_masks not in MASK_KINDS:
        raise UserError(f"unknown --attention-masks {attention_masks!r}; use {' or '.join(MASK_KINDS)}")
    check_resume(out) if resume else check_out_dir(out)
    if eval_every and eval_prompts is None:
        raise UserError("--eval-every needs --eval-prompts FILE")
    prompts = check_eval_prompts(eval_prompts, eval_limit) if eval_prompts is not None else None
    weights = [float(w) for w in data_weights.split(",")] if data_weights else None
    if weights is not None and len(weights) != len(data):
        raise UserError(f"--data-weights has {len(weights)} weights for {len(data)} --data sources")
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        raise UserError(f"{base} has no tokenizer files; training needs one")
    rank, _ = dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    cfg.autocast(dev)  # a bad --dtype fails before the model is loaded
    if attention_masks == "block" and dev.type != "cuda":
        raise UserError("--attention-masks block needs a CUDA device (FlexAttention has no backward pass on CPU)")
    read = dict(split=data_split, streaming=streaming, max_docs=max_docs, loss_on=loss_on)
    pack = dict(doc_attention=doc_attention, loss_on=loss_on)
    shard_dirs = [d for d in data if is_shard_dir(d)]
    if shard_dirs and not weights and len(data) > 1:
        raise UserError("token shards (a `tidar-bench tokenize` folder) are one --data source each: mix several "
                        "sources with --data-weights")
    if shard_dirs:
        packed = [ShardDataset(d, tokenizer, seq_len, seed, **pack) if is_shard_dir(d)
                  else PackedDataset(read_texts([d], field, tokenizer, **read), tokenizer, seq_len, seed, **pack)
                  for d in data]
    else:
        sources = [read_texts([d], field, tokenizer, **read) for d in data] if weights else [read_texts(data, field, tokenizer, **read)]
    torch.manual_seed(seed)
    objective = make_objective(tokenizer, str(dev))
    if attention_masks != "dense":
        if not hasattr(objective, "mask_kind"):
            raise UserError(f"--attention-masks {attention_masks}: the {objective.name} objective builds its own masks")
        objective.mask_kind = attention_masks
    if not shard_dirs:
        packed = [PackedDataset(texts, tokenizer, seq_len, seed, **pack) for texts in sources]
    dataset = MixedDataset(packed, weights, seed) if weights else packed[0]
    if rank == 0:
        print(f"{dataset.n_tokens} tokens in {len(dataset)} sequences of {seq_len}; "
              f"{steps} steps x {batch_size * grad_accum} sequences")
    evaluator = None
    if prompts is not None:
        evaluator = make_evaluator(objective, prompts, base, str(dev), eval_max_new_tokens)
    hist = train(objective, dataset, out, cfg, evaluator)
    if rank == 0 and hist:
        last = ", ".join(f"{k}={v:.4f}" for k, v in hist[-1].items() if k not in ("step", "lr", "tokens"))
        print(f"saved {out} ({last})")
    return hist


@train_app.command("ar")
@scale_options
def train_ar(
    base: Path = typer.Option(..., help="checkpoint to continue from (config.json, safetensors, tokenizer); "
                                          "a random-init one to pretrain"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output checkpoint directory (must not exist or be empty)"),
    field: str = typer.Option("text", "--text-field", "--field", help=FIELD_HELP),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16, help="global batch (split across torchrun processes)"),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup_steps: int = typer.Option(20, help="linear warm-up steps (at most steps/10), then cosine decay to lr/10"),
    steps: int = typer.Option(200),
    save_every: int = typer.Option(0, help="write a resumable checkpoint to OUT/checkpoints every N steps (0 = only the final model)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="compute dtype: auto | float32 | bfloat16"),
    scale: dict | None = None,
) -> None:
    """Plain next-token training: the AR base the other recipes continue from."""
    from ..training.ar import AutoregressiveObjective

    def make(tokenizer, dev):
        return AutoregressiveObjective.from_checkpoint(base, tokenizer, dev)

    run_recipe(make, base, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, dtype=dtype,
               save_every=save_every, **scale)


@train_app.command("tidar")
@scale_options
def train_tidar(
    base: Path = typer.Option(..., help="AR checkpoint to continue from (config.json, safetensors, tokenizer)"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output checkpoint directory (must not exist or be empty)"),
    block_size: Optional[int] = typer.Option(None, help="diffusion block size k (default 8; a TiDAR base keeps its own: "
                                             "tidar_config.json, or 16 for the authors' TiDAR-LM checkpoints)"),
    alpha: float = typer.Option(1.0, help="AR loss weight: loss = (alpha*L_AR + L_Diff)/(1+alpha)"),
    field: str = typer.Option("text", "--text-field", "--field", help=FIELD_HELP),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16, help="global batch (split across torchrun processes)"),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup_steps: int = typer.Option(20, help="linear warm-up steps (at most steps/10), then cosine decay to lr/10"),
    steps: int = typer.Option(200),
    save_every: int = typer.Option(0, help="write a resumable checkpoint to OUT/checkpoints every N steps (0 = only the final model)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (torchrun: each process its LOCAL_RANK GPU)"),
    dtype: str = typer.Option("auto", help="compute dtype: auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16; "
                                            "weights and optimiser stay fp32"),
    scale: dict | None = None,
) -> None:
    """TiDAR dual-mode training ("full mask"): [clean | mask copy], AR + diffusion loss in one forward."""
    from ..training.tidar import TidarObjective

    if block_size is not None and block_size < 1:
        raise UserError(f"--block-size must be >= 1, got {block_size}")
    if alpha < 0:
        raise UserError(f"--alpha must be >= 0, got {alpha}")

    def make(tokenizer, dev):
        return TidarObjective.from_checkpoint(base, tokenizer, dev, block_size=block_size, alpha=alpha)

    run_recipe(make, base, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, dtype=dtype,
               save_every=save_every, **scale)


@train_app.command("block-diffusion")
@scale_options
def train_block_diffusion(
    base: Path = typer.Option(..., help="AR checkpoint to continue from (config.json, safetensors, tokenizer)"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output checkpoint directory (must not exist or be empty)"),
    block_size: int = typer.Option(8, help="block size B"),
    eps: float = typer.Option(1e-3, help="minimum mask probability"),
    loss_weighting: str = typer.Option("none", help="none | inv_t (1/t weighting of masked positions)"),
    token_shift: bool = typer.Option(False, help="Fast-dLLM v2 convention: output i predicts token i+1"),
    complementary: bool = typer.Option(False, help="also train on the complementary masking of each sequence"),
    field: str = typer.Option("text", "--text-field", "--field", help=FIELD_HELP),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup_steps: int = typer.Option(20),
    steps: int = typer.Option(200),
    save_every: int = typer.Option(0, help="write a resumable checkpoint to OUT/checkpoints every N steps (0 = only the final model)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="compute dtype: auto | float32 | bfloat16"),
    scale: dict | None = None,
) -> None:
    """Block diffusion (BD3-LM / Fast-dLLM v2 style), continued from an AR checkpoint."""
    from ..model import load_model
    from ..training.block_diffusion import BlockDiffusionObjective

    def make(tokenizer, dev):
        model = load_model(base, "float32", dev)
        model.requires_grad_(True)
        return BlockDiffusionObjective(model, tokenizer, block_size=block_size, eps=eps, loss_weighting=loss_weighting,
                                       token_shift=token_shift, complementary=complementary)

    run_recipe(make, base, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, dtype=dtype,
               save_every=save_every, **scale)
