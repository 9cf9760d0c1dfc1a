"""One expert-parallel MoE layer alone: time, slow-link bytes, load per rank.

  python -m train.bench_ep CONFIG [key=value] [--nodes N] [--skew S]

Uses the model shape and mesh of the config (e.g. configs/bench-cpu.yaml mesh.data=1 mesh.expert=8;
on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8 first) and its expert-parallel
settings (mesh.ep_transport, capacity_factor, ep_nodes, ep_overlap, redundant_experts). Tokens: the
global batch (batch_size x seq_len) with a random router, group-limited top-k as the model routes;
--skew S lowers the router logit of the expert of popularity rank i by S log(i + 1) (a Zipf-like
popularity, the experts' ranks in a random order). Prints one JSON line:

  layer_fwd, layer_fwd_bwd   best-of-N seconds of the routed experts through
                             parallel.expert_parallel (dispatch, grouped matmul, return, combine),
                             forward and forward + backward; single_*: the same on one device
  slow                       with --nodes N (the expert-parallel ranks as N nodes of neighbouring
                             ranks): bytes each rank sends to other nodes per MoE layer, forward +
                             backward, for this dispatch and for the one-level one (ep_nodes=1):
                             `buffers` from the compiled all-to-alls of the padded transport (their
                             operand sizes, train/hlo_parse.py; the capacity factor of the config, 1.25
                             if it has none), `rows` what a ragged (exact) exchange sends for this
                             routing (the most any rank sends); and the ratios one-level / this
  rows_per_rank              (token, expert) rows each rank computes, and their max / mean
                             (imbalance), without redundant experts and, with mesh.redundant_experts,
                             with copies placed from this routing's load as the trainer re-places
                             them (parallel/eplb.py: replace, from the home copies, which it keeps
                             when the new placement would not lower the max / mean)
  bytes                      all-to-all bytes per device per MoE layer from the compiled HLO (the
                             results of its all-to-alls, with the padded transport and a capacity
                             factor, 1.25 if the config has none, so that no loop hides any):
                             `dispatch`, one micro-batch's forward + backward; with
                             mesh.redundant_experts `copies`, once per optimizer step: making the
                             copies from the experts (parallel.expert_parallel.make_copies) and
                             sending their gradients home (add_copy_grads); `per_step` the ratio
                             copies / (dispatch x grad_accum); `dispatch_links` and
                             `copies_links`: every collective's bytes (all-gathers, reduce-scatters,
                             all-reduces too) by kind and link, `fast` inside an expert-parallel node
                             and `slow` between nodes, as train.aot counts them (ring shares)
Timings and bytes take the copies' weights as given (state made once per step, as in training).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import router as router_lib
from moe.experts import DISPATCH_AXES
from parallel import eplb, expert_parallel
from train import forecast, hlo_links, hlo_parse
from train.bench import best_of, one_line_errors
from train.core import jsonl
from train.core import loop
from train.core.train_config import load_train_config


def routed(cfg, skew: float):
  """Tokens [T, D], router weights and expert ids [T, K], and expert weights, from cfg.seed."""
  m = cfg.model
  t, d, e, f = cfg.batch_size * cfg.seq_len, m.hidden_size, m.n_routed_experts, m.moe_intermediate_size
  keys = jax.random.split(jax.random.key(cfg.seed), 6)
  x = jax.random.normal(keys[0], (t, d), jnp.float32)
  popularity = jax.random.permutation(keys[5], e) + 1  # 1 = the hottest
  logits = x @ (0.05 * jax.random.normal(keys[1], (d, e))) - skew * jnp.log(popularity)
  w, idx = router_lib.select(router_lib.scores_of(logits, m), None, m)
  gate, up = (0.02 * jax.random.normal(kk, (e, d, f)) for kk in keys[2:4])
  down = 0.02 * jax.random.normal(keys[4], (e, f, d))
  return x, w, idx, (gate, up, down)


def slow_rows(idx_TxK, n_ep: int, nodes: int, e_local: int, two_level: bool) -> int:
  """Rows the busiest rank sends to other nodes for this routing (tokens split evenly over the ranks
  in order): one per remote (token, expert) assignment, or one per remote node a token reaches."""
  t, _ = idx_TxK.shape
  src_node = (np.arange(t) // (t // n_ep)) // (n_ep // nodes)
  dest_node = np.asarray(idx_TxK) // e_local // (n_ep // nodes)
  remote = dest_node != src_node[:, None]
  if two_level:
    per_token = np.array([len(set(dest_node[i][remote[i]])) for i in range(t)])
  else:
    per_token = remote.sum(1)
  return int(per_token.reshape(n_ep, -1).sum(1).max())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--nodes", type=int, default=None, help="count bytes between this many nodes of ranks")
  p.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of the experts' popularity")
  args = p.parse_args(argv)
  return one_line_errors(lambda: run(args))


def run(args) -> int:
  cfg = load_train_config(args.config, args.overrides)
  m = cfg.model
  par = loop.parallelism(cfg)
  rt = loop.runtime(cfg, par)
  x, w, idx, weights = routed(cfg, args.skew)
  t, d = x.shape
  e, k = m.n_routed_experts, m.num_experts_per_tok
  n_ep = expert_parallel.ep_size(par, e)
  e_local = e // n_ep
  expert_fn = rt.expert_fn()
  load = jnp.bincount(idx.reshape(-1), length=e).astype(jnp.float32)
  r_local = par.redundant_experts // n_ep
  copies = eplb.replace(eplb.initial(n_ep, r_local, e_local), load, n_ep, r_local, par.ep_nodes) \
      if par.redundant_experts else None

  def layer(par, copies=None):  # ws: the 3 weights, then (with copies) the copies' 3
    return lambda x, idx, w, *ws: expert_parallel.dispatch_combine(
        x, idx, w, ws[:3], DISPATCH_AXES, expert_fn, par, router_lib.reach(m),
        None if copies is None else (copies, ws[3:]))

  def loss(fn, x, *ws):
    return (fn(x, idx, w, *ws)[0] ** 2).sum()

  grad = lambda fn, n=3: jax.jit(jax.grad(functools.partial(loss, fn), argnums=tuple(range(1 + n))))
  out = {"mesh": dict(par.mesh.shape), "transport": par.ep_transport, "capacity_factor": par.capacity_factor,
         "ep_nodes": par.ep_nodes, "ep_overlap": par.ep_overlap, "redundant_experts": par.redundant_experts,
         "experts_impl": rt.experts, "tokens": t, "hidden": d, "experts": e, "top_k": k, "skew": args.skew}
  single = layer(None)
  out["single_fwd"] = best_of(jax.jit(single), x, idx, w, *weights, iters=args.iters)
  out["single_fwd_bwd"] = best_of(grad(single), x, *weights, iters=args.iters)

  tok = NamedSharding(par.mesh, P(tuple(a for a in ("data", "fsdp", "expert") if par.mesh.shape[a] > 1)))
  xs, idx, w = (jax.device_put(a, tok) for a in (x, idx, w))
  ep = layer(par, copies)
  made = () if copies is None else tuple(jax.jit(lambda *ws: expert_parallel.make_copies(ws, STORED_AXES, copies, par))(
      *weights))
  out["layer_fwd"] = best_of(jax.jit(ep), xs, idx, w, *weights, *made, iters=args.iters)
  out["layer_fwd_bwd"] = best_of(grad(ep, 3 + len(made)), xs, *weights, *made, iters=args.iters)
  out["dropped"] = int(jax.jit(ep)(xs, idx, w, *weights, *made)[1])
  out["bytes"] = traffic(par, layer, grad, xs, weights, copies, made, cfg.grad_accum)

  if args.nodes:
    out["slow"] = slow_bytes(par, layer, grad, xs, weights, np.asarray(idx), n_ep, args.nodes, e_local, d)
  rows = lambda phys, per_rank: np.asarray(eplb.rows_per_rank(jnp.asarray(phys), n_ep, per_rank))
  plain = rows(idx, e_local)
  out["rows_per_rank"] = {"without": plain.tolist(), "imbalance_without": round(plain.max() / plain.mean(), 3)}
  if copies is not None:
    phys = eplb.physical_ids(jnp.asarray(idx), copies, e, n_ep)
    spread = rows(phys, e_local + r_local)
    out["rows_per_rank"].update({"with": spread.tolist(), "imbalance_with": round(spread.max() / spread.mean(), 3),
                                 "copies": np.asarray(copies).tolist()})
  print(jsonl.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}))
  return 0


STORED_AXES = (("expert", "embed", "moe_mlp"), ("expert", "embed", "moe_mlp"), ("expert", "moe_mlp", "embed"))


def padded_of(par):
  """`par` with the padded transport (capacity factor 1.25 unless it has one): the exchange whose
  buffers, and so bytes, are fixed by the shapes."""
  return dataclasses.replace(par, ep_transport="padded",
                             cfg=dataclasses.replace(par.cfg, capacity_factor=par.capacity_factor or 1.25))


def a2a_bytes(hlo: str) -> int:
  """Bytes of the results of the all-to-alls in compiled HLO text, every element of a tuple-shaped
  one (XLA:CPU splits an all-to-all into an array per peer); each instruction once (no loops)."""
  return sum(hlo_parse.shape_bytes(ins.shape) for ins in hlo_parse.parse(hlo).instrs.values()
             if ins.op in ("all-to-all", "ragged-all-to-all"))


def node_of(par, ranks: int, nodes: int) -> dict:
  """device id -> its node: the `ranks` expert-parallel ranks (along the expert axis) as `nodes`
  blocks of neighbouring ranks."""
  axis = par.mesh.axis_names.index("expert")
  per_node = max(ranks // max(nodes, 1), 1)
  return {dev.id: pos[axis] // per_node for pos, dev in np.ndenumerate(par.mesh.devices)}


def links(compiled, par) -> dict:
  """Every collective's bytes one device puts on the links per run of `compiled`, by kind and link
  (train/forecast.py's count: ring shares, loops' trip counts): `fast` inside an expert-parallel node
  (mesh.ep_nodes, neighbouring ranks of the expert axis), `slow` between nodes."""
  node = node_of(par, par.mesh.shape["expert"], par.ep_nodes)
  devices = hlo_links.device_assignment(compiled, par.mesh)
  granule = lambda i: node[devices[i].id] if i < len(devices) else 0
  cost = forecast.costs(compiled.as_text(), forecast.chip_of("h100"), granule)  # (bytes: any chip)
  out: dict = {}
  for (kind, link), b in sorted(cost.links.items()):
    if b:
      out.setdefault(kind, {"fast": 0, "slow": 0})[link] = int(b)
  return out


def traffic(par, layer, grad, xs, weights, copies, made, grad_accum: int) -> dict:
  """All-to-all bytes per device per MoE layer: the dispatch's per micro-batch (forward + backward,
  the copies' weights given), and the copies' per optimizer step (made once, their gradients home);
  and every collective's bytes by kind and link for each (`dispatch_links`, `copies_links`)."""
  padded = padded_of(par)
  compiled = grad(layer(padded, copies), 3 + len(made)).lower(xs, *weights, *made).compile()
  out = {"dispatch": a2a_bytes(compiled.as_text()), "dispatch_links": links(compiled, par)}
  if copies is not None:
    def step_copies(ws, cgs):
      return (expert_parallel.make_copies(ws, STORED_AXES, copies, padded),
              expert_parallel.add_copy_grads(ws, cgs, STORED_AXES, copies, padded))
    compiled = jax.jit(step_copies).lower(list(weights), list(made)).compile()
    out["copies"], out["copies_links"] = a2a_bytes(compiled.as_text()), links(compiled, par)
    out["grad_accum"] = grad_accum
    out["per_step"] = round(out["copies"] / (out["dispatch"] * grad_accum), 4)
  return out


def slow_bytes(par, layer, grad, xs, weights, idx, n_ep, nodes, e_local, d) -> dict:
  """Bytes per rank to other nodes, per MoE layer forward + backward, this dispatch vs one level."""
  node = node_of(par, n_ep, nodes)
  padded = padded_of(par)
  out = {"nodes": nodes}
  for name, p in (("this", padded), ("one_level", dataclasses.replace(padded, ep_nodes=1))):
    compiled = grad(layer(p)).lower(xs, *weights).compile()
    slow = hlo_links.slow_a2a(compiled.as_text(), hlo_links.device_assignment(compiled, par.mesh), node)
    two = p.ep_nodes > 1
    out[name] = {"buffers": slow["bytes_per_device"],
                 "rows": 4 * slow_rows(idx, n_ep, nodes, e_local, two) * d * xs.dtype.itemsize}  # there and back, fwd + bwd
  out["ratio_buffers"] = round(out["one_level"]["buffers"] / max(out["this"]["buffers"], 1), 3)
  out["ratio_rows"] = round(out["one_level"]["rows"] / max(out["this"]["rows"], 1), 3)
  return out


if __name__ == "__main__":
  sys.exit(main())
