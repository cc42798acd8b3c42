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
    "tidar_bench.baselines.dflash",
    "tidar_bench.baselines.lookup",
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

    @cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Every id a decoder stops on: `generation_config.json`'s `eos_token_id` (an int or a list,
        e.g. Llama-3 / Qwen2.5 instruct models end turns with a second id) — config.json's when there
        is no generation_config.json, as transformers does — plus the tokenizer's eos."""
        return eos_token_ids(self.model_path, self.tokenizer)


def eos_token_ids(path: str | Path, tokenizer=None) -> tuple[int, ...]:
    """See DecoderContext.stop_token_ids; order: generation config first, tokenizer last."""
    import json

    path = Path(path)
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text()).get("eos_token_id")
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read {f}: {e}")
            ids += [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
            break
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.append(tok_eos)
    return tuple(dict.fromkeys(ids))


HUB_OFFLINE_HINT = "HF_HUB_OFFLINE"


def resolve_model(model: str | Path, flag: str = "--model") -> Path:
    """A checkpoint folder, or a Hugging Face Hub id (`Qwen/Qwen2.5-1.5B-Instruct`) downloaded once
    into the Hugging Face cache (config, tokenizer and safetensors files only) and used from there.
    Offline (HF_HUB_OFFLINE=1, or no network) a hub id works only when it is already cached. Drafts
    (--draft, dflash.draft=) resolve the same way; `flag` names the option in errors."""
    path = Path(model)
    text = str(model)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    try:
        from huggingface_hub.constants import HF_HUB_OFFLINE as offline
    except ImportError:  # pragma: no cover - very old huggingface_hub
        offline = False
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        local = Path(snapshot_download(text, allow_patterns=patterns, local_files_only=bool(offline)))
    except HFValidationError:
        return path  # not a hub id: the usual "not found" error follows
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, network: one line
        if offline:
            raise UserError(f"{flag} {text}: not a local folder, and it is not in the Hugging Face cache while "
                            f"{HUB_OFFLINE_HINT}=1; unset {HUB_OFFLINE_HINT} (and HF_DATASETS_OFFLINE) to download "
                            "it once, or pass a checkpoint folder")
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{flag} {text}: not a local folder, not in the Hugging Face cache, and the Hub cannot be "
                        f"reached ({type(e).__name__}: {first}); connect once to download it, or pass a checkpoint folder")
    if not any(local.glob("*.safetensors")):
        raise UserError(f"{flag} {text} has no safetensors weights on the Hub (only .bin/.pt, which "
                        "tidar-bench does not load from the Hub)")
    return local


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


@dataclass(frozen=True)
class Setting:
    """One entry of --decoders: `tidar(block_size=4,max_blocks=3)` = decoder `tidar` with those
    options, labelled as written except that a path value shows relative to the working folder or as
    `<name>-<hash>` (`provenance.label_value`; the label keys its results, rows and plot points and
    never holds an absolute path; `options` keep the real value)."""

    label: str
    name: str
    options: tuple[tuple[str, str], ...] = ()


def parse_settings(value: str, what: str = "--decoders") -> list[Setting]:
    """`ar,ar(compile=false),tidar(block_size=4,max_blocks=3)` -> settings (commas inside
    parentheses separate options). Unknown decoders/options and repeated labels are user errors."""
    items, depth, cur = [], 0, ""
    for ch in value:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise UserError(f"{what}: unbalanced parentheses in {value!r}")
        cur += ch
    items.append(cur)
    if depth:
        raise UserError(f"{what}: unbalanced parentheses in {value!r}")
    specs = decoders()
    out: list[Setting] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        name, _, rest = raw.partition("(")
        name = name.strip()
        opts: list[tuple[str, str]] = []
        if rest:
            if not rest.endswith(")"):
                raise UserError(f"{what}: expected NAME(key=value,...) , got {raw!r}")
            for kv in filter(None, (x.strip() for x in rest[:-1].split(","))):
                if "=" not in kv:
                    raise UserError(f"{what}: option {kv!r} of {name!r} must be key=value")
                k, v = (x.strip() for x in kv.split("=", 1))
                opts.append((k, v))
        if name not in specs:
            raise UserError(f"unknown decoder {name!r}; valid: {', '.join(sorted(specs))}")
        parse_options(specs[name], dict(opts))  # validates names and values now, before anything runs
        from .provenance import label_value  # a path value shows relative to the working folder or as name-hash
        label = name + (f"({','.join(f'{k}={label_value(v)}' for k, v in opts)})" if opts else "")
        out.append(Setting(label, name, tuple(opts)))
    if not out:
        raise UserError(f"{what} is empty")
    labels = [s.label for s in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise UserError(f"{what} lists {', '.join(dup)} twice")
    return out


@dataclass(frozen=True)
class ResolvedSetting:
    """One decoder setting with its options resolved: `given` as the user gave them (the setting's
    parentheses and --decoder-arg, parsed), `options` the factory's defaults with --compile and
    `given` applied (what the decoder is built with)."""

    label: str
    name: str
    given: dict
    options: dict


def split_decoder_arg(item: str, names: list[str], what: str = "--decoder-arg") -> tuple[str | None, str, str]:
    """`DECODER.key=value` or bare `key=value` -> (DECODER or None, key, value)."""
    key, eq, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not key:
        raise UserError(f"{what} expects DECODER.key=value (or key=value with one decoder), got {item!r}")
    scope, _, key = key.rpartition(".")
    if scope and scope not in names:
        raise UserError(f"{what} {item!r} names decoder {scope!r}, which is not among the decoders given "
                        f"({', '.join(names)})")
    return scope or None, key, value


def resolve_settings(decoders_: str, decoder_args: list[str] | None = None, compile: str = "auto",
                     what: str = "--decoders") -> list[ResolvedSetting]:
    """The one resolver of decoder settings, used by `generate`, `speed`, `run` and `distill`.

    `decoders_` is a settings string (`ar,ar(compile=false),tidar(block_size=4)`); each
    `--decoder-arg` is `DECODER.key=value` (every setting of that decoder), or a bare `key=value`
    when the settings name one decoder only. Precedence, lowest first: the factory's defaults,
    `--compile` (the default of every `compile` option), `--decoder-arg`, the setting's own options.
    Every option is validated against its decoder's factory: unknown names and bad values are
    UserErrors. The first setting is the reference that the others are compared with."""
    from .compiled import normalize

    settings = parse_settings(decoders_, what)
    specs = decoders()
    names = list(dict.fromkeys(st.name for st in settings))
    scoped: dict[str, dict[str, str]] = {n: {} for n in names}
    for item in decoder_args or []:
        scope, key, value = split_decoder_arg(item, names)
        if scope is None:
            if len(names) > 1:
                raise UserError(f"--decoder-arg {item!r}: several decoders are given ({', '.join(names)}); "
                                f"write DECODER.{key}={value}")
            scope = names[0]
        if key not in specs[scope].option_types():
            parse_options(specs[scope], {key: value})  # raises: lists the decoder's options
        scoped[scope][key] = value
    compile = normalize(compile)
    out = []
    for st in settings:
        spec = specs[st.name]
        given = parse_options(spec, {**scoped[st.name], **dict(st.options)})
        params = inspect.signature(spec.factory).parameters
        defaults = {n: p.default for n, p in params.items()
                    if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
        if "compile" in spec.option_types():
            defaults["compile"] = compile
        out.append(ResolvedSetting(st.label, st.name, given, {**defaults, **given}))
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
