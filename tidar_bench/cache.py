"""Static KV cache: buffers allocated once, a length pointer, and two ways to evict.

Layout: one key and one value tensor per layer, each [batch, n_kv_heads, max_len, head_dim] (separate
tensors, so a compiled step writes each in place; see `write`). A forward over q new tokens writes
their keys/values at [length, length + q) and advances `length`; decoders that fed speculative tokens
then `crop` back to the accepted length (TiDAR, chains) or `keep` a selected path (trees). Nothing is
reallocated per step.

Two ways to write (`write`):
- eager: `start` is a host int; returns views of the live keys/values [0, start + q) (attention over
  exactly what is cached);
- static (compiled mode, gpt-fast style): `start` is a long tensor ([] or [B], per-row offsets for
  ragged batches); the fed keys/values are written in place at start + arange(q) and the whole
  buffer is returned, so every step has one shape and attention masks the unused slots. The host
  `length` is not touched inside the compiled region: the caller advances it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        if torch.device(device).type == "cuda":
            # CUDA graphs (compile mode "reduce-overhead") may mutate only inputs at static addresses
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)
        self.max_len = max_len
        self.batch = batch
        self.length = 0  # a host int: reading it never syncs the device

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def reserve(self, q: int) -> tuple[int, int]:
        """Slots [start, end) for q new tokens; called by the model once per eager forward."""
        start = self.length
        end = start + q
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {start} cached + {q} new > max_len {self.max_len}")
        return start, end

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, q, D] at [start, start+q) and return the keys/values to attend over:
        the live prefix (int start) or the whole static buffer (tensor start, see the module doc)."""
        q = k.shape[2]
        if isinstance(start, torch.Tensor):
            slots = start.view(-1, 1) + torch.arange(q, device=k.device)  # [B or 1, q]
            rows = torch.arange(k.shape[0], device=k.device).view(-1, 1)
            # advanced indices on dims 0 and 2 (a slice between): values are [B, q, H, D]
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
            return self.k[layer], self.v[layer]
        end = start + q
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, q: int) -> None:
        self.length += q

    def crop(self, length: int) -> None:
        """Forget everything from position `length` on (rejected drafts, pre-draft blocks)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop({length}) outside [0, {self.length}]")
        self.length = length

    def keep(self, indices: torch.Tensor | list[int], row: int | None = None) -> None:
        """Keep the prefix before min(indices) and move the entries at `indices` (ascending
        absolute positions, e.g. the accepted root-to-leaf path of a verified tree) to follow it.
        row: that batch row only (its length is its decoder's: `length` is left alone)."""
        idx = torch.as_tensor(indices, device=self.device, dtype=torch.long)
        if idx.numel() == 0:
            return
        start = int(idx[0])
        n = idx.numel()
        limit = self.length if row is None else self.max_len
        if int(idx[-1]) >= limit or bool((idx[1:] <= idx[:-1]).any()):
            raise ValueError("keep() needs strictly ascending indices inside the cache")
        rows = slice(None) if row is None else slice(row, row + 1)
        for buf in (*self.k, *self.v):
            buf[rows, :, start : start + n] = buf[rows].index_select(2, idx)
        if row is None:
            self.length = start + n

    def reset(self) -> None:
        self.length = 0

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the live part, [layers, B, H, length, D] (for tests: compare with a fresh prefill)."""
        n = self.length
        return (torch.stack([t[:, :, :n] for t in self.k]).clone(),
                torch.stack([t[:, :, :n] for t in self.v]).clone())
