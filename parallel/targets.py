"""Hardware targets by name, as compile-only devices: compiling for a pod from a CPU host.

  TPU   v4-N, v5p-N (N TensorCores: N/2 chips, 3-D torus), v5e-N / v5litepod-N, v6e-N (N chips,
        2-D), tpu7x-N (N TensorCores: N/2 chips, 3-D); `slices` > 1 gives a multi-slice pod
        (devices carry a slice_index; parallel.mesh lays `mesh.dcn_*` across slices).
  GPU   h100xN, h200xN, b200xN: N GPUs, hosts of 8 (N < 8: one host); compiled through XLA's GPU
        compiler with the device description in configs/gpus/<gpu>.txtpb (needs jax's CUDA plugin,
        `pip install -e ".[cuda]"`).

`devices(target)` returns jax Device objects that nothing can run on but everything compiles for
(`jax.experimental.topologies`); `Target.hbm_bytes` is the per-device memory a step may take (TPU:
what libtpu plans against, as it reports it in its out-of-memory errors; GPU: the trainer's JAX
allocator's share, parallel/distributed.py GPU_MEMORY_FRACTION, of the device description's memory).
`hardware(family)`: the chip's peak FLOP/s, HBM and link bandwidths and price, each with its source,
from configs/hardware/chips.yaml (the step-time forecast's table: train/forecast.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from parallel.common.errors import ConfigError
from parallel.distributed import GPU_MEMORY_FRACTION

GiB = 1 << 30
GPU_SPECS = Path(__file__).resolve().parents[1] / "configs" / "gpus"
HARDWARE = Path(__file__).resolve().parents[1] / "configs" / "hardware" / "chips.yaml"

# family -> (topology prefix, chip config, devices per chip, 3-D?, HBM per device as libtpu plans it)
TPU_FAMILIES = {
    "v4": ("v4", "megacore", 2, True, 30.75 * GiB),
    "v5p": ("v5", "megacore", 2, True, 95.74 * GiB),
    "v5e": ("v5e", "default", 1, False, 15.75 * GiB),
    "v5litepod": ("v5e", "default", 1, False, 15.75 * GiB),
    "v6e": ("v6e", "default", 1, False, 31.25 * GiB),
    "tpu7x": ("tpu7x", "default", 2, True, 94.75 * GiB),
}
GPUS = ("h100", "h200", "b200")  # each with its device description, configs/gpus/<gpu>.txtpb
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given, e.g. "v5p-1024", "h100x8"
  platform: str  # "tpu" or "gpu"
  chips: int  # per slice
  devices_per_slice: int  # JAX devices (a v4/v5p chip is one megacore device; tpu7x: 2 per chip)
  hbm_bytes: float  # per device
  topology: str = ""  # TPU: "v5:8x8x8"; GPU: the device description file
  chip_config: str = "default"
  wrap: tuple = (False, False, False)
  slices: int = 1

  @property
  def devices(self) -> int:
    return self.devices_per_slice * self.slices

  @property
  def family(self) -> str:
    family = self.name.split("-")[0] if self.platform == "tpu" else self.name.split("x")[0]
    return "v5e" if family == "v5litepod" else family


def _tpu_shape(chips: int, three_d: bool) -> tuple[tuple[int, ...], tuple[bool, ...]]:
  """The chip grid of a slice (as Cloud TPU builds them) and which axes wrap around."""
  if not three_d:
    small = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
    if chips not in small:
      raise ConfigError(f"{chips} chips is not a 2-D TPU slice (one of {', '.join(map(str, small))})")
    wrap = {128: (False, True, False), 256: (True, True, False)}.get(chips, (False, False, False))
    return small[chips], wrap
  small = {1: (1, 1, 1), 2: (1, 1, 2), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
  if chips in small:
    return small[chips], (False, False, False)
  if chips % 64:
    raise ConfigError(f"{chips} chips is not a 3-D TPU slice (1, 2, 4, 8, 16, 32 or a multiple of 64)")
  # multiples of 64: 4 x 4 x 4 blocks; the most cubic grid (smallest longest side)
  n = chips // 64
  best = min(((a, b, n // (a * b)) for a in range(1, n + 1) for b in range(a, n + 1)
              if n % (a * b) == 0 and n // (a * b) >= b), key=lambda s: (s[2], -s[0]))
  return tuple(4 * x for x in best), (True, True, True)


def parse(name: str, slices: int = 1) -> Target:
  """The Target for a Cloud TPU name (v5p-1024) or a GPU cluster (h100x256); one-line error else."""
  if slices < 1:
    raise ConfigError(f"--slices {slices} must be >= 1")
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e|tpu7x)-(\d+)", name)
  if m:
    family, size = m.group(1), int(m.group(2))
    prefix, chip_config, per_chip, three_d, hbm = TPU_FAMILIES[family]
    if size % per_chip:
      raise ConfigError(f"target {name}: {family} sizes count TensorCores, {per_chip} per chip (e.g. {family}-8)")
    chips = size // per_chip
    shape, wrap = _tpu_shape(chips, three_d)
    devices = chips * (2 if family == "tpu7x" else 1)  # v4/v5p megacore: one device per chip
    return Target(name, "tpu", chips, devices, hbm, f"{prefix}:{'x'.join(map(str, shape))}", chip_config,
                  wrap, slices)
  m = re.fullmatch(r"(h100|h200|b200)x(\d+)", name)
  if m:
    gpu, n = m.group(1), int(m.group(2))
    if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
      raise ConfigError(f"target {name}: {n} GPUs must be at most {GPUS_PER_HOST} or whole hosts of {GPUS_PER_HOST}")
    if slices != 1:
      raise ConfigError("--slices is for TPU pods; a GPU target counts all its GPUs (h100x256)")
    spec = GPU_SPECS / f"{gpu}.txtpb"
    memory = re.search(r"device_memory_size:\s*(\d+)", spec.read_text())
    return Target(name, "gpu", n, n, float(memory.group(1)) * GPU_MEMORY_FRACTION, str(spec))
  raise ConfigError(f"unknown target {name!r}: a Cloud TPU name (v4-8, v5p-128, v5e-16, v5litepod-64, v6e-8,"
                    " tpu7x-8) or a GPU cluster (h100x8, h200x16, b200x64)")


def _quiet_libtpu(target: Target) -> None:
  """libtpu describes the host it was loaded on when it starts; on a CPU host say what it is asked
  to compile for, so that it does not probe the network for TPU workers and complain, and let
  several compiling processes load it (it locks /tmp/libtpu_lockfile for the chips it drives)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(target: Target) -> list:
  """Compile-only devices of `target` (jax.experimental.topologies)."""
  from jax.experimental import topologies

  try:
    if target.platform == "tpu":
      _quiet_libtpu(target)
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
          chips_per_host_bounds=(1, 1, 1) if target.chips == 1 else (2, 2, 1), num_slices=target.slices,
          wrap=target.wrap)
    else:
      hosts = max(1, target.chips // GPUS_PER_HOST)
      desc = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{min(target.chips, GPUS_PER_HOST)}",
                                          target_config=Path(target.topology).read_text())
  except Exception as e:  # no libtpu / no CUDA plugin, or a topology it does not know
    extra = "tpu" if target.platform == "tpu" else "cuda"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"target {target.name}: cannot describe its devices ({text}); install the {extra} extra:"
                      f' pip install -e ".[{extra}]"') from None
  found = list(desc.devices)
  if len(found) != target.devices:
    raise ConfigError(f"target {target.name}: expected {target.devices} devices, the topology has {len(found)}")
  return found


_FIGURES = ("peak_bf16", "peak_fp8", "hbm_bytes", "hbm_bw", "fast_bw", "fast_domain", "slow_bw", "host_bw",
            "devices_per_chip", "price")


def hardware(family: str, path: Path = HARDWARE) -> dict:
  """The figures of a chip family ("v5p", "h100", ...; configs/hardware/chips.yaml has each one's source)."""
  import yaml

  table = yaml.safe_load(Path(path).read_text())
  if family not in table:
    raise ConfigError(f"no hardware figures for {family!r} in {path}: one of {', '.join(table)}")
  row = table[family]
  missing = [k for k in _FIGURES if k not in row]
  if missing:
    raise ConfigError(f"{path}: {family} lacks {', '.join(missing)}")
  number = lambda k: None if row[k] is None else float(row[k])  # (YAML reads 459.0e12 as text)
  return {**{k: number(k) for k in _FIGURES if k not in ("fast_domain", "devices_per_chip")},
          "fast_domain": row["fast_domain"], "devices_per_chip": int(row["devices_per_chip"])}


def chips_of(n_devices: int, target: Target) -> int:
  return math.ceil(n_devices * target.chips / target.devices_per_slice)
