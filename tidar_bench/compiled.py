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
import logging
import inspect
import os
import shutil
import sys
import time
from typing import Callable

import torch

from .errors import UserError

CHOICES = ("auto", "on", "off")
KV_BUCKET = 128  # compiled steps of the model core attend over the cache in windows of at least this many slots
# CPU size rule (docs/speed.md, "Compiled decoding"; measured by scripts/compile_cost.py): compiled steps of
# a big model are memory-bound, so compiling buys little per step and costs minutes per graph
AUTO_EAGER_PARAMS = 500_000_000  # above: compile=auto is eager on CPU
# inductor's C++ wrapper is built at -O0: it is straight-line calls into the (-O3) kernels, and at
# inductor's default -O1 its build was most of a deep graph's compile time
CPP_WRAPPER_OPT_LEVEL = "O0"
KV_PAD_FRACTION = 0.05  # widen the attention window while its padding reads at most this much of the weights
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


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cpu_rule(params: int) -> str:
    """How `compile=auto` compiles a model of `params` parameters on CPU: "eager" above
    AUTO_EAGER_PARAMS, else "cpp-wrapper" (TIDAR_BENCH_CPP_WRAPPER=off: inductor's Python wrapper)."""
    return "eager" if params > AUTO_EAGER_PARAMS else "cpp-wrapper"


def cpu_inductor_options(params: int) -> dict:
    """torch.compile options of compiled steps on CPU for a model of `params` parameters. Inductor's
    C++ wrapper calls the kernels without a Python wrapper per step (its tensor views and per-kernel
    calls cost about a quarter of a small model's step and several percent of SmolLM2-135M's), built
    at CPP_WRAPPER_OPT_LEVEL; a model that `auto` leaves eager (cpu_rule), compiled because asked
    (`on`), gets the Python wrapper, the faster build. TIDAR_BENCH_CPP_WRAPPER=on|off|auto overrides. The
    Python wrapper runs without its size/stride asserts on every input (a few hundred parameters and
    cache buffers per call): dynamo's guards check the same before the graph runs."""
    import torch._inductor.config as inductor_config

    env = os.environ.get("TIDAR_BENCH_CPP_WRAPPER", "auto")
    try:
        env = normalize(env)
    except UserError:
        raise UserError(f"TIDAR_BENCH_CPP_WRAPPER must be on, off or auto, got {env!r}") from None
    cpp = env == "on" or (env == "auto" and cpu_rule(params) == "cpp-wrapper")
    options = {"cpp_wrapper": cpp, "size_asserts": False, "scalar_asserts": False}
    if cpp and hasattr(inductor_config.aot_inductor, "compile_wrapper_opt_level"):  # torch >= 2.6
        options["aot_inductor.compile_wrapper_opt_level"] = CPP_WRAPPER_OPT_LEVEL
    return options


log = logging.getLogger(__name__)


@functools.cache
def note(line: str) -> None:
    """Log a line about compilation once per process (INFO on `tidar_bench.compiled`: the CLI prints it
    on stderr; TIDAR_BENCH_COMPILE_LOG=off or that logger's level silences it)."""
    log.info(line)


