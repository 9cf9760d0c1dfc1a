"""Gradient accumulation with one micro-batch's forward beside the previous one's backward
(`impl.fb_overlap`): DeepSeek-V3's computation-communication overlap (sec. 3.2.1), without stages.

An MoE layer's all-to-alls wait on its router and feed its experts, so within one micro-batch they
can only hide under the other half's work (mesh.ep_overlap). Two micro-batches' layers depend on
nothing of each other's: the step's M = grad_accum micro-batches run as

  F(0);  F(m) beside B(m-1) for m = 1 .. M-1;  B(M-1)

where F is the MoE stack's forward and B its backward, each layer recomputed from its kept input
(remat full or full_offload), and "beside" is one loop over the L layers whose iteration k runs layer k's forward
of micro-batch m and layer L-1-k's backward of m-1: two independent chains in one loop body, so the
compiler's scheduler runs each one's all-to-alls and weight gathers under the other's compute.
Around the stack: the embedding and dense layers (`first_fn`) run before micro-batch m's loop and
again under `jax.vjp` for its backward after the next one (one more forward of the dense layers a
micro-batch); the norm, head, MTP and loss (`last_fn`) run with their gradient as soon as the stack's
forward ends. The stack's gradient is summed into its accumulator layer by layer (as moe/decoder.py:
accumulating).

The layer inputs live in one [L, ...] buffer the two micro-batches share (on the device; in host
memory with remat full_offload, each slice moved over PCIe as the plain step's are): iteration k
reads the input of m-1's layer L-1-k from the slot where it writes the input of m's layer k, slot k
for even m and L-1-k for odd m. The result equals autodiff of the plain accumulation
(tests/test_overlapped.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe import decoder
from moe import experts as experts_lib
from moe import model as model_lib
from parallel.common.errors import ConfigError
from train.core import loss as loss_lib
from train.core import pipelined


def check(cfg, par) -> None:
  """One clear line where `impl.fb_overlap` cannot run this step (`cfg` with grad_accum resolved)."""
  problems = [(cfg.grad_accum < 2, f"needs grad_accum >= 2 micro-batches (has {cfg.grad_accum}): a larger batch or"
               " a smaller per_device_batch"),
              (cfg.impl.remat_policy not in ("full", "full_offload"), "needs impl.remat_policy=full or full_offload"
               f" (has {cfg.impl.remat_policy}): it keeps each MoE layer's input and recomputes the layer"),
              (par is not None and par.stages > 1, "runs without pipeline stages (mesh.stage=1): a pipeline's"
               " 1F1B ticks already pair micro-batches"),
              (par is not None and par.redundant_experts > 0, "runs without redundant experts (mesh.redundant_experts=0)"),
              (cfg.optimizer.qk_clip is not None, "runs without QK-clip (optimizer.qk_clip_threshold: null)"),
              (cfg.model.num_moe_layers < 1, "needs MoE layers")]
  for bad, why in problems:
    if bad:
      raise ConfigError(f"impl.fb_overlap {why}")


def grad_fn(graphdef, cfg, par):
  """(params, rest, batch, counts) -> what train/core/step.py `accumulated` returns of model_grad:
  ((loss, (parts, load, exchanged, None)), grads) of the whole batch in cfg.grad_accum micro-batches."""
  n_micro, alpha = cfg.grad_accum, cfg.loss.balance_alpha

  def run(params, rest, batch, counts):
    model = nnx.merge(graphdef, params, rest)
    layers = model.moe_layers.layers
    layer_graph = nnx.split(layers, nnx.Param, ...)[0]
    pinned = decoder.laid_out_as(nnx.state(layers, nnx.Param), par)  # the accumulator's layout
    model.moe_layers = None
    other_graph = nnx.split(model, nnx.Param, ...)[0]
    first_fn, last_fn = pipelined.outer_functions(other_graph, cfg.loss.mtp_lambda, alpha, True, n_micro,
                                                  defer_head=True)
    q, p = pipelined.split_stack(params)
    r_other, o = pipelined.split_stack(rest)
    qc = {"rest": r_other, "counts": counts}
    n = cfg.model.num_moe_layers
    d_balance = jnp.float32(alpha / n_micro)  # d loss / d (a layer's balance loss)
    offload = cfg.impl.remat_policy == "full_offload"  # the layer inputs' buffer in host memory
    to_host = lambda x: jax.device_put(x, jax.memory.Space.Host) if offload else x
    to_device = lambda x: jax.device_put(x, jax.memory.Space.Device) if offload else x

    def ctx_of(mb):
      _, _, ctx, _ = model_lib.laid_out(cfg.model, par, mb["tokens"], mb["segment_ids"], mb["positions"])
      return ctx.cos_sin, ctx.mask, ctx.valid

    index = lambda t, i: jax.tree.map(lambda a: a[i], t)  # entry i of every leaf (a layer, a micro-batch)

    def layer(i, x, consts, p_i=None):  # (output, MoEStats) of layer i (with p_i: its parameters)
      y, stats, _ = nnx.merge(layer_graph, index(p, i) if p_i is None else p_i, index(o, i))(x, *consts)
      return y, stats

    def layer_backward(i, x, dy, consts):  # (d params of layer i, dx): the layer recomputed from its input
      def differentiable(p_i, x):
        y, stats = layer(i, x, consts, p_i)
        return y, stats.balance_loss
      _, pullback = jax.vjp(differentiable, index(p, i), x)
      return pullback((dy, d_balance))

    def loop(x, dx, buf, acc, odd, fwd, bwd):
      """The stack's loop: with `fwd` (micro-batch m's layer constants: cos_sin, mask, valid) m's forward
      from x, with `bwd` (m-1's) m-1's backward from dx; `odd`: m is odd (where the slots lie)."""
      def body(carry, k):
        x, dx, buf, acc = carry
        slot = jnp.where(odd, n - 1 - k, k)
        stats = None
        if bwd is not None:
          j = n - 1 - k
          # the slot read out before it is written (else XLA copied the whole buffer to keep the read)
          x_j, buf = jax.lax.optimization_barrier((buf[slot], buf))
          dp, dx = layer_backward(j, to_device(x_j), dx, bwd)
          acc = pinned(decoder.add_layer(acc, j, dp))
        if fwd is not None:
          buf = jax.lax.dynamic_update_index_in_dim(buf, to_host(x), slot, 0)
          x, stats = layer(k, x, fwd)
        return (x, dx, buf, acc), stats
      return jax.lax.scan(body, (x, dx, buf, acc), jnp.arange(n))

    def top(h, mb):  # (loss, aux, d q, d h) of the head, MTP and loss
      def objective(q, h):
        loss, aux, _ = last_fn(q, qc, h, mb)
        return loss, aux
      (loss, aux), (dq, dh) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(q, h)
      return loss, aux, dq, dh

    def first_backward(mb, dx):
      return jax.vjp(lambda q: first_fn(q, qc, mb)[0], q)[1](dx)[0]

    def outcome(loss, aux, stats):  # a micro-batch's loss, parts, load, exchanged and balance sum
      parts = dict(aux["parts"])
      both = [stats] if aux["stats"] is None else [stats, aux["stats"]]
      parts["balance_loss"] = sum(s.balance_loss.sum() for s in both) / n_micro
      load = jnp.concatenate([s.load for s in both])
      return loss + d_balance * stats.balance_loss.sum(), parts, load, experts_lib.exchange_counts(both)

    micro = loss_lib.micro_batches(batch, n_micro)
    acc = pinned(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p))

    # F(0)
    mb0 = index(micro, 0)
    x0 = first_fn(q, qc, mb0)[0]
    buf = to_host(jnp.zeros((n, *x0.shape), x0.dtype))
    (h, _, buf, acc), stats = loop(x0, None, buf, acc, False, ctx_of(mb0), None)
    loss, aux, g_other, dh = top(h, mb0)
    totals = outcome(loss, aux, stats)

    # F(m) beside B(m-1)
    def step(carry, xs):
      buf, acc, g_other, dh, totals = carry
      m, mb, prev = xs
      x = first_fn(q, qc, mb)[0]
      (h, dx, buf, acc), stats = loop(x, dh, buf, acc, m % 2 == 1, ctx_of(mb), ctx_of(prev))
      g_other = jax.tree.map(jnp.add, g_other, first_backward(prev, dx))
      loss, aux, dq, dh = top(h, mb)
      totals = jax.tree.map(jnp.add, totals, outcome(loss, aux, stats))
      return (buf, acc, jax.tree.map(jnp.add, g_other, dq), dh, totals), None

    rest_mbs = jax.tree.map(lambda x: x[1:], micro)
    prev_mbs = jax.tree.map(lambda x: x[:-1], micro)
    carry = (buf, acc, g_other, dh, totals)
    (buf, acc, g_other, dh, totals), _ = jax.lax.scan(step, carry, (jnp.arange(1, n_micro), rest_mbs, prev_mbs))

    # B(M-1)
    last = index(micro, n_micro - 1)
    (_, dx, _, acc), _ = loop(dh, dh, buf, acc, n_micro % 2 == 1, None, ctx_of(last))  # (slots as for an m = M)
    g_other = jax.tree.map(jnp.add, g_other, first_backward(last, dx))

    loss, parts, load, exchanged = totals
    grads = pipelined.join_stack(params, jax.tree.map(lambda g, w: g.astype(w.dtype), g_other, q), acc)
    return (loss, (parts, load, exchanged, None)), grads

  return run
