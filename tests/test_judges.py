"""Judged self-play pieces: verifiers, win matrices, pair construction, the SPPO and INPO losses,
and the reward model against transformers' sequence classifiers."""
import dataclasses
import os

import numpy as np
import pytest

from spjax import judges, judging, objectives
from spjax.config import ConfigError, JudgeConfig, ObjectiveConfig
from spjax.data.tokens import TokenizedExample

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


# ---------------------------------------------------------------------------------------------
# Verifiers


@pytest.mark.parametrize("response,reference,want", [
    ("12", "12", 1.0),
    ("The answer is 12.", "12", 1.0),
    ("4 + 8 = 12 apples", "12", 1.0),
    ("12 apples, no wait, 13", "12", 0.0),  # the final number counts
    ("1,234", "1234", 1.0),
    ("-3", "-3", 1.0),
    ("3", "-3", 0.0),
    ("12.0", "12", 1.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "She sold 72 clips.\n#### 72", 1.0),  # GSM8K's ####
    ("#### 71", "#### 72", 0.0),
    ("", "12", 0.0),  # malformed: no number at all
    ("twelve", "12", 0.0),
    ("12", "no number here", 0.0),  # a reference without an answer cannot be matched
    ("so 1,2,3", "3", 1.0),  # a list's last number, not 123
    ("2,5", "2.5", 0.0),  # not a thousands group: 2 and 5, the last 5 (was 25)
    ("1,234,567.5 in all", "1234567.5", 1.0),
    ("\u22123", "-3", 1.0),  # the Unicode minus sign (was read as 3)
    ("\u22123", "3", 0.0),
    ("10-3 = 7", "7", 1.0),
    ("it is 10-3", "3", 1.0),  # a hyphen after a digit is no minus sign
])
def test_verifier_number(response, reference, want):
    assert judges.verify("number", response, reference) == want


def test_verifier_exact_and_regex():
    assert judges.verify("exact", "  Paris. ", "paris") == 1.0
    assert judges.verify("exact", "Paris, France", "Paris") == 0.0
    assert judges.verify("exact", "", "") == 0.0  # nothing matches nothing
    rx = r"answer:\s*(\w+)"
    assert judges.verify(f"regex:{rx}", "so the answer: B", "B") == 1.0  # reference without a match: itself
    assert judges.verify(f"regex:{rx}", "answer: A ... answer: C", "answer: C") == 1.0  # the last match
    assert judges.verify(f"regex:{rx}", "I think B", "B") == 0.0  # malformed: no match
    # an optional group that took no part in the last match: no answer (was an AttributeError)
    assert judges.verify(r"regex:answer:\s*(\d+)?", "answer: unsure", "answer: 5") == 0.0


def test_judge_names_are_checked():
    for bad, msg in [("verifier:numbr", "verifier mode"), ("verifier:regex:(", "bad regex"),
                     ("reward_model", "checkpoint directory"), ("python:mod", "module:function"),
                     ("oracle", "not one of"), ("similarity:bleu", "similarity")]:
        with pytest.raises(ConfigError, match=msg):
            JudgeConfig(name=bad)
    with pytest.raises(ConfigError, match="judge.pairs"):
        JudgeConfig(name="similarity", pairs="best")


