"""Redundant experts' weights (`mesh.redundant_experts`): made from the experts', gradients sent home.

Each rank also holds r_l copies of experts of its node, which parallel/eplb.py chose, and each
assignment of a copied expert goes to one of its copies (eplb.physical_ids). The copies' weights are
state (moe/experts.py), made from the experts' weights once per optimizer step by `make_copies`: per
layer one exchange inside the node of the weights as stored (FSDP and tensor shards stay put),
exactly the r_l slots each rank holds by ragged_all_to_all wherever the devices have it, else r_l
slots to every rank of the node (`copies_transport`). The copies' gradients, accumulated over the
step's micro-batches, go home once per step the same way back (`add_copy_grads`); the dispatch
itself moves no weights.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel import sharding as sharding_lib
from parallel.expert_parallel.plan import Plan, exclusive, hops, ragged_unsupported
from parallel.expert_parallel.ragged import how_of, ragged_a2a


COPIES = "expert_copies"  # the jax.named_scope of the copies' moves, by which the HLO readers find them


def _node_slots(slots_R, plan: Plan, e_local: int):
  """(the hop inside this rank's node, home member [n_in, r_l], local index there [n_in, r_l]) of the
  expert each redundant slot of each rank of the node holds (a placement valid here: eplb.in_nodes)."""
  rank = jax.lax.axis_index(plan.axes)
  _, inner = hops(plan, rank)
  n_in = plan.n_ep // plan.nodes
  r_l = slots_R.shape[0] // plan.n_ep
  held = jax.lax.dynamic_index_in_dim(slots_R.reshape(plan.nodes, n_in, r_l), rank // n_in, keepdims=False)
  return inner, held // e_local % n_in, held % e_local


def _rows(ws):
  """The arrays [n, ...] of `ws` as one [n, sum of their sizes] (one collective moves them all)."""
  return jnp.concatenate([w.reshape(w.shape[0], -1) for w in ws], axis=1)


def _unrows(rows, like):
  """`_rows` undone: arrays [n, ...] shaped as `like`'s."""
  sizes = [math.prod(w.shape[1:]) for w in like]
  parts = jnp.split(rows, list(itertools.accumulate(sizes))[:-1], axis=1)
  return [p.reshape(rows.shape[0], *w.shape[1:]) for p, w in zip(parts, like)]


def _copy_offsets(home, me, to_homes: bool):
  """ragged_all_to_all offsets (input offsets, send sizes, output offsets, receive sizes) [n_in] of
  the copies' move inside the node, each known to every rank from the placement (`home` [n_in, r_l]:
  the home member of each slot of each member), so no sizes are exchanged. Making copies, a home
  sends each slot it is home to, by (member, slot), and a member receives its r_l slots by (home,
  slot); sending gradients home (`to_homes`) the reverse."""
  n_in = home.shape[0]
  peers = jnp.arange(n_in)
  count = (home[:, :, None] == peers).sum(1).astype(jnp.int32)  # [member i, home s]: i's slots homed at s
  if to_homes:  # send count[me, s] to s, at s after the rows of members before me
    send, recv = count[me], count[:, me]
    out = ((peers[:, None] < me) * count).sum(0)  # at each home s: rows from members before me
  else:  # send count[i, me] to i, at i after its slots homed before me
    send, recv = count[:, me], count[me]
    out = ((peers[None, :] < me) * count).sum(1)  # at each member i: its slots homed at members before me
  return exclusive(send), send, out.astype(jnp.int32), recv


def _make_copies(ws, slots_R, plan: Plan):
  """This rank's copies [r_l, ...] of each weight of `ws` ([E_l, ...] here), from their home ranks in
  its node, in one collective: `ragged` transports send exactly the slots each rank holds (r_l
  experts received per rank), the padded one r_l slots to every rank of the node, filled where the
  sender is the home."""
  inner, home, local = _node_slots(slots_R, plan, ws[0].shape[0])
  n_in, r_l = home.shape
  if n_in == 1:
    return [w[local[0]] for w in ws]
  me = inner.member
  rows = _rows(ws)  # [E_l, size]
  mine = (home == me).reshape(-1)  # the node's slots (member, slot) whose expert is mine
  if plan.transport == "padded":
    got = inner.a2a(jnp.where(mine[:, None], rows[local.reshape(-1)], 0)).reshape(n_in, r_l, -1)  # [home, my slot]
    return _unrows(got[home[me], jnp.arange(r_l)], ws)
  order = jnp.argsort(~mine, stable=True)  # mine first, by (member, slot)
  how = how_of(inner, plan.transport == "ragged_emulated")
  got = ragged_a2a(how, rows[local.reshape(-1)[order]], jnp.zeros((r_l, rows.shape[1]), rows.dtype), me,
                   _copy_offsets(home, me, to_homes=False))  # [my slots by (home, slot)]
  arrival = jnp.argsort(jnp.argsort(home[me], stable=True))
  return _unrows(got[arrival], ws)


def _add_copy_grads(gs, cgs, slots_R, plan: Plan):
  """`gs` ([E_l, ...], this rank's experts' gradients) plus the gradients of their copies, `cgs`
  ([r_l, ...] on each rank), each sent once to its expert's home rank (the reverse of _make_copies)."""
  e_local = gs[0].shape[0]
  inner, home, local = _node_slots(slots_R, plan, e_local)
  n_in, r_l = home.shape
  if n_in == 1:
    return [g.at[local[0]].add(cg.astype(g.dtype)) for g, cg in zip(gs, cgs)]
  me = inner.member
  rows = _rows(cgs)  # [r_l, size]
  mine = (home == me).reshape(-1)  # the node's slots (member, slot) whose expert is mine
  to = jnp.where(mine, local.reshape(-1), e_local)
  if plan.transport == "padded":
    send = jnp.zeros((n_in, r_l, rows.shape[1]), rows.dtype).at[home[me], jnp.arange(r_l)].set(rows)
    got = inner.a2a(send.reshape(n_in * r_l, -1))  # [(member, its slot)]
  else:
    how = how_of(inner, plan.transport == "ragged_emulated")
    out = jnp.zeros((n_in * r_l, rows.shape[1]), rows.dtype)
    arrived = ragged_a2a(how, rows[jnp.argsort(home[me], stable=True)], out, me,
                         _copy_offsets(home, me, to_homes=True))  # the slots homed here, by (member, slot)
    got = arrived[jnp.cumsum(mine) - mine]
  return [g.at[to].add(d.astype(g.dtype), mode="drop") for g, d in zip(gs, _unrows(got, gs))]


def _stored(fn, arrays, axes, slots, par, n_out: int):
  """`fn(slots [R], local arrays, plan)` on every rank over `arrays` as they are stored ([*L, E or R,
  ...] with logical `axes`, the expert dimension after the leading stacked ones), once per stacked
  layer; its `n_out` results are sharded as the first `n_out` arrays."""
  mesh, shape, free = sharding_lib.context(par)
  lead = slots.ndim - 1
  specs = []
  for x, ax in zip(arrays, axes):
    spec = tuple(sharding_lib.logical_to_spec(ax, x.shape, shape, dict(par.rules), "experts"))
    specs.append(P(*spec, *(None,) * (x.ndim - len(spec))))
  ep_axes = sharding_lib.axes_of(specs[0][lead])
  plan = Plan(ep_axes, math.prod(shape[a] for a in ep_axes), par.ep_nodes, copies_transport(par), None, 1)

  def body(s, *xs):
    if lead == 0:
      return tuple(fn(s, xs, plan))
    flat = lambda x: x.reshape(-1, *x.shape[lead:])
    ys = jax.lax.map(lambda a: tuple(fn(a[0], a[1:], plan)), (flat(s), *map(flat, xs)))
    return tuple(y.reshape(x.shape[:lead] + y.shape[1:]) for y, x in zip(ys, xs))

  run = jax.shard_map(body, mesh=mesh, in_specs=(P(*specs[0][:lead], None), *specs),
                      out_specs=tuple(specs[:n_out]), axis_names=free)
  with jax.named_scope(COPIES):
    return list(run(slots, *arrays))


def copies_transport(par) -> str:
  """How the copies' weights and gradients move: exactly (ragged_all_to_all) wherever the devices
  have it, whatever mesh.ep_transport; else (CPU, large v5e slices) r_l slots to every rank of the
  node, or the ragged emulation where the dispatch emulates it too (tests)."""
  if par.ep_transport != "padded":
    return par.ep_transport
  return "padded" if par.mesh.devices.flat[0].platform == "cpu" or ragged_unsupported(par.mesh) else "ragged"


def make_copies(weights: Sequence[jax.Array], axes: Sequence[tuple], slots, par) -> list[jax.Array]:
  """The redundant slots' copies [*L, R, ...] of the experts' `weights` ([*L, E, ...], logical `axes`
  as stored, e.g. ("layers", "expert", "embed", "moe_mlp")) for the placement `slots` [*L, R] (valid
  on this mesh: eplb.in_nodes), made where the weights are stored: per layer one exchange inside
  each node of the weights' shards (FSDP and tensor slices stay where they are). Run once per
  optimizer step (moe/experts.py), not in the forward."""
  return _stored(lambda s, ws, plan: _make_copies(ws, s, plan), list(weights), list(axes), slots, par, len(weights))


def add_copy_grads(grads: Sequence[jax.Array], copy_grads: Sequence[jax.Array], axes: Sequence[tuple], slots,
                   par) -> list[jax.Array]:
  """`grads` of the experts' weights ([*L, E, ...], logical `axes` as stored) with the gradients of
  their copies (`copy_grads` [*L, R, ...], sent in their own dtype) summed in: the transpose of
  `make_copies`, once per step."""
  k = len(grads)
  return _stored(lambda s, xs, plan: _add_copy_grads(xs[:k], xs[k:], s, plan), list(grads) + list(copy_grads),
                 list(axes) * 2, slots, par, k)
