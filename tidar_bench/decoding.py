"""The one interface every decoder implements, plus the rules they share.

A decoder turns prompt token ids into new token ids:

    gen = decoder.generate(prompt_ids, GenerationConfig(max_new_tokens=64, stop_strings=["\\n\\n"]))
    gen.tokens, gen.text, gen.stats.nfe, gen.stats.tokens_per_nfe

Shared here so that AR, TiDAR, EAGLE and block diffusion apply them identically:
- sampling warps (temperature, top-k, top-p) -> `warp_probs`, `sample`;
- stop handling (stop token ids, stop strings, max_new_tokens) -> `StopChecker`;
- verification of a chain of drafted tokens: `verify_chain`, batched over rows, on the device (greedy
  argmax match, or rejection sampling that keeps the target distribution exactly); the one lossless
  acceptance rule (EAGLE's tree walk is its own, in baselines/eagle.py; the TiDAR authors' lossy
  `ratio_verify` is kept apart).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those warps."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class DecodeStats:
    """Per-call statistics. `accepted_lengths` holds, per target forward after the prefill, the
    number of tokens that step committed to the output (drafts accepted + the always-kept token),
    i.e. EAGLE's tau counts the same way (accepted + 1 bonus)."""

    nfe: int = 0  # target-model forward passes, prefill included
    new_tokens: int = 0
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)
    tokens_fed: list[int] = field(default_factory=list)  # tokens per forward (slots spent)
    draft_forwards: int = 0  # forwards of a separate draft model (EAGLE head), not counted in nfe
    prefill_forwards: int = 1  # target forwards before the first decode step (TiDAR's authors' rule: 2)
    compile_s: float = 0.0  # torch.compile time spent inside this call (first use of a step shape), not in wall_time_s

    @property
    def tokens_per_nfe(self) -> float:
        return self.new_tokens / self.nfe if self.nfe else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def accept_length(self) -> float:
        """TiDAR's authors' accept length: every new token over the decode forwards (prefill
        forwards excluded), as their server divides its accepted-token sum by its forward count."""
        decode = self.nfe - self.prefill_forwards
        return self.new_tokens / decode if decode > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        a = self.accepted_lengths
        return sum(a) / len(a) if a else 0.0

    def as_dict(self) -> dict:
        """Every field (lists copied) and every derived rate above."""
        return {**asdict(self), **{name: getattr(self, name) for name in self.DERIVED}}

    DERIVED = ("tokens_per_nfe", "tokens_per_s", "mean_accepted_length", "accept_length")


@dataclass
class Generation:
    tokens: list[int]
    text: str | None
    stats: DecodeStats
    finish_reason: str  # "stop_token" | "stop_string" | "length"


@runtime_checkable
class Decoder(Protocol):
    """A decoder. `lossless` is True when greedy outputs must equal AR greedy outputs. Every built-in
    decoder also has `generate_batch(prompts, config, batch_size, on_done=None)` (B sequences in
    flight; `tidar_bench/engine.py`), of which `generate` is the B = 1 case."""

    name: str
    lossless: bool

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation: ...

    def options(self) -> dict:
        """The settings that define this decoder's behaviour (recorded in run outputs)."""
        ...


