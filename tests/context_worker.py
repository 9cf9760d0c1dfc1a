"""Subprocess side of tests/test_context.py: context parallelism on 8 simulated CPU devices.

  python tests/context_worker.py single the one-device step, then one step per mesh of MESHES on the
                                        same packed batch; and the all-gathers of the context=2 step
  python tests/context_worker.py ring   the ring core (moe/kernels/ring_attention.py) on context = 2, 3
                                        and 4 against the dense formula in float64 (outputs, gradients,
                                        max logit), and the dot FLOPs of its compiled forward and
                                        gradient per device beside the all_gather core's

XLA_FLAGS must be set before jax is imported, hence a separate process. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.processes import start_worker  # noqa: E402

start_worker({})

import jax  # noqa: E402
import numpy as np  # noqa: E402

from parallel import mesh as mesh_lib  # noqa: E402
from train.core import loop  # noqa: E402
from tests.parallel_worker import compare, config, params_of  # noqa: E402

# (mesh, overrides): `auto` attention is the latent-block core under context; c4 runs the fused core.
# c2, whose compiled all-gathers test_context reads, keeps the parameters whole over `context` (the
# default shards them over it, and on these tiny shapes XLA then gathers small activations instead
# of the smaller weights, which would hide what attention gathers); c2f2e2 runs the default rules, and
# so do the latent core on context=4 and 8 (2 tokens a slice) and context with tensor parallelism.
WHOLE_OVER_CONTEXT = [f"mesh.rules.{name}=[fsdp, expert, stage]" for name in ("embed", "q_lora", "kv_lora")]
MESHES = {"c2": (dict(context=2), WHOLE_OVER_CONTEXT), "c4": (dict(context=4), ["impl.attention=fused"]),
          "c2f2e2": (dict(data=1, fsdp=2, context=2, expert=2), []),
          "c4_latent": (dict(data=2, context=4), []), "c8": (dict(data=1, context=8), []),
          "c2f2t2": (dict(data=1, fsdp=2, context=2, tensor=2), []),
          "c2_ring": (dict(context=2, context_attention="ring"), []),
          "c4_ring": (dict(data=2, context=4, context_attention="ring"), []),
          "c8_ring": (dict(data=1, context=8, context_attention="ring"), []),
          "c2f2t2_ring": (dict(data=1, fsdp=2, context=2, tensor=2, context_attention="ring"), []),
          "c2f2e2_ring": (dict(data=1, fsdp=2, context=2, expert=2, context_attention="ring"), []),
          # the pipeline (1F1B, 4 micro-batches) with each sequence over context: 4 MoE layers on 2 stages
          "s2c2": (dict(stage=2, data=2, context=2), ["model.num_hidden_layers=5", "pipeline.microbatches=4"]),
          "s2c2_ring": (dict(stage=2, data=2, context=2, context_attention="ring"),
                        ["model.num_hidden_layers=5", "pipeline.microbatches=4"])}


def packed_batch(b=8, s=16, vocab=64, seed=0):
  """Rows of several documents whose edges fall inside context slices, then padding (segment 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, s + 1), dtype=np.int32)
  seg, pos = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
  for r in range(b):
    edges = [0, 3 + r % 4, 9 + r % 3, s - 2 * (r % 2)]  # documents [0, e1), [e1, e2), [e2, e3), then padding
    for d, (lo, hi) in enumerate(zip(edges, edges[1:]), start=1):
      seg[r, lo:hi], pos[r, lo:hi] = d, np.arange(hi - lo)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_mask": (seg > 0).astype(np.float32)}


def step(cfg, batch, hlo=False):
  """(metrics, params before, params after, all-gather result shapes of the compiled step or None)."""
  par = mesh_lib.Parallelism.from_config(cfg.mesh, jax.devices())
  state, train_step, *_ = loop.build(cfg, par)
  before = params_of(state)
  placed = loop.to_device(batch, par)
  gathers = None
  if hlo:  # the compiled step, run as it is (one compilation)
    train_step = train_step.lower(state, placed).compile()
    gathers = re.findall(r"= (\S+\[[\d,]*\])\S* all-gather(?:-start)?\(", train_step.as_text())
  state, metrics = train_step(state, placed)
  return jax.device_get(metrics), before, params_of(state), gathers


