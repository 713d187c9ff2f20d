"""Run a subprocess as on a machine without the test extras: `import torch` fails there.

spjax's run time must work like that; every `spjax.train` subprocess in the tests runs this way.
"""
import os

_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_torch")  # its sitecustomize.py


def torchless_env() -> dict:
    """The environment variables (PYTHONPATH) that block torch in a child process."""
    rest = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([_SHIM] + ([rest] if rest else []))}
