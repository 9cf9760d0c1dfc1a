"""Will it fit? Compile the real training step for a TPU or GPU pod on this (CPU) machine.

  python -m train.aot CONFIG --target v5p-1024 [--target h100x256 ...] [--slices N] [key=value ...]
  python -m train.aot CONFIG --target v5p-512 --search [--tries N]
  python -m train.aot CONFIG --target v6e-256 --slices 4 --buffers 10

The step is the one `python -m train` runs (train.core.loop.setup: same model, runtime, shardings
and batch), lowered and compiled for the target's compile-only devices (parallel/targets.py) with
no accelerator present. One JSON line per target:

  chips, devices, mesh, impl (attention, experts, ep_transport, fp8), compile_s,
  per_device bytes from the compiler: arguments (split into params, optimizer, batch), temporaries,
  output, aliased (the donated state), peak = arguments + temporaries + output - aliased,
  host_temporaries (in host memory: the layer inputs of impl.remat_policy=full_offload; not in the peak),
  hbm (per device, as the compiler plans it), headroom, fits,
  model FLOPs per step and per device (analytic, moe.params: the compiler's cost analysis is absent
  on GPU and over-counts ragged_dot's weight gradient on TPU),
  collectives of the compiled HLO by kind: count (instructions in the program, so a collective in a
  scanned layer counts once) and bytes (of their results),
  slow_a2a: what each device sends over the slow network in all-to-all and ragged-all-to-all, to
    other hosts of 8 GPUs (process_index) or other TPU slices (slice_index, --slices N). A device in
    a replica group of n (ids: positions in the device assignment, mesh.devices.flat; explicit or
    iota, "[4,2]<=[2,4]T(1,0)"; across slices the megascale send's device ids) with m members
    elsewhere sends bytes(operand) * m / n. groups ("hosts" | "slices"), granules, count
    (instructions, async pairs once), bytes_per_device (the most any device sends, per instruction
    like `collectives`: a collective in the scanned layers or in expert-parallel chunks counts
    once), total_bytes (all devices), per_step (each instruction times its while loops' trip
    counts, layers x chunks, from known_trip_count or the loop's condition; a loop whose count
    neither gives counts once, and trip_counts_known says so),
    per_instruction (the largest: remote = m, times = runs per step). A ragged-all-to-all's
    buffers are worst-case sized (the return exchange's operand holds n_ep x the dispatched rows),
    so its bytes(operand) * m / n is an upper figure (upper_bound); balanced_bytes_per_device takes
    min(bytes(input), bytes(output)), what balanced routing sends. Megascale (cross-slice)
    buffers count as laid out for the transfer.
  largest_replicated: the biggest parameters held whole on every device,
  stage_transfers (with mesh.stage > 1): the pipeline executor's own collectives over `stage`, by kind
    and array (per tick an activation and a cotangent by collective-permute; per micro-batch
    first_fn's blocks all-gathered, the last stage's output scattered, and their cotangents), all in
    the compute dtype on TPU and GPU,
  peak_buffers (with --buffers N): the N largest buffers live at the peak, from the compiler's
    live-range and buffer-assignment dumps: bytes, array, the HLO instruction and opcode that wrote it,
    `aliases` (the other values sharing it: a loop's carry updated in place), the JAX operation and
    the innermost source line in moe/, parallel/ or train/ that made it. A target it does not fit
    prints them on stderr after the one line (libtpu, which stops compiling: its own list of its
    largest allocations).

A target the state does not fit is one line, "does not fit on v5p-1024: needs 97.5 GiB of 95.7 GiB
per device", and exit code 3 (2: a bad config or target); a compiler error other than memory (an
internal one of libtpu's) is one line too, "the compiler for v5p-512 failed on this layout: ...", exit
code 4, and a row of --search. `--search` compiles mesh factorisations,
remat policies and grad_accum for one target, best first, and prints one JSON line per try and a
table ranked by the forecast step time (memory second).

forecast (train/forecast.py; configs/hardware/chips.yaml has each chip's figures and their sources):
  costs: per device and step, read from the compiled HLO (not XLA's cost_analysis): flops by kind
    (dots and convolutions, ragged dots at the balanced fill and as their buffers, attention
    kernels, other), hbm_bytes, collective_bytes by kind and link (fast: ICI / NVLink; slow: DCN /
    the network) with sync and async counts, host_transfers (to-host and from-host bytes over PCIe:
    impl.remat_policy=full_offload's layer inputs), async (per kind, host transfers too: count,
    comm_s, hidden_s: not waited for at its done, each link carrying one transfer at a time); loops times their trip
    counts (XLA:TPU records none: read from each loop's condition); a pipeline's forward and backward
    slots, first_fn and last_fn as often as its schedule runs them (parallel/pipeline.py: Schedule.taken);
    top (where the step's time goes, by source line); loops (the three loops that take most of the
    step: one iteration's time against its floors, compute, each link's busy time and its longest
    chain of dependencies, the bound and what the compiled order costs beyond it);
  forecast: step_s (each kernel max(FLOPs / peak, bytes / HBM bandwidth), each collective and host
    transfer bytes / link bandwidth, each link shared by the transfers in flight, less what the
    schedule overlaps), compute_s, exposed_comm_s and its share,
    tokens_per_s_per_chip, model_tflops_per_chip, mfu (model FLOPs, moe.params, against the bf16
    peak), executed_over_model_flops (recompute, masked and padded work), usd_per_million_tokens at
    --price per chip-hour (default the table's), ragged_fill, and the forecast's measured error.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from moe import params as params_lib
from parallel import expert_parallel, pipeline
from parallel import targets as targets_lib
from parallel.common.errors import ConfigError, InputError
from parallel.distributed import GPU_MEMORY_FRACTION
from parallel.mesh import Parallelism
from train import forecast
from train import hlo as hlo_lib
from train import hlo_links
from train import hlo_parse
from train.core import jsonl
from train.core import loop
from train.core.train_config import TrainConfig, load_train_config

log = logging.getLogger("train.aot")

GiB = 1 << 30
EXIT_DOES_NOT_FIT = 3
EXIT_COMPILER_FAILED = 4


class DoesNotFit(Exception):
  def __init__(self, target: str, needed: float | None, hbm: float, detail: str, report: str = "",
               per: str = "per device"):
    self.target, self.needed, self.hbm, self.detail, self.report = target, needed, hbm, detail, report
    digits = 1 if needed is None or f"{needed / GiB:.1f}" != f"{hbm / GiB:.1f}" else 2  # (79.14 of 79.11)
    need = f"needs {needed / GiB:.{digits}f} GiB of {hbm / GiB:.{digits}f} GiB {per}" if needed else detail
    super().__init__(f"does not fit on {target}: {need}")


class CompilerFailed(Exception):
  """The target's compiler refused the program for another reason than memory (an internal error of
  libtpu's or XLA's): one line, the layout's row in --search, and the other targets still tried."""

  def __init__(self, target: str, text: str):
    super().__init__(f"the compiler for {target} failed on this layout: {text.strip().splitlines()[-1][:300]}")


