"""Side configs stored beside a checkpoint's config.json.

A TiDAR checkpoint = an HF-layout checkpoint of a supported family + `tidar_config.json`:
    {"mask_token_id": int, "block_size": int, "alpha": float}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

TIDAR_CONFIG = "tidar_config.json"


@dataclass
class TidarConfig:
    mask_token_id: int
    block_size: int = 8
    alpha: float = 1.0

    def save(self, path: str | Path) -> None:
        p = Path(path) / TIDAR_CONFIG
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> "TidarConfig":
        p = Path(path) / TIDAR_CONFIG
        if not p.is_file():
            raise UserError(f"{path} is not a TiDAR checkpoint: no {TIDAR_CONFIG} (train one with `tidar-bench train tidar`)")
        try:
            return cls(**json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"invalid {p}: {e}")

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / TIDAR_CONFIG).is_file()
