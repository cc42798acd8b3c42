"""Training at the released scale: token shards (tokenize -> stream) equal the in-memory path and
resume mid-shard exactly; sharded torch.distributed.checkpoint checkpoints written by 2 gloo
processes resume in 1 process like the uninterrupted run, and `export` writes the HF layout."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_training import base  # noqa: F401  (the tiny AR base checkpoint fixture)
from test_training_scale import _Crash, _losses, crash_at, torchrun
from tidar_bench.cli import main
from tidar_bench.model import load_model
from tidar_bench.training.data import PackedDataset, read_texts
from tidar_bench.training.loop import TrainConfig, train
from tidar_bench.training.shards import ShardDataset


def _tok(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base / "ckpt"))


def test_tokenize_shards_equal_in_memory_and_resume_mid_shard(base, tmp_path, capsys):
    """`tokenize` (small shards, so rows cross shard ends) gives the in-memory token stream and flags;
    the same batches; training from shards ends at the JSONL run's weights; a run cut mid-shard and
    resumed ends at the uninterrupted weights; bad shard folders are one-line errors."""
    tok = _tok(base)
    shards = tmp_path / "shards"
    assert main(["tokenize", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(shards),
                 "--shard-tokens", "1000"]) == 0
    index = json.loads((shards / "index.json").read_text())
    assert len(index["shards"]) > 3 and not (tmp_path / ".shards.tmp").exists()
    ids = np.concatenate([np.fromfile(shards / f"{s['name']}.ids", "<u4") for s in index["shards"]])
    mem = PackedDataset(read_texts([base / "train.jsonl"]), tok, 12, seed=2, doc_attention=True)
    sh = ShardDataset(shards, tok, 12, seed=2, doc_attention=True)
    assert len(sh) == len(mem) and ids[: mem.data.numel()].tolist() == mem.data.flatten().tolist()
    a, b = mem.batches(4, start=7), sh.batches(4, start=7)
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x.ids, y.ids) and torch.equal(x.doc, y.doc)
    cfg = dict(seq_len=12, batch_size=2, steps=4, lr=3e-3, warmup_steps=1, save_every=2, log_every=1, progress=False,
               seed=4, keep_checkpoints=1)

    def run(out, data, crash=0, resume=False):
        from tidar_bench.training.tidar import TidarObjective

        obj = TidarObjective.from_checkpoint(base / "ckpt", _tok(base), "cpu", block_size=4)
        if crash:
            crash_at(obj, crash)
        train(obj, data, out, TrainConfig(**cfg, resume=resume))
        return obj.module().state_dict()

    mem.doc_attention = sh.doc_attention = False  # the batches are read per call: same data, plain rows
    whole = run(tmp_path / "mem", mem)
    from_shards = run(tmp_path / "sh", sh)
    for k in whole:
        assert torch.equal(whole[k], from_shards[k]), k
    with pytest.raises(_Crash):
        run(tmp_path / "cut", sh, crash=3)
    resumed = run(tmp_path / "cut", sh, resume=True)
    for k in whole:
        torch.testing.assert_close(whole[k], resumed[k], atol=1e-6, rtol=1e-5, msg=k)
    assert [h["loss"] for h in _losses(tmp_path / "cut")] == pytest.approx([h["loss"] for h in _losses(tmp_path / "sh")],
                                                                          abs=1e-6)
    # one-line errors: an incomplete copy, another tokenizer's shards, a non-empty output folder
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    (bad / "shard-00001.ids").write_bytes(b"\0" * 8)
    capsys.readouterr()
    for argv, msg in ((["train", "ar", "--base", str(base / "ckpt"), "--data", str(bad), "--out", str(tmp_path / "o"),
                        "--device", "cpu"], "missing or not"),
                      (["tokenize", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out",
                        str(shards)], "not empty"),
                      (["tokenize", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--data",
                        str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "t")], "not found")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists() and not (tmp_path / ".t.tmp").exists()


def _cmd(base, out, *extra):
    return ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(out),
            "--block-size", "4", "--steps", "4", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--seed", "3", "--device", "cpu", "--log-every", "1", "--checkpoint-format",
            "sharded", "--save-every", "2", "--keep-checkpoints", "0", "--doc-attention", *extra]


def test_sharded_checkpoint_two_gloo_processes_resume_in_one(base, tmp_path):
    """2 gloo processes under FSDP2 (document attention on) write sharded (DCP) checkpoints (each
    rank its shard, nothing gathered); one process resumes the step-2 checkpoint and lands on the
    uninterrupted 2-process run's final weights and losses; `export` of step 4 is the final
    checkpoint, which our loader and transformers read alike."""
    fsdp = tmp_path / "fsdp"
    torchrun(*_cmd(base, fsdp, "--shard", "fsdp"))
    step2 = fsdp / "checkpoints" / "step-00000002"
    shards = sorted(f.name for f in (step2 / "dcp").iterdir() if f.suffix == ".distcp")
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert not (step2 / "trainable.safetensors").exists() and not (step2 / "model.safetensors").exists()
    moved = tmp_path / "resumed"
    shutil.copytree(step2, moved / "checkpoints" / step2.name)
    assert main(_cmd(base, moved, "--resume")) == 0
    final = {k: load_file(str(d / "model.safetensors")) for k, d in (("fsdp", fsdp), ("resumed", moved))}
    for k in final["fsdp"]:  # lr 1e-3: a lost AdamW moment, step or RNG state moves weights by ~1e-3
        torch.testing.assert_close(final["resumed"][k], final["fsdp"][k], atol=2e-6, rtol=0, msg=k)
    assert [h["loss"] for h in _losses(moved)] == pytest.approx([h["loss"] for h in _losses(fsdp)], abs=1e-5)
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(fsdp / "checkpoints" / "step-00000004"), "--out", str(exported)]) == 0
    assert sorted(f.name for f in exported.iterdir()) == sorted(
        f.name for f in fsdp.iterdir() if f.name not in ("checkpoints", "train_log.jsonl", "train_config.json",
                                                          "loss.png", "eval_log.jsonl"))
    ex = load_file(str(exported / "model.safetensors"))
    assert ex.keys() == final["fsdp"].keys()
    for k in ex:
        assert torch.equal(ex[k], final["fsdp"][k]), k
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 17, 3, 8]])
    hf = AutoModelForCausalLM.from_pretrained(str(exported), torch_dtype=torch.float32)(ids).logits
    torch.testing.assert_close(load_model(exported, "float32", "cpu")(ids).logits, hf, atol=1e-4, rtol=1e-4)
    assert main(["export", "--checkpoint", str(fsdp), "--out", str(tmp_path / "x")]) == 2
