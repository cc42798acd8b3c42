"""lm-eval model adapter: any registered decoder as an lm-eval `LM` named "tidar-bench".

    lm_eval --model tidar-bench --model_args pretrained=DIR,decoder=tidar,block_size=8 --tasks ...

(`import tidar_bench.harness.lm` registers the name; see `tidar-bench run` for the full harness.)

`generate_until` decodes at batch 1, one request at a time, through `decoder.generate`, and keeps a
record per request (tokens, NFE, accepted lengths, latency, finish reason). With batch_size B > 1
the requests of one task and generation config are decoded together by
`batched.generate_batch`, B sequences in flight, each recorded as it finishes (the same record, plus
batch_size, its share of the call's wall time and the group's throughput). With a `SampleCache`
a request already decoded (same prompt, generation kwargs, decoder options, model, seed) is
answered from the cache, which makes re-runs and interrupted runs resume without new decoding.
`loglikelihood*` use the model core's causal forward without a cache.

Parity with lm-eval's own `hf` model (HFLM) on generation tasks, rule by rule: the context is
tokenized as HFLM does (the tokenizer's special tokens, e.g. Llama's BOS, unless the text already
starts with the BOS string, as a chat-templated prompt does), left-truncated to max_length -
max_gen_toks with lm-eval's max_length and max_gen_toks defaults, the tokenizer's EOS text joins the
stop strings, decoders stop on every EOS id of the checkpoint (`DecoderContext.stop_token_ids`), and
the answer is decoded without special tokens and cut at the first stop string (lm-eval's
`postprocess_generated_text`). Chat templates go through HFLM's own `apply_chat_template`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lm_eval.models  # noqa: F401 - registers lm-eval's own models (hf, vllm, ...) before ours
import torch
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)

from ..decoding import GenerationConfig, SamplingParams, Timer
from ..errors import UserError
from ..model import resolve_device
from ..registry import DecoderContext, build_decoder, resolve_model
from .results import SampleCache, stable_hash

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks


def item_hash(context: str, gen_kwargs: dict, repeat: int = 0) -> str:
    """Identity of a request independent of the decoder (pairs outputs across decoders);
    `repeat` tells apart the copies of a request that a task asks for several times."""
    return stable_hash({"context": context, "gen_kwargs": gen_kwargs, "repeat": repeat})


def prompt_hash(context: str) -> str:
    return stable_hash(context)[:16]


def sampling_from(gen_kwargs: dict, seed: int, item: str) -> SamplingParams:
    """lm-eval's do_sample/temperature/top_p/top_k as our SamplingParams; greedy unless do_sample
    (or a positive temperature) is asked for. The seed is per item, so any shard order gives the
    same samples."""
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
    if not do_sample:
        return SamplingParams()
    return SamplingParams(temperature=temperature if temperature > 0 else 1.0,
                          top_k=int(gen_kwargs.get("top_k") or 0),
                          top_p=float(gen_kwargs.get("top_p") or 1.0),
                          seed=(seed * 1_000_003 + int(item[:12], 16)) % (2**63))


@dataclass
class _Item:
    """One generate_until request: its identity, then (once it is to be decoded) its prompt ids and
    GenerationConfig (`TidarBenchLM._setup`)."""

    req: object
    task: str
    context: str
    gen_kwargs: dict
    item: str
    key: str
    ids: list[int] = field(default_factory=list)
    truncated: bool = False
    until: list[str] = field(default_factory=list)
    max_new: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cfg: GenerationConfig | None = None


@register_model("tidar-bench")
class TidarBenchLM(LM):
    """lm-eval LM over one decoder, at batch 1 (or batch_size sequences in flight:
    `batched.generate_batch`; a sampled request carries its own seed, so it forms a group of its own).

    decoder_factory builds the decoder on first need (a fully cached run loads no model);
    key_info (decoder name, options, model, seed; batch size when > 1) goes into every cache key;
    shard=(rank, world) makes this LM decode only every world-th request of each task (others answer "")."""

    def __init__(self, ctx: DecoderContext, decoder_name: str, options: dict | None = None, *,
                 decoder_factory: Callable | None = None, seed: int = 0, max_length: int | None = None,
                 store: SampleCache | None = None, shard: tuple[int, int] = (0, 1), progress=None,
                 batch_size: int = 1):
        super().__init__()
        self.ctx = ctx
        self.decoder_name = decoder_name
        self.decoder_options = dict(options or {})
        self._factory = decoder_factory or (lambda: build_decoder(decoder_name, ctx, self.decoder_options))
        self._decoder = None
        self._warm = False  # warmed up on the first decoded request (see _warm_up)
        self.seed = seed
        self._max_length = max_length
        self.store = store
        self.shard = shard
        self.progress = progress  # rich Progress or None
        self.records: list[dict] = []  # requests answered in this LM's life (decoded or cached)
        self.decoded = 0  # requests actually decoded (not from the cache)
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.key_info = {"decoder": decoder_name, "options": self.decoder_options,
                         "model": str(Path(ctx.model_path).resolve()), "seed": seed}
        if batch_size > 1:  # records of batched decoding time another thing: never mixed with batch 1
            self.key_info["batch_size"] = batch_size

    # ------------------------------------------------------------------ construction from lm-eval

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TidarBenchLM":
        """model_args `pretrained=DIR,decoder=NAME,draft=DIR,device=..,dtype=..,seed=..,
        max_length=..,<decoder option>=..`."""
        args: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in (arg_string or "").split(","))):
            if "=" not in part:
                raise UserError(f"model_args entry {part!r} is not key=value")
            k, v = part.split("=", 1)
            args[k.strip()] = v.strip()
        return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "TidarBenchLM":
        """The same keys as a dict (lm-eval's CLI passes parsed model_args this way)."""
        args = {k: str(v) for k, v in arg_dict.items()}
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "pretrained" not in args:
            raise UserError("model_args needs pretrained=DIR")
        ctx = DecoderContext(resolve_model(args.pop("pretrained")), args.pop("device", extra.get("device", "auto")),
                             args.pop("dtype", "auto"), Path(args["draft"]) if "draft" in args else None)
        args.pop("draft", None)
        name = args.pop("decoder", "ar")
        seed = int(args.pop("seed", 0))
        max_length = int(args.pop("max_length")) if "max_length" in args else None
        return cls(ctx, name, args, seed=seed, max_length=max_length)

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = self._factory()
        return self._decoder

    @property
    def tokenizer(self):
        tok = self.ctx.tokenizer
        if tok is None:
            raise UserError(f"{self.ctx.model_path} has no tokenizer; lm-eval tasks need one")
        return tok

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self._config().get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) else eos
        return eos

    def _config(self) -> dict:
        from ..model import read_config

        return read_config(self.ctx.model_path)

    @property
    def max_length(self) -> int:
        """lm-eval's rule (config n_positions / max_position_embeddings / n_ctx, else the tokenizer's
        model_max_length, else 2048)."""
        if self._max_length is None:
            from types import SimpleNamespace

            cfg = {k: v for k, v in self._config().items() if k != "text_config"}
            self._max_length = resolve_max_length(SimpleNamespace(**cfg), self.ctx.tokenizer, default=2048)
        return self._max_length

    def encode_context(self, context: str) -> list[int]:
        """Token ids of a generation context exactly as HFLM encodes it."""
        tok = self.tokenizer
        if has_bos_prefix(context, getattr(tok, "bos_token", None)):
            return tok(context, add_special_tokens=False)["input_ids"]
        return tok(context)["input_ids"]

    # ------------------------------------------------------------------ chat templates (lm-eval's own code)

    chat_template_args: dict = {}

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return TemplateLM.chat_template(self, chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from lm_eval.models.huggingface import HFLM

        return HFLM.apply_chat_template(self, chat_history, add_generation_prompt)

    def _warm_up(self, ids: list[int], cfg: GenerationConfig) -> None:
        """Before anything is timed: one generate of the first request itself (kernels, allocator,
        caches, and in compiled mode the step graphs for the KV-cache size these requests use)."""
        self._decoder.generate(ids, cfg)
        self._warm = True

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        index_in_task: dict[str, int] = {}
        bars: dict[str, object] = {}
        if self.progress is not None:
            for r in requests:
                name = getattr(r, "task_name", None) or "task"
                if name not in bars:
                    total = sum(1 for q in requests if (getattr(q, "task_name", None) or "task") == name)
                    bars[name] = self.progress.add_task(f"{self.decoder_name} × {name}", total=total)
        todo = []  # (request, task, repeat, whether this rank decodes it)
        repeats: dict[int, int] = {}  # lm-eval repeats a request by listing the same object again
        for req in requests:
            task = getattr(req, "task_name", None) or "task"
            i = index_in_task[task] = index_in_task.get(task, -1) + 1
            repeat = repeats[id(req)] = repeats.get(id(req), -1) + 1
            todo.append((req, task, repeat, i % self.shard[1] == self.shard[0]))

        def advance(task: str) -> None:
            if task in bars:
                self.progress.advance(bars[task])

        if self.batch_size > 1:
            return self._generate_batched(todo, advance)
        out: list[str] = []
        for req, task, repeat, mine in todo:
            out.append(self._generate_one(req, task, repeat, mine))
            advance(task)
        return out

    def _item(self, req, task: str, repeat: int) -> _Item:
        context, gen_kwargs = req.args[0], dict(req.args[1] or {})
        item = item_hash(context, gen_kwargs, repeat)
        return _Item(req, task, context, gen_kwargs, item, stable_hash({"item": item, **self.key_info}))

    def _cached(self, it: _Item) -> str | None:
        cached = self.store.get(it.key) if self.store is not None else None
        if cached is None:
            return None
        self.records.append(cached)
        return cached["output"]

    def _setup(self, it: _Item) -> None:
        """The prompt ids (HFLM's encoding and left truncation) and the GenerationConfig of a request
        to decode: the same at every batch size."""
        norm = normalize_gen_kwargs(it.gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        eos_text = (self.tokenizer.decode(self.tokenizer.eos_token_id, skip_special_tokens=False)
                    if self.tokenizer.eos_token_id is not None else None)
        it.until = handle_stop_sequences(norm.get("until"), eos=eos_text)
        max_new = int(norm["max_gen_toks"])
        it.sampling = sampling_from(it.gen_kwargs, self.seed, it.item)
        ids = self.encode_context(it.context)
        it.max_new = max_new = max(1, min(max_new, self.max_length - 1))
        keep = self.max_length - max_new
        it.truncated = len(ids) > keep
        it.ids = ids[-keep:] if it.truncated else ids
        it.cfg = GenerationConfig(max_new_tokens=max_new, stop_strings=tuple(it.until),
                                  stop_token_ids=self.ctx.stop_token_ids, sampling=it.sampling)

    def _record(self, it: _Item, gen, latency: float, compiled: bool, **extra) -> dict:
        """The per-request record (cache line) of a decoded request; `extra` fields (batched mode)
        follow the common ones."""
        s = gen.stats
        # HFLM's answer: the continuation without special tokens, cut at the first stop string
        text = postprocess_generated_text(self.tokenizer.decode(gen.tokens, skip_special_tokens=True), it.until, None)
        return {
            "key": it.key, "item": it.item, "task": it.task, "doc_id": getattr(it.req, "doc_id", None),
            "prompt_hash": prompt_hash(it.context), "prompt_tokens": len(it.ids), "truncated": it.truncated,
            "output": text, "tokens": list(gen.tokens), "new_tokens": s.new_tokens, "nfe": s.nfe,
            "accepted_lengths": list(s.accepted_lengths), "prefill_forwards": s.prefill_forwards, "latency_s": latency,
            "decoder_wall_s": s.wall_time_s, "prefill_time_s": s.prefill_time_s,
            "tokens_per_s": s.new_tokens / latency if latency > 0 else 0.0,
            "tokens_per_nfe": s.tokens_per_nfe, "draft_forwards": s.draft_forwards, "compile_s": s.compile_s,
            "compiled": compiled,
            "finish_reason": gen.finish_reason, "greedy": it.sampling.greedy,
            "lossless": bool(getattr(self._decoder, "lossless", False)), "max_new_tokens": it.max_new, **extra,
        }

    def _keep(self, record: dict, harness_s: float) -> None:
        """Store a decoded request's record; `harness_s` is its bookkeeping outside decoding so far
        (the store's write is added)."""
        record["harness_s"] = harness_s
        if self.store is not None:
            t1 = time.perf_counter()
            self.store.append(record)
            record["harness_s"] += time.perf_counter() - t1
        self.records.append(record)
        self.decoded += 1

    def _generate_one(self, req, task: str, repeat: int, mine: bool) -> str:
        t_start = time.perf_counter()
        it = self._item(req, task, repeat)
        cached = self._cached(it)
        if cached is not None:
            return cached
        if not mine:
            return ""
        if self._decoder is None:  # building the decoder is not per-request bookkeeping: keep it out
            t_build = time.perf_counter()
            _ = self.decoder
            t_start += time.perf_counter() - t_build
        self._setup(it)
        decoder = self.decoder
        if not self._warm:  # warm-up: not per-request bookkeeping either
            t_warm = time.perf_counter()
            self._warm_up(it.ids, it.cfg)
            t_start += time.perf_counter() - t_warm
        timer = Timer(resolve_device(self.ctx.device))
        t0 = timer.now()
        gen = decoder.generate(it.ids, it.cfg)
        latency = timer.now() - t0 - gen.stats.compile_s  # compilation of a new step shape is reported apart
        record = self._record(it, gen, latency, bool(decoder.options().get("compile", False)))
        # everything outside decoder.generate for this request (the store's fsync included)
        self._keep(record, (time.perf_counter() - t_start) - latency - gen.stats.compile_s)  # compilation is not harness
        return record["output"]

    # ------------------------------------------------------------------ batched generation

    def _generate_batched(self, todo: list, advance: Callable[[str], None]) -> list[str]:
        """batch_size > 1: cached requests from the store, other ranks' requests "", the rest grouped
        by (task, GenerationConfig) in request order and decoded by `batched.generate_batch` with
        batch_size sequences in flight, each recorded and stored as it finishes."""
        from ..batched import supports_batch

        out = [""] * len(todo)
        fresh = []  # (position in the request list, item, its bookkeeping seconds so far)
        for pos, (req, task, repeat, mine) in enumerate(todo):
            t0 = time.perf_counter()
            it = self._item(req, task, repeat)
            cached = self._cached(it)
            if cached is not None or not mine:
                out[pos] = cached or ""
                advance(task)
                continue
            fresh.append((pos, it, time.perf_counter() - t0))
        if not fresh:
            return out
        why = supports_batch(self.decoder)
        if why:
            raise UserError(f"--batch-size {self.batch_size}: decoder {self.decoder_name}: {why}")
        groups: dict[tuple, list] = {}
        for pos, it, prep_s in fresh:
            t0 = time.perf_counter()
            self._setup(it)
            groups.setdefault((it.task, it.cfg), []).append((pos, it, prep_s + time.perf_counter() - t0))
        for (task, cfg), members in groups.items():
            self._decode_group(members, cfg, out, advance)
        return out

    def _decode_group(self, members: list, cfg: GenerationConfig, out: list[str], advance) -> None:
        """One generate_batch call over a group. Per request: latency_s = its own admission to finish
        (minus the other requests' bookkeeping done meanwhile), batch_share_s = the call's wall time
        since the previous request finished (bookkeeping excluded; the shares add up to the call's
        decode wall time, so tokens / shares is the throughput over the batch even over resumed
        groups), and at the end of the call the group's batch_wall_s and batch_tokens_per_s."""
        from bisect import bisect_left

        from ..batched import generate_batch

        B, decoder = self.batch_size, self.decoder
        compiled = bool(decoder.options().get("compile", False))
        prompts = [it.ids for _, it, _ in members]
        if not self._warm:  # untimed: kernels, allocator, and the batch caches sized for the longest prompts
            generate_batch(decoder, sorted(prompts, key=len)[-B:], cfg, B)
            self._warm = True
        timer = Timer(resolve_device(self.ctx.device))
        records: list[dict] = []
        book_starts: list[float] = []  # each on_done's start, and the bookkeeping time summed before it
        book_cum = [0.0]
        mark = [0.0]

        def on_done(i: int, gen) -> None:
            t_cb = timer.now()
            pos, it, prep_s = members[i]
            admitted = t_cb - gen.stats.wall_time_s
            others = book_cum[-1] - book_cum[bisect_left(book_starts, admitted)]
            record = self._record(it, gen, gen.stats.wall_time_s - others, compiled, batch_size=B,
                                  batch_share_s=t_cb - mark[0])
            self._keep(record, prep_s)
            records.append(record)
            out[pos] = record["output"]
            advance(it.task)
            mark[0] = time.perf_counter()
            record["harness_s"] = prep_s + (mark[0] - t_cb)
            book_starts.append(t_cb)
            book_cum.append(book_cum[-1] + mark[0] - t_cb)

        mark[0] = t0 = timer.now()
        generate_batch(decoder, prompts, cfg, B, on_done=on_done)
        wall = timer.now() - t0 - book_cum[-1]
        tokens = sum(r["new_tokens"] for r in records)
        for r in records:
            r["batch_wall_s"] = wall
            r["batch_tokens_per_s"] = tokens / wall if wall > 0 else 0.0
        if self.store is not None:
            self.store.amend(records)  # the group's fields, known only now

    # ------------------------------------------------------------------ scoring

    def _model(self):
        return self.ctx.model

    @torch.inference_mode()
    def _continuation_logprob(self, context_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
        """log p(cont | context) and whether cont is the greedy continuation (causal forward, no cache).
        The input is left-truncated to max_length tokens."""
        model = self._model()
        ids = (context_ids + cont_ids)[-(self.max_length + 1):]
        inp = torch.tensor([ids[:-1]], device=model.device)
        n = len(cont_ids)
        logits = model(inp, logits_index=slice(-n, None)).logits[0]
        target = torch.tensor(cont_ids, device=model.device)
        logprobs = torch.log_softmax(logits, -1)
        total = float(logprobs.gather(-1, target[:, None]).sum())
        return total, bool((logits.argmax(-1) == target).all())

    def _prefix_token(self) -> int:
        eos = self.eos_token_id
        return eos if eos is not None else 0

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            n_spaces = len(context) - len(context.rstrip())  # lm-eval convention: move trailing spaces
            if n_spaces:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            whole = self.tokenizer.encode(context + continuation, add_special_tokens=False)
            ctx_ids = self.tokenizer.encode(context, add_special_tokens=False) if context else []
            cont_ids = whole[len(ctx_ids):]
            if not ctx_ids:
                ctx_ids = [self._prefix_token()]
            out.append(self._continuation_logprob(ctx_ids, cont_ids) if cont_ids else (0.0, True))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            ids = self.tokenizer.encode(req.args[0], add_special_tokens=False)
            windows = get_rolling_token_windows(token_list=ids, prefix_token=self._prefix_token(),
                                                max_seq_len=self.max_length, context_len=1)
            total = 0.0
            for ctx_ids, pred in map(make_disjoint_window, windows):
                total += self._continuation_logprob(list(ctx_ids), list(pred))[0]
            out.append(total)
        return out


def lm_eval_cli() -> None:
    """`tidar-lm-eval ...`: lm-eval's own command line with the `tidar-bench` model registered beside
    every built-in model (`--model hf`, `vllm`, ...: lm-eval's lazy registry is filled before ours)
    (lm-eval 0.4.13 has no plugin entry point, so plain `lm_eval` cannot see models of other packages):
    tidar-lm-eval run --model tidar-bench --model_args pretrained=DIR,decoder=tidar,block_size=8 \\
        --tasks tb_gsm8k --include_path $(python -c 'import tidar_bench.harness.tasks as t; print(t.tasks_dir())')"""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
