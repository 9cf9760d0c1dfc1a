"""lm-evaluation-harness on the JAX model (train/core/lm_eval_adapter.py), against hand computations.

The references run the model's plain forward pass on one right-padded batch of fixed width (causal:
padding after a token never changes its logits), take log-softmax in float64 NumPy and sum over the
continuation tokens, with the tokenization ([BOS] + UTF-8 bytes) and left truncation written out
here; greedy generation is checked against the full forward's argmax, one token at a time.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from moe import hf  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.model import Transformer  # noqa: E402
from train import eval as eval_lib  # noqa: E402
from train.core import lm_eval_adapter  # noqa: E402
from train.core.input_pipeline import ByteTokenizer  # noqa: E402

MAX_LEN = 64
CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=MAX_LEN,
                  initializer_range=0.02)
BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id


@pytest.fixture(scope="module")
def model():
  # random weights, large enough (std 0.2) that the logits are far from ties; no init compile
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray((1.0 if "scale" in str(p) else 0.0) + 0.2 * rng.standard_normal(x.shape), x.dtype),
      state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def lm(model):
  return lm_eval_adapter.JaxLM(model, ByteTokenizer(), batch_size=4)


@pytest.fixture(scope="module")
def forward(model):
  """ids (lists) -> float64 log-softmax [n, MAX_LEN, V] of one right-padded batch (one compile)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens))

  def run(rows):
    tokens = np.zeros((8, MAX_LEN), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    logits = np.asarray(fn(jnp.asarray(tokens)), np.float64)[:len(rows)]
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))

  return run


def reference_loglikelihood(forward, pairs):
  """(sum log p, greedy) per (context, continuation) by hand: [BOS] + bytes, the last MAX_LEN + 1 tokens."""
  rows, spans = [], []
  for ctx, cont in pairs:
    c, w = [BOS] + list(ctx.encode()), list(cont.encode())
    whole = (c + w)[-(MAX_LEN + 1):]
    rows.append(whole)
    spans.append(len(w))
  logp = forward([r[:-1] for r in rows])
  out = []
  for i, (r, n) in enumerate(zip(rows, spans)):
    pos = np.arange(len(r) - 1 - n, len(r) - 1)
    targets = np.asarray(r[1:])[pos]
    out.append((logp[i, pos, targets].sum(), bool((logp[i, pos].argmax(-1) == targets).all())))
  return out


PAIRS = [("Question: 2 + 2 =", " 4"), ("Question: 2 + 2 =", " five"), ("The cat", " sat on the mat"),
         ("x" * 90, " truncated from the left"),  # 91 + 24 tokens: only the last 65 are read
         ("a", "b")]


def test_loglikelihood_matches_hand_computation(lm, forward):
  got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)])
  want = reference_loglikelihood(forward, PAIRS)
  for (g, g_greedy), (w, w_greedy), pair in zip(got, want, PAIRS):
    assert g == pytest.approx(w, abs=1e-4), pair
    assert g_greedy == w_greedy
  assert len({round(g, 3) for g, _ in got}) == len(got)  # not all the same number


def test_rolling_loglikelihood_matches_hand_computation(lm, forward):
  short, long = "short text", "".join(chr(97 + i % 26) for i in range(MAX_LEN + 10))
  got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate((short, long))])
  ids_long = list(long.encode())
  # short: one window [BOS] + text; long: [BOS] + the first MAX_LEN - 1 predict the first MAX_LEN, then
  # the last 10 are predicted from the MAX_LEN tokens before the last one
  first = reference_loglikelihood(forward, [("", short)])[0][0]
  rows = [[BOS] + ids_long[:MAX_LEN - 1], ids_long[-MAX_LEN - 1:-1]]
  logp = forward(rows)
  window1 = logp[0, np.arange(MAX_LEN), ids_long[:MAX_LEN]].sum()
  window2 = logp[1, np.arange(MAX_LEN - 10, MAX_LEN), ids_long[-10:]].sum()
  assert got[0] == pytest.approx(first, abs=1e-4)
  assert got[1] == pytest.approx(window1 + window2, abs=1e-4)