# ----------------------------------------------------------------------------- sampling


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, over the last dim (float32).

    With temperature 0 this is the one-hot of the argmax, so greedy decoding is the special case
    of sampling from this distribution and verification rules need no separate greedy branch for
    correctness (decoders still take `verify_chain`'s greedy branch, an argmax match, for speed)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token if the mass before it already reaches top_p (always keeps the first)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))
    return g


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `probs` [..., V] (argmax when the row is one-hot)."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The AR rule: argmax when greedy, else a sample from the warped distribution."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(warp_probs(logits, params), generator)


# ----------------------------------------------------------------------------- verification


def verify_chain(drafts: torch.Tensor, target: torch.Tensor, draft_probs: torch.Tensor | None = None,
                 n_valid: Sequence[int] | None = None,
                 generators: torch.Generator | None | Sequence[torch.Generator | None] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """THE acceptance rule of every lossless decoder that verifies a chain of drafts (TiDAR, DFlash,
    EAGLE's chains): B rows at once, on the device, no host sync inside.

    drafts [B, k] token ids; target [B, k+1, V]: row i is the target's prediction for the position
    of drafts[:, i] (row k, or row n_valid[b] of row b, predicts the bonus position); n_valid: how
    many drafts of each row are real (the rest is padding, never accepted; default k for every row).
    Returns (n_accepted [B], next_token [B]), long tensors on the device: the caller reads them
    (with whatever else its step needs) in ONE host read per step.

    - draft_probs None: GREEDY. target: logits (or probabilities). Accepted = the longest prefix of
      drafts equal to the target argmax; next token = the target argmax at the first mismatch (or
      at the bonus position). Exactly AR greedy's tokens.
    - draft_probs [B, k, V] given: EXACT SPECULATIVE SAMPLING (Leviathan et al. 2023; Chen et al.
      2023). target: the warped target probabilities; drafts[:, i] was drawn from draft_probs[:, i]
      (a point mass for argmax drafts). Draft i is accepted iff u_i * q(d_i) < p(d_i), u_i ~ U(0,1)
      (i.e. with probability min(1, p/q)); at the first rejection the next token is drawn from the
      residual norm(max(p - q, 0)), after all n_valid from the bonus row p. The emitted tokens are
      distributed exactly as sampling the target one token at a time. generators: one per row (row
      b draws n_valid[b] uniforms, then one token, from its own generator, so a row's draws do not
      depend on the batch; a None entry marks an empty slot, which draws nothing), or a single
      generator (None: torch's default) for every row. The token is drawn as torch.multinomial
      draws one (argmax of probs / Exp(1) noise, same stream), without its host-side checks.
    """
    B, k = drafts.shape
    dev = drafts.device
    if target.shape[:2] != (B, k + 1):
        raise ValueError(f"target {tuple(target.shape)} does not match drafts {tuple(drafts.shape)}: need [B, k+1, V]")
    nv = [k] * B if n_valid is None else [int(v) for v in n_valid]
    if n_valid is not None and not all(0 <= v <= k for v in nv):
        raise ValueError(f"n_valid {nv} outside [0, k={k}]")
    if n_valid is None or all(v == k for v in nv):
        nv_t, valid = k, None
    else:
        nv_t = _to_device(nv, dev)  # [B]
        valid = torch.arange(k, device=dev) < nv_t[:, None]
    greedy = draft_probs is None
    if not greedy:
        per_row = isinstance(generators, (list, tuple))
        gens = list(generators) if per_row else [generators] * B
        u = torch.ones(B, k, device=dev)
        noise = torch.ones_like(target[:, 0], dtype=torch.float32)
        for b in range(B):
            if per_row and gens[b] is None:
                continue  # an empty slot: nothing drawn
            u[b, : nv[b]] = torch.rand(nv[b], generator=gens[b], device=dev)
            noise[b].exponential_(1, generator=gens[b])
    if greedy:
        tgt = target.argmax(-1)  # [B, k+1]
        ok = tgt[:, :k] == drafts
    else:
        p = target[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
        q = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        ok = u * q < p  # == u < p/q for q > 0; a draft with q == 0 is never produced
    if valid is not None:
        ok = ok & valid
    n = accepted_prefix(ok)  # [B]
    if greedy:
        return n, tgt.gather(1, n[:, None]).squeeze(1)
    V = target.shape[-1]
    p_n = target.gather(1, n.view(B, 1, 1).expand(B, 1, V)).squeeze(1).float()  # [B, V]
    dist = p_n  # all n_valid accepted: the bonus row
    if k:  # a rejection at n < n_valid: the residual norm(max(p - q, 0)) there
        q_n = draft_probs.gather(1, n.clamp(max=k - 1).view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        residual = (p_n - q_n).clamp_min(0)
        total = residual.sum(-1, keepdim=True)
        # p == q exactly leaves no residual mass; then rejection had probability 0 anyway
        dist = torch.where((n < nv_t)[:, None] & (total > 0), residual / total, p_n)
    return n, (dist / noise).argmax(-1)


def stack_rows(rows: Sequence[torch.Tensor | None], n: int) -> torch.Tensor:
    """Per-row tensors [n_b <= n, ...] (None: an empty slot) as one [B, n, ...] tensor, zero
    padded: e.g. each row's draft distributions for `verify_chain`. No copy at all for one full
    row, one stack when every row is full."""
    like = next(r for r in rows if r is not None)
    if all(r is not None and r.shape[0] == n for r in rows):
        return rows[0][None] if len(rows) == 1 else torch.stack(list(rows))
    out = like.new_zeros(len(rows), n, *like.shape[1:])
    for b, r in enumerate(rows):
        if r is not None:
            out[b, : r.shape[0]] = r
    return out


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a long tensor on `device` without a host sync: on CUDA through pinned memory,
    non-blocking (a plain torch.tensor(..., device=cuda) waits for the stream, i.e. for the forward
    the verification follows)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """How many leading entries of each row of `ok` [..., k] (bool: draft i passes its test) are
    True: the drafts a chain accepts, stopping at the first rejection. [...] long."""
    return ok.int().cumprod(-1).sum(-1)


def ratio_verify(drafts: torch.Tensor, draft_q: torch.Tensor, target_probs: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """The ratio test of TiDAR's release worker (LOSSY): draft i is accepted iff p(d_i)/q(d_i) >= u_i,
    u_i ~ U(0,1), stopping at the first rejection; nothing is resampled (no residual), so unlike
    `verify_chain` the output does not follow the target distribution. drafts [m];
    draft_q [m] the probability each draft had under its draft row; target_probs [>=m, V].
    Returns the number accepted."""
    m = drafts.shape[0]
    if m == 0:
        return 0
    p = target_probs[torch.arange(m, device=drafts.device), drafts]
    u = torch.rand(m, generator=generator, device=drafts.device)
    return int(accepted_prefix(u * draft_q <= p))


def repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty as transformers' RepetitionPenaltyLogitsProcessor applies it: the
    logit of every token in `context` is divided by `penalty` if positive, multiplied if negative.
    logits [V] (a new tensor is returned), context: token ids [n]."""
    score = logits.gather(-1, context)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, context, score)


# ----------------------------------------------------------------------------- stopping


class StopChecker:
    """Applies max_new_tokens, stop token ids and stop strings to a growing token list.

    The rule (identical for every decoder, so equal token streams give equal outputs):
    - output tokens stop before the first stop token id (which is not emitted);
    - for stop strings, the output keeps the shortest token prefix whose decoded text contains a
      stop string, and `text` is cut right before the stop string;
    - at most max_new_tokens tokens are kept.
    Decoders that accept several tokens per step call `extend` with the whole chunk."""

    def __init__(self, config: GenerationConfig, tokenizer=None):
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.config = config
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._stop_ids = set(config.stop_token_ids)
        self._max_stop = max((len(s) for s in config.stop_strings), default=0)
        # incremental detokenisation (the prefix/read offsets of streaming detokenisers): each new
        # token decodes a short window, never the whole output again
        self._text = ""
        self._prefix_off = 0
        self._read_off = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def extend(self, new_tokens: Sequence[int]) -> bool:
        """Append tokens; returns True when generation must stop."""
        if self.done:
            return True
        for t in new_tokens:
            if t in self._stop_ids:
                self.finish_reason = "stop_token"
                return True
            self.tokens.append(int(t))
            if self.config.stop_strings and self._hit_stop_string():
                self.finish_reason = "stop_string"
                return True
            if len(self.tokens) >= self.config.max_new_tokens:
                self.finish_reason = "length"
                return True
        return False

    def _hit_stop_string(self) -> bool:
        """Decode only tokens[prefix_off:] (a few tokens): the text they add beyond
        tokens[prefix_off:read_off] is new; an incomplete UTF-8 sequence (trailing U+FFFD) waits
        for the next token. The stop strings are searched in the new text plus the max_stop - 1
        characters before it, so every occurrence is found at the token that completes it."""
        dec = self.tokenizer.decode
        prefix = dec(self.tokens[self._prefix_off : self._read_off]) if self._read_off > self._prefix_off else ""
        full = dec(self.tokens[self._prefix_off :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        new = full[len(prefix) :]
        tail = self._text[max(0, len(self._text) - self._max_stop + 1) :]
        self._text += new
        self._prefix_off, self._read_off = self._read_off, len(self.tokens)
        window = tail + new
        return any(s in window for s in self.config.stop_strings)

    def text(self) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(self.tokens)
        if self.finish_reason == "stop_string":
            cut = min((i for i in (text.find(s) for s in self.config.stop_strings) if i >= 0), default=len(text))
            text = text[:cut]
        return text

    def result(self, stats: DecodeStats) -> Generation:
        stats.new_tokens = len(self.tokens)
        return Generation(self.tokens, self.text(), stats, self.finish_reason or "length")


class Timer:
    """Wall-clock timer that synchronises CUDA before reading the clock."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
