"""The decoder layer, and a stack of them stored stacked and applied with a scan.

  h = x + MLA(norm(x));  y = h + FFN(norm(h)),  FFN dense (SwiGLU) or DeepSeekMoE

One forward for training and decoding: with a latent cache (moe/decode.py) the same layers run on
the new tokens and update the cache. A `LayerStack` holds n layers' parameters on a leading `layers`
axis and scans over them, so compile time does not grow with depth (`impl.scan_layers: false`
unrolls the loop); `impl.remat_policy` picks what the backward pass recomputes per layer.
"""

from __future__ import annotations

import contextlib
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moe import mla
from moe.config import ModelConfig
from moe.experts import MoE
from moe.layers import MLP, RMSNorm
from moe.runtime import Runtime
from parallel import pipeline
from parallel.pipeline import Layout
from parallel.sharding import constrain

ACT = ("batch", "seq", "embed")  # hidden states between layers (logical axes; see parallel/sharding.py)

LAYER_INPUT = "layer_input"  # each layer's input, as the remat policies name it
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer (the scan keeps each layer's input)
    # as full, with the layer inputs in host memory (each layer's sent there in the forward, fetched
    # back in the backward): one [batch, seq, hidden] per layer off the device
    "full_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT], offload_src="device",
        offload_dst="pinned_host"),
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
  """n identical-shape decoder layers, parameters stacked on a leading axis named `axis` ("layers";
  "stage_layers" for the pipelined stack, whose n slots may include padding: parallel/pipeline.py)."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, n: int, moe: bool, *, rngs: nnx.Rngs, axis: str = "layers",
               layout: Layout | None = None):
    """n layers; with `layout` (whose `layers` is n) stored in its slots. Each layer is initialised
    from its own index's key, so the weights do not depend on the layout (nor on the mesh)."""
    self.remat_policy = rt.remat_policy
    self.unroll = not rt.scan_layers
    self.grad_acc = nnx.data(None)  # the gradient so far of the stack's Params (leaves): see `accumulating`
    self.par = rt.par

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return DecoderLayer(cfg, rt, moe, rngs=rngs)

    self.layers = create(rngs)
    for _, v in nnx.iter_graph(self.layers):
      if isinstance(v, nnx.Variable):
        v.set_metadata(axes=(axis,) + tuple(v.get_metadata()["axes"]))
        if layout is not None and layout != Layout(n):
          v.set_value(pipeline.convert(v.get_value(), Layout(n), layout))

  @property
  def depth(self) -> int:
    return self.layers.input_layernorm.scale.shape[0]

  def __call__(self, x_BxSxD, cos_sin, mask, valid_BxS, cache: mla.LatentCache | None = None, slots_BxS=None):
    """(output, MoE statistics stacked over the layers, cache): `cache` is the layers' LatentCache
    stacked [layers, ...], carried through the scan so that each layer updates its slice in place."""
    graphdef, stacked = nnx.split(self.layers)
    return self.apply(graphdef, (stacked,), x_BxSxD, cos_sin, mask, valid_BxS, cache=cache, slots_BxS=slots_BxS)[:3]

  def apply(self, graphdef, states: tuple, x_BxSxD, cos_sin, mask, valid_BxS, active_L=None, cache=None,
            slots_BxS=None):
    """The layers of `states` (the state(s) of `self.layers` as nnx.split gave them with `graphdef`,
    or a slice of them: one pipeline chunk) in order; a layer whose `active_L` entry is False
    (padding) passes x through with zero statistics (it is computed and dropped: a stage cannot branch
    on its own data around collectives that the other stages' devices do not reach). What the layers
    leave as nnx.Intermediate (MLA's `max_logit`, for QK-clip) is stacked [layers, ...] (-inf in
    padding layers) and returned, and stored into `self.layers` outside the pipeline (`active_L` None).
    Returns (output, statistics, cache, what the layers sowed)."""

    if self.grad_acc is not None:
      if cache is not None or active_L is not None or len(states) != 1 or self.remat_policy not in ACCUMULATING:
        raise ValueError("gradients accumulate in the layer scan only in training, unpipelined, with remat"
                         f" {' or '.join(ACCUMULATING)}")
      x, stats, sown = accumulating(graphdef, states[0], self.grad_acc, x_BxSxD, (cos_sin, mask, valid_BxS),
                                    offload=self.remat_policy == "full_offload", par=self.par)
      nnx.update(self.layers, sown)
      return x, stats, None, sown

    def body(carry, xs):  # one layer: a slice of every stacked variable (and of the cache)
      x, cache = carry
      x = checkpoint_name(x, LAYER_INPUT)
      i, layer_state, on = xs
      layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
      layer = nnx.merge(graphdef, *layer_state)
      y, stats, layer_cache = layer(x, cos_sin, mask, valid_BxS, layer_cache, slots_BxS)
      sown = nnx.pop(layer, nnx.Intermediate)  # what the layer sowed (MLA's max_logit), stacked by the scan
      if on is not None:  # (computed and dropped, not skipped: every device must reach the layer's collectives)
        y = jnp.where(on, y, x)
        stats = jax.tree.map(lambda v: jnp.where(on, v, jnp.zeros_like(v)), stats)
        sown = jax.tree.map(lambda v: jnp.where(on, v, -jnp.inf), sown)
      x = y
      if cache is not None:
        cache = jax.tree.map(lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u, i, 0), cache, layer_cache)
      return (x, cache), (stats, sown)

    if self.remat_policy != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
    n = jax.tree.leaves(states)[0].shape[0]
    (x, cache), (stats, sown) = jax.lax.scan(body, (x_BxSxD, cache), (jnp.arange(n), states, active_L),
                                             unroll=self.unroll)
    if active_L is None:  # sown into the stack, [layers, ...] (the pipeline's stages return theirs)
      nnx.update(self.layers, sown)
    return x, stats, cache, sown