def test_greedy_generation_matches_stepwise_argmax(lm, model, forward):
  contexts = ["Once upon a time", "abc"]
  gen = {"until": ["zz"], "max_gen_toks": 12}
  got = lm.generate_until([Instance("generate_until", {}, (c, gen), i) for i, c in enumerate(contexts)])
  for c, text in zip(contexts, got):
    seq = [BOS] + list(c.encode())
    for _ in range(12):  # the full forward, one token at a time, no cache
      nxt = int(forward([seq])[0, len(seq) - 1].argmax())
      seq.append(nxt)
      if nxt == EOS:
        break
    want = ByteTokenizer().decode(seq[1 + len(c.encode()):]).split("zz")[0]
    assert text == want


def write_tasks(d):
  """A multiple-choice task and a rolling-loglikelihood task in local YAML + JSONL (no network); every
  request fits 16 tokens, so the CLI compiles one shape."""
  mc = [{"q": f"{a} + {b} =", "choices": [f" {a + b}", f" {a + b + 1}", f" {a * b + 7}"], "answer": i % 3}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1)])]
  (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
  (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("A quick fox.", "é" * 6)))
  common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
  (d / "tiny_mc.yaml").write_text("task: tiny_mc\n" + common.format(d / "mc.jsonl") + (
      "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
      "target_delimiter: ''\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"))
  (d / "tiny_text.yaml").write_text("task: tiny_text\n" + common.format(d / "text.jsonl") + (
      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
      "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"))
  return mc


def test_cli_local_tasks(model, forward, tmp_path, capsys, monkeypatch):
  """python -m train.eval HF_DIR mesh.data=1 --tasks ... --include-path: accuracy and the continuous
  metrics equal those computed by hand from the reference log-likelihoods."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  hf.to_hf(model, tmp_path / "hf")
  (tmp_path / "tasks").mkdir()
  mc = write_tasks(tmp_path / "tasks")
  rc = eval_lib.main([str(tmp_path / "hf"), "mesh.data=1", "--tasks", "tiny_mc,tiny_text", "--include-path",
                      str(tmp_path / "tasks"), "--batch-size", "4"])  # a one-device mesh: the sharded path
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert "|tiny_mc" in out.replace(" ", "")
  rows = {r["task"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
  acc, per_byte, per_token = [], [], []
  for doc in mc:
    lls = [ll for ll, _ in reference_loglikelihood(forward, [(doc["q"], c) for c in doc["choices"]])]
    acc.append(int(np.argmax(lls)) == doc["answer"])
    right = doc["choices"][doc["answer"]]
    per_byte.append(lls[doc["answer"]] / len(right.encode()))
    per_token.append(lls[doc["answer"]] / len(right.encode()))  # byte tokens
  assert rows["tiny_mc"]["acc"] == pytest.approx(np.mean(acc))
  assert rows["tiny_mc"]["correct_logprob_per_byte"] == pytest.approx(np.mean(per_byte), abs=1e-5)
  assert rows["tiny_mc"]["correct_logprob_per_token"] == pytest.approx(np.mean(per_token), abs=1e-5)
  text = rows["tiny_text"]  # lm-eval's bits_per_byte is -sum(ll) / bytes / ln 2
  assert text["bits_per_byte"] == pytest.approx(-text["logprob_per_byte"] / math.log(2), rel=1e-6)
  assert text["samples"] == 2


def hf_byte_tokenizer():
  """ByteTokenizer as an HF tokenizer (train.bench_eval.hf_tokenizer: byte b is id b, <bos> 256 prepended
  when add_special_tokens, <eos> 257, <pad> 258; it checks itself against ours on a sample)."""
  from train import bench_eval

  return bench_eval.hf_tokenizer(ByteTokenizer())


def test_same_as_lm_evals_hf_backend(model, lm, tmp_path, monkeypatch):
  """JaxLM against lm-eval's own `hf` backend (HFLM, float32 CPU) on the model exported by moe.hf.to_hf and
  loaded by transformers: per-request loglikelihood (log p and greedy flag) and loglikelihood_rolling
  within 1e-4, and the same accuracy on tiny_mc through simple_evaluate. HFLM with add_bos_token=True
  scores the same tokens for loglikelihood; for rolling it also scores a BOS after the prefix BOS, so
  the rolling comparison uses add_bos_token=False with BOS as the prefix token (and checks the other
  convention's number too)."""
  import torch
  import transformers
  from lm_eval import evaluator
  from lm_eval.models.huggingface import HFLM

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  hf.to_hf(model, tmp_path / "hf")
  torch_model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager", dtype="float32", output_loading_info=True)
  assert not any(info.values()), info  # every weight from the export, none left at random init
  tokenizer = hf_byte_tokenizer()
  assert tokenizer("é a")["input_ids"] == [BOS, *"é a".encode()]
  assert tokenizer("é a", add_special_tokens=False)["input_ids"] == list("é a".encode())

  def hflm(add_bos):
    return HFLM(pretrained=torch_model.eval(), tokenizer=tokenizer, batch_size=4, max_length=MAX_LEN,
                add_bos_token=add_bos, prefix_token_id=BOS, device="cpu", dtype="float32")

  ref, ref_rolling = hflm(True), hflm(False)
  greedy = []  # one-byte continuations that are the model's argmax (so that some greedy flags are true)
  for ctx in ("The cat", "Question: 2 + 2 =", "abc", "xyz", "Once upon", "0123", "Hello"):
    with torch.no_grad():
      nxt = int(torch_model(torch.tensor([[BOS, *ctx.encode()]])).logits[0, -1].argmax())
    if 33 <= nxt < 127:
      greedy.append((ctx, chr(nxt)))
  requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS + [("", " empty context")] + greedy)]
  got, want = lm.loglikelihood(requests), ref.loglikelihood(requests)
  for (g, g_greedy), (w, w_greedy), req in zip(got, want, requests, strict=True):
    assert g == pytest.approx(w, abs=1e-4), req.args
    assert g_greedy == w_greedy, req.args
  assert len({round(w, 3) for w, _ in want}) == len(want) and any(w for _, w in want)

  texts = ["short text", "é" * 6, "".join(chr(97 + i % 26) for i in range(MAX_LEN + 10)),
           "".join(chr(65 + i % 26) for i in range(3 * MAX_LEN))]  # one, one, two and four windows
  rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
  got, want = lm.loglikelihood_rolling(rolling), ref_rolling.loglikelihood_rolling(rolling)
  assert got == pytest.approx(want, abs=1e-4)
  # hf with add_bos_token=True scores [BOS] + text after the prefix BOS: a term more, every token after two BOS
  double_bos = lm.score_tokens([([BOS], [BOS, *texts[0].encode()])])[0][0]
  assert ref.loglikelihood_rolling(rolling[:1])[0] == pytest.approx(double_bos, abs=1e-4) != got[0]

  (tmp_path / "tasks").mkdir()
  write_tasks(tmp_path / "tasks")
  manager = lm_eval_adapter.task_manager(["tiny_mc"], str(tmp_path / "tasks"))
  ours, _ = lm_eval_adapter.run_tasks(lm, ["tiny_mc"], manager=manager)
  theirs = evaluator.simple_evaluate(model=ref, tasks=["tiny_mc"], task_manager=manager, bootstrap_iters=0,
                                     verbosity="WARNING")["results"]["tiny_mc"]
  assert ours["tiny_mc"]["acc"] == theirs["acc,none"] and ours["tiny_mc"]["samples"] == 5


