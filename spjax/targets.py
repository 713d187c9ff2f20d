"""What spjax.compile_check compiles for: a TPU slice (through libtpu's topology description, no TPU
needed) or a number of GPUs of a kind, with the memory one device offers."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

GiB = 1 << 30
_CAPACITY_GiB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}  # nominal HBM per chip
_TPU_GEN = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# chips -> (x, y, z) of 3-D torus slices (v4, v5p) and (x, y) of 2-D ones (v5e, v6e)
_SHAPE_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}
_SHAPE_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# GPU targets: memory the process may use, with launch/*'s XLA_PYTHON_CLIENT_MEM_FRACTION=.95
_GPU_GiB = {"h100": 80 * 0.95, "h200": 141 * 0.95, "a100": 80 * 0.95, "b200": 180 * 0.95}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: a device kind, how many, and the memory one device offers."""

    name: str
    platform: str  # tpu | gpu | cpu
    devices: int
    memory_bytes: Optional[int] = None  # usable per device; None: unknown (no fit verdict)
    topology: str = ""  # libtpu topology name, e.g. 'v5:2x2x4'
    chip_config: str = "default"  # 'megacore' on v4/v5p: one JAX device per chip
    host_bounds: tuple = (2, 2, 1)  # chips per host
    wrap: tuple = (False, False, False)  # torus wrap-around links


def parse_target(name: str) -> Target:
    """A Target from a slice name: v5p-32 (cores), v5e-16 / v6e-8 (chips), v5:2x2x4, 8xh100, h200."""
    key = name.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(h100|h200|a100|b200)", key)
    if m:
        n = int(m.group(1) or 1)
        if n < 1:
            raise ValueError(f"--topology {name}: needs at least one GPU")
        return Target(name, "gpu", n, int(_GPU_GiB[m.group(2)] * GiB))
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", key)
    if m:
        gen, n = _TPU_GEN[m.group(1)], int(m.group(2))
        three_d = gen in ("v4", "v5")
        chips = n // 2 if three_d else n  # v4/v5p names count TensorCores, two per (megacore) chip
        shape = (_SHAPE_3D if three_d else _SHAPE_2D).get(chips) if not (three_d and n % 2) else None
        if shape is None:
            known = sorted(_SHAPE_3D if three_d else _SHAPE_2D)
            raise ValueError(f"--topology {name}: unknown slice size; known chip counts {known} "
                             f"(or pass a libtpu name like {gen}:2x2x4)")
        return _tpu_target(name, gen, shape)
    m = re.fullmatch(r"(v4|v5|v5e|v6e):(\d+(?:x\d+)+)", key)
    if m:
        return _tpu_target(name, m.group(1), tuple(int(d) for d in m.group(2).split("x")))
    raise ValueError(f"--topology {name}: expected a TPU slice (v5p-32, v4-8, v5e-16, v6e-8, v5:2x2x4) "
                     "or GPUs (h100, 8xh100, h200, 8xh200)")


def _tpu_target(name, gen, shape) -> Target:
    chips = math.prod(shape)
    three_d = gen in ("v4", "v5")
    cap = _CAPACITY_GiB["v5p" if gen == "v5" else gen]
    # Hosts hold 2x2 chips, except a single-host 2x4 v5e/v6e slice and a one-chip one (v5e-1: libtpu
    # refused a 1x1 slice on 2x2 hosts); big 3-D slices are full tori.
    hosts = (2, 4, 1) if (not three_d and shape == (2, 4)) else (1, 1, 1) if chips == 1 else (2, 2, 1)
    if three_d:
        wrap = (True, True, True) if chips >= 64 else (False, False, False)
    else:
        wrap = (shape[0] >= 16, shape[1] >= 16, False)
    return Target(name, "tpu", chips, cap * GiB, topology=f"{gen}:{'x'.join(map(str, shape))}",
                  chip_config="megacore" if three_d else "default", host_bounds=hosts, wrap=wrap)


def tpu_devices(target: Target):
    """Compile-only devices of a TPU slice (needs libtpu, not a TPU); raises when libtpu is absent."""
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                        chip_config_name=target.chip_config,
                                        chips_per_host_bounds=target.host_bounds, num_slices=1,
                                        wrap=target.wrap)
    return list(topo.devices)
