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
    """`.jsonl`: one document per line, taken from `field`; any other file: the whole file is one
    document per blank-line-separated paragraph group (`\\n\\n\\n` separates documents)."""
    texts: list[str] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise UserError(f"training data file not found: {p}")
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{p}:{i + 1}: not valid JSON")
                if field not in doc:
                    raise UserError(f"{p}:{i + 1}: no field {field!r}")
                texts.append(str(doc[field]))
        else:
            texts.extend(d for d in p.read_text().split("\n\n\n") if d.strip())
    if not texts:
        raise UserError("the training corpus is empty")
    return texts


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
    """The tokenizer's mask token id, adding `token` to the tokenizer (and a row to the model's
    embedding and untied LM head, initialised to the mean row) if it has none."""
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": token})
    mid = tokenizer.mask_token_id
    cfg = model.config
    if mid >= cfg.vocab_size:
        new = mid + 1
        emb = model.model.embed_tokens
        grown = nn.Embedding(new, cfg.hidden_size, device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            grown.weight[: cfg.vocab_size] = emb.weight
            grown.weight[cfg.vocab_size :] = emb.weight.mean(0)
        model.model.embed_tokens = grown
        if cfg.tie_word_embeddings:
            model.lm_head = nn.Linear(cfg.hidden_size, new, bias=False, device=grown.weight.device, dtype=grown.weight.dtype)
            model.lm_head.weight = grown.weight
        else:
            head = model.lm_head
            grown_head = nn.Linear(cfg.hidden_size, new, bias=False, device=head.weight.device, dtype=head.weight.dtype)
            with torch.no_grad():
                grown_head.weight[: cfg.vocab_size] = head.weight
                grown_head.weight[cfg.vocab_size :] = head.weight.mean(0)
            model.lm_head = grown_head
        cfg.vocab_size = new
        cfg.extra["vocab_size"] = new
    return mid
