"""Ahead-of-time compile check: does a config's train step (and sampler) fit its devices' memory?

  python -m spjax.compile_check --config configs/spin_zephyr7b_v5p.py [--topology v5p-32] [key=value ...]

Compiles the pair train step and the sampler's prefill + decode loop for the config's mesh (refused
as a run would refuse it) and prints each program's per-device memory (`memory_analysis()`). Nothing
runs: state, params and batches are ShapeDtypeStructs with their shardings (a 7B checks on a laptop).
With a reward model as the judge (judge.name reward_model:PATH), its scoring program is compiled too,
with its params beside it: their shapes come from PATH/config.json, else from a JUDGE_MODEL ModelConfig
the config file declares (as `model` does for the policy); with neither, the report says the reward
model is not counted. Between judge phases they wait in host memory (spjax.reward_model), so they count
beside the train step and the sampler only on devices without pinned host memory.

Targets (`--topology`, else the config file's TOPOLOGY constant, else this machine's devices):
  TPU slices (v4-8, v5p-32, v5e-16, v6e-8, ... or a raw libtpu name like v5:2x2x4) compile for the
  real chips through libtpu's topology description (as MaxText's train_compile): no TPU, only
  `pip install "jax[tpu]"` matching jax (or TPU_LIBRARY_PATH at a libtpu.so). Without libtpu, and for GPU targets (8xh100, h200, ...) unless this host has those
  GPUs, the same programs compile for as many fake CPU devices: the mesh and shardings are the
  target's, the byte counts are the CPU compiler's (an estimate: fusion and layouts differ).
Exit status: 0 fits, 1 does not fit (or a program failed to compile), 2 config error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional

from spjax.program_memory import (ProgramMemory, Report, compile_lowered, loop_collectives,  # noqa: F401
                                  moving_arrays)  # (and spjax.compile_check's API)
from spjax.targets import GiB, Target, parse_target, tpu_devices  # noqa: F401 (spjax.compile_check API)


# ---------------------------------------------------------------------------------------------
# Compiling


def model_config(cfg):
    """The ModelConfig a run of `cfg` would use: model_path's config.json / .gguf when present on this
    machine, else `cfg.model` (the configs in configs/ state their model's shape for this purpose)."""
    from spjax.config import ConfigError
    path = cfg.model_path
    if path and os.path.exists(path):
        if path.endswith(".gguf"):
            from spjax import gguf_io
            return gguf_io.config_from_gguf(gguf_io.read(path), path, **cfg.model_overrides())
        from spjax import hf
        where = os.path.join(path, "config.json")
        return hf.config_from_hf(hf.read_json(where), where, **cfg.model_overrides())
    if cfg.model is None:
        raise ConfigError(f"model_path: {path} is not on this machine and the config sets no `model` "
                          "shape to compile for")
    return dataclasses.replace(cfg.model, **cfg.model_overrides())


def _abstract(shapes, shardings):
    import jax
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, shardings)


def state_bytes(state) -> dict:
    """Per-device bytes of an abstract TrainState's params and optimizer state."""
    from spjax import sharding as shd
    return {"params": shd.bytes_per_device(state.params), "opt_state": shd.bytes_per_device(state.opt_state)}


def compile_train_step(cfg, model_cfg, mesh):
    """(ProgramMemory, abstract TrainState) of the train step: longest bucket, a row per sequence (the most)."""
    from spjax import step as step_lib
    optimizer = step_lib.make_optimizer(cfg.optim, 1000)  # (its step count is an argument of the program)
    state = step_lib.abstract_state(model_cfg, optimizer, mesh)
    B, L = cfg.run.batch_size, cfg.data.max_len
    batch_shapes = step_lib.pair_batch_shapes(B, L, packed=step_lib.packs(cfg.data.pack, model_cfg, L))
    fn = step_lib.make_train_step(model_cfg, cfg.objective, cfg.optim, optimizer, mesh, batch_shapes,
                                  schedule_arg=True)  # (as a run's rounds call it)
    accum = f" A={cfg.optim.grad_accum}" if cfg.optim.grad_accum > 1 else ""
    shape = f"B={B} L={L}{accum}{' packed' * batch_shapes.packed}"
    lowered = fn.lower(state, batch_shapes, step_lib.schedule_steps(cfg.optim, 1000))
    return compile_lowered("train_step", shape, lowered)[0], state


