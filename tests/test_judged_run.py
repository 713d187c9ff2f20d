"""Judged self-play end to end on configs/tiny.py: K samples per prompt ranked by a reward model (or a
user's function), INPO against pi_0 and pi_t, SIGKILL while judging then --resume gives the same export,
bit for bit, and 2 processes give the export of 1."""
import json
import math
import os
import sys

import pytest

from tests.test_rounds import (  # noqa: F401 (tfds_dir: a fixture this module uses)
    _assert_exports_close, _export_bytes, _logged, _train, _train_two_processes, _two_processes, tfds_dir)

JUDGED = ["sampling.num_samples=2", "judge.batch_size=16", "objective.name=inpo", "objective.tau=0.05",
          "judge.pairs=best_worst"]


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory, tfds_dir):
    """The judged run, with a reward model as the judge: a tiny random Llama sequence classifier saved
    by transformers, read by spjax in a run that cannot import torch, scored on device and sharded.
    (A python judge's run: test_a_round_without_pairs_trains_nothing_and_goes_on.)"""
    import torch
    import transformers
    from tests.oracle import TINY
    rm_dir = tmp_path_factory.mktemp("reward_model")
    conf = transformers.LlamaConfig(**{**TINY, "vocab_size": 259}, num_labels=1, pad_token_id=0,
                                    tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(conf).float().save_pretrained(rm_dir)
    args = [*JUDGED, f"judge.name=reward_model:{rm_dir}"]
    workdir = tmp_path_factory.mktemp("judged")
    proc = _train(workdir, *args, tfds_dir=tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout, args


def test_judged_run_reports_the_judge(judged_run):
    workdir, out, args = judged_run
    assert "pairs: judged (run.pairs=auto)" in out and f"judge: {args[-1][len('judge.name='):]}" in out
    assert "judge: its params (" in out and "per device) wait in host memory between judge phases" in out
    assert "held-out judge score" in out and "win rate over the previous model" in out
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    rounds = [r for r in rows if r["kind"] == "round"]
    assert len(rounds) == 2
    for r in rounds:
        # judge_mean / judge_best: the opponent's K samples; judge_score / win_rate: greedy held-out answers.
        # A reward model's scores never tie: every prompt's best and worst sample make a pair.
        assert r["judge_best"] > r["judge_mean"] and r["judge_pairs"] == 1
        assert 0 <= r["win_rate"] <= 1 and math.isfinite(r["judge_score"]) and "eval_accuracy" in r
    for t in (0, 1):
        d = os.path.join(workdir, "rounds", f"round_{t:03d}")
        assert os.path.exists(os.path.join(d, "judged_train.npz")) and os.path.exists(os.path.join(d, "answers.json"))
    # INPO keeps both references of the round's pairs; in round 1 pi_0 was reloaded to score them
    import numpy as np
    z = np.load(os.path.join(workdir, "rounds", "round_001", "refs.npz"))
    assert {"train_real", "train_gen", "train_real0", "train_gen0"} <= set(z.files)
    assert not np.allclose(z["train_real"], z["train_real0"])  # pi_1 != pi_0
    z0 = np.load(os.path.join(workdir, "rounds", "round_000", "refs.npz"))
    assert np.array_equal(z0["train_real"], z0["train_real0"])  # round 0: pi_t is pi_0


def test_sigkill_while_judging_then_resume_is_bitwise_identical(judged_run, tfds_dir, tmp_path):
    ref_dir, _, args = judged_run
    work = tmp_path / "run"
    # Round 0 judges 4 train chunks of 16 prompts and 1 held chunk: the 7th is round 1's second chunk.
    killed = _train(work, *args, kill_at="judge:7", tfds_dir=tfds_dir)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    chunks = os.path.join(work, "rounds", "round_001", "judged_train")
    assert sorted(os.listdir(chunks)) == ["chunk_00000.npz", "chunk_00001.npz"]
    resumed = _train(work, "--resume", *args, tfds_dir=tfds_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _export_bytes(work) == _export_bytes(ref_dir)
    assert _logged(work) == _logged(ref_dir)


def test_a_round_without_pairs_trains_nothing_and_goes_on(tfds_dir, tmp_path):
    work = tmp_path / "run"
    proc = _train(work, "judge.name=python:tests.judge_fixture:indifferent", "sampling.num_samples=2",
                  "run.rounds=2", "objective.name=sppo", tfds_dir=tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "judge: python:tests.judge_fixture:indifferent" in proc.stdout  # a user's function as the judge
    assert "round 0: 0 pairs, fewer than one batch" in proc.stdout and "round 1: 0 pairs" in proc.stdout
    rows = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["judge_pairs"] for r in rows if r["kind"] == "round"] == [0.0, 0.0]
    assert os.path.exists(os.path.join(work, "export", "model.safetensors"))


def test_two_processes_match_one_process(judged_run, tfds_dir, tmp_path):
    """Judged self-play on 2 processes x 4 devices gives the export of the 1-process run: K samples
    gathered from both hosts, the reward model judging on both in lockstep (its scores are a
    collective program), INPO's pi_0 reloaded on both."""
    ref_dir, _, args = judged_run
    out = _train_two_processes(tmp_path / "run", *args, tfds_dir=tfds_dir)
    assert "pairs: judged" in out and "exported the final model" in out
    _assert_exports_close(tmp_path / "run", ref_dir)


_HOST_JUDGE = """
import jax, numpy as np
from spjax import judges, sharding as shd
shd.init_distributed()
calls = []
def by_host(queries):  # answers otherwise on each host, as a judge that samples or calls a service may
    calls.append(len(queries))
    return np.full((len(queries), 2), 0.25 + jax.process_index()) + np.arange(2)
qs = [judges.Query("p", ("a", "b"), "r")] * 3
scores, wins = judges.judge_all(judges.Judge("python:by_host", by_host, True), qs)
assert np.array_equal(scores, [[0.25, 1.25]] * 3) and calls == ([3] if jax.process_index() == 0 else []), calls
def broken(queries):
    raise judges.JudgeError("judge python:broken: no")
try:
    judges.judge_all(judges.Judge("python:broken", broken, True), qs)
except judges.JudgeError as e:
    print("raised:", e)
def bad_data():
    raise judges.ConfigError("data.path: bad")
try:  # work on process 0 alone (data preparation): its failure stops both, none waits in a barrier
    shd.on_process_0(bad_data, "preparing the data")
except judges.ConfigError as e:
    print("and:", e)
"""


def test_a_host_judge_answers_once_for_every_process():
    """A judge that is host code runs on process 0 and every process gets its answer (each used to call
    it and form its own pairs: a judge that answered otherwise on another host mixed two runs' pairs);
    its failure stops every process, none waits in the broadcast. So does a failure of other work done on
    process 0 alone (data preparation: the others waited in a barrier for minutes)."""
    first, second = (out.strip().splitlines()[-2:] for out in _two_processes([sys.executable, "-c", _HOST_JUDGE], 300))
    assert first == ["raised: judge python:broken: no", "and: data.path: bad"]  # (gloo's own lines come before)
    assert second == ["raised: on process 0: JudgeError: judge python:broken: no",
                      "and: preparing the data failed on process 0: its output says why"]
