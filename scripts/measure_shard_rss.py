"""Peak RSS of a training run: token shards (`tidar-bench tokenize` format, streamed) against the
in-memory path (`--data file.jsonl`: read, tokenize, pack in memory), as in issue 24.

Each measurement is a fresh process (`--child`) that builds the data set and runs a few optimiser
steps of a tiny AR model through the one training loop, then reports its peak RSS (ru_maxrss) and
its RSS after imports (the floor every run pays). The data are synthetic and say so:
- shards: a ~1 GiB token file (2^28 uint32 ids, documents of 1000 tokens) written straight in the
  shard format (ids + flags + index.json), i.e. what `tokenize` writes for such a corpus;
- in-memory: JSONL documents of space-separated integers and a tokenizer that splits them (so the
  cost is the in-memory path's, not a BPE's), at 2^21..2^23 tokens: its memory grows linearly, and
  the slope is extrapolated to 2^28 tokens (measuring it there would need ~10+ GiB on this shared
  machine); the shards are measured at the same small sizes too (paired).

Usage: python scripts/measure_shard_rss.py --out results/training/shard_rss.json
Peak RSS is VmHWM of the child (see `_status`); the in-memory line is fitted to the absolute peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOC = 1000


class IntTok:
    """'12 7 3' -> [12, 7, 3]; EOS 0."""

    eos_token_id = 0

    def __len__(self):
        return 1024

    def encode(self, t, add_special_tokens=False):
        return [int(x) for x in t.split()]


def _status(key: str) -> float:
    """A /proc/self/status figure in MiB. VmHWM (peak RSS) belongs to this process's memory map and
    starts afresh at exec, unlike ru_maxrss, which Linux carries over from the parent that forked
    us (the first version of this script reported the parent's ~2.9 GiB shard writing as the child's)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def rss_mib() -> float:
    return _status("VmHWM")


