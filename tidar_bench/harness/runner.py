"""`tidar-bench run`: every decoder on the same lm-eval tasks, one run folder.

For each decoder, lm-eval builds the same requests (same task configs, few-shot, seeds, limit), and
`TidarBenchLM` decodes them at batch 1 (one warm-up generate first), or with `--batch-size B` B at a
time through `batched.generate_batch` (one untimed warm-up call), caching each decoded
request in `cache/<decoder>/<task>.jsonl`. The run folder then gets (`<decoder>` the setting's label,
`registry.parse_settings`: as in --decoders, a path option shown relative to the working folder or as
`<name>-<hash>` (`provenance.portable_path`), with `%`, `/` and backslash percent-encoded so
`dflash(draft=ckpt/dflash)` stays one file name, see `file_label`):

    run_spec.json                    identity of the command (written first; guards the folder)
    results_<decoder>.json           lm-eval results
    samples_<decoder>_<task>.jsonl   per-sample output + decode stats
    summary.csv                      task, decoder, metric, score, ..., speedup_vs_ar, n
    run.json                         command, environment, options, checkpoints (portable path + sha256
                                     of the weights), overhead, lossless mismatches

No output holds this machine's absolute paths: every path written (commands, identity, options, lm-eval
results) goes through `provenance.portable_path` (relative to the working folder, `~/...`, or a short
name with a hash).

Resume: re-running the same command into the same folder answers every decoded request from the
cache. Sharding (`torchrun --nproc_per_node N tidar-bench run ...`): rank r decodes every N-th
request of each task into `cache/<decoder>/<task>.rank<r>.jsonl`; after a barrier rank 0 merges the
shards and runs the resume pass, so the folder looks exactly like a single-process run."""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..provenance import checkpoint_record, environment, is_path_value, portable_path, portable_value
from .results import (SampleCache, lossless_check, speed_stats, summary_rows, write_csv, write_json,
                      write_jsonl)

SPEC_FILE = "run_spec.json"
# lm-eval's command-line defaults (`--seed 0,1234,1234,1234`): python random, numpy, torch, few-shot
# sampling. `tidar-bench run` uses them so its prompts are byte-identical to `lm_eval --model hf`'s;
# --seed is only the sampling seed of the decoders.
LM_EVAL_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def file_label(decoder: str) -> str:
    """The decoder label as one file-name part: `%`, `/` and `\\` percent-encoded (a label may hold a
    relative path, e.g. `dflash(draft=ckpt/dflash)`, which would otherwise nest folders); other labels
    are unchanged, so existing run folders and caches keep their names."""
    return decoder.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")


def setting_text(setting, value=lambda v: v) -> str:
    """A parsed decoder setting written back as `name(k=v,...)`, each option value through `value`:
    unchanged = the setting as typed (the label of versions before labels were portable, and the cache
    keys' decoder); `portable_value` = as commands record it."""
    opts = ",".join(f"{k}={value(v)}" for k, v in setting.options)
    return setting.name + (f"({opts})" if opts else "")


def _portable_arg(arg: str) -> str:
    """A `--decoder-arg` as outputs record it: a path value (`dflash.draft=/x`) as portable_path."""
    key, eq, value = arg.partition("=")
    return f"{key}={portable_value(value.strip())}" if eq and is_path_value(value.strip()) else arg