def test_python_judge_and_bad_returns(tmp_path, monkeypatch):
    (tmp_path / "myjudge.py").write_text(
        "def longest(prompt, responses, reference):\n    return [len(r) for r in responses]\n"
        "def bad(prompt, responses, reference):\n    return [1.0]\n"
        "def nan(prompt, responses, reference):\n    return [0.0, float('nan'), 1.0]\n"
        "def nan_matrix(prompt, responses, reference):\n    return [[0.5, float('inf')], [float('nan'), 0.5]]\n"
        "def words(prompt, responses, reference):\n    return ['good', 'bad', 'ugly']\n"
        "def mixed(prompt, responses, reference):\n    return [1.0, 0.0] if prompt == 'p' else [[.5, 1.], [0., .5]]\n"
        "def raises(prompt, responses, reference):\n    return [int(r) for r in responses]\n"
        "def turns(prompt, responses, reference, messages):\n"
        "    return [len(messages) + (m['role'] == 'system') for m in messages[:1] for _ in responses]\n"
        "def kw(prompt, responses, reference, **extra):\n    return [len(extra['messages'])] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    q = judges.Query("p", ("a", "abc", "ab"), "ref")
    scores, wins = judges.judge_all(judges.build("python:myjudge:longest"), [q])
    assert scores.tolist() == [[1, 3, 2]]
    assert wins[0, 1, 0] == pytest.approx(1 / (1 + np.exp(-2)))  # Bradley-Terry on user scores
    with pytest.raises(judges.JudgeError, match=r"python:myjudge:bad returned shape \(1,\) for the prompt 'p', "
                                                r"for 3 responses"):
        judges.judge_all(judges.build("python:myjudge:bad"), [q])
    # NaN is not a shape problem (before: "returned shape (3,) (finite values of shape (3,) ... expected)")
    with pytest.raises(judges.JudgeError, match=r"^judge python:myjudge:nan returned NaN or inf in 1 of 3 values for "
                                                r"the prompt 'p' \(first: sample 1 = nan\)"):
        judges.judge_all(judges.build("python:myjudge:nan"), [q])
    with pytest.raises(judges.JudgeError, match=r"returned NaN or inf in 2 of 4 values .*first: P\[0, 1\] = inf"):
        judges.judge_all(judges.build("python:myjudge:nan_matrix"), [judges.Query("p", ("a", "b"), "ref")])
    with pytest.raises(judges.JudgeError, match="returned list .* not 3 numbers"):  # before: numpy's ValueError
        judges.judge_all(judges.build("python:myjudge:words"), [q])
    two = [judges.Query("p", ("a", "b"), "ref"), judges.Query("other", ("a", "b"), "ref")]
    with pytest.raises(judges.JudgeError, match="2 scores for some prompts and a 2 x 2 matrix for others"):
        judges.judge_all(judges.build("python:myjudge:mixed"), two)
    # the user's own exception: one line with where it raised (before: a traceback, exit 1)
    with pytest.raises(judges.JudgeError, match=r"^judge python:myjudge:raises raised ValueError: invalid literal for "
                                                r"int\(\) .* for the prompt 'p' \(at .*myjudge.py:14\); the judgements"):
        judges.judge_all(judges.build("python:myjudge:raises"), [q])
    # a `messages` parameter (or **kwargs) gets the prompt's chat turns; the three-argument form does not
    chat = ({"role": "system", "content": "S"}, {"role": "user", "content": "p"})
    qm = judges.Query("p", ("a", "b"), "ref", messages=chat)
    assert judges.judge_all(judges.build("python:myjudge:turns"), [qm])[0].tolist() == [[3, 3]]
    assert judges.judge_all(judges.build("python:myjudge:kw"), [qm])[0].tolist() == [[2, 2]]
    assert judges.judge_all(judges.build("python:myjudge:longest"), [qm])[0].tolist() == [[1, 1]]


def test_python_judge_that_cannot_import_says_where_from(tmp_path, monkeypatch):
    """One line naming judge.name; a module that is not found says it is imported from sys.path (before:
    "No module named 'myjudge'" with the module beside the config, and no word of PYTHONPATH)."""
    with pytest.raises(judges.JudgeError) as err:
        judges.build("python:nosuchmodule:f")
    msg = str(err.value)
    assert msg == ("judge.name: python:nosuchmodule:f: cannot import module 'nosuchmodule': no 'nosuchmodule' on the "
                   "import path (sys.path, not the config's folder): set PYTHONPATH to the folder holding "
                   "nosuchmodule.py")
    assert isinstance(err.value, ConfigError)  # spjax.train prints it as one line, like a config error
    (tmp_path / "needs_torchx.py").write_text("import torchx_not_installed\ndef f(p, r, ref):\n    return [0, 0]\n")
    (tmp_path / "nofunc.py").write_text("def other(p, r, ref):\n    return [0] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(judges.JudgeError, match="^judge.name: python:needs_torchx:f: cannot import module "
                                                "'needs_torchx': No module named 'torchx_not_installed'$"):
        judges.build("python:needs_torchx:f")  # found, but its own import fails: PYTHONPATH is not the fix
    with pytest.raises(judges.JudgeError, match=r"^judge.name: python:nofunc:f: cannot import it: module 'nofunc' "
                                                r"\(.*nofunc.py\) has no function 'f'$"):
        judges.build("python:nofunc:f")


def test_python_matrix_judge_is_checked():
    q = judges.Query("p", ("a", "b", "c"), "ref")
    scores, wins = judges.judge_all(judges.build("python:tests.judge_fixture:first_beats_rest"), [q])
    # a sample against itself ties (SPPO's convention), whatever diagonal the judge returned
    assert np.diag(wins[0]).tolist() == [0.5, 0.5, 0.5]
    assert wins[0].mean(axis=1).tolist() == [(0.5 + 1 + 1) / 3, (0 + 0.5 + 0.5) / 3, (0 + 0.5 + 0.5) / 3]
    assert np.isnan(scores).all()  # a pairwise judge scores no sample alone (its row means average 1/2 always)
    q2 = judges.Query("p", ("a", "b"), "ref")
    # the prompt is named (before: "row 0", the row within a chunk of judge.batch_size prompts)
    with pytest.raises(judges.JudgeError, match=r"inconsistent: win matrix for the prompt 'second' has "
                                                r"P\[0, 1\] \+ P\[1, 0\] = 1.6, not 1"):
        judges.judge_all(judges.build("python:tests.judge_fixture:inconsistent"),
                         [judges.Query("second", ("a", "b"), "ref")])
    with pytest.raises(judges.JudgeError, match=r"above_one: 1 win matrices have probabilities outside \[0, 1\] "
                                                r"\(first: for the prompt 'p'"):
        judges.judge_all(judges.build("python:tests.judge_fixture:above_one"), [q2])


def test_every_judge_kind_must_be_finite():
    out = np.asarray([[0.1, 0.2], [np.nan, 0.3], [0.0, np.inf]])
    with pytest.raises(judges.JudgeError, match=r"judge reward_model:/rm: 2 of 3 rows are not finite .*first: row 1"):
        judges.judge_all(judges.Judge("reward_model:/rm", lambda qs: out, True), [None] * 3)
    wins = np.full((1, 2, 2), 0.5)
    wins[0, 0, 1] = np.nan
    with pytest.raises(judges.JudgeError, match="judge m: 1 of 1 rows are not finite"):
        judges.judge_all(judges.Judge("m", lambda qs: wins, True), [None])
    with pytest.raises(judges.JudgeError, match=r"judge m: returned shape \(2, 2\) for 1 prompts"):
        judges.judge_all(judges.Judge("m", lambda qs: np.zeros((2, 2)), True), [None])


def test_bad_judge_output_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    """spjax.train prints a judge's bad output as `spjax: judge error: ...` and exits 2 (before: a
    traceback through judging.py and judges.py)."""
    from spjax import train
    (tmp_path / "nanjudge.py").write_text("def nan(prompt, responses, reference):\n    return [float('nan')] * "
                                          "len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPJAX_COMPILE_CACHE", "")  # keep the tests' compile cache (conftest), not ~/.cache's
    args = ["--config", TINY, "sampling.num_samples=2", f"data.tfds_dir={tmp_path / 'tfds'}"]
    assert train.main([*args, "--workdir", str(tmp_path / "w1"), "judge.name=python:nanjudge:missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spjax: judge error: judge.name: python:nanjudge:missing: cannot import it"), err
    assert train.main([*args, "--workdir", str(tmp_path / "w2"), "judge.name=python:nanjudge:nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spjax: judge error: judge python:nanjudge:nan returned NaN or inf in 1 of 1 values "
                              "for the prompt"), err  # the first judge call: the initial model's held-out answers (K=1)
    # A pairwise judge scores no answer alone: its held-out judge_score was 1/2 whatever the model (a 1 x 1
    # matrix's diagonal), so keep_best=judge_score kept round 0 and stop_when_worse stopped on a constant.
    assert train.main([*args, "--workdir", str(tmp_path / "w3"), "run.keep_best=judge_score",
                       "judge.name=python:tests.judge_fixture:first_beats_rest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("spjax: judge error: run.keep_best: judge python:tests.judge_fixture:first_beats_rest returns "
                       "win matrices, which score no answer alone, so there is no judge_score to keep the best round "
                       "by; pick another metric"), err


# ---------------------------------------------------------------------------------------------
# Win matrices and pairs


def test_win_matrix():
    comp = judges.win_matrix(np.asarray([1.0, 0.0, 1.0]), bradley_terry=False)
    assert comp.tolist() == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]
    bt = judges.win_matrix(np.asarray([2.0, 0.0]), bradley_terry=True)
    assert bt[0, 1] == pytest.approx(1 / (1 + np.exp(-2.0))) and bt[0, 1] + bt[1, 0] == pytest.approx(1.0)
    assert np.allclose(np.diag(bt), 0.5)


def test_pairs_from_judged_samples():
    K = 4
    # prompt 0: samples 1 and 3 right; prompt 1: all wrong (no pair); prompt 2: only sample 2 right
    scores = np.asarray([[0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], float)
    wins = np.stack([judges.win_matrix(s, False) for s in scores])
    assert judging.pair_indices(wins[0], "best_worst") == [(1, 0)]  # first best, first worst
    assert judging.pair_indices(wins[1], "best_worst") == []
    assert sorted(judging.pair_indices(wins[0], "all")) == [(1, 0), (1, 2), (3, 0), (3, 2)]
    assert judging.pair_indices(wins[2], "all") == [(2, 0), (2, 1), (2, 3)]
    examples = [TokenizedExample(i, np.arange(3, dtype=np.int32), np.asarray([9], np.int32)) for i in range(3)]
    gen = {i * K + k: (np.asarray([100 + 10 * i + k] * 5, np.int32), np.zeros(5, np.float32))
           for i in range(3) for k in range(K)}
    pairs, w_real, w_gen = judging.judged_pairs(examples, gen, wins, K, "all", max_len=7)
    assert [p.id for p in pairs] == list(range(7))
    assert pairs[0].real_ids.tolist() == [101] * 4 and pairs[0].generated_ids.tolist() == [100] * 4  # cut to max_len
    # soft win rates: row means of the matrix (SPPO's P(y beats the K samples)), diagonal included
    assert w_real[0] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4) and w_gen[0] == pytest.approx((0 + 0.5 + 0 + 0.5) / 4)
    assert w_real[4] == pytest.approx((1 + 1 + 0.5 + 1) / 4) and w_gen[4] == pytest.approx((0.5 + 0.5 + 0 + 0.5) / 4)


def test_best_worst_follows_the_judges_own_verdict():
    """A non-transitive pairwise judge: sample 0 has the best row mean and 3 the worst, yet 3 beats 0 head
    to head (P[0, 3] = 0.2). The pair is labelled by the judge's verdict on the two, not against it."""
    P = np.asarray([[.5, 1, 1, .2], [0, .5, .5, 1], [0, .5, .5, 1], [.8, 0, 0, .5]])
    wins = judges.check_wins("m", P[None])[0]
    assert judging.pair_indices(wins, "best_worst") == [(3, 0)]
    tied = wins.copy()
    tied[0, 3] = tied[3, 0] = 0.5
    assert judging.pair_indices(tied, "best_worst") == []
    for s in (np.asarray([0.3, -1.0, 2.0, 0.1]), np.asarray([1.0, 0.0, 1.0])):  # scores: unchanged
        for bt in (True, False):
            w = judges.win_matrix(s, bt)
            assert judging.pair_indices(w, "best_worst") == [(int(np.argmax(s)), int(np.argmin(s)))]


def _judge_ctx(round_dir, judge, batch_size, K, fault=lambda point: None):
    import types
    from spjax.byte_tokenizer import byte_tokenizer
    cfg = types.SimpleNamespace(sampling=types.SimpleNamespace(num_samples=K),
                                judge=types.SimpleNamespace(batch_size=batch_size))
    return types.SimpleNamespace(cfg=cfg, tokenizer=byte_tokenizer(), judge=judge, round_dir=lambda t: str(round_dir),
                                 fault=fault)


def test_judge_resume_with_another_batch_size(tmp_path):
    """Chunks judged with judge.batch_size=4, resumed with 3: every prompt keeps its own judgement."""
    from spjax.byte_tokenizer import byte_tokenizer
    tok, n, K = byte_tokenizer(), 10, 2
    examples = [TokenizedExample(i, np.asarray(tok.encode(f"prompt {i}"), np.int32), np.asarray([5], np.int32))
                for i in range(n)]
    gen = {i * K + k: (np.asarray(tok.encode(f"a{k}"), np.int32), None) for i in range(n) for k in range(K)}
    judged = []

    def by_prompt(queries):  # sample 0 scores its prompt's number: a row shows whose judgement it is
        judged.extend(int(q.prompt.split()[-1]) for q in queries)
        return np.asarray([[float(q.prompt.split()[-1]), 0.0] for q in queries])
    judge = judges.Judge("by_prompt", by_prompt, True)
    fresh, fresh_wins = judging.judge_round(_judge_ctx(tmp_path / "fresh", judge, 3, K), 0, "train", examples, gen)
    assert fresh[:, 0].tolist() == list(range(n))

    class Killed(Exception):
        pass

    def kill_after_two(point):
        if len(judged) >= n + 8:  # the fresh run's n, then two chunks of 4
            raise Killed()
    with pytest.raises(Killed):
        judging.judge_round(_judge_ctx(tmp_path / "run", judge, 4, K, kill_after_two), 0, "train", examples, gen)
    del judged[:]
    scores, wins = judging.judge_round(_judge_ctx(tmp_path / "run", judge, 3, K), 0, "train", examples, gen)
    assert scores.tolist() == fresh.tolist() and wins.tolist() == fresh_wins.tolist()
    # prompts 0-7 are on disk: only 8 and 9 are judged (none twice)
    assert judged == [8, 9]


# ---------------------------------------------------------------------------------------------
# SPPO and INPO


def test_sppo_loss_by_hand():
    beta = 0.5
    lp_w, lp_l, ref_w, ref_l = np.asarray([-3.0]), np.asarray([-5.0]), np.asarray([-3.4]), np.asarray([-4.5])
    pw, pl = np.asarray([0.8]), np.asarray([0.3])
    losses, _ = objectives.pair_loss("sppo", lp_w, lp_l, ref_w, ref_l, beta=beta, win_real_B=pw, win_gen_B=pl)
    lr_w, lr_l = -3.0 + 3.4, -5.0 + 4.5  # 0.4, -0.5
    want = ((lr_w - (0.8 - 0.5) / beta) ** 2 + (lr_l - (0.3 - 0.5) / beta) ** 2) / 2  # ((0.4-0.6)^2 + (-0.5+0.4)^2)/2
    assert float(losses[0]) == pytest.approx(want, abs=1e-6) and want == pytest.approx(0.025)
    # no win rates: the real response wins outright (hard-label SPPO)
    hard, _ = objectives.pair_loss("sppo", lp_w, lp_l, ref_w, ref_l, beta=beta)
    assert float(hard[0]) == pytest.approx(((0.4 - 1.0) ** 2 + (-0.5 + 1.0) ** 2) / 2, abs=1e-6)


def test_inpo_loss_by_hand():
    eta, tau = 0.2, 0.05
    cfg = ObjectiveConfig(name="inpo", beta=eta, tau=tau)
    lp_w, lp_l = np.asarray([-3.0], np.float32), np.asarray([-5.0], np.float32)
    t_w, t_l = np.asarray([-3.5], np.float32), np.asarray([-4.0], np.float32)  # pi_t
    o_w, o_l = np.asarray([-4.0], np.float32), np.asarray([-4.2], np.float32)  # pi_0
    ref_w, ref_l = objectives.mixed_reference(cfg, t_w, o_w), objectives.mixed_reference(cfg, t_l, o_l)
    loss, _ = objectives.objective_loss(cfg, lp_w, lp_l, ref_w, ref_l)
    d_theta, d_0, d_t = -3.0 + 5.0, -4.0 + 4.2, -3.5 + 4.0
    logits = d_theta - (tau / eta) * d_0 - (1 - tau / eta) * d_t  # 2 - 0.05 - 0.375 = 1.575
    assert float(loss) == pytest.approx((logits - 1 / (2 * eta)) ** 2, abs=1e-5)  # (1.575 - 2.5)^2
    assert (logits - 2.5) ** 2 == pytest.approx(0.855625)
    # other objectives train against pi_t alone
    assert objectives.mixed_reference(ObjectiveConfig(name="chi2"), t_w, o_w) is t_w
    with pytest.raises(ConfigError, match="tau"):
        ObjectiveConfig(name="inpo", beta=0.1, tau=0.2)


# ---------------------------------------------------------------------------------------------
# The reward model


@pytest.mark.parametrize("family,extra", [("Llama", {}), ("Qwen2", {}), ("Qwen3", dict(head_dim=32)),
                                          ("Phi3", dict(partial_rotary_factor=0.5)),
                                          ("Gemma2", dict(head_dim=16, sliding_window=8)),  # (Skywork's RMs)
                                          ("Olmo2", {}),
                                          ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
                                          ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2,
                                                            moe_intermediate_size=48, shared_expert_intermediate_size=80)),
                                          ("Qwen3Moe", dict(num_experts=8, num_experts_per_tok=3, head_dim=32,
                                                            moe_intermediate_size=48))])
def test_reward_model_matches_transformers(family, extra, tmp_path):
    import torch
    import transformers
    from spjax import reward_model
    from tests.oracle import TINY
    cls = f"{family}ForSequenceClassification"
    conf = getattr(transformers, f"{family}Config")(**TINY, **extra, num_labels=1, pad_token_id=0,
                                                     tie_word_embeddings=False)
    torch.manual_seed(0)
    tm = getattr(transformers, cls)(conf).float().eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    tm.save_pretrained(tmp_path)
    rm = reward_model.load(str(tmp_path))
    rng = np.random.RandomState(0)
    seqs = [rng.randint(1, TINY["vocab_size"], n).tolist() for n in (7, 19, 3, 12)]
    L = max(map(len, seqs))
    ids, mask = np.zeros((4, L), np.int64), np.zeros((4, L), np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    with torch.no_grad():
        want = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    got = reward_model.scores(rm, seqs, batch_size=3)  # two batches, the second with a dummy row
    assert np.abs(got - want).max() <= 1e-4
    q = judges.Query("", ("", ""), "", np.asarray(seqs[0][:3]), (np.asarray(seqs[0][3:]), np.asarray(seqs[1])))
    judge = judges.Judge("reward_model", lambda qs: reward_model.judge_queries(rm, qs), True)
    scores, wins = judges.judge_all(judge, [q])
    assert np.abs(scores[0] - [want[0], reward_model.scores(rm, [seqs[0][:3] + seqs[1]])[0]]).max() <= 1e-4
    assert wins[0, 0, 1] == pytest.approx(1 / (1 + np.exp(-(scores[0, 0] - scores[0, 1]))))


@pytest.mark.parametrize("pad", [2, None])
def test_reward_model_reads_the_last_non_pad_token(pad, tmp_path):
    """pad_token_id = EOS (common): a response ending in EOS is scored at the token before it, as transformers
    does (an EOS inside a sequence is read as any token). Without a pad id: the last token."""
    import dataclasses
    import torch
    import transformers
    from spjax import reward_model
    from tests.oracle import TINY
    conf = transformers.LlamaConfig(**TINY, num_labels=1, pad_token_id=pad, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    tm = transformers.LlamaForSequenceClassification(conf).float().eval()
    with torch.no_grad():  # a trained EOS embedding is not the zero row transformers gives a pad id
        tm.model.embed_tokens.weight[2].normal_()
    tm.save_pretrained(tmp_path)
    rm = reward_model.load(str(tmp_path))
    rng = np.random.RandomState(0)
    seqs = [rng.randint(3, 256, 7).tolist() + [2], rng.randint(3, 256, 12).tolist() + [2, 2],
            rng.randint(3, 256, 5).tolist() + [2] + rng.randint(3, 256, 4).tolist(), [2, 2, 2]]
    with torch.no_grad():  # one at a time: transformers takes no batch without a pad id
        want = np.asarray([float(tm(torch.tensor([s])).logits[0, 0]) for s in seqs])
    got = reward_model.scores(rm, seqs, batch_size=4)
    assert np.abs(got - want).max() <= 1e-4
    if pad is not None:  # the score moved: EOS itself is not what transformers reads
        eos_read = reward_model.scores(dataclasses.replace(rm, pad_id=None), seqs[:1])
        assert abs(eos_read[0] - want[0]) > 1e-3


def test_reward_model_refuses_ids_outside_its_vocabulary(tmp_path):
    import transformers
    from spjax import hf, reward_model
    from spjax.byte_tokenizer import byte_tokenizer
    from tests.oracle import TINY
    conf = transformers.LlamaConfig(**{**TINY, "vocab_size": 64}, num_labels=1, pad_token_id=0,
                                    tie_word_embeddings=False)
    transformers.LlamaForSequenceClassification(conf).save_pretrained(tmp_path)  # no tokenizer files
    with pytest.raises(hf.CheckpointError, match="vocabulary has 64 ids but the policy's tokenizer has 259 .* "
                                                  "put its tokenizer files"):
        reward_model.load(str(tmp_path), policy_tokenizer=byte_tokenizer())
    rm = reward_model.load(str(tmp_path))  # no policy tokenizer to check against: each sequence is checked
    # a JudgeError (one line from spjax.train, not a traceback): a policy whose embedding table is larger than its
    # tokenizer (Qwen2's 151936 rows, 151665 ids) passes the load check and may still sample such an id
    with pytest.raises(judges.JudgeError,
                       match=r"sequence 1 has token id 100 at position 2, outside its vocabulary \[0, 64"):
        reward_model.scores(rm, [[1, 63, 2], [1, 5, 100, 2]])


def test_reward_model_refuses_a_causal_lm(tmp_path):
    import transformers
    from spjax import hf, reward_model
    from tests.oracle import TINY as SHAPE
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError, match="no sequence classifier"):
        reward_model.load(str(tmp_path))
    # a run says so before it prepares data and loads the policy (before: only at the judge's load)
    from spjax import preflight
    from spjax.config import load_config
    cfg = load_config(TINY, [f"judge.name=reward_model:{tmp_path}", "sampling.num_samples=2"])
    with pytest.raises(ConfigError, match=r"^judge.name: .*config.json: architectures \['LlamaForCausalLM'\] has no "
                                          r"sequence classifier"):
        preflight.check_config(cfg, 8)


def _saved_rm(path, extra_tensors=None, **conf):
    """A tiny Llama reward model in `path` (transformers' own save), its torch model returned."""
    import torch
    import transformers
    from tests.oracle import TINY
    torch.manual_seed(0)
    tm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        **{**TINY, "vocab_size": 300, "max_position_embeddings": 64, **conf}, tie_word_embeddings=False)).float().eval()
    tm.save_pretrained(path)
    if extra_tensors:
        from safetensors.numpy import load_file, save_file
        save_file({**load_file(str(path / "model.safetensors")), **extra_tensors}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    return tm


ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def test_reward_model_reads_conversations_in_its_own_chat_template(tmp_path):
    """Its template, not the policy's markup: before, a reward model of the policy's vocabulary was given the
    policy's ChatML ids as they were (no template of its own, closing newline, default system prompt)."""
    import torch
    from spjax import data, reward_model
    from spjax.byte_tokenizer import byte_tokenizer
    tm = _saved_rm(tmp_path, num_labels=1, pad_token_id=None)
    rm_tok = byte_tokenizer()
    rm_tok.chat_template = ZEPHYR
    rm_tok.save_pretrained(tmp_path)
    policy = byte_tokenizer()
    rm = reward_model.load(str(tmp_path), policy_tokenizer=policy)
    assert rm.describe() == "conversations rendered in its own chat template"
    turns = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"})
    answers = ["4", "It is four."]
    pids = data.prompt_ids(policy, list(turns))
    q = judges.Query("2+2?", tuple(answers), "4", pids,
                     tuple(np.asarray(policy.encode(a + "<|im_end|>", add_special_tokens=False)) for a in answers),
                     turns)
    want = []
    for a in answers:
        ids = rm_tok.apply_chat_template([*turns, {"role": "assistant", "content": a}], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert rm_tok.decode(ids).startswith("<|system|>\nBe brief.")
        with torch.no_grad():
            want.append(float(tm(torch.tensor([list(ids)])).logits[0, 0]))
    got = reward_model.judge_queries(rm, [q])[0]
    assert np.abs(got - want).max() <= 1e-4
    # without the turns (a caller that has only ids): the policy's text, in the reward model's tokens
    assert np.abs(reward_model.judge_queries(rm, [dataclasses.replace(q, messages=())])[0] - want).max() > 1e-3


def test_reward_model_checkpoint_shapes(tmp_path, caplog):
    """A score bias is added (it was refused as an unknown tensor); a classifier of 2 labels is refused (label 0
    was read as the reward, often its 'bad' logit); a sequence past its positions loses its oldest tokens."""
    import torch
    from spjax import hf, reward_model
    tm = _saved_rm(tmp_path / "bias", {"score.bias": np.asarray([0.75], np.float32)}, num_labels=1, pad_token_id=0)
    rm = reward_model.load(str(tmp_path / "bias"))
    seq = list(range(3, 40))
    with torch.no_grad():
        want = float(tm(torch.tensor([seq])).logits[0, 0]) + 0.75
    assert abs(reward_model.scores(rm, [seq])[0] - want) <= 1e-4
    long = list(range(3, 103))  # 100 tokens, 64 positions
    q = judges.Query("", ("",), "", np.asarray(long[:90]), (np.asarray(long[90:]),))
    with caplog.at_level("WARNING"):
        got = reward_model.judge_queries(rm, [q])[0, 0]
    assert abs(got - reward_model.scores(rm, [long[-64:]])[0]) <= 1e-6 and "1 of 1 sequences are longer" in caplog.text
    _saved_rm(tmp_path / "two", num_labels=2, pad_token_id=0)
    with pytest.raises(hf.CheckpointError, match=r"two: a classifier of 2 labels .* not a reward model"):
        reward_model.load(str(tmp_path / "two"))


def test_a_reward_model_waits_in_host_memory_between_judge_phases(tmp_path, devices, monkeypatch):
    """An 8B reward model held on the devices for the whole run took 15 GiB of a GPU's 80 from the sampler and
    the train step. Its params wait in pinned host memory, shard by shard; a judge phase brings them once (not
    once a batch) and drops them after; the rewards are those of params kept on the devices, bit for bit."""
    import jax
    from spjax import reward_model, sharding as shd
    from spjax.config import MeshConfig
    _saved_rm(tmp_path, num_labels=1, pad_token_id=0)
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=4), devices)
    judge = judges.build(f"reward_model:{tmp_path}", mesh=mesh, batch_size=2)
    rm = judge.fn.args[0]
    kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}  # noqa: E731
    assert kinds(rm.params) == {"pinned_host"} and "wait in host memory between judge phases" in judge.waits
    assert all(x.sharding.spec == y.spec for x, y in zip(jax.tree.leaves(rm.params), jax.tree.leaves(
        shd.param_shardings(rm.cfg, mesh))))  # (placed as on the devices: each host moves only its shards)
    kept = dataclasses.replace(rm, params=shd.to_memory(rm.params, "device"), waits="device")
    seqs = [list(range(3, 3 + n)) for n in (5, 17, 9, 30, 2)]  # 3 batches of 2
    moves = []
    monkeypatch.setattr(shd, "to_memory", lambda tree, kind, to=shd.to_memory: moves.append(kind) or to(tree, kind))
    with judge.on_device():
        assert kinds(rm.live) == {"device"}
        got = reward_model.scores(rm, seqs, batch_size=2)
        again = judges.judge_all(judge, [judges.Query("", ("", ""), "", np.asarray(seqs[0]), (np.asarray(seqs[1]),
                                                                                               np.asarray(seqs[2])))])
    assert moves == ["device"] and rm.live is None and kinds(rm.params) == {"pinned_host"}
    assert np.array_equal(got, reward_model.scores(kept, seqs, batch_size=2)) and len(moves) == 1
    assert np.array_equal(again[0][0], reward_model.scores(kept, [seqs[0] + seqs[1], seqs[0] + seqs[2]], batch_size=2))
    reward_model.scores(rm, seqs[:1])  # outside a phase: brought for the call alone
    assert moves == ["device", "device"] and rm.live is None


