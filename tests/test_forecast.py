"""train/forecast.py and train/hlo_loops.py's loop reader on hand-written HLO: trip counts from a loop's
condition, FLOPs, HBM bytes, collective bytes per link for a made-up device assignment, async
overlap, and the forecast of a program whose time is counted by hand on a made-up chip."""

import json

import pytest

from parallel import targets
from parallel.common.errors import ConfigError
from train import forecast
from train import hlo as hlo_lib
from train import hlo_loops, hlo_parse
from train import hlo_report

# A scan the way XLA:TPU compiles it: no known_trip_count; the condition compares element 0 of the
# loop's tuple with 7, the counter starts at copy(constant(1)) and the body adds 2: i = 1, 3, 5 -> 3 trips.
LOOP = """HloModule jit_step, is_scheduled=true, num_partitions=4

%cond (p.1: (s32[], bf16[64,32])) -> pred[] {
  %p.1 = (s32[], bf16[64,32]{1,0}) parameter(0)
  %limit = s32[] constant(7)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

%body (p.2: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {
  %p.2 = (s32[], bf16[64,32]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %x.2 = bf16[64,32]{1,0} get-tuple-element(%p.2), index=1
  %w = bf16[32,32]{1,0} constant({...})
  %y = bf16[64,32]{1,0} dot(%x.2, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i.2, %two)
  ROOT %t = (s32[], bf16[64,32]{1,0}) tuple(%next, %y)
}

ENTRY %main (x: bf16[64,32]) -> bf16[64,32] {
  %x = bf16[64,32]{1,0} parameter(0)
  %one = s32[] constant(1)
  %start = s32[] copy(%one)
  %init = (s32[], bf16[64,32]{1,0}) tuple(%start, %x)
  %w.1 = (s32[], bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[64,32]{1,0} get-tuple-element(%w.1), index=1
}
"""


def test_trip_count_from_the_condition():
  body_flops = 2 * 64 * 32 * 32
  assert hlo_loops.trip_counts(LOOP) == {"body": 3}
  assert hlo_lib.matmul_flops(LOOP) == {"dot": 3 * body_flops, "ragged_dot": 0, "convolution": 0, "gemm": 0,
                                        "total": 3 * body_flops, "trip_counts_known": True}
  # written the other way round (7 > i), and counting to 7 inclusive (i <= 7: 1, 3, 5, 7)
  flipped = LOOP.replace("compare(%i.1, %limit), direction=LT", "compare(%limit, %i.1), direction=GT")
  assert hlo_loops.trip_counts(flipped) == {"body": 3}
  assert hlo_loops.trip_counts(LOOP.replace("direction=LT", "direction=LE")) == {"body": 4}
  # XLA:GPU's fused compare: the constant and the counter enter a fusion as its parameters
  fused = LOOP.replace("  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT\n",
                       "  ROOT %lt = pred[] fusion(%i.1, %limit), kind=kLoop, calls=%fused_lt\n").replace(
      "%cond (p.1", "%fused_lt (a: s32[], b: s32[]) -> pred[] {\n  %a = s32[] parameter(0)\n  %b = s32[] parameter(1)\n"
      "  ROOT %c = pred[] compare(%a, %b), direction=LT\n}\n\n%cond (p.1")
  assert hlo_loops.trip_counts(fused) == {"body": 3}
  # libtpu 0.0.50's shorthand for a tuple's element, `%p.1#0` (MaxText's compiled step reads so)
  shorthand = LOOP.replace("compare(%i.1, %limit)", "compare(%p.1#0, %limit)")
  assert "%p.1#0" in shorthand and hlo_loops.trip_counts(shorthand) == {"body": 3}
  # a known_trip_count wins; a condition it cannot read leaves the loop unknown (counted once)
  known = LOOP.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"9"}}')
  assert hlo_loops.trip_counts(known) == {"body": 9}
  unknown = LOOP.replace("%limit = s32[] constant(7)", "%limit = s32[] get-tuple-element(%p.1), index=0")
  assert hlo_loops.trip_counts(unknown) == {} and not hlo_lib.matmul_flops(unknown)["trip_counts_known"]


