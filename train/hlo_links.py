"""The bytes a compiled program's all-to-alls send over the slow network: to other hosts (GPU) or
slices (TPU), per device (train/aot.py's docstring has the fields of `slow_a2a`).

  slow_a2a(hlo, devices)           the bytes, per instruction, per device and per step
  device_assignment(compiled, mesh)  the devices in the order replica-group ids count them
"""

from __future__ import annotations

import collections
import re
from typing import NamedTuple

import jax

from parallel import mesh as mesh_lib
from train import hlo_loops, hlo_parse

_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(RAGGED_ALL_TO_ALL|ALL_TO_ALL)"')


class _Exchange(NamedTuple):
  """One all-to-all: its kind, instruction, computation, groups (devices) and the bytes each device's
  operand holds (`sent`) and its result (`got`)."""
  kind: str
  name: str
  computation: str
  members: list
  sent: int
  got: int


def granule_of(devices, groups=None):
  """("slices" | "hosts", device -> its slice or host): TPU devices talk over the slow network to
  other slices (slice_index), GPUs to other hosts (process_index; the compile-only CUDA devices of
  h100xN count hosts of 8 in device-id order). `groups` may also be a {device id: node} map (nodes
  of simulated devices)."""
  if isinstance(groups, dict):
    return "nodes", lambda d: groups[d.id]
  if groups is None:
    kind, node = mesh_lib.node_of(devices)
    return ("hosts", node) if kind == "one node" else (kind, node)
  if groups == "slices":
    return groups, lambda d: getattr(d, "slice_index", 0)
  return groups, lambda d: d.process_index


def device_assignment(compiled, mesh) -> list:
  """The devices of a compiled SPMD program in the order its replica-group ids count them: the
  input shardings' mesh, flattened (for a jit over `mesh`, mesh.devices.flat)."""
  for sharding in jax.tree.leaves(compiled.input_shardings):
    if isinstance(sharding, jax.sharding.NamedSharding):
      return list(sharding.mesh.devices.flat)
  return list(mesh.devices.flat)


def _program_devices(devices, size: int) -> list:
  """The devices replica-group positions number: all of them, or, where libtpu compiles one program
  per TPU slice (`size` < their count), the first slice's (its own collectives stay inside it)."""
  program = list(devices)
  if size < len(program):
    first = getattr(program[0], "slice_index", 0)
    program = [d for d in program if getattr(d, "slice_index", 0) == first][:size]
  return program


def _all_to_all(m: hlo_parse.Module, ins: hlo_parse.Instruction, program: list) -> _Exchange | None:
  """An all-to-all or ragged-all-to-all (or the start of one) as an exchange, else None. Its bytes:
  all-to-all all its operands (the array or the tuple of chunks); ragged its input and output."""
  kind = ins.op.removesuffix("-start")
  if kind not in ("all-to-all", "ragged-all-to-all"):
    return None
  members = [[program[i] for i in group] for group in hlo_parse.groups_of(ins.rest, m.size)]
  sizes = [hlo_parse.shape_bytes(m.shape(o)) for o in hlo_parse.operands(ins.rest)]
  ragged = kind == "ragged-all-to-all"
  sent = sizes[0] if ragged else sum(sizes)
  got = sizes[1] if ragged and len(sizes) > 1 else sent
  return _Exchange(kind, ins.name, m.home[ins.name], members, sent, got)


def _megascale_transfer(ins: hlo_parse.Instruction) -> tuple[str, str, int] | None:
  """(kind, rendezvous key, buffer bytes) of a TPU cross-slice send or recv (an all-to-all over the
  DCN), else None; of a ragged one only the data buffer (operand 0), not its offsets and sizes."""
  if ins.op not in ("send", "recv") or "_xla_megascale_target" not in ins.rest:
    return None
  t = _MEGASCALE.search(ins.rest)
  if not t or (t.group(1) == "RAGGED_ALL_TO_ALL" and '_xla_megascale_ragged_operand_index="0"' not in ins.rest):
    return None
  buffer = hlo_parse.shape_bytes(hlo_parse.first_array(ins.shape))  # (buffer, u32[], token[])
  key = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', ins.rest)
  kind = "ragged-all-to-all" if t.group(1) == "RAGGED_ALL_TO_ALL" else "all-to-all"
  return kind, key.group(1) if key else ins.name, buffer


