"""Redundant experts (DeepSeek-V3's EPLB, adapted): copies of hot experts on extra slots per rank.

Expert parallelism splits the E routed experts over n_ep ranks, E_l = E / n_ep consecutive "native"
experts per rank (rank r owns logical experts [r*E_l, (r+1)*E_l)). Each rank also has r_local
"redundant slots", R = n_ep * r_local in all, slot s on rank s // r_local; a redundant slot holds a
copy of some logical expert, and the assignments routed to an expert with c instances (its native
slot + its copies) are split evenly between them. The ranks form `nodes` nodes (mesh.ep_nodes) of
n_in = n_ep / nodes consecutive ranks; a copy stays in the node of its expert's home rank, so a
token still crosses nodes only to the nodes its experts live on. (A "copy" is always a redundant
slot's replica; how many an expert has in all, native included, is its "instances".)

  slots_R   [R] int32, the logical expert of each redundant slot: `place` (from measured loads) or
            `initial` (before any load is measured: copies on their home ranks, no extra traffic)
  physical  rank r holds S = E_l + r_local slots, ids r*S + j: j < E_l its native expert r*E_l + j,
            j >= E_l its redundant slot r*r_local + (j - E_l). `physical_ids` maps routed (token, k)
            assignments to physical slots.

`place` follows EPLB (deepseek-ai/EPLB): replicate greedily (the expert with the largest load per
copy gets the next copy), then put the replicas, heaviest per-copy load first, on the least loaded
rank of their node with a free slot. That can be worse than no copies (even loads: it halves
the hottest experts and moves the halves onto ranks that were already average; configs/bench-cpu.yaml
1.04 -> 1.22 max/mean), so `replace` keeps the old placement unless the new one lowers the max/mean
rank load computed from the same measured loads (`rank_loads`), and the old one unless it is no worse
than no copies (`initial`). All of it is jax.numpy with static ints (jit-able) and deterministic,
ties going to the lowest index.

A slot holding `n_experts` (EMPTY in `usable`) holds no copy: nothing is routed to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.common.errors import ConfigError


def _check(n_experts: int, n_ep: int, r_local: int, nodes: int = 1) -> int:
  """E_l, after checking that the experts split over the ranks and the ranks over the nodes."""
  if n_ep < 1 or n_experts % n_ep:
    raise ConfigError(f"{n_experts} experts do not split over {n_ep} expert-parallel ranks")
  if r_local < 0:
    raise ConfigError(f"redundant experts per rank must be >= 0, got {r_local}")
  if nodes < 1 or n_ep % nodes:
    raise ConfigError(f"{n_ep} expert-parallel ranks do not split into {nodes} nodes")
  return n_experts // n_ep


def _r_local(slots_R, n_ep: int) -> int:
  """Redundant slots per rank, after checking that they split evenly over the ranks."""
  if slots_R.shape[0] % n_ep:
    raise ConfigError(f"{slots_R.shape[0]} redundant slots do not split over {n_ep} expert-parallel ranks")
  return slots_R.shape[0] // n_ep


def replicate(load_E, n_ep: int, r_local: int, nodes: int = 1):
  """Instances [E] int32 of each expert (native included) after R = n_ep * r_local greedy steps: each
  gives a copy to the expert with the largest load / instances among those whose node still has
  a free redundant slot (n_ep / nodes * r_local per node)."""
  e = load_E.shape[0]
  e_local = _check(e, n_ep, r_local, nodes)
  load = load_E.astype(jnp.float32)
  group_E = jnp.arange(e) // (e_local * (n_ep // nodes))
  free0 = jnp.full((nodes,), (n_ep // nodes) * r_local, jnp.int32)

  def step(_, carry):
    instances, free = carry
    best = jnp.argmax(jnp.where(free[group_E] > 0, load / instances, -jnp.inf))
    return instances.at[best].add(1), free.at[group_E[best]].add(-1)

  instances, _ = jax.lax.fori_loop(0, n_ep * r_local, step, (jnp.ones((e,), jnp.int32), free0))
  return instances


def place(load_E, n_ep: int, r_local: int, nodes: int = 1):
  """Redundant slots [n_ep * r_local] int32 (logical expert of each) from measured loads [E].

  The replicas (`replicate`) go in order of descending load per copy (ties: lower expert) each to
  the rank of its expert's node with a free slot and the lowest load (native experts' load per
  copy plus the replicas placed so far), among the ranks holding no copy of it if there is one (the
  home rank last); ties go to the lowest rank, the slot is that rank's next free one."""
  e = load_E.shape[0]
  e_local = _check(e, n_ep, r_local, nodes)
  n_slots = n_ep * r_local
  if n_slots == 0:
    return jnp.zeros((0,), jnp.int32)
  load = load_E.astype(jnp.float32)
  instances = replicate(load, n_ep, r_local, nodes)
  per_copy = load / instances
  order = jnp.argsort(-per_copy, stable=True)
  replicas = jnp.repeat(order, (instances - 1)[order], total_repeat_length=n_slots).astype(jnp.int32)
  rank_ids = jnp.arange(n_ep)
  group_R = rank_ids // (n_ep // nodes)
  home_E = jnp.arange(e) // e_local
  rank_load = per_copy.reshape(n_ep, e_local).sum(axis=1)
  holds = home_E[None, :] == rank_ids[:, None]  # [n_ep, E]: rank holds a copy of expert
  free = jnp.full((n_ep,), r_local, jnp.int32)

  def step(i, carry):
    slots, rank_load, holds, free = carry
    x = replicas[i]
    ok = (group_R == group_R[home_E[x]]) & (free > 0)
    fresh = ok & ~holds[:, x]
    rank = jnp.argmin(jnp.where(jnp.where(fresh.any(), fresh, ok), rank_load, jnp.inf))
    slot = rank * r_local + (r_local - free[rank])
    return (slots.at[slot].set(x), rank_load.at[rank].add(per_copy[x]), holds.at[rank, x].set(True),
            free.at[rank].add(-1))

  init = (jnp.zeros((n_slots,), jnp.int32), rank_load, holds, free)
  return jax.lax.fori_loop(0, n_slots, step, init)[0]


