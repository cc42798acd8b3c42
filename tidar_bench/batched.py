"""Batched decoding: B sequences per forward, ragged acceptance, continuous refill.

Every decoder decodes B sequences at once through its own `generate_batch`: the model-core decoders
(`ar`, `tidar`, `eagle`, `dflash`, `bd`) are written once over B rows (`tidar_bench/engine.py`; their
batch 1 is the same code at B = 1), `hf` runs transformers' left-padded `generate` (baselines/hf.py).
This module is the entry point the harness and `speed --batch-size` use, and `speed_batch`, the paired
batched benchmark (output format: `report.SPEED_BATCH_FORMAT`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .decoding import Generation, GenerationConfig, Timer
from .errors import UserError


def supports_batch(decoder) -> str | None:
    """None when this decoder decodes at B > 1 (every built-in decoder does, with every option), else
    why not (one line): a decoder registered from outside needs a `generate_batch` method."""
    if hasattr(decoder, "generate_batch"):
        return None
    name = getattr(decoder, "name", type(decoder).__name__)
    return f"decoder {name!r} has no generate_batch: it decodes at batch 1 only (--batch-size 1)"


def generate_batch(decoder, prompts: Sequence[Sequence[int]], config: GenerationConfig, batch_size: int,
                   on_done: Callable[[int, Generation], None] | None = None) -> list[Generation]:
    """Decode every prompt with `batch_size` sequences in flight; results in prompt order.
    `on_done(i, generation)` is called as each sequence finishes (progress, streaming)."""
    why = supports_batch(decoder)
    if why:
        raise UserError(why)
    return decoder.generate_batch(prompts, config, batch_size, on_done)


# ----------------------------------------------------------------------------- the batched speed benchmark


def _compile_s(dec) -> float:
    """Compile seconds a decoder's compiled steps have spent so far (0 for decoders without `runners`)."""
    return sum(r.compile_s for r in dec.runners()) if hasattr(dec, "runners") else 0.0


def speed_batch(decoders: dict, prompts: list[list[int]], config: GenerationConfig, batch_sizes: list[int],
                rounds: int = 1, progress: Callable[[], None] | None = None) -> dict:
    """Paired batched throughput: at each batch size, `rounds` times, every decoder in turn decodes
    ALL prompts with that many sequences in flight (after one warm-up call on the first B prompts),
    in forward order on even rounds and reverse order on odd ones (ABBA: a linear drift of the
    machine's speed cancels over two rounds); the first decoder is the reference. Returns {"reference", "batch_sizes", "batch"} in
    report.SPEED_BATCH_FORMAT: per batch size and decoder, tokens/s over the batch (all new tokens /
    decode wall time, prefills included, compilation of shapes first met in a round excluded), T/NFE,
    per-sequence latency quartiles, speedup vs the reference at the same batch size, the per-round
    paired ratios, and for lossless decoders the prompts whose tokens differ from the reference's at
    the first batch size."""
    from .profiling import quartiles

    names = list(decoders)
    ref_name = names[0]
    dev = decoders[ref_name].model.device
    timer = Timer(dev)
    ref_tokens = None
    section = {}
    for B in batch_sizes:
        for dec in decoders.values():
            generate_batch(dec, prompts[:B], config, B)  # warm-up: caches allocated, kernels loaded
        acc = {n: {"tokens": 0, "decode_s": 0.0, "nfe": 0, "lat": [], "tps": [], "mismatch": 0, "compile_s": 0.0} for n in names}
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n, dec in ((n, decoders[n]) for n in order):
                c0, t0 = _compile_s(dec), timer.now()
                gens = generate_batch(dec, prompts, config, B)
                dt = timer.now() - t0
                a = acc[n]
                # a shape the warm-up did not reach (an EAGLE tree's width, a rarer block count) compiles
                # inside the round: its compile time is not decode time (as in every decoder's stats)
                compiled_s = _compile_s(dec) - c0
                a["compile_s"] += compiled_s
                dt -= compiled_s
                toks = sum(len(g.tokens) for g in gens)
                a["tokens"] += toks
                a["decode_s"] += dt
                a["nfe"] += sum(g.stats.nfe for g in gens)
                a["lat"] += [g.stats.wall_time_s for g in gens]
                a["tps"].append(toks / dt if dt > 0 else 0.0)
                if ref_tokens is None and n == ref_name:
                    ref_tokens = [g.tokens for g in gens]  # the reference at the first batch size
                if dec.lossless:
                    a["mismatch"] = max(a["mismatch"], sum(g.tokens != r for g, r in zip(gens, ref_tokens)))
                if progress is not None:
                    progress()
        ref = acc[ref_name]
        cells = {}
        for n, dec in decoders.items():
            a = acc[n]
            med, q1, q3 = quartiles(a["lat"])
            tps = a["tokens"] / a["decode_s"] if a["decode_s"] > 0 else 0.0
            ref_tps = ref["tokens"] / ref["decode_s"] if ref["decode_s"] > 0 else 0.0
            cells[n] = {"tokens": a["tokens"], "decode_s": a["decode_s"], "nfe": a["nfe"], "tokens_per_s": tps,
                        "tokens_per_nfe": a["tokens"] / a["nfe"] if a["nfe"] else 0.0,
                        "per_sequence_latency_s": {"median": med, "q1": q1, "q3": q3},
                        # no tokens from the reference (every prompt EOS first): no ratio, never a division by 0
                        "speedup_vs_reference": tps / ref_tps if ref_tps > 0 else None,
                        "paired_ratios": [x / y for x, y in zip(a["tps"], ref["tps"]) if y > 0],
                        "lossless_mismatches": a["mismatch"] if dec.lossless else None,
                        "compile_s_excluded": a["compile_s"]}
        section[str(B)] = cells
    return {"reference": ref_name, "batch_sizes": list(batch_sizes), "batch": section}