def _megascale_send(m: hlo_parse.Module, ins: hlo_parse.Instruction, by_id: dict, received: dict) -> _Exchange | None:
  """A megascale send as an exchange among the devices its target lists (by id): its buffer, and
  the matching recv's (`received`: rendezvous key -> bytes)."""
  transfer = _megascale_transfer(ins) if ins.op == "send" else None
  if transfer is None:
    return None
  kind, key, sent = transfer
  ids = re.search(r"_xla_megascale_target=\{((?:\{[0-9,]*\},?)*)\}", ins.rest).group(1)
  members = [[by_id[int(x)] for x in g.split(",")] for g in re.findall(r"\{([0-9,]+)\}", ids)]
  return _Exchange(kind, ins.name, m.home[ins.name], members, sent, received.get(key, sent))


def _exchanges(m: hlo_parse.Module, devices) -> list[_Exchange]:
  """The program's all-to-alls and megascale sends, in program order."""
  program, by_id = _program_devices(devices, m.size), {d.id: d for d in devices}
  received = {}
  for ins in m.instrs.values():
    transfer = _megascale_transfer(ins) if ins.op == "recv" else None
    if transfer is not None:
      received[transfer[1]] = transfer[2]
  found = (_all_to_all(m, ins, program) or _megascale_send(m, ins, by_id, received) for ins in m.instrs.values())
  return [ex for ex in found if ex is not None]


def _remote_sends(ex: _Exchange, granule) -> list[tuple[int, int, float, float]]:
  """(device id, group members in other granules, bytes it sends to them, balanced bytes) per device
  of each group: a group of n with m members elsewhere sends bytes * m / n."""
  even, out = min(ex.sent, ex.got), []
  for group in ex.members:
    at = collections.Counter(granule(d) for d in group)
    for d in group:
      m = len(group) - at[granule(d)]
      out.append((d.id, m, ex.sent * m / len(group), even * m / len(group)))
  return out


def _row(ex: _Exchange, sends: list, times: int) -> dict:
  """The per_instruction row of an exchange."""
  row = {"kind": ex.kind, "name": ex.name, "operand_bytes": ex.sent, "group": max(map(len, ex.members), default=0),
         "remote": max((m for _, m, _, _ in sends), default=0),
         "bytes_per_device": max((round(b) for _, _, b, _ in sends), default=0), "times": times}
  if ex.kind == "ragged-all-to-all":
    row["balanced_bytes_per_device"] = max((round(e) for _, _, _, e in sends), default=0)
  return row


def _totals(per_device: dict, known: bool) -> dict:
  """The worst device's bytes and all devices' together, per run of the entry computation and per step."""
  worst = lambda i: round(max((v[i] for v in per_device.values()), default=0))
  return {"bytes_per_device": worst(0), "balanced_bytes_per_device": worst(1),
          "total_bytes": round(sum(v[0] for v in per_device.values())),
          "per_step": {"bytes_per_device": worst(2), "balanced_bytes_per_device": worst(3),
                       "total_bytes": round(sum(v[2] for v in per_device.values())), "trip_counts_known": known}}


def slow_a2a(hlo: str, devices, groups: str | None = None, top: int = 6) -> dict:
  """Bytes each device sends to other hosts (GPU) or slices (TPU) in the all-to-all and
  ragged-all-to-all collectives of compiled HLO text; `devices` is the program's device assignment
  (replica-group ids are positions in it). See the module docstring."""
  kind, granule = granule_of(devices, groups)
  m = hlo_parse.parse(hlo)
  times = hlo_loops.executions(hlo_loops.module_calls(hlo), m.entry)
  per_device: dict[int, list[float]] = {}  # id -> [bytes, balanced, bytes per step, balanced per step]
  rows, known = [], True
  for ex in _exchanges(m, devices):
    n_times, loops_known = times.get(ex.computation, (1, True))
    known = known and loops_known
    sends = _remote_sends(ex, granule)
    for device, _, b, e in sends:
      acc = per_device.setdefault(device, [0.0] * 4)
      for i, v in enumerate((b, e, b * n_times, e * n_times)):
        acc[i] += v
    rows.append(_row(ex, sends, n_times))
  rows.sort(key=lambda r: (-r["bytes_per_device"] * r["times"], r["name"]))
  return {"groups": kind, "granules": len({granule(d) for d in devices}), "count": len(rows),
          **_totals(per_device, known),
          "upper_bound": any(r["kind"] == "ragged-all-to-all" and r["remote"] for r in rows),
          "per_instruction": rows[:top]}
