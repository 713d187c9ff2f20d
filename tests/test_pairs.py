"""Pair sources' bookkeeping: sample chunks on disk, the keys of a round's splits, sample statistics;
pair settings a run refuses."""
import json
import types

import jax
import numpy as np
import pytest

from spjax import pairs
from tests.test_rounds import _train


class _Killed(Exception):
    pass


def _ctx(workdir, batch_size, kill_after=None, echoed=None):
    """The few Context fields sample_round reads; `kill_after` chunks written, the next fault 'dies'."""
    written = []

    def fault(point):
        written.append(point)
        if kill_after is not None and len(written) >= kill_after:
            raise _Killed

    cfg = types.SimpleNamespace(
        sampling=types.SimpleNamespace(batch_size=batch_size, max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0,
                                       weights="sharded"),
        run=types.SimpleNamespace(seed=0))
    return types.SimpleNamespace(cfg=cfg, model_cfg=None, mesh=None, pad_id=0, eos_ids=(2,), fault=fault,
                                 round_dir=lambda t: str(workdir / f"round_{t:03d}"),
                                 echo=(echoed.append if echoed is not None else print))


@pytest.fixture
def fake_sampler(monkeypatch):
    """sampler.sample answering prompt i's sample k with [100 + i, k, 2] (ends in EOS id 2)."""
    calls = []

    def sample(cfg, params, prompts, *, example_ids, num_samples, **kw):
        calls.append(list(example_ids))
        tokens = [np.asarray([100 + i, k, 2]) for i in example_ids for k in range(num_samples)]
        return types.SimpleNamespace(tokens=tokens, logprobs=[np.full(3, -1.0, np.float32)] * len(tokens))

    monkeypatch.setattr(pairs.sampler, "sample", sample)
    monkeypatch.setattr(pairs.lora, "for_sampling", lambda model_cfg, params: (model_cfg, params))
    return calls


