"""moe.config: YAML and HF config.json loading, one-line errors naming the key."""

import json
from pathlib import Path

import pytest

from moe.config import ModelConfig, RopeScaling
from parallel.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def error_of(fn, *args, **kwargs) -> str:
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert msg and "\n" not in msg, f"expected a one-line message, got {msg!r}"
  return msg


def write_yaml(tmp_path, body: str) -> Path:
  path = tmp_path / "c.yaml"
  path.write_text(body)
  return path


# ------------------------------------------------------------------ YAML
def test_configs_exist():
  names = {p.stem for p in CONFIGS}
  assert {"tiny", "deepseek-v3-671b", "deepseek-v2-lite"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
  cfg = ModelConfig.load(path)
  assert cfg == ModelConfig.from_yaml(path)
  assert cfg.n_routed_experts % cfg.n_group == 0
  assert cfg.num_moe_layers + cfg.num_dense_layers == cfg.num_hidden_layers


def test_v3_yaml_values():
  """The pre-training config has plain RoPE at 4K; the released YaRN comes with the 32K stage."""
  cfg = ModelConfig.load(ROOT / "configs" / "deepseek-v3-671b.yaml")
  assert cfg.rope_scaling is None and cfg.max_position_embeddings == 4096
  long = ModelConfig.load(ROOT / "configs" / "deepseek-v3-671b-32k.yaml")
  assert long.rope_scaling == RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
  assert long.max_position_embeddings == 163840 and long.replace(rope_scaling=None, max_position_embeddings=4096) == cfg
  assert (cfg.topk_method, cfg.scoring_func, cfg.n_group, cfg.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
  assert cfg.qk_head_dim == 192


@pytest.mark.parametrize("key, fix", [("hiden_size", "hidden_size"), ("num_expert_per_tok", "num_experts_per_tok"),
                                      ("topk_methd", "topk_method")])
def test_unknown_key_did_you_mean(key, fix):
  msg = error_of(ModelConfig.from_dict, {key: 1})
  assert f"'{key}'" in msg and f"did you mean '{fix}'" in msg


def test_unknown_key_in_yaml_names_file(tmp_path):
  path = write_yaml(tmp_path, "model:\n  hidden_size: 32\n  vocab_sise: 64\n")
  msg = error_of(ModelConfig.from_yaml, path)
  assert str(path) in msg and "'vocab_sise'" in msg and "did you mean 'vocab_size'" in msg


def test_unknown_rope_scaling_key():
  msg = error_of(ModelConfig.from_dict, {"rope_scaling": {"factr": 40, "original_max_position_embeddings": 4096}})
  assert "rope_scaling" in msg and "'factr'" in msg and "did you mean 'factor'" in msg


def test_unrelated_unknown_key_has_no_hint():
  msg = error_of(ModelConfig.from_dict, {"zzzzzz": 1})
  assert "'zzzzzz'" in msg and "did you mean" not in msg


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "32"),  # string for int
    ("hidden_size", True),  # bool for int
    ("num_experts_per_tok", 2.0),  # float for int
    ("rope_theta", "1e4"),  # string for float
    ("norm_topk_prob", 1),  # int for bool
    ("topk_method", "topk"),  # bad literal
    ("scoring_func", "relu"),
    ("q_lora_rank", "none"),  # int | None
])
def test_ill_typed_value_names_key(key, value):
  msg = error_of(ModelConfig.from_dict, {key: value})
  assert f"model.{key}" in msg and repr(value) in msg


def test_ill_typed_value_in_yaml(tmp_path):
  path = write_yaml(tmp_path, "model:\n  num_attention_heads: four\n")
  assert "num_attention_heads" in error_of(ModelConfig.from_yaml, path)
  path = write_yaml(tmp_path, "model:\n  tie_word_embeddings: 0\n")
  assert "tie_word_embeddings" in error_of(ModelConfig.from_yaml, path)


def test_ill_typed_rope_scaling_value():
  msg = error_of(ModelConfig.from_dict, {"rope_scaling": {"factor": "forty", "original_max_position_embeddings": 4096}})
  assert "rope_scaling.factor" in msg
  msg = error_of(ModelConfig.from_dict, {"rope_scaling": {"factor": 40, "original_max_position_embeddings": 4096,
                                                         "type": "linear"}})
  assert "rope_scaling.type" in msg


def test_null_q_lora_rank_allowed():
  assert ModelConfig.from_dict({"q_lora_rank": None}).q_lora_rank is None


def test_topk_group_exceeds_n_group():
  msg = error_of(ModelConfig.from_dict, {"n_group": 4, "topk_group": 5})
  assert "topk_group" in msg and "n_group" in msg


def test_experts_not_divisible_by_groups():
  msg = error_of(ModelConfig.from_dict, {"n_routed_experts": 10, "n_group": 4, "topk_group": 1,
                                         "num_experts_per_tok": 2})
  assert "n_routed_experts" in msg and "n_group" in msg and "divisible" in msg


