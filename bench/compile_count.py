"""Programs a run compiles, round by round: on a 7B model each one costs the accelerator minutes.

Runs a config's rounds in this process (no persistent compile cache) and prints, for the setup with
round 0 and for each later round, how many programs JAX lowered, their names and the seconds XLA
spent compiling them (jax.monitoring's backend-compile events). A run should compile its programs in
round 0 and nothing after. One JSON line at the end ($OUT/compile_count.json when OUT is set).

  python bench/compile_count.py                                   # tiny, 3 rounds, run.mix_previous, LoRA
  python bench/compile_count.py --config configs/demo_verifier.py run.rounds=2   # judged pairs
  PYTHONPATH=<another checkout> python bench/compile_count.py     # the same run on other code
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile

# Appended, not prepended: PYTHONPATH=<another checkout> measures that checkout's spjax with this script.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ROOT, emit  # noqa: E402

DEFAULT = ["run.rounds=3", "run.mix_previous=true", "lora.rank=4"]


class _Compiles(logging.Handler):
    """Each lowered program's name, and each backend compile's seconds, under the current round label."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.label, self.names, self.seconds = "setup + round 0", collections.defaultdict(list), \
            collections.Counter()

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.names[self.label].append(msg.split()[1])

    def duration(self, event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds[self.label] += seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    ap.add_argument("overrides", nargs="*", help=f"key=value (default: {' '.join(DEFAULT)})")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    from spjax import rounds
    from spjax.config import load_config

    seen = _Compiles()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(seen)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # (the lowering lines themselves are long; the table below names them)
    jax.monitoring.register_event_duration_secs_listener(seen.duration)

    def echo(line):
        if line.startswith("self-play summary after round"):
            seen.label = f"round {int(line.splitlines()[0].split()[-1]) + 1}"

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(a.config, (a.overrides or DEFAULT) + [f"data.tfds_dir={os.path.join(tmp, 'tfds')}"])
        rounds.run(cfg, os.path.join(tmp, "run"), echo=echo)
    later = sum(len(v) for k, v in seen.names.items() if k != "setup + round 0")
    import spjax
    print(f"programs compiled by {os.path.relpath(a.config, ROOT)} {' '.join(a.overrides or DEFAULT)} "
          f"(spjax from {os.path.dirname(os.path.dirname(spjax.__file__))})")
    for label, names in seen.names.items():
        if label == f"round {cfg.run.rounds}":  # (the export and report after the last round)
            label = "after the last round"
        top = collections.Counter(names).most_common()
        print(f"  {label:22s} {len(names):4d} programs, {seen.seconds[label]:7.2f} s compiling: "
              + ", ".join(f"{n} x{c}" if c > 1 else n for n, c in top))
    print(f"  after round 0: {later} programs, {sum(v for k, v in seen.seconds.items() if k != 'setup + round 0'):.2f} s")
    emit({"bench": "compile_count", "config": a.config, "overrides": a.overrides or DEFAULT,
          "programs": {k: len(v) for k, v in seen.names.items()}, "compile_s": dict(seen.seconds),
          "after_round_0": later}, "compile_count.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