def compile_sampler(cfg, model_cfg, mesh, target_platform: str = ""):
    """ProgramMemory of one sampling batch: prefill of the longest prompt bucket, then the decode loop.
    target_platform 'gpu' on CPU stand-ins: the decode loop a GPU runs (layers unrolled, steps chunked),
    not the one this host would pick."""
    import jax
    from spjax import model, sampler, sharding as shd
    s = cfg.sampling
    params = _abstract(model.param_shapes(model_cfg), shd.param_shardings(model_cfg, mesh))
    sample_cfg, held = model_cfg, 0
    if model_cfg.lora.rank and model_cfg.base_quant == "none":  # lora.for_sampling: the run decodes merged
        from spjax import lora  # projections while the policy's params stay live beside them
        sample_cfg = lora.sampling_config(model_cfg)  # (a mixture's expert adapters stay on the fly)
        # held: the policy's leaves the sampler does not read (the rest it reads as they are: its arguments)
        held = shd.bytes_per_device(params) - shd.bytes_per_device(lora.shared_for_sampling(model_cfg, params))
        merged = jax.eval_shape(lambda p: lora.for_sampling(model_cfg, p)[1], params)
        params = _abstract(merged, shd.param_shardings(sample_cfg, mesh))
    gather = sampler.gather_weights(mesh, s.weights)
    plan = sampler.make_plan(prompt_len=cfg.data.max_prompt_len, max_new_tokens=s.max_new_tokens,
                             batch_size=s.batch_size, num_samples=s.num_samples, temperature=s.temperature,
                             top_k=s.top_k, top_p=s.top_p, mesh=mesh, gather_weights=gather,
                             **(dict(unroll_layers=True, decode_chunk=sampler.GPU_CHUNK) if target_platform == "gpu"
                                else {}))
    k = f" K={s.num_samples}" if s.num_samples > 1 else ""
    shape = (f"B={plan.rows} P={plan.prompt_len} T={s.max_new_tokens}{k}" + (" gathered" if gather else "")
             + (" merged, + policy" if held else ""))
    program, compiled = compile_lowered("sample", shape, sampler.lower(sample_cfg, plan, params))
    moving = 0 if compiled is None else len(moving_arrays(loop_collectives(compiled.as_text())))
    return dataclasses.replace(program, held=held, loop_collectives=moving)


def judge_model_config(cfg, declared=None) -> tuple:
    """(the reward model judge's ModelConfig, '') as the run loads it (params and compute in the run's
    compute dtype, no LM head): PATH/config.json when on this machine, else `declared` (a config file's
    JUDGE_MODEL). (None, why) when neither is there; (None, '') when the judge is not a reward model."""
    kind, _, path = cfg.judge.name.partition(":")
    if kind != "reward_model":
        return None, ""
    dtypes = dict(param_dtype=cfg.compute_dtype, compute_dtype=cfg.compute_dtype)
    if os.path.exists(os.path.join(path, "config.json")):
        from spjax import reward_model
        return reward_model.model_config(path, **dtypes)[0], ""
    if declared is not None:
        return dataclasses.replace(declared, tie_embeddings=True, **dtypes), ""
    return None, (f"the reward model judge ({path}) is not on this machine and the config file declares no "
                  "JUDGE_MODEL shape: its params and its scoring program are not counted")


def judge_params(rm_cfg, mesh) -> tuple:
    """(abstract decoder params, abstract score head [D, 1]) of a reward model, sharded as a run places them."""
    import jax
    from spjax import model, sharding as shd
    params = _abstract(model.param_shapes(rm_cfg), shd.param_shardings(rm_cfg, mesh))
    return params, jax.ShapeDtypeStruct((rm_cfg.hidden_size, 1), rm_cfg.param_dtype, sharding=shd.replicated(mesh))


def judge_markup(cfg) -> int:
    """The tokens a reward model judge's own chat template puts around a prompt and its answer: it reads
    the conversation rendered that way. 0 where its directory holds no tokenizer with a chat template (it
    then reads the policy's tokens), or is not on this machine (a declared JUDGE_MODEL)."""
    path = cfg.judge.name.partition(":")[2]
    if not cfg.judge.name.startswith("reward_model:") or not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return 0
    from spjax import hf
    from spjax.data.templates import chat_ids, has_chat_template
    tok = hf.load_tokenizer(path)
    if not has_chat_template(tok):
        return 0
    return len(chat_ids(tok, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]))


