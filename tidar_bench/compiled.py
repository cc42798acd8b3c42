"""Compiled mode: fixed-shape decoding steps under torch.compile, the way gpt-fast decodes.

Every decoder runs its per-step forwards (AR's 1-token step, TiDAR's k + k*k step, EAGLE's head
steps and tree verification, block diffusion's block steps) through a `Steps` runner:

- eager (`compile=off`): the model's ordinary forward over the live part of the cache, with the mask
  [all cached | local mask of the fed tokens]; shapes follow the cache length.
- compiled (`compile=on`): the same forward in static form (`Transformer.forward(start=...)`):
  KV written in place at device-tensor offsets, attention over the static cache's first `kv_len`
  slots (the live length rounded up to KV_BUCKET) with the mask built on the device from (start,
  local mask), positions as device tensors, so one graph serves every cache length in a bucket. Compiled once per step shape with `torch.compile(fullgraph=True,
  dynamic=False)`; on CUDA with mode "reduce-overhead" (CUDA graphs). The first call of each shape
  is timed as compile time and kept out of the decode time (`DecodeStats.compile_s`); inductor's
  on-disk cache (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) keeps the compiled
  artifacts between runs, so a second run starts fast.

Prefills (variable prompt length) stay eager in both modes, as in gpt-fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import time
from typing import Callable

import torch

from .errors import UserError

CHOICES = ("auto", "on", "off")
KV_BUCKET = 128  # compiled steps of the model core attend over the cache in windows of this many slots
_ALIASES = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}


def normalize(setting: str | bool) -> str:
    """'auto' | 'on' | 'off' from a CLI/decoder-option value (true/false accepted)."""
    if isinstance(setting, bool):
        return "on" if setting else "off"
    s = _ALIASES.get(str(setting).strip().lower(), str(setting).strip().lower())
    if s not in CHOICES:
        raise UserError(f"compile must be one of auto, on, off (or true/false), got {setting!r}")
    return s


@functools.cache
def unavailable_reason(device_type: str) -> str | None:
    """Why torch.compile cannot run here (None when it can): inductor needs a C++ compiler on CPU
    and Triton on CUDA."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device_type == "cpu":
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        return None if cxx else "no C++ compiler (g++/clang++) found for inductor's CPU code"
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch without Triton support"
        return None if has_triton() else "Triton is not installed"
    return f"compiled mode is not supported on {device_type}"


def resolve(setting: str | bool, device: torch.device | str) -> bool:
    """auto = on where torch.compile works on this device (the environment variable
    TIDAR_BENCH_COMPILE=on|off, if set, decides what auto means: the test suite sets off);
    on = must work (else one clear error)."""
    s = normalize(setting)
    if s == "auto" and os.environ.get("TIDAR_BENCH_COMPILE"):
        s = normalize(os.environ["TIDAR_BENCH_COMPILE"])
    if s == "off":
        return False
    why = unavailable_reason(torch.device(device).type)
    if why is None:
        return True
    if s == "on":
        raise UserError(f"--compile on: {why}; use --compile off (or auto)")
    return False


def _configure_dynamo() -> None:
    import torch._dynamo

    # one graph per step shape and per cache size; decoders have a handful, a run with several
    # decoders and checkpoints a few dozen: raise the default recompile limit (8) well above that
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 256)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 2048)


def _shape_key(x) -> tuple:
    if isinstance(x, torch.Tensor):  # strides too: dynamo specialises on them (e.g. an expanded view)
        return ("T", tuple(x.shape), x.stride(), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_shape_key(v) for v in x)
    if hasattr(x, "max_len"):  # a KVCache: its buffers' shape is its size and batch
        return ("cache", x.max_len, x.batch)
    if isinstance(x, slice):  # not hashable before Python 3.12
        return ("slice", x.start, x.stop, x.step)
    return ("v", x)


