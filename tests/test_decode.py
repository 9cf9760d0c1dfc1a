"""moe.decode: the latent-cache (absorbed MLA) incremental decoder against the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import decode, params
from moe.config import ModelConfig, RopeScaling
from moe.model import Transformer
from moe.runtime import Runtime
from tests.random_weights import random_state

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
              num_nextn_predict_layers=0, max_position_embeddings=64, initializer_range=0.02)
CONFIGS = {
    # V2-Lite style: plain q_proj, softmax greedy routing, YaRN with mscale 0.707
    "v2": ModelConfig(**COMMON, q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1,
                      topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                      rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                                               mscale_all_dim=0.707)),
    # V3 style: q LoRA, sigmoid noaux_tc group-limited routing with a correction bias, YaRN
    "v3": ModelConfig(**COMMON, q_lora_rank=16, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                      topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                      rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                                               mscale_all_dim=1.0)),
}
S = 12  # full sequence length per row
PROMPT_LENS = (9, 5, 1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
  cfg = CONFIGS[request.param]
  model = nnx.merge(*random_state(cfg))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(PROMPT_LENS), S)).astype(np.int32)
  graphdef, state = nnx.split(model)
  full = np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens))
  return cfg, decode.Generator(model), tokens, full


def test_cached_decoding_matches_full_forward(setup):
  """Prefill (right-padded, three lengths) then one token at a time: every position's logits."""
  cfg, gen, tokens, full = setup
  prompts = [tokens[b, :n].tolist() for b, n in enumerate(PROMPT_LENS)]
  logits, cache = gen.prefill(prompts, max_len=S, last_only=False)
  logits = np.asarray(logits)
  diffs = [np.abs(logits[b, :n] - full[b, :n]).max() for b, n in enumerate(PROMPT_LENS)]
  np.testing.assert_array_equal(np.asarray(cache.lengths), PROMPT_LENS)
  key = jax.random.key(0)
  for k in range(S - min(PROMPT_LENS)):
    pos = [n + k for n in PROMPT_LENS]
    step_tokens = np.array([tokens[b, p] if p < S else 0 for b, p in enumerate(pos)], np.int32)
    _, step_logits, cache = gen.step(gen.state, cache, jnp.asarray(step_tokens), key, 0.0, 1.0)
    step_logits = np.asarray(step_logits)
    diffs += [np.abs(step_logits[b] - full[b, p]).max() for b, p in enumerate(pos) if p < S]
  assert len(diffs) == len(PROMPT_LENS) + sum(S - n for n in PROMPT_LENS)
  print(f"{cfg.topk_method}: max |cached - full| = {max(diffs):.2e} (logits up to {np.abs(full).max():.2f})")
  assert max(diffs) < 5e-6  # README: measured 2.3e-6 (float32, logits up to ~3)


def test_cache_holds_only_latent_and_rope_key(setup):
  cfg, gen, tokens, _ = setup
  _, cache = gen.prefill([tokens[0, :3].tolist(), tokens[1, :2].tolist()], max_len=7)
  shapes = [(lc.c_kv.shape, lc.k_pe.shape) for lc in cache.stacks]
  dense, moe = cfg.first_k_dense_replace, cfg.num_moe_layers
  assert shapes == [((dense, 2, 7, cfg.kv_lora_rank), (dense, 2, 7, cfg.qk_rope_head_dim)),
                    ((moe, 2, 7, cfg.kv_lora_rank), (moe, 2, 7, cfg.qk_rope_head_dim))]
  values = sum(x.size for lc in cache.stacks for x in lc)
  assert values == 2 * 7 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  assert cache.values_per_token_per_layer() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
  assert len(jax.tree.leaves(cache)) == 2 * len(cache.stacks) + 1  # latent, rope key per stack + lengths
  np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 2])


def test_deepseek_v3_cache_is_70272_bytes_per_token():
  cfg = ModelConfig.load("configs/deepseek-v3-671b.yaml")
  rt = Runtime.resolve(dtype="bfloat16", announce=False)
  model = nnx.eval_shape(lambda: Transformer(cfg, rt, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: decode.init_cache(model, 2, 8))
  nbytes = sum(x.size * x.dtype.itemsize for lc in cache.stacks for x in lc)
  assert nbytes / (2 * 8) == 70_272 == params.kv_cache_bytes_per_token_mla(cfg)


def test_greedy_is_deterministic_and_top_p_tiny_is_greedy(setup):
  cfg, gen, tokens, _ = setup
  prompts = [tokens[0, :4].tolist(), tokens[1, :2].tolist()]
  greedy = gen.generate(prompts, 6)
  assert greedy == gen.generate(prompts, 6) and [len(g) for g in greedy] == [6, 6]
  assert gen.generate(prompts, 6, temperature=1.0, top_p=1e-6, seed=3) == greedy
  sampled = gen.generate(prompts, 6, temperature=1.0, seed=5)
  assert sampled == gen.generate(prompts, 6, temperature=1.0, seed=5)  # seeded
  assert all(0 <= t < cfg.vocab_size for row in sampled for t in row)
  cut = gen.generate(prompts, 6, eos_id=greedy[0][2])  # a row stops after EOS (kept)
  assert cut[0] == greedy[0][:greedy[0].index(greedy[0][2]) + 1]


def test_sample_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = np.asarray(jax.vmap(lambda k: decode.sample(logits, k, 1.0, 0.7))(jax.random.split(jax.random.key(0), 400)))
  assert set(np.unique(draws)) == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is the top two
  assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.08
  assert int(decode.sample(logits, jax.random.key(0))[0]) == 0
