"""train.aot and parallel/targets.py: the training step compiled for TPU (and GPU) targets on this CPU
machine, with compile-only devices (jax.experimental.topologies; the tpu extra's libtpu compiles).

Each defect the first pod compile found has a test here: implementations chosen from the target, not
from the host (1); meshes that split physical axes (2); MLA's up-projections sharded by default (3);
no ragged all-to-all on large v5e slices (4); the ragged transport's receive buffers (5).
"""

import collections
import json
import math
import re
from pathlib import Path

import jax
import pytest

from moe.runtime import ImplConfig, Runtime
from parallel import expert_parallel, targets
from parallel.common.errors import ConfigError
from parallel.mesh import MeshConfig, Parallelism, make_mesh
from train import aot, forecast
from train import hlo as hlo_lib
from train import hlo_links, hlo_parse
from train.core import loop
from train.core import step as step_lib
from train.core.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
         "model.moe_intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
         "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
         "model.v_head_dim=16", "seq_len=128", "batch_size=8"]


def test_target_names():
  t = targets.parse("v5p-1024")
  assert (t.chips, t.devices, t.topology, t.wrap) == (512, 512, "v5:8x8x8", (True, True, True))
  assert targets.parse("v5p-512").topology == "v5:4x8x8" and targets.parse("v5p-128").topology == "v5:4x4x4"
  assert targets.parse("v5p-1280").topology == "v5:4x8x20"  # the most cubic grid of 4x4x4 blocks
  assert targets.parse("v5p-16").topology == "v5:2x2x2" and targets.parse("v4-8").chips == 4
  assert targets.parse("v5e-64").topology == "v5e:8x8" and targets.parse("v5litepod-256").wrap == (True, True, False)
  assert targets.parse("v6e-8").topology == "v6e:2x4" and targets.parse("tpu7x-8").devices == 8
  assert (targets.parse("h100x256").chips, targets.parse("h100x8").hbm_bytes) == (256, 0.9 * 84942979072)  # (JAX's share)
  assert targets.parse("v5p-16", slices=4).devices == 32
  for bad, words in (("v5p-7", "TensorCores"), ("v5p-1000", "multiple of 64"), ("h100x12", "whole hosts"),
                     ("a100x8", "unknown target"), ("v6e-48", "2-D TPU slice")):
    with pytest.raises(ConfigError, match=words) as e:
      targets.parse(bad)
    assert "\n" not in str(e.value)


def test_implementations_follow_the_target_not_the_host():
  """Defect 1: on this CPU host, a model built for TPU devices takes the TPU kernels (and the model
  for the host the CPU ones); each is settable."""
  tpu = targets.devices(targets.parse("v5p-8"))
  rt = Runtime.resolve(devices=tpu, fp8=True, announce=False)
  assert (rt.platform, rt.attention, rt.experts, rt.fp8.gemm) == ("tpu", "splash", "ragged_dot", "qdq")
  par = Parallelism.from_config(MeshConfig(data=1, expert=4), tpu)
  assert par.ep_transport == "ragged"
  cpu = Runtime.resolve(announce=False)
  assert (cpu.platform, cpu.attention, cpu.experts) == ("cpu", "blocked", "blocked")
  assert Parallelism.from_config(MeshConfig(), jax.devices()).ep_transport == "padded"
  assert Runtime.resolve(ImplConfig(attention="fused", experts="blocked"), devices=tpu,
                         announce=False).attention == "fused"


def test_meshes_split_physical_axes_when_they_must():
  """Defect 2: expert=8 on v5p-128 (4x4x4 chips) is laid out; several slices need a dcn axis."""
  devices = targets.devices(targets.parse("v5p-128"))
  mesh = make_mesh(MeshConfig(data=-1, expert=8), devices)
  assert dict(mesh.shape) == {"stage": 1, "data": 8, "fsdp": 1, "context": 1, "expert": 8, "tensor": 1}
  assert len({d.id for d in mesh.devices.flat}) == 64
  two = targets.devices(targets.parse("v5p-16", slices=2))
  mesh = make_mesh(MeshConfig(data=-1, fsdp=2, expert=4, dcn_data=2), two)
  assert all(len({d.slice_index for d in mesh.devices[0, i].flat}) == 1 for i in range(2))  # data across slices
  mesh = make_mesh(MeshConfig(stage=2, data=-1, expert=4, dcn_stage=2), two)  # pipeline stages across slices
  assert all(len({d.slice_index for d in mesh.devices[i].flat}) == 1 for i in range(2))
  with pytest.raises(ConfigError, match="span 2 slices: set mesh.dcn_data=2"):
    make_mesh(MeshConfig(data=-1, expert=8), two)


def test_no_large_parameter_replicated_by_default():
  """Defect 3: DeepSeek-V3 on v5p-1024 (fsdp=64 x expert=8): with the default rules nothing larger
  than the norms stays whole on every chip (q_b_proj and kv_b_proj are sharded on their LoRA rank)."""
  cfg = load_train_config(ROOT / "configs/deepseek-v3-671b.yaml",
                          ["mesh.data=1", "mesh.fsdp=64", "mesh.expert=8", "batch_size=512", "precision=bf16"])
  par = Parallelism.from_config(cfg.mesh, targets.devices(targets.parse("v5p-1024")))
  s = loop.setup(cfg, par)
  biggest = aot.largest_replicated(s.abstract_state, par.mesh.size)
  assert biggest and all(r["param"].endswith("scale") and r["MiB"] < 2 for r in biggest), biggest  # RMSNorm weights
  q_b = s.abstract_state["params"]["moe_layers"]["layers"]["self_attn"]["q_b_proj"]["kernel"]
  assert tuple(q_b.sharding.spec) == (None, ("fsdp", "expert"))  # [layers, q_lora, heads]: over fsdp x expert
  params = aot.per_device_bytes((s.abstract_state["params"], s.abstract_state["rest"]))
  assert params < 1.02 * 671.8e9 * 4 / 512  # the float32 master weights (+ MTP) spread evenly over the chips


def test_large_v5e_slices_use_the_padded_transport():
  """Defect 4: libtpu has no ragged all-to-all on v5e slices of 8x8 chips and more."""
  assert Parallelism.from_config(MeshConfig(data=-1, expert=8), targets.devices(targets.parse("v5e-64"))).ep_transport \
      == "padded"
  assert Parallelism.from_config(MeshConfig(data=-1, expert=8),
                                 targets.devices(targets.parse("v5e-16"))).ep_transport == "ragged"
  with pytest.raises(ConfigError, match="no ragged-all-to-all on v5e"):
    Parallelism.from_config(MeshConfig(data=-1, expert=8, ep_transport="ragged"),
                            targets.devices(targets.parse("v5e-64")))


def compile_json(capsys, *argv):
  rc = aot.main(list(argv))
  out = capsys.readouterr()
  assert rc == 0, out.err
  return [json.loads(line) for line in out.out.splitlines()]


def test_per_device_batch_sets_grad_accum_from_the_mesh():
  """The large configs carry a pod layout: per_device_batch=1, fsdp over what expert=8 leaves. On
  v5p-512 (256 chips) V3's 15,360 sequences make 60 micro-batches of 256; on v5p-1024, 30."""
  cfg = load_train_config(ROOT / "configs/deepseek-v3-671b.yaml")
  for target, fsdp, accum in (("v5p-512", 32, 60), ("v5p-1024", 64, 30)):
    par = Parallelism.from_config(cfg.mesh, targets.devices(targets.parse(target)))
    assert dict(par.mesh.shape)["fsdp"] == fsdp and loop.batch_devices(par) == (256 * fsdp // 32, "fsdp x expert")
    resolved = loop.on_mesh(cfg, par)
    assert (resolved.grad_accum, resolved.per_device_batch) == (accum, None) and loop.on_mesh(resolved, par) == resolved
  par = Parallelism.from_config(cfg.mesh, targets.devices(targets.parse("v5p-512")))
  with pytest.raises(ConfigError, match=r"^batch_size=1000 is not a multiple of per_device_batch=1 x the 256 devices"
                                        r" the batch splits over \(fsdp x expert\) = 256: change batch_size"):
    loop.on_mesh(cfg.replace(batch_size=1000), par)
  with pytest.raises(ConfigError, match="per_device_batch=1 and grad_accum=4: set one of them"):
    load_train_config(ROOT / "configs/deepseek-v3-671b.yaml", ["grad_accum=4"])


def test_kept_exchange_rows_are_not_exchanged_again():
  """impl.ep_remat: a dropless exchange in 2 chunks (expert=4 on v5p-8, ragged) repeats its
  all-to-alls in the backward pass (recompute), or keeps the rows and does not (keep). Counted in the
  lowered step's text, where the MoE layers share one function per pass: the forward's two ragged
  all-to-alls (the rows there, sorted by expert where they land, and the results back), the
  backward's two transposes, and with recompute the forward's two again."""
  counts = {}
  for ep in ("recompute", "keep"):
    cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.expert=4", "mesh.ep_chunks=2",
                                                          f"impl.ep_remat={ep}", "model.first_k_dense_replace=0",
                                                          "model.num_nextn_predict_layers=0", "impl.scan_layers=false"])
    par = Parallelism.from_config(cfg.mesh, targets.devices(targets.parse("v5p-8")))
    s = loop.setup(cfg, par)
    text = s.train_step.lower(s.abstract_state, s.batch_spec(cfg.batch_size, cfg.seq_len)).as_text()
    counts[ep] = text.count("ragged_all_to_all")
  assert counts == {"keep": 2 + 2, "recompute": 2 + 2 + 2}, counts


