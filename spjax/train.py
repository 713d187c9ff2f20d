"""Command line: run (or resume) self-play fine-tuning from a Python config.

  python -m spjax.train --config configs/demo.py [--workdir DIR] [--resume] [key=value ...]

Overrides are dotted config keys, e.g. `objective.name=spin run.rounds=2 optim.lr=1e-5`.
A bad key or value stops the run before anything is loaded or compiled, with one line saying which.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="spjax", description=__doc__.split("\n")[1].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a Python file defining get_config() (file.py[:arg])")
    ap.add_argument("--workdir", default=None, help="where checkpoints, rounds, metrics and the export go "
                                                   "(default: runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def _compile_cache():
    """JAX's persistent compile cache: a resumed or repeated run skips most compilation.

    SPJAX_COMPILE_CACHE picks the directory (default ~/.cache/spjax/xla); an empty value disables it.
    """
    import jax
    path = os.environ.get("SPJAX_COMPILE_CACHE", os.path.expanduser("~/.cache/spjax/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None) -> int:
    args = parse(argv)
    from spjax.config import ConfigError, load_config
    from spjax.data.records import DataError
    from spjax.hf import CheckpointError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"spjax: config error: {e}", file=sys.stderr)
        return 2
    _compile_cache()
    name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
    workdir = args.workdir or os.path.join("runs", name)
    from spjax import rounds
    try:
        rounds.run(cfg, workdir, resume=args.resume, echo=lambda s: print(s, flush=True))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"spjax: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
