"""Subprocess side of tests/test_hf_pod.py: released weights loaded onto 8 simulated CPU devices.

  python tests/hf_worker.py single DIR              8 devices: DIR/{v3,v2,v3fp8} loaded onto meshes vs one
                                                    device; a first step from them; an export of the
                                                    8-device state (bf16 and FP8) and our logits of it
  python tests/hf_worker.py multi PORT ID N DIR     process ID of N (4 devices each): DIR/v3 onto all 8,
                                                    and exported again from there (DIR/exported_2proc)

XLA_FLAGS must be set before jax is imported, hence a separate process. Prints one JSON line.
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

from moe import hf  # noqa: E402
from parallel.mesh import MeshConfig, Parallelism  # noqa: E402
from train import export  # noqa: E402
from train.core import checkpoint as ckpt_lib  # noqa: E402
from train.core import model_io  # noqa: E402
from train.core import loop  # noqa: E402
from train.core.input_pipeline import synthetic_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"f4e2": MeshConfig(data=1, fsdp=4, expert=2), "f2e2t2": MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
          "all": MeshConfig(data=1, fsdp=-1)}


def variables(model) -> dict:
  return {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Variable))}


def sums(model) -> dict:
  """Per variable, gathered to the host: the float64 sum and sum of squares (comparable across processes)."""
  from jax.experimental import multihost_utils

  def host(v):
    return np.asarray(multihost_utils.process_allgather(v, tiled=True) if jax.process_count() > 1 else v, np.float64)

  return {k: [float((x := host(v)).sum()), float((x ** 2).sum())] for k, v in variables(model).items()}


def total_bytes(path) -> int:
  """The bytes of every tensor in the folder (the files less their headers)."""
  from pathlib import Path

  folder = hf.SafetensorsFolder(Path(path))
  return sum(folder.nbytes(n) for n in folder.names())


def train_config(path, run_dir):
  model = hf.config_of(path)
  return export.train_config_for_hf(model, run_dir, os.path.join(ROOT, "configs/tiny.yaml"),
                                    ["batch_size=8", "seq_len=16", "eval_every=0", "optimizer.warmup_steps=0"])


def first_loss(cfg, mesh: MeshConfig, path) -> tuple[float, dict]:
  par = Parallelism.from_config(mesh, jax.devices())
  state, step, *_ = loop.build(cfg, par, init_from=path)
  state, metrics = step(state, loop.to_device(synthetic_batch(8, 16, cfg.model.vocab_size, seed=1), par))
  return float(metrics["loss"]), state


def single(d) -> dict:
  out = {}
  for name in ("v3", "v2", "v3fp8"):
    path = os.path.join(d, name)
    one = hf.from_hf(path, dtype="float32")
    ref = {k: np.asarray(v) for k, v in variables(one).items()}
    entry = {"total_bytes": total_bytes(path), "single_read": one.loaded_bytes}
    for mesh in ("f4e2", "f2e2t2"):
      model = hf.from_hf(path, dtype="float32", par=Parallelism.from_config(MESHES[mesh], jax.devices()))
      got = variables(model)
      entry[mesh] = {"max_diff": max(float(np.abs(np.asarray(got[k]) - ref[k]).max()) for k in ref),
                     "sharded": sum(len(v.sharding.device_set) > 1 and not v.sharding.is_fully_replicated
                                    for v in got.values()), "read": model.loaded_bytes}
    if name == "v3":
      entry["sums"] = sums(one)
    out[name] = entry

  # the first step from the release, on one device and on 8 (init_from), and an export of the 8-device state
  path = os.path.join(d, "v3")
  cfg = train_config(path, os.path.join(d, "run"))
  out["loss_single"], _ = first_loss(cfg, MeshConfig(data=1, fsdp=1), path)
  out["loss_f4e2"], state = first_loss(cfg, MESHES["f4e2"], path)
  ckpt_lib.save_state(cfg.run_dir, 1, state, cfg)
  export.export(cfg.run_dir, os.path.join(d, "exported"))
  export.export(cfg.run_dir, os.path.join(d, "exported_fp8"), fp8=True)
  ours = model_io.load_model(ckpt_lib.step_dir(cfg.run_dir, 1))
  tokens = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (2, 13)).astype(np.int32)
  np.save(os.path.join(d, "tokens.npy"), tokens)
  np.save(os.path.join(d, "ours.npy"), np.asarray(ours(jnp.asarray(tokens))))
  return out


def multi(d) -> dict:
  path = os.path.join(d, "v3")
  model = hf.from_hf(path, dtype="float32", par=Parallelism.from_config(MESHES["all"]))
  hf.to_hf(model, os.path.join(d, "exported_2proc"), max_shard_bytes=100_000)  # both gather, process 0 writes
  return {"process": jax.process_index(), "devices": jax.device_count(), "read": model.loaded_bytes,
          "total_bytes": total_bytes(path), "sums": sums(model)}


if __name__ == "__main__":
  if MODE == "single":
    assert jax.device_count() == 8
    print(json.dumps(single(sys.argv[2])))
  else:
    print(json.dumps(multi(sys.argv[5])))
