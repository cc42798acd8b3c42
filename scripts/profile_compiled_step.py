"""Where the time of a compiled CPU step goes (issue 14), printed as text:

    .venv/bin/python scripts/profile_compiled_step.py > results/latency/cpu/compiled-step-profile.txt

1. torch.profiler over 100 compiled 1-token steps of the shipped base at context 100 (inductor's
   kernel profiling on, so each generated kernel is a row next to the BLAS calls and dynamo's guard
   check, "TorchDynamo Cache Lookup");
2. the kv_len attention window against the whole static cache, paired in one process: the shipped
   TiDAR checkpoint at context 256, 1- and 32-token static steps, compiled with and without the
   window and eager, 8 interleaved rounds of 50 calls (median ms and the sorted rounds).
"""

import time

import torch
import torch._inductor.config as inductor_config

from tidar_bench.compiled import cpu_inductor_options
from tidar_bench.model import load_model
from tidar_bench.provenance import environment

inductor_config.cpp.enable_kernel_profile = True
OPTIONS = cpu_inductor_options(0)  # what tidar_bench.compiled.Steps uses on CPU for the embedded models


def per_call_ms(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


@torch.inference_mode()
def profile_one_token() -> None:
    from torch.profiler import ProfilerActivity, profile

    m = load_model("tidar_bench/embedded/base", "float32", "cpu").eval()
    cache = m.new_cache(300)
    m(torch.randint(0, 800, (1, 100), generator=torch.Generator().manual_seed(0)), cache=cache)
    tok, pos = torch.tensor([[5]]), torch.tensor([100])
    f = torch.compile(m.forward, fullgraph=True, dynamic=False, options=OPTIONS)
    for _ in range(30):
        f(tok, pos, cache=cache, start=pos, kv_len=128)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(100):
            f(tok, pos, cache=cache, start=pos, kv_len=128)
    print("## compiled 1-token step, embedded base, context 100 (100 calls)")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


@torch.inference_mode()
def window_ab() -> None:
    m = load_model("tidar_bench/embedded/tidar", "float32", "cpu").eval()
    g = torch.Generator().manual_seed(0)
    f = torch.compile(m.forward, fullgraph=True, dynamic=False, options=OPTIONS)
    print("## kv_len window vs whole static cache (512 slots), TiDAR checkpoint, context 256")
    for q in (1, 32):
        cache = m.new_cache(300)
        m(torch.randint(0, 800, (1, 256), generator=g), cache=cache)
        tok, pos, start = torch.randint(0, 800, (1, q), generator=g), torch.arange(256, 256 + q), torch.tensor(256)
        local = torch.tril(torch.ones(q, q, dtype=torch.bool))
        eager_mask = torch.cat([torch.ones(q, 256, dtype=torch.bool), local], 1)
        fns = {
            "compiled, whole cache": lambda: f(tok, pos, mask=local, cache=cache, start=start),
            "compiled, kv_len=384": lambda: f(tok, pos, mask=local, cache=cache, start=start, kv_len=384),
            "eager": lambda: (m(tok, pos, mask=eager_mask, cache=cache), cache.crop(256)),
        }
        for fn in fns.values():
            for _ in range(5):
                fn()
        res = {k: [] for k in fns}
        for _ in range(8):
            for k, fn in fns.items():
                res[k].append(per_call_ms(fn, 50))
        for k, v in res.items():
            v.sort()
            print(f"q={q:2d}  {k:22s} median {v[4]:.2f} ms  rounds {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    print("environment:", environment())
    print("command: .venv/bin/python scripts/profile_compiled_step.py\n")
    profile_one_token()
    window_ab()
