"""Judges: the preference oracle of judged self-play (DESIGN.md §1, the second setting of the game).

A judge sees each prompt's K samples (and the record's reference response) and returns either
scores [n, K] or win probabilities [n, K, K] (P[i, j] = P(sample i beats sample j)). `judge_all`
turns either into both: scores become win probabilities by Bradley-Terry (sigma(s_i - s_j): reward
models and a user's scores) or by comparison (1 better, 1/2 tie, 0 worse: verifiers and similarity,
whose scores are grades, not logits). A pairwise judge (a matrix) scores no sample alone: its scores
are NaN (the held-out judge_score, judge_mean and judge_best with them), and its soft win rates (the
matrix's row means) make the pairs.
A matrix must be a preference (entries in [0, 1], P[i, j] + P[j, i] = 1); its diagonal is set to 1/2.
Output that breaks these rules (a wrong shape, NaN or inf, not a preference) raises JudgeError.

  reward_model:PATH        a HF *ForSequenceClassification checkpoint of the Llama family (our
                           decoder plus its score head, read at the last non-pad token), on device
  verifier:number          the final number of the answer (GSM8K's '#### n', else the last number)
  verifier:exact           the whole answer, case and surrounding space/punctuation ignored
  verifier:regex:PATTERN   the last match of PATTERN (its first group if it has one)
  similarity[:rouge_l]     token F1 (default) or ROUGE-L against the reference response
  python:module:function   f(prompt, responses, reference) -> K scores or a K x K win matrix
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import math
import re
import traceback
from typing import Callable, Optional

import numpy as np

from spjax import evaluate
from spjax.config import ConfigError

KINDS = ("reward_model", "verifier", "similarity", "python")
VERIFIERS = ("number", "exact", "regex")
SIMILARITIES = ("f1", "rouge_l")


class JudgeError(ConfigError):
    """A judge that cannot be loaded, or that returned what no judge may (a wrong shape, NaN or inf, a
    matrix that is not a preference). A ConfigError: judge.name picked it, and spjax.train prints it as
    one line (`spjax: judge error: ...`) instead of a traceback through the judge phase."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One prompt's K samples to judge. Text is decoded with special tokens dropped."""

    prompt: str
    responses: tuple  # K strings
    reference: str  # the record's real response
    prompt_ids: np.ndarray = None  # int32 tokens (the reward model reads tokens)
    response_ids: tuple = ()  # K int32 arrays
    messages: tuple = ()  # the prompt's chat turns: a reward model renders them in its own chat template


@dataclasses.dataclass(frozen=True)
class Judge:
    name: str
    fn: Callable  # list[Query] -> [n, K] scores or [n, K, K] win probabilities
    bradley_terry: bool  # scores -> sigma(s_i - s_j); else by comparison
    collective: bool = False  # a program every process runs in lockstep (a reward model); else host code
    reads: str = ""  # what a reward model scores (said at the start)
    waits: str = ""  # where a reward model's params wait between judge phases (said at the start)
    on_device: Callable = contextlib.nullcontext  # `with judge.on_device():` a phase's calls share one placement


def check_name(name: str):
    """Raise ConfigError (naming judge.name) unless `name` is a well-formed judge spec."""
    kind, _, arg = name.partition(":")
    bad = lambda msg: ConfigError(f"judge.name: {name!r}: {msg}")
    if kind == "reward_model" and not arg:
        raise bad("give the checkpoint directory: reward_model:PATH")
    if kind == "verifier":
        mode, _, pattern = arg.partition(":")
        if mode not in VERIFIERS:
            raise bad(f"verifier mode {mode!r} not one of {', '.join(VERIFIERS)}")
        if mode == "regex":
            try:
                re.compile(pattern)
            except re.error as e:
                raise bad(f"bad regex: {e}") from None
            if not pattern:
                raise bad("verifier:regex:PATTERN needs a pattern")
    if kind == "similarity" and arg and arg not in SIMILARITIES:
        raise bad(f"similarity {arg!r} not one of {', '.join(SIMILARITIES)}")
    if kind == "python" and len(arg.split(":")) != 2:
        raise bad("give python:module:function")


