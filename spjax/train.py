"""Command line: run (or resume) self-play fine-tuning from a Python config.

  python -m spjax.train --config configs/demo.py [--workdir DIR] [--resume] [key=value ...]

Overrides are dotted config keys, e.g. `objective.name=spin run.rounds=2 optim.lr=1e-5`.
A bad key or value stops the run before anything is loaded or compiled, with one line saying which.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
import traceback


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="spjax train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a Python file defining get_config() (file.py[:arg])")
    ap.add_argument("--workdir", default=None, help="where checkpoints, rounds, metrics and the export go "
                                                   "(default: runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the flags


def _compile_cache():
    """JAX's persistent compile cache: a resumed or repeated run skips most compilation.

    SPJAX_COMPILE_CACHE picks the directory (default ~/.cache/spjax/xla); an empty value disables it.
    SPJAX_COMPILE_CACHE_MIN_SECS (default 1) keeps only programs that took that long to compile; the
    tests set 0: a tiny run's ~100 small programs take ~5 s to compile and ~0.3 s to load.
    """
    import jax
    from spjax.config import ConfigError
    path = os.environ.get("SPJAX_COMPILE_CACHE", os.path.expanduser("~/.cache/spjax/xla"))
    min_secs = os.environ.get("SPJAX_COMPILE_CACHE_MIN_SECS", "1")
    try:
        secs = float(min_secs)
    except ValueError:
        secs = float("nan")
    if not secs >= 0:  # also NaN
        raise ConfigError(f"SPJAX_COMPILE_CACHE_MIN_SECS: expected seconds >= 0, got {min_secs!r}")
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", secs)


def cpu_devices_flags(xla_flags: str) -> str:
    """XLA_FLAGS made safe for several CPU devices in one process.

    XLA:CPU's concurrency-optimized scheduler lets a device run collectives on parallel branches; with
    several devices sharing a few cores, threads blocked in one collective's rendezvous can starve a
    device that has yet to reach it, and XLA aborts the process after 40 s ("Expected 4 threads to
    join the rendezvous"): 3 of 3 runs of a grad-accumulated data x fsdp step on 8 devices / 2 cores
    within 30 steps, none in 120 with the scheduler off. Off only where XLA_FLAGS asks for more than
    one host device: one device has nothing to deadlock with and its step is ~6% faster with it on.
    """
    many = re.search(r"--xla_force_host_platform_device_count=(\d+)", xla_flags)
    if many and int(many.group(1)) > 1 and "xla_cpu_enable_concurrency_optimized_scheduler" not in xla_flags:
        return f"{xla_flags} --xla_cpu_enable_concurrency_optimized_scheduler=false".strip()
    return xla_flags


def kill_at(spec: str):
    """The fault hook for SPJAX_KILL_AT=point:n[:INT|TERM] (tests): SIGKILL (or SIGINT, SIGTERM) this
    process the n-th time the run reaches `point` (sample, judge, score, train, checkpoint, record), to
    check that --resume gives the same model."""
    point, n, *sig = spec.split(":")
    hits = {point: 0}

    def fault(where: str):
        if where == point:
            hits[point] += 1
            if hits[point] == int(n):
                os.kill(os.getpid(), getattr(signal, f"SIG{sig[0]}") if sig else signal.SIGKILL)
    return fault


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def io_failure(e: BaseException):
    """(path or None, reason) when e (or what it wraps) is a failed read or write of a file; else None.

    orbax and asyncio wrap OSErrors; tensorstore reports them as ValueError('... [os_error_code=N]'),
    safetensors as SafetensorError('... I/O error: No space left on device (os error 28)').
    """
    from spjax.checkpoint import os_errno
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.filename, e.strerror
        if os_errno(e) is not None:
            path = re.search(r'"(/[^"]+)"', str(e))
            return (path.group(1) if path else None), os.strerror(os_errno(e))
        e = e.__cause__ or e.__context__
    return None


class _IOFailureLogged(logging.Filter):
    """orbax logs a failed background checkpoint write with a 40-line traceback; the run then stops on
    that failure with its one line (exit 3), which says it: the logged copy is dropped."""

    def filter(self, record):
        return not (record.exc_info and io_failure(record.exc_info[1]))


_PEER_LOST = re.compile(r"Gloo \S+ failed|Connection (reset|closed) by peer|heartbeat timeout"
                        r"|another task (died|failed)|coordination service|NCCL (error|operation|communicator)",
                        re.IGNORECASE)


def peer_lost(e: BaseException):
    """The runtime's first line when e is a collective that failed because another process of the run died
    or was stopped (that process's own output says why), else None."""
    from jax.errors import JaxRuntimeError
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, JaxRuntimeError) and _PEER_LOST.search(str(e)):
            return (str(e).splitlines() or [""])[0][:300]
        e = e.__cause__ or e.__context__
    return None


def _continue(args, argv, workdir: str) -> str:
    """How to go on after a stop: this command with --resume (and the workdir it used), on every host."""
    again = ["python", "-m", "spjax.train", *(argv if argv is not None else sys.argv[1:])]
    again += [] if args.resume else ["--resume"]
    again += [] if args.workdir else ["--workdir", workdir]
    return ("Continue on every host with: " if _distributed() else "Continue with: ") + shlex.join(again)


def _distributed() -> bool:
    shd = sys.modules.get("spjax.sharding")
    return bool(shd and shd.DISTRIBUTED)


def _leave(code: int) -> int:
    """A failed process of a multi-host run leaves at once: a normal exit meets JAX's shutdown barrier,
    where it waited for the others (themselves waiting on it) 5 minutes, then aborted, losing `code`."""
    if _distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv=None) -> int:
    args = parse(argv)
    # spjax uses transformers for tokenizers only: its note that PyTorch is absent is not news here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ["XLA_FLAGS"] = cpu_devices_flags(os.environ.get("XLA_FLAGS", ""))  # before jax's backend starts
    from spjax.config import ConfigError, load_config
    from spjax.data.records import DataError
    from spjax.hf import CheckpointError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").addFilter(_IOFailureLogged())
    try:
        cfg = load_config(args.config, args.overrides)
        _compile_cache()
        if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise ConfigError(f"--workdir {args.workdir}: a file, not a directory")
    except ConfigError as e:
        print(f"spjax: config error: {e}", file=sys.stderr)
        return 2
    from spjax.overrides import split_path
    name = os.path.splitext(os.path.basename(split_path(args.config)[0]))[0]
    workdir = args.workdir or os.path.join("runs", name)
    from spjax import metrics, rounds
    spec = os.environ.get("SPJAX_KILL_AT")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop (preemption): as Ctrl-C, one line
    try:
        try:
            rounds.run(cfg, workdir, resume=args.resume, echo=lambda s: print(s, flush=True),
                       fault=kill_at(spec) if spec else None)
        except BaseException:
            metrics.close_bars()  # a bar left open would draw itself after the line below
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)  # an in-process caller's own handler back
    except KeyboardInterrupt as e:
        how = str(e) or "SIGINT"
        print(f"\nspjax: stopped by {how}; every finished phase and the latest checkpoint are kept (an unfinished "
              f"write never is). {_continue(args, argv, workdir)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        metrics.flush_writers()
        os._exit(128 + getattr(signal, how, signal.SIGINT))  # as io errors: no waiting on checkpoint threads
    except (ConfigError, DataError, CheckpointError) as e:  # one line: "spjax: config error: ..." (judge, data, ...)
        print(f"spjax: {type(e).__name__.removesuffix('Error').lower()} error: {e}", file=sys.stderr)
        return _leave(2)
    except FloatingPointError as e:  # optim.nonfinite=raise: the state before that step is checkpointed
        print(f"\nspjax: non-finite step: {e} (checkpointed: --resume after fixing it, e.g. optim.lr)",
              file=sys.stderr)
        return _leave(4)
    except Exception as e:  # noqa: BLE001 - only I/O failures are handled here; the rest propagate
        failed = io_failure(e)
        lost = peer_lost(e) if failed is None and _distributed() else None
        if lost is not None:  # a peer died (SIGKILL, OOM, a lost host): its own output says why; one line here
            print(f"\nspjax: another process of this run stopped, so this one stops too ({lost}); every finished "
                  f"phase and the latest checkpoint are kept. {_continue(args, argv, workdir)}",
                  file=sys.stderr, flush=True)
            metrics.flush_writers()
            _leave(1)
        if failed is None:
            if _distributed():  # its traceback, then out (see _leave)
                traceback.print_exc()
                _leave(1)
            raise
        print(f"\nspjax: I/O error: {failed[0] or workdir}: {failed[1]}. What was written before is intact: "
              "free space or fix permissions, then rerun with --resume.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        metrics.flush_writers()
        # Background checkpoint threads would print their own tracebacks while the interpreter shuts
        # down; nothing half-written is committed (writes are atomic), so leave at once.
        os._exit(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
