"""Subprocess side of tests/test_ep.py: expert-parallel traffic features on 8 simulated CPU devices.
Two processes run at once (one core each):

  python tests/ep_worker.py a
    dispatch  the MoE dispatch alone (outputs and gradients) vs one device: two-level (mesh.ep_nodes
              2, 4 and 8 = one node per rank), both transports, with and without redundant copies
              and the split exchange (mesh.ep_overlap), on expert=8, data=2 x expert=4 and
              fsdp=2 x expert=2 x tensor=2
    steps     three training steps of the tiny model (group-limited routing) with all three, the
              copies re-placed after every step, vs the same steps on one device: expert=8 (ragged),
              data=2 x expert=4 (padded)
    restore   redundant experts through a checkpoint: 2 steps, save, restore into a fresh state, the
              third step == the third of the straight run
  python tests/ep_worker.py b
    steps     the same three steps through a 2-stage 1F1B pipeline (stage=2 x expert=4), and with
              precision=fp8 on expert=8 against FP8 on one device

Prints one JSON line. The compiled steps go to the test session's persistent compilation cache
(tests.processes.cpu_env), so the restore's runs (the same computation) do not compile again.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.processes import TINY, start_worker  # noqa: E402

MODE = start_worker({})  # (tests.processes.cpu_env: fast compiles into the session's compilation cache)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe.experts import DISPATCH_AXES  # noqa: E402
from moe.kernels.expert_ffn import EXPERTS  # noqa: E402
from parallel import eplb, expert_parallel  # noqa: E402

from parallel import mesh as mesh_lib  # noqa: E402
from train.core import checkpoint as ckpt_lib  # noqa: E402
from train.core import loop  # noqa: E402
from train.core.train_config import load_train_config  # noqa: E402
from train.core.input_pipeline import synthetic_batch  # noqa: E402
from train.bench_ep import a2a_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 experts in 4 groups, a token's 2 experts within 2 groups: with expert=8 (ep_nodes=4: 2 ranks a
# node) or expert=4 (ep_nodes=2) a token reaches at most 2 nodes of the 4 or 2.
ROUTING = ["model.n_group=4", "model.topk_group=2", "model.num_hidden_layers=3", "steps=3"]
MESHES = {"expert8": ["mesh.data=1", "mesh.expert=8"], "d2e4": ["mesh.data=2", "mesh.expert=4"],
          "stage2e4": ["mesh.data=1", "mesh.stage=2", "mesh.expert=4"]}
FEATURES = {
    "all": ["mesh.ep_nodes={nodes}", "mesh.ep_overlap=true", "mesh.redundant_experts={ep}", "mesh.redundant_every=1"],
    "all_1f1b": ["mesh.ep_nodes={nodes}", "mesh.ep_overlap=true", "mesh.redundant_experts={ep}",
                 "mesh.redundant_every=1", "pipeline.schedule=1f1b", "pipeline.microbatches=4"],
    "all_fp8": ["mesh.ep_nodes={nodes}", "mesh.ep_overlap=true", "mesh.redundant_experts={ep}",
                "mesh.redundant_every=1", "precision=fp8"],
    "all_ragged": ["mesh.ep_nodes={nodes}", "mesh.ep_overlap=true", "mesh.redundant_experts={ep}",
                   "mesh.redundant_every=1", "mesh.ep_transport=ragged", "mesh.ep_chunks=2", "impl.ep_remat=keep"],
}

# (b's float32 one-device reference comes last: by then a has compiled it into the session's cache)
RUNS = {"a": [("expert8", "all_ragged"), ("d2e4", "all")], "b": [("expert8", "all_fp8"), ("stage2e4", "all_1f1b")]}


def config(extra=(), run_dir=None):
  over = TINY + ROUTING + list(extra) + ([f"run_dir={run_dir}"] if run_dir else [])
  return load_train_config(os.path.join(ROOT, "configs/tiny.yaml"), over)


def batch(i):
  b = synthetic_batch(8, 16, 64, seed=10 + i)
  b["loss_mask"][:, -3:] = 0  # some padding, as real batches have
  b["segment_ids"][:, -3:] = 0
  return b


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def copies_of(state):
  return {k: v.tolist() for k, v in leaves(state["rest"]).items() if "copies" in k}


def run(cfg, steps=3, state=None):
  """(losses, params before the last step, params after it, the state) of `steps` steps."""
  par = mesh_lib.Parallelism.from_config(cfg.mesh)
  built = loop.build(cfg, par)
  state = built.state if state is None else state
  losses, before = [], None
  for i in range(steps):
    before = leaves(state["params"])
    state, m = built.train_step(state, loop.to_device(batch(i), par))
    losses.append(float(m["loss"]))
  return losses, before, leaves(state["params"]), state


def compare(ref, got) -> dict:
  (ref_losses, ref_before, ref_after, _), (losses, before, after, state) = ref, got
  delta = {k: after[k] - before[k] for k in before}
  ref_delta = {k: ref_after[k] - ref_before[k] for k in ref_before}
  norm = np.sqrt(sum(float((v ** 2).sum()) for v in ref_delta.values()))
  diff = np.sqrt(sum(float(((delta[k] - ref_delta[k]) ** 2).sum()) for k in delta))
  return {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)), "update_rel": diff / norm,
          "copies": copies_of(state)}


def steps(runs):
  """{name: comparison}, {(mesh, feature): run}"""
  refs = {"": None, "fp8": None}
  out, done = {}, {}
  for mesh, feature in runs:
    ref = "fp8" if "fp8" in feature else ""
    refs[ref] = refs[ref] or run(config(["precision=fp8"] if ref else []))
    ep, nodes = (8, 4) if mesh == "expert8" else (4, 2)
    extra = MESHES[mesh] + [o.format(nodes=nodes, ep=ep) for o in FEATURES[feature]]
    done[mesh, feature] = run(config(extra))
    out[f"{mesh}/{feature}"] = compare(refs[ref], done[mesh, feature])
  return out, done


def routed(t=64, e=16, k=4, d=16, f=8, n_group=4, topk_group=2, seed=0):
  """Tokens, group-limited routing (k experts within topk_group of n_group groups) and expert weights."""
  rng = np.random.default_rng(seed)
  per = e // n_group
  idx = np.stack([rng.choice(np.concatenate([np.arange(g * per, (g + 1) * per) for g in
                                             rng.choice(n_group, topk_group, replace=False)]), k, replace=False)
                  for _ in range(t)]).astype(np.int32)
  x = rng.standard_normal((t, d)).astype(np.float32)
  w = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
  gate, up = ((rng.standard_normal((e, d, f)) * 0.3).astype(np.float32) for _ in range(2))
  down = (rng.standard_normal((e, f, d)) * 0.3).astype(np.float32)
  return x, idx, w, gate, up, down


STORED_AXES = (("expert", "embed", "moe_mlp"), ("expert", "embed", "moe_mlp"), ("expert", "moe_mlp", "embed"))


def rel_err(got, want) -> float:
  """max |got - want| / max |want| in numpy, NaN (any NaN in `got`) as infinity. (XLA:CPU's max
  reduction gave -inf for an output holding NaNs, which passed `err < 1e-6`.)"""
  err = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / np.abs(np.asarray(want)).max())
  return err if np.isfinite(err) else float("inf")


def fast_path_fits(idx, groups: int, n_ep: int, e_local: int, halves: int, factor: float, nodes: int = 1,
                   nodes_per_token: int = 0) -> bool:
  """Whether the fast path (mesh.ep_fast_path=factor) holds this routing [tokens, k], counted here in
  NumPy: the tokens are `groups` expert-parallel groups of n_ep ranks in `nodes` nodes, each rank's
  tokens consecutive and exchanged in `halves` consecutive slices (mesh.ep_overlap: 2). No rank may
  receive more assignments for its experts than the fast path's receive buffer; in two levels no rank
  may receive more token rows across nodes (a token once to each node holding some of its experts, to
  the rank in the sender's position there) nor pass on more assignments inside its node (those of its
  received rows whose experts are in its node) than those buffers hold."""
  t_local, k = len(idx) // (groups * n_ep), idx.shape[1]
  n_in = n_ep // nodes
  plan = expert_parallel.fast_plan(expert_parallel.Plan(("expert",), n_ep, nodes, "ragged", None, nodes_per_token),
                                   t_local // halves, k, e_local, factor)
  slices = idx.reshape(groups, n_ep, halves, t_local // halves, k)
  for g in range(groups):
    for h in range(halves):
      receive, across, inside = np.zeros(n_ep, int), np.zeros(n_ep, int), np.zeros(n_ep, int)
      for rank in range(n_ep):
        for token in slices[g, rank, h]:
          for e in token:
            receive[e // e_local] += 1
          for node in set(token // (e_local * n_in)):
            rail = node * n_in + rank % n_in  # the rank in this rank's position in that node
            across[rail] += 1
            inside[rail] += int((token // (e_local * n_in) == node).sum())
      if receive.max() > plan.receive_rows or nodes > 1 and (across.max() > plan.across_rows
                                                              or inside.max() > plan.inside_rows):
        return False
  return True


def dispatch():
  """The dispatch alone vs one device. With copies as the training step runs them: their weights made
  by make_copies, the dispatch differentiated with respect to them too, and their gradients added
  into the experts' by add_copy_grads."""
  args = routed()
  idx = jnp.asarray(args[1])

  def layer(par, copies=None, kernel=EXPERTS["blocked"]):
    return lambda x, w, g, u, d, *cw: expert_parallel.dispatch_combine(
        x, idx, w, (g, u, d), DISPATCH_AXES, kernel, par, (16, 4, 2),
        None if copies is None else (copies, cw))

  def loss(fn):
    return lambda *a: (fn(*a)[0] * jnp.cos(fn(*a)[0])).sum()

  x, _, *rest = args
  want = layer(None)(x, *rest)[0]
  want_g = jax.grad(loss(layer(None)), argnums=(0, 1, 2, 3, 4))(x, *rest)
  load = jnp.bincount(idx.ravel(), length=16).astype(jnp.float32)
  out = {}
  sizes = {"expert8": dict(data=1, expert=8), "d2e4": dict(data=2, expert=4), "f2e2t2": dict(data=1, fsdp=2, expert=2, tensor=2)}
  # TPU's and GPU's grouped-matmul kernels, in the Pallas interpreter
  kernels = {k: functools.partial(EXPERTS[k], interpret=True) for k in ("megablox", "triton")}
  for mesh, nodes, transport, redundant, overlap, kernel, fast in [
      ("expert8", 2, "padded", False, True, None, None), ("expert8", 8, "padded", True, False, None, None),
      ("expert8", 4, "ragged", True, True, None, None), ("d2e4", 4, "ragged", False, False, None, None),
      ("d2e4", 2, "padded", True, False, None, None), ("f2e2t2", 2, "padded", True, True, None, None),
      ("f2e2t2", 2, "ragged", True, False, "megablox", None), ("d2e4", 2, "ragged", True, False, "triton", None),
      # the one-level ragged exchange's fast path (mesh.ep_fast_path): buffers too small for this
      # routing (the chunked exchange runs), large enough, in halves, with TPU's kernel, with copies
      ("expert8", 1, "ragged", False, False, None, 1.0), ("expert8", 1, "ragged", False, True, None, 8.0),
      ("d2e4", 1, "ragged", False, False, "megablox", 1.5), ("expert8", 1, "ragged", True, False, None, 3.0),
      # and the two-level one's: buffers too small (the chunks run), large enough in halves, with copies
      ("expert8", 2, "ragged", False, False, None, 1.0), ("expert8", 4, "ragged", False, True, None, 8.0),
      ("d2e4", 2, "ragged", True, False, None, 4.0)]:
    n_ep = sizes[mesh]["expert"]
    par = mesh_lib.Parallelism.from_config(mesh_lib.MeshConfig(**sizes[mesh], ep_transport=transport, ep_nodes=nodes,
                                                                ep_overlap=overlap, ep_fast_path=fast))
    slots = eplb.place(load, n_ep, 1, nodes) if redundant else None
    fn = layer(par, slots, kernels[kernel] if kernel else EXPERTS["blocked"])
    make = jax.jit(lambda *ws: tuple(expert_parallel.make_copies(ws, STORED_AXES, slots, par)))
    add = jax.jit(lambda gs, cgs: expert_parallel.add_copy_grads(gs, cgs, STORED_AXES, slots, par))
    copy_w = make(*rest[1:]) if redundant else ()
    y, dropped, fallbacks = jax.jit(fn)(x, *rest, *copy_w)
    g = jax.jit(jax.grad(loss(fn), argnums=tuple(range(5 + len(copy_w)))))(x, *rest, *copy_w)
    name = f"{mesh}/nodes{nodes}/{par.ep_transport}/{'copies' if redundant else 'plain'}{'/overlap' if overlap else ''}" \
        + (f"/fast{fast}" if fast else "") + (f"/{kernel}" if kernel else "")
    if redundant:
      g = g[:2] + tuple(add(g[2:5], g[5:]))
    out[name] = {"y": rel_err(y, want), "dropped": int(dropped), "grad": max(map(rel_err, g, want_g)),
                 "fallbacks": int(fallbacks)}
    if kernel:  # the sorting kernels: how often the program sorts rows by expert (expert_ffn._permute)
      out[name]["permutes"] = str(jax.make_jaxpr(fn)(x, *rest, *copy_w)).count("name=_permute")
    if fast and not redundant:  # whether the fast path ran: the most rows a rank of a group receives
      groups = sizes[mesh].get("data", 1) * sizes[mesh].get("fsdp", 1)
      e_local = 16 // n_ep
      out[name]["fast"] = fast_path_fits(np.asarray(idx), groups, n_ep, e_local, 2 if overlap else 1, fast, nodes,
                                         expert_parallel.ranks_per_token(16, nodes, 4, 4, 2))
    if redundant and transport == "padded":  # the copies' all-to-all bytes per device, from the HLO
      hlo = [f.lower(*a).compile().as_text() for f, a in ((make, rest[1:]), (add, (g[2:5], copy_w)))]
      out[name]["copy_bytes"] = [a2a_bytes(h) for h in hlo]
  return out


