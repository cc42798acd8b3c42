"""Memory of the TiDAR training mask at 8K context (a 16,384-token doubled row): dense boolean n x n
against the FlexAttention block mask built from the document and block structure
(`masks.block_mask`), computed and measured on CPU, as in issue 24.

Computed: dense = (2S)^2 bytes per row; block = the BlockMask's tile tables (int32 counts and
indices of partial and full tiles, by rows and by columns). Measured: each mask built in a fresh
process (`--child`), with and without documents (doc attention, documents of ~1000 tokens): the
tensors' bytes and the process's peak RSS above its RSS before the build (the dense path's
temporaries included). Usage: python scripts/measure_mask_memory.py --out results/training/mask_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

S, K = 8192, 16  # 8K context, TiDAR block 16


def _tensors(bm) -> list:
    import torch

    return [t for t in vars(bm).values() if isinstance(t, torch.Tensor)] + \
        [t for v in vars(bm).values() if isinstance(v, tuple) for t in v if isinstance(t, torch.Tensor)]


def child(kind: str, docs: bool) -> dict:
    import torch

    from tidar_bench import masks

    torch.set_num_threads(1)
    doc = (torch.arange(S) // 1000)[None] if docs else torch.zeros(1, S, dtype=torch.long)
    pos = masks.doc_positions(doc)
    mod = masks.tidar_mod(doc, pos, K)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if kind == "dense":
        m = masks.dense(mod, 1, 2 * S, 2 * S)
        nbytes = m.numel() * m.element_size()
        extra = {"attended_fraction": float(m.float().mean())}
    else:
        m = masks.block_mask(mod, 1, 2 * S, 2 * S)
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(m))
        kv = m.kv_num_blocks.sum().item() + m.full_kv_num_blocks.sum().item()
        extra = {"tiles": (2 * S // 128) ** 2, "partial_tiles": int(m.kv_num_blocks.sum()),
                 "full_tiles": int(m.full_kv_num_blocks.sum()), "computed_tiles_fraction": kv / (2 * S // 128) ** 2}
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "documents": docs, "mask_bytes": nbytes, "mask_mib": nbytes / 2**20,
            "peak_rss_above_start_mib": peak - before, "build_s": dt, **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--out", default="results/training/mask_memory.json")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1] == "docs")))
        return
    import torch

    runs = []
    for docs in ("nodocs", "docs"):
        for kind in ("dense", "block"):
            p = subprocess.run([sys.executable, __file__, "--child", kind, docs], capture_output=True, text=True,
                               check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    n, t = 2 * S, 2 * S // 128
    computed = {"dense_bytes_per_row": n * n,
                "block_bytes_per_row": 4 * (2 * t * t + 2 * t) * 2,  # int32 counts + indices, partial + full, kv + q
                "dense_mib_per_row": n * n / 2**20}
    computed["block_mib_per_row"] = computed["block_bytes_per_row"] / 2**20
    result = {"command": "python scripts/measure_mask_memory.py --out " + a.out,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared by 5 engineers), {platform.platform()}",
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "seq_len": S, "doubled_row": n, "block_size": K, "tile": 128, "compile": "eager", "seed": "none (deterministic)",
              "computed": computed, "measured": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(computed, indent=1))


if __name__ == "__main__":
    main()
