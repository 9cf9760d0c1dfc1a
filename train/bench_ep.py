"""Time one expert-parallel MoE layer and its all-to-alls alone: `python -m train.bench_ep CONFIG [key=value]`.

Uses the model shape and mesh of the config (e.g. configs/bench-cpu.yaml mesh.data=1 mesh.expert=8;
on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8 first). Tokens: the global batch
(batch_size x seq_len) with a random router (group-limited top-k as the model routes). Prints one JSON
line of best-of-N seconds:

  layer_fwd, layer_fwd_bwd   routed experts through parallel.expert_parallel (dispatch, grouped matmul,
                             return, combine), forward and forward + backward
  a2a_fwd                    only the padded transport's exchanges (tokens out, expert ids out,
                             outputs back) on buffers of the same shape
  single_fwd, single_fwd_bwd the same layer on one device (the same grouped matmul, no exchange)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import router as router_lib
from moe.experts import DISPATCH_AXES
from moe.kernels.experts import EXPERTS
from parallel import expert_parallel
from train.bench import best_of
from train.core import loop
from train.core.config import load_train_config


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*")
  p.add_argument("--iters", type=int, default=5)
  args = p.parse_args(argv)
  cfg = load_train_config(args.config, args.overrides)
  m = cfg.model
  par = loop.parallelism(cfg)
  rt = loop.runtime(cfg, par)
  t, d, e, f, k = cfg.batch_size * cfg.seq_len, m.hidden_size, m.n_routed_experts, m.moe_intermediate_size, \
      m.num_experts_per_tok
  keys = jax.random.split(jax.random.key(cfg.seed), 6)
  x = jax.random.normal(keys[0], (t, d), jnp.float32)
  scores = router_lib.scores_of(x @ (0.05 * jax.random.normal(keys[1], (d, e))), m)
  w, idx = router_lib.select(scores, None, m)
  gate, up = (0.02 * jax.random.normal(kk, (e, d, f)) for kk in keys[2:4])
  down = 0.02 * jax.random.normal(keys[4], (e, f, d))
  expert_fn = functools.partial(EXPERTS[rt.experts], fp8=rt.fp8)

  def layer(par):
    return lambda x, idx, w, gate, up, down: expert_parallel.dispatch_combine(
        x, idx, w, (gate, up, down), DISPATCH_AXES, expert_fn, par)

  def loss(fn, x, gate, up, down):
    return (fn(x, idx, w, gate, up, down)[0] ** 2).sum()

  single = layer(None)
  out = {"mesh": dict(par.mesh.shape), "transport": par.ep_transport, "capacity_factor": par.capacity_factor,
         "experts_impl": rt.experts, "tokens": t, "hidden": d, "experts": e, "top_k": k}
  out["single_fwd"] = best_of(jax.jit(single), x, idx, w, gate, up, down, iters=args.iters)
  out["single_fwd_bwd"] = best_of(jax.jit(jax.grad(functools.partial(loss, single), argnums=(0, 1, 2, 3))),
                                  x, gate, up, down, iters=args.iters)

  tok = NamedSharding(par.mesh, P(tuple(a for a in ("data", "fsdp", "expert") if par.mesh.shape[a] > 1)))
  xs, idx, w = (jax.device_put(a, tok) for a in (x, idx, w))
  ep = layer(par)
  out["layer_fwd"] = best_of(jax.jit(ep), xs, idx, w, gate, up, down, iters=args.iters)
  out["layer_fwd_bwd"] = best_of(jax.jit(jax.grad(functools.partial(loss, ep), argnums=(0, 1, 2, 3))),
                                 xs, gate, up, down, iters=args.iters)
  _, dropped = jax.jit(ep)(xs, idx, w, gate, up, down)
  out["dropped"] = int(dropped)
  n_ep = par.mesh.shape["expert"]
  if n_ep > 1:
    t_local = t // par.mesh.size * par.mesh.shape.get("tensor", 1)
    c = expert_parallel.capacity(t_local, k, n_ep, e // n_ep, par.capacity_factor)
    a2a = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, tiled=True)

    def exchange(buf, ids):  # the padded transport's three exchanges
      return a2a(a2a(buf) * 2.0), a2a(ids)

    spec = P(tuple(a for a in ("data", "fsdp", "expert") if par.mesh.shape[a] > 1))
    fn = jax.jit(jax.shard_map(exchange, mesh=par.mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
    n_dev = par.mesh.size // par.mesh.shape.get("tensor", 1)
    buf = jnp.zeros((n_dev * n_ep * c, d), jnp.float32)
    ids = jnp.zeros((n_dev * n_ep * c,), jnp.int32)
    out["a2a_rows_per_device"] = n_ep * c
    out["a2a_fwd"] = best_of(fn, buf, ids, iters=args.iters)
  print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