def test_arithmetic_problems(tmp_path):
    import re
    from spjax.config import DataConfig
    from spjax.data import pipeline
    from spjax.data.tfds_builders import arithmetic_examples
    exs = arithmetic_examples(200, seed=3)
    assert [e.response for e in exs] == [e.response for e in arithmetic_examples(200, seed=3)]  # fixed by the seed
    for e in exs:
        q = e.prompt_messages[0]["content"]
        a, b = map(int, re.findall(r"\d+", q))
        want = a + b if any(w in q for w in ("more", "in all", "buy")) else a - b
        assert int(e.response) == want >= 0 and judges.verify("number", e.response, e.response) == 1.0
    splits = pipeline.load_examples(DataConfig(path="arithmetic"), str(tmp_path))
    train, test = ({e.prompt_messages[0]["content"] for e in splits[k]} for k in ("train", "test"))
    assert len(splits["train"]) == len(train) == 512 and len(splits["test"]) == len(test) == 64
    assert not train & test


def test_judged_run_config_checks():
    import dataclasses
    from spjax import preflight
    from spjax.config import RunConfig, SamplingConfig, load_config
    import os
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py"))
    with pytest.raises(ConfigError, match="'judged' needs a judge"):
        preflight.check_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, pairs="judged")), 8)
    judged = dataclasses.replace(cfg, judge=JudgeConfig(name="verifier:number"))
    with pytest.raises(ConfigError, match="sampling.num_samples"):
        preflight.check_config(dataclasses.replace(judged, run=dataclasses.replace(cfg.run, pairs="judged")), 8)
    preflight.check_config(judged, 8)  # run.pairs=auto: preference data would make data pairs (the judge: held-out)
    with pytest.raises(ConfigError, match="sampling.num_samples"):  # ... but these records make judged pairs
        preflight.check_pairs(judged, "judged", 64, lambda line: None)
    preflight.check_pairs(judged, "data", 64, lambda line: None)
    # judged pairs: one a prompt at most (best_worst), K(K-1)/2 with judge.pairs=all; fewer than a batch
    # trained nothing in any round and exported the initial model, exit 0 (sampled pairs: refused)
    two = dataclasses.replace(judged, sampling=SamplingConfig(num_samples=2, batch_size=32))
    with pytest.raises(ConfigError, match="run.batch_size: 16 is more than the 15 judged pairs the 15 training"):
        preflight.check_pairs(two, "judged", 15, lambda line: None)
    preflight.check_pairs(two, "judged", 16, lambda line: None)
    four_all = dataclasses.replace(judged, sampling=SamplingConfig(num_samples=4, batch_size=32),
                                   judge=JudgeConfig(name="verifier:number", pairs="all"))
    preflight.check_pairs(four_all, "judged", 3, lambda line: None)  # 3 prompts x 6 pairs >= 16
    with pytest.raises(ConfigError, match="the 12 judged pairs the 2 training prompts"):
        preflight.check_pairs(four_all, "judged", 2, lambda line: None)
    with pytest.raises(ConfigError, match="judge.pairs: 'all' forms judged pairs, but this run's pairs are data"):
        preflight.check_pairs(four_all, "data", 64, lambda line: None)  # (the judge: held-out only; was ignored)
    preflight.check_config(dataclasses.replace(judged, sampling=SamplingConfig(num_samples=2, batch_size=32)), 8)
    preflight.check_config(dataclasses.replace(judged, run=RunConfig(pairs="sampled", batch_size=16)), 8)  # eval only
    # Greedy sampling gives the judge K equal samples: every prompt tied, every round trained nothing (exit 0)
    for greedy, field in ((dict(temperature=0.0), "temperature"), (dict(top_k=1), "top_k")):
        g = dataclasses.replace(judged, sampling=SamplingConfig(num_samples=2, batch_size=32, **greedy))
        with pytest.raises(ConfigError, match=f"sampling.{field}: greedy sampling gives the judge 2 equal samples"):
            preflight.check_pairs(g, "judged", 64, lambda line: None)