def initial(n_ep: int, r_local: int, e_local: int):
  """Redundant slots before any load is measured: slot j of rank r holds rank r's native expert
  r*E_l + (j % E_l) (copies on their home ranks: no extra traffic)."""
  s = jnp.arange(n_ep * r_local, dtype=jnp.int32)
  return (s // r_local) * e_local + (s % r_local) % e_local


def in_nodes(slots_R, n_experts: int, n_ep: int, nodes: int = 1):
  """`slots_R` with every copy whose expert lives in another node than its slot replaced by
  the slot's `initial` copy: a placement made for another mesh (a checkpoint restored with another
  mesh.expert or ep_nodes) stays valid, each copy made inside its node."""
  r_local = _r_local(slots_R, n_ep)
  e_local = _check(n_experts, n_ep, r_local, nodes)
  n_in = n_ep // nodes
  slot_group = jnp.arange(slots_R.shape[0]) // r_local // n_in
  ok = (slots_R >= 0) & (slots_R < n_experts) & (slots_R // e_local // n_in == slot_group)
  return jnp.where(ok, slots_R, initial(n_ep, r_local, e_local)).astype(jnp.int32)


def usable(slots_R, n_experts: int, n_ep: int, nodes: int = 1):
  """`slots_R` with every slot `in_nodes` would change (a placement restored from another mesh: its copy
  made for an expert of another node, or out of range) marked empty (n_experts): the copy weights in
  such a slot were made for the old mesh's placement, so no assignment may go there until the copies
  are next made (after the step)."""
  ok = in_nodes(slots_R, n_experts, n_ep, nodes) == slots_R
  return jnp.where(ok, slots_R, n_experts).astype(jnp.int32)


def instances_of(slots_R, n_experts: int):
  """Instances [E] int32 of each expert: 1 (native) + the redundant slots holding a copy of it (empty
  slots, holding n_experts, count for none)."""
  return 1 + jnp.bincount(slots_R, length=n_experts + 1)[:n_experts].astype(jnp.int32)


def rank_loads(slots_R, load_E, n_ep: int):
  """Rows [n_ep] float32 each rank computes under the placement `slots_R` for the expert loads
  `load_E`, each expert's load split evenly over its instances."""
  e = load_E.shape[0]
  r_local = _r_local(slots_R, n_ep)
  e_local = _check(e, n_ep, r_local)
  per_copy = load_E.astype(jnp.float32) / instances_of(slots_R, e)
  extra = jnp.where(slots_R < e, per_copy[jnp.minimum(slots_R, e - 1)], 0)
  return per_copy.reshape(n_ep, e_local).sum(1) + extra.reshape(n_ep, r_local).sum(1)


def replace(old_R, load_E, n_ep: int, r_local: int, nodes: int = 1):
  """The placement after a re-placement from measured loads `load_E`: `place`'s new one if it lowers
  the max/mean rank load (`rank_loads` of the same loads) below the old one's; else the old one
  (made valid for this mesh, `in_nodes`), unless that is worse than no copies, when the home copies
  (`initial`, as good as no copies). So a placement is never worse than no copies on the loads it
  was chosen for."""
  e = load_E.shape[0]
  old = in_nodes(old_R, e, n_ep, nodes)
  new = place(load_E, n_ep, r_local, nodes)
  home = initial(n_ep, r_local, e // n_ep)
  score = lambda slots: rank_imbalance(rank_loads(slots, load_E, n_ep))
  best = jnp.where(score(home) < score(old), home, old)
  return jnp.where(score(new) < score(best), new, best)


def physical_ids(idx_TxK, slots_R, n_experts: int, n_ep: int):
  """Physical slot [T, K] int32 of each (token, k) assignment of logical expert e = idx[t, k].

  Instance c of e, 0 <= c < instances[e], is its native slot for c == 0 and else the (c-1)-th redundant
  slot holding e (in slot order). c = t mod instances[e], t the token's row: elementwise, so it shards
  with the tokens (splitting each expert's assignments exactly would need a sort over all T*K)."""
  t = idx_TxK.shape[0]
  n_slots, r_local = slots_R.shape[0], _r_local(slots_R, n_ep)
  e_local = _check(n_experts, n_ep, r_local)
  per_rank = e_local + r_local
  idx = idx_TxK.astype(jnp.int32)
  native = (idx // e_local) * per_rank + idx % e_local
  if n_slots == 0:
    return native
  instances = instances_of(slots_R, n_experts)
  c = jnp.arange(t, dtype=jnp.int32)[:, None] % instances[idx]
  order = jnp.argsort(slots_R, stable=True).astype(jnp.int32)  # redundant slots by (expert, slot)
  starts = jnp.cumsum(instances - 1) - (instances - 1)
  s = order[jnp.minimum(starts[idx] + jnp.maximum(c - 1, 0), n_slots - 1)]
  redundant = (s // r_local) * per_rank + e_local + s % r_local
  return jnp.where(c == 0, native, redundant)


def rows_per_rank(phys_TxK, n_ep: int, slots_per_rank: int):
  """Assignments [n_ep] int32 received by each rank: those whose physical slot it holds."""
  return jnp.bincount(phys_TxK.reshape(-1) // slots_per_rank, length=n_ep).astype(jnp.int32)


def rank_imbalance(rows_per_rank_):
  """Max over mean of the rows each rank receives (1: balanced; 1 when there are none)."""
  rows = rows_per_rank_.astype(jnp.float32)
  return jnp.where(rows.sum() > 0, rows.max() / jnp.maximum(rows.mean(), 1e-30), 1.0)
