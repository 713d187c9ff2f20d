"""Ahead-of-time compiles for real TPU chips (a v5p-8 topology through libtpu; no TPU needed): the
splash kernel is what the train step, the scorer's forward and the sampler's prefill run on TPU, and
its memory grows linearly with the context where the einsum path's grows quadratically.

Needs libtpu, which the test requirements leave out (a 660 MB library): the module skips, saying so,
where neither TPU_LIBRARY_PATH nor the `libtpu` package is present. Run it with (docs/scale_out.md)

  .venv/bin/pip install --target /tmp/libtpu "libtpu==0.0.42.*"   # the libtpu jax[tpu]==0.10.2 pins
  TPU_LIBRARY_PATH=/tmp/libtpu/libtpu/libtpu.so .venv/bin/python -m pytest -q -n 0 tests/test_tpu_aot.py

One process may hold libtpu at a time (it takes /tmp/libtpu_lockfile): run nothing else using it.
"""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from spjax import compile_check as cc, model, sharding as shd
from spjax.config import MeshConfig, ModelConfig, load_config

if not os.environ.get("TPU_LIBRARY_PATH") and importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (TPU_LIBRARY_PATH unset, no libtpu package): see this module's "
                "docstring to run the TPU ahead-of-time compiles", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Mistral's attention shape (head_dim 128, GQA 4:1, a sliding window) at two layers
MISTRALISH = ModelConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=128, sliding_window=1024, architecture="mistral",
                         param_dtype="float32", compute_dtype="bfloat16")


@pytest.fixture(scope="module")
def v5p8():
    target = cc.parse_target("v5p-8")
    return target, cc.tpu_devices(target)  # libtpu is present: a failure here is a real one


def test_compile_check_picks_splash_for_a_tpu_topology(v5p8):
    target, devices = v5p8
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"), ["run.batch_size=8", "data.max_len=256",
                                                                  "data.buckets=256"])
    report = cc.check(cfg, devices, target=target)
    assert report.platform == "tpu" and report.model["attention"] == "splash"
    assert report.fits and [p.name for p in report.programs] == ["train_step", "sample"]
    assert report.programs[0].shape.endswith("packed")  # data.pack=auto packs where splash serves the step
    assert jax.default_backend() == "cpu"  # decided by the target's devices, not by this host


def _grad_program(cfg, mesh, L, B=4):
    params = cc._abstract(model.param_shapes(cfg), shd.param_shardings(cfg, mesh))
    ids = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=shd.batch_sharding(mesh, 2))

    def loss(p, ids_BxL):
        hidden_BxLxD, _ = model.apply(cfg, p, ids_BxL, kv_mask_BxS=ids_BxL > 0, right_padded=True)
        return jnp.sum(hidden_BxLxD.astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(jax.grad(loss)).lower(params, ids).compile()


def test_splash_memory_is_linear_in_the_context(v5p8):
    _, devices = v5p8
    mesh = shd.make_mesh(MeshConfig(data=4), devices)
    temp = {}
    for attn in ("auto", "xla"):
        for L in (1024, 4096):
            compiled = _grad_program(dataclasses.replace(MISTRALISH, attention=attn), mesh, L)
            assert ("tpu_custom_call" in compiled.as_text()) == (attn == "auto")  # the Mosaic kernel
            temp[attn, L] = compiled.memory_analysis().temp_size_in_bytes
    # 4x the context: the einsum path's scores grow 16x, splash's activations 4x
    assert temp["xla", 4096] > 8 * temp["xla", 1024]
    assert temp["auto", 4096] < 5 * temp["auto", 1024]
    assert temp["auto", 4096] < temp["xla", 4096] / 4


def test_a_program_over_a_chips_memory_is_refused_by_the_compiler_and_reported(capsys):
    """Qwen3-0.6B's config on one v5e chip (16 GiB): libtpu refuses both programs as it compiles them; the check
    says so and exits 1 (a traceback before; and v5e-1 itself fell back to a CPU stand-in)."""
    rc = cc.main(["--config", os.path.join(ROOT, "configs", "single_gpu_qwen3_0.6b.py"), "--topology", "v5e-1"])
    out = capsys.readouterr().out
    assert rc == 1 and "stand-in" not in out and "the compiler refused it for want of memory" in out
    assert "DOES NOT FIT" in out