@dataclass
class RunSpec:
    model: Path
    decoders: list[str]  # the settings as given (`tidar(block_size=4)`, `dflash(draft=/ckpt)`); labels: labels()
    tasks: list[str]
    out: Path
    draft: Path | None = None
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    decoder_args: list[str] = field(default_factory=list)  # "decoder.key=value" (bare "key=value": one decoder)
    allow_code_exec: bool = False
    hub_datasets: bool = False
    include_path: Path | None = None  # extra lm-eval task YAMLs instead of the shipped tasks
    apply_chat_template: bool = False  # lm-eval's --apply_chat_template
    fewshot_as_multiturn: bool | None = None  # lm-eval's --fewshot_as_multiturn (None: = apply_chat_template)
    system_instruction: str | None = None  # lm-eval's --system_instruction
    gen_kwargs: str | None = None  # lm-eval's --gen_kwargs, e.g. "max_gen_toks=64" (overrides every task's)
    compile: str = "auto"  # --compile: default of every decoder's `compile` option (settings override it)
    batch_size: int = 1  # --batch-size: sequences in flight per decoder (batched.generate_batch)

    def settings(self) -> list:
        """--decoders parsed (registry.parse_settings): each setting's label and options as given."""
        from ..registry import parse_settings

        return parse_settings(",".join(self.decoders))

    def labels(self) -> list[str]:
        """The settings' labels (a path option relative to the working folder or `<name>-<hash>`): the
        keys of results, rows, file names and run.json."""
        return [st.label for st in self.settings()]

    def identity(self) -> dict:
        """What makes two invocations 'the same command' (the folder's own path, so a moved folder
        still resumes, and sharding excluded), with every path in portable form (provenance.portable_path
        of the resolved path; decoder labels): a committed folder resumes on the same machine layout, and
        run_spec.json holds no absolute path. Batch 1 leaves batch_size out, so folders of versions
        before --batch-size still resume."""
        d = self._identity()
        for k in ("model", "draft", "include_path"):
            d[k] = portable_path(Path(d[k]).resolve()) if d[k] is not None else None
        d["decoders"] = self.labels()
        d["decoder_args"] = [_portable_arg(a) for a in self.decoder_args]
        return d

    def legacy_identity(self) -> dict:
        """The identity as versions before portable paths wrote it (absolute resolved paths, labels as
        typed): their run folders still resume (check_out_folder)."""
        d = self._identity()
        for k in ("model", "draft", "include_path"):
            d[k] = str(Path(d[k]).resolve()) if d[k] is not None else None
        d["decoders"] = [setting_text(st) for st in self.settings()]
        return d

    def _identity(self) -> dict:
        d = asdict(self)
        del d["out"]
        if d["batch_size"] == 1:
            del d["batch_size"]
        d["lm_eval_seeds"] = dict(LM_EVAL_SEEDS)  # folders of older versions (few-shot seed = --seed) differ
        return d

    def command_line(self) -> str:
        """The command as outputs record it: paths in portable form (provenance.portable_path)."""
        parts = ["tidar-bench", "run", "--model", portable_path(self.model),
                 "--decoders", ",".join(setting_text(st, portable_value) for st in self.settings()),
                 "--tasks", ",".join(self.tasks), "--out", portable_path(self.out), "--device", self.device,
                 "--dtype", self.dtype, "--seed", str(self.seed)]
        if self.draft:
            parts += ["--draft", portable_path(self.draft)]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        for a in self.decoder_args:
            parts += ["--decoder-arg", _portable_arg(a)]
        if self.include_path:
            parts += ["--include-path", portable_path(self.include_path)]
        parts += ["--compile", self.compile]
        if self.batch_size != 1:
            parts += ["--batch-size", str(self.batch_size)]
        parts += ["--allow-code-exec"] * self.allow_code_exec + ["--hub-datasets"] * self.hub_datasets
        parts += ["--apply-chat-template"] * self.apply_chat_template
        if self.fewshot_as_multiturn is not None:
            parts += ["--fewshot-as-multiturn" if self.fewshot_as_multiturn else "--no-fewshot-as-multiturn"]
        if self.system_instruction is not None:
            parts += ["--system-instruction", json.dumps(self.system_instruction)]
        if self.gen_kwargs:
            parts += ["--gen-kwargs", self.gen_kwargs]
        return " ".join(parts)

    def seeds(self) -> dict:
        """Every seed of the run: lm-eval's four (its command-line defaults) and the sampling seed."""
        return {**LM_EVAL_SEEDS, "sampling_seed": self.seed}

    def multiturn(self) -> bool:
        return bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn


