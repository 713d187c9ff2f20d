"""Run checkpoints (orbax) and atomic round artifacts.

A checkpoint holds the train state (params, optimizer state, counters) as sharded arrays plus a
small JSON record: round, phase, step within the round, seed and the data cursor. orbax commits a
step only once all of it is written, so a kill mid-write leaves the previous step as the latest.
A latest step that fails to restore (corrupt files) is reported and the one before it is used;
the record carries per-array checksums, so damaged bytes that still decompress fail it too.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import gc
import logging
import os
import re
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp

from spjax import sharding as shd
from spjax.config import ConfigError

log = logging.getLogger(__name__)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) to restore `tree`'s structure into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True))
        self._reader = ocp.StandardCheckpointHandler()  # (closed with the manager, as its own handlers are)

    def save(self, step: int, state, meta: dict, wait: bool = False):
        """Save at a global, increasing step number; async unless `wait`.

        A disk without room for the state is an OSError here, in the caller's thread, before any
        byte is written: a write failing in orbax's background threads surfaces much later, under
        pages of asyncio tracebacks.
        """
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: checkpoint {step} needs {need / 2**20:.1f} MiB, "
                          f"{free / 2**20:.1f} MiB free", self.directory)
        meta = {**meta, "sums": [[str(x.dtype), s] for x, s in zip(jax.tree.leaves(state), checksums(state))]}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def steps(self):
        return sorted(self.manager.all_steps())

    def stored_shapes(self, step: int):
        """{leaf path: shape} of a step's state as its metadata records it; None if unreadable."""
        from etils import epath
        try:
            tree = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
            flat = jax.tree_util.tree_flatten_with_path(dict(tree))[0]
        except Exception:  # noqa: BLE001 - a damaged step: the restore below says what is wrong
            return None
        return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in flat if hasattr(x, "shape")}

    def _read(self, step: int, like) -> dict:
        """{"state", "meta"} of a step, read by orbax's handlers: the manager's restore ends in a barrier
        that a process whose shard failed to read never reaches, so on several hosts the others waited
        there while it went on to the agreement below (a collective mismatch: both aborted)."""
        from etils import epath
        path = epath.Path(self.directory) / str(step)
        state = self._reader.restore(path / "state", args=ocp.args.StandardRestore(abstract_like(like)))
        return {"state": state, "meta": ocp.JsonCheckpointHandler().restore(path / "meta")}

    def restore_latest(self, like, others=(), convert=None, mismatch=None, move_bad=True):
        """(state, meta) of the newest checkpoint that restores, or None when there is none.

        `like` is a state tree (or its abstract_like) giving structure, dtypes and shardings.
        others: (like, convert) pairs for checkpoints of other layouts (a params-only round end, an
        earlier version's state): a step that does not restore as `like` is tried as each of them,
        converted by its `convert` (None: as restored), before it counts as bad. convert: the same
        for `like`. mismatch(stored_shapes) -> why a step's intact arrays belong to another model than
        `like`'s, or None: a step that fails so is not bad but a config error, raised with nothing moved.
        move_bad=False leaves bad steps where they are (a reader's restore, e.g. spjax export).
        """
        self.manager.wait_until_finished()
        with _quiet_abandoned_reads() as failed:
            out, bad = self._first_good(like, others, convert, mismatch)
            failed += bad
        # Keep unusable steps for inspection, but out of orbax's way: the resumed run saves those
        # step numbers again. Process 0 moves them; the others wait for that before rescanning.
        if bad and move_bad:
            if jax.process_index() == 0:
                for step in bad:
                    path = os.path.join(self.directory, str(step))
                    os.rename(path, f"{path}.corrupt-{int(time.time())}")
            shd.barrier("spjax-corrupt-checkpoints-moved")
            self.manager.reload()
        return out

    def _first_good(self, like, others, convert, mismatch) -> tuple:
        """(the newest step's (state, meta) that restores or None, the steps newer than it that failed)."""
        out, bad = None, []
        for step in reversed(self.steps()):
            got, err, fatal, errors = None, None, None, []
            # Another model's step is told by its metadata, before any read: a read that fails on its
            # shapes leaves tensorstore callbacks behind, which printed pages of asyncio tracebacks.
            other = mismatch(self.stored_shapes(step)) if mismatch else None
            if not shd.on_every_process(other is None):
                raise ConfigError(f"checkpoint {self.directory}/{step} holds another model than the config's "
                                  f"({other or 'on another process'}): use the run's own model and settings "
                                  "(nothing was moved)")
            for attempt_like, to_state in ((like, convert), *others):
                try:
                    # each process reads its own shards; the checks below are collectives: all or none go on
                    got = shd.on_each_process(lambda: self._read(step, attempt_like), "the read", RuntimeError)
                    _check_finite_tree(got["state"], step)
                    _check_sums(got["state"], got["meta"], step)
                    got, err = ({**got, "state": to_state(got["state"])} if to_state else got), None
                    break
                except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                    got, err = None, err or e
                    errors.append(e)
                    fatal = fatal or (e if not_corruption(e) else None)
            # Out of memory or a failing file system says nothing about the checkpoint: stop, keep it.
            fatal = None if err is None else fatal
            if not shd.on_every_process(fatal is None):
                raise fatal or RuntimeError(f"checkpoint {self.directory}/{step}: another process ran out of "
                                            "memory or could not read it (not moved aside)")
            # Every process must resume from the same step: one that fails anywhere is bad for all.
            if shd.on_every_process(err is None):
                out = got["state"], {k: v for k, v in got["meta"].items() if k != "sums"}
                break
            why = _reason(errors) if err else "failed on another process"
            msg = (f"checkpoint {self.directory}/{step} could not be restored ({why}); "
                   "falling back to an earlier one")
            log.warning(msg)  # one line (a RuntimeWarning too printed it twice, the second with a source line)
            bad.append(step)
        return out, bad

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
        self._reader.close()


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """orbax reads a step's arrays as tasks of an event loop it closes as soon as one read fails. The reads
    then in flight end in tensorstore callbacks on the closed loop (a "RuntimeError: Event loop is closed"
    traceback each), and the unfinished ones raise again when collected ("Exception ignored in: <coroutine
    ... _read_array_index_and_device_put>", each with a page of TensorStore spec), or their futures' errors
    are logged as never retrieved: up to ~1000 lines around the one line that says the step was skipped.
    Those are waited for, collected and dropped here; any other report is printed as before. Yields a
    list: put something in it when a step failed."""
    hooks = sys.excepthook, sys.unraisablehook

    def abandoned(e) -> bool:
        return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"

    def excepthook(kind, value, tb):
        if not abandoned(value):
            hooks[0](kind, value, tb)

    def unraisablehook(unraisable):
        if not (abandoned(unraisable.exc_value) or "_read_array_index_and_device_put" in repr(unraisable.object)):
            hooks[1](unraisable)

    def unretrieved(record) -> bool:  # asyncio's "Future exception was never retrieved": the others' errors
        return "was never retrieved" not in record.getMessage()
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("asyncio").addFilter(unretrieved)
    failed = []
    try:
        yield failed
    except BaseException:
        failed.append(True)
        raise
    finally:
        if failed:  # the step's other reads (local or remote files) end within moments; their coroutines and
            time.sleep(0.5)  # futures sit in reference cycles with the errors kept: collected here, not
            gc.collect()  # on every resume (a whole-heap collection at start-up for nothing)
        sys.excepthook, sys.unraisablehook = hooks
        logging.getLogger("asyncio").removeFilter(unretrieved)


