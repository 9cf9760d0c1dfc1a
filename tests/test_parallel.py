"""parallel/: mesh and sharding rules (in process), and multi-device training on simulated CPU devices.

The multi-device tests run tests/parallel_worker.py in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX starts), so this pytest process
stays single-device. A training step of a tiny model (float32, dropless) on each mesh of issue #4
(data=8, fsdp=8, expert=8, data=2 x fsdp=2 x expert=2, fsdp=2 x expert=2 x tensor=2; padded
all-to-all, and the ragged transport with its CPU stand-in) must reproduce the one-device loss and
parameter update; two processes x 4 devices must reproduce the one-process 8-device losses.
"""

import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel.common.errors import ConfigError
from parallel import distributed, expert_parallel, mesh as mesh_lib, sharding
from parallel.mesh import MeshConfig
from tests.processes import TINY, cpu_env, free_port, last_json, run_together
from train.core import loop
from train.core.train_config import load_train_config

WORKER = Path(__file__).with_name("parallel_worker.py")
ROOT = WORKER.parent.parent


# ------------------------------------------------------------------ in process (one device)
def test_simulated_cpu_devices_get_room_in_the_thread_pool(monkeypatch):
  """8 simulated devices: PJRT_NPROC = 32 (parallel.distributed.cpu_threads: collectives waiting on
  one device's thread cannot starve it); one device or a PJRT_NPROC already set: left alone."""
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8")
  distributed.cpu_threads()
  assert os.environ["PJRT_NPROC"] == "32"
  monkeypatch.setenv("PJRT_NPROC", "5")
  distributed.cpu_threads()
  assert os.environ["PJRT_NPROC"] == "5"
  monkeypatch.delenv("PJRT_NPROC")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  distributed.cpu_threads()
  assert "PJRT_NPROC" not in os.environ


def test_gpu_hosts_give_jax_the_memory_train_aot_checks_against(monkeypatch):
  """On a GPU host JAX's allocator gets GPU_MEMORY_FRACTION (0.9) of each GPU's memory, not JAX's
  default 75% (V3's layouts on h100x256 peak at 59-79 GiB a GPU, which train.aot found to fit in the
  79.1 GiB the device description gives), and train.aot checks a GPU step against that share; a
  fraction or an allocator the user chose is left alone (jax refuses both fraction variables at once)."""
  from parallel import targets
  variables = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")
  for v in variables:  # (empty: unset for jax and select_platform, and restored after the test)
    monkeypatch.setenv(v, "")
  monkeypatch.setattr(distributed, "host_accelerator", lambda: None)
  distributed.select_platform()
  assert not any(os.environ[v] for v in variables)
  monkeypatch.setattr(distributed, "host_accelerator", lambda: "gpu")
  distributed.select_platform()
  assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.9" == str(distributed.GPU_MEMORY_FRACTION)
  for v, value in (("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5"), ("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")):
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "")
    monkeypatch.setenv(v, value)
    distributed.select_platform()
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "" and os.environ[v] == value
    monkeypatch.setenv(v, "")
  described = int(re.search(r"device_memory_size:\s*(\d+)", (targets.GPU_SPECS / "h100.txtpb").read_text()).group(1))
  assert targets.parse("h100x8").hbm_bytes == 0.9 * described and targets.parse("v5p-8").hbm_bytes == 95.74 * 2**30


def test_axis_sizes_and_errors():
  assert mesh_lib.axis_sizes(MeshConfig(data=-1, fsdp=2, expert=2), 8) == dict(stage=1, data=2, fsdp=2, context=1,
                                                                                expert=2, tensor=1)
  assert mesh_lib.axis_sizes(MeshConfig(stage=2, data=-1, expert=2), 8)["data"] == 2
  assert mesh_lib.axis_sizes(MeshConfig(data=2, fsdp=2, expert=2, tensor=1), 8)["data"] == 2
  with pytest.raises(ConfigError, match=r"mesh stage=1 x data=3 x fsdp=1 x context=1 x expert=1 x tensor=1 needs 3 devices.*8 devices"):
    mesh_lib.axis_sizes(MeshConfig(data=3), 8)
  with pytest.raises(ConfigError, match=r"fixed axes \(3 devices\) do not divide the 8 devices"):
    mesh_lib.axis_sizes(MeshConfig(data=-1, fsdp=3), 8)
  with pytest.raises(ConfigError, match=r"needs 16 devices"):
    mesh_lib.axis_sizes(MeshConfig(data=4, fsdp=4), 8)
  for e in (ConfigError,):
    with pytest.raises(e):
      MeshConfig(data=-1, fsdp=-1)


