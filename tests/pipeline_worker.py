"""Pipeline parallelism on 8 simulated CPU devices (run by tests/test_pipeline.py; prints one JSON line).

  python tests/pipeline_worker.py steps JOB...   the one-device step, then each JOB's pipelined step
  python tests/pipeline_worker.py checkpoint     save on one stage count, restore on others; eval

A JOB is `stage:schedule:extra,...`, e.g. `4:1f1b:mesh.expert=2,pipeline.microbatches=8`. The model
has 9 MoE layers (10 layers, one dense), so 4 stages x 2 repeats leave padding slots.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.processes import TINY, start_worker  # noqa: E402

start_worker({})  # (tests.processes.cpu_env: fast compiles into the session's compilation cache)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moe import hf  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from train.core import checkpoint as ckpt_lib  # noqa: E402
from train.core import model_io  # noqa: E402
from train.core import loop  # noqa: E402
from train.core.train_config import load_train_config  # noqa: E402
from train.core.input_pipeline import synthetic_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["model.num_hidden_layers=10"]  # 9 MoE layers: uneven over 4 stages x 2 repeats


def config(extra=()):
  return load_train_config(os.path.join(ROOT, "configs/tiny.yaml"), TINY + LAYERS + list(extra))


def job_config(job: str):
  stage, schedule, *extra = job.split(":")
  extra = extra[0].split(",") if extra and extra[0] else []
  over = [f"mesh.stage={stage}", f"pipeline.schedule={schedule}"] + extra  # (stage 1: no pipeline)
  if not any(e.startswith("mesh.data") for e in extra):  # the devices the other axes leave, else data=1
    over.append("mesh.data=1" if any(e.startswith(("mesh.fsdp", "mesh.expert")) for e in extra) else "mesh.data=-1")
  if schedule == "circular":
    over.append("pipeline.repeats=2")
  return config(over)


def canonical(tree, cfg, par):
  """{path: array} with the MoE stack in layer order (padding slots dropped)."""
  order = par.layout(cfg.model.num_moe_layers).layer_slot() if par is not None else slice(None)
  out = {}
  for p, v in jax.tree_util.tree_leaves_with_path(tree):
    k = jax.tree_util.keystr(p)
    a = np.asarray(jax.device_get(v))
    out[k] = a[order] if "moe_layers" in k else a
  return out


def test_batch():
  batch = synthetic_batch(8, 16, 64, seed=0)
  batch["loss_mask"][:, -3:] = 0  # some padding, as real batches have
  batch["segment_ids"][:, -3:] = 0
  return batch


def one_step(cfg):
  par = mesh_lib.Parallelism.from_config(cfg.mesh, jax.devices(), cfg.pipeline)
  state, train_step, *_ = loop.build(cfg, par)
  before = canonical(state["params"], cfg, par)
  state, metrics = train_step(state, loop.to_device(test_batch(), par))
  return jax.device_get(metrics), before, canonical(state["params"], cfg, par)


def max_diff(a: dict, b: dict) -> float:
  return max(float(np.abs(a[k] - b[k]).max()) for k in b)


def steps(jobs):
  """Each JOB's step against the one-device step of its precision (float32 unless the job sets one)."""
  refs, out = {}, {"ref": {}, "jobs": {}}
  for job in jobs:
    precision = next((e.split("=")[1] for e in job.replace(":", ",").split(",") if e.startswith("precision=")),
                     "float32")
    if precision not in refs:
      refs[precision] = one_step(config(["mesh.data=1", f"precision={precision}"]))
      out["ref"][precision] = {k: float(v) for k, v in refs[precision][0].items() if np.ndim(v) == 0}
    ref_m, ref_before, ref_after = refs[precision]
    ref_delta = {k: ref_after[k] - ref_before[k] for k in ref_before}
    m, before, after = one_step(job_config(job))
    delta = {k: after[k] - before[k] for k in before}
    out["jobs"][job] = {
        "precision": precision,
        "metrics": {k: float(v) for k, v in m.items() if np.ndim(v) == 0},
        "init_diff": max(float(np.abs(before[k] - ref_before[k]).max()) for k in before),
        "update_rel": max_diff(delta, ref_delta) / max(float(np.abs(d).max()) for d in ref_delta.values()),
        "update_rel_l2": float(np.sqrt(sum(((delta[k] - ref_delta[k]).astype(np.float64) ** 2).sum() for k in delta))
                               / np.sqrt(sum((d.astype(np.float64) ** 2).sum() for d in ref_delta.values()))),
        "update_scale": max(float(np.abs(d).max()) for d in ref_delta.values()),
        "load_max": np.asarray(m["expert_load_max"]).tolist(), "ref_load_max": np.asarray(ref_m["expert_load_max"]).tolist(),
    }
  return out