def _reason(errors: list) -> str:
    """Why a step failed: the error of a layout its structure matched (a round-end step holds no optimizer
    state, so the full layout's "tree structures do not match" says nothing), at its innermost cause
    (orbax's own wrapper prints a bound method where tensorstore's message would be)."""
    e = next((e for e in errors if "tree structures do not match" not in str(e)), errors[0])
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


_NOT_CORRUPTION = {errno.EIO, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ENOTCONN, errno.ESTALE, errno.ENOMEM}


def os_errno(e: BaseException):
    """The errno an error that is no OSError gives in its message, or None: tensorstore's
    '[os_error_code=N]', safetensors' '(os error N)'."""
    code = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", str(e))
    return int(code.group(1) or code.group(2)) if code else None


def not_corruption(e: BaseException) -> bool:
    """Whether a failed restore says nothing about the checkpoint's bytes: out of (device) memory, or a
    file system that refused or failed the read (these pass; a damaged step would fail again)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            return True
        if isinstance(e, OSError) and e.errno in _NOT_CORRUPTION:
            return True
        # tensorstore reports a failed read as ValueError('PERMISSION_DENIED: ... [os_error_code=13] ...')
        if os_errno(e) in _NOT_CORRUPTION:
            return True
        if re.match(r"(PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED):", str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _check_finite_tree(state, step):
    for leaf in jax.tree.leaves(state):
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and not bool(jax.numpy.isfinite(leaf).all()):
            raise ValueError(f"step {step} holds non-finite values")


def _check_sums(state, meta, step):
    """The restored arrays against the checksums saved with them (a step saved before they were: none).
    An array restored as another dtype than it was saved as is skipped (its bits changed by the cast)."""
    saved = meta.get("sums")
    leaves = jax.tree.leaves(state)
    if saved is None or len(saved) != len(leaves):
        return
    for i, (leaf, got, (dtype, want)) in enumerate(zip(leaves, checksums(state), saved)):
        if str(leaf.dtype) == dtype and got != want:
            raise ValueError(f"step {step}: array {i} differs from the one saved (checksum): damaged bytes")


def checksums(tree, legacy: bool = False) -> list:
    """Per leaf, the sum mod 2^32 of each element's bits and flat index mixed by a bijection (murmur3's
    finalizer): a change of any one element changes it, and so does a change of them all alike (a
    linear sum missed x -> 2x, +1 on every exponent); integer sums do not depend on the reduction
    order, so another mesh gets the same. legacy: earlier runs' base sums (bits times index * K + 1)."""
    return [int(shd.to_host(x)) for x in _checksums(tree, legacy)]