@dataclass
class Plan:
    """A validated RunSpec: nothing is written before one exists."""

    spec: RunSpec
    options: dict[str, dict]  # decoder setting label -> full options (factory defaults + given)
    given: dict[str, dict]  # decoder setting label -> options as given (parsed)
    names: dict[str, str]  # decoder setting label (e.g. "tidar(block_size=4)") -> registered decoder name
    lm_tasks: list[str]
    task_manager: object
    confirm_unsafe_code: bool
    resolved: dict[str, dict] = field(default_factory=dict)  # label -> decoder.options() once built (run.json)
    labels: list[str] = field(default_factory=list)  # the decoder setting labels, in --decoders order
    typed: dict[str, str] = field(default_factory=dict)  # label -> the setting as typed (cache keys, old names)


# ----------------------------------------------------------------------------- validation


def _decoder_options(spec: RunSpec) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """Per decoder setting of --decoders: (full options, given options, registered name), from the
    one settings resolver (`registry.resolve_settings`, shared with `speed` and `generate`)."""
    from ..registry import decoders, resolve_settings

    settings = resolve_settings(",".join(spec.decoders), spec.decoder_args, spec.compile)
    specs = decoders()
    for st in settings:
        if specs[st.name].needs_draft and spec.draft is None:
            raise UserError(f"decoder {st.name!r} needs a draft model: pass --draft DIR")
    return ({st.label: st.options for st in settings}, {st.label: st.given for st in settings},
            {st.label: st.name for st in settings})


def _resolve_tasks(spec: RunSpec) -> tuple[list[str], object, bool]:
    """(lm-eval task names, TaskManager, whether the tasks execute generated code)."""
    if spec.include_path is not None:
        from lm_eval.tasks import TaskManager

        if not Path(spec.include_path).is_dir():
            raise UserError(f"--include-path {spec.include_path} is not a directory")
        tm = TaskManager(include_path=str(spec.include_path), include_defaults=False)
        unknown = [t for t in spec.tasks if t not in tm.all_tasks]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)}; tasks in {spec.include_path}: "
                            f"{', '.join(sorted(tm.all_tasks)) or 'none'}")
        unsafe = any(tm.task_index[t].cfg and tm.task_index[t].cfg.get("unsafe_code") for t in spec.tasks
                     if getattr(tm.task_index[t], "cfg", None))
        if unsafe and not spec.allow_code_exec:
            raise UserError("these tasks execute generated code: pass --allow-code-exec to allow it")
        return list(spec.tasks), tm, unsafe
    try:
        from . import tasks as ours
    except ImportError as e:
        raise UserError(f"the shipped task definitions are not available ({e}); use --include-path DIR")
    hub = {"hub": True} if spec.hub_datasets and "hub" in inspect.signature(ours.resolve_tasks).parameters else {}
    lm_names = ours.resolve_tasks(spec.tasks, **hub)
    needs = bool(ours.needs_code_exec(lm_names))
    if needs and not ours.code_exec_allowed(spec.allow_code_exec):
        raise UserError(f"task(s) {', '.join(spec.tasks)} execute generated code: pass --allow-code-exec to allow it")
    if not spec.hub_datasets:
        ours.verify_data()
    return lm_names, ours.task_manager(builtins=not all(n.startswith("tb_") for n in lm_names)), needs


