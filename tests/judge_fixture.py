"""A user judge for the tests' judged runs (judge.name=python:tests.judge_fixture:longest)."""


def longest(prompt, responses, reference):
    """Longer is better: a random tiny model's K samples almost always differ in length."""
    del prompt, reference
    return [float(len(r)) for r in responses]


def indifferent(prompt, responses, reference):
    """Every sample ties: no prompt has a winner, so a judged round has no pair to train on."""
    del prompt, reference
    return [0.0] * len(responses)
