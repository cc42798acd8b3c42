"""Run-folder bookkeeping: atomic writes, the per-sample decode cache (resume + sharding), and the
per decoder x task speed/quality summary.

A cache record is one decoded request, appended and flushed as soon as it is decoded (fsync'd every FSYNC_EVERY):

    {"key": hash(item, decoder, options, model, seed), "item": hash(prompt, gen_kwargs),
     "task", "doc_id", "prompt_hash", "output", "tokens", "new_tokens", "nfe", "accepted_lengths",
     "latency_s", "prefill_time_s", "finish_reason", "greedy", "lossless", "harness_s", ...}

and, decoded by `run --batch-size B` (B > 1), "batch_size", "batch_share_s" (the batched call's wall
time since the previous record of the call finished: the shares add up to the call's decode time),
"batch_wall_s" and "batch_tokens_per_s" (the whole call's; written when the call ends).

`item` does not depend on the decoder, so records of two decoders on the same item can be paired
(lossless decoders vs `ar`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from ..provenance import write_atomic


def stable_hash(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), hex."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_json(path: Path, obj) -> None:
    from lm_eval.utils import handle_non_serializable

    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (interrupted append) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


FSYNC_EVERY = 32  # a per-sample fsync costs ~1% of a tiny model's decode time; flush() already survives Ctrl-C


class SampleCache:
    """Decoded requests of one decoder: `cache/<decoder>/<task>.jsonl` (a sharded rank writes
    `<task>.rank<R>.jsonl`, merged by rank 0). Lookups read every file of the folder."""

    def __init__(self, folder: Path, suffix: str = ""):
        self.folder = Path(folder)
        self.suffix = suffix
        self._appended = 0
        self.records: dict[str, dict] = {}
        if self.folder.is_dir():
            for f in sorted(self.folder.glob("*.jsonl")):
                for r in read_jsonl(f):
                    self.records[r["key"]] = r

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def _path(self, task: str) -> Path:
        return self.folder / f"{_safe(task)}{self.suffix}.jsonl"

    def append(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(record["task"])
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()  # in the OS's hands now: a killed or interrupted process loses nothing written
            self._appended += 1
            if self._appended % FSYNC_EVERY == 0:  # bounds what a machine crash can lose
                os.fsync(f.fileno())
        self.records[record["key"]] = record

    def amend(self, records: list[dict]) -> None:
        """Replace records appended earlier (same keys) by these, e.g. with fields known only after
        them (a batched group's throughput): each file they are in is rewritten atomically."""
        by_path: dict[Path, dict[str, dict]] = {}
        for r in records:
            by_path.setdefault(self._path(r["task"]), {})[r["key"]] = r
            self.records[r["key"]] = r
        for path, new in by_path.items():
            if path.exists():
                write_jsonl(path, [new.get(r["key"], r) for r in read_jsonl(path)])

    @staticmethod
    def merge_shards(folder: Path) -> None:
        """Fold `<task>.rank<R>.jsonl` files into `<task>.jsonl` (deduplicated by key)."""
        folder = Path(folder)
        shards = sorted(folder.glob("*.rank*.jsonl"))
        by_task: dict[str, list[Path]] = {}
        for s in shards:
            by_task.setdefault(s.name.split(".rank")[0], []).append(s)
        for task, files in by_task.items():
            main = folder / f"{task}.jsonl"
            rows = {r["key"]: r for f in ([main] if main.exists() else []) + files for r in read_jsonl(f)}
            write_jsonl(main, rows.values())
            for f in files:
                f.unlink()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------- summary


def speed_stats(records: list[dict]) -> dict:
    """Totals over decoded requests: tokens/s = total new tokens / total decode wall time, and the
    three counting conventions (docs/speed.md, "Three counting conventions"): T/NFE = total tokens / total NFE
    (prefill forwards counted), mean accepted length = EAGLE's tau (tokens committed per decoding
    step, averaged over all steps), accept length = TiDAR's authors' (total tokens / decode forwards,
    prefill forwards excluded; records without `prefill_forwards` had one).
    Batched records (batch_size > 1): the decode wall time is that of the batched calls (the sum of
    the records' batch_share_s), so tokens/s is the throughput over the batch, not per sequence."""
    tokens = sum(r["new_tokens"] for r in records)
    batched = bool(records) and all("batch_share_s" in r for r in records)
    time_s = sum(r["batch_share_s"] if batched else r["latency_s"] for r in records)
    nfe = sum(r["nfe"] for r in records)
    steps = [a for r in records for a in r["accepted_lengths"]]
    decode_fwd = nfe - sum(r.get("prefill_forwards", 1) for r in records)
    return {
        "n": len(records),
        "new_tokens": tokens,
        "decode_s": time_s,
        "nfe": nfe,
        "tokens_per_s": tokens / time_s if time_s > 0 else 0.0,
        "tokens_per_nfe": tokens / nfe if nfe else 0.0,
        "mean_accepted_length": sum(steps) / len(steps) if steps else 0.0,
        "accept_length": tokens / decode_fwd if decode_fwd > 0 else 0.0,
        "harness_s": sum(r.get("harness_s", 0.0) for r in records),
        "compile_s": sum(r.get("compile_s", 0.0) for r in records),  # first uses of step shapes, not in decode_s
        "compiled": bool(records) and all(r.get("compiled", False) for r in records),
    }


def lossless_mismatches(records: list[dict], ar_records: list[dict]) -> int | None:
    """How many greedy outputs of a lossless decoder differ from `ar`'s on the same items
    (None when not applicable: decoder not lossless, or no greedy item decoded by both)."""
    ref = {r["item"]: r["tokens"] for r in ar_records if r["greedy"]}
    pairs = [(r, ref[r["item"]]) for r in records if r["greedy"] and r["item"] in ref]
    if not pairs or not all(r.get("lossless") for r, _ in pairs):
        return None
    return sum(r["tokens"] != tokens for r, tokens in pairs)


def lossy_mismatches(records: list[dict], ar_records: list[dict]) -> int | None:
    """The same count for a LOSSY decoder (the authors' TiDAR rules, beta < 1, ...): how many of its
    greedy-request outputs differ from `ar`'s. Reported, never a failure (None for lossless ones)."""
    ref = {r["item"]: r["tokens"] for r in ar_records if r["greedy"]}
    pairs = [(r, ref[r["item"]]) for r in records if r["greedy"] and r["item"] in ref]
    if not pairs or all(r.get("lossless") for r, _ in pairs):
        return None
    return sum(r["tokens"] != tokens for r, tokens in pairs)


SUMMARY_COLUMNS = ("task", "decoder", "metric", "filter", "score", "stderr", "tokens_per_s", "tokens_per_nfe",
                   "mean_accepted_length", "speedup_vs_ar", "ar_tokens_per_s", "compiled", "ar_compiled", "n",
                   "mismatches_vs_ar", "batch_size", "accept_length", "lossy_mismatches_vs_ar", "reference",
                   "lossless_check")


def _lossless(records: list[dict]) -> bool:
    return bool(records) and all(r.get("lossless") for r in records)


def lossless_check(decoder: str, reference: str, records: list[dict], ref_records: list[dict],
                   alone: bool) -> tuple[int | None, int | None, str]:
    """(lossless mismatches, lossy mismatches, status) of one decoder against the run's reference
    (the first setting); status as `speed.lossless_status`."""
    from ..speed import lossless_status

    status = lossless_status(decoder, reference, _lossless(records), _lossless(ref_records), alone)
    if status == "lossy":
        return None, lossy_mismatches(records, ref_records), status
    if status != "checked":
        return None, None, status
    m = lossless_mismatches(records, ref_records)
    return (m, None, status) if m is not None else (None, None, "unchecked: no greedy item in common")


def summary_rows(results: dict[str, dict], records: dict[str, dict[str, list[dict]]], decoders: list[str],
                 batch_size: int = 1) -> list[dict]:
    """One row per task x decoder x metric x filter (`metric` is lm-eval's `metric,filter` key,
    `filter` its filter name: gsm8k has strict-match and flexible-extract). `results[decoder]` is lm-eval's result dict,
    `records[decoder][task]` the decoded requests of that task (groups: of their subtasks). At
    batch_size > 1 tokens/s (and so the speedup over the reference at the same batch size) is over the batch.

    The reference is the first decoder setting (`ar` in the shipped runs): the `*_vs_ar` and `ar_*`
    columns are against it, and the `reference` column names it."""
    rows = []
    reference = decoders[0]
    for dec in decoders:
        res = results[dec]
        for task, metrics in res["results"].items():
            subtasks = res.get("group_subtasks", {}).get(task) or [task]
            recs = [r for t in subtasks for r in records[dec].get(t, [])]
            sp = speed_stats(recs)
            ref = [r for t in subtasks for r in records.get(reference, {}).get(t, [])]
            ref_sp = speed_stats(ref) if ref else None
            ref_tps = ref_sp["tokens_per_s"] if ref else 0.0
            mism, lossy, status = lossless_check(dec, reference, recs, ref, len(decoders) == 1)
            for key, score in metrics.items():
                if "," not in key or "_stderr," in key or not isinstance(score, (int, float)):
                    continue
                metric, flt = key.split(",", 1)
                stderr = metrics.get(f"{metric}_stderr,{flt}")
                rows.append({
                    "task": task, "decoder": dec, "metric": key, "filter": flt, "score": score,
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "tokens_per_s": sp["tokens_per_s"], "tokens_per_nfe": sp["tokens_per_nfe"],
                    "mean_accepted_length": sp["mean_accepted_length"],
                    "speedup_vs_ar": sp["tokens_per_s"] / ref_tps if ref_tps > 0 else None,
                    # every speedup comes with its baseline's own tokens/s and compile mode
                    "ar_tokens_per_s": ref_tps if ref else None, "compiled": sp["compiled"],
                    "ar_compiled": ref_sp["compiled"] if ref else None,
                    "n": sp["n"], "mismatches_vs_ar": mism, "batch_size": batch_size,
                    "accept_length": sp["accept_length"], "lossy_mismatches_vs_ar": lossy,
                    "reference": reference, "lossless_check": status,
                })
    return rows


def write_csv(path: Path, rows: list[dict], columns=SUMMARY_COLUMNS) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    write_atomic(path, buf.getvalue())
