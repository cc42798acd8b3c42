"""Pre-tokenized token shards: what `tidar-bench tokenize` writes and training streams.

A shard folder holds `index.json` and, per shard, `shard-NNNNN.ids` (the token ids, raw little-endian
uint32: `np.memmap(path, "<u4")` reads it) and `shard-NNNNN.flags` (one uint8 per token: `data.DOC_START`,
`data.LOSS`). The shards are the concatenation of `encode_document` over every document of the
sources in order (each followed by EOS): the very token stream `PackedDataset` builds in memory.
So `ShardDataset` has the same rows (seq_len chunks, the tail dropped) and, through the same seeded
permutation, yields the same batches: training from shards equals training from the source files,
and a resume (the loop's data position = micro-batches consumed) continues mid-shard exactly.

Memory: `write_shards` holds one shard's buffer (5 bytes per token); `ShardDataset` holds only the
index and reads each batch's rows with positioned reads (os.pread), so a process's memory is a
batch, not the data set (8+ bytes per token per process on the in-memory path)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import UserError
from .data import Document, PackedDataset, encode_document

FORMAT = "tidar-bench-token-shards/1"
INDEX = "index.json"
SHARD_TOKENS = 1 << 28  # 1 GiB of ids per shard


def is_shard_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def write_shards(docs: Iterable[Document], tokenizer, out: str | Path, *, shard_tokens: int = SHARD_TOKENS,
                 meta: dict | None = None) -> dict:
    """Tokenize `docs` into shards in `out` (written to a temp folder, renamed when complete);
    returns the index."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token to separate documents")
    if array("I").itemsize != 4:
        raise UserError("this platform's unsigned int is not 4 bytes; token shards need uint32")
    if len(tokenizer) > 2**32:
        raise UserError("the vocabulary does not fit uint32 token ids")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict] = []
    ids, flags = array("I"), bytearray()
    n_docs = 0

    def flush():
        name = f"shard-{len(shards):05d}"
        if sys.byteorder != "little":
            ids.byteswap()
        with open(tmp / f"{name}.ids", "wb") as f:  # straight from the buffer: no copy of the shard
            ids.tofile(f)
        with open(tmp / f"{name}.flags", "wb") as f:
            f.write(flags)
        shards.append({"name": name, "tokens": len(ids)})
        del ids[:], flags[:]

    try:
        for doc in docs:
            i, f = encode_document(doc, tokenizer)
            ids.extend(i)
            flags.extend(f)
            n_docs += 1
            while len(ids) >= shard_tokens:  # cut at shard_tokens (a document may span shards)
                rest_i, rest_f = ids[shard_tokens:], flags[shard_tokens:]
                del ids[shard_tokens:], flags[shard_tokens:]
                flush()
                ids.extend(rest_i)
                flags.extend(rest_f)
        if ids:
            flush()
        if not n_docs:
            raise UserError("the training corpus is empty")
    except BaseException:  # a bad record or an interrupt leaves nothing behind
        shutil.rmtree(tmp)
        raise
    index = {"format": FORMAT, "tokens": sum(s["tokens"] for s in shards), "documents": n_docs,
             "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer), "shards": shards, **(meta or {})}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return index


def read_index(path: str | Path) -> dict:
    p = Path(path) / INDEX
    try:
        index = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a readable token-shard index ({e})")
    if index.get("format") != FORMAT:
        raise UserError(f"{p}: not a token-shard index of format {FORMAT} (written by `tidar-bench tokenize`)")
    for s in index["shards"]:
        for ext, size in (("ids", 4), ("flags", 1)):
            f = Path(path) / f"{s['name']}.{ext}"
            if not f.is_file() or f.stat().st_size != s["tokens"] * size:
                raise UserError(f"{f}: missing or not {s['tokens']} tokens long (an incomplete copy?)")
    return index


class ShardDataset(PackedDataset):
    """The rows of a shard folder (see the module docstring), read on demand; batches, resume and
    rank split are PackedDataset's."""

    def __init__(self, path: str | Path, tokenizer, seq_len: int, seed: int = 0, *, doc_attention: bool = False,
                 loss_on: str = "all"):
        self.path = Path(path)
        index = read_index(path)
        if tokenizer is not None and (index["eos_token_id"] != tokenizer.eos_token_id
                                      or index["vocab_size"] != len(tokenizer)):
            raise UserError(f"{path} was tokenized with another tokenizer (EOS {index['eos_token_id']}, "
                            f"{index['vocab_size']} tokens; this one: EOS {tokenizer.eos_token_id}, {len(tokenizer)})")
        if loss_on != "all" and index.get("loss_on", "all") != loss_on:
            raise UserError(f"--loss-on {loss_on}: {path} was tokenized with --loss-on {index.get('loss_on', 'all')}; "
                            "tokenize again with the same --loss-on")
        self.starts = np.cumsum([0] + [s["tokens"] for s in index["shards"]])
        self.files = [(self.path / f"{s['name']}.ids", self.path / f"{s['name']}.flags") for s in index["shards"]]
        self.rows_total = int(self.starts[-1]) // seq_len
        if self.rows_total == 0:
            raise UserError(f"{path} has {int(self.starts[-1])} tokens, fewer than one sequence of {seq_len}")
        self.seq_len, self.seed = seq_len, seed
        self.doc_attention, self.loss_on = doc_attention, loss_on

    def __len__(self) -> int:
        return self.rows_total

    @property
    def n_tokens(self) -> int:
        return self.rows_total * self.seq_len

    def _read(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + n) of the stream: (ids uint32, flags uint8), across shards."""
        ids, flags = np.empty(n, np.uint32), np.empty(n, np.uint8)
        got = 0
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        while got < n:
            off = start + got - int(self.starts[s])
            take = min(n - got, int(self.starts[s + 1]) - start - got)
            for buf, f, size in ((ids, self.files[s][0], 4), (flags, self.files[s][1], 1)):
                fd = os.open(f, os.O_RDONLY)
                try:
                    raw = os.pread(fd, take * size, off * size)
                finally:
                    os.close(fd)
                buf[got : got + take] = np.frombuffer(raw, dtype="<u4" if size == 4 else np.uint8)
            got += take
            s += 1
        return ids, flags

    def raw(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq_len
        parts = [self._read(int(r) * S, S) for r in idx.flatten().tolist()]
        ids = torch.from_numpy(np.stack([p[0] for p in parts]).astype(np.int64)).view(*idx.shape, S)
        flags = torch.from_numpy(np.stack([p[1] for p in parts])).view(*idx.shape, S)
        return ids, flags