def resolve(setting: str | bool, device: torch.device | str, params: int | None = None) -> bool:
    """auto = on where torch.compile works on this device (the environment variable
    TIDAR_BENCH_COMPILE=on|off, if set, decides what auto means: the test suite sets off), except
    eager on CPU for models above AUTO_EAGER_PARAMS parameters (`params`, when given; a note says
    so); on = must work (else one clear error)."""
    s = normalize(setting)
    if s == "auto" and os.environ.get("TIDAR_BENCH_COMPILE"):
        s = normalize(os.environ["TIDAR_BENCH_COMPILE"])
    if s == "off":
        return False
    device = torch.device(device)
    why = unavailable_reason(device.type)
    if why is None:
        if s == "auto" and device.type == "cpu" and params is not None and cpu_rule(params) == "eager":
            note(f"compile auto: eager on CPU, the model has {params / 1e9:.2f}B parameters (> "
                 f"{AUTO_EAGER_PARAMS / 1e9:g}B: compiling its steps takes minutes for a few percent per step); "
                 "--compile on compiles anyway")
            return False
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

    def __init__(self, forward: Callable, device: torch.device | str, compiled: bool, dynamic: bool | None = False,
                 params: int | None = None, name: str | None = None):
        self.forward = forward
        self.device = torch.device(device)
        self.compiled = compiled
        # the compile line's "what" and the CPU size rules' model size (default: forward's own)
        self.name = name or getattr(forward, "__name__", type(forward).__name__)
        self.params = n_params(forward) if params is None and isinstance(forward, torch.nn.Module) else (params or 0)
        self._buckets: dict[int, int] = {}  # batch rows -> attention window (kv_bucket)
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
            options = None if self._cuda else cpu_inductor_options(self.params)
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
            kw["kv_len"] = self._window(cache, P + q)
        out = self._compiled(args, local_mask, cache, start, kw)
        cache.advance(q)
        return out

    def _rows(self, args, cache, local_mask, q: int, window, start, starts: list[int], kw):
        """Batch > 1: the static form with per-row offsets `starts` (and key windows `window`),
        attending over the first kv_len slots (the longest row's, rounded up to the window, `_window`)."""
        if start is None:
            start = torch.tensor(starts, dtype=torch.long, device=self.device)
        if window is not None:
            kw["window"] = torch.as_tensor(window, dtype=torch.long, device=self.device)
        if self._kv_len:
            kw["kv_len"] = self._window(cache, max(starts) + q)
        if max(starts) + q > cache.max_len:
            raise RuntimeError(f"KV cache full: {max(starts)} cached + {q} new > max_len {cache.max_len}")
        if not self.compiled:
            return self.forward(*args, mask=local_mask, cache=cache, start=start, **kw)
        return self._compiled(args, local_mask, cache, start, kw)

    def _compiled(self, args, local_mask, cache, start, kw):
        """One call of the compiled step; the first call of a shape compiles it (timed, one line)."""
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
            self._compiled_now(key, t0, args, kw)
        return out

    def _window(self, cache, n: int) -> int:
        """kv_len of a static step over the first n slots: n rounded up to this model's attention
        window (`kv_bucket`, per batch size), at most the cache."""
        b = self._buckets.get(cache.batch) or self._buckets.setdefault(
            cache.batch, kv_bucket(self.params * cache.k[0].element_size(), cache))
        return min(cache.max_len, -(-n // b) * b)

    def _compiled_now(self, key, t0: float, args, kw) -> None:
        """The first call of a step shape compiled it: count the seconds and say so in one line."""
        if self._cuda:
            torch.cuda.synchronize()
        self._seen.add(key)
        dt = time.perf_counter() - t0
        self.compile_s += dt
        shape = "x".join(map(str, args[0].shape[:2])) + (f", kv {kw['kv_len']}" if "kv_len" in kw else "")
        note(f"compiled {self.name} [{shape}] in {dt:.1f} s")

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


def kv_bucket(weight_bytes: int, cache) -> int:
    """Slots per attention window of compiled steps: KV_BUCKET, doubled while a window's worth of
    padding (KV bytes of that many slots, all layers, all rows) reads at most KV_PAD_FRACTION of the
    weights. Each window is a graph (a compilation); a big model's weights dwarf its KV, so at batch 1
    it gets wide windows (SmolLM2-135M: 512 slots), a tiny one 128."""
    slot = sum(t[:, :, 0].numel() * t.element_size() for t in (*cache.k, *cache.v))  # one slot, every layer and row
    b = KV_BUCKET
    while 2 * b * slot <= KV_PAD_FRACTION * weight_bytes:
        b *= 2
    return b


def steps_for(module, forward: Callable, compile: str | bool, name: str | None = None) -> Steps:
    """A Steps runner for `module` (the model: anything with .device and parameters) with the
    compile setting resolved for its size. name (for the compile line): default the calling
    decoder's `name` and the forward's, e.g. "ar step", "ar greedy step", "eagle EagleHead step"."""
    if name is None:
        owner = sys._getframe(1).f_locals.get("self")
        part = "" if forward is module else getattr(forward, "__name__", type(forward).__name__).strip("_")
        name = f"{getattr(owner, 'name', None) or type(module).__name__} {part.removesuffix('_forward')} step".replace("  ", " ")
    params = n_params(module)
    return Steps(forward, module.device, resolve(compile, module.device, params), params=params, name=name)
