"""Decoders by name. A decoder module registers a factory with `@register_decoder`; the harness
and CLI list and build decoders through `build_decoder` without knowing any of them.

Adding a decoder = one file with a registered factory + its module path in `DECODER_MODULES`."""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from .decoding import Decoder
from .errors import UserError

DECODER_MODULES = (
    "tidar_bench.baselines.ar",
    "tidar_bench.baselines.hf",
    "tidar_bench.tidar",
    "tidar_bench.baselines.block_diffusion",
    "tidar_bench.baselines.eagle",
)


@dataclass
class DecoderContext:
    """What a factory may use: the target checkpoint (loaded once, shared by decoders), its
    tokenizer, an optional draft checkpoint, device and dtype."""

    model_path: Path
    device: str = "auto"
    dtype: str = "auto"
    draft_path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def model(self):
        from .model import load_model

        return load_model(self.model_path, self.dtype, self.device)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.model_path)


def load_tokenizer(path: str | Path):
    """The checkpoint's HF tokenizer, or None when the directory has no tokenizer files."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - report any tokenizer load failure as one line
        raise UserError(f"cannot load the tokenizer in {path}: {e}")


@dataclass
class DecoderSpec:
    name: str
    factory: Callable[..., Decoder]
    help: str
    needs_draft: bool = False

    def option_types(self) -> dict[str, Any]:
        sig = inspect.signature(self.factory)
        hints = typing.get_type_hints(self.factory)
        return {n: hints.get(n, str) for n, p in sig.parameters.items() if n != "ctx" and p.kind == p.KEYWORD_ONLY}


_REGISTRY: dict[str, DecoderSpec] = {}


def register_decoder(name: str, help: str, needs_draft: bool = False):
    """Decorator for `factory(ctx: DecoderContext, *, option: type = default, ...) -> Decoder`."""

    def deco(fn):
        _REGISTRY[name] = DecoderSpec(name, fn, help, needs_draft)
        return fn

    return deco


def decoders() -> dict[str, DecoderSpec]:
    for m in DECODER_MODULES:
        importlib.import_module(m)
    return dict(_REGISTRY)


def _convert(value: str, typ) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        typ = args[0]
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return typ(value)


def parse_options(spec: DecoderSpec, raw: dict[str, str]) -> dict[str, Any]:
    types = spec.option_types()
    out = {}
    for k, v in raw.items():
        if k not in types:
            valid = ", ".join(sorted(types)) or "none"
            raise UserError(f"decoder {spec.name!r} has no option {k!r}; its options: {valid}")
        try:
            out[k] = _convert(v, types[k]) if isinstance(v, str) else v
        except ValueError:
            raise UserError(f"option {k}={v!r} of decoder {spec.name!r} is not a valid {getattr(types[k], '__name__', types[k])}")
    return out


def build_decoder(name: str, ctx: DecoderContext, options: dict[str, Any] | None = None) -> Decoder:
    specs = decoders()
    if name not in specs:
        raise UserError(f"unknown decoder {name!r}; valid: {', '.join(sorted(specs))}")
    spec = specs[name]
    if spec.needs_draft and ctx.draft_path is None:
        raise UserError(f"decoder {name!r} needs a draft model: pass --draft DIR")
    opts = parse_options(spec, options or {})
    try:
        return spec.factory(ctx, **opts)
    except ValueError as e:
        raise UserError(f"decoder {name!r}: {e}")
