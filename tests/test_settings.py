"""One settings resolver (`registry.resolve_settings`) for generate, speed and run: one --decoder-arg
grammar, one compile default, every option honoured or refused; `run`'s reference is its first setting
and a lossless decoder with nothing to be checked against says so."""

import functools
import json
import types
import typing
from pathlib import Path

import pytest

from tidar_bench import registry
from tidar_bench.cli import main
from tidar_bench.errors import UserError
from tidar_bench.harness.runner import RunSpec, _decoder_options

EMBEDDED = Path("tidar_bench/embedded")


def _value_for(typ, default):
    """A value of the option's type that differs from its default, as a command-line string."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is bool:
        return str(not default).lower(), (not default)
    if typ is int:
        v = (default if isinstance(default, int) else 0) + 3
        return str(v), v
    if typ is float:
        v = (default if isinstance(default, float) else 0.0) + 0.25
        return str(v), v
    return "off" if default == "auto" else "x-test", "off" if default == "auto" else "x-test"


def _options():
    import inspect

    for name, spec in sorted(registry.decoders().items()):
        params = inspect.signature(spec.factory).parameters
        for key, typ in spec.option_types().items():
            yield name, key, typ, params[key].default


OPTIONS = list(_options())


@pytest.fixture
def recording(monkeypatch):
    """Every factory records the options it receives, then stops the command (no model is loaded)."""
    seen = {}
    for name, spec in registry.decoders().items():
        @functools.wraps(spec.factory)
        def factory(ctx, _name=name, **kw):
            seen[_name] = kw
            raise UserError("recorded")

        monkeypatch.setitem(registry._REGISTRY, name, registry.DecoderSpec(name, factory, spec.help, spec.needs_draft))
    return seen


@pytest.mark.parametrize("name,key,typ,default", OPTIONS, ids=[f"{n}.{k}" for n, k, *_ in OPTIONS])
def test_every_decoder_option_reaches_the_decoder(name, key, typ, default, recording, capsys, tmp_path):
    text, value = _value_for(typ, default)
    common = ["--model", str(EMBEDDED / "base"), "--draft", str(EMBEDDED / "eagle")]
    # generate: a bare key=value (one decoder given)
    assert main(["generate", *common, "--prompt-ids", "1", "--decoder", name, "--decoder-arg", f"{key}={text}"]) == 2
    assert recording.pop(name)[key] == value
    # speed: DECODER.key=value
    assert main(["speed", *common, "--decoders", name, "--decoder-arg", f"{name}.{key}={text}"]) == 2
    assert recording.pop(name)[key] == value
    assert "error: recorded" in capsys.readouterr().err
    # run: the same resolver
    spec = RunSpec(model=EMBEDDED / "base", decoders=[name], tasks=["mini_gsm"], out=tmp_path / "r",
                   draft=EMBEDDED / "eagle", decoder_args=[f"{name}.{key}={text}"])
    assert _decoder_options(spec)[0][name][key] == value


def test_compile_precedence_and_grammar():
    rs = registry.resolve_settings("ar,ar(compile=on),tidar", ["ar.compile=off"], "on")
    assert [r.options["compile"] for r in rs] == ["off", "on", "on"]  # setting > --decoder-arg > --compile
    assert rs[0].given == {"compile": "off"} and rs[2].given == {}
    (one,) = registry.resolve_settings("ar", ["compile=off"], "on")  # bare key: one decoder given
    assert one.options["compile"] == "off"
    bad = [("ar,tidar", ["compile=off"], "several decoders"),
           ("ar", ["tidar.block_size=4"], "not among the decoders"),
           ("ar", ["nosuch=1"], "has no option 'nosuch'"),
           ("ar", ["compile"], "DECODER.key=value"),
           ("tidar", ["tidar.block_size=x"], "not a valid int")]
    for decoders_, args, msg in bad:
        with pytest.raises(UserError, match=msg):
            registry.resolve_settings(decoders_, args, "auto")


def test_generate_decoder_arg_compile_is_honoured(capsys):
    """issue 36: `generate --decoder-arg compile=off` compiled anyway."""
    assert main(["generate", "--model", str(EMBEDDED / "base"), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                 "--compile", "on", "--decoder-arg", "compile=off"]) == 0
    assert "compiled=no" in capsys.readouterr().out


def test_run_reference_is_the_first_setting(tmp_path, capsys):
    """`run --decoders "ar(compile=false),tidar"` checks tidar against ar(compile=false) (it skipped the
    check when no setting was literally `ar`); a lossless decoder alone is reported unchecked."""
    ckpt = str(EMBEDDED / "tidar")
    out = tmp_path / "run"
    assert main(["run", "--model", ckpt, "--decoders", "ar(compile=false),tidar", "--tasks", "mini_gsm",
                 "--limit", "2", "--decoder-arg", "tidar.max_blocks=3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert info["reference"] == "ar(compile=false)"
    assert info["mismatches_vs_ar"]["tidar"] == 0 and info["lossless_check"]["tidar"] == "checked"
    assert "vs ar(compile=false)" in printed
    rows = (out / "summary.csv").read_text()
    assert "lossless_check" in rows.splitlines()[0] and ",checked" in rows

    alone = tmp_path / "alone"
    assert main(["run", "--model", ckpt, "--decoders", "tidar", "--tasks", "mini_gsm", "--limit", "1",
                 "--decoder-arg", "max_blocks=3", "--out", str(alone)]) == 0
    assert "lossless check not done for: tidar" in capsys.readouterr().out
    info = json.loads((alone / "run.json").read_text())
    assert info["lossless_check"]["tidar"].startswith("unchecked") and info["mismatches_vs_ar"]["tidar"] is None
    from tidar_bench.check import Tolerance, baseline_from_run, check

    assert any("unchecked" in f for f in check(alone, baseline_from_run(alone), Tolerance()))


def test_speed_reference_and_unchecked(tmp_path, capsys):
    """speed: the first setting is the reference; a lossless decoder alone, or behind a lossy reference,
    is reported unchecked instead of passing (or failing) against nothing."""
    common = ["speed", "--model", str(EMBEDDED / "tidar"), "--prompts", "1", "--prompt-len", "8",
              "--max-new-tokens", "4", "--decoder-arg", "tidar.max_blocks=3"]
    rec = tmp_path / "alone.json"
    assert main([*common, "--decoders", "tidar", "--out", str(rec)]) == 0
    assert "lossless check not done for: tidar (no other decoder)" in capsys.readouterr().out
    assert json.loads(rec.read_text())["decoders"]["tidar"]["lossless_check"] == "unchecked: no other decoder"
    rec = tmp_path / "pair.json"
    assert main([*common, "--decoders", "ar(compile=false),tidar", "--out", str(rec)]) == 0
    d = json.loads(rec.read_text())
    assert d["reference"] == "ar(compile=false)"
    assert (d["decoders"]["tidar"]["lossless_check"], d["decoders"]["tidar"]["lossless_mismatches"]) == ("checked", 0)
