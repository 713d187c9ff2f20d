"""Ahead-of-time compile check: does a config's train step (and sampler) fit its devices' memory?

  python -m spjax.compile_check --config configs/spin_zephyr7b_v5p.py [--topology v5p-32] [key=value ...]

Compiles the pair train step and the sampler's prefill + decode loop for the config's mesh (refused
as a run would refuse it) and prints each program's per-device memory (`memory_analysis()`). Nothing
runs: state, params and batches are ShapeDtypeStructs with their shardings (a 7B checks on a laptop).

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
import time
from typing import Optional

from spjax.targets import GiB, Target, parse_target, tpu_devices  # noqa: F401 (spjax.compile_check API)


# ---------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class ProgramMemory:
    """One compiled program's per-device bytes (XLA's memory_analysis)."""

    name: str
    shape: str  # the static shape it was compiled for, e.g. 'B=64 L=1024'
    argument: int
    output: int
    alias: int  # output bytes that reuse donated argument buffers
    temp: int
    code: int  # generated code
    compile_s: float
    # XLA's cost analysis, per device. Pallas kernels (TPU splash attention) carry no cost estimate:
    # their work is not in these counts.
    flops: float = 0.0
    bytes_accessed: float = 0.0
    held: int = 0  # live beside the program, not its argument (a LoRA policy while its merged copy samples)
    loop_collectives: int = 0  # the sampler's collectives moving arrays inside its loops (prefill scan, decode)
    refused: str = ""  # the compiler's own out-of-memory refusal (libtpu checks HBM): only temp is then known

    @property
    def peak(self) -> int:
        # arguments and outputs are live together except where donation aliases them
        return self.argument + self.output - self.alias + self.temp + self.code + self.held


@dataclasses.dataclass
class Report:
    target: str
    platform: str  # what compiled: tpu (topology, compile-only), gpu, cpu
    stand_in: str  # '' when compiled for the target itself, else why CPU devices stand in
    n_devices: int
    mesh: dict
    model: dict  # architecture, params, dtypes
    state_bytes: dict  # per device, from the shardings: params, opt_state
    programs: list
    memory_bytes: Optional[int]  # usable per device; None: unknown

    @property
    def peak(self) -> int:
        # rounds.run frees the train state before sampling, so each program's own peak is the need
        return max((p.peak for p in self.programs), default=0)

    @property
    def fits(self) -> Optional[bool]:
        if any(p.refused for p in self.programs):
            return False
        return None if self.memory_bytes is None else self.peak <= self.memory_bytes

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["programs"] = [dict(dataclasses.asdict(p), peak=p.peak) for p in self.programs]
        out.update(peak=self.peak, fits=self.fits)
        return out

    def format(self) -> str:
        unit, scale = ("GiB", GiB) if self.peak >= GiB // 4 else ("MiB", 1 << 20)
        g = lambda b: f"{b / scale:8.2f}"
        m, w = self.model, max([34] + [len(p.name) + len(p.shape) + 4 for p in self.programs])
        lines = [f"compile check for {self.target}: {self.n_devices} {self.platform} devices"
                 + (f" (stand-in: {self.stand_in})" if self.stand_in else ""),
                 "mesh " + " ".join(f"{k}={v}" for k, v in self.mesh.items())
                 + f"; model {m['architecture']} {m['params'] / 1e6:,.1f}M params, {m['layers']} layers, "
                 f"params {m['param_dtype']}, compute {m['compute_dtype']}, remat {m['remat']}"
                 + (f"; {m['lora']}" if m.get("lora") else ""),
                 f"state per device ({unit}): "
                 + ", ".join(f"{k} {v / scale:.2f}" for k, v in self.state_bytes.items()),
                 f"{'per device, ' + unit:<{w}}{'args':>8}{'output':>8}{'alias':>8}{'temp':>8}{'code':>8}{'peak':>8}"
                 f"{'compile':>9}"]
        for p in self.programs:
            lines.append(f"{p.name + ' (' + p.shape + ')':<{w}}{g(p.argument)}{g(p.output)}{g(p.alias)}{g(p.temp)}"
                         f"{g(p.code)}{g(p.peak)}{p.compile_s:8.1f}s")
        lines.append("XLA cost per device: " + "; ".join(
            f"{p.name} {p.flops / 1e12:,.1f} TFLOP, {p.bytes_accessed / GiB:,.1f} GiB accessed"
            + (f", {p.loop_collectives} collectives moving arrays in its loops" if p.name == "sample" else "")
            for p in self.programs)
            + f" (attention: {self.model.get('attention', '?')})")
        lines += [f"{p.name}: the compiler refused it for want of memory: {p.refused}" for p in self.programs
                  if p.refused]
        if self.memory_bytes is None:
            lines.append(f"need {self.peak / scale:.2f} {unit} per device; device memory unknown (pass --topology)")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"need {'more than ' * (not self.fits)}{self.peak / GiB:.2f} GiB of {self.memory_bytes / GiB:.1f} GiB per device "
                         f"({100 * self.peak / self.memory_bytes:.0f}%): {verdict}")
        return "\n".join(lines)


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


def _memory(name, shape, compiled, seconds) -> ProgramMemory:
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    if ma is None:  # some backends do not report; keep the row, zeros say so
        return ProgramMemory(name, shape, 0, 0, 0, 0, 0, seconds, flops, accessed)
    return ProgramMemory(name, shape, int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                         int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes),
                         int(ma.generated_code_size_in_bytes), seconds, flops, accessed)


def _compile(name: str, shape: str, lowered) -> tuple:
    """(ProgramMemory, compiled) of a lowered program, or (a row with the compiler's refusal, None) when
    the compiler itself finds the program too large for the device (libtpu checks HBM as it compiles)."""
    import re
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - jax's JaxRuntimeError, or XlaRuntimeError in older jax
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", text)  # e.g. (17.16G): GiB
        temp = int(float(need.group(1)) * 1024 ** (1 + "KMGT".index(need.group(2)))) if need else 0
        refused = " ".join(text.split())[:300]
        return ProgramMemory(name, shape, 0, 0, 0, temp, 0, time.perf_counter() - t0, refused=refused), None
    return _memory(name, shape, compiled, time.perf_counter() - t0), compiled


def loop_collectives(hlo: str) -> list:
    """(op, result type) of each collective (all-gather, all-reduce, ...) inside the while loops of a
    compiled program's HLO text (bodies, conditions and all they call): in the sampler they run on
    every decode step. A scalar one (e.g. `pred[]`: the early-exit check over a split batch) moves no
    array; `moving_arrays` leaves those out."""
    import re
    comps = {}
    for block in hlo.split("\n\n"):
        m = re.search(r"^(?:ENTRY )?%?([\w.\-]+) ", block.strip(), re.M)
        if m:
            comps[m.group(1)] = block
    one = r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
    many = r"(?:branch_computations|called_computations)=\{([^}]*)\}"
    called = lambda b: re.findall(one, b) + [n.strip().lstrip("%") for g in re.findall(many, b) for n in g.split(",")]
    todo = [n for b in comps.values() for n in re.findall(r"(?:body|condition)=%?([\w.\-]+)", b)]
    seen = set()
    while todo:
        c = todo.pop()
        if c in comps and c not in seen:
            seen.add(c)
            todo += called(comps[c])
    op = r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
    return [(k, t) for c in sorted(seen) for t, k in re.findall(op, comps[c])]


def moving_arrays(collectives: list) -> list:
    """The collectives of `loop_collectives` whose result is not a scalar."""
    import re
    return [(k, t) for k, t in collectives if not re.fullmatch(r"\w+\[\](\{.*\})?", t.strip())]  # u32[]{:T(128)} on TPU


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
    return _compile("train_step", shape, lowered)[0], state


def compile_sampler(cfg, model_cfg, mesh, target_platform: str = ""):
    """ProgramMemory of one sampling batch: prefill of the longest prompt bucket, then the decode loop.
    target_platform 'gpu' on CPU stand-ins: the decode loop a GPU runs (layers unrolled, steps chunked),
    not the one this host would pick."""
    import jax
    from spjax import model, sampler, sharding as shd
    s = cfg.sampling
    params = _abstract(model.param_shapes(model_cfg), shd.param_shardings(model_cfg, mesh))
    sample_cfg, held = model_cfg, 0
    if model_cfg.lora.rank and model_cfg.base_quant == "none":  # lora.for_sampling: the run decodes a merged
        from spjax import lora, tensor_names  # copy while the policy's params stay live beside it
        sample_cfg, held = tensor_names.base_config(model_cfg), shd.bytes_per_device(params)
        merged = jax.eval_shape(lambda p: lora.merge(model_cfg, p)[1], params)
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
    program, compiled = _compile("sample", shape, sampler.lower(sample_cfg, plan, params))
    moving = 0 if compiled is None else len(moving_arrays(loop_collectives(compiled.as_text())))
    return dataclasses.replace(program, held=held, loop_collectives=moving)


def check(cfg, devices, *, target: Optional[Target] = None, platform: str = "", stand_in: str = "",
          sample: bool = True, echo=None) -> Report:
    """Compile `cfg`'s programs for a mesh over `devices` (real or compile-only) and report memory."""
    import jax
    from spjax import model, sharding as shd
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
    programs = []
    # Traced under the mesh: attention_impl then picks kernels for the target's devices (splash for a
    # TPU topology compiled from a CPU host), and splash runs per shard of this mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        attention = model.attention_impl(model_cfg, cached=False, right_padded=True, q_len=cfg.data.max_len)
        said = lambda p: (echo or (lambda line: None))(  # noqa: E731 - progress: a 7B compiles for a minute
            f"{'refused (out of memory)' if p.refused else 'compiled'} {p.name} in {p.compile_s:.1f}s") or p
        train, state = compile_train_step(cfg, model_cfg, mesh)
        programs.append(said(train))
        if sample:
            programs.append(said(compile_sampler(cfg, model_cfg, mesh, target.platform if target else "")))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.param_shapes(model_cfg)))
    return Report(
        target=target.name if target else f"{len(devices)} local devices",
        platform=platform or devices[0].platform, stand_in=stand_in, n_devices=len(devices),
        mesh=dict(mesh.shape), state_bytes=state_bytes(state),
        model=dict(architecture=model_cfg.architecture, params=n_params, layers=model_cfg.num_layers,
                   param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype, remat=model_cfg.remat,
                   attention=attention, lora=_lora_line(model_cfg)),
        programs=programs, memory_bytes=target.memory_bytes if target else None)


def _lora_line(model_cfg) -> str:
    """'' for full fine-tuning, else the run's own line on what trains (counted on the params' shapes)."""
    from spjax import lora, model
    return lora.describe(model_cfg, model.param_shapes(model_cfg)) if model_cfg.lora.rank else ""


# ---------------------------------------------------------------------------------------------
# Command line


def _config_constants(path: str) -> dict:
    """DEVICES / TOPOLOGY declared at the top of a config file (absent: {})."""
    import importlib.util
    from spjax.overrides import split_path
    spec = importlib.util.spec_from_file_location("_spjax_cc_constants", split_path(path)[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: getattr(mod, k) for k in ("DEVICES", "TOPOLOGY") if hasattr(mod, k)}


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
                       sample=not args.no_sample, echo=print)
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