@functools.partial(jax.jit, static_argnums=1)
def _checksums(tree, legacy: bool):
    u32 = jax.numpy.uint32
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a typed key: its uint32 data
            x = jax.random.key_data(x)
        if x.dtype == jax.numpy.bool_:  # (no bitcast of bool)
            x = x.astype(jax.numpy.uint8)
        width = {1: jax.numpy.uint8, 2: jax.numpy.uint16, 4: u32}.get(x.dtype.itemsize)
        if width is None:  # 64-bit values (jax_enable_x64): not summed, 0 saved and checked alike
            out.append(u32(0))
            continue
        bits = jax.lax.bitcast_convert_type(x, width).astype(u32)
        index = jax.lax.broadcasted_iota(u32, x.shape, 0) if x.ndim else u32(0)
        for axis in range(1, x.ndim):  # the flat index, wrapping mod 2^32 like the sum
            index = index * u32(x.shape[axis]) + jax.lax.broadcasted_iota(u32, x.shape, axis)
        if legacy:
            term = bits * (index * u32(2654435761) + u32(1))
        else:
            h = bits + index * u32(0x9E3779B9)
            h = (h ^ (h >> 16)) * u32(0x85EBCA6B)
            h = (h ^ (h >> 13)) * u32(0xC2B2AE35)
            term = h ^ (h >> 16)
        out.append(jax.numpy.sum(term, dtype=u32))
    return out
