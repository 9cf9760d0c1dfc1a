"""MetricsLogger (JSONL, TensorBoard, progress) and `python -m train.plot`."""

import json
import re
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from train import plot
from train.core.metrics import MetricsLogger, eta_seconds, summary, tb_scalars


def _records(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tb_tags(run_dir):
  """{tag: [(step, value)]} from the TFRecord event files (8-byte length, 4-byte CRC, data, CRC)."""
  from tensorboardX.proto.event_pb2 import Event

  tags = {}
  for path in sorted(run_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      n = struct.unpack("<Q", data[pos:pos + 8])[0]
      event = Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n
      for v in event.summary.value:
        tags.setdefault(v.tag, []).append((event.step, v.simple_value))
  return tags


def _log_run(run_dir, steps=30, every=10):
  with MetricsLogger(run_dir, steps, progress=False) as log:
    for step in range(every, steps + 1, every):
      log.log(step, {"loss": jnp.float32(5.0 - step / 10), "tokens_per_s": np.float64(1234.5), "lr": 1e-3,
                     "expert_load_cv": jnp.array([0.5, 0.25, 0.125]) / step, "mfu": 0.02})
      if step % 20 == 0:
        log.write_eval(step, {"loss": np.float32(4.5 - step / 10)})


def test_jsonl_records(tmp_path):
  _log_run(tmp_path / "run")
  recs = _records(tmp_path / "run")
  assert [r["step"] for r in recs] == [10, 20, 20, 30]
  r = recs[0]
  assert r["loss"] == 4.0 and r["tokens_per_s"] == 1234.5 and r["lr"] == 1e-3 and r["mfu"] == 0.02
  assert r["expert_load_cv"] == pytest.approx([0.05, 0.025, 0.0125])
  assert isinstance(r["elapsed_s"], float)
  assert recs[2] == {"step": 20, "elapsed_s": recs[2]["elapsed_s"], "eval_loss": 2.5}


def test_appends_on_resume(tmp_path):
  """A run resumed at step 10 appends; one that starts at step 0 again (no checkpoint completed)
  moves the records no checkpoint covers to metrics.dropped.jsonl: metrics.jsonl is one history."""
  _log_run(tmp_path, steps=10)
  with MetricsLogger(tmp_path, 20, progress=False, start_step=10) as log:
    log.log(20, {"loss": 1.0})
  assert [r["step"] for r in _records(tmp_path)] == [10, 20]
  with MetricsLogger(tmp_path, 20, progress=False, start_step=10) as log:
    log.log(20, {"loss": 2.0})
  assert [(r["step"], r["loss"]) for r in _records(tmp_path)] == [(10, 4.0), (20, 2.0)]
  with MetricsLogger(tmp_path, 20, progress=False, start_step=0) as log:
    log.log(10, {"loss": 3.0})
  assert [(r["step"], r["loss"]) for r in _records(tmp_path)] == [(10, 3.0)]
  dropped = [json.loads(x) for x in (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in dropped] == [(20, 1.0), (10, 4.0), (20, 2.0)]


def test_tensorboard_scalars(tmp_path):
  _log_run(tmp_path)
  tags = _tb_tags(tmp_path)
  assert tags["loss"] == [(10, 4.0), (20, 3.0), (30, 2.0)]
  assert tags["eval_loss"] == [(20, 2.5)]
  assert tags["expert_load_cv/layer_2"][0] == (10, pytest.approx(0.0125))


def test_tb_scalars_flattens_vectors():
  assert tb_scalars({"loss": 1.0, "expert_load/cv": [0.1, 0.2]}) == {
      "loss": 1.0, "expert_load/cv/layer_0": 0.1, "expert_load/cv/layer_1": 0.2}


def test_rejects_missing_and_matrix_metrics(tmp_path):
  with MetricsLogger(tmp_path, 10, progress=False) as log:
    with pytest.raises(ValueError, match="needs a loss"):
      log.log(1, {"tokens_per_s": 1.0})
    with pytest.raises(ValueError, match="1-D"):
      log.log(1, {"loss": 1.0, "tokens_per_s": 1.0, "m": np.zeros((2, 2))})


def test_non_finite_values_are_json_null_and_named(tmp_path):
  """metrics.jsonl stays JSON when a run diverges: NaN / Inf become null, listed under `nonfinite`;
  TensorBoard gets only the finite scalars; the first interval (compilation) has no throughput."""
  with MetricsLogger(tmp_path, 10, progress=False) as log:
    log.log(1, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "lr": 1e-3, "cv": [0.5, float("nan")]})
    log.log(2, {"loss": 2.0, "tokens_per_s": 10.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  first, second = (json.loads(line) for line in lines)  # strict JSON: no bare NaN
  assert "NaN" not in lines[0] and "Infinity" not in lines[0]
  assert first["loss"] is None and first["grad_norm"] is None and first["cv"] == [0.5, None]
  assert first["nonfinite"] == ["loss", "grad_norm", "cv"] and first["lr"] == 1e-3
  assert "nonfinite" not in second and "tokens_per_s" not in first
  assert summary(1, 10, {"loss": None}) == "step 1/10  loss nan"
  assert tb_scalars({"loss": None, "lr": 1e-3, "cv": [0.5, None]}) == {"lr": 1e-3, "cv/layer_0": 0.5}


def test_only_main_writes(tmp_path):
  with MetricsLogger(tmp_path / "run", 10, is_main=False) as log:
    log.log(1, {"loss": 1.0, "tokens_per_s": 1.0})
    log.write_eval(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


def test_progress_lines_when_not_a_tty(tmp_path, capsys):
  with MetricsLogger(tmp_path, 300) as log:  # pytest's stderr is not a terminal
    log.log(10, {"loss": 3.25})
    log.log(20, {"loss": 3.25, "tokens_per_s": 12345.0, "mfu": 0.031})
    log.write_eval(100, {"eval_loss": 3.0})
  err = capsys.readouterr().err
  assert "step 10/300  loss 3.2500\n" in err  # no ETA: the first interval holds the compilation
  assert "step 20/300  loss 3.2500  tok/s 12,345  mfu 3.1%  eta " in err
  assert "step 100  eval_loss 3.0000" in err


def test_summary_without_mfu():
  assert summary(5, 9, {"loss": 1.0, "tokens_per_s": 2.0}) == "step 5/9  loss 1.0000  tok/s 2"


def test_eta():
  assert eta_seconds(10, 100, 0, 20.0) == 180.0  # 2 s per step, 90 steps left
  assert eta_seconds(110, 200, 100, 5.0) == 45.0  # resumed at 100: pace from there
  assert eta_seconds(0, 10, 0, 1.0) is None
  assert summary(5, 9, {"loss": 1.0, "tokens_per_s": 2.0}, eta_s=125) == "step 5/9  loss 1.0000  tok/s 2  eta 2:05"


# ------------------------------------------------------------------ plot
def test_plot_writes_png(tmp_path, capsys):
  _log_run(tmp_path, steps=100)
  assert plot.main([str(tmp_path)]) == 0
  png = tmp_path / "loss.png"
  assert capsys.readouterr().out.strip() == str(png)
  data = png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # two panels with lines


def _png_width(path) -> int:
  return int.from_bytes(Path(path).read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_plot_draws_the_max_logit_per_layer(tmp_path):
  """A run with QK-clip logs `max_logit` (one value per MLA layer): train.plot adds a panel of them
  beside the loss and the expert-load CV (the figure is 6 inches a panel + 0.5, at 110 dpi)."""
  _log_run(tmp_path / "plain", steps=50)
  with MetricsLogger(tmp_path / "clip", 50, progress=False) as log:
    for step in range(10, 51, 10):
      log.log(step, {"loss": 5.0 - step / 10, "expert_load_cv": [0.5 / step, 0.2 / step],
                     "max_logit": [30.0 + step, 80.0 + step / 5, float("nan")]})
  assert plot.main([str(tmp_path / "plain")]) == 0 and plot.main([str(tmp_path / "clip")]) == 0
  assert _png_width(tmp_path / "plain" / "loss.png") == round((6 * 2 + 0.5) * 110)
  assert _png_width(tmp_path / "clip" / "loss.png") == round((6 * 3 + 0.5) * 110)
  records = plot.read_metrics(tmp_path / "clip")
  assert plot.series(records, plot.LOGIT_KEY)[1][0] == [40.0, 82.0, None]  # a non-finite value: a gap


def test_plot_without_expert_stats(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "loss": 5 - s / 50, "tokens_per_s": 1.0}) + "\n" for s in range(0, 100, 10)))
  out = tmp_path / "elsewhere.png"
  assert plot.main([str(tmp_path), "--out", str(out)]) == 0
  assert out.stat().st_size > 10_000 and not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("setup, match", [
    (None, "no such run directory"),
    ("", "no metrics yet"),
    ("{not json\n", r"metrics.jsonl:1: not JSON"),
])
def test_plot_errors_exit_2(tmp_path, capsys, setup, match):
  run = tmp_path / "run"
  if setup is not None:
    run.mkdir()
    (run / "metrics.jsonl").write_text(setup)
  assert plot.main([str(run)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and re.search(match, err)
