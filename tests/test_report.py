"""`tidar-bench plot` and `tidar-bench check` on fixture folders: the figures are valid images, and
the gate passes a matching run and fails, with the right reason, on each kind of regression."""

import csv
import json
import shutil

import pytest
from PIL import Image

from tidar_bench.cli import main
from tidar_bench.report import pareto

COLUMNS = ["task", "decoder", "metric", "score", "stderr", "tokens_per_s", "tokens_per_nfe", "mean_accepted_length",
           "speedup_vs_ar", "n", "mismatches_vs_ar"]
ROWS = [
    ["tb_mini_gsm", "ar", "exact_match,strict-match", 0.62, 0.05, 200.0, 1.0, 1.0, 1.0, 100, ""],
    ["tb_mini_gsm", "tidar", "exact_match,strict-match", 0.62, 0.05, 520.0, 3.4, 3.6, 2.6, 100, 0],
    ["tb_mini_gsm", "bd", "exact_match,strict-match", 0.48, 0.05, 610.0, 4.1, 4.1, 3.05, 100, ""],
    ["tb_mini_math", "ar", "exact_match,boxed", 0.40, 0.049, 190.0, 1.0, 1.0, 1.0, 100, ""],
    ["tb_mini_math", "tidar", "exact_match,boxed", 0.40, 0.049, 480.0, 3.1, 3.3, 2.53, 100, 0],
    ["tb_mini_math", "bd", "exact_match,boxed", 0.30, 0.046, 560.0, 3.9, 3.9, 2.95, 100, ""],
]


def make_run(folder, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    (folder / "run.json").write_text(json.dumps({
        "command": "tidar-bench run --model m --decoders ar,tidar,bd --tasks mini_gsm,mini_math --out x",
        "identity": {"model": "/ckpt/tiny-model"},
        "environment": {"cpu": "Test CPU", "gpu": None},
        "decoders": {"ar": {"given": {}}, "tidar": {"given": {"block_size": 8}}, "bd": {"given": {"threshold": 0.9}}},
    }))
    return folder


def make_latency(folder):
    folder.mkdir(parents=True)
    with (folder / "latency.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["context", "slots", "median_ms", "q1_ms", "q3_ms", "repeats", "mask", "block_size"])
        for n, ms in ((1, 2.0), (2, 2.1), (4, 2.2), (8, 3.5), (16, 6.0)):
            w.writerow([256, n, ms, ms * 0.95, ms * 1.05, 5, "causal", ""])
        w.writerow([256, 20, 6.5, 6.2, 6.8, 5, "tidar", 4])
    (folder / "latency.json").write_text(json.dumps({"model": "tiny", "dtype": "float32", "tolerance": 0.1,
                                                      "knee": {"256": 4}, "environment": {"device_name": "CPU"}}))
    return folder


def test_pareto_keeps_only_undominated_points():
    pts = [(1.0, 0.5), (2.0, 0.5), (3.0, 0.4), (2.5, 0.45), (0.5, 0.6), (2.0, 0.3)]
    assert pareto(pts) == [(0.5, 0.6), (2.0, 0.5), (2.5, 0.45), (3.0, 0.4)]


def test_plot_writes_valid_images_and_report(tmp_path, capsys):
    run, lat, out = make_run(tmp_path / "run"), make_latency(tmp_path / "lat"), tmp_path / "fig"
    assert main(["plot", str(run), str(lat), "--out", str(out)]) == 0
    for name in ("pareto_mini_gsm", "pareto_mini_math", "latency_lat"):
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
        assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    report = (out / "report.md").read_text()
    assert "![tb_mini_gsm](pareto_mini_gsm.png)" in report and "latency_lat.png" in report
    assert "tidar(block_size=8)" in report and "2.60" in report  # label with its setting, speedup column
    assert not list(out.glob(".*tmp*"))


def test_plot_several_runs_and_bad_input(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "fig")]) == 0  # one run per figure
    assert sorted(p.name for p in (tmp_path / "fig").glob("pareto_*.png")) == [
        "pareto_mini_gsm_a.png", "pareto_mini_gsm_b.png", "pareto_mini_math_a.png", "pareto_mini_math_b.png"]
    report = (tmp_path / "fig" / "report.md").read_text()
    from tidar_bench.provenance import portable_path

    # the plot command as recorded: every path in portable form (here temp folders: <name>-<hash>)
    shown = " ".join(portable_path(p) for p in (a, b, tmp_path / "fig"))
    assert "| a | mini_gsm |" in report and f"`tidar-bench plot {shown.rsplit(' ', 1)[0]} --out {shown.rsplit(' ', 1)[1]}`" in report
    assert str(tmp_path) not in report
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "tog"), "--together"]) == 0  # asked for: together
    assert sorted(p.name for p in (tmp_path / "tog").glob("pareto_*.png")) == ["pareto_mini_gsm.png", "pareto_mini_math.png"]
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "f2")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "f3")]) == 2
    assert "summary.csv is missing" in capsys.readouterr().err


