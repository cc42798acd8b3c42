"""Check `bd` on SDAR checkpoints against SDAR's own code (JetAstra/SDAR on GitHub; not on PyPI).

    pip install --target /tmp/tf452 --no-deps transformers==4.52.4 "huggingface_hub<1.0" "tokenizers<0.22"
    pip install einops
    PYTHONPATH=/tmp/tf452 python scripts/reference/sdar_check.py SDAR_CHECKOUT [--commit SHA] [--out FILE]

SDAR_CHECKOUT is a checkout of https://github.com/JetAstra/SDAR (its `generate.py` and
`training/model/SDAR-4B-Chat/{configuration,modeling}_sdar.py` are used as they are; nothing of
them is copied here). Their modeling needs `einops` and the transformers SDAR names (4.52.4: it
imports modules transformers 5 removed), hence the PYTHONPATH above; our code runs unchanged on it.
Default output: results/reference/sdar.txt. In a scratch directory the script
1. builds a tiny random `SDARForCausalLM` with their classes and saves it with their
   `save_pretrained` (the replica "as the authors' library saves it");
2. loads it with our loader and compares logits (fp32): a full-sequence forward under the
   block-causal mask, and a denoising step over their KV cache (prefill with `store_kv=True`, the
   block with `store_kv=False`), against ours;
3. runs their `block_diffusion_generate` and our `bd` on the same prompts, per remasking rule,
   block size and steps, greedy and sampled, and compares the tokens and the forwards (NFE) with
   our merged commits and with `separate_commit=true`.

What is not theirs, on purpose:
- `flash_attn` (a CUDA package their modeling imports unconditionally) is replaced by a module with
  the documented semantics of the two functions used at inference: `rms_norm_fn` (RMSNorm in
  fp32: their own commented-out reference code) and `flash_attn_func` (non-causal attention with
  GQA, here torch SDPA). `fused_linear_diffusion_cross_entropy` (a Triton training loss) is a stub
  that raises when called: inference never calls it.
- Their generate has no greedy mode (it divides logits by the temperature and samples), so the
  greedy runs replace its `sample_with_temperature_topk_topp` with argmax + the softmax probability
  of the argmax, the confidence our decoder uses. Sampled runs keep their function.
- Both are given logits with the mask token's column at -inf (our rule: the mask token is never an
  output; theirs would leave such a position masked). Everything else -- the block loop, prefill,
  masks, KV store, step counts and remasking rules -- is theirs.

Their rules with `steps < block_size` can pick positions that are already final (confidence -inf)
when a step's count exceeds the masked positions left, and overwrite them with the current
prediction; ours never rewrites a final token. The script counts these rewrites in their runs (a
non-mask token of the block that changes between two of their forwards) and reports them beside
any token mismatch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tidar_bench.decoding import GenerationConfig, SamplingParams  # noqa: E402
from tidar_bench.masks import block_causal, block_diffusion_step  # noqa: E402
from tidar_bench.registry import DecoderContext, build_decoder  # noqa: E402

V, MASK, BLOCK = 128, 126, 4
MODEL_DIR = "training/model/SDAR-4B-Chat"
GEN = 24


# ----------------------------------------------------------------------------- their code, importable


def _flash_attn_stub() -> None:
    """flash_attn's two inference functions, by their documented semantics."""

    def rms_norm_fn(x, weight, bias=None, eps=1e-6, **_):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        y = y.to(x.dtype) * weight
        return y + bias if bias is not None else y

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        # q [b, l, h, d], k/v [b, s, hk, d]; query head i reads kv head i // (h // hk)
        rep = q.shape[2] // k.shape[2]
        k, v = (t.repeat_interleave(rep, dim=2).transpose(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    def unavailable(*a, **k):
        raise NotImplementedError("not needed at inference")

    mods = {n: types.ModuleType(n) for n in ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton",
                                                 "flash_attn.ops.triton.layer_norm", "flash_attn.bert_padding")}
    mods["flash_attn.ops.triton.layer_norm"].rms_norm_fn = rms_norm_fn
    mods["flash_attn"].flash_attn_func = flash_attn_func
    mods["flash_attn"].flash_attn_varlen_func = unavailable
    for name in ("index_first_axis", "pad_input", "unpad_input"):
        setattr(mods["flash_attn.bert_padding"], name, unavailable)
    sys.modules.update(mods)


def import_theirs(checkout: Path, scratch: Path):
    """Their modeling package (linked from the checkout, not copied) and their generate.py."""
    for m in ("transformers.activations", "transformers.modeling_utils", "transformers.generation",
              "transformers.modeling_flash_attention_utils", "transformers.cache_utils"):
        importlib.import_module(m)  # before the stub: transformers probes for a real flash_attn
    _flash_attn_stub()
    pkg = scratch / "sdar_ref"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in ("configuration_sdar.py", "modeling_sdar.py"):
        (pkg / f).symlink_to((checkout / MODEL_DIR / f).resolve())
    (pkg / "fused_linear_diffusion_cross_entropy.py").write_text(
        "class FusedLinearDiffusionCrossEntropyLoss:\n"
        "    def __init__(self, *a, **k):\n"
        "        raise NotImplementedError('training-only loss (Triton), stubbed by sdar_check.py')\n")
    sys.path.insert(0, str(scratch))
    modeling = importlib.import_module("sdar_ref.modeling_sdar")
    config = importlib.import_module("sdar_ref.configuration_sdar")
    spec = importlib.util.spec_from_file_location("sdar_generate", checkout / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return config.SDARConfig, modeling.SDARForCausalLM, generate


def build_replica(SDARConfig, SDARForCausalLM, out: Path):
    torch.manual_seed(0)
    cfg = SDARConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                     max_position_embeddings=512, tie_word_embeddings=False, block_size=BLOCK,
                     mask_token_id=MASK, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                     fuse_cross_entropy=True, sliding_window=None, use_sliding_window=False)  # as SDAR-4B-Chat's config
    model = SDARForCausalLM(cfg).float().eval()
    with torch.no_grad():  # peaked distributions, so that confidence thresholds are crossed
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.5 if name == "lm_head.weight" else 0.08)
    model.save_pretrained(str(out), safe_serialization=True)
    return model


