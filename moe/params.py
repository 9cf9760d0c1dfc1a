"""Analytic parameter, FLOP and KV-cache counts for a ModelConfig (pure Python, no arrays).

Structure counted (it matches the model and the released checkpoints; H = hidden_size):
- Embedding [vocab, H]; final norm [H]; lm_head [H, vocab] (absent if tie_word_embeddings).
- Every layer: input_layernorm and post_attention_layernorm [H], and MLA attention:
  q_a_proj [H, q_lora] + q_a_layernorm [q_lora] + q_b_proj [q_lora, heads*(nope+rope)]
  (or q_proj [H, heads*(nope+rope)] when q_lora_rank is None), kv_a_proj_with_mqa
  [H, kv_lora+rope], kv_a_layernorm [kv_lora], kv_b_proj [kv_lora, heads*(nope+v)],
  o_proj [heads*v, H].
- The first `first_k_dense_replace` layers: dense SwiGLU (gate, up [H, I]; down [I, H]).
- The other layers, MoE: router gate [H, E], e_score_correction_bias [E] (only for
  topk_method == 'noaux_tc'), E routed SwiGLU experts of width moe_intermediate_size, and the
  shared experts as one SwiGLU of width moe_intermediate_size * n_shared_experts.
- Each MTP module (num_nextn_predict_layers of them): enorm, hnorm [H], eh_proj [2H, H], one MoE
  transformer block, shared_head.norm [H]; it shares the main embedding and lm_head.

Counts:
- total_params: the main model, without MTP.
- active_params: parameters used per token, as the papers count them: the input-embedding
  lookup is excluded, the lm_head is included (the embedding matrix, if tied), and each MoE layer
  contributes only its router, shared experts and num_experts_per_tok routed experts. Norm
  weights and the router bias are included. MTP is excluded.
- mtp_params: the MTP modules' unique parameters (shared embedding and head not counted).
- total_params_as_released: total_params + each MTP module with its own copy of the embedding
  and lm_head, as the HF release stores them (DeepSeek-V3: ~685B).
- kv_cache_bytes_per_token_mla = (kv_lora_rank + qk_rope_head_dim) * num_hidden_layers * 2
  (bf16; the decode cache holds the normed latent and the rotated k_pe).
- kv_cache_bytes_per_token_mha = num_heads * (qk_head_dim + v_head_dim) * num_hidden_layers * 2
  (the full per-head keys and values a standard MHA cache would hold).

FLOP formula (training = forward + backward, backward = 2x forward, 2 FLOPs per MAC):

  flops_per_token = 6 * N_matmul
                  + (num_hidden_layers + num_nextn_predict_layers)
                    * 6 * num_heads * (qk_head_dim + v_head_dim) * seq_len / 2

where N_matmul is the active matmul parameter count: the active main-model projections plus the
lm_head, and for each MTP module its eh_proj, attention, router gate, shared and
num_experts_per_tok routed experts plus one more lm_head application. Norm weights and the
router bias are not matmul parameters and are left out of N_matmul (the router gate
[H, E] is a matmul and is in). The second term is the attention core (QK^T and AV) of every
transformer block, MTP blocks included: causal, so each query sees seq_len/2 keys on average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe.config import ModelConfig, load_config
from parallel.common.errors import ConfigError

DEFAULT_SEQ_LEN = 4096
BYTES_PER_VALUE = 2  # bf16 KV cache


# ------------------------------------------------------------------ components
def swiglu(cfg: ModelConfig, width: int) -> int:
  """SwiGLU FFN of `width`: gate, up [H, width] + down [width, H] = 3 * H * width."""
  return 3 * cfg.hidden_size * width


def attention_matmul(cfg: ModelConfig) -> int:
  """MLA projections: q (low-rank or plain) + kv_a_proj_with_mqa + kv_b_proj + o_proj."""
  h, n = cfg.hidden_size, cfg.num_attention_heads
  q_out = n * cfg.qk_head_dim
  if cfg.q_lora_rank:
    q = h * cfg.q_lora_rank + cfg.q_lora_rank * q_out
  else:
    q = h * q_out
  kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  kv_b = cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  o = n * cfg.v_head_dim * h
  return q + kv_a + kv_b + o


def attention_norms(cfg: ModelConfig) -> int:
  """MLA's inner RMSNorms: q_a_layernorm [q_lora] (only with q_lora_rank) + kv_a_layernorm."""
  return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank


def block_norms(cfg: ModelConfig) -> int:
  """input_layernorm + post_attention_layernorm = 2 * H."""
  return 2 * cfg.hidden_size


def router_matmul(cfg: ModelConfig) -> int:
  """Router gate [H, n_routed_experts]."""
  return cfg.hidden_size * cfg.n_routed_experts


def router_bias(cfg: ModelConfig) -> int:
  """e_score_correction_bias [E], present only with topk_method == 'noaux_tc' (V3)."""
  return cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0


def shared_experts(cfg: ModelConfig) -> int:
  """The shared experts, one SwiGLU of width moe_intermediate_size * n_shared_experts."""
  return swiglu(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)


def moe_matmul(cfg: ModelConfig, routed: int) -> int:
  """An MoE FFN's matmul params with `routed` routed experts: gate + shared + routed experts."""
  return router_matmul(cfg) + shared_experts(cfg) + routed * swiglu(cfg, cfg.moe_intermediate_size)


def dense_layer(cfg: ModelConfig) -> int:
  """A dense layer: attention + norms + SwiGLU of width intermediate_size."""
  return attention_matmul(cfg) + attention_norms(cfg) + block_norms(cfg) + swiglu(cfg, cfg.intermediate_size)


def moe_layer(cfg: ModelConfig, routed: int) -> int:
  """An MoE layer with `routed` routed experts counted: attention + norms + MoE FFN + bias."""
  return (attention_matmul(cfg) + attention_norms(cfg) + block_norms(cfg)
          + moe_matmul(cfg, routed) + router_bias(cfg))


def embedding(cfg: ModelConfig) -> int:
  """Input embedding [vocab, H]; the lm_head [H, vocab] has the same size."""
  return cfg.vocab_size * cfg.hidden_size


def untied_head(cfg: ModelConfig) -> int:
  """lm_head params stored apart from the embedding: vocab * H, or 0 if tied."""
  return 0 if cfg.tie_word_embeddings else embedding(cfg)


# ------------------------------------------------------------------ totals
def total_params(cfg: ModelConfig) -> int:
  """Main model: embedding + dense layers + MoE layers (all experts) + final norm + lm_head."""
  return (embedding(cfg) + cfg.num_dense_layers * dense_layer(cfg)
          + cfg.num_moe_layers * moe_layer(cfg, cfg.n_routed_experts)
          + cfg.hidden_size + untied_head(cfg))


def active_params(cfg: ModelConfig) -> int:
  """Per-token params: layers with num_experts_per_tok routed experts + final norm + lm_head."""
  return (cfg.num_dense_layers * dense_layer(cfg)
          + cfg.num_moe_layers * moe_layer(cfg, cfg.num_experts_per_tok)
          + cfg.hidden_size + embedding(cfg))


def mtp_module(cfg: ModelConfig) -> int:
  """One MTP module's unique params: enorm + hnorm + eh_proj [2H, H] + MoE block + head norm."""
  h = cfg.hidden_size
  return 2 * h + 2 * h * h + moe_layer(cfg, cfg.n_routed_experts) + h


def mtp_params(cfg: ModelConfig) -> int:
  """num_nextn_predict_layers * mtp_module."""
  return cfg.num_nextn_predict_layers * mtp_module(cfg)


def total_params_as_released(cfg: ModelConfig) -> int:
  """total + each MTP module with its own embedding and lm_head copy (as the release stores)."""
  per_module = mtp_module(cfg) + embedding(cfg) + untied_head(cfg)
  return total_params(cfg) + cfg.num_nextn_predict_layers * per_module


