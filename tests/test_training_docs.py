"""Training the released way: document attention in packed rows (each document trained exactly as if
alone), prompt-masked SFT (--loss-on completion), mask predicates equal to the dense training masks
and their FlexAttention block masks, extending a finished run."""

import json

import pytest
import torch

from test_training import base  # noqa: F401  (the tiny AR base checkpoint fixture)
from tidar_bench import masks
from tidar_bench.cli import main
from tidar_bench.model import load_model
from tidar_bench.training.data import Batch, PackedDataset, read_texts
from tidar_bench.training.loop import TrainConfig, train


def _tok(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base / "ckpt"))


def _packed(base, tok, S=40, rows=2):
    """Rows of short documents (the corpus' texts cut to 10..38 characters) packed with document
    numbers: several documents per row, some cut by the row ends."""
    docs = [t[: 10 + 7 * (i % 5)] for i, t in enumerate(read_texts([base / "train.jsonl"])[:40])]
    data = PackedDataset(docs, tok, S, seed=0, doc_attention=True)
    batch = data.rows(torch.arange(rows))
    assert all(len(d.unique()) >= 2 for d in batch.doc), "the fixture must pack several documents per row"
    return batch


def _segments(batch: Batch):
    """(row, start, end) of every document piece in the batch."""
    out = []
    for r, d in enumerate(batch.doc):
        for v in d.unique():
            idx = (d == v).nonzero().flatten()
            out.append((r, int(idx[0]), int(idx[-1]) + 1))
    return out


def test_mask_predicates_equal_the_training_masks():
    """Without documents the predicates are exactly the existing masks; with documents a token
    never sees another document and each document's rows equal the mask of that document alone."""
    S, k = 11, 4
    zero = torch.zeros(1, S, dtype=torch.long)
    pos = masks.doc_positions(zero)
    assert torch.equal(masks.dense(masks.ar_mod(zero), 1, S, S)[0, 0], masks.causal(S))
    assert torch.equal(masks.dense(masks.tidar_mod(zero, pos, k), 1, 2 * S, 2 * S)[0, 0], masks.tidar_training(S, k))
    assert torch.equal(masks.dense(masks.block_diffusion_mod(zero, pos, k), 1, 2 * S, 2 * S)[0, 0],
                       masks.block_diffusion_training(S, k))
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]])
    pos = masks.doc_positions(doc)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1]]
    for mod, alone in ((masks.tidar_mod(doc, pos, k), masks.tidar_training),
                       (masks.block_diffusion_mod(doc, pos, k), masks.block_diffusion_training)):
        m = masks.dense(mod, 1, 2 * S, 2 * S)[0, 0]
        for a, b in ((0, 3), (3, 9), (9, 11)):
            idx = torch.cat([torch.arange(a, b), torch.arange(S + a, S + b)])
            rest = torch.ones(2 * S, dtype=torch.bool)
            rest[idx] = False
            assert torch.equal(m[idx][:, idx], alone(b - a, k))
            assert not m[idx][:, rest].any()  # nothing across documents


def test_block_masks_equal_dense_masks():
    """The FlexAttention block mask of a predicate attends exactly like its dense mask (flex output
    == SDPA output) and the objectives' losses agree; tiles are classified empty/full/partial."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    B, S, k = 2, 150, 8  # 2S = 300: three 128-tiles, the last cut
    doc = torch.sort(torch.randint(0, 5, (B, S), generator=g), 1).values
    pos = masks.doc_positions(doc)
    mod = masks.tidar_mod(doc, pos, k)
    dense = masks.dense(mod, B, 2 * S, 2 * S)
    bm = masks.block_mask(mod, B, 2 * S, 2 * S)
    assert torch.equal(bm.to_dense().bool(), _tiles(dense, 128))
    q, kk, v = (torch.randn(B, 2, 2 * S, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, kk, v, block_mask=bm), ref, atol=1e-5, rtol=1e-5)


def _tiles(dense: torch.Tensor, t: int) -> torch.Tensor:
    B, _, n, m = dense.shape
    pad = torch.zeros(B, 1, -(-n // t) * t, -(-m // t) * t, dtype=torch.bool)
    pad[..., :n, :m] = dense
    return pad.view(B, 1, -(-n // t), t, -(-m // t), t).any(5).any(3)


def test_tidar_ar_and_block_diffusion_packed_loss_equals_documents_alone(base):
    """--doc-attention: the loss of a packed batch equals the per-document losses computed on each
    document alone (token-weighted), for the AR, TiDAR (both halves) and block-diffusion objectives,
    with dense and with block masks."""
    from tidar_bench.training.ar import AutoregressiveObjective
    from tidar_bench.training.block_diffusion import BlockDiffusionObjective
    from tidar_bench.training.tidar import TidarObjective

    tok = _tok(base)
    model = load_model(base / "ckpt", "float32", "cpu")
    tidar = TidarObjective(model, tok, block_size=4, alpha=0.5)
    ar = AutoregressiveObjective(model, tok)
    bd = BlockDiffusionObjective(model, tok, block_size=4, mask_token_id=tidar.mask_id)
    batch = _packed(base, tok)
    segs = _segments(batch)
    with torch.no_grad():
        _, m = tidar.loss(model, batch)
        n_ar = n_diff = 0
        s_ar = s_diff = s_plain = 0.0
        for r, a, b in segs:
            x = batch.ids[r : r + 1, a:b]
            _, ma = tidar.loss(model, x)
            L = b - a
            if L > 1:
                s_ar += float(ma["ar"]) * (L - 1)
                s_plain += float(ar.loss(model, x)[0]) * (L - 1)
                n_ar += L - 1
            s_diff += float(ma["diff"]) * L
            n_diff += L
        assert float(m["ar"]) == pytest.approx(s_ar / n_ar, abs=1e-5)
        assert float(m["diff"]) == pytest.approx(s_diff / n_diff, abs=1e-5)
        assert float(ar.loss(model, batch)[0]) == pytest.approx(s_plain / n_ar, abs=1e-5)
        # the same without document attention differs: the check can fail
        assert float(tidar.loss(model, batch.ids)[1]["diff"]) != pytest.approx(s_diff / n_diff, abs=1e-3)
        # block diffusion, with and without the token shift, fixed noise
        g = torch.Generator().manual_seed(1)
        masked = torch.rand(batch.ids.shape, generator=g) < 0.5
        p = torch.full(masked.shape, 0.5)
        for shift in (False, True):
            bd.config.token_shift = shift
            mk = masked & (masks.doc_positions(batch.doc) % 4 != 0) if shift else masked
            x_t = batch.ids.masked_fill(mk, tidar.mask_id)
            loss, mt = bd.masked_loss(model, batch.ids, x_t, mk, p, batch.doc)
            tot = cnt = 0.0
            for r, a, b in segs:
                n = int(mk[r, a + shift : b].sum())
                if n:
                    l, _ = bd.masked_loss(model, batch.ids[r : r + 1, a:b], x_t[r : r + 1, a:b], mk[r : r + 1, a:b],
                                          p[r : r + 1, a:b])
                    tot, cnt = tot + float(l) * n, cnt + n
            assert float(loss) == pytest.approx(tot / cnt, abs=1e-5), shift
        bd.config.token_shift = False
        # block masks (FlexAttention, the long-context path) give the same losses, with and without documents
        x_t = batch.ids.masked_fill(masked, tidar.mask_id)
        for obj in (tidar, ar, bd):
            for b in (batch, batch.ids):
                doc = b.doc if b is batch else None
                f = (lambda: bd.masked_loss(model, batch.ids, x_t, masked, p, doc)[0]) if obj is bd else \
                    (lambda: obj.loss(model, b)[0])
                dense_loss = f()
                obj.mask_kind = "block"
                torch.testing.assert_close(f(), dense_loss, atol=1e-5, rtol=1e-5)
                obj.mask_kind = "dense"


def test_eagle_and_dflash_stay_within_documents(base):
    """EAGLE: the packed loss of each TTT step equals the per-document losses (weighted by their
    counted pairs). DFlash: anchors only where the block fits one document, context only from it."""
    from tidar_bench.baselines.eagle_head import EagleHead
    from tidar_bench.training.dflash import block_mask, sample_anchors
    from tidar_bench.training.eagle_head import EagleHeadObjective

    tok = _tok(base)
    target = load_model(base / "ckpt", "float32", "cpu")
    obj = EagleHeadObjective(target, EagleHead.from_target(target, "eagle3", seed=1), ttt_steps=2)
    batch = _packed(base, tok, S=30)
    with torch.no_grad():
        _, m = obj.loss(obj.head, batch)
        for a in range(2):
            tot = cnt = 0.0
            for r, s, e in _segments(batch):
                n = e - s - 1 - a  # pairs of this document that step a counts
                if n > 0:
                    _, md = obj.loss(obj.head, batch.ids[r : r + 1, s:e])
                    valid = obj.head.t2d[target(batch.ids[r : r + 1, s:e]).logits[:, 1:].argmax(-1)][:, a:]
                    n = int(valid.sum())
                    tot, cnt = tot + float(md[f"ce{a}"]) * n, cnt + n
            assert float(m[f"ce{a}"]) == pytest.approx(tot / cnt, abs=1e-4), a
    doc = torch.tensor([[0] * 5 + [1] * 9 + [2] * 6])
    anchors = sample_anchors(1, 20, 4, 16, torch.Generator().manual_seed(0), doc=doc)
    ok = {a for a in range(1, 17) if doc[0, a - 1] == doc[0, a] == doc[0, a + 3]}
    assert set(anchors[0].tolist()) == ok  # every allowed anchor (16 asked), no other
    bm = block_mask(anchors, 20, 4, doc)[0, 0]
    for n, a in enumerate(anchors[0].tolist()):
        ctx = bm[4 * n, :20].nonzero().flatten().tolist()
        assert ctx == [j for j in range(a) if doc[0, j] == doc[0, a]]


def test_loss_on_completion_chat_fixture(base, tmp_path):
    """--loss-on completion: on a chat, exactly the assistant turns' tokens (content + end-of-turn,
    not the header the generation prompt writes) and the EOS after a final assistant turn count;
    prompt/completion records count the completion; AR and TiDAR losses use only those."""
    from tidar_bench.training.tidar import TidarObjective

    tok = _tok(base)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 3"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4 plus 4"},
            {"role": "assistant", "content": "8"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": {"prompt": "say hi", "completion": "hi"}})
                 + "\n")
    docs = read_texts([f], "messages", tok, loss_on="completion")
    assert docs[0] == [("<system>be brief</s><user>what is 2 plus 3</s><assistant>", False), ("5</s>", True),
                       ("<user>and 4 plus 4</s><assistant>", False), ("8</s>", True)]
    assert docs[1] == [("say hi", False), ("hi", True)]
    assert "".join(t for t, _ in docs[0]) == read_texts([f], "messages", tok)[0]  # the same text as loss_on=all
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    want = [0] * len(enc(docs[0][0][0])) + [1] * len(enc("5</s>")) + [0] * len(enc(docs[0][2][0])) + \
        [1] * len(enc("8</s>")) + [1] + [0] * len(enc("say hi")) + [1] * len(enc("hi")) + [1]
    data = PackedDataset(docs, tok, len(want), loss_on="completion")
    batch = data.rows(torch.arange(1))
    assert batch.keep[0].int().tolist() == want and batch.doc is None
    # the losses count only the kept tokens: AR over kept labels, diffusion over kept positions
    model = load_model(base / "ckpt", "float32", "cpu")
    obj = TidarObjective(model, tok, block_size=4)
    with torch.no_grad():
        _, m = obj.loss(model, batch)
        ids, keep = batch.ids, batch.keep
        S = ids.shape[1]
        logits = model(*obj.inputs(ids)).logits
        lp = logits.log_softmax(-1)
        ar = -lp[0, torch.arange(S - 1), ids[0, 1:]][keep[0, 1:]].mean()
        diff = -lp[0, S + torch.arange(S), ids[0]][keep[0]].mean()
    assert float(m["ar"]) == pytest.approx(float(ar), abs=1e-5)
    assert float(m["diff"]) == pytest.approx(float(diff), abs=1e-5)
    assert float(m["diff"]) != pytest.approx(float(-lp[0, S + torch.arange(S), ids[0]].mean()), abs=1e-3)
    with pytest.raises(Exception, match="loss-on"):
        read_texts([f], "messages", tok, loss_on="prompt")


def test_extend_a_finished_run(base, tmp_path):
    """A finished run (checkpointed at its last step) resumed with a larger --steps goes on from its
    weights with the schedule re-planned from there (said on stdout, kept in the state); the
    steps before are untouched; a smaller --steps or another option is refused."""
    tok = _tok(base)
    from tidar_bench.training.tidar import TidarObjective

    cfg = dict(seq_len=12, batch_size=2, steps=4, lr=3e-3, warmup_steps=1, save_every=2, log_every=1, progress=False,
               seed=4)

    data = PackedDataset(read_texts([base / "train.jsonl"]), tok, 12, seed=2)  # stateless: shared by the runs

    def run(out, **kw):
        obj = TidarObjective.from_checkpoint(base / "ckpt", _tok(base), "cpu", block_size=4)
        return train(obj, data, out, TrainConfig(**{**cfg, **kw})), obj

    out = tmp_path / "run"
    first, _ = run(out)
    assert (out / "checkpoints" / "step-00000004").is_dir()  # the last step is checkpointed
    more, obj = run(out, steps=6, resume=True)
    assert [h["step"] for h in more] == list(range(6)) and more[:4] == first
    lrs = [h["lr"] for h in more[4:]]
    floor = 3e-3 * 0.1
    assert all(x == pytest.approx(floor) for x in lrs)  # at step 4 the old plan had reached its floor
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["steps"] == 6 and state["replans"] == [[4, pytest.approx(floor), 6, 4]]
    # an interrupted run extended mid-way: lr continues from its value there and decays to the floor
    c = TrainConfig(lr=1.0, warmup_steps=0, steps=100)
    mid = c.lr_at(40)
    c.steps = 200
    assert "from 100 to 200 steps" in c.replan(40, 100)
    assert c.lr_at(40) == pytest.approx(mid) and c.lr_at(120) < mid and c.lr_at(200) == pytest.approx(0.1)
    assert c.lr_at(39) == TrainConfig(lr=1.0, warmup_steps=0, steps=100).lr_at(39)  # the steps before: untouched
    c.steps = 300
    c.replan(150, 200)  # extended twice: continuous at each re-plan
    assert c.lr_at(150) == pytest.approx(TrainConfig(lr=1.0, warmup_steps=0, steps=200, replans=c.replans[:1]).lr_at(150))
    assert c.lr_at(39) == TrainConfig(lr=1.0, warmup_steps=0, steps=100).lr_at(39)
    with pytest.raises(Exception, match="only be extended"):
        run(out, steps=5, resume=True)
    with pytest.raises(Exception, match="batch_size"):
        run(out, steps=8, batch_size=4, resume=True)


def test_cli_doc_attention_and_loss_on(base, tmp_path, capsys):
    """The options reach training (a changed --doc-attention is refused on resume) and bad values
    are one-line errors."""
    argv = ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--block-size", "4",
            "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--device", "cpu", "--save-every", "2"]
    out = tmp_path / "o"
    assert main([*argv, "--out", str(out), "--doc-attention"]) == 0
    capsys.readouterr()
    cases = [([*argv, "--out", str(out), "--resume", "--steps", "3"], "doc_attention=True"),
             ([*argv, "--out", str(tmp_path / "x"), "--loss-on", "prompt"], "unknown --loss-on"),
             ([*argv, "--out", str(tmp_path / "x"), "--attention-masks", "sparse"], "unknown --attention-masks"),
             ([*argv, "--out", str(tmp_path / "x"), "--attention-masks", "block"], "needs a CUDA device")]
    for a, msg in cases:
        assert main(a) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert main([*argv, "--out", str(out), "--resume", "--steps", "3", "--doc-attention"]) == 0
    assert "extending the run from 2 to 3 steps" in capsys.readouterr().err  # logged (tidar_bench.training)


def test_docs_recipe_memory_is_computed():
    """docs/training.md's Qwen3-1.7B row and 8K activation figures = scripts/recipe_memory.py (meta-device
    parameter count x 16 bytes over 1 and 8 GPUs; bf16 gathered sizes; logits of a 16,384-token row)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("recipe_memory", root / "scripts" / "recipe_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    f = mod.figures()
    readme = (root / "docs" / "training.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| Qwen3-1.7B |"))
    for figure in (f"{f['params_B']:.2f} B", f"{f['ddp_GiB']:.1f} GiB", f"{f['fsdp8_GiB']:.1f} GiB",
                   f"{f['gathered_embedding_bf16_GiB']:.2f} GiB", f"{f['gathered_block_bf16_GiB']:.2f} GiB"):
        assert figure in row, (figure, row)
    for figure in (f"= {f['logits_fp32_GiB_per_sequence']:.1f} GiB", f"= {f['saved_block_inputs_bf16_GiB_per_sequence']:.2f} GiB",
                   f"mask {f['block_mask_MiB_per_sequence']:.2f} MiB", f"{f['dense_mask_bool_MiB_per_sequence']:.0f} MiB of booleans",
                   f"= {f['math_attention_scores_fp32_GiB_per_sequence_layer']:.0f} GiB"):
        assert figure in readme, figure
