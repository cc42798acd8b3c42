"""`tidar-bench train ...`: the project's training recipes, all through one loop
(tidar_bench/training/loop.py). Under `torchrun --nproc_per_node N -m tidar_bench.cli train ...`
the loop runs data-parallel (DDP)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import typer

from .app import app
from ..errors import UserError

train_app = typer.Typer(help="Train models with the project's recipes (continued pretraining from an AR checkpoint).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

DATA_HELP = "training text: .jsonl (field --field) or plain text files (documents separated by two blank lines)"


def run_recipe(make_objective: Callable[[object, str], object], base: Path, data: list[Path], out: Path, *,
               field: str, seq_len: int, batch_size: int, grad_accum: int, lr: float, warmup_steps: int, steps: int,
               seed: int, device: str, dtype: str = "auto", save_every: int = 0) -> list[dict]:
    """Shared by every `train` command: checks, tokenizer, data, objective, loop.

    `make_objective(tokenizer, device)` builds the objective on `device` (under torchrun on CUDA,
    this process's GPU). Warm-up is capped at a tenth of the steps so short runs reach the peak lr."""
    import torch

    from ..model import read_config, resolve_device
    from ..registry import load_tokenizer
    from ..training.data import PackedDataset, read_texts
    from ..training.loop import TrainConfig, check_out_dir, dist_info, train

    read_config(base)  # a clear error for a missing or broken base checkpoint
    check_out_dir(out)
    if min(seq_len, batch_size, grad_accum, steps) < 1:
        raise UserError("--seq-len, --batch-size, --grad-accum and --steps must be >= 1")
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        raise UserError(f"{base} has no tokenizer files; training needs one")
    rank, _ = dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    cfg = TrainConfig(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup_steps=min(warmup_steps, max(1, steps // 10)) if warmup_steps else 0, steps=steps,
                      seed=seed, save_every=save_every, dtype=dtype, progress=rank == 0)
    cfg.autocast(dev)  # a bad --dtype fails before the model is loaded
    texts = read_texts(data, field)
    torch.manual_seed(seed)
    objective = make_objective(tokenizer, str(dev))
    dataset = PackedDataset(texts, tokenizer, seq_len, seed)
    if rank == 0:
        print(f"{dataset.n_tokens} tokens in {len(dataset)} sequences of {seq_len}; "
              f"{steps} steps x {batch_size * grad_accum} sequences")
    hist = train(objective, dataset, out, cfg)
    if rank == 0 and hist:
        last = ", ".join(f"{k}={v:.4f}" for k, v in hist[-1].items() if k not in ("step", "lr", "tokens"))
        print(f"saved {out} ({last})")
    return hist


@train_app.command("ar")
def train_ar(
    base: Path = typer.Option(..., help="checkpoint to continue from (config.json, safetensors, tokenizer); "
                                          "a random-init one to pretrain"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output checkpoint directory (must not exist or be empty)"),
    field: str = typer.Option("text", help="JSONL field holding the text"),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16, help="global batch (split across torchrun processes)"),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup_steps: int = typer.Option(20, help="linear warm-up steps (at most steps/10), then cosine decay to lr/10"),
    steps: int = typer.Option(200),
    save_every: int = typer.Option(0, help="also checkpoint every N steps (0 = only at the end)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="compute dtype: auto | float32 | bfloat16"),
) -> None:
    """Plain next-token training: the AR base the other recipes continue from."""
    from ..training.ar import AutoregressiveObjective

    def make(tokenizer, dev):
        return AutoregressiveObjective.from_checkpoint(base, tokenizer, dev)

    run_recipe(make, base, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, dtype=dtype,
               save_every=save_every)


@train_app.command("tidar")
def train_tidar(
    base: Path = typer.Option(..., help="AR checkpoint to continue from (config.json, safetensors, tokenizer)"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output checkpoint directory (must not exist or be empty)"),
    block_size: int = typer.Option(8, help="diffusion block size k"),
    alpha: float = typer.Option(1.0, help="AR loss weight: loss = (alpha*L_AR + L_Diff)/(1+alpha)"),
    field: str = typer.Option("text", help="JSONL field holding the text"),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16, help="global batch (split across torchrun processes)"),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup_steps: int = typer.Option(20, help="linear warm-up steps (at most steps/10), then cosine decay to lr/10"),
    steps: int = typer.Option(200),
    save_every: int = typer.Option(0, help="also checkpoint every N steps (0 = only at the end)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (torchrun: each process its LOCAL_RANK GPU)"),
    dtype: str = typer.Option("auto", help="compute dtype: auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16; "
                                            "weights and optimiser stay fp32"),
) -> None:
    """TiDAR dual-mode training ("full mask"): [clean | mask copy], AR + diffusion loss in one forward."""
    from ..training.tidar import TidarObjective

    if block_size < 1:
        raise UserError(f"--block-size must be >= 1, got {block_size}")
    if alpha < 0:
        raise UserError(f"--alpha must be >= 0, got {alpha}")

    def make(tokenizer, dev):
        return TidarObjective.from_checkpoint(base, tokenizer, dev, block_size=block_size, alpha=alpha)

    run_recipe(make, base, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, dtype=dtype,
               save_every=save_every)


@train_app.command("block-diffusion")
def train_block_diffusion(
    base: Path = typer.Option(..., help="AR checkpoint to continue from (config.json, safetensors, tokenizer)"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output checkpoint directory (must not exist or be empty)"),
    block_size: int = typer.Option(8, help="block size B"),
    eps: float = typer.Option(1e-3, help="minimum mask probability"),
    loss_weighting: str = typer.Option("none", help="none | inv_t (1/t weighting of masked positions)"),
    token_shift: bool = typer.Option(False, help="Fast-dLLM v2 convention: output i predicts token i+1"),
    complementary: bool = typer.Option(False, help="also train on the complementary masking of each sequence"),
    field: str = typer.Option("text"),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup_steps: int = typer.Option(20),
    steps: int = typer.Option(200),
    save_every: int = typer.Option(0),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="compute dtype: auto | float32 | bfloat16"),
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
               save_every=save_every)
