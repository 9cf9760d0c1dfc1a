"""Incremental decoding with MLA's latent KV cache, and sampling.

The cache holds, per layer and token, only what MLA needs (DeepSeek-V2 report, section 2.1.3):
the normalised latent `c_kv` (kv_lora_rank values) and the *rotated* decoupled key `k_pe`
(qk_rope_head_dim values), in the compute dtype: (512 + 64) x 61 x 2 B = 70,272 B/token for
DeepSeek-V3 in bf16 (moe.params.kv_cache_bytes_per_token_mla). The layers are the training layers
(moe/decoder.py) run with the cache: MLA then attends in the weight-absorbed form (moe/mla.py).

Layout: prompts are RIGHT-padded. Sequence b's token i sits in cache slot i and has RoPE position
i, so every row's positions start at 0 whatever its length; `lengths[b]` counts its cached tokens.
A call appends T tokens to every row at slots lengths[b] .. lengths[b] + T - 1 and advances
lengths by `n_new[b]` (<= T): the prefill writes the padding of short prompts too, but those slots
lie at or beyond the row's new length, so no real query ever attends to them (the causal mask
limits row b's query at slot p to slots <= p) and the next decode step overwrites them.

The cache of a layer stack is stacked like its parameters ([layers, batch, max_len, ...]) and carried
through the stack's scan, so each step writes only its B x T new rows in place (the jitted step
donates the cache). MoE layers run unchanged on the [batch, T, hidden] step (routing is per token,
so the padding rows of a prefill do not change real tokens' outputs).

Not here: MTP speculative decoding, expert-parallel / sharded decoding.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import rope
from moe.mla import LatentCache, Mask


class KVCache(NamedTuple):
  stacks: tuple  # LatentCache [layers, batch, max_len, ...] per layer stack: dense layers first, then MoE
  lengths: jax.Array  # [batch] int32: cached tokens per row

  @property
  def max_len(self) -> int:
    return self.stacks[0].c_kv.shape[2]

  def values_per_token_per_layer(self) -> int:
    return self.stacks[0].c_kv.shape[-1] + self.stacks[0].k_pe.shape[-1]


def init_cache(model, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache (zeros, lengths 0) for `model` (a moe.model.Transformer), in its compute dtype."""
  cfg = model.cfg
  dtype = model.rt.compute_dtype if dtype is None else dtype
  stacks = tuple(LatentCache(jnp.zeros((s.depth, batch, max_len, cfg.kv_lora_rank), dtype),
                             jnp.zeros((s.depth, batch, max_len, cfg.qk_rope_head_dim), dtype))
                 for s in model.stacks())
  return KVCache(stacks, jnp.zeros((batch,), jnp.int32))


def extend(model, cache: KVCache, tokens_BxT, n_new_B=None, last_only: bool = False):
  """Append T tokens per row (right-padded: row b's first n_new[b] are real) and run the model.

  Returns (logits, cache): logits [B, T, V] float32, or with `last_only` [B, V] at each row's last
  real new token (row b's index n_new[b] - 1). The new cache has lengths + n_new.
  """
  b, t = tokens_BxT.shape
  n_new = jnp.full((b,), t, jnp.int32) if n_new_B is None else jnp.asarray(n_new_B, jnp.int32)
  positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # slot == RoPE position
  valid = jnp.arange(t)[None] < n_new[:, None]
  visible = jnp.arange(cache.max_len)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, L]
  cos_sin = rope.rope_tables(positions, model.cfg)

  h = model.embed(tokens_BxT)
  new_stacks = []
  for stack, layer_cache in zip(model.stacks(), cache.stacks):
    h, _, layer_cache = stack(h, cos_sin, Mask(visible), valid, layer_cache, positions)
    new_stacks.append(layer_cache)
  if last_only:
    h = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)
  logits = model.head(model.norm(h))
  if last_only:
    logits = logits[:, 0]
  return logits, KVCache(tuple(new_stacks), cache.lengths + n_new)


# ------------------------------------------------------------------- sampling
def sample(logits_BxV, key, temperature: float = 0.0, top_p: float = 1.0):
  """Next tokens [B] int32: greedy (temperature 0), else softmax(logits / temperature) restricted
  to the smallest top set whose probability reaches top_p (nucleus; the top token always stays)."""
  logits = logits_BxV.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------- generation
class Generator:
  """Jitted prefill and decode steps for one model (its weights are arguments, not constants)."""

  def __init__(self, model, compiler_options=None):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    def _extend(state, cache, tokens, n_new, last_only):
      return extend(nnx.merge(graphdef, state), cache, tokens, n_new, last_only)

    def _step(state, cache, tokens_B, key, temperature, top_p):
      logits, cache = extend(nnx.merge(graphdef, state), cache, tokens_B[:, None], None, last_only=True)
      return sample(logits, key, temperature, top_p), logits, cache

    self.extend = jax.jit(_extend, static_argnums=(4,), donate_argnums=(1,), compiler_options=compiler_options)
    self.step = jax.jit(_step, static_argnums=(4, 5), donate_argnums=(1,), compiler_options=compiler_options)
    self.sample = jax.jit(sample, static_argnums=(2, 3))

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return init_cache(nnx.merge(self.graphdef, self.state), batch, max_len)

  def prefill(self, prompts: Sequence[Sequence[int]], max_len: int, last_only: bool = True):
    """Right-pad `prompts` into one batch and run them: (logits, cache)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
      raise ValueError("every prompt needs at least one token")
    if lengths.max() > max_len:
      raise ValueError(f"a prompt of {lengths.max()} tokens does not fit a cache of {max_len}")
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    cache = self.init_cache(len(prompts), max_len)
    return self.extend(self.state, cache, jnp.asarray(tokens), jnp.asarray(lengths), last_only)

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """New tokens per prompt (up to max_new_tokens; cut after eos_id, which is kept)."""
    if max_new_tokens < 1:
      return [[] for _ in prompts]
    max_len = max(len(p) for p in prompts) + max_new_tokens
    key = jax.random.key(seed)
    logits, cache = self.prefill(prompts, max_len)
    key, sub = jax.random.split(key)
    tokens = self.sample(logits, sub, float(temperature), float(top_p))
    out = [np.asarray(tokens)]
    done = np.zeros(len(prompts), bool) if eos_id is None else out[-1] == eos_id
    for _ in range(max_new_tokens - 1):
      if done.all():
        break
      key, sub = jax.random.split(key)
      tokens, _, cache = self.step(self.state, cache, tokens, sub, float(temperature), float(top_p))
      out.append(np.asarray(tokens))
      if eos_id is not None:
        done |= out[-1] == eos_id
    seqs = np.stack(out, axis=1).tolist()
    if eos_id is not None:
      seqs = [s[:s.index(eos_id) + 1] if eos_id in s else s for s in seqs]
    return seqs