def for_target(cfg: TrainConfig, target: targets_lib.Target) -> TrainConfig:
  """`cfg` on a multi-slice target: without mesh.dcn_* the data axis spans the slices (data parallel
  over the slow links, the other axes inside a slice). A config laid out for one pod (mesh.data=1, the
  large configs' default) gets mesh.data = the slices, the axis that takes the remaining devices
  (-1) shrinking to match."""
  n, mesh = target.slices, cfg.mesh
  if n == 1 or mesh.dcn_data * mesh.dcn_fsdp != 1:
    return cfg
  data = n if mesh.data == 1 and -1 in mesh.sizes().values() else mesh.data
  log.info("%s: %d slices, mesh.dcn_data=%d%s", target.name, n, n, f", mesh.data={data}" if data != mesh.data else "")
  return cfg.replace(mesh=dataclasses.replace(mesh, data=data, dcn_data=n))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract pytree with shardings (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def largest_replicated(state, n_devices: int, top: int = 3) -> list[dict]:
  """The biggest parameters every device holds whole (candidates for a sharding rule)."""
  if n_devices == 1:
    return []
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
    if leaf.sharding.is_fully_replicated:
      names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
      rows.append({"param": "/".join(n for n in names if n != "value"),
                   "shape": list(leaf.shape), "MiB": round(leaf.size * np.dtype(leaf.dtype).itemsize / 2**20, 1)})
  return sorted(rows, key=lambda r: -r["MiB"])[:top]


_OOM = re.compile(r"\(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def step_forecast(hlo: str, cfg: TrainConfig, par: Parallelism, target: targets_lib.Target, assignment,
                  model_flops: float, price: float | None = None, sched: pipeline.Schedule | None = None) -> dict:
  """{"costs", "forecast"} of a compiled step (train/forecast.py): per device what it executes, reads
  and sends, and the step's time on the target's chips (configs/hardware/chips.yaml), priced at `price`
  per chip-hour (default: the table's); `sched`: the step's pipeline schedule, if it has one."""
  chip = forecast.chip_of(target.family)
  p = forecast.Program(hlo)
  rows, _ = loop.batch_devices(par)
  tokens_per_device = cfg.batch_size * cfg.seq_len / max(cfg.grad_accum, 1) / max(rows, 1)
  if par.stages > 1:  # a pipelined MoE layer takes one of M micro-batches at a time, on its stage's devices
    tokens_per_device *= par.stages / (cfg.pipeline.microbatches or par.stages)
  n_ep, k = par.mesh.shape.get("expert", 1), cfg.model.num_experts_per_tok
  e_local = max(1, cfg.model.n_routed_experts // n_ep)
  chunks, likely = 1, None
  if par.dropless and n_ep > 1:
    chunks = expert_parallel.dropless_chunks(int(tokens_per_device), k, n_ep, e_local, par.ep_chunks)
  if n_ep > 1 and par.ep_fast_path:
    # the fast path's buffers hold all the tokens' rows, the chunks' (the fallback) a chunk's worst case
    fill = min(1.0, k / (n_ep * min(k, e_local)))
    likely = min(1.0, tokens_per_device * k / expert_parallel.fast_rows(
        int(tokens_per_device), k, n_ep, e_local, par.ep_fast_path))
  else:
    fill = forecast.expected_ragged_fill(hlo, tokens_per_device, k, chunks)
  # a pipeline's slots cost what they do as often as the schedule runs them (its bubble ticks skip them)
  cost = forecast.costs(p, chip, forecast.granules(assignment, p.size, target.platform), fill, likely,
                        sched.taken() if sched is not None else None)
  chips = target.chips * target.slices
  price = price if price is not None else targets_lib.hardware(target.family)["price"]
  out = forecast.report(cost, chip, tokens=cfg.batch_size * cfg.seq_len, model_flops=model_flops, chips=chips,
                        devices=par.mesh.size, price=price)
  return {"costs": forecast.summary(cost),
          "forecast": {**out, "chip": target.family, "ragged_fill": round(fill, 4),
                       **({"fast_path_fill": round(likely, 4)} if likely is not None else {}), "price_per_chip_hour": price,
                       "error": forecast.ERROR},
          **({"context": context_costs(p, cost, par, assignment, chip, fill, cfg.model.num_hidden_layers)}
             if par.mesh.shape.get("context", 1) > 1 else {})}


def context_costs(p: forecast.Program, cost: forecast.Cost, par: Parallelism, assignment, chip, fill: float,
                  layers: int) -> dict:
  """What the context axis costs a device per step: the bytes it sends in collectives among devices that
  differ only in their context position (with the default rules that includes the weights' ZeRO
  gathers over context where fsdp is 1; not the gradients' sums over data x context), per step and per
  layer, the sources that send most of them, and the attention kernels' FLOPs (moe/kernels/*attention*)."""
  axis = list(par.mesh.axis_names).index("context")
  others = {d.id: idx[:axis] + idx[axis + 1:] for idx, d in np.ndenumerate(par.mesh.devices)}
  granule = lambda i: others[assignment[i].id] if i < len(assignment) else ()
  where = forecast.costs(p, chip, granule, fill, split=False).links_where  # "fast": among one granule's devices only
  along = collections.Counter({source: v for (link, source), v in where.items() if link == "fast" and v})
  attention = sum(v for source, v in cost.matmul_where.items() if "attention" in source.split(":")[0])
  return {"size": par.mesh.shape["context"], "bytes_per_device": sum(along.values()),
          "bytes_per_layer": sum(along.values()) / layers,
          "top": [{"source": s, "bytes": v} for s, v in along.most_common(5)],
          "attention_flops_per_device": attention}


def compile_for(cfg: TrainConfig, target: targets_lib.Target, buffers: int = 0, price: float | None = None) -> dict:
  """Compile `cfg`'s train step for `target`; the report (see the module docstring), or DoesNotFit.
  `buffers`: also the largest buffers live at the peak (XLA's dumps, written to a temporary folder)."""
  cfg = for_target(cfg, target)
  devices = targets_lib.devices(target)
  par = Parallelism.from_config(cfg.mesh, devices, cfg.pipeline)
  cfg = loop.on_mesh(cfg, par)
  s = loop.setup(cfg, par)
  batch = s.batch_spec(cfg.batch_size, cfg.seq_len)
  t0 = time.perf_counter()
  dump = tempfile.TemporaryDirectory(prefix="aot_dump") if buffers else None
  options = {"xla_dump_to": dump.name, "xla_dump_hlo_as_text": True} if dump else None
  try:
    compiled = s.train_step.lower(s.abstract_state, batch).compile(options)
  except jax.errors.JaxRuntimeError as e:  # the compiler's out-of-memory error, or another of its errors
    text = str(e)
    if "Ran out of memory" not in text and "exceeds available HBM" not in text:
      raise CompilerFailed(target.name, text) from None
    m = _OOM.search(text)
    needed = float(m.group(1)) * _UNIT[m.group(2)] if m else None
    hbm = float(m.group(3)) * _UNIT[m.group(4)] if m else target.hbm_bytes
    raise DoesNotFit(target.name, needed, hbm, text.strip().splitlines()[0][:200], text) from None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state = s.abstract_state
  parts = {"params": per_device_bytes((state["params"], state["rest"])),
           "optimizer": per_device_bytes((state["opt"], state["step"])), "batch": per_device_bytes(batch)}
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes)
  if peak > target.hbm_bytes:  # XLA:GPU compiles what does not fit and says so only in a warning
    report = "\n".join(_buffer_line(i, b) for i, b in enumerate(_peak_buffers(dump, buffers), 1)) if dump else ""
    per = (f"per GPU (the {GPU_MEMORY_FRACTION:.0%} of its memory the trainer lets JAX allocate)"
           if target.platform == "gpu" else "per device")
    raise DoesNotFit(target.name, peak, target.hbm_bytes, "", report, per)
  n = par.mesh.size
  hlo = compiled.as_text()
  flops = params_lib.count(cfg.model, cfg.seq_len)["flops_per_token"] * cfg.batch_size * cfg.seq_len
  rt = s.rt
  assignment = hlo_links.device_assignment(compiled, par.mesh)
  predicted = step_forecast(hlo, cfg, par, target, assignment, flops, price, s.pipe_schedule)
  return {
      "target": target.name, "slices": target.slices, "chips": target.chips * target.slices, "devices": n,
      "mesh": dict(par.mesh.shape),
      "impl": {"attention": rt.attention, "experts": rt.experts, "ep_transport": par.ep_transport,
               "capacity_factor": par.capacity_factor, "fp8": rt.fp8.gemm if rt.fp8 else None,
               "remat_policy": rt.remat_policy, "dtype": rt.dtype},
      "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum,
      "compile_s": round(compile_s, 1),
      "per_device_GiB": {"arguments": _gib(mem.argument_size_in_bytes), **{k: _gib(v) for k, v in parts.items()},
                         "temporaries": _gib(mem.temp_size_in_bytes), "output": _gib(mem.output_size_in_bytes),
                         "aliased": _gib(mem.alias_size_in_bytes), "peak": _gib(peak),
                         "host_temporaries": _gib(mem.host_temp_size_in_bytes)},
      "hbm_GiB": _gib(target.hbm_bytes), "headroom_GiB": _gib(target.hbm_bytes - peak),
      "headroom": round(1 - peak / target.hbm_bytes, 3), "fits": peak <= target.hbm_bytes,
      "model_flops_per_step": flops, "model_flops_per_device": flops / n,
      "collectives": hlo_lib.collectives(hlo),
      "slow_a2a": hlo_links.slow_a2a(hlo, assignment,
                                   "slices" if target.platform == "tpu" else "hosts"),
      "async_a2a": hlo_lib.async_all_to_alls(hlo),
      **predicted,
      "largest_replicated": largest_replicated(state, n),
      **({"stage_transfers": stage_transfers(hlo, par.stages)} if par.stages > 1 else {}),
      **({"peak_buffers": _peak_buffers(dump, buffers)} if dump else {}),
  }


def _allocations(report: str, top: int) -> str:
  """The part of the compiler's out-of-memory message that lists its largest allocations (libtpu:
  "Largest program allocations in hbm:"), its first `top` entries."""
  start = report.find("Largest program allocations")
  if start < 0:
    return report.strip()[:2000]
  entries = re.split(r"\n\s*(?=\d+\. Size:)", report[start:])
  return "\n".join(e.rstrip() for e in entries[:top + 1])


def _buffer_line(i: int, b: dict) -> str:
  """One of `peak_buffers` as a line of a step that does not fit."""
  aliases = f" (+{b['aliases']} alias{'es' * (b['aliases'] > 1)})" if b["aliases"] else ""
  return f"{i}. {b['bytes'] / GiB:.2f} GiB {b['array']} {b['op']}{aliases} {b['jax_op']} {b['source']}".rstrip()


def _peak_buffers(dump: tempfile.TemporaryDirectory, top: int) -> list[dict]:
  """The `top` largest buffers live at the step's peak, from the compiler's dumps in `dump`."""
  with dump:
    folder = Path(dump.name)
    ranges = sorted(folder.glob("*jit_step*after_optimizations-live-range.txt"), key=lambda p: p.stat().st_size)
    if not ranges:
      return []
    live = ranges[-1]
    text = live.with_name(live.name.replace("-live-range.txt", ".txt"))
    assignment = live.with_name(live.name.replace("-live-range.txt", "-buffer-assignment.txt"))
    return hlo_lib.peak_buffers(text.read_text() if text.exists() else "", live.read_text(), top,
                                assignment=assignment.read_text() if assignment.exists() else "")


def stage_transfers(hlo: str, stages: int) -> list[dict]:
  """The collectives of the pipeline executor's transfers (parallel/pipeline.py: TRANSFER), one row per
  kind, array and whether it crosses `stage` (`over_stage`; the others are XLA's re-layouts inside a
  stage around them): {kind, shape, over_stage, count} (instructions; XLA may peel a loop's first
  collective). `stage` is the mesh's first axis, so a device's stage is its position // (devices /
  stages)."""
  per = hlo_parse.program_size(hlo) // stages
  rows = collections.Counter((r["kind"], r["shape"], any(len({d // per for d in g}) > 1 for g in r["groups"]))
                             for r in hlo_lib.scoped_collectives(hlo, pipeline.TRANSFER) if r["groups"])
  return [{"kind": k, "shape": shape, "over_stage": over, "count": c} for (k, shape, over), c in sorted(rows.items())]


def _gib(b: float) -> float:
  return round(b / GiB, 2)


# ------------------------------------------------------------------ search
LONG = 4096  # tokens a sequence (or a context slice of one) holds before --search splits it over `context`
# the dropless exchange, most promising first: the fast path (all tokens at once) in two halves whose
# exchanges overlap the other half's experts, then in one pass; fewer chunks (the expert weights read,
# their gradients summed, fewer times); the default
# the fast path's buffers at 2x the balanced receive, then 1.5x (cheaper, more layers falling back: fallback_s)
EXCHANGES = (["mesh.ep_fast_path=2.0", "mesh.ep_overlap=true"], ["mesh.ep_fast_path=2.0"],
             ["mesh.ep_fast_path=1.5", "mesh.ep_overlap=true"], ["mesh.ep_fast_path=1.5"], ["mesh.ep_chunks=2"], [])

def candidates(cfg: TrainConfig, target: targets_lib.Target, tries: int) -> list[list[str]]:
  """Override sets to try, most promising first: expert x fsdp (x tensor, x context when seq_len is
  over LONG tokens, ring attention before all_gather) factorisations of the devices (of each pipeline stage's, with mesh.stage given),
  then remat policies (the chunked expert-parallel exchange's rows kept before recomputed, its fast
  path (mesh.ep_fast_path=2) in overlapping halves (mesh.ep_overlap) before in one pass before halves
  in 1.5x buffers before 2 chunks before the default, on v5e the weights' all-gathers
  fused into the compute before not, with stages a stage's weights gathered once per step before in
  every tick, with remat full or full_offload and no stages each also with impl.fb_overlap, after
  it without, on GPUs each also with mesh.early_collectives, after it without) and the micro-batch
  (grad_accum, or per_device_batch)."""
  n = target.devices // max(cfg.mesh.stage, 1)
  e = cfg.model.n_routed_experts
  long = cfg.seq_len > LONG  # each sequence over `context` devices too, at least LONG tokens a slice
  contexts = [c for c in (32, 16, 8, 4, 2, 1) if cfg.seq_len % c == 0 and cfg.seq_len // c >= LONG] if long else [1]
  meshes = []
  for tensor in (1, 2, 4):
    for expert in sorted({x for x in (1, 2, 4, 8, 16, 32, 64) if x <= e and e % x == 0}, reverse=True):
      for context in contexts:
        if n % (expert * tensor * context) == 0:
          mesh = ["mesh.data=1", f"mesh.fsdp={n // (expert * tensor * context)}", f"mesh.expert={expert}",
                  f"mesh.tensor={tensor}"] + ([f"mesh.context={context}"] if long else [])
          # over context: the ring (the visible tiles only) before the gathered latent
          meshes += [mesh + [f"mesh.context_attention={a}"] for a in ("ring", "all_gather")] if context > 1 else [mesh]
  out = []
  for remat in ("none", "save_dots_no_batch", "full", "full_offload"):
    # micro-batches: grad_accum, or with per_device_batch (grad_accum follows) twice as many sequences a
    # device before as many, so that the weights are gathered and their gradients reduced half as often
    # (three times as many with the layer inputs in host memory, which is what makes room for them)
    more = (3, 2, 1) if remat == "full_offload" else (2, 1)
    micro = [f"grad_accum={a}" for a in (1, 2, 4) if cfg.batch_size % a == 0] if cfg.per_device_batch is None else [
        f"per_device_batch={k * cfg.per_device_batch}" for k in more]
    for batching in micro:
      for m in meshes:
        for ep in ("keep", "recompute"):  # (the chunked exchange's rows kept when they fit: no all-to-all again)
          for exchange in EXCHANGES:
            for gather in (True, False) if target.family == "v5e" else (False,):  # (all-gathers under compute)
              staged = cfg.mesh.stage > 1 and "mesh.fsdp=1" not in m  # (a stage's weights gathered once)
              # unpipelined with the layers recomputed: then with one micro-batch's forward beside the
              # previous one's backward (impl.fb_overlap)
              overlap = (False, True) if cfg.mesh.stage <= 1 and remat in ("full", "full_offload") else (False,)
              for once in (True, False) if staged else (False,):
                for fb in overlap:
                  for early in (False, True) if target.platform == "gpu" else (False,):  # (XLA:GPU's starts)
                    out.append(m + [f"impl.remat_policy={remat}", f"impl.ep_remat={ep}"] + exchange + (
                        ["mesh.gather_overlap=true"] if gather else []) + (
                        ["pipeline.gather_once=true"] if once else []) + (["impl.fb_overlap=true"] if fb else []) + (
                        ["mesh.early_collectives=true"] if early else []) + [batching])
  return out[:tries]


def search(cfg_path: str, overrides: list[str], target: targets_lib.Target, tries: int) -> list[dict]:
  rows = []
  for extra in candidates(load_train_config(cfg_path, overrides), target, tries):
    try:
      cfg = load_train_config(cfg_path, overrides + extra)
      r = compile_for(cfg, target)
      row = {"overrides": extra, "fits": r["fits"], "peak_GiB": r["per_device_GiB"]["peak"],
             "step_s": r["forecast"]["step_s"], "mfu": r["forecast"].get("mfu"),
             "exposed_comm_share": r["forecast"]["exposed_comm_share"], "compile_s": r["compile_s"]}
    except DoesNotFit as e:
      row = {"overrides": extra, "fits": False, "peak_GiB": _gib(e.needed) if e.needed else None, "why": str(e)}
    except (InputError, CompilerFailed) as e:
      row = {"overrides": extra, "fits": False, "peak_GiB": None, "why": str(e)}
    print(jsonl.dumps(row), flush=True)
    rows.append(row)
  inf = float("inf")
  rows.sort(key=lambda r: (not r["fits"], r.get("step_s", inf), r["peak_GiB"] if r["peak_GiB"] is not None else inf))
  return rows


def table(rows: list[dict]) -> str:
  """The layouts tried, fastest forecast step first among those that fit, memory second."""
  lines = [f"{'fits':5s} {'step s':>8s} {'MFU':>6s} {'peak GiB':>9s}  overrides"]
  for r in rows:
    peak = f"{r['peak_GiB']:.1f}" if r["peak_GiB"] is not None else "-"
    step = f"{r['step_s']:.3f}" if "step_s" in r else "-"
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    lines.append(f"{'yes' if r['fits'] else 'no':5s} {step:>8s} {mfu:>6s} {peak:>9s}  {' '.join(r['overrides'])}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.aot", description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("config", help="training YAML, e.g. configs/deepseek-v3-671b.yaml")
  p.add_argument("overrides", nargs="*", help="key=value overrides, as for python -m train")
  p.add_argument("--target", action="append", required=True, help="v5p-1024, v6e-256, h100x256, ... (repeatable)")
  p.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over the data-centre network)")
  p.add_argument("--search", action="store_true", help="try meshes, remat policies and grad_accum for the target")
  p.add_argument("--tries", type=int, default=12, help="with --search: at most this many compiles")
  p.add_argument("--buffers", type=int, default=0, metavar="N",
                 help="also list the N largest buffers live at the peak: array, bytes, operation, source line")
  p.add_argument("--price", type=float, default=None, metavar="USD",
                 help="price per chip-hour for the forecast's cost per million tokens (default: configs/hardware/chips.yaml)")
  args = p.parse_intermixed_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
  rc = 0
  try:
    cfg = load_train_config(args.config, args.overrides)
    targets = [targets_lib.parse(t, args.slices) for t in args.target]
    if args.search:
      if len(targets) != 1:
        raise ConfigError("--search takes one --target")
      print(table(search(args.config, args.overrides, targets[0], args.tries)))
      return 0
    for target in targets:
      try:
        print(jsonl.dumps(compile_for(cfg, target, args.buffers)), flush=True)
      except DoesNotFit as e:
        print(f"{args.config}: {e}", file=sys.stderr, flush=True)
        if args.buffers and e.report:  # the compiler's own list of its largest allocations
          print(_allocations(e.report, args.buffers), file=sys.stderr, flush=True)
        rc = EXIT_DOES_NOT_FIT
      except CompilerFailed as e:
        print(f"{args.config}: {e}", file=sys.stderr, flush=True)
        rc = rc or EXIT_COMPILER_FAILED
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return rc


if __name__ == "__main__":
  sys.exit(main())
