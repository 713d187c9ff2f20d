"""What XLA says of a compiled program, and the report spjax.compile_check prints of them.

ProgramMemory: one program's per-device memory (`memory_analysis()`) and cost; Report: a config's
programs, their peak against the device's memory, and what the count leaves out. `loop_collectives`
finds the collectives inside a program's while loops (in the sampler: paid on every decode step).
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Optional

from spjax.targets import GiB


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
    held: int = 0  # live beside the program, not its argument (a LoRA policy while its merged copy samples,
    # a reward model judge's params throughout the run)
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
    notes: list = dataclasses.field(default_factory=list)  # what the need leaves out (said before the verdict)

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
                 + (f"; {m['lora']}" if m.get("lora") else "")
                 + (f"\njudge: {m['judge']}" if m.get("judge") else ""),
                 f"state per device ({unit}): "
                 + ", ".join(f"{k} {v / scale:.2f}" for k, v in self.state_bytes.items()),
                 f"{'per device, ' + unit:<{w}}{'args':>8}{'output':>8}{'alias':>8}{'temp':>8}{'code':>8}{'held':>8}"
                 f"{'peak':>8}{'compile':>9}"]
        for p in self.programs:
            lines.append(f"{p.name + ' (' + p.shape + ')':<{w}}{g(p.argument)}{g(p.output)}{g(p.alias)}{g(p.temp)}"
                         f"{g(p.code)}{g(p.held)}{g(p.peak)}{p.compile_s:8.1f}s")
        lines.append("XLA cost per device (a loop's body counted once, whatever its trips): " + "; ".join(
            f"{p.name} {p.flops / 1e12:,.1f} TFLOP, {p.bytes_accessed / GiB:,.1f} GiB accessed"
            + (f", {p.loop_collectives} collectives moving arrays in its loops" if p.name == "sample" else "")
            for p in self.programs)
            + f" (attention: {self.model.get('attention', '?')})")
        lines += [f"{p.name}: the compiler refused it for want of memory: {p.refused}" for p in self.programs
                  if p.refused]
        lines += [f"note: {n}" for n in self.notes]
        if self.memory_bytes is None:
            lines.append(f"need {self.peak / scale:.2f} {unit} per device; device memory unknown (pass --topology)")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"need {'more than ' * (not self.fits)}{self.peak / GiB:.2f} GiB of {self.memory_bytes / GiB:.1f} GiB per device "
                         f"({100 * self.peak / self.memory_bytes:.0f}%): {verdict}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Inspecting compiled programs


def program_memory(name, shape, compiled, seconds) -> ProgramMemory:
    """The row of a compiled program: memory_analysis() bytes and cost_analysis() flops, per device."""
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    if ma is None:  # some backends do not report; keep the row, zeros say so
        return ProgramMemory(name, shape, 0, 0, 0, 0, 0, seconds, flops, accessed)
    return ProgramMemory(name, shape, int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                         int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes),
                         int(ma.generated_code_size_in_bytes), seconds, flops, accessed)


def compile_lowered(name: str, shape: str, lowered) -> tuple:
    """(ProgramMemory, compiled) of a lowered program, or (a row with the compiler's refusal, None) when
    the compiler itself finds the program too large for the device (libtpu checks HBM as it compiles)."""
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
    return program_memory(name, shape, compiled, time.perf_counter() - t0), compiled


def loop_collectives(hlo: str) -> list:
    """(op, result type) of each collective (all-gather, all-reduce, ...) inside the while loops of a
    compiled program's HLO text (bodies, conditions and all they call): in the sampler they run on
    every decode step. A scalar one (e.g. `pred[]`: the early-exit check over a split batch) moves no
    array; `moving_arrays` leaves those out."""
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
    return [(k, t) for k, t in collectives if not re.fullmatch(r"\w+\[\](\{.*\})?", t.strip())]  # u32[]{:T(128)} on TPU