def compile_judge(cfg, rm_cfg, mesh, policy_bytes: int) -> ProgramMemory:
    """ProgramMemory of one reward model batch (judge.batch_size sequences) at the longest a round scores:
    the prompt + new tokens, plus the markup of the reward model's own chat template where it has one (an
    upper bound: the prompt's tokens hold the policy's markup, which that one replaces), bucketed, within its
    max_position_embeddings. The policy's params stay live."""
    import jax
    import jax.numpy as jnp
    from spjax import reward_model, sharding as shd
    dp = shd.data_parallel_size(mesh)
    B = -(-cfg.judge.batch_size // dp) * dp
    up = lambda n: -(-n // reward_model.BUCKET) * reward_model.BUCKET  # noqa: E731
    longest = cfg.data.max_prompt_len + cfg.sampling.max_new_tokens + judge_markup(cfg)
    L = min(up(longest), up(rm_cfg.max_position_embeddings))
    params, head = judge_params(rm_cfg, mesh)
    ids = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=shd.batch_sharding(mesh, 2))
    length = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=shd.batch_sharding(mesh, 1))
    lowered = reward_model._scores.lower(rm_cfg, params, head, ids, length, 0)
    return dataclasses.replace(compile_lowered("judge", f"B={B} L={L}, + policy", lowered)[0], held=policy_bytes)


