"""Every file in configs/ loads, its mesh fits the device count it targets, and it says how to launch it."""
import glob
import importlib.util
import os

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from spjax import model, sharding
from spjax.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
DEFAULT_DEVICES = 8  # for configs that name no DEVICES (tiny, demo): the test machine's fake devices
STAGED = ["spin_zephyr7b_v5p", "spin_zephyr7b_8xh100", "chi2_zephyr7b_v5p", "chi2_zephyr7b_8xh100"]


def module(path):
    spec = importlib.util.spec_from_file_location(f"cfgmod_{os.path.basename(path)[:-3]}", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_scale_out_configs_are_there():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert set(STAGED) | {"single_gpu_qwen2_0.5b", "single_gpu_qwen3_0.6b", "single_gpu_llama3.2_1b", "tiny"} <= names


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_fits_its_devices(path):
    cfg = load_config(os.path.join(ROOT, path))
    assert isinstance(cfg, Config)
    n = getattr(module(path), "DEVICES", DEFAULT_DEVICES)
    data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, n)
    dp = data * fsdp
    for field, b in (("run.batch_size", cfg.run.batch_size), ("sampling.batch_size", cfg.sampling.batch_size),
                     ("micro-batch", cfg.run.batch_size // cfg.optim.grad_accum)):
        assert b % dp == 0, f"{path}: {field} {b} does not split over {dp} data-parallel devices"


def _variants(path):
    """path, and path:variant for each of a config's VARIANTS (e.g. LoRA's v5e8 ones)."""
    return [path] + [f"{path}:{v}" for v in getattr(module(path), "VARIANTS", {}) if v is not None]


def _devices(path):
    mod = module(path.split(":")[0])
    variant = path.split(":")[1] if ":" in path else None
    return getattr(mod, "VARIANTS", {}).get(variant, (None, None))[1] or getattr(mod, "DEVICES", DEFAULT_DEVICES)


def _shards_params(path):
    cfg = load_config(os.path.join(ROOT, path))
    shape = sharding.mesh_shape(cfg.mesh, _devices(path))
    return cfg.model is not None and shape[1] * shape[2] > 1


# configs (and variants) with a model shape and fsdp/tensor devices
SHARDED = [v for p in CONFIGS for v in _variants(p) if _shards_params(v)]


def test_the_multi_device_configs_are_checked():
    assert {f"configs/{n}.py" for n in STAGED} <= set(SHARDED)


@pytest.mark.parametrize("path", SHARDED)
def test_big_params_are_sharded_on_the_target_mesh(path):
    # maxtext's check, on an abstract mesh of the target's size: no large param stays replicated
    # when the mesh has fsdp/tensor devices (e.g. a dim that no axis divides).
    import dataclasses
    cfg = load_config(os.path.join(ROOT, path))
    shape = sharding.mesh_shape(cfg.mesh, _devices(path))
    mesh = AbstractMesh(shape, sharding.AXES)
    mcfg = dataclasses.replace(cfg.model, **cfg.model_overrides())  # as the run builds it: LoRA, base_quant
    logical = model.param_logical_axes(mcfg)
    shapes = model.param_shapes(mcfg)
    import jax
    specs = jax.tree.map(lambda spec, x: (x.size, sharding.logical_to_spec(spec, x.shape, mesh)), logical, shapes,
                         is_leaf=lambda s: isinstance(s, P))
    bad = [s for s in jax.tree.leaves(specs, is_leaf=lambda t: isinstance(t, tuple) and len(t) == 2)
           if s[0] >= sharding.BIG_PARAM and all(a is None for a in s[1])]
    assert not bad


@pytest.mark.parametrize("path", CONFIGS)
def test_docstring_holds_its_launch_command(path):
    doc = module(path).__doc__ or ""
    lines = [line.strip() for line in doc.splitlines()]
    launch = [line for line in lines if path in line and ("spjax.train" in line or line.startswith("bash launch/"))]
    assert launch, f"{path}: the docstring should show a launch command naming {path}"


@pytest.mark.parametrize("name", STAGED)
def test_spin_schedule_stages(name):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    full, late, last = (load_config(path + s) for s in ("", ":iter2", ":iter3"))
    assert (full.run.rounds, late.run.rounds, last.run.rounds) == (4, 3, 4)
    assert (full.optim.lr, late.optim.lr, last.optim.lr) == (5e-7, 1e-7, 1e-7)
    assert full.run.mix_previous and full.optim.name == "rmsprop" and full.run.batch_size == 64
    assert (full.data.max_len, full.data.max_prompt_len, full.objective.beta) == (1024, 512, 0.1)
    if name.startswith("spin"):
        assert full.objective.name == "spin" and last.objective.beta == 5.0
    else:  # chi2 keeps its own beta and c in every stage; everything else is the SPIN config's
        spin = load_config(path.replace("chi2_", "spin_") + ":iter3")
        assert last.objective.name == "chi2" and last.objective.beta == 0.1
        assert last.optim == spin.optim and last.run == spin.run and last.mesh == spin.mesh


def test_gpu_configs_differ_from_v5p_only_in_their_mesh_and_batching():
    v5p = load_config(os.path.join(ROOT, "configs/spin_zephyr7b_v5p.py"))
    gpu = load_config(os.path.join(ROOT, "configs/spin_zephyr7b_8xh100.py"))
    assert (v5p.mesh.fsdp, gpu.mesh.fsdp) == (16, 8)
    assert gpu.model == v5p.model and gpu.data == v5p.data and gpu.objective == v5p.objective
    assert gpu.run.batch_size == v5p.run.batch_size and gpu.optim.lr == v5p.optim.lr