@pytest.mark.parametrize("before,after", [(2, 4), (4, 3), (4, 4)])
def test_resumed_sampling_with_another_batch_size_keeps_every_sample_its_own(tmp_path, fake_sampler, before, after):
    """Chunk files hold the samples of `sampling.batch_size` prompts; a resume under another batch size
    must not take a chunk for the wrong prompts (before: 2 -> 4 lost prompts 4-7, a KeyError later), nor
    sample again a prompt whose samples are on disk (before: every chunk of other boundaries was resampled)."""
    n, K = 10, 2
    examples = [types.SimpleNamespace(id=i, prompt_ids=np.asarray([1, i])) for i in range(n)]
    with pytest.raises(_Killed):  # two chunks on disk, then the process dies
        pairs.sample_round(_ctx(tmp_path, before, kill_after=2), None, 0, examples, "train", K)
    del fake_sampler[:]
    got = pairs.sample_round(_ctx(tmp_path, after), None, 0, examples, "train", K)
    assert sorted(got) == list(range(n * K))
    for i in range(n):
        for k in range(K):
            assert got[i * K + k][0].tolist() == [100 + i, k, 2]
    chunks = lambda size: [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    on_disk = set(range(min(2 * before, n)))
    assert fake_sampler == [[i for i in c if i not in on_disk] for c in chunks(after) if not on_disk.issuperset(c)]


def test_held_out_samples_do_not_share_the_training_keys():
    train, held = (jax.random.key_data(pairs.split_key(0, 3, s)) for s in ("train", "held"))
    assert not np.array_equal(train, held)
    # nor any key below it: no training example's key, nor a decode step's of training example 1 (the
    # held-out key was fold_in(train key, 1), training example 1's own key)
    data = lambda k: jax.random.key_data(k).tolist()
    example_1 = jax.random.fold_in(pairs.split_key(0, 3, "train"), 1)
    below = [jax.random.fold_in(pairs.split_key(0, 3, "train"), i) for i in range(64)]
    below += [jax.random.fold_in(example_1, j) for j in range(64)]
    assert data(pairs.split_key(0, 3, "held")) not in [data(k) for k in below]
    held_examples = [data(jax.random.fold_in(pairs.split_key(0, 3, "held"), j)) for j in range(64)]
    assert not set(map(tuple, held_examples)) & set(tuple(data(k)) for k in below)
    # training samples keep the round's key, so runs before this change sample the same training answers
    assert np.array_equal(train, jax.random.key_data(pairs.sampler.round_key(0, 3)))


def test_sample_stats_count_answers_cut_at_max_new_tokens(tmp_path):
    echoed = []
    ctx = _ctx(tmp_path, 4, echoed=echoed)
    gen = {0: (np.asarray([5, 2]), None), 1: (np.asarray([5, 6, 7, 8]), None), 2: (np.asarray([2]), None)}
    stats = pairs._sample_stats(ctx, 1, "train", gen)
    assert stats == {"sample_len": pytest.approx(7 / 3), "sample_unended": pytest.approx(1 / 3)}
    assert echoed == ["round 1: 1 of 3 train samples reached sampling.max_new_tokens=4 before an end of turn "
                      "(raise it if that is many)"]
    assert pairs._sample_stats(ctx, 1, "held", gen)["sample_unended"] == pytest.approx(1 / 3) and len(echoed) == 1


@pytest.mark.parametrize("judge,rejected,ok", [("", False, True), ("python:tests.judge_fixture:longest", False, False),
                                               ("", True, False)])
def test_mix_previous_only_where_auto_resolves_to_sampled_pairs(judge, rejected, ok):
    """run.pairs=auto decides the source from the records and the judge; SPIN's D_{t-1} mixing needs
    sampled pairs (before: a judged run mixed other prompts' samples in, or crashed in round 1)."""
    import os
    from spjax.config import ConfigError, load_config
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    cfg = load_config(tiny, ["run.mix_previous=true", f"judge.name={judge}"])
    examples = [types.SimpleNamespace(generated_ids=np.asarray([3, 2]) if rejected else None, source="f:1")]
    if ok:
        assert pairs.resolve(cfg, examples) == "sampled"
    else:
        with pytest.raises(ConfigError, match="run.mix_previous: only for sampled pairs.*run.pairs=auto gives"):
            pairs.resolve(cfg, examples)


def test_preference_training_data_with_an_sft_held_out_file_is_one_line(tmp_path):
    """run.pairs=data (auto: every training record has `rejected`) takes the held-out records' rejected
    responses for its held-out pairs: an eval file without them was a TypeError traceback in scoring,
    after round 0 had sampled (and for objective.name=sft, in the evaluation)."""
    train, held = tmp_path / "pref.jsonl", tmp_path / "sft_eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"What is {i} plus 2?", "chosen": f"{i + 2}.",
                                         "rejected": f"{i * 3}, maybe."}) + "\n" for i in range(40)))
    held.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "response": f"{i + 1}."}) + "\n"
                            for i in range(4)))
    proc = _train(tmp_path / "run", f"data.path={train}", f"data.eval_path={held}", "run.rounds=1",
                  tfds_dir=tmp_path / "tfds")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spjax: config error: data.eval_path: run.pairs=data") and "sft_eval.jsonl:1" in last, last


def test_mix_previous_with_sft_is_refused_not_ignored(tmp_path):
    """objective.name=sft samples nothing, so run.mix_previous had nothing to mix: round 1 trained on
    the same pairs as without it, silently."""
    proc = _train(tmp_path / "run", "objective.name=sft", "run.mix_previous=true", "run.rounds=2",
                  tfds_dir=tmp_path / "tfds")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spjax: config error: run.mix_previous: objective.name=sft"), last


@pytest.mark.parametrize("rejected,ok", [(True, True), (False, False)])
def test_reference_initial_under_auto_pairs(rejected, ok):
    """run.reference=initial was refused under run.pairs=auto before the data was read, even for preference data
    (where auto gives data pairs); now auto decides, and sampled pairs are refused naming the records."""
    import os
    from spjax.config import ConfigError, load_config
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    cfg = load_config(tiny, ["run.reference=initial"])
    assert cfg.run.pairs == "auto"
    examples = [types.SimpleNamespace(generated_ids=np.asarray([3, 2]) if rejected else None, source="f:1")] * 3
    if ok:
        assert pairs.resolve(cfg, examples) == "data"
    else:
        with pytest.raises(ConfigError, match=r"run.reference: 'initial' needs data pairs .* gives sampled pairs "
                                              r"here \(3 of 3 records have no rejected response\)"):
            pairs.resolve(cfg, examples)
    with pytest.raises(ConfigError, match="run.reference: 'initial' needs data pairs"):
        load_config(tiny, ["run.reference=initial", "run.pairs=sampled"])
