"""What the bench scripts share: the peer's model shapes, where the peer is, host memory traced, and the JSON record."""
from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch_pair_bench.py's SHAPES as ModelConfig fields; LlamaConfig's defaults fill the rest
# (rms_norm_eps 1e-6, rope_theta 1e4, max_position_embeddings 2048).
SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=2,
                 num_heads=4, num_kv_heads=2, tie_embeddings=True, max_position_embeddings=2048),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                        num_heads=32, num_kv_heads=8, tie_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, tie_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
}


def model_config(shape: str, **fields):
    """The ModelConfig of a peer shape (random init), with `fields` (dtypes, remat) set."""
    from spjax.config import ModelConfig
    return ModelConfig(**{**SHAPES[shape], "rms_norm_eps": 1e-6, **fields})


def peer_script() -> str:
    """The peer baseline: $SPJAX_PEERS/torch_pair_bench.py, default ../shared/peers beside the checkout."""
    base = os.environ.get("SPJAX_PEERS") or os.path.join(ROOT, "..", "shared", "peers")
    return os.path.abspath(os.path.join(base, "torch_pair_bench.py"))


# The machine's load before the bench started: on a CPU another process's threads slow one side of a
# ratio more than the other (a peer run in its own process, spjax in this one), so figures taken on a
# busy machine say so (emit warns above half the cores busy).
LOAD_AT_START = os.getloadavg()[0]


def emit(record: dict, name: str):
    """Print the record as one JSON line, and write it to $OUT/<name> when OUT is set."""
    record = {**record, "loadavg_1m_at_start": round(LOAD_AT_START, 2)}
    if LOAD_AT_START > 0.5 * (os.cpu_count() or 1):
        print(f"note: the 1-minute load average was {LOAD_AT_START:.1f} on {os.cpu_count()} cores when this bench "
              "started: other processes shared the machine, so these figures (and ratios) are noisy", file=sys.stderr)
    print(json.dumps(record))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(record, f, indent=1)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn (blocking on its result); warm it up first."""
    import time

    import jax
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def time_steps(fn, state, batch, warmup: int, steps: int):
    """(state, metrics, warmup seconds, seconds per step) of `steps` timed calls of a jitted train
    step after `warmup` untimed ones (the first compiles); checks the last step was finite."""
    import time

    import jax
    t = time.perf_counter()
    for _ in range(warmup):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t) / steps
    assert bool(metrics["finite"]), "non-finite loss in the benchmark step"
    return state, metrics, warmup_s, dt


def peak_memory() -> tuple:
    """(bytes, what was measured): the device's peak where it reports one, else the process max RSS."""
    import resource

    import jax
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def traced(fn):
    """(peak traced host bytes (Python's allocations, numpy's included), seconds) of one call, its result ready."""
    import jax
    tracemalloc.start()
    t = time.perf_counter()
    jax.block_until_ready(fn())
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds
