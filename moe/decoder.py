"""The decoder layer, and a stack of them stored stacked and applied with a scan.

  h = x + MLA(norm(x));  y = h + FFN(norm(h)),  FFN dense (SwiGLU) or DeepSeekMoE

One forward for training and decoding: with a latent cache (moe/decode.py) the same layers run on
the new tokens and update the cache. A `LayerStack` holds n layers' parameters on a leading `layers`
axis and scans over them, so compile time does not grow with depth (`impl.scan_layers: false`
unrolls the loop); `impl.remat_policy` picks what the backward pass recomputes per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe import mla
from moe.config import ModelConfig
from moe.experts import MoE
from moe.layers import MLP, RMSNorm
from moe.runtime import Runtime
from parallel.sharding import constrain

ACT = ("batch", "seq", "embed")  # hidden states between layers (logical axes; see parallel/sharding.py)

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
  """Pre-norm block: h = x + MLA(norm(x)); y = h + FFN(norm(h)), FFN dense or DeepSeekMoE."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, moe: bool, *, rngs: nnx.Rngs):
    self.is_moe = moe
    self.par = rt.par
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg, rt, rngs=rngs)
    self.self_attn = mla.MLA(cfg, rt, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg, rt, rngs=rngs)
    self.mlp = MoE(cfg, rt, rngs=rngs) if moe else MLP(cfg, rt, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x_BxSxD, cos_sin, mask, valid_BxS, cache: mla.LatentCache | None = None, slots_BxS=None):
    """(output, MoE statistics or None, cache): see mla.MLA for `mask`, `cache` and `slots`."""
    a, cache = self.self_attn(self.input_layernorm(x_BxSxD), cos_sin, mask, cache, slots_BxS)
    h = constrain(x_BxSxD + a, ACT, self.par)
    if self.is_moe:
      y, stats = self.mlp(self.post_attention_layernorm(h), valid_BxS)
    else:
      y, stats = self.mlp(self.post_attention_layernorm(h)), None
    return constrain(h + y, ACT, self.par), stats, cache


class LayerStack(nnx.Module):
  """n identical-shape decoder layers, parameters stacked on a leading `layers` axis."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, n: int, moe: bool, *, rngs: nnx.Rngs):
    self.remat_policy = rt.remat_policy
    self.unroll = not rt.scan_layers

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return DecoderLayer(cfg, rt, moe, rngs=rngs)

    self.layers = create(rngs)
    for _, v in nnx.iter_graph(self.layers):
      if isinstance(v, nnx.Variable):
        v.set_metadata(axes=("layers",) + tuple(v.get_metadata()["axes"]))

  @property
  def depth(self) -> int:
    return self.layers.input_layernorm.scale.shape[0]

  def __call__(self, x_BxSxD, cos_sin, mask, valid_BxS, cache: mla.LatentCache | None = None, slots_BxS=None):
    """(output, MoE statistics stacked over the layers, cache): `cache` is the layers' LatentCache
    stacked [layers, ...], carried through the scan so that each layer updates its slice in place."""
    graphdef, stacked = nnx.split(self.layers)

    def body(carry, xs):  # one layer: a slice of every stacked variable (and of the cache)
      x, cache = carry
      i, layer_state = xs
      layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
      x, stats, layer_cache = nnx.merge(graphdef, layer_state)(x, cos_sin, mask, valid_BxS, layer_cache, slots_BxS)
      if cache is not None:
        cache = jax.tree.map(lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u, i, 0), cache, layer_cache)
      return (x, cache), stats

    if self.remat_policy != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
    (x, cache), stats = jax.lax.scan(body, (x_BxSxD, cache), (jnp.arange(self.depth), stacked), unroll=self.unroll)
    return x, stats, cache
