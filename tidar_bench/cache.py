"""Static KV cache: buffers allocated once, a length pointer, and two ways to evict.

Layout per layer: k, v of shape [batch, n_kv_heads, max_len, head_dim]. A forward over q new
tokens writes their keys/values at [length, length + q) and advances `length`; decoders that fed
speculative tokens then `crop` back to the accepted length (TiDAR, chains) or `keep` a selected
path (trees). Nothing is reallocated per step.
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
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # a host int: reading it never syncs the device

    def reserve(self, q: int) -> tuple[int, int]:
        """Slots [start, end) for q new tokens; called by the model once per forward."""
        start = self.length
        end = start + q
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {start} cached + {q} new > max_len {self.max_len}")
        return start, end

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, q, D] at [start, start+q) and return views of all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, q: int) -> None:
        self.length += q

    def crop(self, length: int) -> None:
        """Forget everything from position `length` on (rejected drafts, pre-draft blocks)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop({length}) outside [0, {self.length}]")
        self.length = length

    def keep(self, indices: torch.Tensor | list[int]) -> None:
        """Keep the prefix before min(indices) and move the entries at `indices` (ascending
        absolute positions, e.g. the accepted root-to-leaf path of a verified tree) to follow it."""
        idx = torch.as_tensor(indices, device=self.k.device, dtype=torch.long)
        if idx.numel() == 0:
            return
        start = int(idx[0])
        n = idx.numel()
        if int(idx[-1]) >= self.length or bool((idx[1:] <= idx[:-1]).any()):
            raise ValueError("keep() needs strictly ascending indices inside the cache")
        self.k[:, :, :, start : start + n] = self.k.index_select(3, idx)
        self.v[:, :, :, start : start + n] = self.v.index_select(3, idx)
        self.length = start + n

    def reset(self) -> None:
        self.length = 0

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the live part (for tests: compare against a fresh prefill)."""
        return self.k[:, :, :, : self.length].clone(), self.v[:, :, :, : self.length].clone()