# ---------------------------------------------------------------------------------------------
# Verifiers

# A sign is a minus (ASCII or U+2212) unless a digit precedes it ('10-3' is 10 and 3); commas count only
# in thousands groups ('1,000' is 1000; '1,2,3' is three numbers, the last 3).
_SIGN = r"(?:(?<!\d)[-\u2212])?"
_NUMBER = re.compile(_SIGN + r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def final_number(text: str) -> Optional[float]:
    """The answer's final number: after the last '####' if there is one (GSM8K), else the last
    number in the text; thousands separators and a trailing '.' ignored. None: no number."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?,;:\"'")


def verify(mode: str, response: str, reference: str) -> float:
    """1.0 if `response` carries the reference's answer under `mode` (see the module doc), else 0.0.
    A malformed answer (no number, no match) scores 0; so does a reference without a number (a regex's
    reference without a match is its answer itself)."""
    kind, _, pattern = mode.partition(":")
    if kind == "number":
        got, want = final_number(response), final_number(reference)
        return float(got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9))
    if kind == "exact":
        return float(_normalise(response) == _normalise(reference) != "")
    rx = re.compile(pattern)

    def last(text):
        ms = list(rx.finditer(text))
        got = None if not ms else ms[-1].group(1) if rx.groups else ms[-1].group(0)
        return None if got is None else got.strip()  # an optional group that took no part: no answer

    got, want = last(response), last(reference)
    want = want if want is not None else reference.strip()
    return float(got is not None and got == want)


# ---------------------------------------------------------------------------------------------
# Building a judge


def python_function(name: str) -> Callable:
    """The function of a judge.name `python:module:function`, imported like any module: from sys.path."""
    module, func = name.split(":")[1:]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and not (module == e.name or module.startswith(e.name + ".")):
            # the module was found, but an import inside it failed: PYTHONPATH is not the fix
            raise JudgeError(f"judge.name: {name}: cannot import module {module!r}: {e}") from None
        raise JudgeError(f"judge.name: {name}: cannot import module {module!r}: no {e.name or module!r} on the "
                         f"import path (sys.path, not the config's folder): set PYTHONPATH to the folder holding "
                         f"{module.split('.')[0]}{'/' if '.' in module else '.py'}") from None
    except ImportError as e:
        raise JudgeError(f"judge.name: {name}: cannot import module {module!r}: {e}") from None
    f = getattr(mod, func, None)
    if not callable(f):
        raise JudgeError(f"judge.name: {name}: cannot import it: module {module!r} "
                         f"({getattr(mod, '__file__', None) or 'no file'}) has no function {func!r}")
    return f


def _raised_at(e: BaseException, f: Callable) -> str:
    """file:line where e was raised in f's own file (the deepest such frame), else where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [fr for fr in frames if fr.filename == getattr(getattr(f, "__code__", None), "co_filename", None)]
    fr = (own or frames)[-1]
    return f"{fr.filename}:{fr.lineno}"


def _python(name: str) -> Callable:
    """A user's f(prompt, responses, reference) as a judge fn, its every return checked: K finite scores
    or a finite K x K matrix for each prompt (JudgeError naming the prompt otherwise)."""
    f = python_function(name)
    try:  # a `messages` parameter (or **kwargs) gets the prompt's chat turns, e.g. for an LLM judge
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # (a builtin without a signature)
        params = ()
    turns = any(p.name == "messages" or p.kind is p.VAR_KEYWORD for p in params)

    def checked(q, K):
        where = f"for the prompt {q.prompt[-60:]!r}"
        try:
            got = f(q.prompt, list(q.responses), q.reference,
                    **({"messages": [dict(m) for m in q.messages]} if turns else {}))
        except Exception as e:  # noqa: BLE001 - the user's code: said in one line, where it raised
            raise JudgeError(f"judge {name} raised {type(e).__name__}: {e} {where} (at {_raised_at(e, f)}); the "
                             "judgements made so far are kept: fix the function, then --resume") from None
        try:
            r = np.asarray(got, np.float64)
        except (TypeError, ValueError):
            raise JudgeError(f"judge {name} returned {type(got).__name__} {str(got)[:60]!r} {where}: not "
                             f"{K} numbers or a {K} x {K} matrix of them") from None
        if r.shape not in ((K,), (K, K)):
            raise JudgeError(f"judge {name} returned shape {r.shape} {where}, for {K} responses (shape ({K},): "
                             f"scores; ({K}, {K}): win probabilities)")
        bad = ~np.isfinite(r)
        if np.any(bad):
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            at = f"sample {first[0]}" if r.ndim == 1 else f"P[{first[0]}, {first[1]}]"
            raise JudgeError(f"judge {name} returned NaN or inf in {int(bad.sum())} of {r.size} values {where} "
                             f"(first: {at} = {r[first]}); a judge must return finite numbers")
        if r.ndim == 2:  # checked here, where the prompt is known (judge_all's check names a chunk's row)
            check_wins(name, r[None], rows=[where])
        return r

    def fn(queries):
        K = len(queries[0].responses) if queries else 0
        rows = [checked(q, K) for q in queries]
        if len({r.ndim for r in rows}) > 1:
            raise JudgeError(f"judge {name} returned {K} scores for some prompts and a {K} x {K} matrix for others "
                             "(return one kind)")
        return np.stack(rows) if rows else np.zeros((0, K))
    return fn


def _grades(grade, queries) -> np.ndarray:
    """[n, K] grade(response, reference) of every query's responses."""
    K = len(queries[0].responses) if queries else 0
    grades = [[grade(r, q.reference) for r in q.responses] for q in queries]
    return np.asarray(grades, np.float64).reshape(len(queries), K)


def build(name: str, *, mesh=None, batch_size: int = 32, policy_tokenizer=None, today=None,
          dtype: str = "float32") -> Judge:
    """The judge named by `name` (judge.name). A reward model is loaded onto `mesh` here, its params and
    compute in `dtype` (the run's compute dtype); `today`: the date its chat template prints."""
    check_name(name)
    kind, _, arg = name.partition(":")
    if kind == "verifier":
        return Judge(name, functools.partial(_grades, lambda r, ref: verify(arg, r, ref)), False)
    if kind == "similarity":
        return Judge(name, functools.partial(_grades, evaluate.rouge_l if arg == "rouge_l" else evaluate.token_f1),
                     False)
    if kind == "python":
        return Judge(name, _python(name), True)
    from spjax import reward_model
    rm = reward_model.load(arg, mesh=mesh, policy_tokenizer=policy_tokenizer, today=today, param_dtype=dtype,
                           compute_dtype=dtype)
    return Judge(name, functools.partial(reward_model.judge_queries, rm, batch_size=batch_size), True, collective=True,
                 reads=rm.describe(), waits=rm.waiting(), on_device=rm.on_device)


def win_matrix(scores_K: np.ndarray, bradley_terry: bool) -> np.ndarray:
    """[K, K] P(i beats j) from K scores; the diagonal is 1/2."""
    d_KxK = scores_K[:, None] - scores_K[None, :]
    if bradley_terry:
        return 1.0 / (1.0 + np.exp(-d_KxK))
    return np.where(d_KxK > 0, 1.0, np.where(d_KxK == 0, 0.5, 0.0))


_PREFERENCE_ATOL = 1e-6  # P[i, j] + P[j, i] may miss 1 by float rounding, no more


def check_wins(name: str, wins_NxKxK: np.ndarray, rows: Optional[list] = None) -> np.ndarray:
    """The judge's win matrices with the diagonal set to 1/2 (a sample against itself ties, as in
    SPPO and Bradley-Terry), after checking they are preferences: entries in [0, 1] and
    P[i, j] + P[j, i] = 1 off the diagonal. Raises JudgeError naming the judge and the first bad row."""
    K = wins_NxKxK.shape[-1]
    off_KxK = ~np.eye(K, dtype=bool)
    outside_N = np.any(((wins_NxKxK < 0) | (wins_NxKxK > 1)) & off_KxK, axis=(1, 2))
    gap_NxKxK = np.abs(wins_NxKxK + wins_NxKxK.transpose(0, 2, 1) - 1) * off_KxK
    row = lambda r: f"row {r}" if rows is None else rows[r]
    if np.any(outside_N):
        r = int(np.argmax(outside_N))
        raise JudgeError(f"judge {name}: {int(outside_N.sum())} win matrices have probabilities outside [0, 1] "
                         f"(first: {row(r)}, min {wins_NxKxK[r][off_KxK].min():.4g}, "
                         f"max {wins_NxKxK[r][off_KxK].max():.4g})")
    if np.any(gap_NxKxK > _PREFERENCE_ATOL):
        r, i, j = np.unravel_index(int(np.argmax(gap_NxKxK)), gap_NxKxK.shape)
        raise JudgeError(f"judge {name}: win matrix {row(r)} has P[{i}, {j}] + P[{j}, {i}] = "
                         f"{wins_NxKxK[r, i, j] + wins_NxKxK[r, j, i]:.6g}, not 1 (P[i, j] is P(sample i beats "
                         f"sample j)); symmetrise it, e.g. (P + 1 - P.T) / 2")
    return np.where(off_KxK, wins_NxKxK, 0.5)


def judge_all(judge: Judge, queries: list) -> tuple:
    """(scores [n, K], win probabilities [n, K, K]) of every query, the same on every process. Every
    judge's output must be finite (a reward model fed bad ids gives NaN, not an error); a matrix goes
    through check_wins. Every process calls this with the same queries; a judge that is host code
    runs on process 0 only and its answer is broadcast (it need not answer alike on each host)."""
    import jax
    if judge.collective or not queries or jax.process_count() == 1:
        return _judge_here(judge, queries)
    from spjax import sharding
    n, K = len(queries), len(queries[0].responses)
    scores, wins = sharding.from_process_0(lambda: _judge_here(judge, queries), [(n, K), (n, K, K)], JudgeError)
    return scores, wins


def _judge_here(judge: Judge, queries: list) -> tuple:
    out = np.asarray(judge.fn(queries), np.float64)
    if out.ndim not in (2, 3) or len(out) != len(queries):
        raise JudgeError(f"judge {judge.name}: returned shape {out.shape} for {len(queries)} prompts "
                         f"([n, K] scores or [n, K, K] win probabilities expected)")
    bad_N = ~np.all(np.isfinite(out.reshape(len(out), -1)), axis=1)
    if np.any(bad_N):
        raise JudgeError(f"judge {judge.name}: {int(bad_N.sum())} of {len(out)} rows are not finite (NaN or inf; "
                         f"first: row {int(np.argmax(bad_N))})")
    if out.ndim == 3:  # its row means would be no score: they average 1/2 whatever the samples (1/2 at K = 1)
        return np.full(out.shape[:2], np.nan), check_wins(judge.name, out)
    return out, np.stack([win_matrix(s, judge.bradley_terry) for s in out]) if len(out) else np.zeros((0, 0, 0))


def win_rate(judge: Judge, prompts: list, new: list, old: list, references: list,
             prompt_ids=None, new_ids=None, old_ids=None, messages=None) -> float:
    """Mean P(new answer beats old answer) over the prompts, under the judge."""
    queries = [Query(p, (a, b), r, None if prompt_ids is None else prompt_ids[i],
                     () if new_ids is None else (new_ids[i], old_ids[i]), () if messages is None else messages[i])
               for i, (p, a, b, r) in enumerate(zip(prompts, new, old, references))]
    _, wins = judge_all(judge, queries)
    return float(np.mean(wins[:, 0, 1])) if len(queries) else float("nan")


__all__ = ["KINDS", "JudgeError", "Query", "Judge", "check_name", "python_function", "final_number", "verify",
           "build", "win_matrix", "check_wins", "judge_all", "win_rate"]
