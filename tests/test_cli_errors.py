"""The CLIs' last tracebacks, hangs and misleading lines (issue 24): each case as a user meets it,
asserting the exit code, the one line, no traceback and nothing lost.

Through `python -m train` in a subprocess where the order of start-up matters (the distributed
runtime, signals); the other CLIs' `main()` in this process; pure functions where a CLI run would
have to train.
"""

import json
import math
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from moe import params as params_cli
from moe.config import ModelConfig
from parallel.common.errors import ConfigError, DataError
from parallel.mesh import MeshConfig, axis_sizes
from tests.processes import cpu_env, free_port
from train import export as export_cli
from train import generate as generate_cli
from train import sweep as sweep_cli
from train.core import input_pipeline as data_lib
from train.core import metrics as metrics_lib

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")


def train_cli(*args, timeout=120, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=ROOT, env=env or cpu_env(),
                        capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str, *words: str) -> str:
  """The error line `stderr` ends with, after checking it is the only one and no traceback came."""
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
  for w in words:
    assert w in errors[0], errors[0]
  return errors[0]


def latin1_config(tmp_path) -> Path:
  path = tmp_path / "latin1.yaml"
  path.write_bytes(Path(TINY_YAML).read_bytes() + "# café\n".encode("latin-1"))
  return path


# ------------------------------------------------------------------ tracebacks, through python -m train
@pytest.mark.parametrize("case", ["not-utf8", "process-id", "no-port"])
def test_train_bad_start_is_one_line(tmp_path, case):
  """A config file that is not UTF-8 (UnicodeDecodeError), --process-id 5 of 2 (JAX's ValueError),
  --coordinator without a port (IndexError): one line, exit 2, the run directory untouched."""
  run_dir = tmp_path / "run"
  args, words = {
      "not-utf8": ([latin1_config(tmp_path)], ["latin1.yaml: not UTF-8 text (byte 0xe9 at offset", "save the config"]),
      "process-id": ([TINY_YAML, "--coordinator", "127.0.0.1:12355", "--num-processes", 2, "--process-id", 5],
                     ["process_id=5 is not one of the 2 processes", "0..1"]),
      "no-port": ([TINY_YAML, "--coordinator", "localhost", "--num-processes", 2, "--process-id", 1],
                  ["coordinator 'localhost' is not host:port", "localhost:12355"]),
  }[case]
  p = train_cli(*args, f"run_dir={run_dir}")
  assert p.returncode == 2, p.stderr[-3000:]
  one_line(p.stderr, *words)
  assert not run_dir.exists()


def test_a_peer_that_never_comes_stops_after_init_timeout(tmp_path):
  """Process 1 of 2 whose process 0 never starts: it says what it waits for and how long, then stops
  in one line (exit 2) after --init-timeout; it used to wait silently (JAX: 300 s, then a C++ abort)."""
  t = time.monotonic()
  p = train_cli(TINY_YAML, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", 2, "--process-id", 1,
                "--init-timeout", 2, f"run_dir={tmp_path / 'run'}", timeout=60)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "process 1 of 2 at the coordinator 127.0.0.1:" in p.stderr and "waiting up to 2 s" in p.stderr
  one_line(p.stderr, "waited 2 s (--init-timeout) and not every process connected", "raise --init-timeout")
  assert time.monotonic() - t < 40 and not (tmp_path / "run").exists()


def test_sigterm_before_the_first_step_says_so(tmp_path):
  """SIGTERM while the run sets up (here: as the mesh is built, before the state is compiled): exit
  143 at once with one line saying nothing was trained and where the run resumes from (it exited 143
  without a word)."""
  run_dir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "train", TINY_YAML, f"run_dir={run_dir}", "steps=2"],
                          cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    seen = []
    for line in proc.stderr:
      seen.append(line)
      if line.startswith("parallel:"):
        proc.send_signal(signal.SIGTERM)
        break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, err[-3000:]
  finally:
    proc.kill()
  one_line(err, "stopped by SIGTERM before the first step finished", "nothing to save; no checkpoint was written")
  assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()


# ------------------------------------------------------------------ the other CLIs, in this process
def test_other_clis_bad_files_are_one_line(tmp_path, capsys):
  """moe.params on a file that is not UTF-8; train.sweep on invalid YAML (52 lines of traceback, where
  train said one line) and on a file that is not UTF-8."""
  assert params_cli.main([str(latin1_config(tmp_path))]) == 2
  one_line(capsys.readouterr().err, "not UTF-8 text", "save the config file as UTF-8")
  (tmp_path / "bad.yaml").write_text("base: configs/tiny.yaml\ngrid: [\n")
  assert sweep_cli.main([str(tmp_path / "bad.yaml")]) == 2
  one_line(capsys.readouterr().err, "bad.yaml: not valid YAML at line 3")
  (tmp_path / "latin1.yaml").write_bytes(b"base: caf\xe9\n")
  assert sweep_cli.main([str(tmp_path / "latin1.yaml")]) == 2
  one_line(capsys.readouterr().err, "not UTF-8 text", "save the sweep file as UTF-8")


def test_export_names_a_missing_run_directory(tmp_path, capsys):
  """A run directory that is not there is named as such (it said "no checkpoints; train first")."""
  assert export_cli.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
  one_line(capsys.readouterr().err, "nothing: no such run directory")
  assert not (tmp_path / "o").exists()


