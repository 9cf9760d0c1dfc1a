"""train.export: a checkpoint as an HF folder `transformers` loads with the same logits, and a run
directory made from HF weights (step 0, fresh optimiser state) that trains on."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from moe import hf
from moe.model import Transformer
from train import export
from train.core import loop
from train.core import checkpoint as ckpt_lib
from train.core import model_io
from train.core import optimizer as optimizer_lib
from train.core import step as step_lib
from train.core.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model.vocab_size=260", "model.hidden_size=32", "model.intermediate_size=64",
               "model.moe_intermediate_size=16", "model.num_hidden_layers=3", "model.num_attention_heads=2",
               "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.max_position_embeddings=64"]
TRAIN = ["batch_size=2", "seq_len=16", "eval_every=0", "log_every=1", "optimizer.warmup_steps=0"]


def tokens(vocab, b=2, s=13, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, (b, s)).astype(np.int32)


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def test_export_matches_transformers(tmp_path):
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [*SMALL_MODEL, *TRAIN, f"run_dir={tmp_path / 'run'}"])
  model_cfg = cfg.model
  tx = optimizer_lib.make_optimizer(cfg, optimizer_lib.make_schedule(cfg))
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef = nnx.split(abstract, nnx.Param, ...)[0]
  state = jax.eval_shape(lambda: step_lib.init_state(Transformer(model_cfg, rngs=nnx.Rngs(0)), tx)[1])
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)  # host arrays: nothing to compile
  rng = np.random.default_rng(0)

  def spread(path, x):  # weights large enough that every part moves the logits (as tests/test_hf.py)
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      v = 1.0 + 0.2 * rng.standard_normal(x.shape)
    elif "e_score_correction_bias" in name:
      v = 0.3 * rng.random(x.shape)  # selection-only bias: must change which experts are chosen
    else:
      v = 0.15 * rng.standard_normal(x.shape)
    return v.astype(x.dtype)

  state = {**state, "params": jax.tree_util.tree_map_with_path(spread, state["params"]),
           "rest": jax.tree_util.tree_map_with_path(spread, state["rest"])}
  with ckpt_lib.Checkpoints(cfg) as ck:
    ck.save(5, state, None, force=True)

  out = tmp_path / "hf"
  assert export.main([str(tmp_path / "run"), "--step", "5", "--out", str(out)]) == 0
  assert (out / "config.json").is_file() and list(out.glob("model-*.safetensors"))
  index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
  assert "model.layers.1.mlp.gate.e_score_correction_bias" in index

  ours = jax.jit(lambda params, rest, t: nnx.merge(graphdef, params, rest)(t))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
  toks = tokens(model_cfg.vocab_size)
  want = np.asarray(ours(state["params"], state["rest"], jnp.asarray(toks)))
  assert np.abs(want).max() > 1.0  # a comparison that could fail
  np.testing.assert_allclose(hf_logits(loaded, toks), want, atol=1e-4, rtol=0)

  assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_errors(tmp_path, capsys):
  (tmp_path / "nothing").mkdir()
  assert export.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "no checkpoints" in err and str(tmp_path / "nothing") in err


def test_from_hf_makes_a_step_0_checkpoint_that_trains(tmp_path):
  config = transformers.DeepseekV3Config(
      vocab_size=260, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
      qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
      topk_group=1, first_k_dense_replace=1, max_position_embeddings=64, tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.DeepseekV3ForCausalLM(config).float().save_pretrained(tmp_path / "hf")
  run = tmp_path / "run"
  assert export.main(["--from-hf", str(tmp_path / "hf"), "--out", str(run), "--config", "configs/tiny.yaml",
                      "steps=1", "save_every=0", *TRAIN]) == 0
  step0 = run / "checkpoints" / "0"
  assert ckpt_lib.validate_step_dir(step0)["step"] == 0 and not (step0 / "data").exists()
  cfg = load_train_config(run / "config.yaml")
  assert cfg.run_dir == str(run) and cfg.steps == 1 and cfg.model.num_hidden_layers == 2
  assert cfg.model.num_nextn_predict_layers == 0  # transformers saves no MTP weights

  # the weights are the HF ones, bitwise; the optimiser state is fresh
  ref = nnx.state(hf.from_hf(tmp_path / "hf"), nnx.Variable)
  got = nnx.state(model_io.load_model(step0), nnx.Variable)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with ckpt_lib.Checkpoints(cfg) as ck:
    plan = ck.resume_plan()
    assert plan["step"] == 0 and not plan["restore_data"]
    tx = optimizer_lib.make_optimizer(cfg, optimizer_lib.make_schedule(cfg))
    target = jax.eval_shape(lambda: step_lib.init_state(Transformer(cfg.model, rngs=nnx.Rngs(0)), tx)[1])
    state = ck.restore(plan, target, None)
  assert int(state["step"]) == 0
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(state["opt"]))

  result = loop.train(cfg, progress=False, peak_flops=1e12)
  assert result["start_step"] == 0 and result["last_step"] == 1 and np.isfinite(result["last_loss"])
  assert (run / "checkpoints" / "1").is_dir()
