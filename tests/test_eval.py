"""train.eval and train.generate on a tiny HF folder written by moe.hf.to_hf (random init)."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import hf
from moe.config import ModelConfig
from moe.model import Transformer
from train import eval as eval_lib
from train import generate
from train.core.input_pipeline import ByteTokenizer

CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=128,
                  initializer_range=0.02)


def write_hf(path, cfg=CFG):
  # random weights without running the initialiser (eval_shape + NumPy: no init compile)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray((1.0 if "scale" in str(p) else 0.0) + 0.02 * rng.standard_normal(x.shape), x.dtype), state)
  hf.to_hf(nnx.merge(graphdef, state), path)
  return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return write_hf(tmp_path_factory.mktemp("tiny_hf"))


def run(main, argv, capsys):
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def test_eval_default_data(hf_dir, capsys):
  """Long documents, few targets: no EOS among them, so every target is one byte."""
  rc, out, _ = run(eval_lib.main, [hf_dir, "--data", "default", "--seq-len", "32", "--batch-size", "2",
                                   "--max-batches", "2"], capsys)
  assert rc == 0
  r = json.loads(out)
  assert r["batches"] == 2 and r["tokens"] == r["bytes"] == 2 * 2 * 32
  assert abs(r["loss"] - math.log(CFG.vocab_size)) < 0.1  # random init: near uniform
  assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
  assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)


def test_eval_counts_bytes_without_eos(hf_dir, tmp_path, capsys):
  docs = ["héllo wörld", "abc", "the quick brown fox", "ünïcode", "xyz"]  # 5 docs -> 2 in the eval split
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  rc, out, _ = run(eval_lib.main, [hf_dir, "--data", path, "--seq-len", "32", "--batch-size", "2"], capsys)
  assert rc == 0
  r = json.loads(out)
  from train.core.input_pipeline import split_indices
  eval_docs = [docs[i] for i in split_indices(len(docs), "eval")]
  assert r["bytes"] == sum(len(d.encode()) for d in eval_docs)
  assert r["tokens"] == r["bytes"] + len(eval_docs)  # + one EOS target per document
  assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / r["bytes"] / math.log(2), rel=1e-9)


def test_target_bytes_with_a_decoding_tokenizer():
  class Decoding:  # an HF-like tokenizer: target_bytes decodes each document chunk
    bos_id, eos_id, pad_id = 256, 257, 258
    decode = ByteTokenizer().decode
  tok = Decoding()
  targets = np.array([[104, 195, 169, 257, 120, 258]], np.int32)  # "hé" EOS "x" PAD
  batch = {"targets": targets, "segment_ids": np.array([[1, 1, 1, 1, 2, 0]]), "loss_mask": np.array([[1, 1, 1, 1, 1, 0.]])}
  assert eval_lib.target_bytes(batch, tok) == 4
  assert eval_lib.target_bytes(batch, ByteTokenizer()) == 4


def test_generate_cli(hf_dir, capsys):
  argv = [hf_dir, "--prompt", "Hello", "--prompt", "a", "--max-new-tokens", "4"]
  rc, out, _ = run(generate.main, argv, capsys)
  assert rc == 0
  lines = out.splitlines()
  assert lines[0].startswith("Hello") and any(line.startswith("a") for line in lines[1:])


def test_not_a_model_directory(tmp_path, capsys):
  rc, _, err = run(generate.main, [tmp_path, "--prompt", "x"], capsys)
  assert rc == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_run_dir_checkpoint_equals_its_hf_export(tmp_path, capsys):
  """A checkpoint written by train.checkpoint.save_state reads back as the same model (eval loss
  equal to its to_hf export's), and generate uses the run's tokenizer."""
  from train.core import checkpoint as ckpt_lib, model_io
  from train.core import optimizer as optimizer_lib
  from train.core.train_config import load_train_config

  small = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
           "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
           "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
  cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml", [f"model.{k}={v}" for k, v in small.items()]
                          + [f"run_dir={tmp_path / 'run'}"])
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))), nnx.Param, ...)
  rng = np.random.default_rng(1)
  fill = lambda p, x: jnp.asarray((1.0 if "scale" in str(p) else 0.0) + 0.05 * rng.standard_normal(x.shape), x.dtype)
  params, rest = jax.tree_util.tree_map_with_path(fill, params), jax.tree_util.tree_map_with_path(fill, rest)
  tx = optimizer_lib.make_optimizer(cfg, optimizer_lib.make_schedule(cfg))
  state = {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "guard": {"loss_mean": jnp.zeros((), jnp.float32), "accepted": jnp.zeros((), jnp.int32)}}
  ckpt_lib.save_state(cfg.run_dir, 3, state, cfg)
  hf.to_hf(nnx.merge(graphdef, params, rest), tmp_path / "hf")

  argv = ["--data", "default", "--seq-len", "16", "--batch-size", "2", "--max-batches", "1"]
  rc_run, out_run, err = run(eval_lib.main, [cfg.run_dir, *argv], capsys)
  assert rc_run == 0, err
  rc_hf, out_hf, _ = run(eval_lib.main, [tmp_path / "hf", *argv], capsys)
  assert rc_hf == 0 and json.loads(out_run)["loss"] == pytest.approx(json.loads(out_hf)["loss"], abs=1e-6)
  assert model_io.tokenizer_of(cfg.run_dir) == cfg.tokenizer == "byte"


def test_passkey_samples_and_scores(tmp_path, capsys):
  """--task passkey: each sample is [BOS] intro, fillers with the needle after `depth` of them, the
  question, then the key, within --seq-len tokens; its score (one padded batch) equals an unpadded
  forward of that sample alone, computed here from the logits: the key's summed log-probability and
  whether each key token is the argmax. The CLI prints one JSON line with the summary by depth."""
  from train.core import passkey

  tok = ByteTokenizer()
  L = 512  # (with the byte tokenizer the intro, needle, question and key take 250 tokens, a filler 90)
  hf_dir = write_hf(tmp_path / "hf", CFG.replace(max_position_embeddings=L))
  prompt, key = passkey.sample(tok, L, 0.5, 12345)
  assert key == list(b" 12345") and prompt[0] == tok.bos_id and len(prompt) + len(key) <= L
  text = bytes(prompt[1:]).decode()
  fill = passkey.FILLER
  n = (L - 1 - len(passkey.INTRO) - len(passkey.needle(12345)) - len(passkey.QUESTION) - 6) // len(fill)
  assert text == passkey.INTRO + fill * round(n / 2) + passkey.needle(12345) + fill * (n - round(n / 2)) + passkey.QUESTION
  assert n >= 2 and passkey.sample(tok, L, 0.0, 7)[0][1 + len(passkey.INTRO):][:20] == list(passkey.needle(7).encode())[:20]

  model = hf.from_hf(hf_dir)
  rows = [passkey.sample(tok, L, d, k) for d, k in ((0.0, 11111), (1.0, 98765), (0.5, 55555))]
  got = passkey.score(model, rows, L, batch_size=2)
  for (p, k), (lp, greedy) in zip(rows, got):
    whole = np.asarray(p + k)
    logits = np.asarray(model(jnp.asarray(whole[None, :-1]), jnp.ones((1, len(whole) - 1), jnp.int32)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    at = np.arange(len(p) - 1, len(whole) - 1)
    assert lp == pytest.approx(logp[at, whole[at + 1]].sum(), abs=1e-4)
    assert greedy == bool((logits[at].argmax(-1) == whole[at + 1]).all())

  rc, out, err = run(eval_lib.main, [hf_dir, "--task", "passkey", "--seq-len", L, "--samples", 2, "--batch-size", 4], capsys)
  assert rc == 0, err
  r = json.loads(out.strip().splitlines()[-1])
  assert r["task"] == "passkey" and r["samples"] == 10 and set(r["by_depth"]) == {"0", "0.25", "0.5", "0.75", "1"}
  assert 0 <= r["accuracy"] <= 1 and r["key_logprob_per_token"] < 0
  assert np.mean([d["key_logprob_per_token"] for d in r["by_depth"].values()]) == pytest.approx(r["key_logprob_per_token"])
  rc, out, err = run(eval_lib.main, [hf_dir, "--task", "passkey", "--seq-len", 200], capsys)
  assert rc == 2 and "too short for a passkey sample" in err and len(err.strip().splitlines()) == 1


def test_loss_by_position(hf_dir, tmp_path, capsys):
  """--by-position W: the held-out loss by the position of the predicting token in its document, in
  buckets of W, against a count made here from the model's logits (NumPy log-softmax) on the same
  batches; the buckets' tokens add up to the whole and their token-weighted mean is the loss. train.plot
  draws the buckets of several eval lines."""
  from train import plot
  from train.core.heldout import EvalSet

  rc, out, _ = run(eval_lib.main, [hf_dir, "--data", "default", "--seq-len", "32", "--batch-size", "2",
                                   "--max-batches", "3", "--by-position", "12"], capsys)
  assert rc == 0
  r = json.loads(out)
  buckets = r["by_position"]
  assert [(b["from"], b["to"]) for b in buckets] == [(0, 12), (12, 24), (24, 36)]
  assert sum(b["tokens"] for b in buckets) == r["tokens"]
  assert sum(b["loss"] * b["tokens"] for b in buckets) / r["tokens"] == pytest.approx(r["loss"], rel=1e-5)

  model = hf.from_hf(hf_dir)
  nats, count = np.zeros(3), np.zeros(3)
  for batch in EvalSet("default", ByteTokenizer(), seq_len=32, batch_size=2, max_batches=3).batches:
    logits = np.asarray(model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                              jnp.asarray(batch["positions"])), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    real = batch["loss_mask"] > 0
    np.add.at(nats, batch["positions"][real] // 12, nll[real])
    np.add.at(count, batch["positions"][real] // 12, 1)
  assert [b["tokens"] for b in buckets] == count.tolist()
  np.testing.assert_allclose([b["loss"] for b in buckets], nats / count, rtol=1e-5)

  (tmp_path / "a.json").write_text(out)
  png = tmp_path / "by_position.png"
  assert plot.main(["--by-position", f"run a={tmp_path / 'a.json'}", f"run b={tmp_path / 'a.json'}", "--out", str(png)]) == 0
  assert png.stat().st_size > 0
  assert plot.main(["--by-position", f"b={tmp_path / 'missing.json'}", "--out", str(png)]) == 2
  assert capsys.readouterr().err.strip().endswith("missing.json: no such file")
  rc, _, err = run(eval_lib.main, [hf_dir, "--data", "default", "--by-position", "0"], capsys)
  assert rc == 2 and err.strip() == "error: --by-position 0: must be at least 1"
