"""Reference equivalence: the formats' authors' own code builds a tiny random drafter in its own
format and saves it; our loader reads the saved directory; our draft logits equal theirs (max |Δ| <=
1e-5 in fp32, printed) and the decoders stay lossless (greedy == ar) with it.

- vLLM `speculators` (EAGLE-3, DFlash, DSpark): `Eagle3DraftModel` / `DFlashDraftModel` /
  `DSparkDraftModel.from_training_args` on our tiny Qwen3 target, `save_pretrained`. Their logits
  are their own forward's (a hook on EAGLE-3's lm_head; DFlash/DSpark's forward hands its logits
  to `compute_metrics`, which is intercepted), with the target features taken from HF's
  `hidden_states[k]` at their aux ids, so the one-off layer-id meaning is checked too.
- z-lab `dflash` (PyPI, the authors' package): `DFlashDraftModel(Qwen3Config)`, `save_pretrained`.

speculators and dflash are not in the dev extra: speculators pulls PyPI's torchvision, whose CUDA build
breaks `transformers` imports next to the CPU torch wheel (docs/checkpoints.md, "Reference checks"); install it
with `scripts/install_references.sh`. Each test skips with that reason when its package is absent.
`scripts/reference_equivalence.py` runs the same checks and stores the figures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.dflash import DFlashDecoder
from tidar_bench.baselines.dflash_drafter import load_dflash_drafter, target_context
from tidar_bench.baselines.eagle import EagleDecoder
from tidar_bench.baselines.eagle_head import load_eagle_head, target_features
from tidar_bench.decoding import GenerationConfig
from tidar_bench.model import load_model
from tidar_bench.testing import make_hf_model

TOL = 1e-5
SPEC_SKIP = "speculators not installed: run scripts/install_references.sh (README's test command)"


def _needs(name: str, reason: str):
    try:
        return __import__(name)
    except ImportError:
        pytest.skip(reason)


def _target(path: Path):
    hf = make_hf_model("qwen3", path, seed=2, num_hidden_layers=4)
    return hf, load_model(path, "float32", "cpu")


def _randomize(module: torch.nn.Module, seed: int, skip=("embed_tokens", "verifier_")) -> None:
    """Clearly non-trivial weights (HF's init is std 0.02): normal 0.08, norms 1 + 0.1 normal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            base = 1.0 if "norm" in name and p.dim() == 1 else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.1 if base else 0.08))


def _vocab_maps(V: int, Vd: int):
    keep = torch.arange(0, V, V // Vd)[:Vd]
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    return t2d, keep - torch.arange(Vd)


def _lossless(dec, model, prompts=((5, 6, 7), (1, 2, 3, 4, 9, 11, 13)), new: int = 12):
    ar = ARDecoder(model)
    for p in prompts:
        c = GenerationConfig(max_new_tokens=new)
        assert dec.generate(list(p), c).tokens == ar.generate(list(p), c).tokens, p


def _ids(T: int, V: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V - 2, (1, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- speculators EAGLE-3


def check_speculators_eagle3(tmp: Path, *, vocab: int | None = 48, norm_before_residual: bool = True) -> dict:
    from speculators.models.eagle3 import Eagle3DraftModel
    from transformers import AutoConfig

    hf, model = _target(tmp / "target")
    V, aux = hf.config.vocab_size, [1, 2, 3]
    lc = copy.deepcopy(AutoConfig.from_pretrained(tmp / "target"))
    lc.num_hidden_layers = 1
    t2d, d2t = _vocab_maps(V, vocab) if vocab else (None, None)
    ref = Eagle3DraftModel.from_training_args(
        lc, t2d=t2d, d2t=d2t, verifier_name_or_path=str(tmp / "target"), draft_vocab_size=vocab or V,
        norm_before_residual=norm_before_residual, ttt_steps=3, target_layer_ids=aux, draft_attn_impl="sdpa")
    _randomize(ref, seed=1)
    ref.float().eval().save_pretrained(tmp / "draft")

    head = load_eagle_head(tmp / "draft", model)
    T = 11
    ids = _ids(T, V)
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states  # HF hidden_states[k] = input of layer k
        feats_ref = torch.cat([hs[k] for k in aux], dim=-1)
        captured = []
        hook = ref.lm_head.register_forward_hook(lambda m, i, o: captured.append(o))
        ref(hidden_states=feats_ref, input_ids=ids, document_ids=torch.zeros_like(ids),
            position_ids=torch.arange(T)[None], ttt_steps=1)
        hook.remove()
        out = model(ids, hidden_layers=head.feature_layers(4))
        feats = target_features(model, out.hidden_states, "eagle3", head.feature_layers(4))
        _, ours = head(ids, target_feats=feats)
    delta = float((ours - captured[0].float()).abs().max())
    feat_delta = float((feats - feats_ref).abs().max())
    cfg = json.loads((tmp / "draft" / "config.json").read_text())
    _lossless(EagleDecoder(model, head, depth=3, top_k=2, total_tokens=6), model)
    _lossless(EagleDecoder(model, head, tree=False, chain_length=3), model)
    return {"format": head.config.format, "architectures": cfg.get("architectures"), "max_abs_logits": delta,
            "max_abs_features": feat_delta, "draft_vocab_size": vocab or V, "aux_ids": aux,
            "our_target_layers": list(head.feature_layers(4)), "norm_before_residual": norm_before_residual}


# ----------------------------------------------------------------------------- speculators DFlash / DSpark


def check_speculators_dflash(tmp: Path, kind: str = "dflash", *, vocab: int | None = 48, sliding: int | None = 3,
                             sample_from_anchor: bool | None = None, markov_rank: int = 8) -> dict:
    import speculators.models.dflash.core as dcore
    import speculators.models.dspark.core as score
    from transformers import AutoConfig

    hf, model = _target(tmp / "target")
    V, aux, B, P, T = hf.config.vocab_size, [2, 3], 4, 8, 16
    lc = copy.deepcopy(AutoConfig.from_pretrained(tmp / "target"))
    lc.num_hidden_layers = 2
    if sliding:
        lc.use_sliding_window, lc.sliding_window = True, sliding
        lc.layer_types = ["sliding_attention", "full_attention"]
    else:
        lc.layer_types = ["full_attention"] * 2
    t2d, d2t = _vocab_maps(V, vocab) if vocab else (None, None)
    kw = dict(t2d=t2d, d2t=d2t, verifier_name_or_path=str(tmp / "target"), draft_vocab_size=vocab or V, block_size=B,
              target_layer_ids=aux, mask_token_id=V - 2, draft_attn_impl="sdpa", sample_from_anchor=sample_from_anchor)
    if kind == "dspark":
        ref = score.DSparkDraftModel.from_training_args(lc, markov_rank=markov_rank, **kw)
    else:
        ref = dcore.DFlashDraftModel.from_training_args(lc, **kw)
    # a full-vocabulary lm_head is the verifier's (not saved, reloaded from the target): leave it so
    _randomize(ref, seed=1, skip=("embed_tokens", "verifier_") + (() if vocab else ("lm_head",)))
    if kind == "dspark":
        with torch.no_grad():  # a Markov bias of the size of the logits
            ref.markov_head.markov_w1.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    ref.float().eval().save_pretrained(tmp / "draft")
    drafter = load_dflash_drafter(tmp / "draft", model)

    ids = _ids(T, V)
    loss_mask = torch.zeros(1, T, dtype=torch.long)
    loss_mask[0, P] = 1  # one anchor: the block [ids[P], MASK x (B-1)] at positions P..P+B-1
    captured = []

    def capture(logits, *args, **kwargs):
        captured.append(logits)
        return torch.zeros(()), {}

    mod = score if kind == "dspark" else dcore
    real = mod.compute_metrics
    mod.compute_metrics = capture
    try:
        with torch.no_grad():
            hs = hf(ids, output_hidden_states=True).hidden_states
            ref(hidden_states=torch.cat([hs[k] for k in aux], -1), input_ids=ids, loss_mask=loss_mask,
                verifier_last_hidden_states=hs[-1], document_ids=torch.zeros_like(ids), max_anchors=1)
    finally:
        mod.compute_metrics = real
    theirs = captured[0][0].float()  # [B, Vd]

    with torch.no_grad():
        out = model(ids, hidden_layers=drafter.target_layer_ids)
        ctx = target_context(out.hidden_states, drafter.target_layer_ids)[:, :P]
        block = torch.tensor([int(ids[0, P])] + [drafter.mask_token_id] * (B - 1))
        states = drafter(model.model.embed_tokens(block)[None], ctx, torch.arange(P + B))
        ours = drafter.draft_logits(states[0], model)
        if drafter.markov_head is not None:  # teacher forcing, as in their forward: prev = the true tokens
            true = ids[0, P: P + B]
            prev = true if drafter.config.sample_from_anchor else torch.cat([true[:1], true[:-1]])
            ours = ours + drafter.markov_head(prev)
    delta = float((ours - theirs).abs().max())
    dec = DFlashDecoder(model, drafter)
    _lossless(dec, model)
    return {"format": drafter.config.format, "max_abs_logits": delta, "draft_vocab_size": vocab or V,
            "aux_ids": aux, "our_target_layers": drafter.target_layer_ids, "sliding_layers": drafter.config.sliding_layers,
            "sliding_window": drafter.config.sliding_window, "sample_from_anchor": drafter.config.sample_from_anchor,
            "markov_rank": drafter.config.markov_rank}


# ----------------------------------------------------------------------------- z-lab DFlash


def check_zlab_dflash(tmp: Path) -> dict:
    from dflash.model import DFlashDraftModel as Ref
    from transformers import Qwen3Config

    hf, model = _target(tmp / "target")
    c = hf.config
    cfg = Qwen3Config(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=2,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      head_dim=c.head_dim, vocab_size=c.vocab_size, rope_theta=1e6, max_position_embeddings=512,
                      layer_types=["full_attention"] * 2)
    cfg.num_target_layers, cfg.block_size = 4, 4
    cfg.dflash_config = {"mask_token_id": c.vocab_size - 2, "target_layer_ids": [0, 2]}
    cfg.architectures = ["DFlashDraftModel"]
    torch.manual_seed(0)
    ref = Ref(cfg)
    _randomize(ref, seed=1)
    ref.float().eval().save_pretrained(tmp / "draft")
    drafter = load_dflash_drafter(tmp / "draft", model)
    T, P, B = 14, 9, 4
    ids = _ids(T, c.vocab_size)
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states
        ctx_ref = torch.cat([hs[k + 1] for k in [0, 2]], -1)[:, :P]  # z-lab: hidden_states[id + 1]
        block = torch.tensor([int(ids[0, P])] + [drafter.mask_token_id] * (B - 1))
        emb = hf.model.embed_tokens(block)[None]
        r = ref(position_ids=torch.arange(P + B)[None], noise_embedding=emb, target_hidden=ctx_ref)
        theirs = ref.compute_logits(r, hf.lm_head).float()
        out = model(ids, hidden_layers=drafter.target_layer_ids)
        ctx = target_context(out.hidden_states, drafter.target_layer_ids)[:, :P]
        ours = drafter.draft_logits(drafter(emb, ctx, torch.arange(P + B))[0], model)
    delta = float((ours - theirs[0]).abs().max())
    _lossless(DFlashDecoder(model, drafter), model)
    return {"format": drafter.config.format, "max_abs_logits": delta, "target_layers": drafter.target_layer_ids}


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("vocab,nbr", [(48, True), (None, False)])
def test_speculators_eagle3_matches_reference(tmp_path, vocab, nbr):
    _needs("speculators", SPEC_SKIP)
    r = check_speculators_eagle3(tmp_path, vocab=vocab, norm_before_residual=nbr)
    print(f"\nspeculators eagle3 (Vd={r['draft_vocab_size']}, norm_before_residual={nbr}): "
          f"max |dlogits| {r['max_abs_logits']:.2e}, max |dfeatures| {r['max_abs_features']:.2e}")
    assert r["our_target_layers"] == [0, 1, 2] and r["max_abs_features"] <= TOL
    assert r["max_abs_logits"] <= TOL


@pytest.mark.parametrize("kind,kw", [("dflash", dict(vocab=48, sliding=3)), ("dflash", dict(vocab=None, sliding=None)),
                                     ("dspark", dict(vocab=None, sliding=3)),
                                     ("dspark", dict(vocab=48, sliding=None, sample_from_anchor=False))])
def test_speculators_dflash_dspark_match_reference(tmp_path, kind, kw):
    _needs("speculators", SPEC_SKIP)
    r = check_speculators_dflash(tmp_path, kind, **kw)
    print(f"\nspeculators {kind} {kw}: max |dlogits| {r['max_abs_logits']:.2e}")
    assert r["our_target_layers"] == [1, 2] and r["sample_from_anchor"] == kw.get("sample_from_anchor", kind == "dspark")
    assert r["max_abs_logits"] <= TOL


def test_zlab_dflash_matches_reference(tmp_path):
    _needs("dflash", "z-lab's dflash package is not installed (scripts/install_references.sh installs it)")
    r = check_zlab_dflash(tmp_path)
    print(f"\nz-lab dflash: max |dlogits| {r['max_abs_logits']:.2e}")
    assert r["format"] == "zlab-dflash" and r["max_abs_logits"] <= TOL
