"""Reference decoder: transformers' own `generate` on the same checkpoint.

Shows our model core and AR loop against the library on identical prompts: greedy tokens must
match `ar`, and tokens/s tells how much the library's generic path costs. `compile=true` is the
best a transformers user gets: a `StaticCache` (sized like ours, reused between calls) and
transformers' own automatic `torch.compile` of the decode step (`CompileConfig`: CUDA graphs on GPU,
forced on CPU too); `hf(compile=false)` is the plain eager library path.

Batch B > 1 (`generate_batch`) is how a transformers user batches: prompts in chunks of B, LEFT-padded
with an attention mask (generate derives each row's position ids from the mask), one `generate` call per
chunk, a B-row StaticCache when compiled (a short last chunk is filled with inert copies, so the graph and
the cache keep one shape). No refill: a finished row idles until its chunk ends. Batch 1 is the B = 1 case.
Sampling at B > 1: the rows of a chunk share one generator (torch's, seeded with `seed` at each chunk's
start), so each row samples from the exact distribution but its draws depend on its chunk-mates."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tidar_bench.decoding import DecodeStats, GenerationConfig, Generation, StopChecker, Timer
from tidar_bench.errors import UserError
from tidar_bench.model import resolve_device, resolve_dtype
from tidar_bench.registry import DecoderContext, register_decoder


class _Stop:
    """transformers StoppingCriteria that feeds each row's new token to that row's StopChecker, so stop
    strings, stop ids and max_new_tokens are applied by exactly the same rule as every other decoder.
    Returns the finished rows ([B] bool): generate stops extending them and ends when all are done.
    `on_finish(row, n)` is called as a row stops, n = its new tokens so far (times[:n] are theirs)."""

    def __init__(self, checkers: list[StopChecker | None], timer: Timer, on_finish: Callable[[int, int], None],
                 device: torch.device):
        self.checkers, self.timer, self.on_finish = checkers, timer, on_finish
        self.done = [c is None for c in checkers]  # None: a padding row, done from the start
        self.flags = torch.tensor(self.done, device=device)
        self.times: list[float] = []  # when each step's new tokens arrived

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.times.append(self.timer.now())
        new = input_ids[:, -1].tolist()  # one host sync per step for the whole batch
        for b, c in enumerate(self.checkers):
            if not self.done[b] and c.extend([new[b]]):
                self.done[b] = True
                self.flags[b] = True
                self.on_finish(b, len(self.times))
        return self.flags


class HFDecoder:
    name = "hf"
    lossless = True

    def __init__(self, model_path, device: str = "auto", dtype: str = "auto", tokenizer=None, compile: str = "auto"):
        from transformers import AutoModelForCausalLM

        from tidar_bench.compiled import resolve

        dev = resolve_device(device)
        self.compiled = resolve(compile, dev)
        self._static: dict[int, tuple] = {}  # rows -> (StaticCache, its size)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        # stopping is ours alone (StopChecker via _Stop): the checkpoint's default eos must not cut in
        self.model.generation_config.eos_token_id = None
        self.tokenizer = tokenizer
        self.device = dev

    def options(self) -> dict:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "compile": self.compiled}

    def _compile_kwargs(self, rows: int, needed: int) -> tuple[dict, bool]:
        """generate() kwargs for compiled mode: our own StaticCache of `rows` rows (one per batch size,
        power-of-two size like the model core's, reused, so a new prompt length is not a new graph) +
        CompileConfig. Returns (kwargs, whether this call compiles a new cache shape)."""
        from transformers import CompileConfig, StaticCache

        cache, size = self._static.get(rows, (None, 0))
        new = size < needed
        if new:
            size = max(256, 1 << (needed - 1).bit_length())
            cache = StaticCache(config=self.model.config, max_cache_len=size)
            self._static[rows] = cache, size
        else:
            cache.reset()
        cc = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if self.device.type == "cuda" else "default")
        cc._compile_all_devices = True  # transformers compiles on GPUs only unless told
        return {"cache": cache, "compile_config": cc}, new

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
        return self.generate_batch([prompt_ids], config, 1)[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, batch_size: int,
                       on_done: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        """Decode every prompt, `batch_size` per generate call; results in prompt order, `on_done(i,
        generation)` called as each finishes. Per row: nfe = forwards until its last token (prefill
        included), tokens_fed = its own unpadded prompt then 1 per step, wall_time_s = chunk start to its
        last token, compile_s = the first compiled step's excess over a typical step (not in wall_time_s)."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if any(len(p) == 0 for p in prompts):
            raise UserError("batched decoding needs non-empty prompts")
        results: list[Generation | None] = [None] * len(prompts)
        longest = max((len(p) for p in prompts), default=0)
        for c in range(0, len(prompts), batch_size):
            self._chunk(prompts, range(c, min(c + batch_size, len(prompts))), batch_size, longest, config,
                        results, on_done)
        return results

    @torch.inference_mode()
    def _chunk(self, prompts, idx: range, batch_size: int, longest: int, config: GenerationConfig,
               results: list, on_done) -> None:
        """One generate call over prompts[idx], left-padded; compiled: padded to batch_size rows."""
        from transformers import GenerationConfig as HFGenConfig, StoppingCriteriaList

        sp = config.sampling
        timer = Timer(self.device)
        t0 = timer.now()
        rows = [list(prompts[i]) for i in idx]
        checkers: list[StopChecker | None] = [StopChecker(config, self.tokenizer) for _ in rows]
        if self.compiled:  # inert filler rows (a copy of the first prompt, done from the start): one graph shape
            pad = batch_size - len(rows)
            rows, checkers = rows + [rows[0]] * pad, checkers + [None] * pad
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        gc = HFGenConfig(max_new_tokens=config.max_new_tokens, do_sample=not sp.greedy,
                         temperature=sp.temperature if not sp.greedy else None,
                         top_k=sp.top_k if not sp.greedy else None,
                         top_p=sp.top_p if not sp.greedy else None,
                         eos_token_id=None, pad_token_id=0)
        if not sp.greedy and sp.seed is not None:
            torch.manual_seed(sp.seed)
        compiles = False
        extra = {}
        if self.compiled:
            extra, compiles = self._compile_kwargs(len(rows), longest + config.max_new_tokens + 1)
            gc.compile_config = extra.pop("compile_config")

        def finish(b: int, n: int) -> None:
            times = stop.times
            stats = DecodeStats(nfe=n, prefill_time_s=times[0] - t0, accepted_lengths=[1] * (n - 1),
                                tokens_fed=[len(rows[b])] + [1] * (n - 1))
            if compiles and n > 2:
                # the first decode step traced and compiled the graph: its excess over a typical step
                gaps = sorted(y - x for x, y in zip(times[1:n], times[2:n]))
                stats.compile_s = max(0.0, times[1] - times[0] - gaps[len(gaps) // 2])
            stats.wall_time_s = times[n - 1] - t0 - stats.compile_s
            g = results[idx[b]] = checkers[b].result(stats)
            if on_done is not None:
                on_done(idx[b], g)

        stop = _Stop(checkers, timer, finish, self.device)
        self.model.generate(ids, attention_mask=mask, generation_config=gc,
                            stopping_criteria=StoppingCriteriaList([stop]), **extra)


@register_decoder("hf", help="transformers generate() on the same checkpoint (reference; compile=true: "
                             "StaticCache + transformers' torch.compile of the decode step; batch > 1: "
                             "left-padded chunks of B prompts, one generate call each)")
def build(ctx: DecoderContext, *, compile: str = "auto") -> HFDecoder:
    return HFDecoder(ctx.model_path, ctx.device, ctx.dtype, ctx.tokenizer, compile=compile)