def check_out_folder(out: Path, identity: dict, also: list[dict] | tuple = ()) -> None:
    """A new/empty folder, or a run folder of the same command (`identity`, or one of `also`: the same
    command as an older version recorded it); never a foreign folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / SPEC_FILE
    if not marker.is_file():
        raise UserError(f"--out {out} is not empty and is not a tidar-bench run folder; choose another --out")
    try:
        old = json.loads(marker.read_text())["identity"]
    except (json.JSONDecodeError, KeyError):
        raise UserError(f"--out {out}: {SPEC_FILE} is unreadable; choose another --out")
    if old != identity and old not in also:
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise UserError(f"--out {out} holds a run of a different command (differs in: {', '.join(diff)}); "
                        "choose another --out")


def _check_tokenizer(spec: RunSpec) -> None:
    """lm-eval tasks are text: the checkpoint needs a tokenizer, and a chat template when asked to apply one."""
    from ..registry import load_tokenizer

    tok = load_tokenizer(spec.model)
    if tok is None:
        raise UserError(f"{spec.model} has no tokenizer (tokenizer.json / tokenizer_config.json / tokenizer.model); "
                        "lm-eval tasks are text and need one")
    if spec.fewshot_as_multiturn and not spec.apply_chat_template:
        raise UserError("--fewshot-as-multiturn needs --apply-chat-template")
    if spec.apply_chat_template and not getattr(tok, "chat_template", None):
        raise UserError(f"--apply-chat-template: the tokenizer in {spec.model} has no chat template "
                        "(tokenizer_config.json `chat_template` or chat_template.jinja); drop the option for a base model")


def prepare(spec: RunSpec) -> Plan:
    """Validate everything a run needs; raises UserError and writes nothing on bad input."""
    from ..model import read_config, resolve_device, resolve_dtype

    if spec.limit is not None and spec.limit < 1:
        raise UserError(f"--limit must be >= 1, got {spec.limit}")
    if spec.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {spec.batch_size}")
    if spec.gen_kwargs and any("=" not in p for p in spec.gen_kwargs.split(",")):
        raise UserError(f"--gen-kwargs expects key=value,key=value (lm-eval's --gen_kwargs), got {spec.gen_kwargs!r}")
    if not spec.decoders:
        raise UserError("--decoders is empty")
    if not spec.tasks:
        raise UserError("--tasks is empty")
    read_config(spec.model)
    _check_tokenizer(spec)
    if spec.draft is not None:
        read_config(spec.draft)
    resolve_dtype(spec.dtype, resolve_device(spec.device))
    options, given, names = _decoder_options(spec)
    check_out_folder(spec.out, spec.identity(), [spec.legacy_identity()])
    lm_tasks, tm, unsafe = _resolve_tasks(spec)
    settings = spec.settings()
    return Plan(spec, options, given, names, lm_tasks, tm, unsafe, labels=[st.label for st in settings],
                typed={st.label: setting_text(st) for st in settings})


def _adopt_old_names(out: Path, plan: Plan) -> None:
    """A run folder written while labels held the path as typed (`dflash(draft=%2Fckpt%2Fdflash)`): its
    cache, results and samples files take the label's current name, so the run resumes from them."""
    if not out.is_dir():
        return
    for label, typed in plan.typed.items():
        old, new = file_label(typed), file_label(label)
        if old == new:
            continue
        moves = [(out / "cache" / old, out / "cache" / new),
                 (out / f"results_{old}.json", out / f"results_{new}.json")]
        moves += [(f, out / f"samples_{new}_{f.name[len(f'samples_{old}_'):]}") for f in out.iterdir()
                  if f.name.startswith(f"samples_{old}_")]
        for src, dst in moves:
            if src.exists() and not dst.exists():
                os.replace(src, dst)


# ----------------------------------------------------------------------------- running