def test_generate_refuses_to_run_past_max_position_embeddings(monkeypatch, capsys):
  """64 positions, a 4-token prompt (BOS + 3 bytes) and 100 new tokens: one line naming the limit
  and the --max-new-tokens that fits (60); it used to decode past the trained positions silently.
  (The model is a stand-in: loading real weights op by op takes 12 s.)"""
  model = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=260, max_position_embeddings=64))
  monkeypatch.setattr(generate_cli, "load_any", lambda path, dtype: model)
  assert generate_cli.main(["some/run", "--tokenizer", "byte", "--prompt", "abc", "--max-new-tokens", "100"]) == 2
  one_line(capsys.readouterr().err, "(4 tokens with BOS) + --max-new-tokens 100 = 104 positions",
           "max_position_embeddings 64; use --max-new-tokens 60 or less")
  with pytest.raises(ConfigError, match="is 70 tokens .* shorten the prompt"):
    generate_cli.check_length(70, 1, 64)
  generate_cli.check_length(4, 60, 64)


# ------------------------------------------------------------------ misleading lines, as functions
def test_llama_config_is_named_by_its_model_type(tmp_path):
  """A Llama folder given as init_from (or to any HF loader): its model_type is the error, not a
  DeepSeek default it lacks (moe_intermediate_size=2048)."""
  (tmp_path / "config.json").write_text(json.dumps({
      "model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 384,
      "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 1024}))
  with pytest.raises(ConfigError, match=r"model_type='llama' is not a DeepSeek-V2/V3 model") as e:
    ModelConfig.from_hf_json(tmp_path)
  assert "moe_intermediate_size" not in str(e.value)


def test_tokenizer_errors_name_the_missing_file(tmp_path):
  """A tokenizer path that is not there is "no such file" (it said "unknown tokenizer")."""
  for spec, words in [(tmp_path / "tok" / "tokenizer.json", "no such file"),
                      (tmp_path, "the directory holds no tokenizer.json"),
                      ("gpt9", "unknown tokenizer 'gpt9'")]:
    with pytest.raises(DataError, match=words):
      data_lib.load_tokenizer(str(spec))


def test_mesh_errors_name_the_sizes_that_would_divide():
  with pytest.raises(ConfigError, match=r"\(3 devices\) do not divide the 8 devices; mesh.expert=1, 2, 4 or 8 would"):
    axis_sizes(MeshConfig(expert=3), 8)
  with pytest.raises(ConfigError, match=r"needs 12 devices.*8 devices; mesh.fsdp=1 or 2 would$"):
    axis_sizes(MeshConfig(data=1, fsdp=3, tensor=4), 8)
  with pytest.raises(ConfigError, match=r"mesh.ep_nodes=3 must divide mesh.expert=8: 1, 2, 4 or 8"):
    MeshConfig(expert=8, ep_nodes=3)


def test_one_document_corpus_holds_out_its_end(tmp_path):
  """A corpus of one text file is a corpus: eval is its last 1% (by position), train the rest (it
  stopped with "split='eval' needs at least 2 documents")."""
  text = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
  (tmp_path / "one.txt").write_text(text)
  tok = data_lib.ByteTokenizer()
  cut = len(text) - math.ceil(len(text) / 100)

  def rows(split):
    ds = data_lib.make_dataset(str(tmp_path / "one.txt"), seq_len=128, batch_size=1, seed=0, split=split,
                               tokenizer=tok)
    return [b["tokens"][0][b["segment_ids"][0] > 0] for b in ds]

  (held_out,) = rows("eval")
  assert tok.decode(held_out[1:].tolist()) == text[cut:]  # [BOS] + the end of the file
  train = next(iter(data_lib.make_dataset(str(tmp_path / "one.txt"), seq_len=cut + 1, batch_size=1, seed=0,
                                          split="train", tokenizer=tok, max_seq_len=None)))
  assert tok.decode(train["tokens"][0][1:].tolist()) == text[:cut]
  ids = np.arange(1000)
  assert data_lib.split_by_position(ids, "eval").tolist() == list(range(990, 1000))


def test_eta_times_the_steps_after_the_first(tmp_path, capsys, monkeypatch):
  """The first logged interval holds the compilation (100 s here), then 1 s per step: at step 3 of 10
  the ETA is 7 s (it said 3:58, 102 s / 3 steps x 7)."""
  now = [0.0]
  monkeypatch.setattr(metrics_lib.time, "time", lambda: now[0])
  with metrics_lib.MetricsLogger(tmp_path, 10) as logger:
    for step, t in [(1, 100.0), (2, 101.0), (3, 102.0)]:
      now[0] = t
      logger.log(step, {"loss": 1.0})
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
  assert "eta" not in lines[0] and lines[1].endswith("eta 0:08") and lines[2].endswith("eta 0:07"), lines


PIPELINED_COMPILE = """
import sys
from tests.processes import TINY
from train.core import loop
from train.core.train_config import load_train_config
cfg = load_train_config("configs/tiny.yaml", [o for o in TINY if o != "steps=300"] + sys.argv[1:])
s = loop.setup(cfg)
s.train_step.lower(s.abstract_state, s.batch_spec(cfg.batch_size, cfg.seq_len)).compile()
"""


def test_pipelined_step_compiles_without_rematerialization_warnings():
  """stage=2 x data=4: the batch's rows were sharded over stage x data and reshaped into micro-batches,
  which XLA's partitioner could only rematerialise, logging 'Involuntary full rematerialization' for
  each of the 5 input arrays (2.3 KB of warnings) at every pipelined start."""
  p = subprocess.run([sys.executable, "-c", PIPELINED_COMPILE, "model.vocab_size=260", "model.num_hidden_layers=3",
                      "mesh.stage=2", "mesh.data=-1", "pipeline.schedule=1f1b", "pipeline.microbatches=4"],
                     cwd=ROOT, env=cpu_env(devices=8), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Involuntary full rematerialization" not in p.stderr, p.stderr[-3000:]