# ------------------------------------------------------------------ FLOPs
def active_matmul_params(cfg: ModelConfig) -> int:
  """N_matmul of the module docstring: active projections of the main model and the MTP
  modules, plus one lm_head (vocab * H) per prediction depth (1 + num_nextn_predict_layers)."""
  active_moe = moe_matmul(cfg, cfg.num_experts_per_tok)
  main = (cfg.num_hidden_layers * attention_matmul(cfg)
          + cfg.num_dense_layers * swiglu(cfg, cfg.intermediate_size)
          + cfg.num_moe_layers * active_moe)
  mtp = 2 * cfg.hidden_size**2 + attention_matmul(cfg) + active_moe
  depths = 1 + cfg.num_nextn_predict_layers
  return main + cfg.num_nextn_predict_layers * mtp + depths * embedding(cfg)


def attention_core_flops(cfg: ModelConfig, seq_len: int) -> int:
  """Training FLOPs per token of QK^T and AV in one block, causal:
  6 * heads * (qk_head_dim + v_head_dim) * seq_len / 2 (= 3 * ... * seq_len, an integer)."""
  return 3 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """6 * N_matmul + (num_hidden_layers + num_nextn_predict_layers) * attention_core_flops."""
  blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  return 6 * active_matmul_params(cfg) + blocks * attention_core_flops(cfg, seq_len)


# ------------------------------------------------------------------ KV cache
def kv_cache_bytes_per_token_mla(cfg: ModelConfig) -> int:
  """(kv_lora_rank + qk_rope_head_dim) * num_hidden_layers * 2 bytes."""
  return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * BYTES_PER_VALUE


def kv_cache_bytes_per_token_mha(cfg: ModelConfig) -> int:
  """num_heads * (qk_head_dim + v_head_dim) * num_hidden_layers * 2 bytes."""
  per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  return per_layer * cfg.num_hidden_layers * BYTES_PER_VALUE


def count(cfg: ModelConfig, seq_len: int) -> dict:
  """All the counts of the module docstring, as one dict of ints."""
  if seq_len < 1:
    raise ConfigError(f"seq_len={seq_len} must be >= 1")
  return {
      "total_params": total_params(cfg),
      "active_params": active_params(cfg),
      "mtp_params": mtp_params(cfg),
      "total_params_as_released": total_params_as_released(cfg),
      "flops_per_token": flops_per_token(cfg, seq_len),
      "kv_cache_bytes_per_token_mla": kv_cache_bytes_per_token_mla(cfg),
      "kv_cache_bytes_per_token_mha": kv_cache_bytes_per_token_mha(cfg),
  }


# ------------------------------------------------------------------ CLI
def config_seq_len(path: str | Path) -> int:
  """The YAML's top-level `seq_len`, else DEFAULT_SEQ_LEN (also for an HF config.json)."""
  if Path(path).suffix not in (".yaml", ".yml"):
    return DEFAULT_SEQ_LEN
  seq_len = load_config(path).get("seq_len", DEFAULT_SEQ_LEN)
  if not isinstance(seq_len, int) or isinstance(seq_len, bool):
    raise ConfigError(f"{path}: seq_len: expected an integer, got {seq_len!r}")
  return seq_len


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moe.params",
      description="Print parameter, FLOP and KV-cache counts of a model config as one JSON object.")
  parser.add_argument("config", help="project YAML (with a `model:` section) or HF config.json")
  parser.add_argument("--seq-len", type=int, default=None,
                      help=f"for the attention FLOPs (default: the YAML's seq_len, else {DEFAULT_SEQ_LEN})")
  args = parser.parse_args(argv)
  try:
    cfg = ModelConfig.load(args.config)
    seq_len = args.seq_len if args.seq_len is not None else config_seq_len(args.config)
    result = count(cfg, seq_len)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
