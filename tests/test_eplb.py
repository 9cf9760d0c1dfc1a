"""parallel.eplb (redundant experts) against loop-based pure-Python references."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel import eplb
from parallel.common.errors import ConfigError

# (E, n_ep, r_local, nodes): several experts per rank, one per rank, more slots than native experts
# jitted once per shape (eagerly, every jnp op would compile on its own)
place = jax.jit(eplb.place, static_argnums=(1, 2, 3))
physical_ids = jax.jit(eplb.physical_ids, static_argnums=(2, 3))

SETUPS = [(16, 4, 2, 1), (32, 8, 1, 2), (24, 8, 3, 4), (8, 8, 2, 2), (4, 2, 5, 1)]


# ------------------------------------------------------------------ references (float64, loops)
def ref_greedy(load, n_replicas):
  """EPLB's replicate_experts, one layer: n_replicas times, a copy for argmax load / copies."""
  copies = [1] * len(load)
  for _ in range(n_replicas):
    best = max(range(len(load)), key=lambda e: (load[e] / copies[e], -e))
    copies[best] += 1
  return copies


def ref_replicate(load, n_ep, r_local, nodes):
  """The greedy with at most n_in * r_local replicas of the experts of each node."""
  e_local, n_in = len(load) // n_ep, n_ep // nodes
  group = [e // e_local // n_in for e in range(len(load))]
  copies, free = [1] * len(load), [n_in * r_local] * nodes
  for _ in range(n_ep * r_local):
    best = None
    for e in range(len(load)):
      if free[group[e]] and (best is None or load[e] / copies[e] > load[best] / copies[best]):
        best = e
    copies[best] += 1
    free[group[best]] -= 1
  return copies


def ref_place(load, n_ep, r_local, nodes):
  """Redundant slots: replicas heaviest first, each to the least loaded free rank of its node,
  ranks without a copy of it first, ties to the lowest rank."""
  load = [float(x) for x in load]
  e_local, n_in = len(load) // n_ep, n_ep // nodes
  copies = ref_replicate(load, n_ep, r_local, nodes)
  per_copy = [load[e] / copies[e] for e in range(len(load))]
  rank_load = [sum(per_copy[r * e_local + j] for j in range(e_local)) for r in range(n_ep)]
  holds = [set(range(r * e_local, (r + 1) * e_local)) for r in range(n_ep)]
  used = [0] * n_ep
  slots = [None] * (n_ep * r_local)
  replicas = sorted((-per_copy[e], e) for e in range(len(load)) for _ in range(copies[e] - 1))
  for _, e in replicas:
    group = e // e_local // n_in
    free = [r for r in range(group * n_in, (group + 1) * n_in) if used[r] < r_local]
    pool = [r for r in free if e not in holds[r]] or free
    r = min(pool, key=lambda r: (rank_load[r], r))
    slots[r * r_local + used[r]] = e
    used[r] += 1
    rank_load[r] += per_copy[e]
    holds[r].add(e)
  return slots


def logical_of_physical(slots, n_experts, n_ep):
  """The logical expert of each physical slot: rank r's native experts, then its redundant slots."""
  r_local, e_local = len(slots) // n_ep, n_experts // n_ep
  native = np.arange(n_experts).reshape(n_ep, e_local)
  return np.concatenate([native, np.asarray(slots).reshape(n_ep, r_local)], axis=1).reshape(-1)


def ref_physical(idx, slots, n_experts, n_ep):
  """Physical slot of each (token, k): copy c = t mod copies[e]."""
  r_local, e_local = len(slots) // n_ep, n_experts // n_ep
  per_rank = e_local + r_local
  holders = collections.defaultdict(list)  # expert -> its redundant slots, in slot order
  for s, e in enumerate(slots):
    holders[e].append(s)
  out = np.zeros(np.shape(idx), np.int64)
  for t, row in enumerate(np.asarray(idx).tolist()):
    for k, e in enumerate(row):
      c = t % (1 + len(holders[e]))
      if c == 0:
        out[t, k] = (e // e_local) * per_rank + e % e_local
      else:
        s = holders[e][c - 1]
        out[t, k] = (s // r_local) * per_rank + e_local + s % r_local
  return out


def zipf_routing(n_experts, k, t, seed, s=1.0, permute=True):
  """[t, k] distinct experts per token, Zipf-like popularity (1 / rank^s, the ranks randomly permuted
  over the experts unless not `permute`): sampling without replacement by Gumbel top-k."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, n_experts + 1) ** s
  logits = np.log(p[rng.permutation(n_experts)] if permute else p)
  return np.argsort(-(logits + rng.gumbel(size=(t, n_experts))), axis=1)[:, :k].astype(np.int32)


def counts(idx, n_experts):
  return np.bincount(np.asarray(idx).reshape(-1), minlength=n_experts).astype(np.float32)


# ------------------------------------------------------------------ replication and placement
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_experts,n_ep,r_local", [(16, 4, 2), (32, 8, 1), (8, 2, 7)])
def test_replication_is_eplb_greedy(n_experts, n_ep, r_local, seed):
  load = counts(zipf_routing(n_experts, 2, 256, seed), n_experts)
  copies = eplb.instances_of(place(jnp.asarray(load), n_ep, r_local), n_experts)
  assert copies.tolist() == ref_greedy(load.tolist(), n_ep * r_local)


@pytest.mark.parametrize("n_experts,n_ep,r_local,nodes", [s for s in SETUPS if s[3] > 1])
def test_replication_respects_outer_groups(n_experts, n_ep, r_local, nodes):
  load = np.zeros(n_experts, np.float32)
  load[: n_experts // nodes] = np.arange(n_experts // nodes, 0, -1) * 100  # all the load in group 0
  copies = np.asarray(eplb.instances_of(place(jnp.asarray(load), n_ep, r_local, nodes), n_experts))
  assert copies.tolist() == ref_replicate(load.tolist(), n_ep, r_local, nodes)
  per_group = (copies - 1).reshape(nodes, -1).sum(axis=1)
  assert per_group.tolist() == [n_ep // nodes * r_local] * nodes


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_experts,n_ep,r_local,nodes", SETUPS)
def test_place_matches_reference(n_experts, n_ep, r_local, nodes, seed):
  rng = np.random.default_rng(seed)
  load = (rng.uniform(0, 1000, n_experts) * rng.uniform(0, 1, n_experts) ** 3).astype(np.float32)
  load[rng.integers(n_experts)] = 0
  slots = place(jnp.asarray(load), n_ep, r_local, nodes)
  assert slots.dtype == jnp.int32 and slots.shape == (n_ep * r_local,)
  assert slots.tolist() == ref_place(load.tolist(), n_ep, r_local, nodes)


def test_place_tiny_cases():
  """Hand-checked: all load on expert 0 (4 / 3 per copy): its first replica goes to rank 1 (no copy
  there), the second, every rank holding one, to the tie's lowest rank 0."""
  assert place(jnp.array([4.0, 0, 0, 0]), 2, 1).tolist() == [0, 0]
  assert place(jnp.array([0.0, 0, 0, 9]), 2, 1).tolist() == [3, 3]
  assert place(jnp.array([0.0, 0, 0, 0]), 2, 1).tolist() == [0, 0]  # 0 / 2 ties 0 / 1: expert 0
  # ties: replicas of experts 0 then 1 (1 per copy); rank 1 (load 4) is the only one without expert 0
  assert place(jnp.array([2.0, 2, 2, 2]), 2, 1).tolist() == [1, 0]
  assert place(jnp.array([1.0, 2, 3, 4]), 2, 0).shape == (0,)


def valid(slots, n_experts, n_ep, r_local, nodes):
  e_local, n_in = n_experts // n_ep, n_ep // nodes
  slots = np.asarray(slots)
  assert slots.shape == (n_ep * r_local,) and ((slots >= 0) & (slots < n_experts)).all()
  for s, e in enumerate(slots.tolist()):
    assert (s // r_local) // n_in == (e // e_local) // n_in, (s, e)  # copy in its home node
  copies = eplb.instances_of(jnp.asarray(slots), n_experts)
  assert copies.dtype == jnp.int32 and int(copies.sum()) == n_experts + n_ep * r_local
  assert copies.tolist() == [1 + slots.tolist().count(e) for e in range(n_experts)]


@pytest.mark.parametrize("n_experts,n_ep,r_local,nodes", SETUPS)
def test_placements_are_valid(n_experts, n_ep, r_local, nodes):
  valid(eplb.initial(n_ep, r_local, n_experts // n_ep), n_experts, n_ep, r_local, nodes)
  for seed in range(3):
    load = counts(zipf_routing(n_experts, 2, 200, seed, s=1.5), n_experts)
    slots = place(jnp.asarray(load), n_ep, r_local, nodes)
    valid(slots, n_experts, n_ep, r_local, nodes)
    # every slot written: the copies are the replication's (a slot left at 0 would add a copy of 0)
    assert eplb.instances_of(slots, n_experts).tolist() == ref_replicate(load.tolist(), n_ep, r_local, nodes)


def test_initial_is_home_copies():
  assert eplb.initial(2, 3, 2).tolist() == [0, 1, 0, 2, 3, 2]
  assert eplb.initial(4, 1, 1).tolist() == [0, 1, 2, 3]
  assert eplb.initial(4, 0, 2).shape == (0,)


def test_place_jits_and_is_deterministic():
  load = jnp.asarray(counts(zipf_routing(32, 4, 512, 0), 32))
  jitted = jax.jit(eplb.place, static_argnums=(1, 2, 3))
  first = jitted(load, 8, 2, 2)
  assert first.tolist() == jitted(load, 8, 2, 2).tolist() == place(load, 8, 2, 2).tolist()
  assert first.tolist() == ref_place(np.asarray(load).tolist(), 8, 2, 2)
  ties = jnp.ones((16,))
  assert jitted(ties, 4, 2, 1).tolist() == jitted(ties, 4, 2, 1).tolist() == ref_place([1.0] * 16, 4, 2, 1)


def test_bad_shapes():
  with pytest.raises(ConfigError):
    eplb.place(jnp.ones((10,)), 4, 1)
  with pytest.raises(ConfigError):
    eplb.place(jnp.ones((16,)), 4, 1, nodes=3)
  with pytest.raises(ConfigError):
    eplb.physical_ids(jnp.zeros((2, 2), jnp.int32), jnp.zeros((5,), jnp.int32), 16, 4)


# ------------------------------------------------------------------ physical ids
@pytest.mark.parametrize("n_experts,n_ep,r_local,nodes", SETUPS)
def test_physical_ids(n_experts, n_ep, r_local, nodes):
  idx = zipf_routing(n_experts, min(3, n_experts), 300, 1, s=1.2)
  slots = place(jnp.asarray(counts(idx, n_experts)), n_ep, r_local, nodes)
  phys = physical_ids(jnp.asarray(idx), slots, n_experts, n_ep)
  assert phys.dtype == jnp.int32 and phys.shape == idx.shape
  logical = logical_of_physical(slots, n_experts, n_ep)
  assert logical.shape == (n_ep * (n_experts // n_ep + r_local),)
  assert (np.asarray(logical)[np.asarray(phys)] == idx).all()  # every assignment on a copy of its expert
  np.testing.assert_array_equal(phys, ref_physical(idx, slots.tolist(), n_experts, n_ep))
  per_slot = collections.Counter(np.asarray(phys).reshape(-1).tolist())
  for e in range(n_experts):
    copies = [per_slot[p] for p in np.flatnonzero(np.asarray(logical) == e)]
    assert sum(copies) == (idx == e).sum()


def test_physical_ids_copy_choice():
  """Hand-checked: expert 3 (native: physical 4 on rank 1) has copies in slots 0 and 1 (physical 2 and
  5); its tokens are rows 0, 2, 4, 6. By row (t mod 3) they go to copies 0, 2, 1, 0. With 2 copies,
  rows mod 2 send all four to the native copy of 3 (the split follows the rows, not the counts)."""
  idx = jnp.array([[3], [0], [3], [1], [3], [2], [3]], jnp.int32)
  slots = jnp.array([3, 3], jnp.int32)
  assert logical_of_physical(slots, 4, 2).tolist() == [0, 1, 3, 2, 3, 3]
  assert physical_ids(idx, slots, 4, 2).reshape(-1).tolist() == [4, 0, 5, 1, 2, 3, 4]
  two = jnp.array([3, 0], jnp.int32)  # experts 3 and 0 with 2 copies, the second physical 2 and 5
  assert physical_ids(idx, two, 4, 2).reshape(-1).tolist() == [4, 5, 4, 1, 4, 3, 4]


def test_no_redundant_slots():
  idx = jnp.array([[0, 5], [7, 2]], jnp.int32)
  none = jnp.zeros((0,), jnp.int32)
  assert physical_ids(idx, none, 8, 4).tolist() == [[0, 5], [7, 2]]
  assert logical_of_physical(none, 8, 4).tolist() == list(range(8))


def test_rank_rows_and_imbalance():
  phys = jnp.array([[0, 1], [2, 5], [5, 5]], jnp.int32)
  rows = eplb.rows_per_rank(phys, 3, 2)
  assert rows.tolist() == [2, 1, 3]
  assert float(eplb.rank_imbalance(rows)) == pytest.approx(3 / 2)


# ------------------------------------------------------------------ balance on a skewed router
@pytest.mark.parametrize("permuted", [False, True])
def test_redundant_experts_balance_skewed_routing(permuted):
  """E=32, n_ep=8, K=4, Zipf popularity (s=1) over 4096 tokens, R = n_ep (one slot per rank) placed
  from the measured loads: per-rank imbalance 3.53 -> 1.46 (hot experts on rank 0) and 2.29 -> 1.23
  (popularity permuted over the experts); the initial placement (home copies) changes nothing."""
  n_experts, n_ep, k, t, r_local = 32, 8, 4, 4096, 1
  idx = jnp.asarray(zipf_routing(n_experts, k, t, 0, permute=permuted))
  e_local = n_experts // n_ep
  without = float(eplb.rank_imbalance(eplb.rows_per_rank(idx, n_ep, e_local)))
  home = eplb.initial(n_ep, r_local, e_local)
  at_home = eplb.rows_per_rank(physical_ids(idx, home, n_experts, n_ep), n_ep, e_local + r_local)
  assert at_home.tolist() == eplb.rows_per_rank(idx, n_ep, e_local).tolist()
  slots = place(jnp.asarray(counts(idx, n_experts)), n_ep, r_local)
  with_r = float(eplb.rank_imbalance(eplb.rows_per_rank(
      physical_ids(idx, slots, n_experts, n_ep), n_ep, e_local + r_local)))
  print(f"rank imbalance (max/mean): without {without:.3f}, with {n_ep} redundant {with_r:.3f}")
  assert without > 2.0
  assert with_r < 0.6 * without
  assert with_r < 1.5


def test_in_nodes_keeps_copies_inside_their_node():
  """A placement from another mesh (restored from a checkpoint): copies of experts whose home is in
  another node fall back to the slot's home copy; the rest stay."""
  # 8 experts, 4 ranks (2 experts each) in 2 nodes of 2 ranks, 1 slot per rank
  slots = jnp.asarray([3, 0, 7, 1])  # rank 0 copies 3 (node 0: ok), rank 1 copies 0 (ok),
  #                                    rank 2 copies 7 (node 1: ok), rank 3 copies 1 (node 0: not ok)
  assert eplb.in_nodes(slots, 8, 4, 2).tolist() == [3, 0, 7, 6]  # rank 3's home copy: expert 6
  assert eplb.in_nodes(slots, 8, 4, 1).tolist() == [3, 0, 7, 1]  # one node: all fine
  assert eplb.in_nodes(jnp.asarray([9, -1, 4, 5]), 8, 4, 1).tolist() == [0, 2, 4, 5]  # out of range


# ------------------------------------------------------------------ re-placement never makes it worse
def test_rank_loads_split_each_expert_over_its_copies():
  """Hand-checked: loads 2 each, rank 0's slot copies expert 1, rank 1's expert 0 (1 a copy each):
  rank 0 computes 1 + 1 + 1, rank 1 2 + 2 + 1. Loads 2, 4, 6, 8 with rank 0's slot empty (4, the
  number of experts) and rank 1's copying expert 1: rank 0 2 + 4/2, rank 1 6 + 8 + 4/2."""
  assert eplb.rank_loads(jnp.array([1, 0]), jnp.array([2.0, 2, 2, 2]), 2).tolist() == [3, 5]
  assert eplb.rank_loads(jnp.array([4, 1]), jnp.array([2.0, 4, 6, 8]), 2).tolist() == [4, 16]


def test_replace_keeps_the_old_placement_unless_the_new_one_is_better():
  """Even loads (4 experts on 2 ranks, a slot each): EPLB's placement halves experts 0 and 1 and puts
  the halves on ranks that were average (max/mean 1.25 against 1 without copies), so the re-placement
  keeps the home copies; skewed loads take the new placement; an old placement worse than no copies
  for the new loads (rank 0, the busier, copying rank 1's expert 2: 1.25) gives way to the home
  copies when the new one is no better."""
  even, skewed = jnp.array([1.0, 1, 1, 1]), jnp.array([9.0, 0, 0, 0])
  home = eplb.initial(2, 1, 2)
  imbalance = lambda slots, load: float(eplb.rank_imbalance(eplb.rank_loads(slots, load, 2)))
  assert place(even, 2, 1, 1).tolist() == [1, 0] and imbalance(jnp.array([1, 0]), even) == 1.25
  assert imbalance(home, even) == 1.0
  assert eplb.replace(home, even, 2, 1).tolist() == home.tolist()
  assert eplb.replace(jnp.array([2, 3]), even, 2, 1).tolist() == home.tolist()
  assert imbalance(jnp.array([2, 3]), even) == 1.25
  assert eplb.replace(home, skewed, 2, 1).tolist() == place(skewed, 2, 1, 1).tolist() == [0, 0]
  assert eplb.replace(jnp.array([0, 0]), skewed, 2, 1).tolist() == [0, 0]  # as good as the new one: kept


@pytest.mark.parametrize("seed", range(3))
def test_replace_is_never_worse_than_no_copies(seed):
  """Random loads, even and skewed, re-placed from random old placements: the max/mean rank load of
  the result is at most the old one's and the home copies' (no copies), and below them exactly when
  it is EPLB's new placement."""
  rng = np.random.default_rng(seed)
  n_experts, n_ep, r_local, nodes = 16, 4, 2, 2
  jitted = jax.jit(eplb.replace, static_argnums=(2, 3, 4))
  score = lambda slots, load: float(eplb.rank_imbalance(eplb.rank_loads(slots, load, n_ep)))
  home = eplb.initial(n_ep, r_local, n_experts // n_ep)
  for s in (0.0, 0.5, 1.5):
    load = jnp.asarray(counts(zipf_routing(n_experts, 2, 512, seed, s=s), n_experts))
    old = place(jnp.asarray(rng.uniform(0, 10, n_experts), jnp.float32), n_ep, r_local, nodes)
    got = jitted(old, load, n_ep, r_local, nodes)
    new = place(load, n_ep, r_local, nodes)
    assert score(got, load) <= min(score(old, load), score(home, load)) + 1e-6
    assert got.tolist() in (old.tolist(), home.tolist(), new.tolist())
    if got.tolist() == new.tolist() != old.tolist():
      assert score(new, load) < min(score(old, load), score(home, load)) + 1e-6


def test_usable_empties_slots_made_for_another_mesh():
  """A restored placement whose slot copies an expert of another node: that slot is empty (its copy
  weights were made for the old mesh), and no assignment goes to it."""
  slots = jnp.asarray([3, 0, 7, 1])  # rank 3 (node 1) copies expert 1 (node 0): not usable
  assert eplb.usable(slots, 8, 4, 2).tolist() == [3, 0, 7, 8]
  assert eplb.instances_of(eplb.usable(slots, 8, 4, 2), 8).tolist() == [2, 1, 1, 2, 1, 1, 1, 2]
  idx = jnp.asarray(zipf_routing(8, 2, 64, 0))
  phys = physical_ids(idx, eplb.usable(slots, 8, 4, 2), 8, 4)
  assert 3 * 3 + 2 not in phys.tolist() and (phys == 3 * 3 + 2).sum() == 0  # rank 3's redundant slot
  logical = logical_of_physical(slots, 8, 4)
  assert (logical[np.asarray(phys)] == np.asarray(idx)).all()


def test_restored_placements_are_made_valid_once():
  """Where a checkpoint is restored (resume, init_from, the tools: train/core/model_io.valid_copies),
  each layer's placement in the model's state gets usable's empty slots; nothing else changes, and the
  forward (parallel/expert_parallel/dispatch.py) uses the placement as it is."""
  from moe.experts import valid_placements

  stacked = jnp.asarray([[3, 0, 7, 1], [3, 0, 7, 6]])  # two layers: the first restored from another mesh
  rest = {"layers": {"experts": {"copies": stacked, "bias": jnp.ones(8)}}, "mtp": {"experts": {"copies": stacked[1]}}}
  got = valid_placements(rest, 8, 4, 2)
  assert got["layers"]["experts"]["copies"].tolist() == [[3, 0, 7, 8], [3, 0, 7, 6]]
  assert got["mtp"]["experts"]["copies"].tolist() == [3, 0, 7, 6]
  assert got["layers"]["experts"]["bias"].tolist() == [1.0] * 8
