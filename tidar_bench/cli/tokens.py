"""`tidar-bench tokenize` (sources -> token shards that training streams) and `tidar-bench export`
(a sharded training checkpoint -> the HF-layout checkpoint)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app
from .train import DATA_HELP, FIELD_HELP


@app.command("tokenize")
def tokenize(
    base: Path = typer.Option(..., help="checkpoint (or tokenizer folder) whose tokenizer to use: the one training "
                                        "will use"),
    data: list[Path] = typer.Option(..., help=DATA_HELP.replace(", or a token-shard folder written by `tidar-bench "
                                                                "tokenize` (streamed, not loaded)", "")),
    out: Path = typer.Option(..., help="output folder (must not exist or be empty): index.json + shard-N.ids/.flags"),
    field: str = typer.Option("text", "--text-field", "--field", help=FIELD_HELP),
    loss_on: str = typer.Option("all", help="all | completion: which tokens count for the loss (as `train --loss-on`)"),
    shard_tokens: int = typer.Option(1 << 28, help="tokens per shard (1 GiB of uint32 ids; the writer's memory)"),
    data_split: str = typer.Option("train", help="split of Hugging Face / directory datasets"),
    streaming: bool = typer.Option(False, help="stream Hugging Face datasets"),
    max_docs: int = typer.Option(0, help="read at most N records per source (0 = all)"),
) -> None:
    """Pre-tokenize training data into uint32 token shards (+ per-token document/loss flags and an
    index); `train ... --data OUT` streams packed sequences from them with bounded memory."""
    from ..errors import UserError
    from ..registry import load_tokenizer
    from ..training.data import LOSS_ON, iter_documents
    from ..training.shards import write_shards

    if loss_on not in LOSS_ON:
        raise UserError(f"unknown --loss-on {loss_on!r}; use {' or '.join(LOSS_ON)}")
    if shard_tokens < 1:
        raise UserError("--shard-tokens must be >= 1")
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        raise UserError(f"{base} has no tokenizer files")
    docs = (doc for d in data for doc in iter_documents(d, field, tokenizer, split=data_split, streaming=streaming,
                                                        max_docs=max_docs, loss_on=loss_on))
    from ..provenance import portable_value

    index = write_shards(docs, tokenizer, out, shard_tokens=shard_tokens,  # paths in portable form
                         meta={"loss_on": loss_on, "sources": [portable_value(str(d)) for d in data], "field": field,
                               "tokenizer": portable_value(str(base))})
    print(f"wrote {out}: {index['tokens']} tokens of {index['documents']} documents in {len(index['shards'])} shards")


@app.command("export")
def export(
    checkpoint: Path = typer.Option(..., help="a sharded training checkpoint: OUT/checkpoints/step-N of a run with "
                                              "--checkpoint-format sharded"),
    out: Path = typer.Option(..., help="output folder (must not exist or be empty): the HF-layout checkpoint"),
) -> None:
    """Write the HF-layout checkpoint (config.json, model.safetensors, tokenizer, side config) of a
    sharded training checkpoint, in one process whatever world size wrote it."""
    from ..training.loop import export_checkpoint

    export_checkpoint(checkpoint, out)
    print(f"exported {checkpoint} -> {out}")
