"""Subprocess side of tests/test_checkpoint_runs.py::test_restore_onto_other_meshes (8 simulated CPU devices).

  python tests/checkpoint_worker.py RUN_DIR

Saves a state (random values in every parameter, router bias and AdamW leaf, step 7) sharded as
data=2 x fsdp=4, with a data iterator 3 batches in; restores it on fsdp=8 and on one device, each
with the shardings of the new mesh, and reports (one JSON line) whether every array came back
bitwise equal with the new layout and whether the iterator continued with the next batches.
XLA_FLAGS must be set before jax is imported, hence a separate process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moe.model import Transformer  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from parallel import sharding as sharding_lib  # noqa: E402
from train import checkpoint as ckpt_lib  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import loop  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import step as step_lib  # noqa: E402
from train.config import load_train_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.vocab_size=260", "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
        "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.q_lora_rank=16", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=8",
        "seq_len=16", "batch_size=8", "eval_every=0"]


def config(run_dir, mesh: dict):
  return load_train_config(os.path.join(ROOT, "configs/tiny.yaml"),
                           TINY + [f"run_dir={run_dir}"] + [f"mesh.{k}={v}" for k, v in mesh.items()])


def abstract_state(cfg):
  tx = optimizer_lib.make_optimizer(cfg, optimizer_lib.make_schedule(cfg))
  model_cfg = loop.model_config(cfg)
  return jax.eval_shape(lambda: step_lib.init_state(Transformer(model_cfg, rngs=nnx.Rngs(0)), tx)[1])


def target_for(cfg, abstract):
  """(abstract state with the new mesh's shardings, Parallelism), as build() would lay it out."""
  par = mesh_lib.Parallelism.from_config(cfg.mesh)
  if par.mesh.size == 1:
    return abstract, par  # Checkpoints.restore gives it the one-device mesh's replicated sharding
  shardings = sharding_lib.state_shardings(abstract, par.mesh, par.rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), par


def random_state(abstract, shardings):
  def fill():
    leaves, treedef = jax.tree.flatten(abstract)
    out = []
    for i, leaf in enumerate(leaves):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        out.append(jax.random.normal(jax.random.key(i), leaf.shape, jnp.float32).astype(leaf.dtype))
      else:
        out.append(jnp.full(leaf.shape, 7, leaf.dtype))
    return treedef.unflatten(out)

  return jax.jit(fill, out_shardings=shardings)()


def batches(cfg, seed):
  tok = data_lib.load_tokenizer("byte")
  return iter(data_lib.make_dataset("default", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=seed,
                                    split="train", tokenizer=tok))


def same_batch(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def main():
  run_dir = sys.argv[1]
  assert jax.device_count() == 8
  save_cfg = config(run_dir, dict(data=2, fsdp=4))
  abstract = abstract_state(save_cfg)
  par = mesh_lib.Parallelism.from_config(save_cfg.mesh)
  shardings = sharding_lib.state_shardings(abstract, par.mesh, par.rules)
  state = random_state(abstract, shardings)
  saved = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(state)]
  it = batches(save_cfg, save_cfg.seed)
  for _ in range(3):
    next(it)
  with ckpt_lib.Checkpoints(save_cfg) as ck:
    ck.save(7, state, it, force=True, par=par)
  expected = [next(it) for _ in range(2)]
  result = {"saved_mesh": ckpt_lib.validate_step_dir(ckpt_lib.checkpoint_dir(run_dir) / "7")["mesh"]}

  for name, mesh in (("fsdp8", dict(data=1, fsdp=8)), ("one_device", dict(data=1))):
    cfg = config(run_dir, mesh)
    target, par = target_for(cfg, abstract)
    with ckpt_lib.Checkpoints(cfg) as ck:
      plan = ck.resume_plan()
      it2 = batches(cfg, ck.data_seed)
      got = ck.restore(plan, target, it2, par)
    leaves = jax.tree.leaves(got)
    want_shardings = jax.tree.leaves(ckpt_lib.abstract_like(target, par))
    sharded = 0
    for x, w in zip(leaves, want_shardings, strict=True):
      assert x.sharding.is_equivalent_to(w.sharding, x.ndim), (x.sharding, w.sharding)
      sharded += any(s is not None for s in x.sharding.spec)
    shards_ok = all(len(x.addressable_shards) == par.mesh.size for x in leaves)
    result[name] = {
        "step": plan["step"],
        "equal": all(np.array_equal(np.asarray(jax.device_get(x)), y) for x, y in zip(leaves, saved, strict=True)),
        "n_arrays": len(leaves), "n_sharded": sharded, "devices": par.mesh.size, "shards_ok": shards_ok,
        "data_continues": all(same_batch(next(it2), e) for e in expected),
    }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
