"""Test setup shared by every test module.

Fake 8 CPU devices and the offline hub must be set before jax's backend starts or transformers is
imported, so they live here (pytest imports conftest first) and nowhere else. The persistent compile cache makes the
second CI run (and every test after the first compile of a shape) much cheaper.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# spjax.train processes the tests start keep every program in the compile cache, not only those that took
# over 1 s to compile: ~100 small programs a tiny run, ~5 s to compile, loaded in ~0.3 s by the next run.
os.environ.setdefault("SPJAX_COMPILE_CACHE_MIN_SECS", "0")

import jax  # noqa: E402  (the flags below are read when the backend starts, at the first device use)

from spjax.train import cpu_devices_flags  # noqa: E402

# 8 devices in this process (and in the spjax.train processes tests start, which inherit XLA_FLAGS):
# cpu_devices_flags turns off the XLA:CPU scheduler whose parallel collectives can deadlock them.
os.environ["XLA_FLAGS"] = cpu_devices_flags(
    (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
# LLVM at -O0 for XLA:CPU's code. The suite's time is mostly compiling many small programs once (a CI clone
# starts with an empty compile cache): a cold suite took 972 s at the default level and 747 s at -O0, in
# CPU time 1,867 against 1,417 s (2026-12-04, one run each). The programs compute the same operations
# without fast math at either level, but may sum in another order: a test whose check is that sensitive
# is ill-conditioned at any level (test_step's gradient accumulation was; it says how). Spawned processes
# inherit it, as every flag here (test_rounds._devices_flags changes only their device count).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

_cache = os.environ.get("SPJAX_TEST_COMPILE_CACHE",
                        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"conftest should give 8 fake CPU devices, got {len(devs)}"
    return devs


# The suite runs on two pytest-xdist workers, one test file at a time each, in this order (pyproject's
# addopts turn off xdist's reordering by size).
# The longest files go first, longest first (their cold-cache seconds on 2 cores, 2026-12-03, in the
# comments), so that neither worker is left with a long one at the end while the other idles: before,
# test_sampler (234 s) started late and the suite ran ~80 s past half its total.
_FIRST = ("test_rounds.py",  # 349
          "test_sampler.py",  # 234
          "test_perf_equivalence.py",  # 115
          "test_judged_run.py",  # 93
          "test_lora.py",  # 79
          "test_gemma.py",  # ~70 (2026-12-03, warm: 40)
          "test_model.py",  # 70
          "test_lora_run.py",  # 66
          "test_gguf_tokenizer.py",  # 64
          "test_step.py",  # 61
          "test_splash.py",  # 52
          "test_logprobs.py",  # 44
          "test_packing.py", "test_compile_check.py", "test_compile_once.py", "test_optim.py")  # 34-38


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))  # stable: file order kept otherwise