def test_an_sft_run_with_a_judge_says_it_judges_held_out_answers_only():
    """SFT draws no opponent samples: with a judge (the verifier demo's baseline) the run said "pairs: judged
    ... preferred vs dispreferred of the opponent's samples, pairs from 2 samples per prompt", judged nothing."""
    from spjax import pairs as pairs_lib, preflight
    from spjax.config import SamplingConfig, load_config
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py"))
    sft = dataclasses.replace(cfg, judge=JudgeConfig(name="verifier:number"), objective=ObjectiveConfig(name="sft"),
                              sampling=SamplingConfig(num_samples=2, batch_size=32))
    source = pairs_lib.resolve(sft, [])
    said = []
    preflight.check_pairs(sft, source, 64, said.append)
    assert said == ["pairs: none (objective.name=sft trains on the real responses alone)",
                    "judge: verifier:number (held-out metrics only: no pairs)"]
    assert pairs_lib.resolve(dataclasses.replace(sft, objective=ObjectiveConfig()), []) == "judged"
    # whatever run.pairs asks: greedy sampling is no matter (nothing is sampled for training), a batch
    # larger than the examples is (before: every round trained no step, and the run exported the initial model)
    greedy = dataclasses.replace(sft, sampling=SamplingConfig(num_samples=2, batch_size=32, temperature=0.0))
    preflight.check_pairs(greedy, "judged", 64, said.append)
    with pytest.raises(ConfigError, match="run.batch_size: 16 is more than the 15 training examples"):
        preflight.check_pairs(sft, "judged", 15, said.append)


def test_judges_see_the_reference_before_max_len_cut_it():
    """A verifier's answer key sits at the reference's end ('#### 18'): the judge (and the held-out
    similarity) compare against the whole real response, not the part the length policy kept for training."""
    import types

    from spjax.byte_tokenizer import byte_tokenizer
    from spjax.data.records import Example
    from spjax.data.tokens import tokenize_examples
    tok = byte_tokenizer()
    ex = Example([{"role": "user", "content": "Tom has 3 bags of 6 apples. How many?"}],
                 "Each bag has 6 apples and there are 3 bags, so 3 * 6 = 18.\n#### 18")
    (e,), report = tokenize_examples(tok, [ex], max_prompt_len=56, max_len=110)
    assert report.responses_truncated == 1 and "#### 18" not in tok.decode(e.real_ids)
    gen = {0: (np.asarray(tok.encode("18<|im_end|>"), np.int32), None),
           1: (np.asarray(tok.encode("6<|im_end|>"), np.int32), None)}
    q = judging.queries(types.SimpleNamespace(tokenizer=tok), [e], gen, 2)[0]
    assert q.reference.endswith("#### 18")
    scores, wins = judges.judge_all(judges.build("verifier:number"), [q])
    assert scores[0].tolist() == [1.0, 0.0] and judging.pair_indices(wins[0], "best_worst") == [(0, 1)]
