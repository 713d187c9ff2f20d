"""User judges for the tests: judged runs (judge.name=python:tests.judge_fixture:longest) and win matrices."""


def longest(prompt, responses, reference):
    """Longer is better: a random tiny model's K samples almost always differ in length."""
    del prompt, reference
    return [float(len(r)) for r in responses]


def indifferent(prompt, responses, reference):
    """Every sample ties: no prompt has a winner, so a judged round has no pair to train on."""
    del prompt, reference
    return [0.0] * len(responses)


def first_beats_rest(prompt, responses, reference):
    """A pairwise judge's K x K matrix that fills only i != j (its diagonal 0): sample 0 beats the others."""
    del prompt, reference
    K = len(responses)
    return [[0.0 if i == j else (1.0 if i == 0 else 0.0 if j == 0 else 0.5) for j in range(K)] for i in range(K)]


def inconsistent(prompt, responses, reference):
    """Not a preference: each sample beats the other (P[0, 1] + P[1, 0] = 1.6)."""
    del prompt, responses, reference
    return [[0.5, 0.8], [0.8, 0.5]]


def above_one(prompt, responses, reference):
    """Not a probability: P[0, 1] = 1.5."""
    del prompt, responses, reference
    return [[0.5, 1.5], [-0.5, 0.5]]
