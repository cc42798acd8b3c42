"""Side configs stored beside a checkpoint's config.json.

A TiDAR checkpoint = an HF-layout checkpoint of a supported family + `tidar_config.json`:
    {"mask_token_id": int, "block_size": int, "alpha": float}
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
    HOW: ClassVar[str] = "train one with `tidar-bench train tidar`"