def test_cli_bad_input_is_one_line(tmp_path, capsys):
  rc = eval_lib.main([str(tmp_path), "--tasks", "no_such_task", "--data", "default"])
  assert rc == 2 and capsys.readouterr().err.count("\n") == 1


def test_eval_tasks_during_training(tmp_path, monkeypatch):
  """eval_tasks every eval_every steps: logged as eval_<task>/<metric> at exactly those steps (the values'
  correctness is the adapter's, tested above), and a run stopped after its step-4 checkpoint and resumed
  to step 6 keeps the schedule (steps 2, 4, 6: none twice, none skipped); train.plot draws them."""
  from tests.test_loop import SMALL_MODEL
  from train import plot
  from train.core import loop
  from train.core.train_config import load_train_config

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  (tmp_path / "tasks").mkdir()
  write_tasks(tmp_path / "tasks")
  run_dir = tmp_path / "run"
  overrides = ["log_every=2", "eval_every=2", "eval_steps=1", "batch_size=2", "seq_len=32", f"run_dir={run_dir}",
               "save_every=2", "optimizer.warmup_steps=1", "model.num_nextn_predict_layers=0",
               "eval_tasks=tiny_mc,tiny_text", "eval_tasks_limit=3", f"eval_tasks_path={tmp_path / 'tasks'}",
               *SMALL_MODEL]

  def eval_steps():
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_tiny_mc/acc" in r]

  loop.train(load_train_config("configs/tiny.yaml", ["steps=4", *overrides]), progress=False, peak_flops=1e12)
  assert [r["step"] for r in eval_steps()] == [2, 4]
  resumed = loop.train(load_train_config("configs/tiny.yaml", ["steps=6", *overrides]), progress=False,
                       peak_flops=1e12)
  assert resumed["start_step"] == 4
  evals = eval_steps()
  assert [r["step"] for r in evals] == [2, 4, 6]
  for r in evals:
    assert 0 <= r["eval_tiny_mc/acc"] <= 1 and r["eval_tiny_mc/correct_logprob_per_byte"] < 0
    assert r["eval_tiny_text/bits_per_byte"] == pytest.approx(-r["eval_tiny_text/logprob_per_byte"] / math.log(2))
  assert evals[0]["eval_tiny_mc/correct_logprob_per_byte"] != evals[1]["eval_tiny_mc/correct_logprob_per_byte"]
  assert plot.main([str(run_dir)]) == 0 and (run_dir / "loss.png").is_file()


