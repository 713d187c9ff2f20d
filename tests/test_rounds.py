"""The self-play driver end to end on configs/tiny.py: resumable after SIGKILL anywhere, corrupt
checkpoints skipped, exports that transformers loads, and config errors before any compile."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import artifacts, checkpoint as ckpt_lib
from spjax import rounds
from spjax.config import ConfigError, load_config
from tests.torchless import torchless_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _env(**extra):
    """Every spjax.train subprocess here runs with torch unimportable, as the quick start does."""
    env = dict(os.environ)
    env.setdefault("SPJAX_COMPILE_CACHE", os.path.join(ROOT, ".jax_cache"))
    env.update(torchless_env(), **extra)
    return env


def _train(workdir, *args, kill_at=None, tfds_dir=None):
    cmd = [sys.executable, "-m", "spjax.train", "--config", TINY, "--workdir", str(workdir), *args]
    if tfds_dir:
        cmd.append(f"data.tfds_dir={tfds_dir}")
    env = _env(**({"SPJAX_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _export_bytes(workdir):
    with open(os.path.join(workdir, "export", "model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tfds_dir):
    """One uninterrupted 2-round run: the result every resumed run must reproduce bit for bit."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _train(workdir, tfds_dir=tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_run_prints_rounds_and_exports(reference_run):
    workdir, out = reference_run
    assert "self-play summary after round 1" in out and "initial" in out
    lines = [l for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any('"kind": "round"' in l for l in lines) and any('"kind": "train"' in l for l in lines)
    assert os.path.getsize(os.path.join(workdir, "report.png")) > 10_000 and "per-round report" in out
    for t in (0, 1):
        assert os.path.exists(os.path.join(workdir, "rounds", f"round_{t:03d}", "samples_train.npz"))
        assert os.path.exists(os.path.join(workdir, "rounds", f"round_{t:03d}", "refs.npz"))
        assert os.path.exists(os.path.join(workdir, "rounds", f"round_{t:03d}", "opponent.json"))  # its maker
    # chat templates print the first start's date on every start (data.template_date, resolved)
    date = json.load(open(os.path.join(workdir, "start.json")))["date"]
    assert f"template_date='{date}'" in open(os.path.join(workdir, "config.txt")).read()
    # held-out prompts sample from their own key, not the training prompts' (ids restart at 0 per split)
    train, held = (artifacts.load_arrays(os.path.join(workdir, "rounds", "round_000", f"samples_{s}.npz"))
                   for s in ("train", "held"))
    n = min(len(train["ids"]), len(held["ids"]), 8)
    first = lambda z: [int(tok) for tok in z["tokens"][np.cumsum(z["lengths"])[:n] - z["lengths"][:n]]]
    assert sum(a == b for a, b in zip(first(train), first(held))) <= n // 2, (first(train), first(held))
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"kind": "round"' in l]
    assert all(0 <= r["sample_unended"] <= 1 for r in rows)
    assert ("before an end of turn" in out) == any(r["sample_unended"] > 0 for r in rows)


def test_export_loads_in_transformers_with_same_logits(reference_run):
    import torch
    import transformers
    workdir, _ = reference_run
    export = os.path.join(workdir, "export")
    tm = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    text = tok.apply_chat_template([{"role": "user", "content": "Count to 4."}], add_generation_prompt=True,
                                   tokenize=False)
    ids = np.asarray([tok(text + "1 2 3 4", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = tm(torch.tensor(ids)).logits.numpy()
    cfg, params = spjax.load_pretrained(export)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids, jnp.int32))) - ref).max() <= 1e-4


