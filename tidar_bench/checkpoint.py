"""Side configs stored beside a checkpoint's config.json.

A TiDAR checkpoint = an HF-layout checkpoint of a supported family + `tidar_config.json`:
    {"mask_token_id": int, "block_size": int, "alpha": float}
or a checkpoint released by TiDAR's authors (Hugging Face org TiDAR-LM): plain Qwen3/Qwen2 weights
whose config.json names `TiDARForCausalLM` / `TiDARSmallForCausalLM` and holds no TiDAR key; its
two values are constants of the authors' server code, provided here as the preset `tidar-lm`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

from .errors import UserError

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


# The TiDAR authors' constants (../shared/reference/tidar-official.md section 2): the mask token is
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
