"""Model configuration: a typed, frozen dataclass with the field names of DeepSeek's config.json.

Loads from this project's YAML (`model:` section) or from an HF `config.json` (as released, with
`rope_scaling`, or as `transformers` >= 5 writes it, with `rope_parameters`). Unknown or ill-typed
keys raise `ConfigError` with one line naming the key. Only the architecture lives here (what
config.json holds); how the model runs (dtypes, kernels, FP8, remat) is `moe.runtime`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import yaml

from parallel.common.errors import ConfigError
from parallel.common.typed_config import check_fields, reject_unknown


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """YaRN context extension (DeepSeek-V2/V3 `rope_scaling`)."""

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  type: Literal["yarn"] = "yarn"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V2/V3 architecture. Field names and meanings follow the released config.json."""

  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers)
  moe_intermediate_size: int = 2048  # width of each routed / shared expert
  num_hidden_layers: int = 61
  num_attention_heads: int = 128
  # MLA
  q_lora_rank: int | None = 1536  # None: plain q_proj (V2-Lite)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # DeepSeekMoE
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  n_group: int = 8
  topk_group: int = 4
  topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
  scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  first_k_dense_replace: int = 3
  moe_layer_freq: int = 1
  # Norms, positions, heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  num_nextn_predict_layers: int = 1
  tie_word_embeddings: bool = False
  initializer_range: float = 0.006  # V3 paper's training init (the released config says 0.02)

  def __post_init__(self):
    check_fields(self, "model.")
    if self.rope_scaling is not None:
      check_fields(self.rope_scaling, "model.rope_scaling.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
      if getattr(self, name) < 1:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
    for name in ("n_shared_experts", "num_nextn_predict_layers"):
      if getattr(self, name) < 0:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0")
    if self.q_lora_rank is not None and self.q_lora_rank < 1:
      raise ConfigError(f"model.q_lora_rank={self.q_lora_rank} must be >= 1 or null (a plain q_proj)")
    if self.moe_layer_freq != 1:
      raise ConfigError(
          f"model.moe_layer_freq={self.moe_layer_freq} is not supported: every released DeepSeek"
          " V2/V3 model uses 1 (all layers after first_k_dense_replace are MoE)"
      )
    if self.n_routed_experts % self.n_group:
      raise ConfigError(
          f"model.n_routed_experts={self.n_routed_experts} must be divisible by"
          f" model.n_group={self.n_group}"
      )
    if not 1 <= self.topk_group <= self.n_group:
      raise ConfigError(f"model.topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
    kept = self.topk_group * self.n_routed_experts // self.n_group
    if self.group_limited and self.num_experts_per_tok > kept:
      raise ConfigError(
          f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds the {kept} experts in the"
          f" topk_group={self.topk_group} kept groups"
      )
    if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
      raise ConfigError("model.topk_method=noaux_tc scores groups by their top-2: need >= 2 experts per group")
    if self.qk_rope_head_dim % 2:
      raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
      raise ConfigError(
          f"model.first_k_dense_replace={self.first_k_dense_replace} must be in"
          f" [0, num_hidden_layers={self.num_hidden_layers}]"
      )

  # Derived sizes, named as in the papers / reference code.
  @property
  def group_limited(self) -> bool:
    """Whether the router keeps a token's experts within topk_group of the n_group groups (V2's
    group_limited_greedy, V3's noaux_tc); `greedy` ignores the groups."""
    return self.n_group > 1 and self.topk_method != "greedy"

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  # ---------------------------------------------------------------- loading
  @classmethod
  def from_dict(cls, d: dict, where: str = "model", elsewhere=None) -> ModelConfig:
    """`elsewhere`: keys that live in another section, and where (for the unknown-key error)."""
    d = dict(d)
    reject_unknown(d, cls, where, elsewhere)
    if isinstance(d.get("rope_scaling"), dict):
      rs = dict(d["rope_scaling"])
      reject_unknown(rs, RopeScaling, f"{where}.rope_scaling")
      try:
        d["rope_scaling"] = RopeScaling(**rs)
      except TypeError as e:  # missing required field
        raise ConfigError(f"{where}.rope_scaling: {e}") from None
    return cls(**d)

  @classmethod
  def from_yaml(cls, path: str | Path) -> ModelConfig:
    return cls.from_dict(model_section(load_config(path), path), where=f"{path}: model")

  @classmethod
  def from_hf_json(cls, path: str | Path) -> ModelConfig:
    path = Path(path)
    if path.is_dir():
      path = path / "config.json"
    if not path.is_file():
      raise ConfigError(f"{path}: no such file (expected an HF config.json or a folder holding one)")
    try:
      raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_dict(hf_to_fields(raw, str(path)), where=str(path))

  @classmethod
  def load(cls, path: str | Path) -> ModelConfig:
    """A project YAML or an HF config.json (or a folder holding one)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
      return cls.from_yaml(p)
    return cls.from_hf_json(p)

  def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
    """config.json as the released checkpoints write it (rope_scaling, not rope_parameters), for
    tensors stored in `torch_dtype`."""
    d = self.to_dict()
    if self.rope_scaling is not None:
      d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
    v3 = self.scoring_func == "sigmoid"
    d.update(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        num_key_value_heads=self.num_attention_heads,
        hidden_act="silu",
        attention_bias=False,
        torch_dtype=torch_dtype,
    )
    if not v3:  # transformers' DeepseekV2Config has no num_nextn_predict_layers
      d.pop("num_nextn_predict_layers")
    return d


# HF config.json keys that do not change the function this project computes.
_HF_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "quantization_config",
    "aux_loss_alpha", "seq_aux", "output_router_logits", "router_aux_loss_coef", "ep_size",
    "num_key_value_heads", "pretraining_tp", "attention_dropout", "head_dim",
    "qk_head_dim", "_name_or_path", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "tokenizer_class", "num_experts", "num_local_experts", "num_mtp_layers",
    "use_mla", "mlp_bias", "kv_lora_rank_", "layer_types",
}
# HF keys that must hold one value for this implementation to be the same function.
_HF_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_interleave": True}


def hf_to_fields(raw: dict, where: str) -> dict:
  """Map an HF DeepSeek config.json dict onto ModelConfig field names."""
  raw = dict(raw)
  if raw.get("model_type", "deepseek_v3") not in ("deepseek_v2", "deepseek_v3"):
    raise ConfigError(f"{where}: model_type={raw['model_type']!r} is not a DeepSeek-V2/V3 model (model_type"
                      " deepseek_v2 or deepseek_v3), the only architecture this project loads")
  for key, want in _HF_REQUIRED.items():
    if key in raw and raw[key] != want:
      raise ConfigError(f"{where}: {key}={raw[key]!r} is not supported (DeepSeek V2/V3 use {want!r})")
    raw.pop(key, None)
  if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
    raw["num_nextn_predict_layers"] = raw["num_mtp_layers"]
  # transformers >= 5 writes rope_theta and the YaRN settings into `rope_parameters`.
  rope = raw.pop("rope_parameters", None)
  if rope is not None:
    rope = dict(rope)
    raw.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "yarn":
      raw["rope_scaling"] = rope
    elif kind != "default":
      raise ConfigError(f"{where}: rope_parameters.rope_type={kind!r} is not supported (default or yarn)")
  scaling = raw.get("rope_scaling")
  if scaling is not None:
    scaling = {k: v for k, v in dict(scaling).items() if v is not None}
    kind = scaling.pop("type", scaling.pop("rope_type", "yarn"))
    if kind != "yarn":
      raise ConfigError(f"{where}: rope_scaling.type={kind!r} is not supported (only yarn)")
    scaling.pop("truncate", None)  # DeepSeek truncates the correction range (transformers' default)
    scaling.pop("attention_factor", None)
    raw["rope_scaling"] = scaling
  if raw.get("n_group") is None:  # V2-Lite: no groups
    raw["n_group"] = 1
  if raw.get("topk_group") is None:
    raw["topk_group"] = 1
  # transformers' configs omit these; its V3 always routes noaux_tc/sigmoid, its V2 softmax.
  v3 = raw.get("model_type", "deepseek_v3") == "deepseek_v3"
  if raw.get("topk_method") is None:
    raw["topk_method"] = "noaux_tc" if v3 else "greedy"
  if raw.get("scoring_func") is None:
    raw["scoring_func"] = "sigmoid" if raw["topk_method"] == "noaux_tc" else "softmax"
  if raw.get("first_k_dense_replace") is None:
    raw["first_k_dense_replace"] = 0
  if raw.get("model_type") == "deepseek_v2":
    raw.setdefault("num_nextn_predict_layers", 0)
  out = {k: v for k, v in raw.items() if k not in _HF_IGNORED}
  return out


def load_yaml(path: str | Path, what: str = "config file") -> dict:
  """The mapping in the YAML file `path`; ConfigError (one line) for a file that is missing, not
  UTF-8, not YAML or not a mapping."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"{path}: no such {what}")
  try:
    data = yaml.safe_load(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the"
                      f" {what} as UTF-8") from None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    raise ConfigError(f"{path}: not valid YAML{where} ({str(e).splitlines()[0]})") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a mapping at the top level")
  return data


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
  """A config file's mapping (load_yaml), with `base: OTHER.yaml` (relative to the file) resolved: the
  file's keys over its base's, mappings merged key by key (a long-context stage is its pre-training
  config plus what changes)."""
  path = Path(path)
  data = load_yaml(path)
  base = data.pop("base", None)
  if base is None:
    return data
  if not isinstance(base, str):
    raise ConfigError(f"{path}: base must be the path of another config file, got {base!r}")
  base_path = (path.parent / base).resolve()
  if base_path in _seen or base_path == path.resolve():
    raise ConfigError(f"{path}: base {base} leads back to itself")
  return _merged(load_config(base_path, (*_seen, path.resolve())), data)


def _merged(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def model_section(data: dict, path) -> dict:
  if not isinstance(data.get("model"), dict):
    raise ConfigError(f"{path}: needs a `model:` mapping with the architecture (see configs/tiny.yaml)")
  return data["model"]