def test_fast_path_is_forecast_as_one_pass_with_its_fallback_reported():
  """mesh.ep_fast_path=2 (expert=4 on v5p-8, ragged): the step holds a conditional between the fast
  path (all tokens at once, buffers of twice the balanced receive) and the chunked exchange; the
  forecast costs the fast path, under the plain chunked step's, and reports what the fallback would
  add (`fallback_s`). The step's metrics count the layers that fell back (`ep_fallbacks`, each layer's
  count tested in tests/test_ep.py). With mesh.ep_overlap the two halves of the tokens go through
  the fast path one after the other, each in buffers for half of them: the grouped matmuls' buffer
  FLOPs are the same as in one pass (they were twice as many when each half had the whole buffers).
  The fast path's ragged all-to-alls sit outside the conditional that runs the chunks (inside a
  branch they could overlap nothing but that branch)."""
  target = targets.parse("v5p-8")
  out = {}
  for fast in ("null", "2.0", "2.0 overlap"):
    cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.expert=4",
                                                          f"mesh.ep_fast_path={fast.split()[0]}",
                                                          f"mesh.ep_overlap={'overlap' in fast}",
                                                          "model.num_nextn_predict_layers=0"])
    compiled = _compiled(cfg, target)
    text, metrics = compiled.as_text(), compiled.out_info[1]
    out[fast] = (forecast.costs(text, forecast.chip_of("v5p")), text.count(" conditional("))
    assert ("ep_fallbacks" in metrics) == (fast != "null"), sorted(metrics)  # the layers that fell back, logged
    if fast == "2.0":  # the fast path's all-to-alls outside the fallback's conditional: no branch holds them
      fast_a2a = [line for line in text.splitlines() if "ragged-all-to-all" in line.split(" metadata=")[0]
                  and "/ep_fast_path/" in line]
      assert fast_a2a and not any("branch_" in line.split("op_name=")[1].split("/ep_fast_path/")[0]
                                  for line in fast_a2a), fast_a2a[:2]
  (plain, n_plain), (fast, n_fast), (halves, _) = out["null"], out["2.0"], out["2.0 overlap"]
  assert n_fast > n_plain and plain.fallback == 0 < fast.fallback, (n_plain, n_fast, plain.fallback)
  assert fast.time < plain.time < fast.time + fast.fallback, (fast.time, plain.time, fast.fallback)
  assert halves.flops["ragged_dot_buffer"] == pytest.approx(fast.flops["ragged_dot_buffer"], rel=0.01), (
      halves.flops["ragged_dot_buffer"], fast.flops["ragged_dot_buffer"])


def test_group_limited_routing_stays_with_each_devices_tokens():
  """The group limit (tiny.yaml: 2 groups, 1 kept a token) on v5p-8 with the tokens over 4 devices: no
  instruction of the compiled step holds the whole batch's group scores or kept groups. lax.top_k over
  the groups and the scatter that marked the kept ones had XLA gather them to every device: here the
  kept groups of all 1,024 tokens (s32[1024,1]); V3 on 256 H100s sorted all 3.1M tokens' group scores
  on every GPU after a 200 MB all-gather, in each MoE layer's forward and recompute."""
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.expert=4",
                                                        "model.num_nextn_predict_layers=0"])
  text = _compiled(cfg, targets.parse("v5p-8")).as_text()
  t, m = cfg.batch_size * cfg.seq_len, cfg.model
  assert t == 1024 and (m.n_group, m.topk_group) == (2, 1)
  whole = re.compile(rf"\[{t},(?:{m.n_group}|{m.topk_group})\]")
  held = [line.strip()[:160] for line in text.splitlines() if whole.search(line.split(" metadata=")[0])]
  assert not held, held[:3]


def test_chunked_heads_gather_their_weight_once_a_micro_batch(monkeypatch):
  """The loss runs the output head 32 tokens of each sequence at a time (4 chunks of 128; the main and
  MTP heads in one pass) on v5p-8 with the head's weight split over 4 devices, 2 micro-batches: the
  collectives that hold the whole weight [64, 512] (its gather, its gradient's reduction) run twice a
  micro-batch (one all-gather, the forward's kept for the backward; one reduce-scatter). Left to XLA
  inside the chunks' loop they ran at every chunk of every head (64 here: all-gathers, all-reduces and
  reduce-scatters; V3 on v5p-512 all-reduced the whole head gradient, 1.85 GB, 8 times a micro-batch);
  and the reduce-scatter stays in each micro-batch (XLA:TPU had moved it after their loop, summing the
  whole weight's gradient in float32 over them: 3.5 GB a chip for V3)."""
  from moe import model as model_lib
  from train import hlo_loops
  monkeypatch.setattr(model_lib, "LOSS_CHUNK", 32)
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.expert=4", "grad_accum=2"])
  assert cfg.model.num_nextn_predict_layers == 1 and cfg.seq_len == 128
  text = _compiled(cfg, targets.parse("v5p-8")).as_text()
  p = forecast.Program(text)
  runs = hlo_loops.executions(hlo_loops.module_calls(text), p.entry)
  whole = f"[{cfg.model.hidden_size},{cfg.model.vocab_size}]"
  held = collections.Counter()
  for comp, instrs in p.comps.items():
    for ins in instrs:
      if (found := forecast._collective(p, ins)) is not None:
        shapes = [found[1].shape] + [p.shape(o) for o in hlo_parse.operands(found[1].rest)]
        if any(whole in s for s in shapes):
          held[found[0]] += runs.get(comp, (1,))[0]
  assert held == {"all-gather": 2, "reduce-scatter": 2}, held


def test_two_level_fast_path_returns_rows_not_assignments():
  """The two-level exchange's fast path (mesh.ep_nodes=2 on expert=4, v5p-8, ragged; 4 experts a token,
  no group limit, so a token reaches both nodes): the step branches between it and the chunks, its
  forecast is under the chunked step's, and no array of token rows in it is larger than its buffers
  (fast_plan: 512 rows received across nodes, 1024 assignments sent inside a node and received; 256
  tokens a device). The rows come back summed as they arrive: the return trip once made an array of
  one row per (received row, expert), 512 x 4 = 2048 rows, twice the largest buffer."""
  target = targets.parse("v5p-8")
  out = {}
  for fast in ("null", "1.0"):
    cfg = load_train_config(ROOT / "configs/tiny.yaml", [
        *SMALL, "mesh.data=1", "mesh.expert=4", "mesh.ep_nodes=2", "mesh.ep_transport=ragged",
        f"mesh.ep_fast_path={fast}", "model.num_experts_per_tok=4", "model.n_group=1", "model.topk_group=1",
        "model.num_nextn_predict_layers=0"])
    text = _compiled(cfg, target).as_text()
    out[fast] = (forecast.costs(text, forecast.chip_of("v5p")), text.count(" conditional("), text)
  (plain, n_plain, _), (fast, n_fast, text) = out["null"], out["1.0"]
  assert n_fast > n_plain and fast.fallback > 0 and fast.time < plain.time, (n_plain, n_fast, fast.time, plain.time)
  plan = expert_parallel.fast_plan(expert_parallel.Plan(("expert",), 4, 2, "ragged", None, 2), 256, 4, 2, 1.0)
  assert plan.bounds() == (512, 1024, 1024)
  rows = [int(m.group(1)) for line in text.splitlines() if "ep_fast_path" in line
          for m in re.finditer(r"(?:bf16|f32)\[(\d+),64\]", line.split(" metadata=")[0])]
  assert rows and max(rows) == max(plan.bounds()), sorted(set(rows))


V5P16 = ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "batch_size=8", "seq_len=256"]


@pytest.fixture(scope="module")
def tiny_v5p16():
  """train.aot's report of tiny.yaml compiled for v5p-16 (8 chips) with data=2 x fsdp=2 x expert=2,
  --buffers 4: compiled once for the tests that read it."""
  cfg = load_train_config(ROOT / "configs/tiny.yaml", V5P16)
  return json.loads(json.dumps(aot.compile_for(cfg, targets.parse("v5p-16"), buffers=4)))


def test_compiles_for_v5p_with_data_fsdp_and_expert_axes(tiny_v5p16):
  """tiny.yaml on v5p-16 (8 chips) with data=2 x fsdp=2 x expert=2: the TPU paths
  (megablox's grouped-matmul kernels, ragged_all_to_all, the splash kernel) lower and compile; --buffers
  names the largest buffers at the peak. Without mesh.ep_overlap libtpu runs the all-to-alls
  synchronously (test_ep_overlap_makes_the_all_to_alls_asynchronous_on_tpu)."""
  for r in (tiny_v5p16,):
    assert r["fits"] and r["devices"] == 8 and r["mesh"] == {"stage": 1, "data": 2, "fsdp": 2, "context": 1, "expert": 2, "tensor": 1}
    assert r["impl"]["ep_transport"] == "ragged" and r["impl"]["experts"] == "megablox"
    assert r["impl"]["attention"] == "splash"
    assert r["collectives"]["ragged-all-to-all"]["count"] > 0 and r["collectives"]["all-gather"]["bytes"] > 0
    top = r["peak_buffers"]
    assert len(top) == 4 and [b["bytes"] for b in top] == sorted((b["bytes"] for b in top), reverse=True)
    for b in top:  # each as large as its array (TPU tiles may pad it), and smaller than the peak
      assert hlo_parse.shape_bytes(b["array"]) <= b["bytes"] < r["per_device_GiB"]["peak"] * 2**30, b
    assert any(b["source"].startswith(("moe/", "parallel/", "train/")) for b in top), top
    assert r["async_a2a"]["async"] == 0 < r["async_a2a"]["sync"]  # libtpu's default (see mesh.ep_overlap)
    slow = r["slow_a2a"]  # one slice: nothing crosses the data-centre network
    assert (slow["groups"], slow["granules"], slow["bytes_per_device"]) == ("slices", 1, 0) and slow["count"] > 0


