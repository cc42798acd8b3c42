"""`tidar-bench train dflash`: train a DFlash block-diffusion drafter on a frozen target (the shared
loop, tidar_bench/training/loop.py, with `training.dflash.DFlashObjective`). The output directory
is a drafter in the official DFlash layout: decode with `--decoder dflash --draft OUT`."""

from __future__ import annotations

from pathlib import Path

import typer

from .train import DATA_HELP, FIELD_HELP, run_recipe, scale_options, train_app
from ..errors import UserError


def parse_layers(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--target-layers must be comma-separated layer indices, got {text!r}")


@train_app.command("dflash")
@scale_options
def train_dflash(
    target: Path = typer.Option(..., help="target checkpoint (config.json, safetensors, tokenizer); stays frozen"),
    data: list[Path] = typer.Option(..., help=DATA_HELP + " (e.g. `distill` output: the target's own answers)"),
    out: Path = typer.Option(..., help="output drafter directory (must not exist or be empty)"),
    block_size: int = typer.Option(16, help="block size k: the drafter proposes k-1 tokens per forward"),
    num_layers: int = typer.Option(1, help="drafter layers (the target's layer shape)"),
    target_layers: str = typer.Option("", help="target layers whose outputs feed the drafter, e.g. 1,2,3 "
                                               "(default: DFlash's choice, one per drafter layer from 1 to L-3)"),
    num_anchors: int = typer.Option(16, help="training blocks drawn per sequence"),
    init: str = typer.Option("target", help="target (warm start: drafter layers <- the target's last layers, fc <- the "
                                            "last tapped layer, final norm <- the target's) | random"),
    labels: str = typer.Option("target", help="target (the target's distributions, soft CE) | data (the text's "
                                              "tokens)"),
    gamma: float = typer.Option(0.0, help="loss decay over block rows exp(-(i-1)/gamma) (0 = 7/5/4 for k = 16/10/8, "
                                          "else k/2)"),
    field: str = typer.Option("text", "--text-field", "--field", help=FIELD_HELP),
    seq_len: int = typer.Option(256),
    batch_size: int = typer.Option(16, help="global batch (split across torchrun processes)"),
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
    """DFlash drafter (block diffusion conditioned on the target's features) trained on the target's outputs."""
    from tidar_bench.baselines.dflash_drafter import DFlashDrafter
    from ..model import load_model
    from ..training.dflash import LABELS, DFlashObjective

    if init not in ("target", "random"):
        raise UserError(f"--init must be target or random, got {init!r}")
    if labels not in LABELS:
        raise UserError(f"--labels must be one of {', '.join(LABELS)}, got {labels!r}")
    if block_size < 2 or num_layers < 1 or num_anchors < 1 or gamma < 0:
        raise UserError("--block-size must be >= 2, --num-layers and --num-anchors >= 1, --gamma >= 0")
    layers = parse_layers(target_layers)

    if scale["loss_on"] != "all":
        raise UserError("--loss-on completion applies to the ar, tidar and block-diffusion recipes; this one learns "
                        "the target's own distributions")

    def make(tokenizer, dev):
        model = load_model(target, "float32", dev)
        if tokenizer.mask_token_id is None:
            raise UserError(f"the tokenizer of {target} has no mask token; DFlash blocks need one "
                            "(add [MASK] to the tokenizer and the target's vocabulary)")
        drafter = DFlashDrafter.from_target(model, num_layers=num_layers, block_size=block_size,
                                            mask_token_id=tokenizer.mask_token_id, target_layer_ids=layers, seed=seed,
                                            init=init)
        return DFlashObjective(model, drafter, num_anchors=num_anchors, labels=labels, gamma=gamma or None)

    run_recipe(make, target, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, dtype=dtype,
               save_every=save_every, **scale)