# Every routing method the router has, over groups that nest in the nodes, contain them or cross them
# (24 experts on expert=8: 3 a rank; ep_nodes 2 = 12 experts a node, 4 = 6 a node), 4 experts a token.
GROUPINGS = {"ungrouped": (1, 1), "groups3": (3, 1), "groups6": (6, 2), "groups12": (12, 2)}
METHODS = {"noaux_tc": "sigmoid", "greedy": "softmax", "group_limited_greedy": "softmax"}


def reference_contributions(x, idx, w, gate, up, down):
  """[T, K, D] float64: w[t, k] * expert_{idx[t, k]}(x[t]), in numpy."""
  x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  g = np.einsum("td,tkdf->tkf", x, gate[idx])
  h = g / (1 + np.exp(-g)) * np.einsum("td,tkdf->tkf", x, up[idx])
  return np.einsum("tkf,tkfd->tkd", h, down[idx]) * np.asarray(w, np.float64)[..., None]


def missing_assignments(y, parts_TxKxD) -> int | None:
  """How many (token, k) contributions y lacks, found per token as the one subset of its K
  contributions whose removal explains y (None if no subset does)."""
  t, k, _ = parts_TxKxD.shape
  subsets = [[j for j in range(k) if m >> j & 1] for m in range(2 ** k)]
  total, scale = 0, np.abs(parts_TxKxD.sum(1)).max()
  for i in range(t):
    errs = [np.abs(parts_TxKxD[i, [j for j in range(k) if j not in s]].sum(0) - y[i]).max() / scale for s in subsets]
    best = int(np.argmin(errs))
    if errs[best] > 1e-5:
      return None
    total += len(subsets[best])
  return total


