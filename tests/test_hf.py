"""Parity with `transformers` (DeepseekV3ForCausalLM, DeepseekV2ForCausalLM) and HF weights in/out."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

import moe
from moe import hf
from moe.config import ModelConfig
from moe.runtime import Runtime
from parallel.common.errors import ConfigError
from tests.random_weights import initialised

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}
BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
            num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=20, qk_nope_head_dim=12,
            qk_rope_head_dim=8, v_head_dim=10, max_position_embeddings=256, tie_word_embeddings=False)

CASES = {
    # V3: sigmoid, noaux_tc group-limited (4 groups, keep 2), YaRN with mscale, 2 dense layers.
    "v3_yarn_grouped": ("v3", dict(q_lora_rank=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                                   n_group=4, topk_group=2, first_k_dense_replace=2, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
    # V3 with a plain q projection, no YaRN, one group, no norm_topk_prob.
    "v3_plain_q": ("v3", dict(q_lora_rank=None, n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2,
                              n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
                              norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    # V2-Lite style: softmax greedy, q_lora null, YaRN mscale 0.707.
    "v2_lite_greedy": ("v2", dict(q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                                  topk_method="greedy", first_k_dense_replace=1, routed_scaling_factor=1.0,
                                  norm_topk_prob=False, rope_parameters=YARN)),
    # V2 style: softmax group_limited_greedy (group score = max), q_lora, routed_scaling_factor 16.
    "v2_group_limited": ("v2", dict(q_lora_rank=24, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                    n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                    first_k_dense_replace=2, routed_scaling_factor=16.0, norm_topk_prob=False,
                                    rope_parameters=YARN)),
}


def make_hf_model(kind, extra, seed=0):
  cls_cfg = transformers.DeepseekV3Config if kind == "v3" else transformers.DeepseekV2Config
  cls_model = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
  config = cls_cfg(**{**BASE, **extra}, attn_implementation="eager")
  torch.manual_seed(seed)
  model = cls_model(config).float().eval()
  with torch.no_grad():  # weights large enough that every component moves the logits
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # selection-only bias: must change the choice
        b.copy_(0.3 * torch.rand_like(b))
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens_for(vocab, b=2, s=19, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, s)), jnp.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  kind, extra = CASES[case]
  ref = make_hf_model(kind, extra)
  ref.save_pretrained(tmp_path)
  model = moe.from_hf(tmp_path)
  tokens = tokens_for(BASE["vocab_size"])
  want = hf_logits(ref, tokens)
  got = np.asarray(model(tokens))
  assert got.shape == (2, 19, BASE["vocab_size"])
  assert np.abs(want).max() > 1.0  # a test that could fail: logits are not all ~0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["v3_yarn_grouped", "v2_lite_greedy"])
def test_round_trip_to_hf_loads_in_transformers(case, tmp_path):
  kind, extra = CASES[case]
  make_hf_model(kind, extra).config.save_pretrained(tmp_path / "cfg")
  cfg = ModelConfig.from_hf_json(tmp_path / "cfg")
  cfg = cfg.replace(initializer_range=0.15, num_nextn_predict_layers=0)
  model = initialised(cfg, seed=3)
  for v in model.router_bias_variables():
    v.set_value(0.3 * jax.random.uniform(jax.random.key(4), v.shape))
  hf.to_hf(model, tmp_path / "out", max_shard_bytes=60_000)  # forces several shards
  assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
  tokens = tokens_for(cfg.vocab_size)
  np.testing.assert_allclose(hf_logits(loaded.eval(), tokens), np.asarray(model(tokens)), atol=1e-4, rtol=0)


def test_round_trip_keeps_mtp_and_bf16(tmp_path):
  cfg = ModelConfig.from_yaml("configs/tiny.yaml")
  model = initialised(cfg, Runtime.resolve(dtype="bfloat16", announce=False))
  hf.to_hf(model, tmp_path)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in index  # MTP as released
  assert f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight" in index
  back = hf.from_hf(tmp_path, dtype=jnp.bfloat16)  # a JAX dtype works as well as its name
  assert back.cfg.num_nextn_predict_layers == 1 and back.rt.dtype == "bfloat16"
  a, b = nnx.state(model, nnx.Variable), nnx.state(back, nnx.Variable)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  tokens = tokens_for(cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(model.forward(tokens).mtp_logits[0]),
                                np.asarray(back.forward(tokens).mtp_logits[0]))


def test_dequantize_fp8_blocks_against_numpy():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(200, 300)).astype(np.float32)  # partial 128-blocks on both axes
  scale = rng.uniform(0.5, 2.0, size=(2, 3)).astype(np.float32)
  q = w.astype(ml_dtypes.float8_e4m3fn)
  want = np.empty_like(w)
  for i in range(200):
    for j in range(300):
      want[i, j] = float(q[i, j]) * scale[i // 128, j // 128]
  np.testing.assert_array_equal(hf.dequantize_fp8(q, scale), want)


def test_fp8_blocks_quantise_and_read_by_slices(tmp_path):
  """quantize_fp8: per 128x128 block scale = amax / 448, every value within E4M3's relative rounding;
  written and read back by slices that cut blocks (what each device reads): the dequantised slice."""
  rng = np.random.default_rng(1)
  w = (rng.normal(size=(300, 200)) * rng.uniform(0.01, 10, size=(300, 1))).astype(np.float32)
  q, scale = hf.quantize_fp8(w)
  assert q.shape == w.shape and scale.shape == (3, 2)
  np.testing.assert_allclose(scale[2, 1], np.abs(w[256:, 128:]).max() / 448, rtol=1e-7)
  full = hf.dequantize_fp8(q, scale)
  assert np.all(np.abs(full - w) <= 2.0**-4 * np.abs(w) + scale.max() * 2.0**-9)
  (tmp_path / "f").mkdir()
  save_file({"model.layers.0.mlp.up_proj.weight": q, "model.layers.0.mlp.up_proj.weight_scale_inv": scale},
            str(tmp_path / "f" / "model.safetensors"))
  folder = hf.SafetensorsFolder(tmp_path / "f")
  for rows, cols in [(slice(0, 300), slice(0, 200)), (slice(100, 290), slice(7, 150)), (slice(256, 300), slice(127, 129))]:
    got = hf.read_float32(folder, "model.layers.0.mlp.up_proj.weight", rows, cols)
    np.testing.assert_array_equal(got, full[rows, cols])


def test_from_hf_reads_fp8_release(tmp_path):
  """Quantise a saved checkpoint's linear weights to float8 + weight_scale_inv, as DeepSeek released V3."""
  kind, extra = CASES["v3_yarn_grouped"]
  ref = make_hf_model(kind, extra)
  ref.save_pretrained(tmp_path / "bf")
  src = hf.SafetensorsFolder(tmp_path / "bf")
  tensors, dequant = {}, {}
  for name in src.names():
    w = np.asarray(src.get(name), np.float32)
    if name.endswith("proj.weight") and w.ndim == 2:
      blocks = np.ceil(np.array(w.shape) / 128).astype(int)
      scale = np.full(blocks, np.abs(w).max() / 448.0, np.float32)
      q = (w / scale[0, 0]).astype(ml_dtypes.float8_e4m3fn)
      tensors[name], tensors[name + "_scale_inv"] = q, scale
      dequant[name] = q.astype(np.float32) * scale[0, 0]
    else:
      tensors[name] = w
  (tmp_path / "fp8").mkdir()
  save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
  (tmp_path / "fp8" / "config.json").write_text((tmp_path / "bf" / "config.json").read_text())
  model = hf.from_hf(tmp_path / "fp8")
  variables = hf._variables(model)
  table = hf.weight_names(model.cfg)
  assert any("experts." in n for n in dequant) and len(dequant) > 20
  for name, w in dequant.items():  # every quantised tensor landed dequantised, experts included
    t = table[name]
    got = np.asarray(variables[t.path][...][t.index] if t.index else variables[t.path][...])
    np.testing.assert_array_equal(got, w.T, err_msg=name)