def test_executed_flops_of_the_compiled_tiny_step_counted_by_hand(tiny_v5p16):
  """The compiled tiny step on v5p-16 (a device: 256 tokens, one sequence; expert=2, so 4 of the 8
  experts), its executed FLOPs read from the HLO against a count from the model's shapes:
  - dense matmuls (MLA's projections in 5 blocks, the dense MLP, routers and shared experts in 4
    MoE blocks, MTP's eh_proj, the head twice): forward, and in the backward input and weight
    gradients, 3 x 2 x params x tokens (remat_policy none);
  - routed experts (3 matrices of H x I per assignment, top-2), TPU's grouped-matmul kernels
    (megablox): gmm forward, again in the backward (impl.ep_remat recomputes each exchanged chunk) and
    for the input gradients, tgmm for the weight gradients: 4 x the routed forward. The kernels hold
    the exchange's worst-case buffer (2 chunks of n_ep x 128 tokens x min(top-k, local experts) rows)
    and visit only the tiles of the rows routed there: counted at the balanced fill, 1/2 here (with
    ragged_dot, libtpu computed the weight gradient as a dense matmul of every local expert over every
    buffer row: 8x the routed work, 1.21 of the step's 3.25 GFLOP);
  - attention (splash, causal: half the S x S blocks): forward QK and PV, dq 3 and dkv 4 matmuls."""
  r = tiny_v5p16
  H, I_dense, I_moe, V, heads, q_lora, kv_lora, nope, rope, v = 128, 384, 96, 512, 4, 64, 32, 32, 16, 32
  T, S, K, e_local, n_ep, chunks = 256, 256, 2, 4, 2, 2
  attn_proj = H * q_lora + q_lora * heads * (nope + rope) + H * (kv_lora + rope) + kv_lora * heads * (nope + v) + \
      heads * v * H
  dense = 5 * attn_proj + 3 * H * I_dense + 4 * (H * 8 + 3 * H * I_moe) + 2 * H * H + 2 * H * V
  routed_fwd = 2 * T * K * 3 * H * I_moe  # per MoE block
  buffer_rows = n_ep * T * min(K, e_local) // chunks  # per chunk
  attention = 5 * heads * S * S * ((nope + rope + v) + (2 * (nope + rope) + v) + 2 * (nope + rope + v))
  flops = r["costs"]["flops"]
  assert r["impl"]["experts"] == "megablox"
  assert flops["matmul"] == 6 * dense * T + 4 * 4 * routed_fwd + attention, flops
  assert flops["ragged_dot"] == 4 * 4 * routed_fwd and flops["attention"] == attention
  assert r["forecast"]["ragged_fill"] == T * K / chunks / buffer_rows == 0.5
  assert flops["ragged_dot_buffer"] == 4 * 4 * 2 * chunks * buffer_rows * 3 * H * I_moe
  assert r["costs"]["trip_counts_known"] and r["forecast"]["step_s"] > 0
  assert all(c["slow"] == 0 for c in r["costs"]["collective_bytes"].values())  # one slice: all over ICI