def _clone_out(out):
    """CUDA graphs reuse their output memory on the next replay: hand the caller copies."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_out(o) for o in out)
    if hasattr(out, "logits"):  # ForwardOutput
        out.logits = out.logits.clone()
        out.hidden_states = {k: v.clone() for k, v in out.hidden_states.items()}
    return out


class Steps:
    """Runs one module's fixed-shape steps over a KVCache, eager or compiled.

    `forward(*args, mask=..., cache=..., start=..., **kw)` is the module's forward (the model core or
    a draft head): `start=None` is its eager form, a tensor its static form."""

    def __init__(self, forward: Callable, device: torch.device | str, compiled: bool, dynamic: bool | None = False):
        self.forward = forward
        self.device = torch.device(device)
        self.compiled = compiled
        self.compile_s = 0.0  # total time of first calls per shape (tracing + compilation)
        self._seen: set = set()
        self._mask_buf = torch.empty(0, dtype=torch.bool, device=self.device)
        self._cuda = self.device.type == "cuda"
        # the model core's static forward can attend over the first kv_len slots only: compiled steps
        # pass the live length rounded up to KV_BUCKET (a graph per bucket), not the whole cache, so a
        # wide step (TiDAR's k + k*k tokens) does not pay for hundreds of empty slots
        self._kv_len = "kv_len" in inspect.signature(getattr(forward, "forward", forward)).parameters
        if compiled:
            _configure_dynamo()
            mode = "reduce-overhead" if self._cuda else None
            # CPU: inductor's C++ wrapper calls the kernels without a Python wrapper per step (its
            # tensor views and size/stride asserts cost about a quarter of a small model's step)
            options = None if self._cuda else {"cpp_wrapper": True}
            # dynamic=False: one static graph per step shape (decoders have a handful); profile-latency
            # sweeps dozens of shapes and passes None (torch's automatic dynamic shapes)
            self._fn = torch.compile(forward, fullgraph=True, dynamic=dynamic, mode=mode, options=options)

    def __call__(self, *args, cache, local_mask: torch.Tensor | None = None, q: int | None = None,
                 window: int | list[int] | None = None, start: torch.Tensor | None = None,
                 starts: list[int] | None = None, **kw):
        """Feed a step whose q tokens are written at cache.length, or per row at `starts` (host ints,
        one per cache row: the rows of `tidar_bench.engine`); `start`: the same offsets as a device
        tensor the caller keeps up to date (e.g. AR's positions), to skip a host-to-device copy.

        local_mask: [q, W] (or [B, q, W], per row) bool over the key window starting at `window`
        (default: the fed tokens' own slots, W = q); every slot before the window is attended;
        None = causal (no window). q: entries the forward writes to the cache (default
        args[0].shape[1]; DFlash's drafter writes its context rows too). Returns the forward's
        output. Batch 1: cache.length is set to starts[0] and advances by q. Batch > 1: every row
        is written at its own offset through the static form (compiled or not); cache.length is
        not used (each row's length is its decoder's)."""
        if q is None:
            q = args[0].shape[1]
        if starts is not None and cache.batch > 1:
            return self._rows(args, cache, local_mask, q, window, start, starts, kw)
        if starts is not None:
            cache.length = starts[0]
            if isinstance(window, list):
                window = window[0]
            if local_mask is not None and local_mask.dim() == 3:
                local_mask = local_mask[0]
        P = cache.length
        w0 = P if window is None else window
        cache.reserve(q)
        if not self.compiled:
            mask = self._eager_mask(local_mask, P, w0, q)
            return self.forward(*args, mask=mask, cache=cache, **kw)  # advances the cache itself
        if start is None:
            start = torch.tensor(P, device=self.device)
        if window is not None:
            kw["window"] = torch.tensor(window, device=self.device)
        if self._kv_len:
            kw["kv_len"] = min(cache.max_len, -(-(P + q) // KV_BUCKET) * KV_BUCKET)
        key = _shape_key((args, local_mask, cache, tuple(sorted((k, _shape_key(v)) for k, v in kw.items()))))
        first = key not in self._seen
        if first:
            t0 = time.perf_counter()
        if self._cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._fn(*args, mask=local_mask, cache=cache, start=start, **kw)
        if self._cuda:
            out = _clone_out(out)
        if first:
            self._compiled_now(key, t0)
        cache.advance(q)
        return out

    def _rows(self, args, cache, local_mask, q: int, window, start, starts: list[int], kw):
        """Batch > 1: the static form with per-row offsets `starts` (and key windows `window`),
        attending over the first kv_len slots (the longest row's, rounded up to KV_BUCKET)."""
        if start is None:
            start = torch.tensor(starts, dtype=torch.long, device=self.device)
        if window is not None:
            kw["window"] = torch.as_tensor(window, dtype=torch.long, device=self.device)
        if self._kv_len:
            kw["kv_len"] = min(cache.max_len, -(-(max(starts) + q) // KV_BUCKET) * KV_BUCKET)
        if max(starts) + q > cache.max_len:
            raise RuntimeError(f"KV cache full: {max(starts)} cached + {q} new > max_len {cache.max_len}")
        if not self.compiled:
            return self.forward(*args, mask=local_mask, cache=cache, start=start, **kw)
        key = _shape_key((args, local_mask, cache, tuple(sorted((k, _shape_key(v)) for k, v in kw.items()))))
        first = key not in self._seen
        if first:
            t0 = time.perf_counter()
        if self._cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._fn(*args, mask=local_mask, cache=cache, start=start, **kw)
        if self._cuda:
            out = _clone_out(out)
        if first:
            self._compiled_now(key, t0)
        return out

    def _compiled_now(self, key, t0: float) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self._seen.add(key)
        self.compile_s += time.perf_counter() - t0

    def _eager_mask(self, local: torch.Tensor | None, P: int, w0: int, q: int) -> torch.Tensor | None:
        """[q, P + q]: every slot before the window, then the local mask over the window (None: the
        model's own causal mask)."""
        if local is None:
            return None
        n = P + q
        if self._mask_buf.numel() < q * n:
            self._mask_buf = torch.empty(max(q * n, 2 * self._mask_buf.numel()), dtype=torch.bool, device=self.device)
        mask = self._mask_buf[: q * n].view(q, n)
        mask[:, :w0] = True
        W = min(local.shape[-1], n - w0)  # the window may reach past the live keys
        mask[:, w0 : w0 + W] = local[..., :W]
        mask[:, w0 + W :] = False
        return mask


def steps_for(module, forward: Callable, compile: str | bool) -> Steps:
    """A Steps runner for `module` (anything with .device) with the compile setting resolved."""
    return Steps(forward, module.device, resolve(compile, module.device))
