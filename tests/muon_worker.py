"""Subprocess side of tests/test_muon.py's mesh test: one Muon + QK-clip step of the TINY model on 8
simulated devices (fsdp 2 x expert 2 x tensor 2; and through a 2-stage 1F1B pipeline, stage 2 x fsdp
2 x expert 2, 4 layers: 3 MoE layers in 4 slots) and on one; prints one JSON line with the parameter
updates' difference and size (largest entry, norm over all parameters) and the max logits. XLA_FLAGS
must be set before jax is imported, hence a separate process:  python tests/muon_worker.py single"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.processes import TINY, start_worker  # noqa: E402

start_worker({})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from parallel import mesh as mesh_lib  # noqa: E402
from parallel import sharding as sharding_lib  # noqa: E402
from parallel.mesh import MeshConfig  # noqa: E402
from train.core import loop, muon  # noqa: E402
from train.core.train_config import OptimizerConfig, TrainConfig, load_train_config  # noqa: E402
from train.core.optimizer import make_optimizer  # noqa: E402
from train.core.input_pipeline import synthetic_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lr 0.01: Muon's update is ~0.2 lr per entry whatever the gradient's size; QK-clip engaged (tau between
# the tiny model's initial max logits, 0.026 to 0.036 over its three MLA layers)
MUON = ["optimizer.name=muon", "optimizer.lr=0.01", "optimizer.qk_clip_threshold=0.03"]


PIPELINE = ["model.num_hidden_layers=4", "pipeline.schedule=1f1b", "pipeline.microbatches=4"]


def update(mesh: dict, devices, batch, extra=()):
  """(the parameters' update, whether each is Muon's, the max logits, the loss) of one step; a
  pipelined stack's slots in layer order."""
  cfg = load_train_config(os.path.join(ROOT, "configs/tiny.yaml"),
                          TINY + MUON + list(extra) + [f"mesh.{k}={v}" for k, v in mesh.items()])
  par = mesh_lib.Parallelism.from_config(cfg.mesh, devices)
  state, train_step, *_ = loop.build(cfg, par)
  order = par.layout(cfg.model.num_moe_layers).layer_slot()
  leaves = lambda tree: [np.asarray(x)[order] if "moe_layers" in jax.tree_util.keystr(p) else np.asarray(x)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)]
  before = leaves(state["params"])
  state, m = train_step(state, loop.to_device(batch, par))
  after = leaves(state["params"])
  muon_leaves = [x == "muon" for x in jax.tree.leaves(muon.labels(state["params"]))]
  return [a - b for a, b in zip(after, before)], muon_leaves, np.asarray(m["max_logit"]), float(m["loss"])


def optimizer_alone(par, dtype=jnp.float32):
  """Two Muon updates of hand-made stacked parameters (layers x experts, layers, one matrix, a norm
  scale) in `dtype`, laid out on `par`'s mesh (None: one device), from the same gradients."""
  rng = np.random.default_rng(0)
  shapes = {"experts": ((2, 8, 32, 16), ("stage_layers", "expert", "embed", "moe_mlp")),
            "attention": ((3, 32, 64), ("layers", "embed", "heads")), "matrix": ((32, 48), ("embed", "mlp")),
            "scale": ((32,), ("norm",))}
  make = lambda: nnx.State({k: nnx.Param(jnp.asarray(rng.standard_normal(s), dtype), axes=a)
                            for k, (s, a) in shapes.items()})
  params, grads = make(), [make(), make()]
  cfg = TrainConfig(optimizer=OptimizerConfig(name="muon", moment_dtype="float32"))
  tx = make_optimizer(cfg, lambda t: 0.1, par)
  if par is not None:
    put = lambda tree: jax.device_put(tree, sharding_lib.state_shardings(tree, par.mesh, par.rules))
    params, grads = put(params), [put(g) for g in grads]
  state, out = jax.jit(tx.init)(params), []
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, params)
    out += [np.asarray(x) for x in jax.tree.leaves(updates)]
  return out


def norm(xs) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in xs)))


def main():
  assert jax.device_count() == 8
  batch = synthetic_batch(8, 16, 64, seed=0)
  mesh = dict(data=1, fsdp=2, expert=2, tensor=2)
  ref, is_muon, ref_logit, ref_loss = update(dict(data=1), jax.devices()[:1], batch)
  got, _, logit, loss = update(mesh, jax.devices(), batch)
  alone_ref = optimizer_alone(None)
  alone = optimizer_alone(mesh_lib.Parallelism.from_config(MeshConfig(**mesh), jax.devices()))
  pick = lambda xs, want, is_muon: [x for x, m in zip(xs, is_muon) if m == want]

  def against(ref, is_muon, ref_logit, ref_loss, got, logit, loss):
    diff = [a - b for a, b in zip(got, ref, strict=True)]
    return {"update_scale": max(float(np.abs(a).max()) for a in ref),
            "muon_diff_norm": norm(pick(diff, True, is_muon)), "muon_norm": norm(pick(ref, True, is_muon)),
            "adamw_diff_norm": norm(pick(diff, False, is_muon)), "adamw_norm": norm(pick(ref, False, is_muon)),
            "logit_diff": float(np.abs(logit - ref_logit).max()), "max_logit": ref_logit.tolist(),
            "loss": [ref_loss, loss]}

  # the same in float64 (Newton-Schulz then runs in float64; the momentum is still stored in float32,
  # alike on both sides): what is left is the layout's arithmetic, not float32's reduction order
  jax.config.update("jax_enable_x64", True)
  alone64 = [optimizer_alone(p, jnp.float64) for p in (None, mesh_lib.Parallelism.from_config(MeshConfig(**mesh),
                                                                                              jax.devices()))]
  jax.config.update("jax_enable_x64", False)
  pipe_ref = update(dict(data=1), jax.devices()[:1], batch, PIPELINE)
  pipe = update(dict(data=1, stage=2, fsdp=2, expert=2), jax.devices(), batch, PIPELINE)
  print(json.dumps({"alone_diff_norm": norm([a - b for a, b in zip(alone, alone_ref)]), "alone_norm": norm(alone_ref),
                    "alone64_diff_norm": norm([a - b for a, b in zip(*alone64)]), "alone64_norm": norm(alone64[0]),
                    "alone64_dtypes": sorted({str(x.dtype) for x in alone64[1]}),
                    **against(ref, is_muon, ref_logit, ref_loss, got, logit, loss),
                    "pipeline": against(*pipe_ref, *[pipe[i] for i in (0, 2, 3)])}))


if __name__ == "__main__":
  main()
