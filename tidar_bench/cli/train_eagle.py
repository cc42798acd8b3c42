"""`tidar-bench train eagle`: train an EAGLE draft head on a frozen target (the shared loop,
tidar_bench/training/loop.py, with `training.eagle_head.EagleHeadObjective`). The output directory
is a draft head in the official EAGLE-3 layout: decode with `--decoder eagle --draft OUT`."""

from __future__ import annotations

from pathlib import Path

import typer

from .train import DATA_HELP, FIELD_HELP, run_recipe, scale_options, train_app
from ..errors import UserError


@train_app.command("eagle")
@scale_options
def train_eagle(
    target: Path = typer.Option(..., help="target checkpoint (config.json, safetensors, tokenizer); stays frozen"),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="output draft-head directory (must not exist or be empty)"),
    form: str = typer.Option("eagle3", help="eagle3 (fused low/mid/high features, own vocab) | eagle1 (last feature)"),
    draft_vocab_size: int = typer.Option(0, help="eagle3: keep the N most frequent training tokens (0 = full vocab)"),
    ttt_steps: int = typer.Option(0, help="training-time test: unrolled draft steps (0 = 3 for eagle3, 1 for eagle1)"),
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
    scale: dict | None = None,
) -> None:
    """EAGLE draft head (EAGLE-3 or EAGLE-1 style) trained on the target's own features and distributions."""
    import torch

    from tidar_bench.baselines.eagle_head import FORMS, EagleHead
    from ..model import load_model
    from ..training.data import read_texts
    from ..training.eagle_head import EagleHeadObjective, frequent_tokens

    if form not in FORMS:
        raise UserError(f"--form must be one of {', '.join(FORMS)}, got {form!r}")
    if ttt_steps < 0 or draft_vocab_size < 0:
        raise UserError("--ttt-steps and --draft-vocab-size must be >= 0")
    if form == "eagle1" and draft_vocab_size:
        raise UserError("--draft-vocab-size needs --form eagle3 (eagle1 reads the target's LM head)")

    if scale["loss_on"] != "all":
        raise UserError("--loss-on completion applies to the ar, tidar and block-diffusion recipes; this one learns "
                        "the target's own distributions")

    def make(tokenizer, dev):
        model = load_model(target, "float32", dev)
        head = EagleHead.from_target(model, form, draft_vocab_size or None, seed=seed)
        if draft_vocab_size:
            read = dict(split=scale["data_split"], streaming=scale["streaming"], max_docs=scale["max_docs"])
            ids = [i for t in read_texts(data, field, tokenizer, **read) for i in tokenizer.encode(t, add_special_tokens=False)]
            head.set_draft_vocab(frequent_tokens(torch.tensor(ids), draft_vocab_size, model.config.vocab_size))
        steps_ = ttt_steps or (3 if form == "eagle3" else 1)
        return EagleHeadObjective(model, head, ttt_steps=steps_)

    run_recipe(make, target, data, out, field=field, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed, device=device, save_every=save_every, **scale)
