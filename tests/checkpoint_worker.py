"""Subprocess side of the mesh and multi-process tests in tests/test_checkpoint_runs.py.

  python tests/checkpoint_worker.py meshes RUN_DIR
      8 simulated CPU devices: saves a state (random values in every parameter, router bias and
      AdamW leaf, step 7) sharded as data=2 x fsdp=4, with a data iterator 3 batches in; restores it
      on fsdp=8, on one device and with each sequence over context=4 (x data=2, x fsdp=2), each with
      the shardings of the new mesh
  python tests/checkpoint_worker.py multi PORT ID N RUN_DIR save|restore
      process ID of N (4 devices each) on one data=2 x fsdp=4 mesh: `save` writes that state with
      every process's iterator (process ID reads its own share of the documents) and the batches
      that follow in RUN_DIR/expected_ID.npz; `restore` restores it with the same processes
  python tests/checkpoint_worker.py single RUN_DIR
      one process, 8 devices (fsdp=8): restores the multi-process checkpoint

Each prints one JSON line: whether every array came back bitwise equal with the new layout, and
whether the iterator continued with the next batches. XLA_FLAGS must be set before jax is
imported, hence a separate process.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.processes import start_worker  # noqa: E402

MODE = start_worker({"multi": 4})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moe.model import Transformer  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from parallel import sharding as sharding_lib  # noqa: E402
from train.core import checkpoint as ckpt_lib  # noqa: E402
from train.core import input_pipeline as data_lib  # noqa: E402
from train.core import optimizer as optimizer_lib  # noqa: E402
from train.core import step as step_lib  # noqa: E402
from train.core.train_config import load_train_config  # noqa: E402

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
  return jax.eval_shape(lambda: step_lib.init_state(Transformer(cfg.model, rngs=nnx.Rngs(0)), tx)[1])


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
  n = jax.process_count()
  return iter(data_lib.make_dataset("default", seq_len=cfg.seq_len, batch_size=cfg.batch_size // n, seed=seed,
                                    split="train", tokenizer=tok, process_index=jax.process_index(),
                                    process_count=n))


def equal_to_fill(got, abstract, shardings) -> bool:
  """Whether `got` (global arrays, any layout) equals random_state's values, compared on device (in
  several processes no process holds every array)."""
  want = random_state(abstract, shardings)
  same = jax.jit(lambda a, b: jnp.stack([jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]).all())
  return bool(jax.device_get(same(got, want)))


def save_at_7(cfg, state, par):
  """Save `state` as step 7 with the iterator 3 batches in; returns the 2 batches that follow."""
  it = batches(cfg, cfg.seed)
  for _ in range(3):
    next(it)
  with ckpt_lib.Checkpoints(cfg) as ck:
    ck.save(7, state, it, force=True, par=par)
  return [next(it) for _ in range(2)]


def resume(cfg, target, par):
  """(plan, restored state, the restored data iterator) of cfg's run directory."""
  with ckpt_lib.Checkpoints(cfg) as ck:
    plan = ck.resume_plan()
    it = batches(cfg, ck.data_seed)
    return plan, ck.restore(plan, target, it, par), it


def multi(run_dir, phase):
  """Save (or restore) the data=2 x fsdp=4 state with one iterator per process."""
  cfg = config(run_dir, dict(data=2, fsdp=4))
  abstract = abstract_state(cfg)
  target, par = target_for(cfg, abstract)
  shardings = jax.tree.map(lambda t: t.sharding, target)
  pid = jax.process_index()
  if phase == "save":
    nxt = save_at_7(cfg, random_state(abstract, shardings), par)
    np.savez(os.path.join(run_dir, f"expected_{pid}.npz"), **{f"{i}_{k}": v for i, b in enumerate(nxt) for k, v in b.items()})
    files = sorted(os.listdir(os.path.join(run_dir, "checkpoints", "7", "data")))
    print(json.dumps({"process": pid, "data_files": files}))
    return
  plan, got, it = resume(cfg, target, par)
  expected = np.load(os.path.join(run_dir, f"expected_{pid}.npz"))
  nxt = [next(it) for _ in range(2)]
  cont = all(np.array_equal(b[k], expected[f"{i}_{k}"]) for i, b in enumerate(nxt) for k in b)
  print(json.dumps({"process": pid, "step": plan["step"], "restore_data": plan["restore_data"],
                    "equal": equal_to_fill(got, abstract, shardings), "data_continues": cont}))


def single(run_dir):
  """Restore the two-process checkpoint in one process on fsdp=8: arrays equal, data restarted."""
  cfg = config(run_dir, dict(data=1, fsdp=8))
  abstract = abstract_state(cfg)
  target, par = target_for(cfg, abstract)
  plan, got, it = resume(cfg, target, par)
  first = next(it)
  fresh = next(batches(cfg, cfg.seed))
  print(json.dumps({"step": plan["step"], "restore_data": plan["restore_data"], "data_seed": plan["data_seed"],
                    "equal": equal_to_fill(got, abstract, jax.tree.map(lambda t: t.sharding, target)),
                    "new_order": not same_batch(first, fresh)}))


def same_batch(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def main():
  if MODE == "multi":
    return multi(sys.argv[5], sys.argv[6])
  if MODE == "single":
    return single(sys.argv[2])
  run_dir = sys.argv[2]
  assert jax.device_count() == 8
  save_cfg = config(run_dir, dict(data=2, fsdp=4))
  abstract = abstract_state(save_cfg)
  par = mesh_lib.Parallelism.from_config(save_cfg.mesh)
  shardings = sharding_lib.state_shardings(abstract, par.mesh, par.rules)
  state = random_state(abstract, shardings)
  saved = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(state)]
  expected = save_at_7(save_cfg, state, par)
  result = {"saved_mesh": ckpt_lib.validate_step_dir(ckpt_lib.checkpoint_dir(run_dir) / "7")["mesh"]}

  for name, mesh in (("fsdp8", dict(data=1, fsdp=8)), ("one_device", dict(data=1)),
                     ("context4", dict(data=2, context=4)), ("fsdp2_context4", dict(data=1, fsdp=2, context=4))):
    cfg = config(run_dir, mesh)
    target, par = target_for(cfg, abstract)
    plan, got, it2 = resume(cfg, target, par)
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