# ----------------------------------------------------------------------------- runs


class Recorder:
    """Counts their forwards and the final tokens they rewrite (see the module docstring)."""

    def __init__(self, model):
        self.calls, self.rewrites, self.last = 0, 0, {}
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        ids = (args[0] if args else kwargs["input_ids"])[0]
        start = int(kwargs["position_ids"][0, 0])
        prev = self.last.get(start)
        if prev is not None and prev.shape == ids.shape:
            final = prev != MASK
            self.rewrites += int((ids[final] != prev[final]).sum())
        self.last[start] = ids.clone()


def their_generate(gen_mod, model, rec, prompt, n_new, rule, B, steps, thr, sampling):
    mask_col = torch.zeros(V, dtype=torch.bool)
    mask_col[MASK] = True
    orig = gen_mod._orig_sample

    def greedy(logits, temperature=1.0, top_k=0, top_p=1.0):
        p = logits.float().masked_fill(mask_col, float("-inf")).softmax(-1)
        tok = p.argmax(-1)
        return tok, p.gather(-1, tok[..., None]).squeeze(-1)

    def sampled(logits, **kw):
        return orig(logits.masked_fill(mask_col, float("-inf")), **kw)

    gen_mod.sample_with_temperature_topk_topp = sampled if sampling else greedy
    kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p) if sampling else {}
    if sampling:
        torch.manual_seed(sampling.seed)
    rec.calls, rec.rewrites, rec.last = 0, 0, {}
    x = gen_mod.block_diffusion_generate(model, {"input_ids": torch.tensor([prompt])}, MASK, gen_length=n_new,
                                         block_length=B, denoising_steps=steps, remasking_strategy=rule,
                                         confidence_threshold=thr, **kw)
    return x[0, len(prompt): len(prompt) + n_new].tolist(), rec.calls, rec.rewrites


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--commit", help="the checkout's commit (default: git rev-parse HEAD in it)")
    ap.add_argument("--out", type=Path, default=ROOT / "results/reference/sdar.txt")
    a = ap.parse_args()
    commit = a.commit or subprocess.run(["git", "-C", str(a.checkout), "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
    torch.set_num_threads(1)
    import transformers

    lines = [f"# SDAR reference check: tidar-bench `bd` against JetAstra/SDAR @ {commit}",
             f"command: PYTHONPATH=<transformers 4.52.4> python scripts/reference/sdar_check.py SDAR_CHECKOUT --commit {commit}",
             f"their files: generate.py, {MODEL_DIR}/modeling_sdar.py, configuration_sdar.py",
             f"machine: {platform.machine()} {platform.system()}, CPU, fp32; torch {torch.__version__}, "
             f"transformers {transformers.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "shims: flash_attn (rms_norm_fn, flash_attn_func: documented semantics, torch code), training loss stub; "
             "greedy runs: argmax in place of their sampler; mask column -inf in both (see the script's docstring)",
             f"replica: SDARForCausalLM saved by their save_pretrained: vocab {V}, hidden 64, 3 layers, 4 heads / 2 kv, "
             f"head_dim 32, block_size {BLOCK}, mask_token_id {MASK}, seed 0", ""]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sdar_check_") as tmp:
        scratch = Path(tmp)
        SDARConfig, SDARForCausalLM, gen_mod = import_theirs(a.checkout, scratch)
        gen_mod._orig_sample = gen_mod.sample_with_temperature_topk_topp
        ckpt = scratch / "replica"
        theirs = build_replica(SDARConfig, SDARForCausalLM, ckpt)
        saved = json.loads((ckpt / "config.json").read_text())
        lines.append(f"saved config: model_type {saved['model_type']!r}, architectures {saved['architectures']}, "
                     f"block_size {saved['block_size']}, mask_token_id {saved['mask_token_id']}; files "
                     f"{sorted(p.name for p in ckpt.iterdir())}")
        ctx = DecoderContext(ckpt, device="cpu", dtype="float32")
        ours = ctx.model

        # logits
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, MASK, (1, 14), generator=g)
        ids[0, 9:12] = MASK
        T = ids.shape[1]
        with torch.no_grad():
            a_ = theirs(ids, attention_mask=block_causal(T, BLOCK)[None], position_ids=torch.arange(T)[None],
                        use_cache=False).logits
            b_ = ours(ids, mask=block_causal(T, BLOCK)).logits
            d_full = float((a_ - b_).abs().max())
            from transformers.cache_utils import DynamicCache

            P = 8
            cache = DynamicCache()
            theirs(ids[:, :P], attention_mask=block_causal(P, BLOCK)[None], position_ids=torch.arange(P)[None],
                   past_key_values=cache, use_cache=True, store_kv=True)
            blk = ids[:, P:P + BLOCK]
            a2 = theirs(blk, attention_mask=torch.ones(1, BLOCK, P + BLOCK), position_ids=torch.arange(P, P + BLOCK)[None],
                        past_key_values=cache, use_cache=True, store_kv=False).logits
            oc = ours.new_cache(P + BLOCK)
            ours(ids[:, :P], mask=block_causal(P, BLOCK), cache=oc)
            b2 = ours(blk, mask=block_diffusion_step(P, BLOCK, BLOCK), cache=oc).logits
            d_step = float((a2 - b2).abs().max())
        ok = d_full <= 1e-5 and d_step <= 1e-5
        print(f"logits max |delta|: {d_full:.2e} (full), {d_step:.2e} (cached step)", flush=True)
        failures += not ok
        lines += ["", "## logits (fp32, max |delta|, bound 1e-5)",
                  f"full sequence of {T} (3 masks) under the block-causal mask: {d_full:.2e}",
                  f"denoising step: {BLOCK} tokens over their DynamicCache of {P} (store_kv) vs our KV cache: {d_step:.2e}",
                  f"-> {'PASS' if ok else 'FAIL'}", ""]

        # generation
        prompts = [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (1, 3, 4, 6, 9, 13)]
        greedy = None
        runs = [("low_confidence_dynamic", 4, 4, 0.9, greedy), ("low_confidence_dynamic", 4, 4, 0.5, greedy),
                ("low_confidence_static", 4, 4, 0.9, greedy), ("sequential", 4, 4, 0.9, greedy),
                ("low_confidence_dynamic", 8, 8, 0.85, greedy), ("low_confidence_static", 8, 4, 0.9, greedy),
                ("low_confidence_dynamic", 4, 2, 0.5, greedy), ("low_confidence_dynamic", 8, 3, 0.5, greedy)]
        runs += [("low_confidence_dynamic", 4, 4, 0.9, SamplingParams(temperature=1.0, seed=s)) for s in (0, 1)]
        runs += [("low_confidence_static", 4, 4, 0.9, SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=2))]
        rec = Recorder(theirs)
        lines += [f"## generation: {len(prompts)} prompts (lengths {[len(p) for p in prompts]}), {GEN} new tokens or "
                  "a few more, so that prompt + new tokens is a multiple of 8 (no block is cut by the length limit)",
                  "NFE: their forwards | ours (merged commits) | ours (separate_commit=true); theirs = ours separate + "
                  "the commit forward of the last block, which they run and we skip (decoding has ended)",
                  "multi: our forwards that finalised more than one token (separate_commit, so steps = B means the "
                  "threshold was crossed)", ""]
        for rule, B, steps, thr, sp in runs:
            opts = {"block_size": B, "steps": steps, "remasking": rule, "threshold": thr}
            merged = build_decoder("bd", ctx, opts)
            sep = build_decoder("bd", ctx, {**opts, "separate_commit": True})
            equal = explained = bad = multi = 0
            nfe = [0, 0, 0]
            for p in prompts:
                n_new = GEN + (-(len(p) + GEN)) % 8  # prompt + new tokens fill whole blocks (see NFE above)
                cfg = GenerationConfig(max_new_tokens=n_new, sampling=sp or SamplingParams())
                t_tok, t_nfe, t_rw = their_generate(gen_mod, theirs, rec, p, n_new, rule, B, steps, thr, sp)
                gs, gm = sep.generate(p, cfg), merged.generate(p, cfg)
                nfe[0] += t_nfe
                nfe[1] += gm.stats.nfe
                nfe[2] += gs.stats.nfe
                multi += sum(x > 1 for x in gs.stats.accepted_lengths)
                if gs.tokens == t_tok == gm.tokens and t_nfe == gs.stats.nfe + 1:
                    equal += 1
                elif gs.tokens == gm.tokens and t_rw > 0:  # their rule rewrote a final token in this run
                    explained += 1
                else:
                    bad += 1
            failures += bad
            name = f"{rule} B={B} steps={steps} thr={thr} " + (
                f"sampled(T={sp.temperature},top_k={sp.top_k},top_p={sp.top_p},seed={sp.seed})" if sp else "greedy")
            verdict = "PASS" if equal == len(prompts) else "FAIL" if bad else "DIFFERS only where their rule rewrote final tokens"
            print(name, equal, explained, bad, nfe, multi, flush=True)
            lines.append(f"{name}: equal tokens and NFE relation {equal}/{len(prompts)}, differ after a rewrite of "
                         f"theirs {explained}, unexplained {bad}; NFE {nfe[0]} | {nfe[1]} | {nfe[2]}; multi {multi} "
                         f"-> {verdict}")
    lines += ["", f"failures: {failures}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = a.out.with_suffix(".tmp")
    tmp_out.write_text(text)
    tmp_out.replace(a.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