def write_shard_dir(path: Path, n_tokens: int, shard_tokens: int = 1 << 27) -> None:
    import numpy as np

    from tidar_bench.training.data import DOC_START, LOSS
    from tidar_bench.training.shards import FORMAT, INDEX

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for i, a in enumerate(range(0, n_tokens, shard_tokens)):
        n = min(shard_tokens, n_tokens - a)
        with open(path / f"shard-{i:05d}.ids", "wb") as fi, open(path / f"shard-{i:05d}.flags", "wb") as ff:
            for c in range(a, a + n, 1 << 22):  # in chunks: the writer's own memory stays small
                m = min(1 << 22, a + n - c)
                at = np.arange(c, c + m) % DOC
                ids = rng.integers(1, 1024, m, dtype=np.uint32)
                ids[at == DOC - 1] = 0  # EOS ends each document
                flags = np.full(m, LOSS, np.uint8)
                flags[at == 0] |= DOC_START
                fi.write(ids.astype("<u4").tobytes())
                ff.write(flags.tobytes())
        shards.append({"name": f"shard-{i:05d}", "tokens": n})
    (path / INDEX).write_text(json.dumps({"format": FORMAT, "tokens": n_tokens, "documents": -(-n_tokens // DOC),
                                          "eos_token_id": 0, "vocab_size": 1024, "shards": shards,
                                          "loss_on": "all", "synthetic": True}))


def write_jsonl(path: Path, n_tokens: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n_tokens // DOC):
            f.write(json.dumps({"text": " ".join(map(str, rng.integers(1, 1024, DOC - 1)))}) + "\n")


def child(kind: str, data: str, steps: int) -> dict:
    import torch

    from tidar_bench.model import ModelConfig, Transformer, init_weights
    from tidar_bench.training.ar import AutoregressiveObjective
    from tidar_bench.training.data import PackedDataset, read_texts
    from tidar_bench.training.loop import TrainConfig, train
    from tidar_bench.training.shards import ShardDataset

    torch.set_num_threads(1)
    floor = _status("VmRSS")
    t0 = time.perf_counter()
    tok = IntTok()
    ds = ShardDataset(data, tok, 256) if kind == "shards" else PackedDataset(read_texts([data]), tok, 256)
    built = time.perf_counter() - t0
    cfg = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}
    model = init_weights(Transformer(ModelConfig.from_dict(cfg)), std=0.05)
    with tempfile.TemporaryDirectory() as out:
        train(AutoregressiveObjective(model), ds, out, TrainConfig(seq_len=256, batch_size=8, steps=steps, warmup_steps=0,
                                                                   progress=False, log_every=steps))
    return {"kind": kind, "tokens": ds.n_tokens, "rss_after_imports_mib": floor, "peak_rss_mib": rss_mib(),
            "data_build_s": built, "steps": steps}


def measure(kind: str, data: Path, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", kind, str(data), "--steps", str(steps)], env=env,
                       capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["peak_minus_imports_mib"] = r["peak_rss_mib"] - r["rss_after_imports_mib"]
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="results/training/shard_rss.json")
    ap.add_argument("--big-log2", type=int, default=28)
    ap.add_argument("--summarize", help="recompute the summary of a stored result file in place")
    a = ap.parse_args()
    if a.summarize:
        r = summarize(json.loads(Path(a.summarize).read_text()))
        Path(a.summarize).write_text(json.dumps(r, indent=1))
        print(json.dumps({k: v for k, v in r.items() if k != "runs"}, indent=1))
        return
    if a.child:
        print(json.dumps(child(*a.child, a.steps)))
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("RSS_TMP")) as tmp:
        tmp = Path(tmp)
        for lg in (21, 22, 23):
            n = 1 << lg
            write_jsonl(tmp / f"d{lg}.jsonl", n)
            write_shard_dir(tmp / f"s{lg}", (n // DOC) * DOC)
            rows.append(measure("in-memory", tmp / f"d{lg}.jsonl", a.steps))
            rows.append(measure("shards", tmp / f"s{lg}", a.steps))
            (tmp / f"d{lg}.jsonl").unlink()
        big = 1 << a.big_log2
        write_shard_dir(tmp / "big", big)
        size = sum(f.stat().st_size for f in (tmp / "big").glob("*.ids"))
        rows.append({**measure("shards", tmp / "big", a.steps), "ids_file_bytes": size})
    result = {
        "command": "python scripts/measure_shard_rss.py --out " + a.out,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared by 5 engineers), {platform.platform()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seed": 0, "compile": "eager", "threads": 1,
        "data": "synthetic: random ids in [1, 1024), documents of 1000 tokens (shards written directly in the "
                "tokenize format; JSONL of space-separated integers through a splitting tokenizer)",
        "runs": rows,
        "big_tokens": big,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summarize(result), indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


def summarize(result: dict) -> dict:
    """The in-memory path's peak RSS as a least-squares line in tokens over its runs (absolute peaks:
    the RSS after imports varies between processes on this machine), extrapolated to big_tokens, and
    the shard runs' peaks. `--summarize FILE` recomputes this from a stored result."""
    import numpy as np

    result = {k: v for k, v in result.items() if k not in ("in_memory_bytes_per_token",
                                                           "in_memory_extrapolated_peak_mib_at_big")}  # the first summary's
    mem = [r for r in result["runs"] if r["kind"] == "in-memory"]
    slope, icpt = np.polyfit([r["tokens"] for r in mem], [r["peak_rss_mib"] for r in mem], 1)
    big = result["big_tokens"]
    shards = [r for r in result["runs"] if r["kind"] == "shards"]
    return {**result, "in_memory_peak_rss_bytes_per_token": slope * 2**20,
            "in_memory_peak_rss_mib_extrapolated_to_big": icpt + slope * big,
            "shards_peak_rss_mib_at_big": max(r["peak_rss_mib"] for r in shards if r["tokens"] == big),
            "shards_peak_rss_mib_range": [min(r["peak_rss_mib"] for r in shards), max(r["peak_rss_mib"] for r in shards)]}


if __name__ == "__main__":
    main()