ACCUMULATING = ("full", "full_offload")  # the remat policies `accumulating` implements


@contextlib.contextmanager
def _own_source_lines():
  """Operations traced inside take their source lines from Python's stack. JAX traces a custom_vjp's
  backward under the traceback of the call to the custom_vjp function, so every operation of
  `accumulating`'s backward (the recomputed layers, their gradients) would name that one call as its
  source in the compiled program, where `train.aot`'s forecast says what costs the time."""
  from jax._src import source_info_util as info  # (no public API clears it)
  context = getattr(info, "_source_info_context", None)
  if context is None or not hasattr(info, "SourceInfo"):
    yield
    return
  before = context.context
  context.context = info.SourceInfo(None, before.name_stack)
  try:
    yield
  finally:
    context.context = before


def laid_out_as(params, par):
  """tree -> tree laid out as the stacked parameters `params` (a State of Variables) say (`par`'s
  rules), for a tree of their shapes: a gradient accumulator (why: `accumulating`)."""
  axes = [v.get_metadata()["axes"] for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))]
  return lambda tree: jax.tree.unflatten(jax.tree.structure(tree),
                                         [constrain(a, ax, par) for a, ax in zip(jax.tree.leaves(tree), axes)])


def add_layer(acc, i, grads_i):
  """`acc` (stacked [layers, ...]) with layer i's gradient added into its slice in place."""
  return jax.tree.map(lambda a, g: jax.lax.dynamic_update_index_in_dim(a, a[i] + g.astype(a.dtype), i, 0), acc, grads_i)