def test_compiles_a_pipeline_for_v5p(capsys):
  """mesh.stage: tiny.yaml (4 MoE layers) on v5p-16 as 2 stages x fsdp=2 x expert=2, 1F1B, bf16: the
  pipeline's shard_map over `stage` with the expert-parallel one nested inside compiles for TPU. Over
  `stage` the executor moves activations in bf16, never more than one micro-batch's [2 rows, 256,
  128] per collective (XLA splits them over the stage's fsdp x expert devices): per tick the
  activation and a cotangent (collective-permute), per micro-batch first_fn's blocks (all-gather),
  the last stage's output into the stages' blocks (reduce-scatter) and the cotangents back, each
  counted by hand below. Before:
  float32 psums of whole activations, a workaround for XLA:CPU, on every platform. The forecast
  counts the experts' kernels at the fill of one micro-batch's exchange: 2 rows x 256 tokens over the
  stage's 4 devices, 128 a device, top-2, in 2 chunks against buffers of 2 ranks x 64 x 2 rows (before:
  at the whole batch's tokens a device, 256, the buffers counted full)."""
  (r,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5p-16", "mesh.stage=2", "mesh.data=1", "mesh.fsdp=2",
                      "mesh.expert=2", "model.num_hidden_layers=5", "batch_size=8", "seq_len=256",
                      "pipeline.schedule=1f1b", "pipeline.microbatches=4", "precision=bf16")
  assert r["fits"] and r["mesh"] == {"stage": 2, "data": 1, "fsdp": 2, "context": 1, "expert": 2, "tensor": 1}
  assert r["collectives"]["ragged-all-to-all"]["count"] > 0
  assert r["forecast"]["ragged_fill"] == 128 * 2 / 2 / (2 * 64 * 2) == 0.5
  act = 2 * 256 * 128 * 2  # one micro-batch's activation [2 rows, 256, 128] in bf16, bytes
  for row in r["stage_transfers"]:
    assert row["shape"].startswith("bf16[") and hlo_parse.shape_bytes(row["shape"]) <= act, row
  # what crosses `stage`, by hand: in the tick loop one activation forward and one cotangent back, each
  # device's quarter of it (the stage's fsdp x expert devices split it); per micro-batch first_fn's
  # 2 row blocks gathered and the last stage's output scattered into them, and their cotangents the
  # other way: each the micro-batch's whole activation on every device (a block of 1 row does not split
  # over 4 devices; XLA's re-layouts inside a stage around them are the rows with over_stage false)
  over = sorted((row["kind"], hlo_parse.shape_bytes(row["shape"]), row["count"])
                for row in r["stage_transfers"] if row["over_stage"])
  assert over == [("all-gather", act, 2), ("collective-permute", act // 4, 2), ("reduce-scatter", act // 2, 2)], over


def test_forecast_counts_the_pipeline_slots_the_schedule_runs(capsys):
  """tiny.yaml on v5p-16, 1F1B over 2 stages x fsdp=2 x expert=2 and 4 micro-batches of 8 sequences,
  against the same batch unpipelined (fsdp=4 x expert=2). The 4 MoE layers are the pipelined chunks;
  the dense layer and MTP (attention, and MTP's experts) run in first_fn and last_fn once per
  micro-batch. The schedule's 6 ticks run a forward slot in 5 and a backward slot in 5, and the
  forecast counts the chunks 5 times for 4 micro-batches, the rest once: per device the pipelined
  step's attention FLOPs are (4 x 5/4 + 2) / 6 = 7/6 of the plain step's and its experts'
  (4 x 5/4 + 1) / 5 = 6/5 (before: every slot of every tick, the chunks and first_fn and last_fn
  alike, 6/4 for both)."""
  common = ("configs/tiny.yaml", "--target", "v5p-16", "mesh.data=1", "mesh.expert=2", "model.num_hidden_layers=5",
            "batch_size=32", "seq_len=256", "precision=bf16")
  (piped,) = compile_json(capsys, *common, "mesh.stage=2", "mesh.fsdp=2", "pipeline.schedule=1f1b",
                          "pipeline.microbatches=4")
  (plain,) = compile_json(capsys, *common, "mesh.fsdp=4")
  f, g = piped["costs"]["flops"], plain["costs"]["flops"]
  assert f["attention"] / g["attention"] == pytest.approx(7 / 6, rel=0.01)
  assert f["ragged_dot"] / g["ragged_dot"] == pytest.approx(6 / 5, rel=0.01)


def test_compiles_for_a_large_v5e_slice_with_the_padded_transport(capsys):
  (r,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5e-64", "mesh.data=8", "mesh.expert=8", *SMALL[:-2],
                      "batch_size=64", "seq_len=128")
  assert r["impl"]["ep_transport"] == "padded" and r["collectives"]["all-to-all"]["count"] > 0
  assert "ragged-all-to-all" not in r["collectives"]


def test_out_of_memory_is_one_line_and_exit_3(capsys):
  """A model whose state alone (16 GiB of float32 weights and moments) exceeds v5e-1's HBM."""
  rc = aot.main(["configs/tiny.yaml", "--target", "v5e-1", "model.vocab_size=4000000", "model.num_hidden_layers=1",
                 "model.first_k_dense_replace=1", "model.num_nextn_predict_layers=0", "batch_size=1", "seq_len=64",
                 "optimizer.moment_dtype=float32"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == aot.EXIT_DOES_NOT_FIT == 3
  assert len(err) == 1 and "does not fit on v5e-1: needs" in err[0] and "of 15.8 GiB per device" in err[0], err


def test_a_near_miss_says_by_how_much():
  """A step just over the HBM (XLA:GPU rematerialises up to the limit) is not 'needs 79.1 of 79.1'."""
  assert str(aot.DoesNotFit("h100x512", 79.14 * aot.GiB, 79.11 * aot.GiB, "")) == (
      "does not fit on h100x512: needs 79.14 GiB of 79.11 GiB per device")
  assert str(aot.DoesNotFit("v5p-1024", 97.5 * aot.GiB, 95.74 * aot.GiB, "")).endswith("needs 97.5 GiB of 95.7 GiB per device")


def test_reports_what_the_context_axis_costs(capsys):
  """mesh.context=2 (x data=4) on v5p-16, tiny.yaml (4 layers + MTP, latent attention): train.aot says
  what a device sends over the context axis and the attention kernels' FLOPs. The latent gathers are
  among the top senders, at least the forward's: 5 attention layers x the half of a [2 rows, 256
  tokens, 32 + 16] float32 latent a device receives."""
  (r,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5p-16", "mesh.data=4", "mesh.context=2",
                      "batch_size=8", "seq_len=256")
  c = r["context"]
  assert c["size"] == 2 and c["bytes_per_layer"] * 4 == c["bytes_per_device"] and c["attention_flops_per_device"] > 0
  gathers = sum(t["bytes"] for t in c["top"] if "gather_seq" in t["source"] or t["source"].startswith("moe/mla.py"))
  assert gathers >= 5 * 2 * 256 * 48 * 4 / 2 and sum(t["bytes"] for t in c["top"]) <= c["bytes_per_device"]
  (plain,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5p-16", *SMALL[:-2], "batch_size=8")
  assert "context" not in plain


def test_search_splits_long_sequences_over_context():
  """--search tries context sizes when seq_len is long: V3 at 32,768 tokens on v5p-512 (256 chips)
  splits each sequence over 8, 4, 2 or 1 devices (at least 4,096 tokens a slice), the rest over fsdp x
  expert, with ring attention tried before the gathered latent; a 4,096-token config keeps the mesh's context (no mesh.context override), and its
  per_device_batch=1 is tried doubled first."""
  cfg = load_train_config(ROOT / "configs/deepseek-v3-671b-32k.yaml")
  tries = aot.candidates(cfg, targets.parse("v5p-512"), 100_000)
  contexts = {int(o.split("=")[1]) for t in tries for o in t if o.startswith("mesh.context=")}
  assert contexts == {8, 4, 2, 1} and all(any(o.startswith("mesh.context=") for o in t) for t in tries)
  for t in tries:  # each context size over 1 with the ring, then the gathered latent; context=1 with neither
    ring = t.index("mesh.context_attention=ring") if "mesh.context_attention=ring" in t else None
    if "mesh.context=1" in t:
      assert not any(o.startswith("mesh.context_attention") for o in t), t
    elif ring is not None:
      gathered = t[:ring] + ["mesh.context_attention=all_gather"] + t[ring + 1:]
      assert tries.index(t) < tries.index(gathered), t
    else:
      assert "mesh.context_attention=all_gather" in t, t
  for t in tries:
    sizes = {o.split("=")[0]: int(o.split("=")[1]) for o in t if o.split("=")[0] in (
        "mesh.fsdp", "mesh.expert", "mesh.tensor", "mesh.context")}
    assert math.prod(sizes.values()) == 256, t
  short = aot.candidates(load_train_config(ROOT / "configs/deepseek-v3-671b.yaml"), targets.parse("v5p-512"), 10_000)
  assert not any(o.startswith("mesh.context") for t in short for o in t)
  # per_device_batch=1 (grad_accum follows): micro-batches of 2 sequences a device tried before 1
  two = [t for t in short if t[-1] == "per_device_batch=2"]
  assert two and all(short.index(t) < short.index(t[:-1] + ["per_device_batch=1"]) for t in two)
  # with the layer inputs in host memory, 3 a device first; the layout of docs/pods.md's 41.9% is one
  three = [t for t in short if t[-1] == "per_device_batch=3"]
  assert three and all("impl.remat_policy=full_offload" in t for t in three)
  assert ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=64", "mesh.tensor=1", "impl.remat_policy=full_offload",
          "impl.ep_remat=recompute", "mesh.ep_fast_path=1.5", "mesh.ep_overlap=true", "per_device_batch=3"] in short
  # with the layers recomputed and no stages, each layout also with impl.fb_overlap, right after it without
  fb = [t for t in short if "impl.fb_overlap=true" in t]
  assert fb and all(any(f"impl.remat_policy={r}" in t for r in ("full", "full_offload")) for t in fb)
  assert all(short[short.index(t) - 1] == [o for o in t if o != "impl.fb_overlap=true"] for t in fb)
  # with stages (and fsdp), a stage's weights gathered once per step is tried first, then in every tick
  staged = aot.candidates(load_train_config(ROOT / "configs/deepseek-v3-671b.yaml", ["mesh.stage=4"]),
                          targets.parse("v5p-512"), 10_000)
  once = [t for t in staged if "pipeline.gather_once=true" in t]
  assert once and not any("pipeline.gather_once=true" in t for t in short)
  assert not any("impl.fb_overlap=true" in t for t in staged)
  assert all("mesh.fsdp=1" not in t and [o for o in t if o != "pipeline.gather_once=true"] in staged for t in once)
  assert all(staged.index(t) < staged.index([o for o in t if o != "pipeline.gather_once=true"]) for t in once)


def test_bad_target_and_search(capsys):
  assert aot.main(["configs/tiny.yaml", "--target", "v9-8"]) == 2
  assert "unknown target 'v9-8'" in capsys.readouterr().err
  assert aot.main(["configs/tiny.yaml", "--target", "v5p-8", "--search", "--tries", "2", *SMALL]) == 0
  out = capsys.readouterr().out.splitlines()
  rows = [json.loads(line) for line in out[:2]]
  assert [r["overrides"][:4] for r in rows] == [["mesh.data=1", "mesh.fsdp=1", "mesh.expert=4", "mesh.tensor=1"]] * 2
  assert [r["overrides"][5:] for r in rows] == [
      ["impl.ep_remat=keep", "mesh.ep_fast_path=2.0", "mesh.ep_overlap=true", "grad_accum=1"],
      ["impl.ep_remat=keep", "mesh.ep_fast_path=2.0", "grad_accum=1"]]
  assert out[2].startswith("fits") and all(r["fits"] for r in rows) and len(out) == 5


@pytest.mark.cuda
def test_compiles_for_h100(capsys):
  """needs `pip install -e ".[cuda]"` (5 GB): the step compiled for 8 x H100 by XLA's GPU compiler. The
  experts run the Triton grouped matmul (XLA:GPU would expand a ragged_dot into a dense matmul over
  every local expert): the forecast reads its FLOPs, the routed work at the buffer's fill. XLA's
  latency-hiding scheduler is on (Parallelism.compiler_options): without it XLA:GPU left the
  all-to-alls and the ZeRO all-gathers synchronous, nothing computing under them. The flash-attention
  kernels (moe/kernels/mla_flash.py) counted by hand: 5 blocks (4 layers, MTP) of one 256-token row a
  GPU and 4 heads, causal (half the S x S pairs), at the widths they compute (q/k's 48 as 32 + 16,
  v's 32): forward QK and PV, dk/dv's loop 4 matmuls, dq's 3 (the forecast counted the attention
  kernels as no FLOPs before 2026-12-05, and JAX's kernel, used until then, computed all three at 64)."""
  (r,) = compile_json(capsys, "configs/tiny.yaml", "--target", "h100x8", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2",
                      "precision=bf16")
  assert r["fits"] and r["impl"]["ep_transport"] == "ragged" and r["impl"]["attention"] == "flash"
  qk, v = 48, 32
  assert r["costs"]["flops"]["attention"] == 5 * 4 * 256 * 256 * ((qk + v) + (2 * qk + 2 * v) + (2 * qk + v))
  assert r["impl"]["experts"] == "triton" and r["costs"]["flops"]["ragged_dot"] > 0
  counts = {k: v for k, v in r["costs"]["collective_bytes"].items() if k in ("ragged-all-to-all", "all-gather")}
  assert all(v.get("async", 0) > v.get("sync", 0) for v in counts.values()), counts
  assert (r["slow_a2a"]["groups"], r["slow_a2a"]["granules"], r["slow_a2a"]["bytes_per_device"]) == ("hosts", 1, 0)


def _collective_windows(text: str) -> list[list[tuple[int, int]]]:
  """Each computation's asynchronous collectives (as the forecast reads them) of a scheduled program, as
  (position of the start, position of the done) in the computation; a start without its done to the end."""
  p, out = forecast.Program(text), []
  for comp in p.comps.values():
    started, windows = {}, []
    for i, ins in enumerate(comp):
      if ins.op.endswith("-start") and forecast._collective(p, ins) is not None:
        started[ins.name] = i
      elif ins.op.endswith("-done"):
        windows += [(started.pop(o), i) for o in hlo_parse.operands(ins.rest) if o in started]
    out.append(windows + [(i, len(comp)) for i in started.values()])
  return out


def _most_in_flight(text: str) -> int:
  """The most asynchronous collectives of one computation between their start and their done at once."""
  return max((sum(s <= i < d for s, d in w) for w in _collective_windows(text) for i, _ in w), default=0)


@pytest.mark.cuda
def test_gpu_scheduler_keeps_several_collectives_in_flight(monkeypatch):
  """needs the cuda extra: XLA:GPU keeps up to mesh.GPU_COLLECTIVES_IN_FLIGHT collectives in flight at
  once (Parallelism.compiler_options), so that the all-to-alls need not wait behind the weights'
  all-gathers; its default is one at a time (V3 on h100x256: 236.8 -> 220.5 s a step forecast with 4)."""
  from parallel import mesh as mesh_lib
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2",
                                                        "precision=bf16", "mesh.ep_fast_path=1.5", "mesh.ep_overlap=true"])
  most = {}
  for limit in (1, mesh_lib.GPU_COLLECTIVES_IN_FLIGHT):
    monkeypatch.setattr(mesh_lib, "GPU_COLLECTIVES_IN_FLIGHT", limit)
    most[limit] = _most_in_flight(_compiled(cfg, targets.parse("h100x8")).as_text())
  assert most[1] == 1 and 1 < most[mesh_lib.GPU_COLLECTIVES_IN_FLIGHT] <= mesh_lib.GPU_COLLECTIVES_IN_FLIGHT, most


def _collective_spans(text: str) -> int:
  """Instructions scheduled between each asynchronous collective's start and its done, summed."""
  return sum(d - s - 1 for w in _collective_windows(text) for s, d in w)


@pytest.mark.cuda
def test_early_collectives_start_gpu_collectives_sooner():
  """needs the cuda extra: mesh.early_collectives has XLA:GPU's scheduler start each collective as soon
  as its operands are ready (V3 on h100x256 with fb_overlap and 3 sequences a GPU: 203.8 -> 186.4 s a
  step forecast, docs/pods.md): on 8 H100s the tiny step's collectives have twice the instructions
  between their starts and dones (2646 -> 5396 when measured)."""
  spans = {}
  for early in (False, True):
    cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2",
                                                          "precision=bf16", "mesh.ep_fast_path=1.5",
                                                          "mesh.ep_overlap=true", f"mesh.early_collectives={early}"])
    spans[early] = _collective_spans(_compiled(cfg, targets.parse("h100x8")).as_text())
  assert spans[True] > 1.5 * spans[False], spans


def test_early_collectives_are_searched_on_gpus_and_say_when_they_do_nothing(caplog):
  """--search tries each layout on GPUs also with mesh.early_collectives, right after it without (its
  effect depends on the layout); on TPUs never. Set for a CPU or TPU mesh it says it has no effect."""
  cfg = load_train_config(ROOT / "configs/deepseek-v3-671b.yaml")
  gpu = aot.candidates(cfg, targets.parse("h100x256"), 10_000)
  early = [t for t in gpu if "mesh.early_collectives=true" in t]
  assert early and len(early) * 2 == len(gpu)
  assert all(gpu[gpu.index(t) - 1] == [o for o in t if o != "mesh.early_collectives=true"] for t in early)
  assert ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=64", "mesh.tensor=1", "impl.remat_policy=full_offload",
          "impl.ep_remat=recompute", "mesh.ep_fast_path=1.5", "impl.fb_overlap=true", "mesh.early_collectives=true",
          "per_device_batch=3"] in gpu
  assert not any("mesh.early_collectives=true" in t for t in aot.candidates(cfg, targets.parse("v5p-512"), 10_000))
  with caplog.at_level("WARNING", logger="parallel"):
    par = Parallelism.from_config(MeshConfig(data=1, early_collectives=True), jax.devices()[:1])
  assert "mesh.early_collectives=true has no effect" in caplog.text and "here cpu" in caplog.text
  assert not any(k.startswith("xla_gpu") for k in par.compiler_options())


