"""Released weights at pod scale (moe.hf.from_hf with a mesh, train init_from, train.export from a
sharded run): random V2- and V3-shaped checkpoints written by `transformers`, and the V3 one in
DeepSeek's FP8 release format, loaded onto 8 simulated devices by tests/hf_worker.py."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from moe import hf
from tests.processes import cpu_env, free_port, last_json, run_together
from tests.test_hf import CASES, hf_logits, make_hf_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "hf_worker.py"
V3 = ("v3", dict(CASES["v3_yarn_grouped"][1], n_routed_experts=8, num_experts_per_tok=2))
V2 = CASES["v2_lite_greedy"]


def write_fp8(src: Path, dst: Path):
  """The checkpoint of `src` as DeepSeek released V3: linear weights float8 + 128x128 weight_scale_inv."""
  dst.mkdir()
  for f in src.iterdir():
    if f.suffix == ".safetensors":
      tensors = {}
      for name, w in load_file(str(f)).items():
        if hf.fp8_in_release(name):
          tensors[name], tensors[name + "_scale_inv"] = hf.quantize_fp8(w)
        else:
          tensors[name] = w
      save_file(tensors, str(dst / f.name))
    else:
      (dst / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  d = tmp_path_factory.mktemp("released")
  for name, (kind, extra) in (("v3", V3), ("v2", V2)):
    make_hf_model(kind, extra).save_pretrained(d / name)
  write_fp8(d / "v3", d / "v3fp8")
  out = subprocess.run([sys.executable, str(WORKER), "single", str(d)], capture_output=True, text=True, timeout=900,
                       cwd=ROOT, env=cpu_env())
  assert out.returncode == 0, out.stderr[-3000:]
  return d, json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_load_is_bitwise_the_single_device_load(released):
  """V3-, V2- and FP8-V3-shaped releases onto fsdp=4 x expert=2 and fsdp=2 x expert=2 x tensor=2: every
  parameter equal to the one-device load (FP8: the same dequantised values), most of them sharded."""
  _, r = released
  for name in ("v3", "v2", "v3fp8"):
    for mesh in ("f4e2", "f2e2t2"):
      assert r[name][mesh]["max_diff"] == 0.0, (name, mesh)
      assert r[name][mesh]["sharded"] > 10, (name, mesh)


def test_first_step_from_the_release_equals_one_device(released):
  _, r = released
  assert np.isfinite(r["loss_single"]) and r["loss_f4e2"] == pytest.approx(r["loss_single"], rel=5e-7)


def test_export_of_a_sharded_run_loads_in_transformers(released):
  d, _ = released
  loaded = transformers.AutoModelForCausalLM.from_pretrained(d / "exported", attn_implementation="eager").float()
  ours = np.load(d / "ours.npy")
  assert np.abs(ours).max() > 1.0
  np.testing.assert_allclose(hf_logits(loaded.eval(), np.load(d / "tokens.npy")), ours, atol=1e-4, rtol=0)


def test_fp8_export_round_trips_within_the_quantisation_error(released):
  """--fp8: the linears as E4M3 with 128x128 scales (what DeepSeek's inference code loads); read back,
  each within E4M3's 2^-4 relative rounding of the float32 export, the rest exact."""
  d, _ = released
  index = json.loads((d / "exported_fp8" / "model.safetensors.index.json").read_text())["weight_map"]
  assert any(n.endswith("weight_scale_inv") for n in index)
  assert json.loads((d / "exported_fp8" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
  exact = hf.from_hf(d / "exported")
  fp8 = hf.from_hf(d / "exported_fp8")
  names = hf.weight_names(exact.cfg)
  a, b = hf._variables(exact), hf._variables(fp8)
  for name, t in names.items():
    x, y = np.asarray(a[t.path][...]), np.asarray(b[t.path][...])
    x, y = (x[t.index], y[t.index]) if t.index else (x, y)
    if hf.fp8_in_release(name):
      assert np.all(np.abs(y - x) <= 2.0**-4 * np.abs(x) + 2.0**-9 * np.abs(x).max()), name
      assert not np.array_equal(x, y), name
    else:
      np.testing.assert_array_equal(x, y, err_msg=name)


def test_two_processes_read_only_their_part(released):
  """2 processes x 4 devices, fsdp=8: each process reads well under the checkpoint's bytes, and the
  loaded weights are those of the one-process load; exported from there (a tensor at a time gathered
  across the processes, process 0 writing), every tensor is the release's, bitwise, over several files."""
  d, r = released
  port = free_port()
  outs = [last_json(o) for o in run_together([(WORKER, "multi", port, i, 2, d) for i in range(2)], cpu_env(), 600)]
  total = r["v3"]["total_bytes"]
  assert r["v3"]["single_read"] == pytest.approx(total, rel=0.01)  # one device: every byte once
  for o in outs:
    assert o["devices"] == 8 and o["read"] < 0.65 * total, (o["read"], total)
    for k, (s, s2) in r["v3"]["sums"].items():
      assert o["sums"][k] == pytest.approx([s, s2], rel=1e-12, abs=1e-12), k
  ref, back = hf.SafetensorsFolder(d / "v3"), hf.SafetensorsFolder(d / "exported_2proc")
  assert set(back.names()) == set(ref.names()) and len(set(back.file_of.values())) > 1
  for name in ref.names():
    np.testing.assert_array_equal(back.get(name), ref.get(name), err_msg=name)


def _train_cli(args, tmp_path):
  return subprocess.run([sys.executable, "-m", "train", *args, "--peak-tflops", "1"], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env=cpu_env(8))  # (--peak-tflops: no matmul benchmark)


def test_train_init_from_continues_from_the_release_on_8_devices(tmp_path):
  """`python -m train CONFIG init_from=HF_DIR` on fsdp=4 x expert=2: with the learning rate and the
  router-bias update at 0, the exported step-1 weights are the release's, bitwise."""
  import yaml

  kind, extra = V2
  make_hf_model(kind, dict(extra, vocab_size=260)).save_pretrained(tmp_path / "v2")  # >= the byte tokenizer's 259
  raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
  raw["model"] = dataclasses.asdict(hf.config_of(tmp_path / "v2"))
  (tmp_path / "v2.yaml").write_text(yaml.safe_dump(raw))
  run = tmp_path / "run"
  out = _train_cli([str(tmp_path / "v2.yaml"), f"init_from={tmp_path / 'v2'}", f"run_dir={run}", "steps=1", "batch_size=8",
                    "seq_len=32", "eval_every=0", "optimizer.lr=0", "optimizer.final_lr=0", "optimizer.warmup_steps=0",
                    "loss.bias_update_gamma=0", "mesh.data=1", "mesh.fsdp=4", "mesh.expert=2"], tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "init_from" in out.stderr and "done: loss" in out.stdout
  from train import export

  export.export(run, tmp_path / "back")
  ref = hf.SafetensorsFolder(tmp_path / "v2")
  back = hf.SafetensorsFolder(tmp_path / "back")
  assert set(back.names()) == set(ref.names())
  for name in ref.names():
    np.testing.assert_array_equal(back.get(name), ref.get(name), err_msg=name)


def test_train_init_from_a_different_architecture_is_one_line(released, tmp_path):
  d, _ = released
  out = _train_cli(["configs/tiny.yaml", f"init_from={d / 'v2'}", f"run_dir={tmp_path / 'run'}"], tmp_path)
  err = out.stderr.strip().splitlines()
  assert out.returncode == 2 and err[-1].startswith("error: init_from=") and "vocab_size" in err[-1], out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_bench_load_reports_each_process_reading_its_half(tmp_path):
  """train.bench_load (the docs/perf.md measurement) on the tiny model: 2 processes x 2 devices, each
  reads and holds half of the tensors, and its high-water mark covers what its devices hold."""
  out = subprocess.run([sys.executable, "-m", "train.bench_load", "configs/tiny.yaml", "--dir", str(tmp_path / "ck"),
                        "--processes", "2", "--devices", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=cpu_env())
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [r["process"] for r in rows] == [0, 1]
  for r in rows:
    assert r["devices"] == 2 and 0.45 < r["read_bytes"] / r["checkpoint_bytes"] < 0.55, r
    assert r["peak_rss"] > r["baseline_rss"] and r["device_bytes"] > 0.45 * r["checkpoint_bytes"], r
