"""Round artifacts and exports: plain files and directories written whole or not at all (a temp file or
directory, then a rename), and what a writer killed midway left (cleared by the next writer)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from spjax import sharding as shd


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before checkpoint threads start:
    os.umask(mask)  # a file another thread creates meanwhile would get mode 0666
    return mask


_UMASK = _umask()


def umask_modes(path: str):
    """Give `path` (a file, or a directory and all under it) the modes a plain open()/mkdir() would:
    mkstemp/mkdtemp make them private (0600/0700), which other users or a server's uid cannot read."""
    paths = [path] + [os.path.join(root, name) for root, dirs, files in os.walk(path) for name in dirs + files]
    for p in paths:
        os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~_UMASK)


def temp_dir(parent: str, name: str) -> str:
    """A directory beside parent/name to write it whole in, named with this process's pid: a later
    writer tells a dead writer's leftovers from a live one's (clear_interrupted)."""
    return tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=parent)


def clear_interrupted(parent: str, name: str):
    """What a writer of parent/name killed midway (OOM, preemption) left: its partial temp_dir (removed:
    up to a whole model, hidden, each time) or, killed between its two renames, the old `name` it had
    moved aside (put back if `name` is missing, else removed)."""
    prefix, out = f".tmp-{name}-", os.path.join(parent, name)
    for entry in sorted(os.listdir(parent)):
        parts = entry[len(prefix):].removesuffix(".old").split("-")
        if not entry.startswith(prefix) or len(parts) != 2 or not parts[0].isdigit():
            continue
        path = os.path.join(parent, entry)
        if _alive(int(parts[0]), path):
            continue
        if entry.endswith(".old") and not os.path.lexists(out):
            os.rename(path, out)
            print(f"spjax: {out} is back: an interrupted export had moved it aside", flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"spjax: removed {path}, left by an interrupted export", flush=True)


def _alive(pid: int, path: str) -> bool:
    """Whether the writer that named `path` with its pid may still be at work. Pids are reused: in a
    container the entrypoint has the same pid on every restart, so a process holding the pid that started
    after `path` last changed (ctime: made, renamed, or a file added) is not its writer; a dead writer's
    leftovers (a whole model each, hidden) were kept for good as a live one's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    started = _started(pid)
    try:
        changed = os.stat(path).st_ctime
    except FileNotFoundError:
        return True  # (gone meanwhile: nothing to clear)
    return started is None or started <= changed + 0.1  # (a start time is known to a clock tick)


def _started(pid: int):
    """A process's start in seconds since the epoch (to a clock tick), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # field 22: its start in clock ticks since boot
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:  # boot time from uptime: /proc/stat's btime is whole seconds
            boot = time.time() - float(f.read().split()[0])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def write_atomic(path: str, write_fn):
    """Call write_fn(tmp_path) then rename onto `path`; a crash leaves no partial file."""
    if jax.process_index() != 0:
        return path
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    try:
        write_fn(tmp)
        umask_modes(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_json(path: str, obj):
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
    return write_atomic(path, w)


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_arrays(path: str, **arrays):
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return write_atomic(path, w)


def load_arrays(path: str) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_chunks(chunk_dir: str):
    """The arrays of each chunk file a phase wrote in chunk_dir (chunk_*.npz, not an atomic write's temporary
    file), in name order; none if the directory is absent."""
    if os.path.isdir(chunk_dir):
        for name in sorted(os.listdir(chunk_dir)):
            if name.startswith("chunk_") and name.endswith(".npz"):
                yield load_arrays(os.path.join(chunk_dir, name))


def remove_tree(path: str):
    """Process 0 removes `path` once every process is past reading it (all processes call this):
    on a resume with every chunk on disk no collective paces the processes, so process 0 could
    delete chunk files a slower one was still loading."""
    shd.barrier("spjax-remove-" + os.path.basename(path))
    if jax.process_index() == 0 and os.path.exists(path):
        shutil.rmtree(path)
