"""GPU checks (skipped without CUDA; `scripts/gpu_check.sh` runs them on a lent GPU):
bf16 parity of the model core with transformers, and lossless decoders on CUDA, eager and
compiled (CUDA graphs)."""

import pytest
import torch

from tidar_bench.baselines.ar import ARDecoder
from tidar_bench.baselines.eagle import EagleDecoder
from tidar_bench.baselines.eagle_head import EagleHead
from tidar_bench.decoding import GenerationConfig
from tidar_bench.model import load_model
from tidar_bench.testing import FAMILIES, make_hf_model
from tidar_bench.tidar import TidarDecoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 96
MASK = VOCAB - 2


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_match_transformers(family, tmp_path):
    hf = make_hf_model(family, tmp_path, vocab_size=VOCAB).to("cuda", torch.bfloat16)
    ours = load_model(tmp_path, "bfloat16", "cuda")
    ids = torch.randint(0, VOCAB, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        want = hf(ids).logits.float()
        got = ours(ids).logits
    # bf16 rounding differs between the two implementations' op orders: compare the distributions
    assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("compile", ["off", "on"])
def test_lossless_decoders_on_cuda(tmp_path, compile):
    make_hf_model("llama", tmp_path, vocab_size=VOCAB)
    model = load_model(tmp_path, "float32", "cuda")
    cfg = GenerationConfig(max_new_tokens=24)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (7, 19, 33)]
    ar = ARDecoder(model, compile="off")
    decs = [ARDecoder(model, compile=compile),
            TidarDecoder(model, mask_token_id=MASK, block_size=4, compile=compile),
            EagleDecoder(model, EagleHead.from_target(model, "eagle3"), depth=3, top_k=2, total_tokens=6,
                         compile=compile)]
    for p in prompts:
        want = ar.generate(p, cfg).tokens
        for d in decs:
            assert d.generate(p, cfg).tokens == want, (d.name, compile)
