"""Subprocess side of tests/test_parallel.py: runs with several (simulated) CPU devices.

  python tests/parallel_worker.py single JOB...     8 devices: the one-device step, then per JOB: a mesh
                                                    name (one step vs one device, shard shapes), three
                                                    (3 steps on d2f2e2), small_capacity, ragged,
                                                    ep_unit[_all] (the MoE dispatch alone), capacity
                                                    (which assignments the padded transport drops),
                                                    accumulate / accumulate_fp8 (2 micro-batches added
                                                    up in the layer stacks' backward, chunked loss),
                                                    accumulate_dropping (fb_overlap where the exchange
                                                    drops), fp8_rows
  python tests/parallel_worker.py multi PORT ID N   process ID of N (4 devices each): 3 steps, losses

XLA_FLAGS must be set before jax is imported, hence a separate process. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.processes import TINY, start_worker  # noqa: E402

MODE = start_worker({"multi": 4})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe.experts import DISPATCH_AXES  # noqa: E402
from moe.kernels.expert_ffn import EXPERTS  # noqa: E402
from parallel import expert_parallel  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from parallel import sharding as sharding_lib  # noqa: E402
from parallel.mesh import MeshConfig  # noqa: E402
from train.core import loop  # noqa: E402
from train.core.input_pipeline import synthetic_batch  # noqa: E402
from train.core.train_config import load_train_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "expert8": dict(data=1, expert=8),
    "d2f2e2": dict(data=2, fsdp=2, expert=2),
    "f2e2t2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def config(mesh: dict, extra=()):
  over = TINY + [f"mesh.{k}={v}" for k, v in mesh.items()] + list(extra)
  return load_train_config(os.path.join(ROOT, "configs/tiny.yaml"), over)


def params_of(state):
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in
          jax.tree_util.tree_leaves_with_path(state["params"])}


def one_step(cfg, batch):
  """(metrics, initial params, updated params, shard report) of one step."""
  par = mesh_lib.Parallelism.from_config(cfg.mesh, jax.devices())
  state, train_step, *_ = loop.build(cfg, par)
  before = params_of(state)
  shards = shard_report(state, par) if par.mesh.size > 1 else None
  state, metrics = train_step(state, loop.to_device(batch, par))
  return jax.device_get(metrics), before, params_of(state), shards


def shard_report(state, par):
  """Per parameter: global shape, spec, and whether every shard is 1/N along its sharded dims."""
  sizes = dict(par.mesh.shape)
  out, n_sharded = [], 0
  for path, v in jax.tree_util.tree_leaves_with_path(state["params"]):
    spec = tuple(v.sharding.spec) + (None,) * (v.ndim - len(v.sharding.spec))
    want = []
    for dim, entry in zip(v.shape, spec):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      want.append(dim // int(np.prod([sizes[a] for a in axes])) if axes else dim)
    ok = all(tuple(s.data.shape) == tuple(want) for s in v.addressable_shards)
    n_sharded += any(e is not None for e in spec)
    out.append({"name": jax.tree_util.keystr(path), "shape": list(v.shape), "spec": str(spec), "ok": ok})
  return {"params": out, "n_sharded": n_sharded, "n_params": len(out)}


def three_steps(cfg, first_batch=None):
  """Losses of 3 steps on synthetic batches (process-local rows with several processes), and the
  parameters before and after the first step."""
  par = mesh_lib.Parallelism.from_config(cfg.mesh)
  state, train_step, *_ = loop.build(cfg, par)
  losses, snaps = [], [params_of(state)]
  for i in range(3):
    batch = first_batch if i == 0 else synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size, 100 + i)
    if jax.process_count() > 1:  # this process's rows of the global batch
      shape = (cfg.batch_size, cfg.seq_len)
      rows = sharding_lib.process_rows(sharding_lib.batch_sharding(par.mesh, shape, par.rules), shape)
      batch = {k: v[rows] for k, v in batch.items()}
    state, m = train_step(state, loop.to_device(batch, par, cfg.batch_size))
    losses.append(float(m["loss"]))
    if i == 0:
      snaps.append(params_of(state))
  return losses, snaps


# 2 micro-batches, their gradients added up inside the layer stacks' backward scans (remat full or
# full_offload: moe/decoder.py accumulating) and the loss head run 4 tokens at a time (moe/model.py
# LOSS_CHUNK; whole under context): per mesh, its overrides
ACCUMULATE = {
    "d2f2e2": (MESHES["d2f2e2"], ["impl.remat_policy=full"]),
    "f2e2t2_ragged_offload": (MESHES["f2e2t2"], ["impl.remat_policy=full_offload", "mesh.ep_transport=ragged"]),
    "f2c2e2": (dict(data=1, fsdp=2, context=2, expert=2), ["impl.remat_policy=full"]),
    "f2e2t2_vocab_parallel": (MESHES["f2e2t2"], ["impl.remat_policy=full", "mesh.vocab_parallel=true"]),
    "f2c2e2_vocab_parallel": (dict(data=1, fsdp=2, context=2, expert=2), ["impl.remat_policy=full",
                                                                           "mesh.vocab_parallel=true"]),
    # micro-batch 2's forward beside micro-batch 1's backward (train/core/overlapped.py), the dropless
    # two-level exchange with its fast path and halves; and under context parallelism
    "f2e2t2_fb_overlap": (MESHES["f2e2t2"], ["impl.remat_policy=full", "impl.fb_overlap=true", "mesh.ep_transport=ragged",
                                             "mesh.ep_nodes=2", "mesh.ep_fast_path=1.5", "mesh.ep_overlap=true"]),
    "f2c2e2_fb_overlap": (dict(data=1, fsdp=2, context=2, expert=2), ["impl.remat_policy=full", "impl.fb_overlap=true"]),
}
# fb_overlap where the exchange drops: the padded transport at capacity factor 0.5 with greedy routing,
# against the same mesh under autodiff (the recomputed layer must drop what its forward dropped)
DROPPING = {"d2f2e2_fb_overlap_dropping": (MESHES["d2f2e2"], ["impl.remat_policy=full", "impl.fb_overlap=true"])}


def fp8_rows():
  """The linears' FP8 GEMM with the Pallas kernels (in the interpreter) run per device's rows
  (parallel.sharding.per_row_block, as moe.layers.Linear runs them on a mesh) against the same GEMM
  on all rows at once: relative differences of y, dx and dW, and the collectives of the per-device
  step. 128 rows a device, so each device's rows are whole 128-token Wgrad tiles, the same tiles as
  on one device; the weight [256, 384] ("embed", "mlp") split over fsdp x expert as the rules say."""
  from jax.sharding import NamedSharding

  from moe.kernels import fp8 as fp8_lib
  from train import hlo_parse

  par = mesh_lib.Parallelism.from_config(MeshConfig(data=2, fsdp=2, expert=2), jax.devices())
  recipe = fp8_lib.Recipe(gemm="kernels", interpret=True)
  x = jax.random.normal(jax.random.key(0), (8, 128, 256), jnp.float32)
  axes = ("embed", "mlp")
  w = jax.random.normal(jax.random.key(1), (256, 384), jnp.float32) * 0.05
  w = jax.device_put(w, NamedSharding(par.mesh, sharding_lib.logical_to_spec(axes, w.shape, dict(par.mesh.shape))))
  t = jax.random.normal(jax.random.key(2), (8, 128, 384), jnp.float32)
  gemm = lambda x, w: fp8_lib.linear(x, w, recipe)
  run = {"whole": gemm, "per_device": lambda x, w: sharding_lib.per_row_block(gemm, x, w, par, axes)}
  out = {}
  for name, fn in run.items():
    f = jax.jit(lambda x, w, fn=fn: jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * t), argnums=(0, 1))(x, w))
    (_, (dx, dw)), y = f(x, w), jax.jit(fn)(x, w)
    out[name] = (np.asarray(y), np.asarray(dx), np.asarray(dw))
  hlo = f.lower(x, w).compile().as_text()
  shapes = lambda op: sorted({i.shape for i in hlo_parse.parse(hlo).instrs.values() if i.op == op})
  rel = lambda a, b: float(np.abs(a - b).max() / np.abs(a).max())
  return {**{k: rel(a, b) for k, a, b in zip(("y", "dx", "dw"), out["whole"], out["per_device"])},
          **{op: shapes(op) for op in ("reduce-scatter", "all-reduce")}}


def accumulate(meshes, extra=(), ref_mesh=dict(data=1), chunk=4, table=ACCUMULATE):
  """Per mesh of `table` (ACCUMULATE; with `extra` overrides) one step vs the step of the same 2 micro-batches
  under autodiff (remat none, the head on whole sequences) on `ref_mesh`, and how often the
  accumulating layer scan and the chunked loss (`chunk`-token chunks) were traced."""
  from moe import decoder, model as model_lib
  from train.core import loss as loss_lib
  batch, extra = test_batch(), ["grad_accum=2", *extra]
  ref_m, ref_before, ref_after, _ = one_step(config(ref_mesh, extra), batch)
  out = {"ref": {k: float(v) for k, v in ref_m.items() if np.ndim(v) == 0}}
  traced = {"accumulating": 0, "chunks": [], "on_tokens": []}
  scan, chunked, shipped = decoder.accumulating, loss_lib.token_nlls, model_lib.LOSS_CHUNK
  on_tokens = loss_lib.tokens_with_weight
  decoder.accumulating = lambda *a, **k: traced.__setitem__("accumulating", traced["accumulating"] + 1) or scan(*a, **k)
  loss_lib.token_nlls = lambda ds, ts: traced["chunks"].extend(d.chunks for d in ds) or chunked(ds, ts)
  # whether the chunked heads ran on each device's tokens with the weight gathered once (or XLA's partitioning)
  loss_lib.tokens_with_weight = lambda *a: (lambda r: traced["on_tokens"].append(r is not None) or r)(on_tokens(*a))
  model_lib.LOSS_CHUNK = chunk
  try:
    for name in meshes:
      mesh, over = table[name]
      traced.update(accumulating=0, chunks=[], on_tokens=[])
      m, before, after, _ = one_step(config(mesh, [*extra, *over]), batch)
      out[name] = {**compare((ref_before, ref_after, ref_m), before, after, m, None),
                   "accumulating": traced["accumulating"], "chunks": traced["chunks"], "on_tokens": traced["on_tokens"]}
  finally:
    decoder.accumulating, loss_lib.token_nlls, model_lib.LOSS_CHUNK = scan, chunked, shipped
    loss_lib.tokens_with_weight = on_tokens
  return out


def max_diff(a: dict, b: dict) -> float:
  return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_batch():
  batch = synthetic_batch(8, 16, 64, seed=0)
  batch["loss_mask"][:, -3:] = 0  # some padding, as real batches have
  batch["segment_ids"][:, -3:] = 0
  return batch


def compare(ref, before, after, metrics, shards):
  ref_before, ref_after, ref_m = ref
  delta = {k: after[k] - before[k] for k in before}
  ref_delta = {k: ref_after[k] - ref_before[k] for k in ref_before}
  return {"metrics": {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0},
          "init_diff": max_diff(before, ref_before), "update_diff": max_diff(delta, ref_delta),
          "update_scale": max(float(np.abs(v).max()) for v in ref_delta.values()), "shards": shards}


def routing(t=64, e=8, k=3, d=16, f=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, d)).astype(np.float32)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
  gate, up = ((rng.standard_normal((e, d, f)) * 0.3).astype(np.float32) for _ in range(2))
  down = (rng.standard_normal((e, f, d)) * 0.3).astype(np.float32)
  return x, idx, w, gate, up, down


def layer(par, impl):
  """The routed experts of one MoE layer through parallel.expert_parallel with the grouped matmul `impl`."""
  expert_fn = EXPERTS[impl]
  return lambda x, idx, w, gate, up, down: expert_parallel.dispatch_combine(
      x, idx, w, (gate, up, down), DISPATCH_AXES, expert_fn, par)


def ep_unit(meshes=("d2f2e2", "f2e2t2")):
  """parallel.expert_parallel on meshes vs the one-device layer (outputs and gradients), with the
  GPU/TPU grouped matmul (ragged_dot on sorted rows) and the CPU one (blocked), both transports."""
  x, idx, w, gate, up, down = routing()
  loss = lambda fn: lambda *a: (fn(a[0], idx, w, *a[1:])[0] ** 2).sum()
  single = layer(None, "ragged_dot")
  want = single(x, idx, w, gate, up, down)[0]
  want_g = jax.grad(loss(single), argnums=(0, 1, 2, 3))(x, gate, up, down)
  out = {}
  for mesh in meshes:
    for transport in ("padded", "ragged"):
      for impl in ("ragged_dot", "blocked"):
        par = mesh_lib.Parallelism.from_config(MeshConfig(**MESHES[mesh], ep_transport=transport))
        fn = layer(par, impl)
        y, dropped, _ = jax.jit(fn)(x, idx, w, gate, up, down)
        g = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3)))(x, gate, up, down)
        out[f"{mesh}/{par.ep_transport}/{impl}"] = {
            "y": abs_err(y, want), "grad": max(map(abs_err, g, want_g)),
            "dropped": int(dropped)}
  return out


def abs_err(got, want) -> float:
  """max |got - want| in numpy, NaN as infinity (a max reduction over a sharded array holding NaNs gave
  -inf on XLA:CPU, which passed `err < tol`)."""
  err = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
  return err if np.isfinite(err) else float("inf")


def capacity_drops(capacity_factor=0.5):
  """The padded transport on expert=8 with a capacity below the load: which assignments are dropped
  (per source and destination rank, those past the first C in (token, k) order), that they add exactly
  nothing, and the count. Reference: the one-device layer with the dropped assignments' weights zero."""
  x, idx, w, gate, up, down = routing()
  n_ep, t, k = 8, x.shape[0], idx.shape[1]
  e_local, t_local = gate.shape[0] // n_ep, t // n_ep
  c = expert_parallel.capacity(t_local, k, n_ep, e_local, capacity_factor)
  keep = np.zeros_like(idx, bool)
  for src in range(n_ep):  # the tokens of each source rank, in order
    sent = np.zeros(n_ep, int)
    for tok in range(src * t_local, (src + 1) * t_local):
      for j in range(k):
        dest = idx[tok, j] // e_local
        keep[tok, j] = sent[dest] < c
        sent[dest] += 1
  par = mesh_lib.Parallelism.from_config(MeshConfig(**MESHES["expert8"], ep_transport="padded",
                                                    capacity_factor=capacity_factor))
  y, dropped, _ = jax.jit(layer(par, "blocked"))(x, idx, w, gate, up, down)
  want = layer(None, "ragged_dot")(x, idx, np.where(keep, w, 0.0), gate, up, down)[0]
  full = layer(None, "ragged_dot")(x, idx, w, gate, up, down)[0]
  slot, kept = expert_parallel.padded_slots(jnp.asarray(idx[:t_local].reshape(-1) // e_local), n_ep, c)
  return {"capacity": c, "dropped": int(dropped), "want_dropped": int((~keep).sum()),
          "y": abs_err(y, want), "vs_dropless": abs_err(y, full),
          "slots_rank0": np.asarray(kept).tolist() == keep[:t_local].reshape(-1).tolist()}


def main():
  if MODE == "multi":  # the data axis across the 2 processes (hybrid mesh, process = granule)
    cfg = config(MESHES["d2f2e2"], ["mesh.dcn_data=2"])
    losses, _ = three_steps(cfg, test_batch())
    mesh = mesh_lib.make_mesh(cfg.mesh)
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index("data"), 0)  # [data, ...]
    layout = [sorted({d.process_index for d in devices[i].flat}) for i in range(devices.shape[0])]
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses,
                      "data_axis_processes": layout}))
    return
  assert jax.device_count() == 8
  jobs = sys.argv[2:]
  batch = test_batch()
  result = {"meshes": {}}
  refs = []

  def ref():  # the one-device step, when a job first needs it
    if not refs:
      ref_m, ref_before, ref_after, _ = one_step(config(dict(data=1)), batch)
      refs.append((ref_before, ref_after, ref_m))
      result["ref"] = {k: float(v) for k, v in ref_m.items() if np.ndim(v) == 0}
    return refs[0]

  compare_later = []
  for job in jobs:
    if job == "three":  # mesh d2f2e2: 3 steps (the multi-process reference); step 1 vs one device
      cfg = config(MESHES["d2f2e2"])
      result["three_steps"], (before, after) = three_steps(cfg, batch)
      result["meshes"]["d2f2e2"] = compare(ref(), before, after, {"loss": result["three_steps"][0]}, None)
    elif job in MESHES:  # (compared at the end: the other worker compiles the reference meanwhile)
      m, before, after, shards = one_step(config(MESHES[job]), batch)
      compare_later.append((job, before, after, m, shards))
    elif job == "ep_unit":
      result[job] = ep_unit(("d2f2e2",))
    elif job == "ep_unit_all":
      result[job] = ep_unit(("f2e2t2", "expert8", "fsdp8"))  # (d2f2e2: job ep_unit)
    elif job == "capacity":
      result[job] = capacity_drops()
    elif job == "accumulate":
      result[job] = accumulate(ACCUMULATE)
    elif job == "accumulate_fp8":
      # FP8 on a mesh rounds other rows together than on one device (docs/fp8.md): against d2f2e2.
      # The head is never FP8 and whole here: chunks change its gradient by float32 ulps, which the
      # layers' FP8 roundings then amplify (measured 0.4% of the update)
      result[job] = accumulate(["d2f2e2"], ["precision=fp8"], MESHES["d2f2e2"], chunk=1024)
    elif job == "accumulate_dropping":
      result[job] = accumulate(DROPPING, ["mesh.capacity_factor=0.5", "model.topk_method=greedy"], MESHES["d2f2e2"],
                               table=DROPPING)
    elif job == "fp8_rows":
      result[job] = fp8_rows()
    elif job == "small_capacity":
      m, *_ = one_step(config(MESHES["expert8"], ["mesh.capacity_factor=0.5"]), batch)
      result[job] = {"dropped_tokens": int(m["dropped_tokens"]), "loss": float(m["loss"])}
    elif job == "ragged":
      m, before, after, _ = one_step(config(MESHES["d2f2e2"], ["mesh.ep_transport=ragged"]), batch)
      result[job] = compare(ref(), before, after, m, None)
    else:
      raise SystemExit(f"unknown job {job}")
  for job, before, after, m, shards in compare_later:
    result["meshes"][job] = compare(ref(), before, after, m, shards)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