@pytest.fixture
def gated(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    base = tmp_path / "baseline.json"
    assert main(["check", str(run), "--baseline", str(base), "--update-baseline"]) == 0
    capsys.readouterr()
    return run, base


def _check(run, base, capsys, *extra):
    rc = main(["check", str(run), "--baseline", str(base), *extra])
    return rc, capsys.readouterr().out


def _edit(run, row, col, value):
    rows = [list(r) for r in ROWS]
    rows[row][COLUMNS.index(col)] = value
    make_run(run, rows)


def test_check_passes_on_the_same_run(gated, capsys):
    run, base = gated
    rc, out = _check(run, base, capsys)
    assert rc == 0 and "check passed" in out
    assert json.loads(base.read_text())["rows"][1]["label"] == "tidar(block_size=8)"


def test_check_score_drop(gated, capsys):
    run, base = gated
    _edit(run, 1, "score", 0.62 - 0.09)  # within 2 standard errors (0.10): passes
    assert _check(run, base, capsys)[0] == 0
    _edit(run, 1, "score", 0.62 - 0.11)
    rc, out = _check(run, base, capsys)
    assert rc == 1 and out.startswith("FAIL score: mini_gsm | - | tidar(block_size=8)")
    assert _check(run, base, capsys, "--score-tolerance", "0.2")[0] == 0


def test_check_lower_tnfe(gated, capsys):
    run, base = gated
    _edit(run, 4, "tokens_per_nfe", 3.1 * 0.85)
    rc, out = _check(run, base, capsys)
    assert rc == 1 and "FAIL T/NFE: mini_math | - | tidar(block_size=8)" in out
    assert _check(run, base, capsys, "--rel-tolerance", "0.2")[0] == 0


def test_check_lossless_mismatch(gated, capsys):
    run, base = gated
    _edit(run, 1, "mismatches_vs_ar", 3)
    rc, out = _check(run, base, capsys)
    assert rc == 1 and "FAIL lossless: mini_gsm | - | tidar(block_size=8): 3 greedy outputs differ from ar" in out


def test_no_baseline_from_a_lossless_failure(tmp_path, capsys):
    rows = [list(r) for r in ROWS]
    rows[1][COLUMNS.index("mismatches_vs_ar")] = 1
    run = make_run(tmp_path / "run", rows)
    assert main(["check", str(run), "--baseline", str(tmp_path / "b.json"), "--update-baseline"]) == 2
    assert "fails the lossless check" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_check_missing_file_and_result(gated, capsys, tmp_path):
    run, base = gated
    (run / "run.json").unlink()
    rc, out = _check(run, base, capsys)
    assert rc == 1 and f"FAIL missing file: {run / 'run.json'}" in out
    make_run(run, ROWS[:5])
    rc, out = _check(run, base, capsys)
    assert rc == 1 and "FAIL missing result: mini_math | - | bd(threshold=0.9)" in out


def test_check_bad_baseline_is_a_user_error(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["check", str(run), "--baseline", str(tmp_path / "none.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["check", str(run), "--baseline", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "not valid JSON" in err
    shutil.rmtree(run)


def make_speed_batch(path):
    """A batched speed result in report.SPEED_BATCH_FORMAT."""
    def cell(tps, sp, ratios, mm):
        return {"tokens": 512, "decode_s": 512 / tps, "nfe": 300, "tokens_per_s": tps, "tokens_per_nfe": 1.7,
                "per_sequence_latency_s": {"median": 0.5, "q1": 0.4, "q3": 0.6}, "speedup_vs_reference": sp,
                "paired_ratios": ratios, "lossless_mismatches": mm}
    rec = {"command": "tidar-bench speed --model m --decoders ar,tidar --batch-size 1,2,4 --out s.json",
           "environment": {"cpu": "Test CPU", "gpu": None}, "model": "m", "prompts": "8 prompts",
           "reference": "ar", "batch_sizes": [1, 2, 4], "decoders": {"ar": {}, "tidar": {}},
           "batch": {str(b): {"ar": cell(100.0 * b, 1.0, [1.0, 1.0], None),
                              "tidar": cell(180.0 * b / (1 + b / 4), 1.8 / (1 + b / 4), [1.5, 1.7, 1.9], 0)}
                     for b in (1, 2, 4)}}
    path.write_text(json.dumps(rec))
    return path


def test_plot_speed_vs_batch_size(tmp_path):
    speed = make_speed_batch(tmp_path / "speed.json")
    out = tmp_path / "fig"
    assert main(["plot", str(speed), "--out", str(out)]) == 0
    with Image.open(out / "speed_batch_speed.png") as im:
        im.verify()
        assert im.size[0] > 400
    report = (out / "report.md").read_text()
    assert "speed_batch_speed.png" in report and "| 4 | tidar | 360.0 |" in report and "1.60–1.80" in report  # IQR, inclusive
    assert "tidar-bench speed --model m" in report
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"decoders": {}}))  # a batch-1 speed file: no batch section
    assert main(["plot", str(bad), "--out", str(tmp_path / "f2")]) == 2


def _figures(monkeypatch):
    """Capture the matplotlib figures `plot` saves (their artists say what a reader sees)."""
    from tidar_bench import report

    figs = {}

    def save(fig, base):
        figs[base.name] = fig
        return []

    monkeypatch.setattr(report, "_savefig", save)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig=None: None)
    return figs