def test_same_numbers_on_a_mesh(tmp_path):
  """8 simulated devices (data x fsdp x expert = 2 x 2 x 2): the same log-likelihoods (1e-4), greedy
  flags and generations as on one device (the decoder runs the expert-sharded arrays without the
  expert-parallel exchange)."""
  from tests.processes import cpu_env, last_json, run_together

  out = run_together([["-m", "tests.test_lm_eval", str(tmp_path)]], cpu_env(8))[0]
  got = last_json(out)
  assert got["max_diff"] < 1e-4 and got["greedy_same"] and got["generated_same"], got


def test_sweep_report_fits_task_metrics(tmp_path):
  """train.sweep reads the task metrics of a run's last step; sweep_report takes each budget's best
  run (lowest eval loss) and fits -value = a C^-b to the continuous metric (exact here: 2 C^-0.1)."""
  from train import sweep, sweep_report

  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval_loss": 2.0, "eval_t/acc": 0.2}) + "\n"
                                          + json.dumps({"step": 10, "eval_loss": 1.5, "eval_t/acc": 0.5}) + "\n")
  assert sweep.final_tasks(tmp_path, 10) == {"t/acc": 0.5}
  rows = []
  for i, c in enumerate((1e12, 1e13, 1e14)):
    for j, worse in enumerate((0.0, 0.3)):  # the second run of each budget has a higher loss
      rows.append({"name": f"r{i}{j}", "budget": c, "flops": c, "eval_loss": 3.0 - i + worse,
                   "tasks": {"t/correct_logprob_per_byte": -2 * c ** -0.1 - worse, "t/acc": 0.1 * i + worse}})
  got = sweep_report.fit_tasks(rows, [1e12, 1e13, 1e14], [])
  assert [p[2] for p in got["t/correct_logprob_per_byte"]["points"]] == ["r00", "r10", "r20"]
  assert got["t/correct_logprob_per_byte"]["fit"]["b"] == pytest.approx(0.1, rel=1e-4)
  assert got["t/correct_logprob_per_byte"]["fit"]["a"] == pytest.approx(2.0, rel=1e-3)
  assert got["t/acc"]["fit"] is None and [p[1] for p in got["t/acc"]["points"]] == pytest.approx([0.0, 0.1, 0.2])


def _mesh_worker(path):
  """python -m tests.test_lm_eval DIR: one device against a 2 x 2 x 2 mesh, one JSON line."""
  from parallel.mesh import MeshConfig, Parallelism

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray((1.0 if "scale" in str(p) else 0.0) + 0.2 * rng.standard_normal(x.shape), x.dtype),
      state)
  hf.to_hf(nnx.merge(graphdef, state), path)
  lls = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)]
  gens = [Instance("generate_until", {}, (c, {"until": ["zz"], "max_gen_toks": 6}), i)
          for i, c in enumerate(["Once upon", "abc", "x"])]
  runs = []
  for par in (None, Parallelism.from_config(MeshConfig(data=2, fsdp=2, expert=2))):
    lm = lm_eval_adapter.JaxLM(hf.from_hf(path, par=par), ByteTokenizer(), batch_size=4)
    runs.append((lm.loglikelihood(lls), lm.generate_until(gens)))
  (one, one_gen), (mesh, mesh_gen) = runs
  print(json.dumps({"max_diff": max(abs(a - b) for (a, _), (b, _) in zip(one, mesh)),
                    "greedy_same": [g for _, g in one] == [g for _, g in mesh], "generated_same": one_gen == mesh_gen}))


if __name__ == "__main__":
  import sys

  _mesh_worker(sys.argv[1])