def ring_core():
  """{"exact": {context: max abs differences vs float64's dense formula}, "flops": {core: {fwd, grad}}}."""
  from types import SimpleNamespace

  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from moe import mla
  from moe.kernels import latent_attention, ring_attention
  from parallel import sharding
  from tests.test_latent_attention import C, H, NOPE, ROPE, V, dense
  from train import forecast

  def on(c, data):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:c * data]).reshape(1, data, 1, c, 1, 1), sharding.MESH_AXES)
    return SimpleNamespace(mesh=mesh, rules=sharding.resolve_rules(), context=c)

  exact = {}
  with jax.enable_x64(True):
    for c, data in ((2, 1), (3, 2), (4, 2)):
      par, b, s = on(c, data), 2, 24
      rng = np.random.default_rng(c)
      seg = np.zeros((b, s), np.int32)
      seg[0] = np.repeat([1, 2, 3], [7, 9, 8])  # three documents, edges inside and across the chunks
      seg[1, :17] = np.repeat([1, 2], [5, 12])  # two, then padding
      order = sharding.balanced_order(s, c)
      idx, seg = jnp.asarray(order), jnp.asarray(seg[:, order])
      args = [jnp.asarray(rng.standard_normal(x)) for x in ((b, s, H, NOPE + ROPE), (b, s, C), (b, s, ROPE), (C, H, NOPE + V))]
      cot = jnp.asarray(rng.standard_normal((b, s, H, V)))
      ring = lambda *a: ring_attention.attention(*a, idx, seg, 0.3, par, block=2)
      want = lambda *a: dense(*a, idx, idx, seg, seg, 0.3)
      grad = lambda f: jax.jit(jax.grad(lambda *a: (f(*a) * cot).sum(), argnums=(0, 1, 2, 3)))
      diffs = {"out": float(jnp.abs(jax.jit(ring)(*args) - want(*args)).max())}
      for name, g, w in zip(("q", "c_kv", "k_pe", "w_kv_b"), grad(ring)(*args), grad(want)(*args)):
        diffs[name] = float(jnp.abs(g - w).max())
      _, best = jax.jit(lambda *a: ring_attention.attention(*a, idx, seg, 0.3, par, block=2, with_max_logit=True))(*args)
      diffs["max_logit"] = float(jnp.abs(best - latent_attention.max_logit(*args, idx, idx, seg, seg, 0.3)).max())
      exact[c] = diffs

  c, b, s = 4, 2, 64  # FLOPs: context 4 x data 2, 8 tokens a chunk, key blocks of 8
  par = on(c, 2)
  order, seg = jnp.asarray(sharding.balanced_order(s, c)), jnp.ones((b, s), jnp.int32)
  struct = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(par.mesh, spec))
  rows = P("data", "context")
  shapes = (struct((b, s, H, NOPE + ROPE), rows), struct((b, s, C), rows), struct((b, s, ROPE), rows),
            struct((C, H, NOPE + V), P()))

  def gathered(q, c_kv, k_pe, w):
    c_kv, k_pe = mla.gather_latent(c_kv, k_pe[:, :, None], par)
    return latent_attention.attention(q, c_kv, k_pe[:, :, 0], w, order, order, seg, seg, 0.3, block=8, groups=c)

  cores = {"ring": lambda *a: ring_attention.attention(*a, order, seg, 0.3, par, block=8), "all_gather": gathered}
  flops = {}
  for name, f in cores.items():
    fns = {"fwd": f, "grad": jax.grad(lambda *a, f=f: f(*a).sum(), argnums=(0, 1, 2, 3))}
    flops[name] = {k: forecast.costs(jax.jit(g).lower(*shapes).compile().as_text(), forecast.chip_of("v5p")).flops["dot"]
                   for k, g in fns.items()}
  print(json.dumps({"exact": exact, "flops": flops}))


def main():
  if sys.argv[1] == "ring":
    return ring_core()
  assert jax.device_count() == 8
  batch = packed_batch()
  refs = {}  # the one-device step of each model (the pipelined meshes' has more layers)
  out = {"meshes": {}}
  for name, (mesh, extra) in MESHES.items():
    model = tuple(o for o in extra if o.startswith("model."))
    if model not in refs:
      refs[model] = step(config(dict(data=1), model), batch)[:3]
    ref_m, ref_before, ref_after = refs[model]
    m, before, after, gathers = step(config(mesh, extra), batch, hlo=name == "c2")
    out["meshes"][name] = compare((ref_before, ref_after, ref_m), before, after, m, None)
    out["meshes"][name]["ref"] = {k: float(v) for k, v in ref_m.items() if np.ndim(v) == 0}
    out["meshes"][name]["update_norm"] = float(np.sqrt(sum(((ref_after[k] - ref_before[k]) ** 2).sum()
                                                           for k in ref_before)))
    if gathers is not None:
      out["c2_gathers"] = gathers
  print(json.dumps(out))


if __name__ == "__main__":
  main()