class _Dist:
    """torchrun environment: rank/world size and a gloo barrier (no-op for one process)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._pg = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self._pg = True

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self._pg:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate(plan: Plan, decoder: str, ctx, store: SampleCache, shard: tuple[int, int], progress):
    import lm_eval

    from ..registry import build_decoder
    from .lm import TidarBenchLM

    name, given, full = plan.names[decoder], plan.given[decoder], plan.options[decoder]
    lm = TidarBenchLM(ctx, decoder, given, seed=plan.spec.seed, store=store, shard=shard, progress=progress,
                      decoder_factory=lambda: build_decoder(name, ctx, full), batch_size=plan.spec.batch_size)
    lm.key_info["options"] = plan.options[decoder]
    # the setting as typed, as every version has keyed the cache (a label's path form would re-key it)
    lm.key_info["decoder"] = plan.typed.get(decoder, decoder)
    spec = plan.spec
    res = lm_eval.simple_evaluate(model=lm, tasks=list(plan.lm_tasks), task_manager=plan.task_manager,
                                  limit=spec.limit, log_samples=True, bootstrap_iters=1000, **LM_EVAL_SEEDS,
                                  apply_chat_template=spec.apply_chat_template,
                                  fewshot_as_multiturn=spec.multiturn(),
                                  system_instruction=spec.system_instruction, gen_kwargs=spec.gen_kwargs or None,
                                  confirm_run_unsafe_code=plan.confirm_unsafe_code)
    return res, lm


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


def run(spec: RunSpec) -> dict:
    """Run the benchmark; returns run.json's content on rank 0 (None on other ranks)."""
    from ..registry import DecoderContext

    t_start = time.perf_counter()
    dist = _Dist()
    try:
        err, plan = None, None
        if dist.rank == 0:
            try:
                plan = prepare(spec)
                _adopt_old_names(Path(spec.out), plan)
                write_json(Path(spec.out) / SPEC_FILE, {"identity": spec.identity(), "command": spec.command_line()})
            except UserError as e:
                err = str(e)
        err = dist.broadcast(err)
        if err:
            raise UserError(err)
        if dist.rank != 0:
            plan = prepare(spec)
        device = spec.device
        if dist.world > 1 and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{dist.local_rank}"
        ctx = DecoderContext(Path(spec.model), device, spec.dtype, spec.draft)
        cache_dir = Path(spec.out) / "cache"
        decoded: dict[str, int] = {}
        if dist.world > 1:  # shard pass: decode this rank's share
            with _progress() as progress:
                for d in plan.labels:
                    store = SampleCache(cache_dir / file_label(d), suffix=f".rank{dist.rank}")
                    _, lm = _evaluate(plan, d, ctx, store, (dist.rank, dist.world), progress)
                    decoded[d] = lm.decoded
                    del lm
            dist.barrier()
            if dist.rank != 0:
                return None
            for d in plan.labels:
                SampleCache.merge_shards(cache_dir / file_label(d))
        results, records, lms = {}, {}, {}
        with _progress() as progress:
            for d in plan.labels:
                res, lm = _evaluate(plan, d, ctx, SampleCache(cache_dir / file_label(d)), (0, 1), progress)
                results[d], lms[d] = res, lm
                records[d] = {}
                for r in lm.records:
                    records[d].setdefault(r["task"], []).append(r)
                decoded[d] = decoded.get(d, 0) + lm.decoded
                if lm._decoder is not None:  # the values the decoder resolved (e.g. where TiDAR's came from)
                    plan.resolved[d] = lm._decoder.options()
                lm._decoder = None  # free the decoder's model before the next one
        info = _write_outputs(plan, results, records, lms, decoded, dist.world, time.perf_counter() - t_start)
        return info
    finally:
        dist.close()


def _sample_rows(res: dict, task: str, records: list[dict]) -> list[dict]:
    by_doc: dict = {}
    for r in records:
        by_doc.setdefault(r["doc_id"], []).append(r)
    rows = []
    for s in res.get("samples", {}).get(task, []):
        recs = by_doc.get(s["doc_id"], [])
        args = s.get("arguments") or [[None]]
        row = {"doc_id": s["doc_id"], "doc_hash": s.get("doc_hash"), "prompt_hash": s.get("prompt_hash"),
               "prompt": args[0][0] if isinstance(args[0], (list, tuple)) else None,
               "target": s.get("target"), "output": [x[0] if isinstance(x, list) and x else x for x in s.get("resps", [])],
               "filtered": s.get("filtered_resps"), "filter": s.get("filter"),
               "metrics": {m: s.get(m) for m in s.get("metrics", [])}}
        if recs:
            row.update({
                "new_tokens": sum(r["new_tokens"] for r in recs), "nfe": sum(r["nfe"] for r in recs),
                "accepted_lengths": [a for r in recs for a in r["accepted_lengths"]],
                "latency_s": sum(r["latency_s"] for r in recs),
                "finish_reason": [r["finish_reason"] for r in recs],
                "prompt_tokens": recs[0]["prompt_tokens"], "truncated": recs[0]["truncated"],
                "cache_key": [r["key"] for r in recs],
            })
        rows.append(row)
    return rows


