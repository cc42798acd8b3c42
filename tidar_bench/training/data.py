"""Training data: text/JSONL files -> token ids packed into fixed-length sequences.

Documents are tokenized, joined with EOS between them and cut into `seq_len` chunks (the tail
shorter than seq_len is dropped). Batches are drawn from a seeded permutation per epoch, so a run is
reproducible, and each rank of a distributed run takes its rows of every global batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError


def read_texts(files: Sequence[str | Path], field: str = "text") -> list[str]:
    """Documents of the training files. `.jsonl`: one document per non-empty line, the string in
    `field`. Any other file: plain UTF-8 text whose documents are separated by two blank lines
    ("\\n\\n\\n"; single blank lines stay inside a document, a file without separators is one
    document). Empty documents are skipped; no documents at all is a UserError."""
    texts: list[str] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise UserError(f"training data file not found: {p}")
        if p.suffix == ".jsonl":
            for i, line in enumerate(_read(p).splitlines()):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{p}:{i + 1}: not valid JSON")
                if not isinstance(doc, dict) or field not in doc:
                    raise UserError(f"{p}:{i + 1}: no field {field!r}")
                texts.append(str(doc[field]))
        else:
            texts.extend(d for d in _read(p).split("\n\n\n") if d.strip())
    if not texts:
        raise UserError("the training corpus is empty")
    return texts


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"training data file {p} is not UTF-8 text: {e}")


class PackedDataset:
    def __init__(self, texts: Sequence[str], tokenizer, seq_len: int, seed: int = 0):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token to separate documents")
        ids: list[int] = []
        for t in texts:
            ids.extend(tokenizer.encode(t, add_special_tokens=False))
            ids.append(tokenizer.eos_token_id)
        n = len(ids) // seq_len
        if n == 0:
            raise UserError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {seq_len}")
        self.data = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        self.seq_len = seq_len
        self.seed = seed

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.data.numel()

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Endless global batches of `batch_size` rows; this rank's rows are rank::world_size."""
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by {world_size} processes")
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(len(self), generator=g)
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                yield self.data[perm[i : i + batch_size][rank::world_size]]
            if len(perm) < batch_size:
                raise UserError(f"the corpus has {len(self)} sequences, fewer than one batch of {batch_size}")
            epoch += 1


def add_mask_token(model, tokenizer, token: str = "[MASK]") -> int:
    """The tokenizer's mask token id, adding `token` to the tokenizer if it has none.

    When the id has no row in the model (id >= vocab_size), the embedding and the untied LM head
    grow to id + 1 rows (a tied head stays tied) and config.vocab_size / config.json follow. A row
    for a newly added token (grown, or an unused padding row of a padded vocabulary) starts as the
    mean of the rows before it, so the new token begins as an "average" input."""
    added = tokenizer.mask_token_id is None
    if added:
        tokenizer.add_special_tokens({"mask_token": token})
    mid = tokenizer.mask_token_id
    cfg = model.config
    old = cfg.vocab_size
    if mid >= old:
        model.model.embed_tokens = _grown(model.model.embed_tokens, mid + 1)
        if cfg.tie_word_embeddings:
            model.lm_head = nn.Linear(cfg.hidden_size, mid + 1, bias=False, device=model.lm_head.weight.device,
                                      dtype=model.lm_head.weight.dtype)
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head = _grown(model.lm_head, mid + 1)
        cfg.vocab_size = mid + 1
        cfg.extra["vocab_size"] = mid + 1
    if added or mid >= old:
        first = min(mid, old)  # rows [first, mid] are new
        with torch.no_grad():
            for w in {id(t): t for t in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
                w[first : mid + 1] = w[:first].mean(0)
    return mid


def _grown(layer: nn.Embedding | nn.Linear, rows: int) -> nn.Module:
    """A copy of an embedding / bias-free linear layer with `rows` output rows (extra rows zero,
    set by the caller)."""
    w = layer.weight
    new = (nn.Embedding(rows, w.shape[1], device=w.device, dtype=w.dtype) if isinstance(layer, nn.Embedding)
           else nn.Linear(w.shape[1], rows, bias=False, device=w.device, dtype=w.dtype))
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: w.shape[0]] = w
    new.weight.requires_grad_(w.requires_grad)
    return new