@pytest.mark.cuda
def test_gpu_steps_with_layer_inputs_in_host_memory_raise_xla_memory_budget():
  """needs the cuda extra: with remat full_offload XLA:GPU's rematerialization counts the layer inputs
  it keeps in host memory as device memory, so the step compiles with mesh.GPU_OFFLOAD_MEMORY_SLOP
  (V3 on h100x256: 213.8 -> 205.7 s a step forecast, the matmuls XLA had recomputed gone, docs/pods.md)
  and without XLA's rematerialization, which still recomputed to fit a peak 13 GiB above the compiled
  one (185.4 -> 179.3 s); other steps, and TPU's, with XLA's default."""
  from parallel import mesh as mesh_lib
  cfg = load_train_config(ROOT / "configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"])
  gpu = Parallelism.from_config(cfg.mesh, targets.devices(targets.parse("h100x8")))
  offload = gpu.compiler_options(host_offload=True)
  assert offload["xla_gpu_memory_limit_slop_factor"] == mesh_lib.GPU_OFFLOAD_MEMORY_SLOP
  assert offload["xla_disable_hlo_passes"] == "rematerialization"
  assert not {"xla_gpu_memory_limit_slop_factor", "xla_disable_hlo_passes"} & set(gpu.compiler_options())
  # the step compiles with it (an unknown pass name or option would fail here)
  cfg = load_train_config(ROOT / "configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "precision=bf16",
                                                        "impl.remat_policy=full_offload"])
  assert _compiled(cfg, targets.parse("h100x8")).memory_analysis() is not None
  tpu = Parallelism.from_config(MeshConfig(data=1, fsdp=2, expert=2), targets.devices(targets.parse("v5p-8")))
  assert not any(k.startswith("xla_gpu") for k in tpu.compiler_options(host_offload=True))


def test_ragged_all_to_alls_fill_buffers_of_their_own():
  """ragged_all_to_all writes into its output buffer in place. Filled with jnp.full / jnp.zeros, the
  buffers of equal shape (the two halves' exchanges, the backward's) were merged by XLA into one fill
  and copied once for each collective: reading and writing each buffer where filling it only writes (V3
  on h100x256: 7 copies of 1 GiB in each layer's backward; 210.7 -> 198.1 s forecast without them).
  Compiled for v5p-8 (expert=4, halves, fast path): 22 of the 58 ragged all-to-alls wrote into a
  copy; now none (parallel/expert_parallel/ragged.py: fresh)."""
  cfg = load_train_config(ROOT / "configs/tiny.yaml", ["mesh.data=1", "mesh.expert=4", "precision=bf16",
                                                        "mesh.ep_overlap=true", "mesh.ep_fast_path=1.5",
                                                        "impl.remat_policy=full"])
  text = _compiled(cfg, targets.parse("v5p-8")).as_text()
  copies = set(re.findall(r"(%\S+) = \S+ copy\(", text))
  outputs = [re.search(r"ragged-all-to-all(?:-start)?\(([^)]*)\)", line).group(1).split(", ")[1]
             for line in text.splitlines() if re.search(r" ragged-all-to-all(?:-start)?\(", line)]
  assert len(outputs) > 20 and not copies & set(outputs), (len(outputs), sorted(copies & set(outputs))[:3])


@pytest.mark.cuda
def test_gpu_fsdp_gathers_the_experts_weights_in_bf16():
  """needs the cuda extra (a compile of about 25 s): the routed experts' weights are cast to bf16 where
  their fsdp shard lies (moe/experts.py: RoutedExperts._weights), so that FSDP gathers bf16. Left to
  itself, XLA:GPU gathered the float32 master weights and cast after (V3 on h100x256: 1.2 of the 1.5
  TB a GPU sent over the hosts' network in all-gathers a step, 220.5 -> 210.7 s forecast). V3's
  layers made small, on 16 H100s (fsdp=2 x expert=8: 32 experts a GPU), the best layout's options;
  this fails (six f32[32,512,512] all-gathers) with the cast left unconstrained."""
  cfg = load_train_config(ROOT / "configs/deepseek-v3-671b.yaml", [
      "mesh.data=1", "mesh.fsdp=2", "mesh.expert=8", "batch_size=32", "impl.remat_policy=full_offload",
      "mesh.ep_fast_path=1.5", "mesh.ep_overlap=true", "model.num_hidden_layers=4", "model.num_nextn_predict_layers=0",
      "model.hidden_size=1024", "model.moe_intermediate_size=512", "model.intermediate_size=1024"])
  text = _compiled(cfg, targets.parse("h100x16")).as_text()
  results = [m.group(1) for m in re.finditer(r"= (.*?) all-gather(?:-start)?\(", text)]  # (start: (operand, result))
  gathered = collections.Counter(t for r in results for t in re.findall(r"(\w+)\[32,512,512\]", r))
  assert gathered["bf16"] > 0 and gathered["f32"] == 0, gathered


@pytest.mark.cuda
def test_gpu_gather_once_gathers_the_experts_bf16_copies():
  """needs the cuda extra: pipeline.gather_once hands each stage its matrices (the experts' weights, the
  projections' kernels) cast to bf16 where their fsdp shard lies, then gathered (train/core/pipelined.py:
  _compute_copies). Left to itself XLA:GPU gathered the float32 stack once and cast it in every tick (the
  tiny bf16 step on h100x8, stage=2 x fsdp=2 x expert=2: 914,480 bytes a GPU gathered once for the
  stack's 907,776 float32 ones; 521,264 with the experts' cast, 461,872 with the kernels' too; XLA:TPU
  gathered bf16 already). V3's layers made small on 16 H100s, 2 stages x fsdp=2 x expert=4; this fails
  with the experts' cast left out (f32[64,1024,512] all-gathers), and with the kernels' left out
  (f32[3,192,24576] ones, the dense layers' q_b, among others)."""
  cfg = load_train_config(ROOT / "configs/deepseek-v3-671b.yaml", [
      "mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.expert=4", "pipeline.gather_once=true", "batch_size=16",
      "seq_len=512", "model.num_hidden_layers=5", "model.num_nextn_predict_layers=0", "model.hidden_size=1024",
      "model.moe_intermediate_size=512", "model.intermediate_size=1024"])
  text = _compiled(cfg, targets.parse("h100x16")).as_text()
  results = [m.group(1) for m in re.finditer(r"= (.*?) all-gather(?:-start)?\(", text)]  # (start: (operand, result))
  gathered = collections.Counter(t for r in results for t in re.findall(r"(\w+)\[64,(?:1024,512|512,1024)\]", r))
  assert gathered["bf16"] > 0 and gathered["f32"] == 0, gathered
  # the projections' kernels too, in the stage and outside it (q_a 1536, kv_a 576, o_proj 16384, q_b 24576)
  kernels = [t for r in results for t in re.findall(r"f32\[([\d,]+)\]", r) if {"1536", "576", "16384", "24576"} & set(t.split(","))]
  assert not kernels, kernels