def test_mesh_replica_groups():
  """libtpu's replica groups name a mesh's axes: iota(8) as [4, 2], grouped along the named axes."""
  assert hlo_parse.replica_groups("mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
  assert hlo_parse.replica_groups("mesh['axis_0'=4,'axis_1'=2] {'axis_1'}", 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert hlo_parse.replica_groups("mesh['axis_0'=4,'axis_1'=2] {'axis_0','axis_1'}", 8) == [list(range(8))]
  line = "x, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={1}"
  assert hlo_parse.GROUPS.search(line).group(1) == "mesh['axis_0'=4,'axis_1'=1] {'axis_0'}"


# Collectives of 8 devices whose granules (hosts, say) are pairs: position i is on host i // 2.
COLLECTIVES = """HloModule m, is_scheduled=true, num_partitions=8

ENTRY %main (a: f32[2,4], b: bf16[16], c: f32[8], d: f32[4,4]) -> f32[8,4] {
  %a = f32[2,4]{1,0} parameter(0)
  %b = bf16[16]{0} parameter(1)
  %c = f32[8]{0} parameter(2)
  %d = f32[4,4]{1,0} parameter(3)
  %ag = f32[8,4]{1,0} all-gather(%a), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar = bf16[16]{0} all-reduce(%b), channel_id=2, replica_groups=[4,2]<=[8], to_apply=%add
  %aa = f32[8]{0} all-to-all(%c), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = f32[1,4]{1,0} reduce-scatter(%d), channel_id=4, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, to_apply=%add
  %cp = f32[4,4]{1,0} collective-permute(%d), channel_id=5, source_target_pairs={{0,1},{1,2}}
  ROOT %r = f32[8,4]{1,0} copy(%ag)
}
"""


def test_collective_bytes_per_link_by_hand():
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  s = forecast.summary(forecast.costs(COLLECTIVES, chip, granule=lambda i: i // 2))["collective_bytes"]
  # all-gather: result f32[8,4] = 128 bytes, a device receives (n-1)/n of it = 96; {0,1,2,3} spans hosts 0, 1,
  # two members on each: the other host's two shards (64 bytes) come over the two members' slow links, 32
  # each, then the host's other member's two shards (its own and the one it fetched) over the fast link
  assert s["all-gather"] == {"fast": 64, "slow": 32, "sync": 1}
  # all-reduce of 32 bytes in pairs {0,1},{2,3},... each on one host: 2 x 32 x 1/2 over the fast link
  assert s["all-reduce"] == {"fast": 32, "slow": 0, "sync": 1}
  # all-to-all of 32 bytes in groups of 4 on two hosts: 1/4 to the host's other member, 2/4 to the other host
  assert s["all-to-all"] == {"fast": 8, "slow": 16, "sync": 1}
  # reduce-scatter of 64 bytes along 'y' (4 positions: 0-3, two hosts of two): as the all-gather, the other
  # host's half shared by two slow links (16 bytes each), half of it inside the host
  assert s["reduce-scatter"] == {"fast": 32, "slow": 16, "sync": 1}
  # one member per host (a device's group {0, 2, 4, 6}): all of (n-1)/n over its own slow link
  rail = COLLECTIVES.replace("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}\n  %ar",
                             "replica_groups={{0,2,4,6},{1,3,5,7}}, dimensions={0}\n  %ar")
  assert rail != COLLECTIVES
  apart = forecast.summary(forecast.costs(rail, chip, granule=lambda i: i // 2))["collective_bytes"]
  assert apart["all-gather"] == {"fast": 0, "slow": 96, "sync": 1}
  # split=False (train.aot's context report: what moves among one granule's devices only): a group that
  # spans hosts is all slow
  flat = forecast.summary(forecast.costs(COLLECTIVES, chip, granule=lambda i: i // 2, split=False))["collective_bytes"]
  assert flat["all-gather"] == {"fast": 0, "slow": 96, "sync": 1} and flat["all-reduce"] == s["all-reduce"]
  # collective-permute 0->1 (one host), 1->2 (two): the 64-byte array over the slow link
  assert s["collective-permute"] == {"fast": 0, "slow": 64, "sync": 1}
  # all on one host: nothing slow
  one = forecast.summary(forecast.costs(COLLECTIVES, chip))["collective_bytes"]
  assert all(v["slow"] == 0 for v in one.values()) and one["all-gather"]["fast"] == 96


# One matmul and one all-reduce: bf16[128,256] x bf16[256,512] on a chip of 1 TFLOP/s, 1 GB/s of
# HBM and 1 GB/s of link.
MATMUL = """HloModule m, is_scheduled=true, num_partitions=4

%fused_dot (p0: bf16[128,256], p1: bf16[256,512]) -> bf16[128,512] {
  %p0 = bf16[128,256]{1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[128,256], w: bf16[256,512], g: bf16[128,512]) -> bf16[128,512] {
  %x = bf16[128,256]{1,0} parameter(0)
  %w = bf16[256,512]{1,0} parameter(1)
  %g = bf16[128,512]{1,0} parameter(2)
  %sum = bf16[128,512]{1,0} all-reduce(%g), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  ROOT %z = bf16[128,512]{1,0} add(%y, %sum)
}
"""


# libtpu on tpu7x runs collectives on the SparseCores: an asynchronous call of a computation holding
# the collective (async_execution_thread="sparsecore"), here MATMUL's all-reduce around its matmul.
SPARSECORE = MATMUL.replace(
    "ENTRY %main", "%called_computation (q: bf16[128,512]) -> bf16[128,512] {\n  %q = bf16[128,512]{1,0} parameter(0)\n"
    "  ROOT %ar = bf16[128,512]{1,0} all-reduce(%q), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add\n}\n\n"
    "ENTRY %main").replace(
    "  %sum = bf16[128,512]{1,0} all-reduce(%g), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add\n"
    "  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot\n",
    "  %s = ((bf16[128,512]{1,0}), bf16[128,512]{1,0}, u32[]{:S(8)}) call-start(%g), async_execution_thread=\"sparsecore\", "
    "to_apply=%called_computation\n"
    "  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot\n"
    "  %sum = bf16[128,512]{1,0} call-done(%s)\n")


# impl.remat_policy=full_offload's copies: 1 MiB to host memory while the matmul above runs, and back
# with nothing between its start and done.
HOST = """HloModule m, is_scheduled=true, num_partitions=1

%fused_dot (p0: bf16[128,256], p1: bf16[256,512]) -> bf16[128,512] {
  %p0 = bf16[128,256]{1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[128,256], w: bf16[256,512], a: f32[256,1024]) -> (bf16[128,512], f32[256,1024]) {
  %x = bf16[128,256]{1,0} parameter(0)
  %w = bf16[256,512]{1,0} parameter(1)
  %a = f32[256,1024]{1,0} parameter(2)
  %out = (f32[256,1024]{1,0:S(5)}, f32[256,1024]{1,0}, u32[]{:S(2)}) copy-start(%a)
  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %off = f32[256,1024]{1,0:S(5)} copy-done(%out)
  %in = (f32[256,1024]{1,0}, f32[256,1024]{1,0:S(5)}, u32[]{:S(2)}) copy-start(%off)
  %back = f32[256,1024]{1,0} copy-done(%in)
  ROOT %t = (bf16[128,512]{1,0}, f32[256,1024]{1,0}) tuple(%y, %back)
}
"""


def test_host_transfers_by_hand():
  """A chip of 1 GB/s HBM and 1 GB/s to its host: the matmul is memory-bound (458,752 bytes, 458.8 us);
  the 1 MiB copy out runs under it and waits 1048.6 - 458.8 us, the copy back waits all its 1048.6 us:
  the step is exactly the two copies."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e12, 1e12, 1e9)
  cost = forecast.costs(HOST, chip)
  s = forecast.summary(cost)
  mib = 256 * 1024 * 4
  assert s["host_transfers"] == {"to-host": {"bytes": mib, "count": 1}, "from-host": {"bytes": mib, "count": 1}}
  assert not s["collective_bytes"]
  dot = 2 * (128 * 256 + 256 * 512 + 128 * 512) / 1e9
  assert cost.compute == pytest.approx(dot)
  assert cost.exposed == pytest.approx(2 * mib / 1e9 - dot)
  assert cost.time == pytest.approx(2 * mib / 1e9)
  assert s["async"]["to-host"] == {"count": 1, "comm_s": pytest.approx(mib / 1e9), "hidden_s": pytest.approx(dot)}


# The same moves as XLA:GPU writes them into and out of a host buffer of layer inputs (remat full_offload's
# stack, impl.fb_overlap's): fusion-starts of computations holding one dynamic-update-slice / dynamic-slice
# (the read's result copied, as XLA:GPU writes remat full_offload's).
HOST_GPU = """HloModule m, is_scheduled=true, num_partitions=1

%fused_dot (p0: bf16[128,256], p1: bf16[256,512]) -> bf16[128,512] {
  %p0 = bf16[128,256]{1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%wrapped_dynamic-update-slice_computation (q0: f32[4,256,1024], q1: f32[1,256,1024], q2: s32[]) -> f32[4,256,1024] {
  %q0 = f32[4,256,1024]{2,1,0:S(5)} parameter(0)
  %q1 = f32[1,256,1024]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,256,1024]{2,1,0:S(5)} dynamic-update-slice(%q0, %q1, %q2, %z, %z)
}

%wrapped_dynamic-slice_computation (r0: f32[4,256,1024], r1: s32[]) -> f32[1,256,1024] {
  %r0 = f32[4,256,1024]{2,1,0:S(5)} parameter(0)
  %r1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,256,1024]{2,1,0} dynamic-slice(%r0, %r1, %z, %z), dynamic_slice_sizes={1,256,1024}
  ROOT %c = f32[1,256,1024]{2,1,0} copy(%ds)
}

ENTRY %main (x: bf16[128,256], w: bf16[256,512], a: f32[1,256,1024], buf: f32[4,256,1024], i: s32[]) -> (bf16[128,512], f32[1,256,1024]) {
  %x = bf16[128,256]{1,0} parameter(0)
  %w = bf16[256,512]{1,0} parameter(1)
  %a = f32[1,256,1024]{2,1,0} parameter(2)
  %buf = f32[4,256,1024]{2,1,0:S(5)} parameter(3)
  %i = s32[] parameter(4)
  %out = ((f32[4,256,1024]{2,1,0:S(5)}, f32[1,256,1024]{2,1,0}, s32[]), f32[4,256,1024]{2,1,0:S(5)}, u32[]) fusion-start(%buf, %a, %i), kind=kLoop, calls=%wrapped_dynamic-update-slice_computation
  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %off = f32[4,256,1024]{2,1,0:S(5)} fusion-done(%out)
  %in = ((f32[4,256,1024]{2,1,0:S(5)}, s32[]), f32[1,256,1024]{2,1,0}, u32[]) fusion-start(%off, %i), kind=kLoop, calls=%wrapped_dynamic-slice_computation
  %back = f32[1,256,1024]{2,1,0} fusion-done(%in)
  ROOT %t = (bf16[128,512]{1,0}, f32[1,256,1024]{2,1,0}) tuple(%y, %back)
}
"""


def test_host_transfers_as_the_gpu_program_writes_them():
  """HOST's two moves as XLA:GPU writes them (a layer input's slice into a host buffer and back, each a
  fusion-start of a wrapped dynamic-update-slice / dynamic-slice): the same bytes, times and exposure
  (they were read as kernels, their PCIe time not counted: V3's full_offload step on h100x256)."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e12, 1e12, 1e9)
  cost, want = forecast.costs(HOST_GPU, chip), forecast.costs(HOST, chip)
  s = forecast.summary(cost)
  mib = 256 * 1024 * 4
  assert s["host_transfers"] == {"to-host": {"bytes": mib, "count": 1}, "from-host": {"bytes": mib, "count": 1}}
  assert cost.compute == pytest.approx(want.compute)
  assert cost.exposed == pytest.approx(want.exposed) and cost.time == pytest.approx(want.time)


# The FP8 Pallas kernels (moe/kernels/fp8_pallas.py) as the compiled GPU program holds them: a linear's
# blockscaled GEMM [256, 512] @ [512, 384] and an expert Fprop of 256 rows x [512 -> 384].
FP8 = """HloModule m, is_scheduled=true, num_partitions=1

ENTRY %main (qa: f8e4m3fn[256,512], qb: f8e4m3fn[512,384], sa: f32[256,4], sb: f32[4,3], w: f8e4m3fn[8,512,384]) -> (f32[256,384], f32[256,384]) {
  %qa = f8e4m3fn[256,512]{1,0} parameter(0)
  %qb = f8e4m3fn[512,384]{1,0} parameter(1)
  %sa = f32[256,4]{1,0} parameter(2)
  %sb = f32[4,3]{1,0} parameter(3)
  %w = f8e4m3fn[8,512,384]{2,1,0} parameter(4)
  %lin = f32[256,384]{1,0} custom-call(%qa, %qb, %sa, %sb), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={f8e4m3fn[256,512]{1,0}, f8e4m3fn[512,384]{1,0}, f32[256,4]{1,0}, f32[4,3]{1,0}}, metadata={op_name="jit(step)/jit(blockscaled_matmul)/fp8_blockscaled_matmul/pallas_call"}
  %grp = f32[256,384]{1,0} custom-call(%qa, %sa, %w, %sb), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={f8e4m3fn[256,512]{1,0}, f32[256,4]{1,0}, f8e4m3fn[8,512,384]{2,1,0}, f32[4,3]{1,0}}, metadata={op_name="jit(step)/fp8_grouped_matmul/pallas_call"}
  ROOT %t = (f32[256,384]{1,0}, f32[256,384]{1,0}) tuple(%lin, %grp)
}
"""


def test_fp8_pallas_kernels_counted_at_the_fp8_peak():
  """Each kernel 2 x 256 x 512 x 384 FLOPs, on a chip of 1 TFLOP/s bf16 and 2 fp8 with HBM fast
  enough not to bound them: each takes its FLOPs / 2e12."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e15, 1e12, 1e12, 1e12)
  cost = forecast.costs(FP8, chip)
  each = 2 * 256 * 512 * 384
  assert cost.flops["gemm"] == each and cost.flops["ragged_dot"] == each
  assert cost.compute == pytest.approx(2 * each / 2e12)


# The GPU flash-attention kernels (Pallas Triton, moe/kernels/attention.py: flash_attention) as the
# compiled program holds them: q, k [2 rows, 256, 4 heads, 192] and v padded to 192, segment ids.
MHA = """HloModule m, is_scheduled=true, num_partitions=1

ENTRY %main (q: bf16[2,256,4,192], k: bf16[2,256,4,192], v: bf16[2,256,4,192], seg: s32[2,256], lse: f32[2,4,256]) -> (bf16[2,256,4,192], (bf16[2,256,4,192], bf16[2,256,4,192], bf16[2,256,4,192])) {
  %q = bf16[2,256,4,192]{3,2,1,0} parameter(0)
  %k = bf16[2,256,4,192]{3,2,1,0} parameter(1)
  %v = bf16[2,256,4,192]{3,2,1,0} parameter(2)
  %seg = s32[2,256]{1,0} parameter(3)
  %lse = f32[2,4,256]{2,1,0} parameter(4)
  %fwd = bf16[2,256,4,192]{3,2,1,0} custom-call(%q, %k, %v, %seg), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, s32[2,256]{1,0}}, metadata={op_name="jit(step)/while/body/shard_map/jit(mha)/mha_forward/pallas_call"}
  %pre = f32[2,4,256]{2,1,0} custom-call(%fwd, %q), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}}, metadata={op_name="jit(step)/transpose(jvp())/shard_map/preprocess_backward/mha_preprocess_backward/pallas_call"}
  %bwd = (bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}) custom-call(%q, %k, %v, %seg, %fwd, %fwd, %lse, %pre), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, s32[2,256]{1,0}, bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, f32[2,4,256]{2,1,0}, f32[2,4,256]{2,1,0}}, metadata={op_name="jit(step)/transpose(jvp())/shard_map/mha_backward/pallas_call"}
  ROOT %t = (bf16[2,256,4,192]{3,2,1,0}, (bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0}, bf16[2,256,4,192]{3,2,1,0})) tuple(%fwd, %bwd)
}
"""


def test_gpu_flash_attention_counted_at_the_head_size_it_computes():
  """The Triton kernel pads the head size to a power of two (MLA's 192 -> 256) and computes every
  matmul at it: forward QK and PV, backward 4 in its dk/dv loop and 3 in its dq loop, each over half
  the S x S pairs (causal): 2 x 4 x 256 x 256 x (2 + 7) x 256 FLOPs; the backward's preprocessing
  (o . do) none. On a chip of 1 TFLOP/s with HBM fast enough not to bound them: their FLOPs / 1e12.
  (Before 2026-12-05 the forecast counted the three as no FLOPs: V3's best h100x256 step missed 19.3 s,
  13.5%, of its compute.)"""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e15, 1e12, 1e12, 1e12)
  cost = forecast.costs(MHA, chip)
  assert cost.flops["attention"] == 2 * 4 * 256 * 256 * (2 + 7) * 256
  assert cost.compute == pytest.approx(cost.flops["attention"] / 1e12, rel=1e-3)


# This project's MLA kernels (moe/kernels/mla_flash.py) as the compiled program holds them: q and k in
# parts of 128 and 64, v of 128, the widths in each kernel's name.
_PART = "bf16[2,256,4,{}]{{3,2,1,0}}"
_ARGS = ", ".join(_PART.format(w) for w in (128, 64, 128, 64, 128))
MLA_FLASH = "\n".join(["HloModule m, is_scheduled=true, num_partitions=1", "",
    "ENTRY %main (q0: bf16[2,256,4,128], q1: bf16[2,256,4,64], k0: bf16[2,256,4,128], k1: bf16[2,256,4,64], "
    "v: bf16[2,256,4,128]) -> (bf16[2,256,4,128], bf16[2,256,4,128], bf16[2,256,4,128]) {",
    *(f"  %{n} = {_PART.format(w)} parameter({i})" for i, (n, w) in enumerate(zip(("q0", "q1", "k0", "k1", "v"),
                                                                                 (128, 64, 128, 64, 128)))),
    *(f'  %{kind} = {_PART.format(128)} custom-call(%q0, %q1, %k0, %k1, %v), custom_call_target="__gpu$xla.gpu.triton", '
      f'operand_layout_constraints={{{_ARGS}}}, metadata={{op_name="jit(step)/jit(attention)/mla_flash_{kind}_qk192_v128/pallas_call"}}'
      for kind in ("fwd", "dkdv", "dq")),
    f"  ROOT %t = ({_PART.format(128)}, {_PART.format(128)}, {_PART.format(128)}) tuple(%fwd, %dkdv, %dq)", "}", ""])


def test_mla_flash_kernels_counted_at_their_widths():
  """q/k at 128 + 64, v at 128, over half the S x S pairs (causal): forward QK and PV, dk/dv's loop
  2 x QK-wide and 2 x V-wide matmuls, dq's 2 and 1: against JAX's kernel at 256 for all (above), 0.63x."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e15, 1e12, 1e12, 1e12)
  flops = forecast.costs(MLA_FLASH, chip).flops["attention"]
  qk, v = 192, 128
  assert flops == 2 * 4 * 256 * 256 * ((qk + v) + (2 * qk + 2 * v) + (2 * qk + v))
  assert flops / forecast.costs(MHA, chip).flops["attention"] == pytest.approx(1472 / 2304)


def test_forecast_of_a_hand_computable_program():
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  dot_flops = 2 * 128 * 256 * 512  # 33.6 us at 1 TFLOP/s
  dot_bytes = 2 * (128 * 256 + 256 * 512 + 128 * 512)  # 458,752 bytes: 458.8 us at 1 GB/s (memory-bound)
  add_bytes = 3 * 2 * 128 * 512  # two operands and the result: 393.2 us
  ring = 2 * (2 * 128 * 512) * 3 / 4  # all-reduce of 128 KiB over 4: 196,608 bytes, 196.6 us
  c = forecast.costs(MATMUL, chip)
  s = forecast.summary(c)
  assert s["flops"]["dot"] == dot_flops and s["flops"]["other"] == 128 * 512
  assert s["hbm_bytes"] == dot_bytes + add_bytes and s["collective_bytes"]["all-reduce"]["fast"] == ring
  assert c.time == pytest.approx((dot_bytes + add_bytes) / 1e9 + ring / 1e9)
  assert c.exposed == pytest.approx(ring / 1e9)
  # where the time goes: the fused matmul (memory-bound), the add, then the all-reduce
  assert [(r["what"], r["source"], r["s"]) for r in s["top"]] == [
      ("hbm", "fusion", pytest.approx(dot_bytes / 1e9, rel=1e-3)), ("hbm", "add", pytest.approx(add_bytes / 1e9, rel=1e-3)),
      ("all-reduce", "all-reduce", pytest.approx(ring / 1e9, rel=1e-3))]
  # asynchronous, with the matmul scheduled between its start and done: hidden under it
  overlapped = MATMUL.replace(
      "  %sum = bf16[128,512]{1,0} all-reduce(%g), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add\n"
      "  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot\n",
      "  %s = bf16[128,512]{1,0} all-reduce-start(%g), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add\n"
      "  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot\n"
      "  %sum = bf16[128,512]{1,0} all-reduce-done(%s)\n")
  c = forecast.costs(overlapped, chip)
  assert c.exposed == 0 and c.time == pytest.approx((dot_bytes + add_bytes) / 1e9)
  s = forecast.summary(c)
  assert s["async"]["all-reduce"] == {"count": 1, "comm_s": pytest.approx(ring / 1e9),
                                      "hidden_s": pytest.approx(ring / 1e9)}
  # with a fast HBM the matmul is compute-bound and hides only part of the all-reduce
  fast = forecast.Chip("made-up", 1e12, 2e12, 1e15, 1e9, 1e8, 1e9)
  c = forecast.costs(overlapped, fast)
  assert c.exposed == pytest.approx(ring / 1e9 - dot_flops / 1e12)
  r = forecast.report(c, fast, tokens=1000, model_flops=4 * dot_flops, chips=4, devices=4, price=3.6)
  assert r["mfu"] == pytest.approx(dot_flops / c.time / 1e12, abs=1e-3)
  assert r["usd_per_million_tokens"] == pytest.approx(3.6 * 4 * c.time / 3600 / 1e-3, rel=1e-3)
  # two all-reduces in flight together share the link: the second is done one ring after the first
  both = overlapped.replace("  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot\n",
                            "  %s2 = bf16[128,512]{1,0} all-reduce-start(%g), channel_id=2, replica_groups={{0,1,2,3}},"
                            " to_apply=%add\n  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot\n"
                            ).replace("  %sum = bf16[128,512]{1,0} all-reduce-done(%s)\n",
                                      "  %sum = bf16[128,512]{1,0} all-reduce-done(%s)\n"
                                      "  %sum2 = bf16[128,512]{1,0} all-reduce-done(%s2)\n")
  assert both.count("all-reduce-done") == 2
  c = forecast.costs(both, fast)
  assert c.exposed == pytest.approx(2 * ring / 1e9 - dot_flops / 1e12)
  assert forecast.summary(c)["async"]["all-reduce"]["hidden_s"] == pytest.approx(dot_flops / 1e12)


# MATMUL's matmul and all-reduce in a loop of 3 trips, the all-reduce awaited before the matmul runs
# (nothing between its start and done), though the two do not depend on each other.
LOOPED = """HloModule m, is_scheduled=true, num_partitions=4

%fused_dot (p0: bf16[128,256], p1: bf16[256,512]) -> bf16[128,512] {
  %p0 = bf16[128,256]{1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (c: (s32[], bf16[128,256], bf16[256,512], bf16[128,512])) -> pred[] {
  %c = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) parameter(0)
  %limit = s32[] constant(3)
  %i.1 = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

%body (b: (s32[], bf16[128,256], bf16[256,512], bf16[128,512])) -> (s32[], bf16[128,256], bf16[256,512], bf16[128,512]) {
  %b = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%b), index=0
  %x = bf16[128,256]{1,0} get-tuple-element(%b), index=1
  %w = bf16[256,512]{1,0} get-tuple-element(%b), index=2
  %g = bf16[128,512]{1,0} get-tuple-element(%b), index=3
  %s = bf16[128,512]{1,0} all-reduce-start(%g), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %sum = bf16[128,512]{1,0} all-reduce-done(%s)
  %y = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %z = bf16[128,512]{1,0} add(%y, %sum)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) tuple(%next, %x, %w, %z)
}

ENTRY %main (x: bf16[128,256], w: bf16[256,512], g: bf16[128,512]) -> bf16[128,512] {
  %x.0 = bf16[128,256]{1,0} parameter(0)
  %w.0 = bf16[256,512]{1,0} parameter(1)
  %g.0 = bf16[128,512]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %i.0 = s32[] copy(%zero)
  %init = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) tuple(%i.0, %x.0, %w.0, %g.0)
  %loop = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[128,512]{1,0} get-tuple-element(%loop), index=3
}
"""


def test_a_loop_is_reported_against_what_bounds_it():
  """An iteration's forecast time against its floors: compute (the matmul, 33.6 us at 1 TFLOP/s), the
  link's busy time (the all-reduce's ring, 196.6 us at 1 GB/s) and the longest chain of dependencies
  (the two are independent: the ring, then the add of its sum, 0.4 ns more, which makes the chain the
  largest floor). Awaited before the matmul runs, the iteration takes both one after the other and the
  order costs the matmul's time; with the matmul between the all-reduce's start and done it costs
  nothing."""
  fast = forecast.Chip("made-up", 1e12, 2e12, 1e15, 1e9, 1e8, 1e9)
  dot, ring = 2 * 128 * 256 * 512 / 1e12, 2 * (2 * 128 * 512) * 3 / 4 / 1e9
  assert hlo_loops.trip_counts(LOOPED) == {"body": 3}
  (serial,) = forecast.summary(forecast.costs(LOOPED, fast))["loops"]
  assert serial == {"body": "body", "source": "while", "trips": 3, "runs": 1, "iteration_s": pytest.approx(ring + dot, rel=1e-3),
                    "floors_s": {"compute": pytest.approx(dot, rel=1e-3), "fast link": pytest.approx(ring, rel=1e-3),
                                 "dependencies": pytest.approx(ring, rel=1e-3)},
                    "bound": "dependencies", "beyond_bound_s": pytest.approx(dot, rel=1e-2), "share": 1.0}
  moved = LOOPED.replace("  %sum = bf16[128,512]{1,0} all-reduce-done(%s)\n", "").replace(
      "  %z = bf16", "  %sum = bf16[128,512]{1,0} all-reduce-done(%s)\n  %z = bf16")
  (overlapped,) = forecast.summary(forecast.costs(moved, fast))["loops"]
  assert overlapped["iteration_s"] == pytest.approx(ring, rel=1e-3) and overlapped["bound"] == "dependencies"
  assert overlapped["beyond_bound_s"] == pytest.approx(0, abs=1e-3 * ring)
  # in a loop of 2 trips around it, the inner loop runs twice; the outer one's chain of dependencies
  # counts the inner loop at its floor (3 rings), not at its forecast
  outer = moved.replace("ENTRY %main", "%outer_cond (oc: (s32[], bf16[128,256], bf16[256,512], bf16[128,512])) -> pred[] {\n"
                        "  %oc = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) parameter(0)\n"
                        "  %olimit = s32[] constant(2)\n  %oi = s32[] get-tuple-element(%oc), index=0\n"
                        "  ROOT %olt = pred[] compare(%oi, %olimit), direction=LT\n}\n\n"
                        "%outer (ob: (s32[], bf16[128,256], bf16[256,512], bf16[128,512])) -> "
                        "(s32[], bf16[128,256], bf16[256,512], bf16[128,512]) {\n"
                        "  %ob = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) parameter(0)\n"
                        "  %oi.1 = s32[] get-tuple-element(%ob), index=0\n  %oz = s32[] constant(0)\n"
                        "  %ox = bf16[128,256]{1,0} get-tuple-element(%ob), index=1\n"
                        "  %ow = bf16[256,512]{1,0} get-tuple-element(%ob), index=2\n"
                        "  %og = bf16[128,512]{1,0} get-tuple-element(%ob), index=3\n"
                        "  %oinit = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) tuple(%oz, %ox, %ow, %og)\n"
                        "  %inner = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) while(%oinit), "
                        "condition=%cond, body=%body\n  %oone = s32[] constant(1)\n  %onext = s32[] add(%oi.1, %oone)\n"
                        "  %oy = bf16[128,512]{1,0} get-tuple-element(%inner), index=3\n"
                        "  ROOT %ot = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}, bf16[128,512]{1,0}) tuple(%onext, %ox, %ow, %oy)\n"
                        "}\n\nENTRY %main").replace("condition=%cond, body=%body\n  ROOT %out",
                                                     "condition=%outer_cond, body=%outer\n  ROOT %out")
  assert hlo_loops.trip_counts(outer) == {"body": 3, "outer": 2}
  rows = {r["body"]: r for r in forecast.summary(forecast.costs(outer, fast))["loops"]}
  assert rows["body"]["runs"] == 2 and rows["body"]["iteration_s"] == pytest.approx(ring, rel=1e-3)
  assert rows["outer"]["floors_s"]["dependencies"] == pytest.approx(3 * ring, rel=1e-3)


def test_the_optimizers_share_is_what_its_named_scope_made():
  """train/core/step.py runs the optimizer's update under jax.named_scope("optimizer"): the forecast
  reports the time, matmul FLOPs and collective bytes of the instructions made there (the add and the
  all-reduce of MATMUL here, by hand), and nothing of the others."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  scoped = MATMUL.replace("to_apply=%add\n", 'to_apply=%add, metadata={op_name="jit(step)/optimizer/psum"}\n').replace(
      "add(%y, %sum)\n", 'add(%y, %sum), metadata={op_name="jit(step)/optimizer/add"}\n')
  s = forecast.summary(forecast.costs(scoped, chip))
  add_s, ring = 3 * 2 * 128 * 512 / 1e9, 2 * (2 * 128 * 512) * 3 / 4
  assert s["optimizer"]["s"] == pytest.approx(add_s + ring / 1e9, rel=1e-3)
  assert s["optimizer"]["collective_bytes"] == {"fast": ring, "slow": 0} and s["optimizer"]["matmul_flops"] == 0
  step_s = add_s + ring / 1e9 + 2 * (128 * 256 + 256 * 512 + 128 * 512) / 1e9
  assert s["optimizer"]["share"] == pytest.approx((add_s + ring / 1e9) / step_s, abs=1e-4)
  plain = forecast.summary(forecast.costs(MATMUL, chip))["optimizer"]
  assert plain == {"s": 0.0, "share": 0.0, "matmul_flops": 0, "collective_bytes": {"fast": 0, "slow": 0}}


# libtpu's async collective fusion (xla_tpu_enable_async_collective_fusion): an all-gather of a [64, 128]
# shard over 4 devices starts in one fusion, rides in the compute fusion of a matmul (the dot of
# MATMUL), and ends in another; all three hold the same all-gather (channel 7).
FUSED_ALL_GATHER = """HloModule m, is_scheduled=true, num_partitions=4

%start_comp (a0: bf16[64,128]) -> (bf16[64,128], bf16[256,128], u32[]) {
  %a0 = bf16[64,128]{1,0} parameter(0)
  %all-gather.1 = bf16[256,128]{1,0} all-gather(%a0), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %custom-call.1 = (bf16[64,128]{1,0}, bf16[256,128]{1,0}, u32[]{:S(2)}) custom-call(%a0, %all-gather.1), custom_call_target="CollectiveStep"
}

%async_collective_fusion.2 (s0: bf16[64,128], s1: bf16[256,128], x: bf16[128,256], w: bf16[256,512]) -> (bf16[128,512], bf16[64,128], bf16[256,128]) {
  %s0 = bf16[64,128]{1,0} parameter(0)
  %s1 = bf16[256,128]{1,0} parameter(1)
  %x = bf16[128,256]{1,0} parameter(2)
  %w = bf16[256,512]{1,0} parameter(3)
  %dot.1 = bf16[128,512]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-gather.2 = bf16[256,128]{1,0} all-gather(%s0), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (bf16[128,512]{1,0}, bf16[64,128]{1,0}, bf16[256,128]{1,0}) tuple(%dot.1, %s0, %all-gather.2)
}

%done_comp (d0: bf16[64,128], d1: bf16[256,128]) -> bf16[256,128] {
  %d0 = bf16[64,128]{1,0} parameter(0)
  %d1 = bf16[256,128]{1,0} parameter(1)
  %all-gather.3 = bf16[256,128]{1,0} all-gather(%d0), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %custom-call.3 = bf16[256,128]{1,0} custom-call(%all-gather.3, %d1), custom_call_target="CollectiveStep"
}

ENTRY %main (a: bf16[64,128], x: bf16[128,256], w: bf16[256,512]) -> (bf16[256,128], bf16[128,512]) {
  %a = bf16[64,128]{1,0} parameter(0)
  %x = bf16[128,256]{1,0} parameter(1)
  %w = bf16[256,512]{1,0} parameter(2)
  %async-collective-start.1 = (bf16[64,128]{1,0}, bf16[256,128]{1,0}, u32[]{:S(2)}) fusion(%a), kind=kCustom, calls=%start_comp
  %g0 = bf16[64,128]{1,0} get-tuple-element(%async-collective-start.1), index=0
  %g1 = bf16[256,128]{1,0} get-tuple-element(%async-collective-start.1), index=1
  %fusion.2 = (bf16[128,512]{1,0}, bf16[64,128]{1,0}, bf16[256,128]{1,0}) fusion(%g0, %g1, %x, %w), kind=kCustom, calls=%async_collective_fusion.2
  %y = bf16[128,512]{1,0} get-tuple-element(%fusion.2), index=0
  %h0 = bf16[64,128]{1,0} get-tuple-element(%fusion.2), index=1
  %h1 = bf16[256,128]{1,0} get-tuple-element(%fusion.2), index=2
  %async-collective-done.1 = bf16[256,128]{1,0} fusion(%h0, %h1), kind=kCustom, calls=%done_comp
  ROOT %out = (bf16[256,128]{1,0}, bf16[128,512]{1,0}) tuple(%async-collective-done.1, %y)
}
"""


def test_fused_async_collective_counts_once_and_hides_under_its_compute():
  """The all-gather is one asynchronous collective (its start and done paired by channel), its bytes
  counted once; the fusion that carries its step is the matmul it is: its FLOPs, and the bytes of x, w
  and the product, not the all-gather's buffers passing through; the all-gather hides under it."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  dot_bytes = 2 * (128 * 256 + 256 * 512 + 128 * 512)  # 458.8 us at 1 GB/s
  ring = 2 * 256 * 128 * 3 / 4  # a device receives 3/4 of the gathered [256, 128]: 49.2 us
  c = forecast.costs(FUSED_ALL_GATHER, chip)
  s = forecast.summary(c)
  assert s["flops"]["dot"] == 2 * 128 * 256 * 512 and s["hbm_bytes"] == dot_bytes
  assert s["collective_bytes"]["all-gather"] == {"fast": ring, "slow": 0, "async": 1}
  assert s["async"]["all-gather"] == {"count": 1, "comm_s": pytest.approx(ring / 1e9),
                                      "hidden_s": pytest.approx(ring / 1e9)}
  assert c.exposed == 0 and c.time == pytest.approx(dot_bytes / 1e9)
  assert hlo_lib.collectives(FUSED_ALL_GATHER) == {"all-gather": {"count": 1, "bytes": 2 * 256 * 128}}


def test_sparsecore_collective_counts_and_hides_under_its_compute():
  """A collective libtpu offloads to the SparseCores (tpu7x) is the asynchronous collective it holds,
  from call-start to call-done: its bytes counted once and hidden under the matmul between them (the
  forecast of V3 on tpu7x-512 had counted none of its 77 all-gathers, 21 GB per device, this way)."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  dot_bytes = 2 * (128 * 256 + 256 * 512 + 128 * 512)
  add_bytes = 3 * 2 * 128 * 512
  ring = 2 * (2 * 128 * 512) * 3 / 4
  c = forecast.costs(SPARSECORE, chip)
  s = forecast.summary(c)
  assert s["collective_bytes"]["all-reduce"] == {"fast": ring, "slow": 0, "async": 1}
  assert s["async"]["all-reduce"] == {"count": 1, "comm_s": pytest.approx(ring / 1e9), "hidden_s": pytest.approx(ring / 1e9)}
  assert c.exposed == 0 and c.time == pytest.approx((dot_bytes + add_bytes) / 1e9)


def test_hbm_bytes_of_slices_updates_and_on_chip_arrays():
  """A fusion that reads one row of a stacked [10, 256] weight reads that row; an in-place update
  writes its update; an operand in TPU memory space S(1) (VMEM) costs no HBM traffic."""
  text = """HloModule m, num_partitions=1

%slice_row (p0: f32[10,256], p1: s32[]) -> f32[1,256] {
  %p0 = f32[10,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,256}
}

%put_row (q0: f32[10,256], q1: f32[1,256], q2: s32[]) -> f32[10,256] {
  %q0 = f32[10,256]{1,0} parameter(0)
  %q1 = f32[1,256]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dus = f32[10,256]{1,0} dynamic-update-slice(%q0, %q1, %q2, %zero.1)
}

ENTRY %main (w: f32[10,256], i: s32[], v: f32[1,256]) -> f32[10,256] {
  %w = f32[10,256]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %v = f32[1,256]{1,0:S(1)} parameter(2)
  %row = f32[1,256]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_row
  ROOT %new = f32[10,256]{1,0} fusion(%w, %v, %i), kind=kLoop, calls=%put_row
}
"""
  s = forecast.summary(forecast.costs(text, forecast.Chip("x", 1e12, 1e12, 1e9, 1e9, 1e9, 1e9)))
  row = 256 * 4
  # the slice: reads a row (and the s32 index), writes a row; the update: reads v from VMEM (0), the
  # index, writes a row in place
  assert s["hbm_bytes"] == (row + 4 + row) + (0 + 4 + row)
  # the same update into the stack seen through a bitcast (XLA:GPU relabels the layer stack's gradient
  # accumulator so, f32[58, 4, 1792, 2048] as [1792, 58, 4, 2048]): still in place (it was counted as
  # reading and writing the whole stack, 10.9 s of V3's step on h100x256)
  relabelled = text.replace("  ROOT %dus = f32[10,256]{1,0} dynamic-update-slice(%q0, %q1, %q2, %zero.1)",
                            "  %b = f32[10,1,256]{2,1,0} bitcast(%q0)\n  %b1 = f32[1,1,256]{2,1,0} bitcast(%q1)\n"
                            "  %d = f32[10,1,256]{2,1,0} dynamic-update-slice(%b, %b1, %q2, %zero.1, %zero.1)\n"
                            "  ROOT %r = f32[10,256]{1,0} bitcast(%d)")
  assert relabelled != text
  s = forecast.summary(forecast.costs(relabelled, forecast.Chip("x", 1e12, 1e12, 1e9, 1e9, 1e9, 1e9)))
  assert s["hbm_bytes"] == (row + 4 + row) + (0 + 4 + row)


def test_hardware_table_has_a_source_for_every_figure():
  text = targets.HARDWARE.read_text()
  for family in ("v4", "v5e", "v5p", "v6e", "tpu7x", "h100", "h200", "b200", "gb200"):
    hw = targets.hardware(family)
    assert hw["peak_fp8"] >= hw["peak_bf16"] > 1e14 and hw["hbm_bw"] > 5e11 and hw["fast_bw"] > hw["slow_bw"] > 1e9
    assert hw["hbm_bw"] > hw["host_bw"] > 1e10
    lines = text.split(f"\n{family}:\n", 1)[1].splitlines()
    rows = lines[:next((i for i, line in enumerate(lines) if not line.startswith("  ")), len(lines))]
    assert len(rows) == 10, (family, rows)
    assert all("#" in line for line in rows if not line.strip().startswith(("fast_domain", "devices_per_chip"))), family
  assert targets.hardware("v5p")["peak_bf16"] == 459e12 and targets.hardware("tpu7x")["devices_per_chip"] == 2
  assert forecast.chip_of("tpu7x").peak_bf16 == 2307e12 / 2  # two devices per chip
  with pytest.raises(ConfigError, match="no hardware figures for 'a100'"):
    targets.hardware("a100")


def test_hlo_report_cli(tmp_path, capsys):
  path = tmp_path / "step.txt"
  path.write_text(MATMUL)
  assert hlo_report.main([str(path), "--target", "v5p-8", "--tokens", "512", "--model-flops", "1e9"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["costs"]["flops"]["dot"] == 2 * 128 * 256 * 512 and r["forecast"]["devices"] == 4
  assert r["forecast"]["chip"] == "v5p" and r["forecast"]["price_per_chip_hour"] == 4.2
  (tmp_path / "bad.txt").write_text("not hlo")
  assert hlo_report.main([str(tmp_path / "bad.txt"), "--target", "v5p-8"]) == 2
  assert hlo_report.main([str(tmp_path / "none.txt"), "--target", "v5p-8"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "not HLO text" in err[0] and "no such file" in err[1]


def test_convolutions_count_the_taps_on_their_input():
  """XLA writes a matmul batched over heads as a convolution whose window slides over padding
  (libtpu: q_b_proj as [2,256,64,1] x [4,48,64,1], window 1x4 padded 3 each side: one of the 4 taps
  lands on the input), and ragged_dot's weight gradient as one over a dilated input (size=2
  lhs_dilate=2: one tap of 2); each counts its real multiply-adds."""
  text = """HloModule m, num_partitions=1

ENTRY %main (a: f32[2,256,64,1], b: bf16[4,48,64,1], c: f32[2,1024,128], d: f32[2,1024,96]) -> f32[2,256,4,48] {
  %a = f32[2,256,64,1]{3,2,1,0} parameter(0)
  %b = bf16[4,48,64,1]{3,2,1,0} parameter(1)
  %c = f32[2,1024,128]{2,1,0} parameter(2)
  %d = f32[2,1024,96]{2,1,0} parameter(3)
  %q = f32[2,256,4,48]{3,2,1,0} convolution(%a, %b), window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
  %g = f32[2,128,96]{2,1,0} convolution(%c, %d), window={size=2 lhs_dilate=2}, dim_labels=0fb_0io->0bf
  ROOT %r = f32[2,256,4,48]{3,2,1,0} copy(%q)
}
"""
  flops = hlo_lib.matmul_flops(text)
  assert flops["convolution"] == 2 * (2 * 256) * 64 * (4 * 48) + 2 * 2 * 1024 * 128 * 96


def test_device_check_without_a_gpu(capsys, monkeypatch):
  """No NVIDIA GPU here: one line, exit 0, after finding every module and config its plan runs; a
  plan naming something absent is an error."""
  from train import device_check

  monkeypatch.setattr(device_check, "gpu", lambda: None)
  assert device_check.main([]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and "no NVIDIA GPU here" in out[0] and "4 checks" in out[0] and "complete" in out[0]
  assert device_check.missing() == []
  assert device_check.missing([("x", ["-m", "train.nothing", "configs/none.yaml"], 1)]) == [
      "module train.nothing", "configs/none.yaml"]
  assert device_check.target_of("NVIDIA H100 80GB HBM3") == "h100x1" and device_check.target_of("Tesla T4") is None


# megablox's gmm (a Pallas TPU kernel: [rows, K] x [groups, K, N] -> [rows, N]) on a worst-case buffer of 512
# rows, and the ragged all-to-all that sends its rows back into a 2048-row buffer.
GROUPED = """HloModule m, is_scheduled=true, num_partitions=4

ENTRY %main (x: bf16[512,128], w: bf16[4,128,256], sizes: s32[4], buf: bf16[2048,256], off: s64[4]) -> bf16[2048,256] {
  %x = bf16[512,128]{1,0} parameter(0)
  %w = bf16[4,128,256]{2,1,0} parameter(1)
  %sizes = s32[4]{0} parameter(2)
  %buf = bf16[2048,256]{1,0} parameter(3)
  %off = s64[4]{0} parameter(4)
  %gmm.3 = bf16[512,256]{1,0} custom-call(%sizes, %x, %w), custom_call_target="tpu_custom_call", operand_layout_constraints={s32[4]{0}, bf16[512,128]{1,0}, bf16[4,128,256]{2,1,0}}
  ROOT %back = bf16[2048,256]{1,0} ragged-all-to-all(%gmm.3, %buf, %off, %off, %off, %off), replica_groups={{0,1,2,3}}
}
"""


# The same with the Triton grouped matmul of impl.experts=triton (moe/kernels/grouped_pallas.py, on GPUs): its
# work items (four s32 arrays) come first, and only its op_name says what the kernel is.
GROUPED_TRITON = GROUPED.replace("%sizes = s32[4]{0} parameter(2)", "%sizes = s32[8]{0} parameter(2)").replace(
    '%gmm.3 = bf16[512,256]{1,0} custom-call(%sizes, %x, %w), custom_call_target="tpu_custom_call", '
    'operand_layout_constraints={s32[4]{0}, ',
    '%gmm.3 = bf16[512,256]{1,0} custom-call(%sizes, %sizes, %sizes, %sizes, %x, %w), '
    'custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jit(gmm)/grouped_gmm/pallas_call"}, '
    'operand_layout_constraints={s32[8]{0}, s32[8]{0}, s32[8]{0}, s32[8]{0}, ').replace("sizes: s32[4]", "sizes: s32[8]")


@pytest.mark.parametrize("text", [GROUPED, GROUPED_TRITON], ids=["megablox", "triton"])
def test_grouped_matmul_and_ragged_exchange_count_what_they_touch(text):
  """A grouped matmul counts its FLOPs and its row arrays at the buffer's fill (the kernel visits only the
  tiles of routed rows) and its weights whole; a ragged all-to-all counts the smaller of its buffers."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  assert text.count("grouped_gmm") == int(text is GROUPED_TRITON)
  c = forecast.costs(text, chip, ragged_fill=0.25)
  s = forecast.summary(c)
  assert s["flops"]["ragged_dot"] == 0.25 * 2 * 512 * 128 * 256
  assert s["flops"]["ragged_dot_buffer"] == 2 * 512 * 128 * 256
  assert s["hbm_bytes"] == 0.25 * 2 * (512 * 128 + 512 * 256) + 2 * 4 * 128 * 256
  assert s["collective_bytes"]["ragged-all-to-all"]["fast"] == 2 * 512 * 256 * 3 / 4  # the 512-row input, not 2048
  assert forecast.ragged_rows(text) == 512
  # made under the fast path's named scope (buffers for the balanced share), at its fill instead
  fast = text.replace('custom_call_target="tpu_custom_call"', 'custom_call_target="tpu_custom_call", metadata='
                      '{op_name="jit(step)/ep_fast_path/gmm"}').replace('op_name="jit(step)/', 'op_name="jit(step)/ep_fast_path/')
  s = forecast.summary(forecast.costs(fast, chip, ragged_fill=0.25, likely_fill=0.5))
  assert s["flops"]["ragged_dot"] == 0.5 * 2 * 512 * 128 * 256
  # train.hlo_report reads the same program at the same fills as train.aot does (--fast-path-fill)
  target = targets.parse("v5p-8")
  r = hlo_report.hlo_report(fast, target, ragged_fill=0.25, fast_path_fill=0.5)
  assert r["costs"]["flops"]["ragged_dot"] == 0.5 * 2 * 512 * 128 * 256 and r["forecast"]["fast_path_fill"] == 0.5
  assert hlo_report.hlo_report(fast, target, ragged_fill=0.25)["costs"]["flops"]["ragged_dot"] == 0.25 * 2 * 512 * 128 * 256


# A conditional between the fast path's result (one add) and a fallback made under the exchange's
# named scope (two adds): the dropless exchange's two branches (parallel/expert_parallel/exchange.py).
BRANCHES = """HloModule m, is_scheduled=true, num_partitions=1

%fast (a: bf16[128,512]) -> bf16[128,512] {
  %a = bf16[128,512]{1,0} parameter(0)
  ROOT %f = bf16[128,512]{1,0} add(%a, %a), metadata={op_name="jit(step)/cond/branch_1_fun/add"}
}

%slow (b: bf16[128,512]) -> bf16[128,512] {
  %b = bf16[128,512]{1,0} parameter(0)
  %s1 = bf16[128,512]{1,0} add(%b, %b), metadata={op_name="jit(step)/cond/branch_0_fun/ep_fallback/add"}
  ROOT %s2 = bf16[128,512]{1,0} add(%s1, %b), metadata={op_name="jit(step)/cond/branch_0_fun/ep_fallback/add"}
}

ENTRY %main (p: pred[], x: bf16[128,512]) -> bf16[128,512] {
  %p = pred[] parameter(0)
  %x = bf16[128,512]{1,0} parameter(1)
  ROOT %c = bf16[128,512]{1,0} conditional(%p, %x, %x), true_computation=%fast, false_computation=%slow
}
"""


def test_conditional_costs_the_branch_it_is_expected_to_take_and_reports_the_fallback():
  """A conditional costs its branch not made under a named scope of forecast.UNLIKELY (the dropless
  exchange's chunks, run where the fast path does not fit), and `fallback_s` is what its costliest
  branch would add; with no marked branch, the costliest, and no fallback."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  add_s = 3 * 2 * 128 * 512 / 1e9  # two operands and the result
  c = forecast.costs(BRANCHES, chip)
  assert c.time == pytest.approx(add_s) and c.fallback == pytest.approx(add_s)
  assert forecast.summary(c)["fallback_s"] == pytest.approx(add_s, rel=1e-3)
  c = forecast.costs(BRANCHES.replace("/ep_fallback/", "/"), chip)
  assert c.time == pytest.approx(2 * add_s) and c.fallback == 0


# libtpu's reduce-scatter (the FSDP gradient's, as it compiles jax.grad of a matmul with a sharded
# weight): a fusion calling %all-reduce-scatter, an all-reduce of the whole [512, 1024] array and this
# device's dynamic slice of it.
REDUCE_SCATTER = """HloModule m, is_scheduled=true, num_partitions=4

%add.1.clone (x.5: bf16[], y.3: bf16[]) -> bf16[] {
  %y.3 = bf16[] parameter(1)
  %x.5 = bf16[] parameter(0)
  ROOT %add.3 = bf16[] add(%x.5, %y.3)
}

%all-reduce-scatter (input: bf16[512,1024]) -> bf16[128,1024] {
  %input = bf16[512,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %all-reduce.2 = bf16[512,1024]{1,0:T(8,128)(2,1)} all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add.1.clone
  %partition-id.2 = u32[] partition-id()
  %constant.14 = u32[] constant(128)
  %multiply.2 = u32[]{:T(128)} multiply(%partition-id.2, %constant.14)
  %constant.15 = u32[] constant(0)
  ROOT %dynamic-slice.3 = bf16[128,1024]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.2, %multiply.2, %constant.15), dynamic_slice_sizes={128,1024}
}

ENTRY %main (g: bf16[512,1024]) -> bf16[128,1024] {
  %g = bf16[512,1024]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %fusion = bf16[128,1024]{1,0:T(8,128)(2,1)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
}
"""


def test_libtpu_reduce_scatter_fusion_is_a_reduce_scatter():
  """libtpu compiles a reduce-scatter (every FSDP weight gradient's) as a fusion holding an all-reduce of
  the whole array and a dynamic slice: the forecast counts it as the reduce-scatter it is, (n-1)/n of
  the array over the links, synchronous, not as a kernel that only reads and writes memory."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  c = forecast.costs(REDUCE_SCATTER, chip)
  s = forecast.summary(c)
  ring = 512 * 1024 * 2 * 3 / 4
  assert s["collective_bytes"] == {"reduce-scatter": {"fast": ring, "slow": 0, "sync": 1}}, s["collective_bytes"]
  assert c.exposed == pytest.approx(ring / 1e9) and c.time == pytest.approx(ring / 1e9) and s["hbm_bytes"] == 0


# A pipeline's tick loop (3 trips) whose forward slot is a conditional made under the named scope
# pipeline_forward, holding a dot, a nested conditional made under pipeline_first holding another, and
# a conditional of the slot's own code (no listed scope of its own) holding a third.
PIPELINE_TICKS = LOOP.replace("""  %y = bf16[64,32]{1,0} dot(%x.2, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
""", """  %on.2 = pred[] constant(true)
  %y = bf16[64,32]{1,0} conditional(%on.2, %x.2, %x.2), true_computation=%forward, false_computation=%noop, metadata={op_name="jit(step)/shard_map/pipeline_forward/cond"}
""").replace("%body (p.2", """%noop (n: bf16[64,32]) -> bf16[64,32] {
  ROOT %n = bf16[64,32]{1,0} parameter(0)
}

%first (a: bf16[64,32]) -> bf16[64,32] {
  %a = bf16[64,32]{1,0} parameter(0)
  %w1 = bf16[32,32]{1,0} constant({...})
  ROOT %d1 = bf16[64,32]{1,0} dot(%a, %w1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%forward (f: bf16[64,32]) -> bf16[64,32] {
  %f = bf16[64,32]{1,0} parameter(0)
  %on = pred[] constant(true)
  %g = bf16[64,32]{1,0} conditional(%on, %f, %f), true_computation=%first, false_computation=%noop, metadata={op_name="jit(step)/shard_map/pipeline_forward/cond/branch_1_fun/pipeline_first/cond"}
  %h = bf16[64,32]{1,0} conditional(%on, %g, %g), true_computation=%first, false_computation=%noop, metadata={op_name="jit(step)/shard_map/pipeline_forward/cond/branch_1_fun/cond"}
  %w2 = bf16[32,32]{1,0} constant({...})
  ROOT %d2 = bf16[64,32]{1,0} dot(%h, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p.2""")


def test_pipeline_slots_cost_what_the_schedule_runs():
  """`taken`: a conditional made in a listed scope counts its costliest branch the share of its
  executions the schedule says; one inside such a branch with no listed scope of its own, its
  costliest every time. 3 ticks, the forward slot in 2 of them, first_fn in 1 of those 2: 2 forward
  dots, 2 of the slot's own conditional and 1 of first_fn (without `taken`: every branch every tick,
  9 dots)."""
  chip = forecast.Chip("made-up", 1e12, 2e12, 1e9, 1e9, 1e8, 1e9)
  dot = 2 * 64 * 32 * 32
  assert forecast.costs(PIPELINE_TICKS, chip).flops["dot"] == 9 * dot
  c = forecast.costs(PIPELINE_TICKS, chip, taken={"pipeline_forward": 2 / 3, "pipeline_first": 1 / 2})
  assert c.flops["dot"] == pytest.approx(5 * dot)
  assert c.time < forecast.costs(PIPELINE_TICKS, chip).time