def test_sigkill_at_five_points_then_resume_is_bitwise_identical(reference_run, tfds_dir, tmp_path):
    """One run killed five times (each kill during the previous resume: SIGKILL, SIGINT, SIGTERM), then finished."""
    ref_dir, _ = reference_run
    work = tmp_path / "run"
    # (where the run dies, counted from its own start): after round 0's final checkpoint and its
    # metrics line, before its eval.json (the resume evaluates round 0 again, its line logged once,
    # with its phase times); round 1's sampling after the first chunk is on disk;
    # scoring with the real responses scored and the generated ones not yet; while round 1's step-2
    # save is in flight (async); training at step 3 (the step-2 checkpoint, written again, is the latest).
    # Ctrl-C (SIGINT) and a scheduler's SIGTERM stop with one line saying how to continue (before: a
    # 45-line KeyboardInterrupt traceback, or nothing).
    for k, (kill_at, *args) in enumerate([("record:1",), ("sample:1:INT",), ("score:1:TERM",),
                                          ("checkpoint:1", "run.async_checkpoint=true"), ("train:3",)]):
        killed = _train(work, *(["--resume"] if k else []), *args, kill_at=kill_at, tfds_dir=tfds_dir)
        want = {"INT": 130, "TERM": 143}.get(kill_at.split(":")[-1], -9)
        assert killed.returncode == want, (kill_at, killed.returncode, killed.stderr[-2000:])
        if want > 0:
            last = killed.stderr.strip().splitlines()[-1]
            assert last.startswith(f"spjax: stopped by SIG{kill_at.split(':')[-1]}; every finished phase"), last
            assert f"Continue with: python -m spjax.train --config {TINY} --workdir {work} --resume" in last, last
        if kill_at == "sample:1:INT":  # this run logged round 0's row (re-evaluated) before the stop: its
            newest = max((work / "tb").iterdir(), key=lambda p: p.stat().st_mtime_ns)  # TensorBoard file has it
            assert b"round/" in newest.read_bytes(), newest  # (before: os._exit dropped the queued events)
        assert not os.path.exists(work / "export")
        if kill_at == "train:3":  # the in-flight save never committed: this resume began the round's training
            assert "resumed at round 1, phase sample, step 0" in killed.stdout, killed.stdout[-2000:]
    resumed = _train(work, "--resume", tfds_dir=tfds_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at round 1, phase train, step 2" in resumed.stdout
    _assert_same_run(work, ref_dir)
    rounds = [json.loads(l) for l in open(work / "metrics.jsonl") if '"round"' in l]
    assert all({"sample_s", "score_s", "train_s", "train_nll", "nll"} <= set(r) for r in rounds if r["kind"] == "round")


def _assert_same_run(work, ref_dir):
    assert _export_bytes(work) == _export_bytes(ref_dir)
    # The log reads as if nothing had happened: each step and round once, with the same losses.
    assert _logged(work) == _logged(ref_dir)


def _logged(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    return [(r["kind"], r["step"], r.get("loss")) for r in rows]


def _fell_back(caplog, pattern):
    """The one line restore_latest logs for a step it skipped matches pattern."""
    said = [r.getMessage() for r in caplog.records if r.name == "spjax.checkpoint"]
    assert len(said) == 1 and re.search(pattern, said[0]), said


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
    state = {"w": jnp.arange(8, dtype=jnp.float32)}
    ck.save(1, state, {"round": 0})
    ck.save(2, {"w": state["w"] + 1}, {"round": 1})
    step2 = tmp_path / "ck" / "2"
    for root, _, files in os.walk(step2):  # garble every data file of the latest step
        for f in files:
            if not f.endswith(".json") or "meta" in root:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.write(b"\x00garbage\xff" * 4)
    got, meta = ck.restore_latest(state)
    _fell_back(caplog, r"checkpoint .*/2 could not be restored")
    assert meta == {"round": 0} and np.array_equal(np.asarray(got["w"]), np.arange(8))
    ck.close()


def test_a_damaged_round_end_step_is_said_for_what_it_is(tmp_path, caplog):
    """A round-end step (params only) is tried as the full layout first, which never fits it: the warning
    named that layout's "tree structures do not match" whatever the damage; it names the read that failed."""
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
    params = {"w": jnp.arange(4096, dtype=jnp.float32)}
    ck.save(1, params, {"round": 0})
    ck.save(2, {"w": params["w"] + 1}, {"round": 1})
    d = tmp_path / "ck" / "2" / "state" / "ocdbt.process_0" / "d"
    os.truncate(max(d.iterdir(), key=lambda f: f.stat().st_size), 100)
    full = {"params": params, "opt": jnp.zeros(3)}
    got, meta = ck.restore_latest(full, others=[(params, lambda p: {"params": p, "opt": jnp.zeros(3)})])
    _fell_back(caplog, r"checkpoint .*/2 could not be restored \(ValueError: OUT_OF_RANGE: ")
    assert meta == {"round": 0} and np.array_equal(np.asarray(got["params"]["w"]), np.arange(4096))
    ck.close()


def test_damaged_bytes_that_still_decompress_fall_back(tmp_path, caplog):
    """Damaged bytes inside a step's compressed data often still decompress, to other values: the resume
    went on from them without a word. The checksums saved with each step catch it. (Here the latest
    step's arrays are another step's: other values that read back cleanly, as such damage does.)"""
    import shutil
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    ck.save(1, {"w": w}, {"round": 0})
    ck.save(2, {"w": w * 2}, {"round": 1})
    shutil.rmtree(tmp_path / "ck" / "2" / "state")
    shutil.copytree(tmp_path / "ck" / "1" / "state", tmp_path / "ck" / "2" / "state")
    got, meta = ck.restore_latest({"w": jnp.zeros((64, 64))})
    _fell_back(caplog, r"checkpoint .*/2 could not be restored \(ValueError: step 2: array 0 differs from the one "
                       r"saved \(checksum\)")
    assert meta == {"round": 0} and np.array_equal(np.asarray(got["w"]), np.asarray(w))
    ck.close()


_DAMAGED_STEP = """
import os, sys
import jax.numpy as jnp, numpy as np
from spjax import checkpoint as ckpt_lib
ck = ckpt_lib.Checkpointer(sys.argv[1], keep=3, async_save=False)
rng = np.random.default_rng(0)
state = {f"w{i}": jnp.asarray(rng.normal(size=(256, 64)).astype(np.float32)) for i in range(16)}
ck.save(1, state, {"round": 0})
ck.save(2, {k: v + 1 for k, v in state.items()}, {"round": 1})
data = os.path.join(sys.argv[1], "2", "state", "ocdbt.process_0", "d")
for f in os.listdir(data):
    os.truncate(os.path.join(data, f), 100)
got, meta = ck.restore_latest(ckpt_lib.abstract_like(state))
print(meta, bool(jnp.array_equal(got["w3"], state["w3"])))
ck.close()
"""


def test_a_damaged_step_is_said_in_one_line(tmp_path):
    """orbax's other reads of a step whose read failed raised again when collected: 8 "Exception ignored in:
    <coroutine ...>" reports of ~70 lines each (571 lines) around the one line that says the step was skipped."""
    got = subprocess.run([sys.executable, "-c", _DAMAGED_STEP, str(tmp_path / "ck")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0 and got.stdout.strip() == "{'round': 0} True", got.stderr[-3000:]
    said = got.stderr.strip().splitlines()
    assert len(said) == 1 and re.search(r"checkpoint .*/2 could not be restored \(ValueError: OUT_OF_RANGE: .*; "
                                        r"falling back to an earlier one$", said[0]), got.stderr[-3000:]


def test_checksums_see_any_one_changed_element_and_a_change_of_all():
    """Before (bits times index * K + 1, summed): the multiplier was even at odd flat indices, so a sign
    flip there (bit 31 times an even number, mod 2^32) left the sum as it was; and x -> 2x (+1 on every
    exponent) added 2^23 times a sum of multipliers that was 0 mod 2^9."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))
    base = ckpt_lib.checksums([x])
    for i in range(x.size):
        flipped = x.reshape(-1).at[i].multiply(-1).reshape(x.shape)
        assert ckpt_lib.checksums([flipped]) != base, i
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    assert ckpt_lib.checksums([w * 2]) != ckpt_lib.checksums([w])
    assert ckpt_lib.checksums([w * 2], legacy=True) == ckpt_lib.checksums([w], legacy=True)
    assert ckpt_lib.checksums([w.T]) != ckpt_lib.checksums([w])  # elements moved
    assert ckpt_lib.checksums([jnp.int32(3)]) != ckpt_lib.checksums([jnp.int32(4)])  # a step counter
    # every leaf a state may hold: a flag, a typed key (bitcast refused both: every save would fail)
    for a, b in [(jnp.array([True, False]), jnp.array([True, True])), (jax.random.key(0), jax.random.key(1))]:
        assert ckpt_lib.checksums([a]) != ckpt_lib.checksums([b])
    assert ckpt_lib.checksums([x.reshape(-1).at[1].multiply(-1)], legacy=True) == \
        ckpt_lib.checksums([x.reshape(-1)], legacy=True)  # the legacy multiplier's blind spot (earlier runs' sums)


@pytest.mark.parametrize("error", [RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4.0GiB"),
                                   OSError(5, "Input/output error"),
                                   # tensorstore's own, no OSError behind it (an unreadable file, as a user
                                   # without root meets it; before: the good step was moved aside as corrupt)
                                   ValueError('PERMISSION_DENIED: Error reading "params.layers.o/0.0.0.0" in OCDBT '
                                              'database at local file "/w/checkpoints/8/state/": Failed to open: '
                                              '"/w/checkpoints/8/state/ocdbt.process_0/d/281c": Permission denied '
                                              "[os_error_code='13']")])
def test_restore_out_of_memory_or_io_error_is_not_corruption(tmp_path, monkeypatch, error):
    """A restore that fails for want of memory, or on a failing file system, stops the run and keeps
    the checkpoint (before: every checkpoint was moved aside as corrupt and the run started over)."""
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
    ck.save(1, {"w": jnp.arange(8, dtype=jnp.float32)}, {"round": 0})

    def fail(*args, **kwargs):
        raise ValueError("restore failed") from error  # as orbax wraps what it meets
    monkeypatch.setattr(ck, "_read", fail)
    with pytest.raises(ValueError, match="restore failed"):
        ck.restore_latest({"w": jnp.zeros(8)})
    assert os.listdir(tmp_path / "ck") == ["1"]
    ck.close()


def test_resume_after_corrupting_latest_checkpoint_redoes_work(reference_run, tfds_dir, tmp_path):
    ref_dir, _ = reference_run
    work = tmp_path / "run"
    shutil.copytree(ref_dir, work)
    shutil.rmtree(work / "export")
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    latest = work / "checkpoints" / str(steps[-1])
    shutil.rmtree(latest / "state")
    os.makedirs(latest / "state")
    resumed = _train(work, "--resume", tfds_dir=tfds_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("could not be restored") == 1, resumed.stderr[-3000:]  # once (was twice)
    _assert_same_run(work, ref_dir)


@pytest.mark.parametrize("override,message", [
    ("run.bogus=1", "run.bogus: unknown key"),
    ("run.batch_size=two", "run.batch_size: expected int, got 'two'"),
    ("run.batch_size=12", "run.batch_size: 12 is not divisible by the data-parallel size 8"),
    ("model_path=/nonexistent/model", "model_path: /nonexistent/model does not exist"),
    ("objective.name=dpo", "objective.name: 'dpo' not one of"),
    ("run.keep_best=judge_score", "run.keep_best: 'judge_score' needs a judge"),
    ("model.lora.rank=4", "model.lora: set lora (top level)"),  # before: silently a full fine-tune
    ("run=5", "run: a group of settings"),  # before: AttributeError
    ("data.buckets=0", "data.buckets: lengths must be positive"),  # these three: after start.json was written
    ("data.path=", "data.path: empty"),
    ("data.path=./nope.jsonl", "data.path: './nope.jsonl': no such file or directory"),
])
def test_bad_config_fails_fast_with_one_line(tmp_path, capsys, override, message):
    from spjax import train
    assert train.main(["--config", TINY, "--workdir", str(tmp_path / "w"), override]) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "w")


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    """It was exit 3, 'I/O error: ... File exists ... free space or fix permissions, then rerun with --resume'."""
    from spjax import train
    (tmp_path / "w").write_text("notes")
    assert train.main(["--config", TINY, "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"spjax: config error: --workdir {tmp_path / 'w'}: a file, "
                                                            "not a directory"]
    assert (tmp_path / "w").read_text() == "notes"


def test_fewer_training_examples_than_one_batch_is_one_line(tmp_path, capsys, tfds_dir):
    """Before: the run sampled and scored every round, trained nothing, and exported the initial model."""
    from spjax import train
    argv = ["--config", TINY, "--workdir", str(tmp_path / "w"), "data.max_examples=8", f"data.tfds_dir={tfds_dir}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err  # (after the tokenization progress bars)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "spjax: config error: run.batch_size: 16 is more than the 8 training examples: no training step would run "
        "(lower it, or add data)"), err


def test_a_tokenizer_past_the_vocabulary_is_one_line(tmp_path, capsys, tfds_dir):
    """Before: ids past the embedding table gave NaN rows, which the default nonfinite=skip dropped as
    skipped steps (or a NaN sampler), never naming the tokenizer."""
    from spjax import train
    argv = ["--config", TINY, "--workdir", str(tmp_path / "w"), "model.vocab_size=200", f"data.tfds_dir={tfds_dir}"]
    assert train.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "spjax: config error: tokenizer_path: the tokenizer (bytes) has ids up to 258, past the model's vocab_size "
        "200: it is not this model's tokenizer")


@pytest.mark.parametrize("value", ["1s", "-1", "nan"])
def test_bad_compile_cache_setting_is_one_line(tmp_path, capsys, monkeypatch, value):
    from spjax import train
    monkeypatch.setenv("SPJAX_COMPILE_CACHE_MIN_SECS", value)
    assert train.main(["--config", TINY, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"spjax: config error: SPJAX_COMPILE_CACHE_MIN_SECS: expected seconds >= 0, got '{value}'"], err
    assert not os.path.exists(tmp_path / "w")


def test_nonfinite_raise_stops_at_that_step_in_one_line_with_the_state_before_it_saved(tfds_dir, tmp_path):
    """optim.nonfinite=raise: the first non-finite step ends the run (exit 4, one line), its update
    dropped and the state before it checkpointed (before: found steps later, nothing saved, a traceback)."""
    proc = _train(tmp_path / "w", "--resume", "optim.lr=1e30", "optim.nonfinite=raise", tfds_dir=tfds_dir)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert f"--resume: {tmp_path / 'w'} holds no run yet: starting one" in proc.stdout  # said, not silent
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spjax: non-finite step: step 1: non-finite loss/grad") and "--resume" in last, last
    steps = sorted(int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit())
    assert steps == [1]  # one finite step taken; the second's update dropped


def test_refuses_to_overwrite_a_run_without_resume(reference_run, tfds_dir):
    workdir, _ = reference_run
    with pytest.raises(ConfigError, match="holds a run already"):
        rounds.setup(load_config(TINY, [f"data.tfds_dir={tfds_dir}"]), str(workdir), resume=False)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_two_processes(workdir, *args, tfds_dir=None):
    """2 local processes x 4 CPU devices (gloo collectives) standing in for 2 hosts: process 0's stdout."""
    cmd = [sys.executable, "-m", "spjax.train", "--config", TINY, "--workdir", str(workdir), *args,
           f"data.tfds_dir={tfds_dir}"]
    return _two_processes(cmd)[0]


def _run_two(cmd, timeout=600, envs=({}, {}), args=((), ())) -> list:
    """Run `cmd` as 2 processes x 4 CPU devices meeting through jax.distributed (process i with envs[i]
    added to its environment and args[i] to its command): their (returncode, stdout, stderr)."""
    port = _free_port()
    procs = [subprocess.Popen([*cmd, *args[i]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(XLA_FLAGS=_devices_flags(4), JAX_PLATFORMS="cpu",
                                       SPJAX_COORDINATOR=f"localhost:{port}", SPJAX_NUM_PROCESSES="2",
                                       SPJAX_PROCESS_ID=str(i), **envs[i]))
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:  # one process failing leaves the other waiting in a collective: never leave it running
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _devices_flags(n: int) -> str:
    """conftest's XLA_FLAGS with n CPU devices a process instead of 8."""
    return os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8",
                                           f"--xla_force_host_platform_device_count={n}")


def _two_processes(cmd, timeout=600) -> list:
    """Run `cmd` as 2 processes (see _run_two), both to exit 0: their stdouts."""
    got = _run_two(cmd, timeout)
    for rc, _, err in got:
        assert rc == 0, err[-3000:]
    return [out for _, out, _ in got]


@pytest.mark.parametrize("extra, step, says", [
    ("tokenizer_path=/nonexistent/tokenizer", "checking the config",
     "tokenizer_path: /nonexistent/tokenizer does not exist"),
    ("run.epochs=2", "checking the config against start.json", "run.epochs: 1 -> 2")])
def test_a_failure_on_one_host_stops_every_host_at_once_with_its_status(tmp_path, tfds_dir, extra, step, says):
    """A file only one host lacks (its tokenizer_path), a config only one host has: before, that process
    failed alone, the other waited in its next collective, and both aborted 5 minutes later at JAX's
    shutdown barrier (status 134, the config error's 2 lost). Now each says why in one line, status 2."""
    got = _run_two([sys.executable, "-m", "spjax.train", "--config", TINY, "--workdir", str(tmp_path / "run"),
                    f"data.tfds_dir={tfds_dir}"], 120, args=((), (extra,)))
    errs = [err for _, _, err in got]
    assert [rc for rc, _, _ in got] == [2, 2], errs
    assert f"spjax: config error: {step} failed on process 1" in errs[0], errs[0][-2000:]
    assert says in errs[1], errs[1][-2000:]


_HOST_DATA = """
import sys, tempfile
import jax, numpy as np
from spjax import ledger, sharding as shd
from spjax.config import ConfigError
from spjax.data.tokens import TokenizedExample
shd.init_distributed()
n = 4 + (jax.process_index() if sys.argv[1] == "differ" else 0)  # host 1's copy of the data: other prompts
ex = [TokenizedExample(id=0, prompt_ids=np.arange(n, dtype=np.int32), real_ids=np.arange(3, dtype=np.int32))]
try:
    ledger.check_data(tempfile.mkdtemp(), {"train": ex, "test": []}, resume=False)
    print("accepted")
except ConfigError as e:
    print("refused:", e)
"""


def test_hosts_reading_other_data_are_refused():
    """Each host reads data.path itself: a host whose copy differs trained on a mix of two datasets
    without a word (or, with another count, crashed in a collective mismatch)."""
    for how, said in (("same", "accepted"), ("differ", "refused: the data (data.path, data.eval_path, tokenizer) "
                                                      "gives other token ids on process 1 than on process 0")):
        outs = _two_processes([sys.executable, "-c", _HOST_DATA, how], 300)
        assert all(out.strip().splitlines()[-1].startswith(said) for out in outs), outs


_EXPORT_FAILS = """
import os, sys
import jax, numpy as np
from safetensors import numpy as st
from spjax import hf, sharding as shd
from spjax.config import MeshConfig, load_config
shd.init_distributed()
cfg = load_config(sys.argv[2]).model
mesh = shd.make_mesh(MeshConfig(data=1, fsdp=8))
params = shd.init_params(cfg, jax.random.key(0), mesh)  # every leaf split over both hosts
assert not params["layers"]["q"].is_fully_addressable
real_save, saves = st.save_file, []
def save(*a, **kw):  # process 0's disk fills at its second shard, mid-export
    saves.append(1)
    if len(saves) == 2 and sys.argv[3] == "full":
        raise OSError(28, "No space left on device")
    return real_save(*a, **kw)
st.save_file = save
out = os.path.join(sys.argv[1], "export")
try:
    hf.save_pretrained(cfg, params, out, max_shard_bytes=64 << 10)
    print("exported")
except OSError as e:
    print("raised:", e)
shd.barrier("after the export")  # (a process left inside a gather never gets here)
want = jax.tree.map(shd.to_host, params)  # (a collective: both hosts)
if jax.process_index() == 0 and sys.argv[3] == "ok":
    _, back = hf.load_pretrained(out)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), back, want)
    print("equal" if all(jax.tree.leaves(same)) else "differ")
if sys.argv[3] == "ok":  # imported again over both hosts: each builds only its devices' part of each leaf
    from spjax import tensor_names
    built, real_stacked = [], tensor_names.stacked
    def stacked(n, piece):
        out = real_stacked(n, piece)
        built.extend(x.size for x in out)
        return out
    tensor_names.stacked = stacked
    from spjax.config import LoraConfig
    for quant in ("none", "int8"):
        built.clear()
        lora = dict(base_quant=quant, lora=LoraConfig(rank=4)) if quant != "none" else {}
        _, placed = hf.load_pretrained(out, mesh=mesh, **lora)
        part = sum(built) / sum(x.size for k, x in placed["layers"].items() if "_lora_" not in k)  # (adapters: not read)
        _, alone = hf.load_pretrained(out, **lora)  # this host alone, no mesh: whole leaves
        same = all(np.array_equal(np.asarray(s.data), np.asarray(b)[s.index])
                   for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(alone), strict=True)
                   for s in a.addressable_shards)
        spans = not placed["layers"]["q"].is_fully_addressable
        print(f"placed {quant}:", "equal" if same and spans else "differ", f"built {part:.2f}")
print("done")
"""


def test_an_export_failing_on_host_0_midway_leaves_no_host_waiting(tmp_path):
    """Params are gathered a layer at a time as process 0 writes them, so that host never holds the whole
    model; a write failing midway (a full disk at the second shard) must still take its part in the other
    host's remaining gathers, or that host waits in one for good. The same export, not failing, loads back
    to the params bit for bit."""
    for how in ("full", "ok"):
        outs = _two_processes([sys.executable, "-c", _EXPORT_FAILS, str(tmp_path / how), TINY, how], 120)
        if how == "full":
            assert "raised: [Errno 28] No space left on device" in outs[0] and "exported" in outs[1], outs
            assert not os.path.exists(tmp_path / how / "export")  # nothing half-written
        else:
            assert "equal" in outs[0] and all("exported" in out for out in outs), outs
            for quant in ("none", "int8"):  # each host built about half of the layers' weights (the norms whole)
                said = [re.search(f"placed {quant}: (\\w+) built ([0-9.]+)", out) for out in outs]
                assert all(m and m[1] == "equal" and float(m[2]) < 0.55 for m in said), outs
        assert all(out.strip().endswith("done") for out in outs), outs


_ONE_HOST_DAMAGE = """
import errno, logging, os, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from spjax import checkpoint as ckpt_lib, sharding as shd
shd.init_distributed()
full = np.arange(8 * 4096, dtype=np.float32).reshape(8, 4096)
mesh = Mesh(np.asarray(jax.devices()), ("x",))
state = {"w": jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("x")), lambda i: full[i])}
ck = ckpt_lib.Checkpointer(sys.argv[1], async_save=False)
ck.save(1, state, {"step": 1}, wait=True)
ck.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2}, wait=True)
shd.barrier("saved")
if jax.process_index() == 1 and sys.argv[2] == "damaged":  # the bytes only process 1's shards are in
    d = os.path.join(sys.argv[1], "2", "state", "ocdbt.process_1", "d")
    for f in os.listdir(d):
        os.truncate(os.path.join(d, f), 100)
if jax.process_index() == 1 and sys.argv[2] == "unreadable":
    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")
    ck._read = fail
said = []
logging.getLogger("spjax.checkpoint").addHandler(logging.Handler())
logging.getLogger("spjax.checkpoint").handlers[-1].emit = lambda r: said.append(r.getMessage())
try:
    got, meta = ck.restore_latest(ckpt_lib.abstract_like(state))
except Exception as e:
    print("raised:", e)
    sys.exit(0)
w = np.asarray(jax.experimental.multihost_utils.process_allgather(got["w"], tiled=True))
print(meta, np.array_equal(w, full + meta["step"] - 1), *said, sorted(os.listdir(sys.argv[1])))
"""


@pytest.mark.parametrize("how", ["damaged", "unreadable"])
def test_a_checkpoint_failing_on_one_host_falls_back_or_stops_on_every_host(tmp_path, how):
    """Each host reads its own shards of a step. One whose read failed went on to the processes' agreement
    while the others waited in orbax's barrier after their read: a collective mismatch, and both aborted
    (after 100 s). Now: damaged bytes on one host fall back to the step before on both; a failing file
    system on one stops both, nothing moved."""
    outs = [out.strip().splitlines()[-1] for out in
            _two_processes([sys.executable, "-c", _ONE_HOST_DAMAGE, str(tmp_path / "ck"), how], 300)]
    if how == "unreadable":
        assert outs[1] == "raised: [Errno 5] Input/output error", outs
        assert outs[0].startswith("raised: checkpoint ") and "another process ran out of memory or could not " \
            "read it (not moved aside)" in outs[0], outs
        assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]
        return
    assert all(out.startswith("{'step': 1} True checkpoint ") for out in outs), outs
    assert "/2 could not be restored (ValueError: OUT_OF_RANGE: " in outs[1], outs
    assert "/2 could not be restored (RuntimeError: the read failed on process 1: its output says why)" in outs[0], outs
    assert "['1', '2.corrupt-" in outs[0], outs  # moved aside once, by process 0


_SIGTERM = """
import os, signal, time
from spjax import sharding as shd
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # as spjax.train.main does, before rounds.setup
shd.init_distributed()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(1)
print("handled" if got else "swallowed")
"""


def test_a_schedulers_sigterm_reaches_spjax_on_several_hosts():
    """JAX's preemption service installed its own SIGTERM handler at jax.distributed.initialize, over spjax.train's:
    on several hosts a SIGTERM was swallowed and the run went on to the end (exit 0), not one line and exit 143."""
    assert [out.strip().splitlines()[-1] for out in _two_processes([sys.executable, "-c", _SIGTERM], 300)] == \
        ["handled", "handled"]


def test_a_host_killed_mid_round_stops_the_others_with_one_line(tmp_path, tfds_dir):
    """Process 1 SIGKILLed (OOM killer, a lost host) at its 2nd training step: process 0's collective fails.
    It printed a 55-line JaxRuntimeError traceback (Gloo ... Connection reset by peer); now one line that
    says another process stopped and how to continue on every host, status 1."""
    work = tmp_path / "run"
    (rc0, _, err0), (rc1, _, _) = _run_two(
        [sys.executable, "-m", "spjax.train", "--config", TINY, "--workdir", str(work), f"data.tfds_dir={tfds_dir}"],
        300, envs=({}, {"SPJAX_KILL_AT": "train:2"}))
    assert (rc0, rc1) == (1, -9), err0[-3000:]
    assert "Traceback" not in err0, err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("spjax: another process of this run stopped, so this one stops too ("), last
    assert last.endswith(f"Continue on every host with: python -m spjax.train --config {TINY} --workdir {work} "
                         f"data.tfds_dir={tfds_dir} --resume"), last


_INTERLEAVED = """
import types
import jax, numpy as np
from spjax import rounds, sharding as shd
shd.init_distributed()
# A TPU slice's topology-aware mesh can interleave hosts along the batch axes (v5p-32, fsdp=16:
# processes 0,1,2,3,0,1,...); here: process 0's and 1's devices alternate.
devs = sorted(jax.devices(), key=lambda d: (d.id % 4, d.process_index))
mesh = jax.sharding.Mesh(np.asarray(devs).reshape(8, 1, 1), shd.AXES)
rng = np.random.default_rng(0)
rows = {k: rng.integers(0, 100, (16, 8)).astype(np.int32)
        for k in ("tokens_RxL", "segments_RxL", "positions_RxL", "targets_RxL", "seqs_RxL")}
rows["example_id_B"] = rng.permutation(8).astype(np.int32)
per_pair = tuple(rng.normal(size=8).astype(np.float32) for _ in range(4))
batch = rounds.device_batch(types.SimpleNamespace(mesh=mesh), rows, per_pair, packed=True)
assert np.array_equal(shd.to_host(batch.tokens_RxL), rows["tokens_RxL"])
assert np.array_equal(shd.to_host(batch.ref_real_B), per_pair[0][rows["example_id_B"]])
print("same global batch")
"""


def test_device_batch_is_the_global_batch_on_a_mesh_that_interleaves_hosts():
    """Each process used to supply rows [p * share, (p + 1) * share), which land where its devices sit in
    the mesh: with hosts interleaved (a TPU slice's mesh), pairs' reference scores met other pairs'
    log-probs. Now every process holds the whole batch and supplies the slices its devices own."""
    assert all("same global batch" in out for out in _two_processes([sys.executable, "-c", _INTERLEAVED], 300))


def _assert_exports_close(got_dir, want_dir):
    """The export of a 2-process run against the same run's on one process."""
    from safetensors.numpy import load_file
    got = load_file(os.path.join(got_dir, "export", "model.safetensors"))
    want = load_file(os.path.join(want_dir, "export", "model.safetensors"))
    assert got.keys() == want.keys()
    # Cross-process reductions round differently from in-process ones; AdamW divides by sqrt(v),
    # so an entry whose gradient is a near-cancelling sum (a rarely seen byte's embedding) can turn
    # that noise into a visible part of an lr-sized (1e-3) step. Measured: one embedding element
    # of 16,576 at 7e-6 to 3e-5 depending on the head's reduction order, every other entry of every
    # param <= 4e-6. A wrong data split, reference or gradient moves whole tensors by ~lr instead.
    diff = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in want])
    assert np.mean(diff > 1e-5) <= 1e-4, np.sort(diff)[-10:]
    assert diff.max() <= 1e-4


def test_two_processes_match_one_process(reference_run, tfds_dir, tmp_path):
    """2 processes x 4 devices give the export of 1 x 8 (the reference run)."""
    ref_dir, _ = reference_run
    out = _train_two_processes(tmp_path / "run", tfds_dir=tfds_dir)
    assert "exported the final model" in out
    _assert_exports_close(tmp_path / "run", ref_dir)


# ---------------------------------------------------------------------------------------------
# Preference data: (prompt, chosen, rejected) records train chosen-vs-rejected, as given


def _write_preferences(path, n=96):
    """'Say W twice.' -> chosen 'W W', rejected 'W V' (the second word wrong, same length)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            w = "".join(rng.choice(letters, size=int(rng.integers(2, 5))))
            v = "".join(rng.choice(letters, size=len(w)))
            f.write(json.dumps({"prompt": f"Say {w} twice.", "chosen": f"{w} {w}", "rejected": f"{w} {v}"}) + "\n")
    return str(path)


PREF_ARGS = ("run.rounds=2", "data.format=preference")


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory):
    """The same preference file trained by chi2 (pairs as given) and by the SFT baseline."""
    root = tmp_path_factory.mktemp("pref")
    data = _write_preferences(root / "pref.jsonl")
    out = {}
    for name in ("chi2", "sft"):
        proc = _train(root / name, f"data.path={data}", f"objective.name={name}", *PREF_ARGS,
                      tfds_dir=str(root / "tfds"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (root / name, proc.stdout)
    return data, str(root / "tfds"), out


def test_preference_batches_hold_the_rejected_responses(preference_runs, tmp_path):
    from spjax import pairs as pairs_lib
    from spjax.data import batching
    data, tfds, runs = preference_runs
    assert "pairs: data (run.pairs=auto)" in runs["chi2"][1]
    cfg = load_config(TINY, [f"data.path={data}", f"data.tfds_dir={tfds}", *PREF_ARGS])
    ctx, params = rounds.setup(cfg, str(tmp_path / "w"), resume=False, echo=lambda s: None)
    assert ctx.source == "data"
    got = pairs_lib.form_pairs(ctx, params, 0, ctx.held)
    assert not os.path.exists(ctx.round_dir(0))  # nothing was sampled
    records = [json.loads(line) for line in open(data, encoding="utf-8")]
    rejected = {f"Say {r['prompt'].split()[1]} twice.": r["rejected"] for r in records}
    batch, _ = next(batching.pair_batches(got.splits["train"], cfg.run.batch_size, seed=0, buckets=ctx.buckets,
                                          pad_id=ctx.pad_id))
    tok = ctx.tokenizer
    for row, i in enumerate(batch["example_id_B"]):
        ex = got.splits["train"][i]
        gen = batch["generated"]
        answer = gen["input_ids_BxL"][row][gen["target_mask_BxL"][row].astype(bool)]
        prompt = tok.decode(ex.prompt_ids, skip_special_tokens=True)
        want = rejected[next(p for p in rejected if p in prompt)]
        assert tok.decode(answer, skip_special_tokens=True) == want
    ctx.checkpointer.close()


def _pref_margin(workdir, data, tfds):
    """Mean log p(chosen) - log p(rejected) over the training pairs: (initial model, exported model)."""
    from spjax import pairs as pairs_lib, scoring
    cfg = load_config(TINY, [f"data.path={data}", f"data.tfds_dir={tfds}", *PREF_ARGS])
    ctx, params0 = rounds.setup(cfg, str(workdir) + "-score", resume=False, echo=lambda s: None)
    ex = pairs_lib.form_pairs(ctx, params0, 0, ctx.held).splits["train"]
    _, trained = spjax.load_pretrained(os.path.join(workdir, "export"), mesh=ctx.mesh)
    margin = lambda p: float(np.mean(scoring.score_examples(ctx, p, ex, "real_ids")
                                     - scoring.score_examples(ctx, p, ex, "generated_ids")))
    out = margin(params0), margin(trained)
    ctx.checkpointer.close()
    return out


def test_preference_pairs_grow_the_margin_more_than_sft(preference_runs):
    data, tfds, runs = preference_runs
    before, chi2 = _pref_margin(runs["chi2"][0], data, tfds)
    before_sft, sft = _pref_margin(runs["sft"][0], data, tfds)
    assert before == before_sft
    # Measured (2 rounds of 4 steps): chi2 on the pairs +0.86 nats, SFT on the chosen side +0.09;
    # SFT lifts the shared first word of the rejected answer along with the chosen one.
    assert chi2 - before > 0.5 and chi2 - before > 4 * max(sft - before, 0.0), (before, chi2, sft)
    # SFT's rows hold its own metrics, no pair metric (before: rewards equal, frac_at_bound 1, accuracy 0.5)
    rows = [json.loads(line) for line in open(runs["sft"][0] / "metrics.jsonl")]
    for kind in ("train", "round"):
        row = next(r for r in rows if r["kind"] == kind)
        assert not {"accuracy", "margin", "reward_real", "frac_at_bound", "pair_loss", "eval_accuracy"} & set(row), row
        assert {"lp_real", "train_nll" if kind == "round" else "nll"} <= set(row), row


def test_preference_run_killed_then_resumed_is_bitwise_identical(preference_runs, tmp_path):
    data, tfds, runs = preference_runs
    work = tmp_path / "run"
    args = (f"data.path={data}", "objective.name=chi2", *PREF_ARGS)
    # Round 0: scoring with the chosen side scored; then round 1 at step 3 of its resumed run.
    for k, kill_at in enumerate(["score:1", "train:7"]):
        killed = _train(work, *(["--resume"] if k else []), *args, kill_at=kill_at, tfds_dir=tfds)
        assert killed.returncode == -9, (kill_at, killed.returncode, killed.stderr[-2000:])
    resumed = _train(work, "--resume", *args, tfds_dir=tfds)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at round 1, phase train, step 2" in resumed.stdout
    _assert_same_run(work, runs["chi2"][0])


# ---------------------------------------------------------------------------------------------
# A full disk mid-run: one clear line, nothing lost; --resume after freeing space finishes the run


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" if not os.path.ismount(path) else f"remount,size={size}"
    args = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    return subprocess.run(args, capture_output=True, text=True)


def test_full_disk_stops_with_one_line_then_resume_is_bitwise_identical(reference_run, tfds_dir, tmp_path):
    ref_dir, _ = reference_run
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "600k") if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:  # CI runs as root, where tmpfs mounts work
        pytest.skip(f"a small tmpfs needs root and mount: {mounted.stderr if mounted else 'not root'}")
    try:
        work = disk / "run"
        full = _train(work, tfds_dir=tfds_dir)  # the run's first checkpoint (2 MiB) does not fit
        assert full.returncode == 3, full.stderr[-3000:]
        assert "the round-end checkpoints alone need" in full.stdout  # said at the start, before any work
        lines = [l for l in full.stderr.replace("\r", "\n").splitlines() if l.startswith("spjax:")]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], lines
        assert "Traceback" not in full.stderr
        assert _mount_tmpfs(disk, "64m").returncode == 0  # space freed
        resumed = _train(work, "--resume", tfds_dir=tfds_dir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _assert_same_run(work, ref_dir)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_read_only_workdir_is_one_line(tmp_path, tfds_dir):
    work = tmp_path / "ro"
    work.mkdir()
    os.chmod(work, 0o555)
    try:
        if os.access(work, os.W_OK):  # root writes anyway: make it a read-only bind mount instead
            bound = subprocess.run(["mount", "--bind", "-o", "ro", str(work), str(work)], capture_output=True)
            if bound.returncode != 0:
                pytest.skip("cannot make a read-only directory as root here")
        proc = _train(work / "run", tfds_dir=tfds_dir)
        assert proc.returncode == 3, proc.stderr[-3000:]
        lines = [l for l in proc.stderr.replace("\r", "\n").splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("spjax: I/O error:") and "run" in lines[0], lines
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True)
        os.chmod(work, 0o755)


def test_keep_best_without_held_out_examples_is_one_line(tmp_path, capsys):
    """data.eval_frac=0 without data.eval_path: no held-out split, so nothing to pick the best round by
    (before: NaN held-out rows, and keep_best exported an arbitrary round)."""
    from spjax import train
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(40)))
    args = ["--config", TINY, "--workdir", str(tmp_path / "w"), f"data.path={data}", "data.eval_frac=0",
            f"data.tfds_dir={tmp_path / 'tfds'}", "run.keep_best=nll"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1:] == ["spjax: config error: run.keep_best=nll: the data has no held-out examples to pick by "
                        "(set data.eval_frac > 0 or data.eval_path)"], err
    # An eval file whose every record data.unencodable=drop dropped: said so, not blamed on unset settings.
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"q{i} <|im_end|>", "response": "a."}) + "\n" for i in range(3)))
    args = args[:3] + [str(tmp_path / "w2"), args[4], f"data.eval_path={held}", "data.unencodable=drop"] + args[6:]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spjax: config error: run.keep_best=nll: the data has no held-out examples to pick by "
                              "(all 3 held-out records were dropped: 3 examples, 0 kept;")
    assert "3 as unencodable" in err[-1]


def test_keep_best_exports_the_best_round_and_stop_when_worse_stops(tfds_dir, tmp_path):
    """The tiny model's greedy answers are empty, so held-out F1 ties at 0: round 0 stays the best
    (the earliest of equals), round 1 is one round without improvement, and the run stops there."""
    from spjax import scoring
    work = tmp_path / "run"
    proc = _train(work, "run.rounds=3", "run.keep_best=f1", "run.stop_when_worse=1", tfds_dir=tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopping after round 1: 1 rounds without a better held-out f1" in proc.stdout
    assert "kept round 0: held-out f1 0" in proc.stdout
    assert not os.path.exists(work / "rounds" / "round_002") and not os.path.exists(work / "best")
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "round"] == [0, 1]
    # The export is round 0's model: its held-out NLL is round 0's, not round 1's.
    cfg = load_config(TINY, [f"data.tfds_dir={tfds_dir}"])
    ctx, _ = rounds.setup(cfg, str(tmp_path / "score"), resume=False, echo=lambda s: None)
    _, exported = spjax.load_pretrained(str(work / "export"), mesh=ctx.mesh)
    lp = scoring.score_examples(ctx, exported, ctx.held, "real_ids")
    nll = float(-(lp.sum() / np.asarray([max(len(e.real_ids), 1) for e in ctx.held], np.float32).sum()))
    evals = [artifacts.load_json(str(work / "rounds" / f"round_{t:03d}" / "eval.json"))["nll"] for t in (0, 1)]
    assert nll == pytest.approx(evals[0], abs=1e-6) and abs(nll - evals[1]) > 1e-4, (nll, evals)
    ctx.checkpointer.close()
    # `spjax export` would have replaced the kept round with the latest checkpoint (and nothing else holds it)
    from spjax import cli
    before = _export_bytes(work)
    assert cli.main(["export", "--config", TINY, "--workdir", str(work), "run.rounds=3", "run.keep_best=f1",
                     "run.stop_when_worse=1", f"data.tfds_dir={tfds_dir}"]) == 2
    assert _export_bytes(work) == before
    # Resumed with a looser rule it trains round 2; a stricter rule at a later resume of the finished run is
    # applied at its last round only (before: 'stopping after round 1', round 2's row cut from the summary).
    args = ["run.rounds=3", "run.keep_best=f1"]
    assert _train(work, "--resume", *args, "run.stop_when_worse=2", tfds_dir=tfds_dir).returncode == 0
    again = _train(work, "--resume", *args, "run.stop_when_worse=1", tfds_dir=tfds_dir)
    assert again.returncode == 0 and "stopping after" not in again.stdout, again.stdout[-3000:]
    assert "the run's 3 rounds are done" in again.stdout and "kept round 0: held-out f1 0, the best of rounds 0-2" \
        in again.stdout


def test_fewer_rounds_than_a_run_has_done_is_one_line(reference_run, tfds_dir, tmp_path, capsys):
    """Before: the resume exported the latest checkpoint, a later round's model (or a half-trained one)."""
    from spjax import train
    work = tmp_path / "run"
    shutil.copytree(reference_run[0], work)
    assert train.main(["--config", TINY, "--workdir", str(work), "--resume", "run.rounds=1",
                       f"data.tfds_dir={tfds_dir}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"spjax: config error: run.rounds=1: the run in {work} is past it (round 2, phase sample); resume with "
        "run.rounds >= 2")
    assert _export_bytes(work) == _export_bytes(reference_run[0])
    # the refused config is not recorded as the run's (before: config.txt said run.rounds=1)
    assert (work / "config.txt").read_text() == (reference_run[0] / "config.txt").read_text()
    # resumed as it is: it says the run was done (before: 'resumed at round 2' and a silent re-export)
    assert train.main(["--config", TINY, "--workdir", str(work), "--resume", f"data.tfds_dir={tfds_dir}"]) == 0
    assert "the run's 2 rounds are done: its rows are read back, and the model exported again" in capsys.readouterr().out
    import signal
    assert signal.getsignal(signal.SIGTERM) is not train._interrupt  # an in-process caller's handler is back
    assert _export_bytes(work) == _export_bytes(reference_run[0])


def test_spjax_export_writes_the_latest_checkpoint(reference_run, tfds_dir, tmp_path, capsys):
    from spjax import cli
    ref_dir, _ = reference_run
    out = tmp_path / "exported"
    assert cli.main(["export", "--config", TINY, "--workdir", str(ref_dir), "--out", str(out)]) == 0
    assert "exported the latest checkpoint (the model after round 1)" in capsys.readouterr().out
    with open(out / "model.safetensors", "rb") as f:  # the run's final params, as its own export
        assert f.read() == _export_bytes(ref_dir)
    assert cli.main(["export", "--config", TINY, "--workdir", str(ref_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    from safetensors.numpy import load_file
    with open(out / "config.json") as f:  # bf16 files from the fp32 master weights
        assert json.load(f)["torch_dtype"] == "bfloat16"
    assert {a.dtype.itemsize for a in load_file(str(out / "model.safetensors")).values()} == {2}
    assert cli.main(["export", "--config", TINY, "--workdir", str(tmp_path / "none")]) == 2
    # Another model's settings, or --out at the run itself: one line, nothing in the run moved or deleted
    # (before: every checkpoint was renamed *.corrupt-*, or the workdir replaced by the export).
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    before = sorted(os.listdir(run)), sorted(os.listdir(run / "checkpoints"))
    capsys.readouterr()
    for args, said in [(["model.num_layers=3"], "model.num_layers: 2 -> 3: these shape the model"),  # start.json
                       (["lora.rank=4"], "lora.rank: 0 -> 4: these shape the model"),
                       (["--out", str(run)], "exists and is not a spjax export"),
                       # a run without start.json (or another model at model_path): its checkpoints say so
                       (["model.num_layers=3"], "holds another model than the config's (params['layers']['attn_norm'] "
                                               "has shape (2, 64), the config's model (3, 64))"),
                       (["lora.rank=4"], "no LoRA adapters, the config's model has them")]:
        assert cli.main(["export", "--config", TINY, "--workdir", str(run), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], (args, err)
        assert (sorted(os.listdir(run)), sorted(os.listdir(run / "checkpoints"))) == before
        if args[0] == "--out":
            os.remove(run / "start.json")
            before = sorted(os.listdir(run)), sorted(os.listdir(run / "checkpoints"))


def _bytes_under(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_round_end_checkpoints_hold_no_optimizer_state(reference_run):
    """The next round rebuilds the optimizer state, so a round's end saves params only (a third of an
    AdamW checkpoint); mid-round checkpoints keep it, which an exact resume mid-round needs."""
    from spjax import saving, sharding as shd
    ref_dir, _ = reference_run
    cfg = load_config(TINY)
    ck = ckpt_lib.Checkpointer(os.path.join(ref_dir, "checkpoints"), async_save=False)
    mid, end = ck.steps()  # keep=2: round 1's step-2 checkpoint (global 6) and its end (global 8)
    state, meta = saving.restore_latest(ck, cfg.model, cfg.optim, shd.make_mesh(cfg.mesh))
    ck.close()
    assert (mid, end, meta["phase"], meta["round"]) == (6, 8, "sample", 2)
    assert state.opt_state is None and int(state.step) == 4
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    mid_bytes, end_bytes = (_bytes_under(os.path.join(ref_dir, "checkpoints", str(s))) for s in (mid, end))
    assert 0.5 * params < end_bytes < 1.5 * params < 2.5 * params < mid_bytes, (params, mid_bytes, end_bytes)
    # What the run said at its start: the same sizes, and no warning on this disk.
    end, mid = saving.checkpoint_bytes(cfg.model, cfg.optim)
    assert end == params and 0 <= mid - 3 * params < 64  # AdamW: 2 moments (and a step count, the lr)
    said = f"checkpoints: {saving.size_text(end)} at a round's end, {saving.size_text(mid)} inside a round"
    assert said in reference_run[1] and saving.size_text(mid) == "1.0 MiB"
    assert "warning:" not in reference_run[1]