@pytest.mark.cuda
def test_a_gpu_step_that_does_not_fit_lists_its_largest_buffers(capsys):
  """needs the cuda extra: XLA:GPU compiles a step that does not fit (it only warns), so train.aot
  compares the peak with the HBM itself, says so in one line and, with --buffers, lists the largest
  buffers at the peak: here the float32 embedding table of a 4M-token vocabulary."""
  rc = aot.main(["configs/tiny.yaml", "--target", "h100x1", "model.vocab_size=4000000", "model.hidden_size=2048",
                 "model.num_hidden_layers=1", "model.first_k_dense_replace=1", "model.num_nextn_predict_layers=0",
                 "batch_size=1", "seq_len=64", "--buffers", "3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == aot.EXIT_DOES_NOT_FIT and "does not fit on h100x1: needs" in err[0], err
  assert "of 71.2 GiB per GPU (the 90% of its memory the trainer lets JAX allocate)" in err[0], err  # (0.9 x 79.1)
  assert [line.split(".")[0] for line in err[1:4]] == ["1", "2", "3"], err
  assert any("[4000000,2048]" in line for line in err[1:4]), err


@pytest.mark.cuda
def test_pipeline_executes_the_bubble_and_the_padding_and_nothing_more(capsys):
  """needs the cuda extra (two compiles of about 20 s): DeepSeek-V2-Lite's MoE layers on 64 H100s, 1F1B
  over 4 stages with 16 micro-batches of 16 sequences against the same 256 sequences on fsdp=64, remat
  full. Per GPU the pipelined step executes the unpipelined step's matmul FLOPs times the ticks
  that run a forward (or a backward) slot over M, 16 + 3 of 16 + 2 x 3 (every stage runs them, its
  bubble masked), times its slots over its layers (27 MoE layers in 4 chunks of 7): each forward once.
  The parts outside the pipeline, which run once per micro-batch on every stage's block of rows (the
  dense first layer, the head), are made negligible here (no dense layer, a 1,024-token vocabulary),
  as docs/pods.md's table shows for both models. (Counting every slot of every tick, the forecast said
  (16 + 6) / 16 x 28 / 27.)"""
  common = ("configs/deepseek-v2-lite.yaml", "--target", "h100x64", "mesh.data=1", "precision=bf16",
            "impl.remat_policy=full", "batch_size=256", "per_device_batch=4", "model.first_k_dense_replace=0",
            "model.vocab_size=1024")
  (piped,) = compile_json(capsys, *common, "mesh.stage=4", "mesh.fsdp=16", "pipeline.schedule=1f1b",
                          "pipeline.microbatches=16")
  (plain,) = compile_json(capsys, *common, "mesh.fsdp=64")
  ratio = piped["costs"]["flops"]["matmul"] / plain["costs"]["flops"]["matmul"]
  assert ratio == pytest.approx((16 + 3) / 16 * 28 / 27, rel=0.002)


@pytest.mark.cuda
def test_experts_on_gpu_run_only_their_rows():
  """needs the cuda extra: one expert FFN of 1024 rows over 8 experts, compiled for an H100. XLA:GPU
  turns `ragged_dot` into a dense matmul of every row with every expert's weights (8x the work);
  impl.experts=triton's kernels (moe/kernels/grouped_pallas.py) do each row's expert only."""
  import functools

  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from moe.kernels.expert_ffn import ragged_ffn, triton_ffn
  from train import forecast

  rows, d, f, e = 1024, 256, 512, 8
  mesh = Mesh(targets.devices(targets.parse("h100x8"))[:1], ("x",))
  arg = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
  args = (arg((rows, d)), arg((rows,), jnp.int32), arg((e, d, f)), arg((e, d, f)), arg((e, f, d)))
  chip = forecast.Chip("made-up", 1e15, 1e15, 1e12, 1e12, 1e11, 1e9)
  routed = 3 * 2 * rows * d * f  # gate, up and down, each row through its own expert
  hlo = {name: jax.jit(fn).lower(*args).compile().as_text()
         for name, fn in (("ragged_dot", ragged_ffn), ("triton", functools.partial(triton_ffn, interpret=False)))}
  assert hlo_lib.matmul_flops(hlo["ragged_dot"])["total"] == e * routed
  flops = forecast.summary(forecast.costs(hlo["triton"], chip))["flops"]
  assert hlo_lib.matmul_flops(hlo["triton"])["total"] == 0 and flops["ragged_dot"] == routed


def test_fp8_gathers_the_bf16_copies_of_the_weights():
  """FSDP in FP8 gathers what the FP8 GEMMs quantise, the weights' bf16 copies, as bf16 training
  gathers them: the tiny step on v5p-16 (fsdp=4 x expert=2) gathers no float32 array, and its
  all-gathers' bytes are within 10% of the bf16 step's (measured 508,928 B against 475,136: the
  few the FP8 Wgrad's layout adds; 558,080 against 524,288 while the experts' weights were gathered
  again for the backward, moe/experts.py). Before, it gathered the float32 master weights: V3 on h100x1024
  moved 6.71 TB per GPU and step instead of 3.62 (docs/fp8.md)."""
  gathered = {}
  for precision in ("bf16", "fp8"):
    cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.fsdp=4", "mesh.expert=2",
                                                         f"precision={precision}"])
    m = hlo_parse.parse(_compiled(cfg, targets.parse("v5p-16")).as_text())
    gathered[precision] = [i.shape for i in m.instrs.values() if i.op.startswith("all-gather")]
  total = {p: sum(hlo_parse.shape_bytes(s) for s in shapes) for p, shapes in gathered.items()}
  assert not [s for s in gathered["fp8"] if "f32[" in s], gathered["fp8"]
  assert total["fp8"] <= 1.1 * total["bf16"], total


@pytest.mark.cuda
def test_fp8_kernels_on_a_gpu_mesh_run_on_each_devices_rows():
  """needs the cuda extra: the tiny step in FP8 with the Pallas kernels (impl.fp8_gemm=kernels),
  compiled for h100x8 (fsdp=8, 8 x 128 tokens). XLA does not partition a custom call: the linears'
  FP8 GEMM got all 1,024 rows on every GPU (V3 on h100x1024 needed 1190.1 GiB per GPU so); run
  per device (parallel.sharding.per_row_block) each GEMM has its GPU's 128 rows."""
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.fsdp=8", "mesh.expert=1",
                                                       "precision=fp8", "impl.fp8_gemm=kernels"])
  m = hlo_parse.parse(_compiled(cfg, targets.parse("h100x8")).as_text())
  rows = [hlo_parse.dims(hlo_parse.first_array(i.shape))[0] for i in m.instrs.values()
          if i.op == "custom-call" and "blockscaled_matmul" in i.rest]
  assert rows and max(rows) == 8 * 128 // 8, sorted(set(rows))


# ------------------------------------------------------------------ all-to-all over the slow network
SNIPPET = """HloModule jit_step, is_scheduled=true, num_partitions=8

%body (p: (s32[], bf16[64,8])) -> (s32[], bf16[64,8]) {
  %p = (s32[], bf16[64,8]{1,0}) parameter(0)
  %in = bf16[64,8]{1,0} get-tuple-element(%p), index=1
  %out = bf16[16,8]{1,0} broadcast(%zero), dimensions={}
  %offsets = s64[2]{0} constant({0, 8})
  %r = bf16[16,8]{1,0} ragged-all-to-all(%in, %out, %offsets, %offsets, %offsets, /*index=5*/%offsets), channel_id=3, replica_groups=[4,2]<=[8]
  %sum = f32[4]{0} all-reduce(%zero), channel_id=4, replica_groups=[1,8]<=[8], to_apply=%add
  ROOT %t = (s32[], bf16[64,8]{1,0}) tuple(%i, %in)
}

ENTRY %main.0_spmd (x: f32[16,4]) -> f32[16,4] {
  %x = f32[16,4]{1,0} parameter(0)
  %s = ((f32[16,4]{1,0}), f32[16,4]{1,0}) all-to-all-start(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %d = f32[16,4]{1,0} all-to-all-done(%s)
  %a = f32[16,4]{1,0} all-to-all(%d), channel_id=2, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
  %w = (s32[], bf16[64,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %y = f32[16,4]{1,0} copy(%a)
}
"""


