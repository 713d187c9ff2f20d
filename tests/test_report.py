"""`spjax report` and round health (keep_best, stop_when_worse) on constructed runs; the CLI."""
import json
import os
import subprocess
import sys

import pytest

from spjax import cli, metrics, report
from spjax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _constructed_run(workdir, nll, f1):
    """A workdir as a run leaves it: rounds/init_eval.json and metrics.jsonl (train and round rows)."""
    os.makedirs(os.path.join(workdir, "rounds"))
    with open(os.path.join(workdir, "rounds", "init_eval.json"), "w") as f:
        json.dump({"nll": nll[0], "f1": f1[0], "gen_len": 10.0}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for t, (n, s) in enumerate(zip(nll[1:], f1[1:])):
            f.write(json.dumps({"kind": "train", "step": 4 * t + 4, "loss": 0.5 - t}) + "\n")
            f.write(json.dumps({"kind": "round", "step": t, "nll": n, "f1": s, "margin": 0.1 * t,
                                "eval_accuracy": 0.9 - 0.1 * t, "gen_len": 10.0 + t, "train_s": 60.0}) + "\n")
        f.write('{"kind": "round", "st')  # a torn last line, as a kill leaves it


def test_report_writes_a_png_and_a_table_equal_to_metrics_jsonl(tmp_path, capsys):
    a, b = tmp_path / "chi2", tmp_path / "spin"
    _constructed_run(a, nll=[1.5, 1.47, 1.43, 1.45], f1=[0.25, 0.27, 0.29, 0.28])
    _constructed_run(b, nll=[1.5, 1.44, 1.41, 1.39], f1=[0.25, 0.29, 0.30, 0.29])
    assert cli.main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    with open(tmp_path / "rep.png", "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    lines = open(tmp_path / "rep.md").read().splitlines()
    cols = [c.strip() for c in lines[0].strip("|").split("|")[2:]]
    assert "judge_score" not in cols and cols[:2] == ["nll", "f1"]  # no run has a judge: no judge column
    rows = [line.strip("|").split("|") for line in lines[2:]]
    got = {(r[0].strip(), r[1].strip()): dict(zip(cols, (c.strip() for c in r[2:]))) for r in rows}
    for run in (a, b):
        for line in open(run / "metrics.jsonl"):
            if '"round", "step": ' in line and line.endswith("}\n"):
                want = json.loads(line)
                cell = got[(run.name, f"round {want['step']}")]
                for k in ("nll", "f1", "margin", "eval_accuracy", "gen_len", "train_s"):
                    assert float(cell[k]) == pytest.approx(want[k], rel=1e-3), (run.name, k)
        assert float(got[(run.name, "initial")]["nll"]) == 1.5
    assert len(got) == 8 and "wrote" in capsys.readouterr().out


def test_report_of_a_run_without_rows_yet(tmp_path, capsys):
    """metrics.jsonl exists before the initial evaluation's row: a starting or early-killed run
    (before: matplotlib's ValueError after the table was written)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert report.main([str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    assert "no run has a row yet" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "rep.md") and not os.path.exists(tmp_path / "rep.png")


def test_report_without_matplotlib_writes_the_table_and_says_so_in_one_line(tmp_path):
    """An environment without matplotlib: `spjax report` was an ImportError traceback (a run's own end
    already said it in one line)."""
    _constructed_run(tmp_path / "run", nll=[1.5, 1.4], f1=[0.2, 0.3])
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), ROOT]))
    out = tmp_path / "new" / "rep"  # a folder that does not exist yet: made
    proc = subprocess.run([sys.executable, "-m", "spjax", "report", str(tmp_path / "run"), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"spjax report: wrote {out}.md; no PNG: No module named matplotlib "
                                                "(pip install matplotlib)"]
    assert "| run | round 0 |" in proc.stdout and os.path.exists(f"{out}.md") and not os.path.exists(f"{out}.png")


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_best_round_and_rounds_since_best():
    summary = {"initial": {"nll": 1.0}, "round 0": {"nll": 1.4, "f1": 0.2}, "round 1": {"nll": 1.3, "f1": 0.3},
               "round 2": {"nll": 1.35, "f1": 0.3}, "round 3": {"nll": 1.36, "f1": 0.25}}
    assert metrics.best_round(summary, "nll", "min") == (1, 1.3)  # the initial row is not a round
    assert metrics.best_round(summary, "f1", "max") == (1, 0.3)  # the earliest of equal ones
    assert metrics.rounds_since_best(summary, "nll", "min") == 2
    assert metrics.best_round({"initial": {}}, "nll", "min") is None
    # A NaN round is never the best (no comparison with NaN holds: it stayed best forever)
    summary = {"initial": {"nll": 1.5}, "round 0": {"nll": float("nan")}, "round 1": {"nll": 1.4}}
    assert metrics.best_round(summary, "nll", "min") == (1, 1.4) and metrics.rounds_since_best(summary, "nll", "min") == 0


def test_a_rounds_mean_weighs_its_logged_intervals_by_their_steps():
    """Round rows averaged the interval means alike, so a short last interval (run.log_every, a checkpoint)
    counted as much as a long one: the round's loss depended on the logging settings."""
    rows = [{"loss": 1.0, "steps": 3, "skipped": 0}, {"loss": 4.0, "steps": 1, "skipped": 1},
            {"loss": float("nan"), "steps": 0, "skipped": 2}]
    got = metrics.mean_metrics(rows)
    assert got == {"loss": (3 * 1.0 + 4.0) / 4, "steps": 4, "skipped": 3}
    assert metrics.mean_metrics([{"loss": 1.0}, {"loss": 3.0}]) == {"loss": 2.0}  # rows without steps: alike
    assert metrics.mean_metrics([{"loss": 1.0}, {"loss": 3.0, "steps": 1}]) == {"loss": 2.0, "steps": 1}  # all keys


def test_word_similarity_counts_words_not_punctuation():
    from spjax.evaluate import rouge_l, token_f1
    assert token_f1("No.", "Yes.") == 0.0 and rouge_l("No.", "Yes.") == 0.0  # were 0.5: '.' was a word
    assert token_f1("Hello, world!", "hello world") == 1.0 == rouge_l("Hello, world!", "hello world")
    assert token_f1("Caf\u00e9", "cafe\u0301") == 1.0  # composed and decomposed accents: one word (NFKC)
    assert token_f1("the the the", "the") == 0.5  # repeated words count once per match
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)  # LCS 3 of 4 and of 3
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    # a letter's combining marks are part of its word: Hindi vowel signs, a nukta, Arabic harakat
    assert token_f1("\u0915\u093f\u0924\u093e\u092c", "\u0915\u093e\u0924\u093f\u092c") == 0.0  # kitab, katib
    assert token_f1("\u092e\u0948\u0902 \u0918\u0930 \u091c\u093e \u0930\u0939\u093e",
                    "\u092e\u0948\u0902 \u0918\u0930 \u091c\u093e \u0930\u0939\u0940") == 0.75  # raha, rahi
    assert token_f1("\u0639\u064e\u0644\u0650\u0645\u064e", "\u0639\u064e\u0644\u0650\u0645\u064e \u0639\u0644\u0645") \
        == pytest.approx(2 / 3)
    assert token_f1("The answer is _yes_", "the answer is yes") == 1.0 == rouge_l("snake_case", "snake case")


def test_plot_gives_each_run_one_colour_in_every_panel(tmp_path, monkeypatch):
    """Colours came from each panel's own cycle: a run missing from the first panel shifted them, and
    the first panel's legend then named the wrong run for the others."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    seen = {}

    def savefig(fig, path, **kw):
        for ax in fig.axes:
            for line in ax.get_lines():
                seen.setdefault(line.get_label(), set()).add(line.get_color())
        seen["legend"] = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr(os, "replace", lambda *a: None)
    runs = {"plain": {"initial": {"nll": 1.5}, "round 0": {"nll": 1.4}},
            "judged": {"initial": {"nll": 1.5, "judge_score": 0.2}, "round 0": {"nll": 1.3, "judge_score": 0.4}}}
    report.plot(runs, str(tmp_path / "r.png"))
    assert seen.pop("legend") == ["plain", "judged"]
    assert seen == {"plain": {"C0"}, "judged": {"C1"}}


@pytest.mark.parametrize("override,message", [
    ("run.keep_best=bleu", "run.keep_best: 'bleu' not one of nll, f1, rouge_l, held_lp_real"),
    ("run.stop_when_worse=2", "run.stop_when_worse: needs run.keep_best"),
])
def test_round_health_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_spjax_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "spjax.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for name in ("train", "data", "report", "compile-check", "export"):
        assert f"  {name} " in out.stdout


def test_report_skips_rows_it_cannot_place_and_shows_a_run_once(tmp_path):
    """A round row without its step was a KeyError; `spjax report R R/` showed R once by accident of names."""
    run = tmp_path / "chi2"
    _constructed_run(run, nll=[1.5, 1.4], f1=[0.2, 0.3])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"kind": "round", "nll": 9.0}) + "\n")
    md, _ = report.write([str(run), str(run) + "/"], str(tmp_path / "rep"))
    rows = open(md).read().splitlines()[2:]
    assert [r.split("|")[1:3] for r in rows] == [[" chi2 ", " initial "], [" chi2 ", " round 0 "]]
    assert "9" not in rows[1].split("|")[3]


def test_metric_writer_writes_tensorboard_scalars(tmp_path):
    """README: TensorBoard event files go to <workdir>/tb (tensorboardX was not installed: none were)."""
    import struct

    from tensorboardX.proto import event_pb2
    w = metrics.MetricWriter(str(tmp_path))
    w.write("train", 3, {"loss": 0.25, "skipped": float("nan")})
    w.write("round", 0, {"nll": 1.5})
    w.close()
    (name,) = os.listdir(tmp_path / "tb")
    data, got = (tmp_path / "tb" / name).read_bytes(), {}
    while data:  # TFRecord: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + n])
        got.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
        data = data[12 + n + 4:]
    assert got == {("train/loss", 3): 0.25, ("round/nll", 0): 1.5}  # a NaN is no point


def test_flushing_writers_on_a_full_disk_does_not_raise(tmp_path):
    """flush_writers runs in the I/O-error exit path: a TensorBoard close failing on the full disk the run
    stops for raised there, so the run ended in tracebacks with exit 1, not its one line and exit 3."""
    w = metrics.MetricWriter(str(tmp_path))

    class Full:
        def close(self):
            raise OSError(28, "No space left on device")
    real, w.tb = w.tb, Full()
    metrics.flush_writers()
    assert w.tb is None
    real.close()
    w.close()


def test_rewind_gives_every_process_the_rows(tmp_path, monkeypatch):
    """A resumed round averages its earlier steps' rows into its summary: the other processes got none
    (only process 0 reads and rewrites metrics.jsonl), so their round tables showed other numbers."""
    w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        w.write("train", step, {"loss": float(step)})
    monkeypatch.setattr(metrics, "_is_main", lambda: False)
    other = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    assert [r["loss"] for r in other.rewind(lambda r: r["step"] <= 2)] == [1.0, 2.0]
    assert (tmp_path / "metrics.jsonl").read_text() == before  # process 0's file: only process 0 rewrites it
    monkeypatch.undo()
    assert [r["loss"] for r in w.rewind(lambda r: r["step"] <= 2)] == [1.0, 2.0]
    w.close()