def _write_outputs(plan: Plan, results, records, lms, decoded, world: int, wall_s: float) -> dict:
    spec, out = plan.spec, Path(plan.spec.out)
    decoders = plan.labels
    for d in decoders:
        res = results[d]
        write_json(out / f"results_{file_label(d)}.json", portable_value({k: v for k, v in res.items() if k != "samples"}))
        for task in res.get("samples", {}):
            write_jsonl(out / f"samples_{file_label(d)}_{task}.jsonl", _sample_rows(res, task, records[d].get(task, [])))
    rows = summary_rows(results, records, decoders, spec.batch_size)
    write_csv(out / "summary.csv", rows)
    all_recs = {d: [r for rs in records[d].values() for r in rs] for d in decoders}
    reference = decoders[0]  # the first setting: every speedup and lossless check is against it
    checks = {d: lossless_check(d, reference, all_recs[d], all_recs[reference], len(decoders) == 1) for d in decoders}
    speed = {d: speed_stats(all_recs[d]) for d in decoders}
    decode_s = sum(s["decode_s"] for s in speed.values())
    harness_s = sum(s["harness_s"] for s in speed.values())
    info = {
        "command": spec.command_line(),
        "identity": spec.identity(),
        "environment": environment(),
        "seed": spec.seed,
        "seeds": spec.seeds(),
        "prompt_options": {"apply_chat_template": spec.apply_chat_template, "fewshot_as_multiturn": spec.multiturn(),
                           "system_instruction": spec.system_instruction, "gen_kwargs": spec.gen_kwargs},
        "batch_size": spec.batch_size,
        "world_size": world,
        "limit": spec.limit,
        "tasks": spec.tasks,
        "lm_eval_tasks": plan.lm_tasks,
        # every checkpoint measured: its resolved path (portable form) and the sha256 of its weights
        "checkpoints": _checkpoints(plan),
        "decoders": {d: {"options": portable_value(plan.options[d]), "given": portable_value(plan.given[d]),
                         "resolved": portable_value(plan.resolved.get(d)),
                         "lossless": bool(all_recs[d] and all(r.get("lossless") for r in all_recs[d])),
                         "decoded_this_invocation": decoded.get(d, 0), **speed[d]} for d in decoders},
        "reference": reference,
        # lossless decoders' greedy outputs that differ from the reference's (must be 0); the key keeps
        # its name from when the reference was always `ar`
        "mismatches_vs_ar": {d: c[0] for d, c in checks.items()},
        # lossy decoders' greedy outputs that differ from the reference's: reported, not a failure
        "lossy_mismatches_vs_ar": {d: c[1] for d, c in checks.items()},
        # checked / reference / lossy / unchecked: <why> (a lossless decoder never passes unchecked silently)
        "lossless_check": {d: c[2] for d, c in checks.items()},
        # per-request bookkeeping outside decoder.generate (tokenising, hashing, cache fsync, progress)
        "harness_s": harness_s,
        "decode_s": decode_s,
        "overhead_fraction": harness_s / decode_s if decode_s > 0 else None,
        # the whole invocation, model loading, task building and lm-eval scoring included
        "wall_s_this_invocation": wall_s,
    }
    write_json(out / "run.json", info)
    return {"info": info, "rows": rows}


def _checkpoints(plan: Plan) -> dict:
    """model, draft and every decoder option naming a checkpoint folder (`dflash(draft=DIR)`, keyed
    `<label>.<option>`) -> {"path": portable form of the resolved path, "sha256": of its weights}."""
    spec = plan.spec
    out = {"model": checkpoint_record(spec.model)}
    if spec.draft is not None:
        out["draft"] = checkpoint_record(spec.draft)
    for d in plan.labels:
        for k, v in {**(plan.resolved.get(d) or {}), **plan.given[d]}.items():
            if is_path_value(v) and (Path(v) / "config.json").is_file():
                out[f"{d}.{k}"] = checkpoint_record(v)
    return out