def test_logical_to_spec():
  shape = dict(data=2, fsdp=2, expert=2, tensor=2)
  spec = lambda axes, dims, rules=None: sharding.logical_to_spec(axes, dims, shape, rules)
  assert spec(("expert", "embed", "moe_mlp"), (8, 32, 16)) == P("expert", "fsdp", "tensor")
  # dense weights: embed over fsdp and expert (a data axis outside the MoE block)
  assert spec(("layers", "embed", "mlp"), (3, 32, 64)) == P(None, ("fsdp", "expert"), "tensor")
  # a mesh axis is used once per array: activations are batch-sharded, embed replicated
  assert spec(("batch", "seq", "embed"), (8, 16, 32)) == P(("data", "fsdp", "expert"))
  # not divisible: the longest prefix of the rule's axes that divides it, else replicated
  assert spec(("batch", "seq", "embed"), (6, 16, 32)) == P("data", None, ("fsdp", "expert"))
  assert spec(("layers", "embed"), (3, 6)) == P(None, "fsdp")
  assert spec(("vocab", "embed"), (63, 32)) == P(None, ("fsdp", "expert"))
  assert spec(("q_lora", "heads"), (16, 32)) == P(("fsdp", "expert"), "tensor")  # MLA's up-projections
  # size-1 axes are dropped; rules overrides
  assert sharding.logical_to_spec(("batch",), (8,), dict(data=8, fsdp=1, expert=1, tensor=1)) == P("data")
  rules = sharding.resolve_rules({"embed": "fsdp", "vocab": None})
  assert spec(("vocab", "embed"), (64, 32), rules) == P(None, "fsdp")
  assert spec(("expert", "embed", "moe_mlp"), (8, 32, 16), rules) == P("expert", "fsdp", "tensor")
  with pytest.raises(ConfigError, match="not a mesh axis"):
    sharding.resolve_rules({"embed": "model"})
  with pytest.raises(ConfigError, match="no sharding rule"):
    spec(("nonsense",), (4,))


def test_vocab_parallel_moves_the_heads_vocabulary_to_fsdp():
  """The head's rules follow batch / embed / vocab (overrides too); with mesh.vocab_parallel its
  vocabulary takes fsdp after tensor and its tokens and hidden dimension leave fsdp."""
  shape = dict(data=2, fsdp=2, expert=2, tensor=2)
  spec = lambda axes, dims, rules: sharding.logical_to_spec(axes, dims, shape, rules)
  plain = sharding.resolve_rules()
  assert spec(("head_embed", "head_vocab"), (32, 64), plain) == spec(("embed", "vocab"), (32, 64), plain) == \
      P(("fsdp", "expert"), "tensor")
  assert sharding.resolve_rules({"batch": "data"})["head_batch"] == ("data",)
  vp = sharding.resolve_rules(None, vocab_parallel=True)
  assert spec(("head_embed", "head_vocab"), (32, 64), vp) == P("expert", ("tensor", "fsdp"))
  assert spec(("head_batch", "seq", "head_vocab"), (8, 16, 64), vp) == P(("data", "expert"), None, ("tensor", "fsdp"))
  # the batch takes fsdp last, so that the head's rows are one all-gather of its fsdp peers' rows
  assert spec(("batch", "seq", "embed"), (8, 16, 32), vp) == P(("data", "expert", "fsdp"))
  assert spec(("layers", "embed", "mlp"), (3, 32, 64), vp) == P(None, ("fsdp", "expert"), "tensor")  # weights as before
  # a vocabulary the head's axes do not divide would leave the fsdp peers computing the same logits
  par = SimpleNamespace(cfg=MeshConfig(fsdp=2, tensor=2, vocab_parallel=True), rules=tuple(vp.items()),
                        mesh=SimpleNamespace(shape=shape))
  cfg = load_train_config(ROOT / "configs/tiny.yaml", ["model.vocab_size=66"])
  with pytest.raises(ConfigError, match=r"vocab_size=66 does not divide by tensor x fsdp = 4; .* pad the vocabulary to 68"):
    loop.check_vocab_parallel(cfg, par)
  loop.check_vocab_parallel(cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=64)), par)