def test_pareto_figure_reads_without_a_legend(tmp_path, monkeypatch):
    """One colour per decoder family, a marker per setting, filled = lossless, labels beside their points
    (not overlapping), no legend, and each checkpoint's ar score as a horizontal line."""
    import matplotlib.colors as mc

    rows = [["tidar", "tb_mini_gsm", "tidar(block_size=4)", "exact_match,strict-match", 0.6, 0.05, 400.0, 2.5, 2.7, 2.0, 100, 0],
            ["base", "tb_mini_gsm", "ar", "exact_match,strict-match", 0.62, 0.05, 200.0, 1.0, 1.0, 1.0, 100, ""],
            ["base", "tb_mini_gsm", "eagle", "exact_match,strict-match", 0.62, 0.05, 260.0, 3.0, 3.5, 1.3, 100, 0],
            ["tidar", "tb_mini_gsm", "ar", "exact_match,strict-match", 0.6, 0.05, 200.0, 1.0, 1.0, 1.0, 100, ""],
            ["tidar", "tb_mini_gsm", "tidar", "exact_match,strict-match", 0.6, 0.05, 520.0, 3.4, 3.6, 2.6, 100, 0],
            ["bd", "tb_mini_gsm", "bd", "exact_match,strict-match", 0.48, 0.05, 610.0, 4.1, 4.1, 3.05, 100, ""]]
    folder = tmp_path / "suite"
    folder.mkdir()
    with (folder / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model"] + COLUMNS)
        w.writerows(rows)
    (folder / "suite.json").write_text(json.dumps({"command": "tidar-bench run", "runs": {"base": {}, "tidar": {}, "bd": {}},
                                                   "environment": {"cpu": "Test CPU"}}))
    tidar_given = {"tidar": {"given": {"max_blocks": 3}}, "tidar(block_size=4)": {"given": {"block_size": 4, "max_blocks": 3}}}
    for sub, given in (("tidar", tidar_given), ("base", {}), ("bd", {})):
        (folder / sub).mkdir()
        (folder / sub / "run.json").write_text(json.dumps({"decoders": given}))
    figs = _figures(monkeypatch)
    assert main(["plot", str(folder), "--out", str(tmp_path / "fig")]) == 0
    fig = figs["pareto_mini_gsm"]
    assert not fig.legends
    for ax in fig.axes:
        assert ax.get_legend() is None
        marks = {}  # label -> (colour, marker, filled) of the point drawn at the label's anchor
        for line in ax.lines:
            x, y = line.get_xdata(), line.get_ydata()
            if len(x) == 1 and line.get_marker() not in (None, "None", ""):
                marks[(float(x[0]), float(y[0]))] = (mc.to_hex(line.get_color()), line.get_marker(),
                                                     line.get_markerfacecolor() not in ("white", "none"))
        labels = [t for t in ax.texts if t.xycoords == "data" and tuple(map(float, t.xy)) in marks]
        points = {t.get_text().split("  ")[0]: marks[tuple(map(float, t.xy))] for t in labels}
        assert set(points) == {"ar", "eagle", "tidar(block_size=4,max_blocks=3) [tidar]", "tidar(max_blocks=3) [tidar]", "bd [bd]"}
        t4, t3 = points["tidar(block_size=4,max_blocks=3) [tidar]"], points["tidar(max_blocks=3) [tidar]"]
        assert t4[0] == t3[0] != points["eagle"][0] != points["bd [bd]"][0]  # colour = family
        assert t4[1] != t3[1]  # marker = setting
        assert t3[2] and points["eagle"][2] and not points["bd [bd]"][2]  # filled = lossless, hollow = lossy
        hlines = {round(float(line.get_ydata()[0]), 3) for line in ax.lines
                  if len(line.get_ydata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]}
        assert {0.62, 0.6} <= hlines  # base ar's score and the TiDAR checkpoint's ar (tidar's lossless reference)
        boxes = [t.get_window_extent() for t in labels]
        assert len(boxes) == 5 and all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    speed_texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith("tidar(max_blocks=3) [tidar]  2.60×") for t in speed_texts)


def test_a_figure_draws_one_point_per_decoder_setting(tmp_path):
    """gsm8k's summary has a strict-match and a flexible-extract row per decoder: the figure draws the
    first (one point, one label), the report's table keeps both."""
    from tidar_bench.report import one_row_per_setting, read_run

    two = [r for row in ROWS[:3] for r in (row, [*row[:2], "exact_match,flexible-extract", *row[3:]])]
    run = read_run(make_run(tmp_path / "run", two))
    kept = one_row_per_setting(run.rows)
    assert [(r["decoder"], r["metric"]) for r in kept] == [(d, "exact_match,strict-match") for d in ("ar", "tidar", "bd")]
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "report.md").read_text().count("flexible-extract") == 3