def check(cfg, devices, *, target: Optional[Target] = None, platform: str = "", stand_in: str = "",
          sample: bool = True, echo=None, judge_model=None) -> Report:
    """Compile `cfg`'s programs for a mesh over `devices` (real or compile-only) and report memory.
    judge_model: the reward model judge's shape where its directory is absent (a config's JUDGE_MODEL)."""
    import jax
    from spjax import lora, model, sharding as shd
    from spjax.config import ConfigError
    model_cfg = model_config(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    dp = shd.data_parallel_size(mesh)
    for field, n in (("run.batch_size", cfg.run.batch_size), ("sampling.batch_size", cfg.sampling.batch_size),
                     ("run.batch_size / optim.grad_accum", cfg.run.batch_size // cfg.optim.grad_accum)):
        if n % dp:
            raise ConfigError(f"{field}: {n} is not divisible by the data-parallel size {dp}")
    shd.check_sharded(jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   model.param_shapes(model_cfg), shd.param_shardings(model_cfg, mesh)), mesh)
    programs, notes = [], []
    rm_cfg, why = judge_model_config(cfg, judge_model)
    notes += [why] if why else []
    rm_bytes = 0 if rm_cfg is None else sum(map(shd.bytes_per_device, judge_params(rm_cfg, mesh)))
    resident = 0 if shd.host_memory(devices) else rm_bytes  # (what waits on the devices beside other programs)
    # Traced under the mesh: attention_impl then picks kernels for the target's devices (splash for a
    # TPU topology compiled from a CPU host), and splash runs per shard of this mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        attention = model.attention_impl(model_cfg, cached=False, right_padded=True, q_len=cfg.data.max_len)
        said = lambda p: (echo or (lambda line: None))(  # noqa: E731 - progress: a 7B compiles for a minute
            f"{'refused (out of memory)' if p.refused else 'compiled'} {p.name} in {p.compile_s:.1f}s") or p
        train, state = compile_train_step(cfg, model_cfg, mesh)
        programs.append(said(dataclasses.replace(train, held=train.held + resident)))
        if sample:
            sampler_row = compile_sampler(cfg, model_cfg, mesh, target.platform if target else "")
            programs.append(said(dataclasses.replace(sampler_row, held=sampler_row.held + resident)))
            if rm_cfg is not None:
                programs.append(said(compile_judge(cfg, rm_cfg, mesh, state_bytes(state)["params"])))
    n_params = lora.model_params(model_cfg, model.param_shapes(model_cfg))  # (int4: two a stored byte)
    return Report(
        target=target.name if target else f"{len(devices)} local devices",
        platform=platform or devices[0].platform, stand_in=stand_in, n_devices=len(devices),
        mesh=dict(mesh.shape), state_bytes=dict(state_bytes(state), **({"reward model": rm_bytes} if rm_cfg else {})),
        model=dict(architecture=model_cfg.architecture, params=n_params, layers=model_cfg.num_layers,
                   param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype, remat=model_cfg.remat,
                   attention=attention, lora=_lora_line(model_cfg), judge=_judge_line(rm_cfg, resident)),
        programs=programs, memory_bytes=target.memory_bytes if target else None, notes=notes)


def _judge_line(rm_cfg, resident: int) -> str:
    """'' without a reward model judge, else what it is and where its params are."""
    if rm_cfg is None:
        return ""
    import jax
    from spjax import model
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(model.param_shapes(rm_cfg))) + rm_cfg.hidden_size
    where = ("live beside every program (its state bytes below are in each program's `held`)" if resident else
             "on the devices for its own program (`held` there), in host memory beside the others")
    return (f"reward model {rm_cfg.architecture} {n / 1e6:,.1f}M params in {rm_cfg.param_dtype}, {rm_cfg.num_layers} "
            f"layers, {where}")


def _lora_line(model_cfg) -> str:
    """'' for full fine-tuning, else the run's own line on what trains (counted on the params' shapes)."""
    from spjax import lora, model
    return lora.describe(model_cfg, model.param_shapes(model_cfg)) if model_cfg.lora.rank else ""


# ---------------------------------------------------------------------------------------------
# Command line


def _config_constants(path: str) -> dict:
    """DEVICES / TOPOLOGY / JUDGE_MODEL declared at the top of a config file (absent: {})."""
    import importlib.util
    from spjax.overrides import split_path
    spec = importlib.util.spec_from_file_location("_spjax_cc_constants", split_path(path)[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: getattr(mod, k) for k in ("DEVICES", "TOPOLOGY", "JUDGE_MODEL") if hasattr(mod, k)}


def _resolve_devices(target: Optional[Target], n_local: Optional[int], echo):
    """(devices, platform, stand_in) for a target; CPU stand-ins where the target cannot be compiled for."""
    import jax
    if target is None:
        devs = jax.devices()
        if not n_local or len(devs) >= n_local:
            return (devs[:n_local] if n_local else devs), "", ""
        target = Target(f"{n_local} devices", devs[0].platform, n_local)
    if target.platform == "tpu":
        try:
            return tpu_devices(target), "tpu", ""
        except Exception as e:  # noqa: BLE001 - any libtpu failure means: use the stand-in
            reason = f"no TPU topology ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    else:
        local = [d for d in jax.devices() if d.platform == target.platform]
        if len(local) >= target.devices:
            return local[:target.devices], target.platform, ""
        reason = f"{len(local)} local {target.platform} devices"
    cpus = jax.devices("cpu")
    if len(cpus) < target.devices:
        raise RuntimeError(f"need {target.devices} CPU stand-in devices, have {len(cpus)} "
                           "(the CPU device count is fixed once jax has started)")
    echo(f"{target.name}: {reason}; compiling for {target.devices} CPU devices instead")
    return cpus[:target.devices], "cpu", reason


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spjax compile-check", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="a Python config file (file.py[:arg])")
    ap.add_argument("--topology", default=None, help="v5p-32, v4-8, v5e-16, v6e-8, v5:2x2x4, 8xh100, h200, "
                                                     "or 'local' (default: the config's TOPOLOGY, else local)")
    ap.add_argument("--devices", type=int, default=None,
                    help="local devices to use (default: the config's DEVICES; CPU devices are faked as needed)")
    ap.add_argument("--no-sample", action="store_true", help="compile the train step only")
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args(argv)

    from spjax.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
        if args.devices is not None and args.devices < 1:
            raise ConfigError(f"--devices {args.devices}: must be >= 1")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ConfigError(f"--json {args.json}: no such directory (checked before compiling)")
        consts = _config_constants(args.config)
        topo = args.topology or consts.get("TOPOLOGY") or "local"
        target = None if topo == "local" else parse_target(topo)
    except (ConfigError, ValueError) as e:
        print(f"compile_check: config error: {e}", file=sys.stderr)
        return 2
    n_local = args.devices or (None if target else consts.get("DEVICES"))
    need_cpus = target.devices if target else n_local
    import jax
    if need_cpus:
        try:  # stand-in CPU devices; only possible before a backend starts, and other platforms keep theirs
            jax.config.update("jax_num_cpu_devices", need_cpus)
        except RuntimeError:
            pass  # started already (an embedding process): use the CPU devices there are
    try:
        devices, platform, stand_in = _resolve_devices(target, n_local, print)
        report = check(cfg, devices, target=target, platform=platform, stand_in=stand_in,
                       sample=not args.no_sample, echo=print, judge_model=consts.get("JUDGE_MODEL"))
    except ConfigError as e:
        print(f"compile_check: config error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 1 if report.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