def checkpoint(tmp):
  """Two steps of `python -m train`'s loop at stage=2 circular (metrics.jsonl, the final checkpoint),
  then that checkpoint restored at stage=2 itself, at stage=1 and at stage=4 1f1b x expert=2: the
  parameters, moments and router biases in layer order equal across all three; the pipelined eval
  equals the one-device eval of the same weights; load_model gives the model in layer order."""
  base = ["model.vocab_size=260", "steps=2", f"run_dir={tmp}/run", "log_every=1", "eval_every=2", "eval_steps=1", "seq_len=64",
          "data_workers=0"]
  saved_cfg = job_config("2:circular:" + ",".join(base))
  loop.train(saved_cfg, progress=False, peak_flops=1e12)
  out = {"metrics": [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")], "restored": {}}
  batch = test_batch()
  states = {}
  for job in ("2:circular", "1:gpipe", "4:1f1b:mesh.expert=2"):
    cfg = job_config(job + ("," if job.count(":") == 2 else ":") + ",".join(base)) if not job.startswith("1:") \
        else config(["mesh.data=1", *base])
    par = mesh_lib.Parallelism.from_config(cfg.mesh, jax.devices(), cfg.pipeline)
    with ckpt_lib.Checkpoints(cfg) as ck:
      fresh, _, eval_step, *_ = loop.build(cfg, par)
      plan = {**ck.resume_plan(), "restore_data": False}  # (the weights only: no data iterator here)
      got = ck.restore(plan, fresh, None, par)
    states[job] = canonical({k: got[k] for k in ("params", "rest", "opt")}, cfg, par)
    out["restored"][job] = {"step": int(got["step"]),
                            "eval": [float(x) for x in jax.device_get(eval_step(got, loop.to_device(batch, par)))]}
  ref = states["2:circular"]
  for job, st in states.items():
    out["restored"][job]["equal"] = len(st) == len(ref) and all(np.array_equal(st[k], ref[k]) for k in ref)
  model = model_io.load_model(ckpt_lib.step_dir(f"{tmp}/run"))  # export / generate / eval read it in layer order
  loaded = canonical({"params": nnx.split(model, nnx.Param, ...)[1]}, saved_cfg, None)
  out["load_model_equal"] = len(loaded) > 0 and all(np.array_equal(v, ref[k]) for k, v in loaded.items())
  out["load_model_layers"] = int(model.moe_layers.depth)
  hf.to_hf(model, f"{tmp}/hf")  # released-weights format, then read straight into a pipelined layout
  par = mesh_lib.Parallelism.from_config(saved_cfg.mesh, jax.devices(), saved_cfg.pipeline)
  staged = hf.from_hf(f"{tmp}/hf", par=par)
  got = canonical({"params": nnx.split(staged, nnx.Param, ...)[1]}, saved_cfg, par)
  out["from_hf_equal"] = all(np.array_equal(v, ref[k]) for k, v in got.items())
  out["from_hf_slots"] = int(staged.moe_layers.depth)
  return out


def main():
  mode = sys.argv[1]
  result = steps(sys.argv[2:]) if mode == "steps" else checkpoint(sys.argv[2])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
