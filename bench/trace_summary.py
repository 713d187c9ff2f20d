"""Summarize a jax.profiler trace without TensorBoard: where the time went, per device and per op.

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes a Chrome/Perfetto JSON trace next to
its xplane file; this reads it and prints, for each traced process (the host, and on a GPU
`/device:GPU:0` with its streams' kernels), the span from its first to its last event, how much
of that span some event was running (the busy fraction: on a GPU, 1 - busy is the time the card sat
idle between kernels, e.g. waiting for launches), and the ops that took the most time.

  python bench/trace_summary.py /tmp/trace            # newest trace under that directory
  python bench/sampler.py --shape llama3.2-1b --trace /tmp/trace      # trace the sampler and summarize
  python bench/train_step.py --shape llama3.2-1b --trace /tmp/trace   # the same for one pair step
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os


def newest_trace(log_dir: str) -> str:
    """The newest perfetto_trace.json.gz under log_dir (jax writes plugins/profile/<time>/)."""
    found = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"{log_dir}: no perfetto_trace.json.gz (trace with create_perfetto_trace=True)")
    return max(found, key=os.path.getmtime)


def _busy_us(intervals) -> tuple:
    """(length of the union of [start, end) intervals, the gaps between its pieces in us): events on
    one line may nest or overlap. Many short gaps on a GPU stream mean launch-bound kernels; a few
    long ones, the host waiting (a sync) before it launches more."""
    total, reach, gaps = 0.0, None, []
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            if reach is not None:
                gaps.append(start - reach)
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total, gaps


def summarize(path: str, top: int = 12) -> dict:
    """{process: {span_ms, threads: {thread: (events, busy_ms, busy_frac, idle gaps in us, sorted)},
    top: [(op, total ms, count)]}}.

    Busy time is per thread (on a GPU, per stream, and per derived line such as "XLA Ops"): the
    union of its events' intervals over the process's span. Ops are ranked over the whole process.
    """
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    per = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            per[e["pid"]].append(e)
    out = {}
    for pid, evs in per.items():
        span_us = max(float(e["ts"]) + float(e["dur"]) for e in evs) - min(float(e["ts"]) for e in evs)
        by_thread = collections.defaultdict(list)
        by_op = collections.defaultdict(lambda: [0.0, 0])
        for e in evs:
            by_thread[e.get("tid")].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
            by_op[e["name"]][0] += float(e["dur"])
            by_op[e["name"]][1] += 1
        lines = {}
        for tid, spans in by_thread.items():
            busy_us, gaps = _busy_us(spans)
            frac = busy_us / span_us if span_us else 0.0
            lines[threads.get((pid, tid), str(tid))] = (len(spans), busy_us / 1e3, frac, sorted(gaps))
        ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
        out[procs.get(pid, str(pid))] = {"span_ms": span_us / 1e3, "threads": lines,
                                         "top": [(name, t / 1e3, n) for name, (t, n) in ranked]}
    return out


def report(summary: dict) -> None:
    for proc, s in sorted(summary.items(), key=lambda kv: ("device" not in kv[0], kv[0])):
        print(f"{proc}: {s['span_ms']:.1f} ms from its first event to its last")
        for name, (n, busy_ms, frac, gaps) in sorted(s["threads"].items(), key=lambda kv: -kv[1][1])[:8]:
            idle = (f"; {len(gaps)} idle gaps, median {gaps[len(gaps) // 2]:.1f} us, longest {gaps[-1] / 1e3:.2f} ms"
                    if gaps else "")
            print(f"  busy {frac:6.1%} ({busy_ms:9.2f} ms, {n:6d} events{idle})  {name}")
        for name, ms, n in s["top"]:
            print(f"  {ms:10.2f} ms {n:7d}x  {name[:100]}")


def trace_and_report(log_dir: str, fn, label: str = "one call", top: int = 12) -> dict:
    """Profile one call of fn (blocking on its result) into log_dir, print the summary, return it."""
    import jax
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        jax.block_until_ready(fn())
    path = newest_trace(log_dir)
    print(f"trace of {label}: {path}")
    summary = summarize(path, top)
    report(summary)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log_dir")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    path = newest_trace(a.log_dir)
    print(path)
    report(summarize(path, a.top))


if __name__ == "__main__":
    main()
