"""Smoke tests of the benchmarks behind docs/perf.md (train.bench, train.bench_ep, train.bench_meshes):
each runs on 8 simulated CPU devices with the tiny model of tests/processes.py and prints the JSON
its docs describe. Their timings are not asserted (timings live in the benchmarks, not in tests)."""

import json
import subprocess
import sys

import pytest

from tests.processes import ROOT, TINY, cpu_env


def run(module: str, *args: str, rc: int = 0) -> list[dict]:
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=cpu_env(devices=8), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == rc, out.stderr[-3000:]
  if rc:
    return out.stderr.strip().splitlines()
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_a_bad_mesh_is_one_line():
  """(bench_meshes printed a traceback for a pipeline its model's layers cannot fill)"""
  err = run("train.bench_meshes", "configs/tiny.yaml", "stage=2,data=4", "--set", *TINY, rc=2)
  assert err[-1] == ("error: pipeline: 1 MoE layers cannot fill stage x repeats = 2 chunks; use fewer stages or"
                     " repeats") and "Traceback" not in "\n".join(err), err


def test_bench_prints_throughput_and_mfu():
  (r,) = run("train.bench", "configs/tiny.yaml", *TINY, "mesh.data=2", "mesh.expert=4", "--steps", "1", "--warmup", "1")
  assert r["devices"] == 8 and r["mesh"]["expert"] == 4 and r["dropped_tokens"] == 0
  assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_tflops"] > 0
  assert r["tokens_per_s"] * r["step_s"] == pytest.approx(8 * 16, rel=0.01)  # batch x seq_len


def test_bench_ep_counts_every_assignment():
  (r,) = run("train.bench_ep", "configs/tiny.yaml", *TINY, "batch_size=16", "seq_len=32", "mesh.data=1",
             "mesh.expert=8", "mesh.redundant_experts=8", "--iters", "1", "--skew", "0.5")
  assert r["dropped"] == 0 and r["tokens"] == 16 * 32 and (r["experts"], r["top_k"]) == (8, 2)
  rows = r["rows_per_rank"]
  assert sum(rows["without"]) == sum(rows["with"]) == 16 * 32 * 2  # every (token, expert) assignment, once
  assert rows["imbalance_without"] >= 1 and len(rows["copies"]) == 8
  assert all(r[k] > 0 for k in ("single_fwd", "single_fwd_bwd", "layer_fwd", "layer_fwd_bwd"))
  # every collective by kind and link: one node of 8 ranks, so nothing slow; each rank sends 7/8 of the
  # copies' all-to-all results (the rest stays on the rank)
  b = r["bytes"]
  assert b["copies_links"]["all-to-all"] == {"fast": b["copies"] * 7 / 8, "slow": 0}, b
  assert b["dispatch_links"]["all-to-all"]["fast"] > 0 and all(v["slow"] == 0 for v in b["dispatch_links"].values())


def test_bench_meshes_predicts_a_pipeline():
  (piped,) = run("train.bench_meshes", "configs/tiny.yaml", "stage=2,data=4,schedule=gpipe,microbatches=2",
                 "--rounds", "1", "--set", *TINY, "model.num_hidden_layers=3")
  assert piped["mesh"] == "stage=2,data=4,schedule=gpipe,microbatches=2"
  # gpipe, 2 stages, 2 micro-batches: forwards in ticks 0-2, backwards in 2-4; in lockstep 3 forward
  # slots (cost 1) and 3 backward slots (cost 2) on each of 2 stages, 18 units where an unpipelined
  # forward + backward of the 2 x 2 chunk runs costs 12
  assert piped["predicted_ratio"] == round(18 / 12, 3) and piped["bubble"] == round(1 - 12 / 18, 3)
  assert piped["min_step_s"] > 0 and piped["dropped_tokens"] == 0