def routing_matrix():
  """The dispatch under every routing method x grouping x ep_nodes (1, 2, 4) x transport (padded
  dropless, padded with capacity factor 1, ragged), forward, on expert=8; and the ragged exchange
  given a bound the router does not keep (group limits claimed for greedy routing: the old bug)."""
  from moe import router as router_lib
  from moe.config import ModelConfig

  rng = np.random.default_rng(1)
  t, e, k, d, f = 64, 24, 4, 16, 8
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = rng.standard_normal((t, e)).astype(np.float32) * 2
  gate, up = ((rng.standard_normal((e, d, f)) * 0.3).astype(np.float32) for _ in range(2))
  down = (rng.standard_normal((e, f, d)) * 0.3).astype(np.float32)
  pars = {(nodes, transport, cf): mesh_lib.Parallelism.from_config(mesh_lib.MeshConfig(
              data=1, expert=8, ep_transport=transport, ep_nodes=nodes, capacity_factor=cf))
          for nodes in (1, 2, 4) for transport, cf in (("padded", None), ("padded", 1.0), ("ragged", None))}
  # the ragged exchange's fast path (mesh.ep_fast_path), one level and two, in one pass and in halves:
  # buffers of 1.5x the balanced share, which some of these routings overflow (then the 2 chunks run)
  pars.update({(nodes, "ragged", f"fast{halves}"): mesh_lib.Parallelism.from_config(mesh_lib.MeshConfig(
      data=1, expert=8, ep_transport="ragged", ep_nodes=nodes, ep_fast_path=1.5, ep_overlap=halves == 2, ep_chunks=2))
      for nodes in (1, 2, 4) for halves in (1, 2)})
  compiled = {}

  def run(par, routing, idx, w):  # one program per plan (the routing enters only as the nodes a token reaches)
    key = par, expert_parallel.ranks_per_token(routing[0], par.ep_nodes, k, *routing[1:])
    if key not in compiled:
      compiled[key] = jax.jit(lambda x, idx, w, *ws: expert_parallel.dispatch_combine(
          x, idx, w, ws, DISPATCH_AXES, EXPERTS["blocked"], par, routing))
    y, dropped, fallbacks = compiled[key](x, idx, w, gate, up, down)
    return np.asarray(y, np.float64), int(dropped), int(fallbacks)

  out = {}
  for method, scoring in METHODS.items():
    for grouping, (n_group, topk_group) in GROUPINGS.items():
      cfg = ModelConfig(n_routed_experts=e, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                        topk_method=method, scoring_func=scoring, norm_topk_prob=True)
      w, idx = router_lib.select(router_lib.scores_of(jnp.asarray(logits), cfg), None, cfg)
      idx, w = np.asarray(idx), np.asarray(w)
      parts = reference_contributions(x, idx, w, gate, up, down)
      routing = router_lib.reach(cfg)
      for (nodes, transport, cf), par in pars.items():
        y, dropped, fallbacks = run(par, routing, idx, w)
        suffix = f"_{cf}" if isinstance(cf, str) else "_cf1" if cf else ""
        out[f"{method}/{grouping}/nodes{nodes}/{par.ep_transport}{suffix}"] = {
            "err": float(np.abs(y - parts.sum(1)).max() / np.abs(parts.sum(1)).max()), "dropped": dropped,
            "missing": missing_assignments(y, parts), "nodes_reached": int(max(len(set(r)) for r in idx // (e // nodes))),
            "fallbacks": fallbacks}
        if isinstance(cf, str):  # whether the fast path fits (one group of 8 ranks, e / 8 experts each)
          out[f"{method}/{grouping}/nodes{nodes}/{par.ep_transport}{suffix}"]["fits"] = fast_path_fits(
              idx, 1, 8, e // 8, int(cf[-1]), 1.5, nodes, expert_parallel.ranks_per_token(e, nodes, k, *routing[1:]))
      if method == "greedy" and grouping == "groups6":  # claim V3-style limits the router does not keep
        y, dropped, _ = run(pars[2, "ragged", None], (e, n_group, 1), idx, w)
        out["wrong_bound"] = {"dropped": dropped, "missing": missing_assignments(y, parts)}
  return out


def restore(straight):
  extra = MESHES["expert8"] + [o.format(nodes=4, ep=8) for o in FEATURES["all_ragged"]]
  with tempfile.TemporaryDirectory() as tmp:
    cfg = config(extra, run_dir=tmp)
    par = mesh_lib.Parallelism.from_config(cfg.mesh)
    *_, state = run(cfg, steps=2)
    saved = copies_of(state)
    with ckpt_lib.Checkpoints(cfg) as ck:
      ck.save(2, state, None, force=True, par=par)
    built = loop.build(cfg, par)
    fresh = copies_of(built.state)
    with ckpt_lib.Checkpoints(cfg) as ck:
      state = ck.restore(ck.resume_plan(), built.state, None, par)
    got = copies_of(state)
    before = leaves(state["params"])
    state, m = built.train_step(state, loop.to_device(batch(2), par))
  return {"saved": saved, "restored": got, "fresh": fresh, "loss": float(m["loss"]),
          "straight_loss": straight[0][-1],
          "update_diff": max(float(np.abs((leaves(state["params"])[k] - before[k]) - (straight[2][k] - straight[1][k])).max())
                             for k in before)}


def main():
  assert jax.device_count() == 8
  result = {"dispatch": dispatch()} if MODE == "a" else {"routing": routing_matrix()}
  result["steps"], done = steps(RUNS[MODE])
  if MODE == "a":
    result["restore"] = restore(done["expert8", "all_ragged"])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
