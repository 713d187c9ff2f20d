"""Metrics out of the run: JSONL and TensorBoard files in the workdir, progress bars, round tables.

Only process 0 writes. Values arrive as host floats (the driver calls jax.device_get once per log
interval, never per metric).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import weakref

import jax


def _is_main():
    return jax.process_index() == 0


class MetricWriter:
    """Appends {'kind', 'step', **metrics} lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = _is_main()
        self.tb, self.path = None, os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        _WRITERS.add(self)
        os.makedirs(workdir, exist_ok=True)
        self.f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # optional: JSONL always works
                self.tb = None

    def write(self, kind: str, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: _num(v) for k, v in metrics.items()}
        head = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}  # never overridden by a metric
        self.f.write(json.dumps({**head, **{k: v for k, v in clean.items() if k not in head}}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, int(step))

    def rewind(self, keep) -> list[dict]:
        """Drop the metrics.jsonl lines for which keep(row) is false (and any torn last line).

        A resumed run redoes the work after its checkpoint and logs it again; without this its
        lines would follow the killed run's lines for the same steps. The file is replaced
        atomically. Returns the rows kept, on every process (the others read process 0's file: the
        same rows before and after its rewrite). TensorBoard files are left as they are.
        """
        path = self.path
        if self.enabled:
            self.f.close()
        elif not os.path.exists(path):
            return []
        kept, rows, dropped = [], [], 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    ok = line.endswith("\n") and keep(row)
                except ValueError:
                    ok = False
                if ok:
                    kept.append(line)
                    rows.append(row)
                else:
                    dropped += 1
        if not self.enabled:
            return rows
        if dropped:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
        self.f = open(path, "a", encoding="utf-8")
        return rows

    def close(self):
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


COUNTS = ("skipped", "steps", "tokens", "seconds")  # summed over rows, not averaged


def mean_metrics(rows: list[dict]) -> dict:
    """Mean of each numeric key over a list of metric dicts, each weighted by its `steps` (a logged
    interval's finite steps; 1 without), so a round's mean is its steps' whatever run.log_every cut;
    NaN values left out (an interval whose every step was skipped); counts (COUNTS) summed. Intervals'
    `tokens_per_s` becomes all their tokens over all their `seconds` (a mean of rates would weigh a
    fast interval like a slow one); the seconds are dropped (a round's row has its own phase times)."""
    out = {}
    for k in dict.fromkeys(k for r in rows for k in r):  # every row's keys, in order
        pairs = [(float(r[k]), float(r.get("steps", 1))) for r in rows if k in r]
        finite = [(v, w) for v, w in pairs if math.isfinite(v) and w > 0]
        if k in COUNTS:
            out[k] = sum(v for v, _ in pairs)
        else:
            out[k] = sum(v * w for v, w in finite) / sum(w for _, w in finite) if finite else float("nan")
    if out.get("seconds"):
        out["tokens_per_s"] = out["tokens"] / out.pop("seconds")
    return out


def progress(total: int, desc: str, unit: str = "it"):
    """A tqdm bar on process 0 (stderr); a no-op elsewhere. Into a file (a cluster's log) it is redrawn at
    most once a minute and its last state kept, not rewritten ten times a second."""
    from tqdm.auto import tqdm
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not _is_main(), dynamic_ncols=True,
               file=sys.stderr, leave=not tty, mininterval=0.1 if tty else 60.0)
    _BARS.add(bar)
    return bar


_BARS = weakref.WeakSet()  # bars not yet garbage: close_bars ends those a failure left open
_WRITERS = weakref.WeakSet()  # open MetricWriters: flush_writers before a process leaves without exiting


def flush_writers():
    """Write out what open writers buffer (TensorBoard events: every 2 minutes otherwise), for a process
    that ends by os._exit (a stop, an I/O error), which runs no exit handler. Their TensorBoard files
    are closed: tensorboardX's flush() leaves queued events to a worker thread, close() drains them."""
    for w in list(_WRITERS):
        if w.tb is not None:
            try:
                w.tb.close()
            except Exception:  # noqa: BLE001 - e.g. the full disk this process is stopping for: its line first
                pass
            w.tb = None


def close_bars():
    """Close every open bar now (before a failure's last line: a bar closed later draws after it)."""
    for bar in list(_BARS):
        bar.close()


def progress_iter(items, desc: str, unit: str = "it"):
    """`items`, with a bar as progress() shows it while they are walked."""
    bar = progress(len(items), desc, unit)
    for x in items:
        yield x
        bar.update(1)
    bar.close()


def table(title: str, rows: dict, columns: list[str]) -> str:
    """A plain-text table: one row per key of `rows` (dicts keyed by column name)."""
    cells = [[name] + [_fmt(r.get(c)) for c in columns] for name, r in rows.items()]
    head = [""] + columns
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    line = lambda xs: "  ".join(str(x).rjust(w) for x, w in zip(xs, widths))
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def best_round(summary: dict, metric: str, goal: str):
    """(t, value) of the round whose `metric` is best ('min' or 'max'), the earliest on ties; or None."""
    pts = [(int(k.split()[1]), r[metric]) for k, r in summary.items()  # NaN is never best: no comparison holds
           if k.startswith("round ") and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not pts:
        return None
    sign = 1.0 if goal == "min" else -1.0
    return min(pts, key=lambda p: (sign * p[1], p[0]))


def rounds_since_best(summary: dict, metric: str, goal: str) -> int:
    """How many of the logged rounds came after the best one (0: the latest round is the best)."""
    best = best_round(summary, metric, goal)
    last = max((int(k.split()[1]) for k in summary if k.startswith("round ")), default=-1)
    return 0 if best is None else last - best[0]


@contextlib.contextmanager
def timed(times: dict, key: str):
    """times[key] = the wall-clock seconds the block took."""
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0