def test_peak_buffers_name_the_arrays_and_the_lines_that_made_them(tmp_path):
  """A program whose peak holds x and sin(x), [256, 256] f32 each: hlo.peak_buffers reads XLA's
  live-range dump and names each buffer's array, bytes and source line (this file)."""
  import inspect

  import jax.numpy as jnp

  def f(x):
    y = jnp.sin(x)
    return (y @ x.T).sum()

  line = inspect.getsourcelines(f)[1] + 1
  jax.jit(f).lower(jnp.ones((256, 256))).compile({"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True})
  live = next(tmp_path.glob("*after_optimizations-live-range.txt"))
  text = live.with_name(live.name.replace("-live-range.txt", ".txt")).read_text()
  rows = hlo_lib.peak_buffers(text, live.read_text(), top=2)
  assert [(r["array"], r["bytes"]) for r in rows] == [("f32[256,256]", 256 * 256 * 4)] * 2, rows
  (param,) = [r for r in rows if r["op"] == "parameter"]
  (sine,) = [r for r in rows if r is not param]  # a fusion, or the bare sine under XLA:CPU's old emitters
  assert sine["op"] in ("fusion", "sine") and f"tests/test_aot.py:{line} (" in sine["source"], rows


def test_peak_buffers_count_a_shared_buffer_once():
  """XLA's live-range dump lists values: a loop's carry and the fusion that updates it in place are two
  values of one buffer. With the buffer-assignment dump (hand-written here) they are one row, named by
  the fusion that wrote it, with one alias; the parameter in its own allocation stays a row."""
  text = """HloModule m

ENTRY %main (x: f32[64,64], y: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %y = f32[64,64]{1,0} parameter(1)
  %w = (s32[], f32[64,64]{1,0}) while(%t), condition=%c, body=%b
  ROOT %upd = f32[64,64]{1,0} fusion(%x, %y), kind=kLoop, calls=%f
}
"""
  live = "Live ranges at 7 (peak):\n  w{1}: 16384 bytes\n  upd{}: 16384 bytes\n  y{}: 16384 bytes\n"
  assignment = ("allocation 0: size 16384, parameter 1, shape |f32[64,64]| at ShapeIndex {}:\n"
                " value: <1 y @0> (size=16384,offset=0): f32[64,64]{1,0}\n"
                "allocation 1: size 16384, preallocated-temp:\n"
                " value: <2 w{1} (phi) @0> (size=16384,offset=0): f32[64,64]{1,0}\n"
                " value: <3 upd @0> (size=16384,offset=0): f32[64,64]{1,0}\n")
  assert len(hlo_lib.peak_buffers(text, live)) == 3  # the values, without the assignment
  rows = hlo_lib.peak_buffers(text, live, assignment=assignment)
  assert [(r["instruction"], r["op"], r["aliases"]) for r in rows] == [("upd", "fusion", 1), ("y", "parameter", 0)]


def fake_devices(ids, process=None, slices=None, platform="gpu"):
  from types import SimpleNamespace
  return [SimpleNamespace(id=i, process_index=process(i) if process else 0, slice_index=slices(i) if slices else 0,
                          platform=platform) for i in ids]


def test_replica_groups_and_slow_a2a_of_hand_written_hlo():
  """Replica groups, explicit and iota (a reshape of iota(N), optionally transposed), and the bytes a
  device sends to other hosts: a group of n with m members elsewhere sends bytes(operand) * m / n."""
  assert hlo_parse.replica_groups("{{0,1,2,3},{4,5,6,7}}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo_parse.replica_groups("{}", 4) == [[0, 1, 2, 3]]
  assert hlo_parse.replica_groups("[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo_parse.replica_groups("[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo_parse.replica_groups("[2,4]<=[4,2]T(1,0)", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
  assert hlo_parse.replica_groups("[2,4]<=[2,2,2]T(2,1,0)", 8) == [[0, 4, 2, 6], [1, 5, 3, 7]]
  # Positions 0..7 are devices 0,4,1,5,2,6,3,7; hosts of 4 devices: positions alternate host 0, 1.
  devices = fake_devices([0, 4, 1, 5, 2, 6, 3, 7], process=lambda i: i // 4)
  r = hlo_links.slow_a2a(SNIPPET, devices)
  rows = {row["name"]: row for row in r["per_instruction"]}
  # the async pair (f32[16,4], 256 bytes) in groups {0,1,2,3}: hosts 0,1,0,1, so m=2 of n=4: 128 bytes
  assert rows["s"] == {"kind": "all-to-all", "name": "s", "operand_bytes": 256, "group": 4, "remote": 2,
                       "bytes_per_device": 128, "times": 1}
  # [2,4]<=[4,2]T(1,0): groups {0,2,4,6} and {1,3,5,7}, each on one host: nothing over the slow network
  assert rows["a"]["remote"] == 0 and rows["a"]["bytes_per_device"] == 0
  # ragged, in the loop body run 5 times: [4,2]<=[8], pairs on two hosts (m=1, n=2); the input is
  # bf16[64,8] (1024 bytes; 512 sent elsewhere), the output bf16[16,8] (256 bytes; balanced: 128)
  assert rows["r"] == {"kind": "ragged-all-to-all", "name": "r", "operand_bytes": 1024, "group": 2, "remote": 1,
                       "bytes_per_device": 512, "times": 5, "balanced_bytes_per_device": 128}
  assert (r["groups"], r["granules"], r["count"], r["upper_bound"]) == ("hosts", 2, 3, True)
  assert (r["bytes_per_device"], r["balanced_bytes_per_device"], r["total_bytes"]) == (640, 256, 8 * 640)
  assert r["per_step"] == {"bytes_per_device": 128 + 5 * 512, "balanced_bytes_per_device": 128 + 5 * 128,
                           "total_bytes": 8 * (128 + 5 * 512), "trip_counts_known": True}
  # a loop without a known trip count (XLA:TPU records none) counts once, and says so
  r = hlo_links.slow_a2a(SNIPPET.replace(', backend_config={"known_trip_count":{"n":"5"}}', ""), devices)
  assert r["per_step"]["bytes_per_device"] == 640 and not r["per_step"]["trip_counts_known"]
  # one host: nothing is slow
  assert hlo_links.slow_a2a(SNIPPET, fake_devices(range(8)))["bytes_per_device"] == 0
  # TPU multi-slice: a collective crossing slices is a megascale send, its groups as device ids
  send = ('  %send = (f32[4,8]{1,0:T(4,128)}, u32[], token[]) send(%x, %after-all), channel_id=2,'
          ' is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous='
          '"all_to_all.9_0",_xla_megascale_target={{100000,200000,100001,200001}},_xla_megascale_transfer_type='
          '"ALL_TO_ALL"}\n')
  tpu = fake_devices([100000, 100001, 200000, 200001], slices=lambda i: i // 100000 - 1, platform="tpu")
  r = hlo_links.slow_a2a("HloModule m, num_partitions=2\n" + send, tpu)
  assert (r["groups"], r["granules"], r["count"], r["bytes_per_device"], r["total_bytes"]) == ("slices", 2, 1, 64, 256)
  assert not r["upper_bound"]


def test_slices_take_the_data_axis():
  """On 4 slices the data axis spans them: a one-pod layout (data=1, fsdp=-1, as DeepSeek-V3's config)
  becomes data=4 over the slow links (fsdp shrinks to the rest); data=-1 keeps its size; an explicit
  mesh.dcn_* is left as given; one slice changes nothing."""
  v3 = load_train_config(ROOT / "configs/deepseek-v3-671b.yaml")
  four = targets.parse("v6e-256", 4)
  got = aot.for_target(v3, four).mesh
  assert (got.data, got.dcn_data, got.fsdp, got.expert) == (4, 4, -1, 8)
  flat = load_train_config(ROOT / "configs/tiny.yaml", ["mesh.fsdp=1", "mesh.data=-1"])
  assert (aot.for_target(flat, four).mesh.data, aot.for_target(flat, four).mesh.dcn_data) == (-1, 4)
  given = load_train_config(ROOT / "configs/tiny.yaml", ["mesh.data=1", "mesh.fsdp=-1", "mesh.dcn_fsdp=4"])
  assert aot.for_target(given, four).mesh == given.mesh
  assert aot.for_target(v3, targets.parse("v6e-256", 1)) is v3


def test_slow_a2a_across_tpu_slices(capsys):
  """A real compile for 2 slices of v5p-8: an all_to_all over a mesh axis that crosses the slices
  (it becomes a megascale transfer) against bytes(operand) * m / n from the devices' slice_index; the
  training step, whose expert axis stays inside a slice (parallel/mesh.py), sends nothing over the DCN."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = targets.devices(targets.parse("v5p-8", slices=2))
  order = [devices[i] for i in (0, 4, 1, 5, 2, 6, 7, 3)]  # slices 0-3 | 4-7: along "a", groups of 3 + 1 per slice
  mesh = Mesh(np.array(order).reshape(4, 2), ("a", "b"))
  spec = P(("a", "b"))
  f = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, "a", 0, 0, tiled=True), mesh=mesh, in_specs=spec,
                            out_specs=spec))
  compiled = f.lower(jax.ShapeDtypeStruct((8 * 16, 64), jnp.float32, sharding=NamedSharding(mesh, spec))).compile()
  assert [d.id for d in hlo_links.device_assignment(compiled, mesh)] == [d.id for d in order]
  r = hlo_links.slow_a2a(compiled.as_text(), hlo_links.device_assignment(compiled, mesh))
  operand = 16 * 64 * 4  # each device's [16, 64] float32 block
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  sent = [operand * sum(o != s for o in column) / 4 for column in slices.T for s in column]
  assert (r["groups"], r["granules"], r["count"]) == ("slices", 2, 1)
  assert r["bytes_per_device"] == max(sent) == operand * 3 / 4 and r["total_bytes"] == sum(sent)
  (step,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5p-8", "--slices", "2", "mesh.expert=4",
                         *SMALL[:-2], "batch_size=8", "seq_len=64")
  assert step["mesh"]["data"] == 2 and step["collectives"]["ragged-all-to-all"]["count"] > 0
  slow = step["slow_a2a"]
  assert (slow["groups"], slow["granules"], slow["bytes_per_device"], slow["per_step"]["bytes_per_device"]) == \
      ("slices", 2, 0, 0) and slow["count"] > 0


def test_gather_overlap_only_on_v5e(capsys):
  """mesh.gather_overlap (libtpu's continuation fusion of all-gathers) compiles on v5e, whose all-
  gathers are asynchronous, and is one line of error on any other TPU: libtpu 0.0.50 refuses it there
  (incorrect results, hangs, silent data corruption), and `--search` does not try it there."""
  (r,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5e-16", *V5P16, "mesh.gather_overlap=true")
  assert r["costs"]["collective_bytes"]["all-gather"]["async"] > 0
  assert aot.main(["configs/tiny.yaml", "--target", "v5p-16", *V5P16, "mesh.gather_overlap=true"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "on TPU v5e only, not on TPU v5 " in err[0] and "mesh.gather_overlap=false" in err[0], err


def test_ep_overlap_makes_the_all_to_alls_asynchronous_on_tpu(capsys):
  """mesh.ep_overlap on v5p: libtpu compiles all-to-alls synchronously unless asked
  (Parallelism.compiler_options); with the two halves of each MoE layer's tokens the schedule puts
  compute between the start and the done of most exchanges. With the two-level dispatch and
  redundant experts too (the ragged exchanges' own gradient, custom_vjp, compiles with groups)."""
  (split,) = compile_json(capsys, "configs/tiny.yaml", "--target", "v5p-16", "mesh.data=2", "mesh.expert=4",
                          "batch_size=8", "seq_len=256", "mesh.ep_overlap=true", "mesh.ep_nodes=2",
                          "mesh.redundant_experts=4")
  a2a = split["async_a2a"]  # (without ep_overlap: all synchronous, test_compiles_for_v5p_with_...)
  assert a2a["async"] > a2a["sync"] and a2a["overlapped"] >= 0.8 * a2a["async"]
  assert split["collectives"]["ragged-all-to-all"]["count"] > 0


def test_full_offload_keeps_the_layer_inputs_in_host_memory():
  """impl.remat_policy=full_offload compiled for v5p-8 (4 chips, fsdp=4, one 2048-token sequence each):
  the inputs the full policy keeps for the 4 layers, [1, 2048, 128] float32 = 1 MiB a layer, are in
  host memory (hand-counted; libtpu holds one layer's more there, 5 MiB in all), and the stack of the 3
  MoE layers' inputs, on the device at the full policy's peak, is not on it at full_offload's."""
  overrides = ["mesh.data=1", "mesh.fsdp=4", "batch_size=4", "seq_len=2048", "model.max_position_embeddings=4096",
               "model.num_nextn_predict_layers=0"]
  cfg = load_train_config(ROOT / "configs/tiny.yaml", overrides + ["impl.remat_policy=full_offload"])
  s = loop.setup(cfg, Parallelism.from_config(cfg.mesh, targets.devices(targets.parse("v5p-8"))))
  host = s.train_step.lower(s.abstract_state, s.batch_spec(4, 2048)).compile().memory_analysis().host_temp_size_in_bytes
  inputs = 4 * 1 * 2048 * 128 * 4
  assert inputs <= host <= inputs * 5 // 4, host
  stack = "f32[3,1,2048,128]"
  out = {p: aot.compile_for(load_train_config(ROOT / "configs/tiny.yaml", overrides + [f"impl.remat_policy={p}"]),
                            targets.parse("v5p-8"), buffers=40) for p in ("full", "full_offload")}
  peak = {p: [b["array"] for b in o["peak_buffers"]] for p, o in out.items()}
  assert stack in peak["full"] and stack not in peak["full_offload"], peak
  # the forecast moves them over PCIe: out in the forward, back in the backward, the layers' inputs each
  # way (what the compiler holds in host memory); none with the full policy
  moved = out["full_offload"]["costs"]["host_transfers"]
  assert inputs <= moved["to-host"]["bytes"] == moved["from-host"]["bytes"] <= host, moved
  assert not out["full"]["costs"]["host_transfers"]


def test_accumulated_gradients_need_no_second_copy_of_the_stacks(monkeypatch):
  """grad_accum=2 with remat full, compiled for v5p-8 (fsdp=4; experts made large so that weights
  dominate): the layer stacks add their gradient into the accumulator in their backward scans
  (moe/decoder.py: accumulating), so the step's temporaries are smaller than with the micro-batch's
  gradient returned whole and added after, by at least the stacks' float32 parameters per device. The
  forecast names the lines that made the backward's operations: JAX traces a custom_vjp's backward
  under its call's traceback, which named `accumulating`'s one call the source of half this step."""
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [
      "mesh.data=1", "mesh.fsdp=4", "batch_size=8", "grad_accum=2", "seq_len=64", "model.moe_intermediate_size=1024",
      "model.num_nextn_predict_layers=0", "impl.remat_policy=full"])
  temps = {}
  for in_stacks in (True, False):
    if not in_stacks:  # the micro-batch's whole gradient, added after
      plain = step_lib.accumulated
      monkeypatch.setattr(step_lib, "accumulated", lambda *a: plain(*a[:6], False))
    s = loop.setup(cfg, Parallelism.from_config(cfg.mesh, targets.devices(targets.parse("v5p-8"))))
    compiled = s.train_step.lower(s.abstract_state, s.batch_spec(8, 64)).compile()
    temps[in_stacks] = compiled.memory_analysis().temp_size_in_bytes
    if in_stacks:
      cost = forecast.costs(compiled.as_text(), forecast.chip_of("v5p"))
      named = collections.Counter()
      for (_, source), t in cost.where.items():
        named[source.split(" ")[-1]] += t / cost.time
      assert named["(accumulating)"] < 0.01 and named["(add_layer.<locals>.<lambda>)"] > 0.001, named  # (the backward's gradient add)
  stacks = aot.per_device_bytes([s.abstract_state["params"][k] for k in ("dense_layers", "moe_layers")])
  assert stacks > 8e6 and temps[False] - temps[True] >= stacks, (temps, stacks)


FB_OVERLAP = [*SMALL, "mesh.data=1", "mesh.expert=4", "grad_accum=2", "model.num_hidden_layers=3", "precision=bf16",
              "model.num_nextn_predict_layers=0", "mesh.ep_fast_path=1.5", "impl.remat_policy=full", "impl.fb_overlap=true"]


def test_fb_overlap_runs_both_passes_exchanges_in_one_loop():
  """impl.fb_overlap compiled for v5p-8 (expert=4, ragged, 2 micro-batches, 2 MoE layers): one loop
  body holds micro-batch m's forward exchange (rows there, results back), m-1's exchange run
  again in its recomputed layer and that exchange's transposes, so the scheduler can run each pass's
  all-to-alls beside the other's work; the plain accumulation's loops hold one pass each (its forward
  and backward are both traced under jvp, hence the count of loops, not the names). In both, the split
  into micro-batches moves no token between devices (train/core/loss.py: micro_batches; micro-batches
  of contiguous rows had XLA gather and permute the batch's int32 [rows, 128] arrays over the mesh)."""
  bodies, transfers = {}, ("all-gather", "collective-permute", "all-to-all", "ragged-all-to-all")
  for fb in (True, False):
    text = _compiled(load_train_config(ROOT / "configs/tiny.yaml", [*FB_OVERLAP, f"impl.fb_overlap={fb}"]),
                     targets.parse("v5p-8")).as_text()
    kinds, moved = collections.defaultdict(collections.Counter), []
    for comp, instrs in hlo_parse.parse(text).comps.items():
      for ins in instrs:
        if ins.op.removesuffix("-start") in transfers and re.search(r"s32\[[0-9,]*,128\]", ins.shape):
          moved.append(f"{ins.name} = {ins.shape} {ins.op}")  # the batch's token arrays sent between devices
        name = re.search(r'op_name="([^"]*)"', ins.rest)
        if ins.op.startswith("ragged-all-to-all") and not ins.op.endswith("-done") and "/ep_fast_path/" in name.group(1):
          kinds[comp]["transposed" if "transpose(" in name.group(1) else "recomputed" if "jvp(" in name.group(1)
                      else "forward"] += 1
    assert not moved, moved[:3]
    bodies[fb] = [dict(k) for k in kinds.values()]
  assert {"forward": 2, "recomputed": 2, "transposed": 2} in bodies[True], bodies[True]
  assert all(len(k) == 1 for k in bodies[False]), bodies[False]  # (each loop one pass of the plain step)


@pytest.mark.cuda
def test_gpu_fb_overlap_hides_each_pass_exchanges_under_the_other():
  """needs the cuda extra: impl.fb_overlap compiled for h100x8 (fsdp=2 x expert=4, the tiny model in
  bf16, 2 micro-batches): in the loop that runs micro-batch m's forward beside m-1's backward, every
  asynchronous ragged all-to-all of the forward has backward kernels scheduled between its start and
  done, and some of the backward's have forward kernels (each pass's exchange under the other's
  compute, which is what the overlap is for; a start's pass is read from the instructions that made its
  rows, XLA:GPU's starts carrying no op_name). And no copy of the layer inputs' whole buffer: the
  backward's read of its slot, kept alive past the forward's write into that slot, made XLA copy the
  [L, ...] buffer twice an iteration (V3 on h100x256: 15 s a step); with the read's optimization
  barrier taken out of train/core/overlapped.py this fails (2 copies of bf16[2,1,128,64])."""
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [*FB_OVERLAP, "mesh.fsdp=2", "batch_size=16"])
  text = _compiled(cfg, targets.parse("h100x8")).as_text()
  exchanges = []  # (computation, the start's pass, the passes of the kernels between its start and done)
  for comp, instrs in hlo_parse.parse(text).comps.items():
    by_name = {ins.name: ins for ins in instrs}

    def pass_of(ins, depth=0):  # m-1's backward (under jax.vjp: jvp(), transpose) or m's forward
      name = re.search(r'op_name="([^"]*)"', ins.rest)  # (else the first operand up the chain that is named)
      if name or depth > 30:
        return ("backward" if "jvp(" in name.group(1) else "forward") if name else None
      return next(filter(None, (pass_of(by_name[o], depth + 1) for o in hlo_parse.operands(ins.rest) if o in by_name)),
                  None)

    for k, start in enumerate(instrs):
      if start.op == "ragged-all-to-all-start":
        done = next(j for j in range(k + 1, len(instrs)) if start.name in hlo_parse.operands(instrs[j].rest))
        under = collections.Counter(pass_of(ins) for ins in instrs[k + 1:done] if ins.op in ("fusion", "custom-call"))
        exchanges.append((comp, pass_of(start), under))
  passes = collections.defaultdict(set)
  for comp, own, _ in exchanges:
    passes[comp].add(own)
  (body,) = [comp for comp, both in passes.items() if both == {"forward", "backward"}]
  mine = [(own, under) for comp, own, under in exchanges if comp == body]
  assert all(under["backward"] > 0 for own, under in mine if own == "forward"), mine
  assert any(under["forward"] > 0 for own, under in mine if own == "backward"), mine
  buffer = re.compile(r"= bf16\[2,1,128,64\]\S* copy\(")  # [MoE layers, rows, sequence, hidden] a GPU
  assert re.search(r"= bf16\[2,1,128,64\]\S* dynamic-update-slice\(", text) and not buffer.search(text)


def _compiled(cfg, target):
  """`cfg`'s training step compiled for `target` as train.aot compiles it."""
  cfg = aot.for_target(cfg, target)
  par = Parallelism.from_config(cfg.mesh, targets.devices(target), cfg.pipeline)
  cfg = loop.on_mesh(cfg, par)
  s = loop.setup(cfg, par)
  return s.train_step.lower(s.abstract_state, s.batch_spec(cfg.batch_size, cfg.seq_len)).compile()


def test_vocab_parallel_head_is_never_gathered_across_slices():
  """mesh.vocab_parallel on 2 v5p-16 slices (fsdp=16, 2 across the slices; a vocabulary of 32,768 and
  256 tokens a chip, so a device's tokens x fsdp < vocabulary): the plain head all-gathers its whole
  weight [64, 32768] and sums its whole gradient; vocabulary-parallel, no instruction holds the whole
  weight, no collective moves more than the plain step's largest, and the peak is lower. (Across
  slices the batch's rows must be one all-gather away from the head's, fsdp last: with fsdp first
  XLA re-laid the layers' activations out whole, 113 GiB a chip for a V3-sized proxy.)"""
  over = [*SMALL, "model.vocab_size=32768", "seq_len=256", "batch_size=16", "mesh.data=1", "mesh.fsdp=-1",
          "mesh.dcn_fsdp=2", "mesh.expert=1"]
  target = targets.parse("v5p-16", slices=2)
  out = {}
  for vp in (False, True):
    compiled = _compiled(load_train_config(ROOT / "configs/tiny.yaml", [*over, f"mesh.vocab_parallel={vp}"]), target)
    m = hlo_parse.parse(compiled.as_text())
    whole = [i for i in m.instrs.values() if hlo_parse.first_array(i.shape) and
             sorted(hlo_parse.dims(hlo_parse.first_array(i.shape))) == [64, 32768]]
    moved = [hlo_parse.shape_bytes(i.shape) for i in m.instrs.values() if hlo_parse.collective_kind(i.op)]
    mem = compiled.memory_analysis()
    out[vp] = {"whole": {i.op for i in whole}, "largest": max(moved), "temp": mem.temp_size_in_bytes}
  assert "all-gather" in out[False]["whole"] or "all-gather-start" in out[False]["whole"], out
  assert not out[True]["whole"] and out[True]["largest"] <= out[False]["largest"], out
  assert out[True]["temp"] < out[False]["temp"], out


def test_a_compiler_error_is_one_line(capsys, monkeypatch):
  """A compiler error other than memory (libtpu's "Assigned barrier is not acceptable for opcode:
  ragged-all-to-all", met compiling V3 at 32K with the ring on v5p-512) is one line naming the target
  and the compiler's last line, exit code 4; --search records it as the layout's row and goes on."""
  import jax

  def refuse(self, *a, **k):
    raise jax.errors.JaxRuntimeError("INTERNAL: a long report\nINTERNAL: Assigned barrier is not acceptable")

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  rc = aot.main(["configs/tiny.yaml", "--target", "v5p-8", *SMALL])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == aot.EXIT_COMPILER_FAILED == 4
  assert err == ["configs/tiny.yaml: the compiler for v5p-8 failed on this layout: INTERNAL: Assigned barrier is"
                 " not acceptable"], err
  rows = aot.search("configs/tiny.yaml", SMALL, targets.parse("v5p-8"), 2)
  assert len(rows) == 2 and all(not r["fits"] and r["why"].startswith("the compiler for v5p-8 failed") for r in rows)