def accumulating(graphdef, stacked, acc, x_BxSxD, consts, offload: bool = False, par=None):
  """The layers of `stacked` (as LayerStack.apply, remat full), whose parameters' gradient is returned
  already summed into `acc` (their gradient so far in a gradient accumulation, a State like their
  Params): the backward pass runs layer by layer in a scan that carries `acc` and adds each layer's
  weight gradient into its slice in place, as Megatron adds into its main_grad buffer. Autodiff of
  the plain scan would return the micro-batch's gradient as a new buffer of the stack's size, to be
  added to `acc` after: one float32 copy of the stack's parameters more at the backward's peak.
  Each layer's input is kept (`offload`: in host memory, as remat full_offload), and the layer
  recomputed in the backward (remat full). `acc`: the leaves of that State, in its order. The
  accumulator is held in its parameters' layout (`par`'s rules): XLA would otherwise lay the loop's
  carry out as the optimizer after it wants (Muon's per-matrix layout: 126.8 GiB per chip for V3 on
  v5p-512)."""
  params, other = nnx.split_state(stacked, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  if [a.shape for a in acc] != [p.shape for p in leaves]:
    raise ValueError("the gradient accumulator does not match the stack's parameters")
  pinned = laid_out_as(params, par)
  acc = pinned(jax.tree.unflatten(tree, acc))

  def one(p_i, o_i, x):  # (output, statistics, what the layer sowed) of one layer
    # With the layer inputs offloaded, a barrier keeps each layer's sliced weights a value of its own
    # iteration, which XLA does not fuse or move across layers: V3 on 4 x v6e-256 (full_offload) needs
    # 26.02 GiB per chip with it, 29.54 without. With remat full it moved the Muon step's
    # Newton-Schulz collectives so that V3 with Muon on v5p-512 needed 92.63 GiB instead of 81.24
    # (AdamW there: 64.45 with, 64.96 without): measured, not derived (docs/pods.md).
    if offload:
      p_i = jax.lax.optimization_barrier(p_i)
    layer = nnx.merge(graphdef, p_i, o_i)
    y, stats, _ = layer(x, *consts)
    return y, stats, nnx.pop(layer, nnx.Intermediate)

  def forward(p, x):
    def body(x, xs):
      y, stats, sown = one(*xs, x)
      return y, (jax.device_put(x, jax.memory.Space.Host) if offload else x, stats, sown)
    y, (inputs, stats, sown) = jax.lax.scan(body, x, (p, other))
    return (y, stats, sown), inputs

  @jax.custom_vjp
  def run(p, acc, x):
    return forward(p, x)[0]

  def fwd(p, acc, x):
    out, inputs = forward(p, x)
    return out, (p, acc, inputs)

  def bwd(res, cts):
    with _own_source_lines():
      return _bwd(res, cts)

  def _bwd(res, cts):
    p, acc, inputs = res
    dy, dstats, _ = cts
    n = inputs.shape[0]
    floating = [jnp.issubdtype(c.dtype, jnp.inexact) for c in jax.tree.leaves(dstats)]

    def body(carry, xs):
      dx, acc = carry
      i, x_i, dstats_i = xs
      x_i = jax.device_put(x_i, jax.memory.Space.Device) if offload else x_i
      p_i, o_i = (jax.tree.map(lambda a: a[i], t) for t in (p, other))

      def differentiable(p_i, x):  # the layer's output and its statistics' floating-point leaves
        y, stats, _ = one(p_i, o_i, x)
        return y, [v for v, f in zip(jax.tree.leaves(stats), floating) if f]

      _, pullback = jax.vjp(differentiable, p_i, x_i)
      dp_i, dx = pullback((dx, dstats_i))
      return (dx, pinned(add_layer(acc, i, dp_i))), None

    dstats = [v for v, f in zip(jax.tree.leaves(dstats), floating) if f]  # (integer leaves: no cotangent)
    (dx, acc), _ = jax.lax.scan(body, (dy, pinned(acc)), (jnp.arange(n), inputs, dstats), reverse=True)
    return pinned(acc), jax.tree.map(jnp.zeros_like, acc), dx

  run.defvjp(fwd, bwd)
  return run(params, jax.lax.stop_gradient(acc), x_BxSxD)