def test_constrain_and_dispatch_without_mesh():
  """No Parallelism (one device): constrain is the identity and the dispatch runs expert_fn on the
  (token, k) rows in place, with nothing dropped."""
  x = jnp.ones((4, 8, 16))
  assert sharding.constrain(x, ("batch", "seq", "embed")) is x
  rows = []
  y, dropped, _ = expert_parallel.dispatch_combine(
      jnp.arange(6.0).reshape(3, 2), jnp.asarray([[1, 0], [0, 1], [1, 1]]), jnp.asarray([[1.0, 2.0]] * 3),
      (jnp.zeros((2, 2, 1)),), (("expert", None, None),), lambda r, e, _: rows.append(e) or r * (e[:, None] + 1))
  np.testing.assert_array_equal(np.asarray(rows[0]), [1, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(y), [[0 * 2 + 0 * 2, 1 * 2 + 1 * 2], [2 + 2 * 2 * 2, 3 + 3 * 2 * 2],
                                                [4 * 2 + 4 * 2 * 2, 5 * 2 + 5 * 2 * 2]])
  assert int(dropped) == 0


@pytest.mark.parametrize("mesh", [dict(fsdp=4, tensor=2), dict(fsdp=2, context=2, tensor=2)])
def test_embedding_lookup_keeps_the_table_sharded(mesh):
  """parallel/lookup.py on v5p-16 (8 chips, compile-only) with fsdp=4 x tensor=2, and with `context`
  (which shards the table's columns and the ids' sequence): the compiled lookup and its gradient
  all-gather only the token ids (int32), never the table, and the gradient comes out sharded like the
  table ([V/2, D/4] per device). Its values: the 8-device training steps below and test_context's."""
  from parallel import lookup, targets

  par = mesh_lib.Parallelism.from_config(MeshConfig(**mesh), targets.devices(targets.parse("v5p-16")))
  v, d = 1024, 256
  table = jax.ShapeDtypeStruct((v, d), jnp.float32, sharding=jax.sharding.NamedSharding(
      par.mesh, sharding.logical_to_spec(("vocab", "embed"), (v, d), dict(par.mesh.shape), par.rules)))
  ids = jax.ShapeDtypeStruct((16, 64), jnp.int32)
  loss = lambda t, i: (lookup.take_rows(t, i, par, jnp.bfloat16).astype(jnp.float32) ** 2).sum()
  compiled = jax.jit(jax.grad(loss)).lower(table, ids).compile()
  gathers = [line.split("=", 1)[1].split("all-gather")[0].strip() for line in compiled.as_text().splitlines()
             if " all-gather(" in line or " all-gather-start(" in line]
  assert gathers and all(g.startswith(("s32[", "(s32[")) for g in gathers), gathers
  assert compiled.output_shardings.shard_shape((v, d)) == (v // 2, d // 4)


def test_padded_slots_keep_the_first_c_per_destination():
  dest = jnp.asarray([2, 0, 2, 2, 1, 0, 2], jnp.int32)
  slot, keep = expert_parallel.padded_slots(dest, n_ep=3, c=2)
  np.testing.assert_array_equal(np.asarray(keep), [True, True, True, False, True, True, False])
  np.testing.assert_array_equal(np.asarray(slot), [4, 0, 5, 6, 2, 1, 6])  # dest * C + position; 6: dropped


def test_capacity_and_device_limited_routing():
  assert expert_parallel.capacity(64, 2, 8, 1, None) == 64  # dropless: T * min(K, E_local)
  assert expert_parallel.capacity(64, 8, 8, 32, None) == 64 * 8
  assert expert_parallel.capacity(64, 2, 8, 1, 1.0) == 16  # ceil(1.0 * 64 * 2 / 8)
  # V3: 256 experts, K=8, 8 groups, topk_group=4
  assert expert_parallel.ranks_per_token(256, 8, 8, 8, 4) == 4  # group == rank
  assert expert_parallel.ranks_per_token(256, 4, 8, 8, 4) == 4  # 2 groups per rank
  assert expert_parallel.ranks_per_token(256, 16, 8, 8, 4) == 8  # a group spans 2 ranks
  assert expert_parallel.ranks_per_token(256, 64, 8, 1, 1) == 8


def test_dropless_exchanges_go_in_chunks():
  """Defect 5: a dropless exchange's receive buffer is sized for the worst case, n_ep * min(K, E_l)
  rows per local token (8 x the balanced K for DeepSeek-V3 on 8 expert ranks); the tokens go in
  chunks so that one chunk's worst case is at most the balanced receive of all of them."""
  t, k, n_ep, e_local = 4096, 8, 8, 32  # V3 at one 4096-token sequence per chip, expert=8
  chunks = expert_parallel.dropless_chunks(t, k, n_ep, e_local)
  assert chunks == 8 and n_ep * min(k, e_local) * t / chunks <= t * k
  assert expert_parallel.dropless_chunks(t, k, 64, 4) == 32  # expert=64: 4 local experts, 32x worst case
  assert expert_parallel.dropless_chunks(16, 2, 2, 4) == 2
  assert expert_parallel.dropless_chunks(96, 1, 1, 4) == 1  # balanced is the worst case: one go
  assert expert_parallel.dropless_chunks(30, 1, 8, 4) == 10  # the first divisor of the tokens >= 8
  assert expert_parallel.dropless_chunks(4096, 8, 8, 32, given=1) == 1
  with pytest.raises(ConfigError, match="mesh.ep_chunks=3 must divide the 4096 tokens"):
    expert_parallel.dropless_chunks(4096, 8, 8, 32, given=3)


def test_transport_choice():
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  assert expert_parallel.resolve_transport("auto", mesh) == "padded"  # CPU
  assert expert_parallel.resolve_transport("ragged", mesh) == "ragged_emulated"
  with pytest.raises(ConfigError):
    expert_parallel.resolve_transport("nccl", mesh)


# ------------------------------------------------------------------ 8 simulated devices
@pytest.fixture(scope="module")
def eight():
  """Two workers at once (one core each), each with the one-device reference step: meshes d2f2e2 (3
  steps), f2e2t2, data=8, fsdp=8, expert=8 (padded transport), expert=8 with the ragged transport, a
  small capacity factor, the MoE dispatch alone on every mesh, and 2 micro-batches accumulated in
  the layer stacks' backward (float32 and FP8), the FP8 kernels per device's rows."""
  jobs = [("three", "f2e2t2", "data8", "ragged", "capacity", "ep_unit", "accumulate_fp8", "fp8_rows",
           "accumulate_dropping"),
          ("fsdp8", "expert8", "small_capacity", "ep_unit_all", "accumulate")]
  a, b = (last_json(out) for out in run_together([(WORKER, "single", *j) for j in jobs], cpu_env(), 900))
  assert a["ref"] == b["ref"]
  return {**b, **a, "meshes": {**a["meshes"], **b["meshes"]}}


def check_mesh(name, r, ref):
  m = r["metrics"]
  assert r["init_diff"] < 1e-6, name  # same initial parameters
  # README: the one-device loss within 5e-7 relative and parameter update within 2e-7 (float32, a few
  # ulps; measured 1.1e-7 and 6e-8 with updates up to 0.065)
  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
    if k in m:
      assert m[k] == pytest.approx(ref[k], rel=5e-7, abs=1e-12), (name, k)
  # the parameter update follows the gradient (see TINY in tests/processes.py): same gradients
  assert r["update_diff"] < 2e-7 and r["update_scale"] > 1e-2, name
  if r["shards"] is not None:
    assert all(p["ok"] for p in r["shards"]["params"]), name
    assert (r["shards"]["n_sharded"] > 0) == (name != "data8"), name  # pure data parallel: replicated
  if "dropped_tokens" in m:
    assert m["dropped_tokens"] == 0


def test_meshes_match_one_device(eight):
  for name in ("d2f2e2", "f2e2t2", "data8", "fsdp8", "expert8"):
    check_mesh(name, eight["meshes"][name], eight["ref"])
  check_mesh("ragged", eight["ragged"], eight["ref"])  # ragged path with the all_gather emulation (CPU)


def test_shards_are_1_over_n(eight):
  params = {p["name"]: p for p in eight["meshes"]["f2e2t2"]["shards"]["params"]}
  assert all(p["ok"] for p in params.values())
  experts = [p for n, p in params.items() if "['moe_layers']" in n and "['experts']['gate_proj']" in n]
  assert len(experts) == 1 and experts[0]["spec"] == "(None, 'expert', 'fsdp', 'tensor')"  # [layers, E, D, F]
  down = [p for n, p in params.items() if "['mtp']" in n and "['experts']['down_proj']" in n]
  assert len(down) == 1 and down[0]["spec"] == "('expert', 'tensor', 'fsdp')"  # [E, F, D]
  emb = [p for n, p in params.items() if "embedding" in n]
  assert emb and emb[0]["spec"] == "('tensor', ('fsdp', 'expert'))"


def check_ep_unit(r):
  assert len(r) >= 4
  for name, v in r.items():
    assert v["y"] < 1e-5 and v["grad"] < 1e-4 and v["dropped"] == 0, name


def test_expert_parallel_dispatch_matches_sorted_experts(eight):
  """Both transports, on the GPU/TPU code path (ragged_dot) and the CPU one (blocked matmul)."""
  check_ep_unit(eight["ep_unit"])


def test_small_capacity_drops_and_reports(eight):
  r = eight["small_capacity"]
  assert r["dropped_tokens"] > 0
  assert np.isfinite(r["loss"])


def test_capacity_drops_the_documented_assignments_to_exactly_zero(eight):
  """expert=8, capacity factor 0.5: the dropped (token, k) assignments are those past the first C per
  (source, destination) rank pair in (token, k) order; the output equals the one-device layer with
  their router weights set to 0 (they contribute exactly nothing), and the count is theirs."""
  r = eight["capacity"]
  assert r["capacity"] == 2 and r["slots_rank0"]
  assert r["dropped"] == r["want_dropped"] > 0
  assert r["y"] < 1e-5 < r["vs_dropless"]


def test_two_processes_match_one(eight):
  """2 processes x 4 CPU devices (gloo), mesh data=2 x fsdp=2 x expert=2 with the data axis across
  the processes (mesh.dcn_data=2): the 3 losses of one process with 8 devices."""
  port = free_port()
  outs = [last_json(o) for o in run_together([(WORKER, "multi", port, i, 2) for i in range(2)], cpu_env(), 600)]
  for o in outs:
    assert o["devices"] == 8
    assert o["data_axis_processes"] == [[0], [1]]
    np.testing.assert_allclose(o["losses"], eight["three_steps"], rtol=5e-7)


def test_gradients_accumulated_in_the_layer_stacks_on_every_mesh(eight):
  """grad_accum=2 with remat full / full_offload: each micro-batch's gradient is added into the
  accumulator inside the layer stacks' backward scans (both stacks: moe/decoder.py accumulating),
  and the loss head runs 4 tokens at a time (4 chunks of the 16; whole under context), on
  d2f2e2 (padded all-to-all), f2e2t2 (ragged transport, tensor axis, layer inputs in host memory;
  and with the head's vocabulary over tensor x fsdp, mesh.vocab_parallel) and fsdp=2 x context=2 x
  expert=2 (also with mesh.vocab_parallel), and with impl.fb_overlap (the second micro-batch's forward
  beside the first one's backward; the two-level ragged exchange with its fast path and halves, and
  under context): the one-device autodiff step (remat none, whole head) within
  check_mesh's float32 bounds (measured: loss 2e-7 relative, update 1.9e-8). FP8 on d2f2e2 (whole
  head) against the same mesh under autodiff: measured 1.2e-10. impl.fb_overlap where the padded exchange
  drops (capacity factor 0.5, greedy routing) against d2f2e2 under autodiff: the same drops."""
  acc = eight["accumulate"]
  want_chunks = {"d2f2e2": [4] * 4, "f2e2t2_ragged_offload": [4] * 4, "f2c2e2": [1] * 4,  # main, MTP x 2
                 "f2e2t2_vocab_parallel": [4] * 4, "f2c2e2_vocab_parallel": [1] * 4}
  # the chunked heads on each device's rows, the weight gathered once (over fsdp x expert; its vocabulary
  # over tensor, with vocab_parallel over tensor x fsdp: the vocabulary-parallel loss); on d2f2e2 (4 rows a
  # micro-batch over 8 devices: the hidden dimension split over expert) XLA's partitioning of each chunk
  on_tokens = lambda name, chunks: [] if chunks[0] == 1 else [name != "d2f2e2"] * 2  # (main and MTP in one)
  for name, chunks in want_chunks.items():
    check_mesh(name, acc[name], acc["ref"])
    assert acc[name]["accumulating"] == 2 and acc[name]["chunks"] == chunks, name
    assert acc[name]["on_tokens"] == on_tokens(name, chunks), (name, acc[name]["on_tokens"])
  # impl.fb_overlap (train/core/overlapped.py): the MoE stack's backward its own, the dense stack's by autodiff
  for name, chunks in {"f2e2t2_fb_overlap": [4] * 4, "f2c2e2_fb_overlap": [1] * 4}.items():
    check_mesh(name, acc[name], acc["ref"])
    assert acc[name]["accumulating"] == 0 and acc[name]["chunks"] == chunks, name
    assert acc[name]["on_tokens"] == on_tokens(name, chunks), (name, acc[name]["on_tokens"])
  fp8 = eight["accumulate_fp8"]
  check_mesh("fp8", fp8["d2f2e2"], fp8["ref"])
  assert fp8["d2f2e2"]["accumulating"] == 2 and fp8["d2f2e2"]["update_diff"] < 1e-8
  # fb_overlap where the padded exchange drops (capacity factor 0.5, greedy routing): the plain step's
  # drops, loss and update on the same mesh (the recomputed layers drop what their forwards dropped)
  drop = eight["accumulate_dropping"]
  r, ref = drop["d2f2e2_fb_overlap_dropping"], drop["ref"]
  assert r["metrics"]["dropped_tokens"] == ref["dropped_tokens"] > 0, (r["metrics"], ref)
  assert r["metrics"]["loss"] == pytest.approx(ref["loss"], rel=5e-7) and r["update_diff"] < 2e-7, r


def test_fp8_kernels_per_devices_rows_equal_one_device(eight):
  """On a mesh the linears' FP8 Pallas GEMM runs on each device's rows (XLA does not partition a
  custom call; tests/test_aot.py has the compiled GPU program): on data=2 x fsdp=2 x expert=2 with
  128 rows a device (whole Wgrad tiles) y and dx equal one device's bitwise, and dW, summed over the
  devices in float32, within 1e-6 of its largest entry (measured 1.1e-7). The weight [256, 384] comes
  in as its fsdp x expert shard [64, 384] and its gradient leaves reduce-scattered to that shard (then
  summed over data); no device sums the whole [256, 384] gradient (it did before: an all-reduce)."""
  d = eight["fp8_rows"]
  assert d["y"] == 0 and d["dx"] == 0 and d["dw"] < 1e-6, d
  assert any(s.startswith("f32[64,384]") for s in d["reduce-scatter"]), d
  assert not any(s.startswith("f32[256,384]") for s in d["all-reduce"]), d


def test_expert_parallel_dispatch_on_every_mesh(eight):
  check_ep_unit(eight["ep_unit_all"])


def test_cli_two_processes(tmp_path):
  """`python -m train` in 2 processes x 4 devices (--coordinator flags): data loaded per process,
  eval with every process stepping together, metrics written once."""
  port, run_dir = free_port(), tmp_path / "run"
  tiny = [a for a in TINY if not a.startswith(("optimizer.", "steps=", "eval_every="))]
  args = ["-m", "train", "configs/tiny.yaml", *tiny, "model.vocab_size=260", "steps=4", "log_every=2",
          "eval_every=4", "eval_steps=2", f"run_dir={run_dir}", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2",
          "mesh.dcn_data=2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
          "--peak-tflops", "1"]  # (no 2048^3 matmul benchmark in each process)
  run_together([args + ["--process-id", str(i)] for i in range(2)], cpu_env(4))
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["loss"]) for r in train)
  assert train[-1]["dropped_tokens"] == 0
  assert [r["step"] for r in records if "eval_loss" in r] == [4]
