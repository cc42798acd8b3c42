"""The options of the `tidar` decoder (`TidarOptions`): each with its default, the authors' rule
presets resolved (`rule=...`; options given explicitly win), every value checked once, and what
`options()` reports. Both TiDAR decoders (`tidar.TidarDecoder`, `tidar_diffusion.TidarDiffusionDecoder`)
are built from one; the registered factory (`tidar.build`) passes its keyword options straight in.
"""

from __future__ import annotations

from dataclasses import InitVar, asdict, dataclass

from .errors import UserError
from .tidar_authors import CHOICES, RULES

MODES = ("tidar", "diffusion")
RULE_OPTIONS = tuple(RULES["exact"])  # first_token, prefill, ar_ratio, accept, draft_penalty, t0_as_t1
_ALWAYS = ("mask_token_id", "block_size", "mode", "steps", "compile")  # reported apart, or not at all


@dataclass(kw_only=True)
class TidarOptions:
    """`tidar`'s options (docs/tidar.md, docs/decoders.md). After construction every rule option
    holds its resolved value (the rule's, unless given) and `steps` its block count (default k)."""

    mask_token_id: int
    block_size: int = 8  # k
    beta: float = 1.0  # verification target beta*p_AR + (1-beta)*q_diffusion (< 1: lossy)
    max_blocks: int | None = None  # pre-draft blocks per step (None: one per outcome)
    mode: str = "tidar"  # or "diffusion": pure block diffusion of the same checkpoint (lossy)
    steps: int | None = None  # mode=diffusion: denoising forwards per block (None: k)
    compile: str = "off"
    rule: str = "exact"  # the authors' presets (`tidar_authors.RULES`); the six below override it
    first_token: str | None = None
    prefill: str | None = None
    ar_ratio: float | None = None
    accept: str | None = None
    draft_penalty: float | None = None
    t0_as_t1: bool | None = None
    seed: int = 0  # our generator's seed for the ratio test when the request has none
    vocab_size: InitVar[int | None] = None  # the model's, to check mask_token_id against

    def __post_init__(self, vocab_size: int | None) -> None:
        k = self.block_size
        if vocab_size is not None and not 0 <= self.mask_token_id < vocab_size:
            raise UserError(f"mask_token_id {self.mask_token_id} outside the vocabulary [0, {vocab_size})")
        if k < 1:
            raise UserError(f"block_size must be >= 1, got {k}")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"beta must be in [0, 1], got {self.beta}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise UserError(f"max_blocks must be >= 1 (or None for one block per outcome), got {self.max_blocks}")
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.steps is not None and not 1 <= self.steps <= k:
            raise UserError(f"steps must be in [1, block_size={k}], got {self.steps}")
        if self.rule not in RULES:
            raise UserError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name in RULE_OPTIONS:
            if getattr(self, name) is None:
                setattr(self, name, RULES[self.rule][name])
        for name, ok in CHOICES.items():
            if getattr(self, name) not in ok:
                raise UserError(f"{name} must be one of {', '.join(ok)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.ar_ratio <= 1.0:
            raise UserError(f"ar_ratio must be in [0, 1], got {self.ar_ratio}")
        if self.draft_penalty <= 0:
            raise UserError(f"draft_penalty must be > 0, got {self.draft_penalty}")
        if self.offset0 and self.max_blocks is not None:
            raise UserError("first_token=diffusion and ar_ratio < 1 read every outcome's block (the authors' "
                            "layout): drop max_blocks")
        if self.ar_ratio < 1.0 and self.beta < 1.0:
            raise UserError("ar_ratio (logit-space mix with the current block) and beta (probability-space mix with "
                            "the drafting row) are two different mixes: set one")
        if self.mode == "diffusion" and self.rules != RULES["exact"]:
            raise UserError("the authors' rule options apply to mode=tidar only")
        if self.steps is None:
            self.steps = k

    @property
    def rules(self) -> dict:
        """The six rule options' (resolved) values."""
        return {name: getattr(self, name) for name in RULE_OPTIONS}

    @property
    def plain(self) -> bool:
        """Every rule option at its exact value (prefill=two changes the timing only)."""
        return self.rules == RULES["exact"] | {"prefill": self.prefill}

    @property
    def offset0(self) -> int:
        """1 when the block offset-0 rows are read: the first token or the verification target comes
        from the blocks (the authors' layout)."""
        return int(self.first_token == "diffusion" or self.ar_ratio < 1.0)

    @property
    def lossless(self) -> bool:
        return self.mode == "tidar" and self.beta == 1.0 and self.plain

    @property
    def n_blocks(self) -> int:
        """Pre-draft blocks of the padded (compiled, B > 1) step."""
        return min(self.block_size, self.max_blocks or self.block_size)

    def report(self) -> dict:
        """This mode's entries of `options()` (after mode, block_size, mask_token_id, lossless and
        the decoder's own): the fields (`asdict`) that apply, and the derived drafts_per_step."""
        if self.mode == "diffusion":
            return {"steps": self.steps}
        d = {k: v for k, v in asdict(self).items() if k not in _ALWAYS}
        return {"beta": d.pop("beta"), "max_blocks": d.pop("max_blocks"), "drafts_per_step": self.block_size - 1, **d}