def test_errors_are_one_line(tmp_path):
  """An extra, a missing and a misshapen tensor: one line naming the tensor and its file, raised before
  anything is read."""
  with pytest.raises(ConfigError, match="no such file"):
    hf.from_hf(tmp_path / "missing")
  kind, extra = CASES["v3_plain_q"]
  make_hf_model(kind, extra).save_pretrained(tmp_path / "m")
  good = json.loads((tmp_path / "m" / "config.json").read_text())
  weights = tmp_path / "m" / "model.safetensors"
  cases = [
      (dict(good, num_hidden_layers=3), None,
       rf"^{weights}: tensor model.layers.3.input_layernorm.weight does not belong to the model of"),
      (dict(good, moe_intermediate_size=good["moe_intermediate_size"] * 2), None,
       rf"^{weights}: model.layers.\d+.mlp.experts.0.gate_proj.weight has shape \(\d+, \d+\), the config implies"),
      (good, "model.norm.weight", r"the checkpoint lacks tensor model.norm.weight that config.json implies$"),
  ]
  from safetensors.numpy import load_file

  tensors = load_file(str(weights))
  for cfg, drop, match in cases:
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in tensors.items() if k != drop}, str(weights))
    with pytest.raises(ConfigError, match=match) as e:
      hf.from_hf(tmp_path / "m")
    assert "\n" not in str(e.value)
