"""Side configs stored beside a checkpoint's config.json.

A TiDAR checkpoint = an HF-layout checkpoint of a supported family + `tidar_config.json`:
    {"mask_token_id": int, "block_size": int, "alpha": float}
or a checkpoint released by TiDAR's authors (Hugging Face org TiDAR-LM): plain Qwen3/Qwen2 weights
whose config.json names `TiDARForCausalLM` / `TiDARSmallForCausalLM` and holds no TiDAR key; its
two values are constants of the authors' server code, provided here as the preset `tidar-lm`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

TIDAR_CONFIG = "tidar_config.json"


class SideConfig:
    """A small JSON dataclass stored as FILE beside config.json; subclasses set FILE and KIND."""

    FILE = ""
    KIND = ""
    HOW = ""

    def save(self, path: str | Path) -> None:
        p = Path(path) / self.FILE
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path):
        p = Path(path) / cls.FILE
        if not p.is_file():
            raise UserError(f"{path} is not a {cls.KIND} checkpoint: no {cls.FILE} ({cls.HOW})")
        try:
            return cls(**json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"invalid {p}: {e}")

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / cls.FILE).is_file()


@dataclass
class TidarConfig(SideConfig):
    mask_token_id: int
    block_size: int = 8
    alpha: float = 1.0

    FILE: ClassVar[str] = TIDAR_CONFIG
    KIND: ClassVar[str] = "TiDAR"
    HOW: ClassVar[str] = "train one with `tidar-bench train tidar`, or pick a preset: preset=tidar-lm"

    @classmethod
    def resolve(cls, path: str | Path, preset: str | None = None) -> tuple["TidarConfig", str]:
        """(values, where they came from): an explicit preset, else tidar_config.json, else the
        preset recognised from config.json's `architectures`; a UserError when none applies."""
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"unknown TiDAR preset {preset!r}; presets: {', '.join(PRESETS)}")
            return cls(**PRESETS[preset]), f"preset {preset} (chosen explicitly)"
        if cls.exists(path):
            return cls.load(path), f"{Path(path) / cls.FILE}"
        arch = _architectures(path)
        for name, archs in PRESET_ARCHITECTURES.items():
            if any(a in archs for a in arch):
                return cls(**PRESETS[name]), f"preset {name} (recognised from architectures {', '.join(arch)})"
        return cls.load(path), ""  # raises the "not a TiDAR checkpoint" error


# The TiDAR authors' constants (docs/checkpoints.md, "Released TiDAR checkpoints"): the mask token is
# hard-coded in every version of their worker (`mask_token_id = 151662`, `<|fim_pad|>` in the Qwen2.5/3
# vocabulary), the block size is the server argument `--speculative-tidar-b` (default and every config: 16).
PRESETS = {"tidar-lm": {"mask_token_id": 151662, "block_size": 16}}
PRESET_ARCHITECTURES = {"tidar-lm": ("TiDARForCausalLM", "TiDARSmallForCausalLM")}


def _architectures(path: str | Path) -> list[str]:
    p = Path(path) / "config.json"
    try:
        return list(json.loads(p.read_text()).get("architectures") or []) if p.is_file() else []
    except (OSError, json.JSONDecodeError):
        return []


# ----------------------------------------------------------------------------- is a preset's convention ours?

CHECK_TEXTS = ("The capital of France is", "def fibonacci(n):\n    ", "Question: Tom has 3 apples and buys 5 more. "
               "How many apples does he have?\nAnswer:", "In 1905, Albert Einstein published")


def convention_check(model, mask_id: int, k: int, prompts: list[list[int]]) -> dict:
    """Do the checkpoint's mask tokens predict their own position (our convention and, by their
    inference code, the authors') or the next one? Per prompt: the prefill block's offset-0 argmax
    (position L) against the AR argmax for position L (prompt's last row) and for L+1 (after feeding
    that AR token). Two forwards per prompt, no cache."""
    import torch

    from .masks import tidar_first_step, tidar_step

    same = nxt = 0
    dev = model.device
    with torch.inference_mode():
        for p in prompts:
            lay = tidar_first_step(len(p), k, dev)
            ids = torch.tensor([p + [mask_id] * k], device=dev)
            logits = model(ids, lay.positions(dev), tidar_step(lay, dev)).logits[0]
            a_l, d0 = int(logits[len(p) - 1].argmax()), int(logits[len(p)].argmax())
            a_next = int(model(torch.tensor([p + [a_l]], device=dev)).logits[0, -1].argmax())
            same += d0 == a_l
            nxt += d0 == a_next
    n = len(prompts)
    verdict = "looks shifted by one position" if nxt > same else "unshifted"
    return {"prompts": n, "offset0_agrees_with_ar_same_position": same / n,
            "offset0_agrees_with_ar_next_position": nxt / n, "verdict": verdict}


def _check_prompts(tokenizer, vocab: int, mask_id: int) -> list[list[int]]:
    import torch

    if tokenizer is not None:
        return [tokenizer.encode(t, add_special_tokens=False) for t in CHECK_TEXTS]
    g = torch.Generator().manual_seed(0)
    return [[int(x) % mask_id for x in torch.randint(0, vocab, (12,), generator=g)] for _ in CHECK_TEXTS]


def check_preset(model, tokenizer, cfg: TidarConfig, source: str, model_path) -> dict | None:
    """`convention_check` of a preset checkpoint (someone else's: is its diffusion convention ours?),
    with a warning on stderr when it looks shifted; None for our own checkpoints (tidar_config.json)."""
    if not source.startswith("preset"):
        return None
    check = convention_check(model, cfg.mask_token_id, cfg.block_size,
                             _check_prompts(tokenizer, model.config.vocab_size, cfg.mask_token_id))
    if check["verdict"] != "unshifted":
        log.warning(f"warning: {model_path}: the prefill block's offset-0 argmax agrees with the AR argmax one position "
              f"later ({check['offset0_agrees_with_ar_next_position']:.0%}) more than at its own position "
              f"({check['offset0_agrees_with_ar_same_position']:.0%}): the checkpoint looks shifted by one")
    return check