def test_moe_layer_freq_other_than_one():
  msg = error_of(ModelConfig.from_dict, {"moe_layer_freq": 2})
  assert "moe_layer_freq" in msg


def test_too_many_experts_per_token_for_kept_groups():
  msg = error_of(ModelConfig.from_dict, {"n_routed_experts": 8, "n_group": 4, "topk_group": 1,
                                         "num_experts_per_tok": 3})
  assert "num_experts_per_tok" in msg


def test_missing_yaml_and_missing_model_section(tmp_path):
  assert "no such" in error_of(ModelConfig.from_yaml, tmp_path / "nope.yaml")
  path = write_yaml(tmp_path, "seq_len: 5\n")
  assert "model" in error_of(ModelConfig.from_yaml, path)


# ------------------------------------------------------------------ HF config.json
SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
    routed_scaling_factor=2.5, first_k_dense_replace=1, moe_layer_freq=1, rms_norm_eps=1e-6,
    max_position_embeddings=163840, num_nextn_predict_layers=1, tie_word_embeddings=False,
    initializer_range=0.02,
    # keys the loader must accept and ignore (they do not change the function computed)
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
    attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001, ep_size=1, seq_aux=True,
    bos_token_id=0, eos_token_id=1, use_cache=True, torch_dtype="bfloat16", transformers_version="4.46.3",
)
YARN = dict(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=1.0)


def released_style() -> dict:
  return dict(SMALL, rope_theta=10000, rope_scaling=dict(YARN, type="yarn"))


def v5_style() -> dict:
  d = dict(SMALL, rope_parameters=dict(YARN, rope_type="yarn", rope_theta=10000.0))
  d["transformers_version"] = "5.0.0"
  d.pop("torch_dtype")
  d["dtype"] = "bfloat16"
  return d


def write_json(tmp_path, d: dict, name="config.json") -> Path:
  path = tmp_path / name
  path.write_text(json.dumps(d))
  return path


def test_hf_released_and_v5_styles_agree(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  a = ModelConfig.from_hf_json(write_json(tmp_path / "a", released_style()))
  b = ModelConfig.from_hf_json(write_json(tmp_path / "b", v5_style()))
  assert a == b
  assert a.rope_scaling == RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
  assert a.rope_theta == 10000.0
  for key in ("hidden_size", "q_lora_rank", "n_group", "topk_group", "num_nextn_predict_layers",
              "routed_scaling_factor", "initializer_range", "max_position_embeddings"):
    assert getattr(a, key) == SMALL[key], key
  # A folder holding config.json and the generic loader give the same.
  assert ModelConfig.from_hf_json(tmp_path / "a") == a
  assert ModelConfig.load(tmp_path / "b" / "config.json") == a


def test_hf_v5_default_rope_has_no_scaling(tmp_path):
  d = dict(SMALL, rope_parameters=dict(rope_type="default", rope_theta=50000.0))
  cfg = ModelConfig.from_hf_json(write_json(tmp_path, d))
  assert cfg.rope_scaling is None and cfg.rope_theta == 50000.0


def test_hf_to_hf_dict_round_trip(tmp_path):
  a = ModelConfig.from_hf_json(write_json(tmp_path, released_style()))
  b = ModelConfig.from_hf_json(write_json(tmp_path, a.to_hf_dict(), name="again.json"))
  assert a == b


def test_hf_unknown_key(tmp_path):
  path = write_json(tmp_path, dict(released_style(), n_routed_expert=8))
  msg = error_of(ModelConfig.from_hf_json, path)
  assert "'n_routed_expert'" in msg and "did you mean 'n_routed_experts'" in msg


def test_hf_unsupported_values(tmp_path):
  msg = error_of(ModelConfig.from_hf_json, write_json(tmp_path, dict(released_style(), hidden_act="gelu")))
  assert "hidden_act" in msg
  bad_rope = dict(v5_style(), rope_parameters=dict(rope_type="linear", factor=2.0))
  assert "rope_type" in error_of(ModelConfig.from_hf_json, write_json(tmp_path, bad_rope))


def test_hf_ill_typed(tmp_path):
  msg = error_of(ModelConfig.from_hf_json, write_json(tmp_path, dict(released_style(), num_hidden_layers="3")))
  assert "num_hidden_layers" in msg


def test_hf_missing_file_and_bad_json(tmp_path):
  msg = error_of(ModelConfig.from_hf_json, tmp_path / "missing" / "config.json")
  assert "config.json" in msg and "no such file" in msg
  assert "no such file" in error_of(ModelConfig.from_hf_json, tmp_path)  # a folder without config.json
  path = tmp_path / "config.json"
  path.write_text("{not json")
  assert "JSON" in error_of(ModelConfig.from_hf_json, path)
