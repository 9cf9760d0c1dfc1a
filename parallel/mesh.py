"""The device mesh: four named axes built from `TrainConfig.mesh` (train.config.MeshConfig).

  data    pure data parallelism: parameters and optimizer state replicated
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  expert  routed experts split across ranks (expert parallelism); carries data for everything else
  tensor  attention heads and FFN width split (Megatron-style tensor parallelism)

Sizes come from the config (`mesh.data=2 mesh.fsdp=2 mesh.expert=2 mesh.tensor=1`); at most one
may be -1, meaning the devices the others leave. A mesh whose size does not divide the device count
is a one-line ConfigError. Across TPU slices or GPU hosts, `mesh.dcn_data` / `mesh.dcn_fsdp` say how
many slices (or processes) the data / fsdp axis spans (`mesh_utils.create_hybrid_device_mesh`); the
expert and tensor axes then stay within a slice or host. Without them `jax.make_mesh` orders devices
so that the last axes (expert, tensor) are the closest. Axes are `AxisType.Auto`: inside `jit`, XLA's partitioner derives the
collectives for data/fsdp/tensor from the parameter and activation shardings; expert parallelism
is written by hand with `jax.shard_map` (parallel/expert_parallel.py).

`Parallelism` bundles the mesh with the logical-axis rules (parallel/sharding.py) and the expert-
parallel options; `activate(par)` makes it current (and `jax.set_mesh(par.mesh)`) while a step is
traced, so model code finds it without naming devices or mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Mapping

import jax
from jax.sharding import AxisType, Mesh

from moe.config import ConfigError

log = logging.getLogger("parallel")

AXES = ("data", "fsdp", "expert", "tensor")
DCN_AXES = ("data", "fsdp")  # may span slices / hosts (mesh.dcn_data, mesh.dcn_fsdp)


def axis_sizes(mesh_cfg, n_devices: int) -> dict[str, int]:
  """{axis: size} for `mesh_cfg` (a MeshConfig or a mapping) on `n_devices`, -1 resolved."""
  get = mesh_cfg.get if isinstance(mesh_cfg, Mapping) else lambda a, d: getattr(mesh_cfg, a, d)
  sizes = {a: int(get(a, 1)) for a in AXES}
  desc = " x ".join(f"{a}={n}" for a, n in sizes.items())
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise ConfigError(f"mesh {desc}: sizes must be >= 1, and at most one may be -1")
  known = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if n_devices % known:
      raise ConfigError(f"mesh {desc}: the fixed axes ({known} devices) do not divide the {n_devices} devices")
    sizes[free[0]] = n_devices // known
  elif n_devices % known:
    raise ConfigError(f"mesh {desc} needs {known} devices, which does not divide the {n_devices} devices")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh with axes (data, fsdp, expert, tensor), all `AxisType.Auto`.

  A mesh smaller than the device count (it must divide it) uses the first devices; that is only
  allowed in a single process.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(mesh_cfg, len(devices))
  n = math.prod(sizes.values())
  if n < len(devices):
    if jax.process_count() > 1:
      raise ConfigError(f"mesh {sizes} uses {n} of {len(devices)} devices; with {jax.process_count()}"
                        " processes it must use them all (set one axis to -1)")
    log.warning("mesh %s uses %d of %d devices", sizes, n, len(devices))
    devices = devices[:n]
  shape = tuple(sizes[a] for a in AXES)
  get = mesh_cfg.get if isinstance(mesh_cfg, Mapping) else lambda a, d: getattr(mesh_cfg, a, d)
  dcn = {a: int(get(f"dcn_{a}", 1) or 1) for a in DCN_AXES}
  if math.prod(dcn.values()) == 1:
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  return Mesh(hybrid_devices(sizes, dcn, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def hybrid_devices(sizes: dict[str, int], dcn: dict[str, int], devices):
  """Device array for a mesh whose `data`/`fsdp` axes span slices (TPU multi-slice: devices carry a
  `slice_index`) or hosts (otherwise: one granule per process), `dcn[a]` granules along axis `a`;
  the other axes stay inside a granule, on the fast interconnect."""
  from jax.experimental import mesh_utils

  for a, n in dcn.items():
    if sizes[a] % n:
      raise ConfigError(f"mesh.dcn_{a}={n} does not divide mesh.{a}={sizes[a]}")
  ici = tuple(sizes[a] // dcn.get(a, 1) for a in AXES)
  outer = tuple(dcn.get(a, 1) for a in AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  by_process = len(slices) < math.prod(outer)
  granules = len({d.process_index for d in devices}) if by_process else len(slices)
  if granules != math.prod(outer):
    raise ConfigError(f"mesh dcn_data x dcn_fsdp = {math.prod(outer)} granules, but the devices form {granules}"
                      f" {'processes' if by_process else 'slices'}")
  return mesh_utils.create_hybrid_device_mesh(ici, outer, devices, process_is_granule=by_process)


@dataclasses.dataclass(frozen=True)
class Parallelism:
  """Everything a traced step needs to know about parallelism."""

  mesh: Mesh
  rules: Mapping[str, tuple[str, ...]]  # logical axis -> mesh axes (parallel.sharding.resolve_rules)
  ep_transport: str = "padded"  # resolved: "padded" or "ragged" (parallel.expert_parallel)
  capacity_factor: float | None = None  # padded transport; None: dropless

  @classmethod
  def from_config(cls, mesh_cfg, devices=None) -> Parallelism:
    from parallel import expert_parallel, sharding

    mesh = make_mesh(mesh_cfg, devices)
    rules = sharding.resolve_rules(getattr(mesh_cfg, "rules", None))
    transport = expert_parallel.resolve_transport(getattr(mesh_cfg, "ep_transport", "auto"), mesh)
    return cls(mesh, rules, transport, getattr(mesh_cfg, "capacity_factor", None))

  def describe(self) -> str:
    sizes = " x ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
    return f"mesh {sizes} on {self.mesh.size} {self.mesh.devices.flat[0].platform} device(s)"


_ACTIVE: contextvars.ContextVar[Parallelism | None] = contextvars.ContextVar("parallelism", default=None)


def current() -> Parallelism | None:
  """The Parallelism made current by `activate`, or None."""
  return _ACTIVE.get()


@contextlib.contextmanager
def activate(par: Parallelism | None):
  """Make `par` current and set its mesh (`jax.set_mesh`); None: no mesh (single device)."""
  token = _ACTIVE.set(par)
  try:
    if par is None:
      yield None
    else:
      with jax.set_mesh(par.mesh):
        yield par
  finally:
    _ACTIVE.reset(token)


def under(par: Parallelism | None, fn):
  """`fn` wrapped to run (and hence trace) inside `activate(par)`."""
  if par is None:
    return fn

  def wrapped(*args, **kwargs):
    with activate(par):
      return fn(*args, **kwargs)

  wrapped.__wrapped__ = fn
  return wrapped
