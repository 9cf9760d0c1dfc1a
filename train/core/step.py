"""One jitted training step with donated state: forward, backward, AdamW, router-bias update.

The state is a plain pytree {params, rest, opt, step}: `params` the nnx.Param leaves (float32 master
weights), `rest` every other model variable (the router biases), `opt` the optax state.
Gradient accumulation runs `grad_accum` micro-batches in a scan; the loss is normalised by the
whole batch's token counts, so it equals the single-batch loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe.config import ModelConfig
from train.core import loss as loss_lib
from train.core.config import TrainConfig


def split_model(model):
  """(graphdef, params, rest) of an nnx model."""
  return nnx.split(model, nnx.Param, ...)


def init_state(model, tx: optax.GradientTransformation):
  graphdef, params, rest = split_model(model)
  return graphdef, {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def load_stats(load_LxE):
  """Per-layer expert load: max/mean, min/mean and coefficient of variation (std/mean)."""
  mean = jnp.maximum(load_LxE.mean(-1), 1e-9)
  return {"expert_load_max": load_LxE.max(-1) / mean, "expert_load_min": load_LxE.min(-1) / mean,
          "expert_load_cv": load_LxE.std(-1) / mean}


def make_train_step(graphdef, model_cfg: ModelConfig, tx, schedule, cfg: TrainConfig, state_shardings=None):
  """The jitted step(state, batch) -> (state, metrics) of the model `graphdef` with architecture
  `model_cfg` (the one it was built with). `state_shardings` (parallel.sharding.state_shardings of
  the state) pins the new state to the layout of the old, and the metrics are then replicated; None
  lets XLA choose (single device)."""
  depth = model_cfg.num_nextn_predict_layers
  n_micro = cfg.grad_accum
  lam, alpha = cfg.loss.mtp_lambda, cfg.loss.balance_alpha
  bias_stop = int(round(cfg.steps * (1 - cfg.loss.bias_update_stop_fraction)))

  def loss_fn(params, rest, batch, counts):
    model = nnx.merge(graphdef, params, rest)
    out = model.forward(batch["tokens"], batch["segment_ids"], batch["positions"])
    loss, parts = loss_lib.objective(out, batch, counts, n_micro, lam, alpha)
    load = out.moe_stats.load if out.moe_stats is not None else jnp.zeros((0, 1))
    dropped = out.moe_stats.dropped.sum() if out.moe_stats is not None else jnp.zeros((), jnp.int32)
    return loss, (parts, load, dropped)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params, rest = state["params"], state["rest"]
    counts = loss_lib.token_counts(batch, depth)
    if n_micro == 1:
      (loss, (parts, load, dropped)), grads = grad_fn(params, rest, batch, counts)
    else:
      micro = jax.tree.map(lambda x: x.reshape(n_micro, -1, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        return jax.tree.map(jnp.add, carry, grad_fn(params, rest, mb, counts)), None

      shapes = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], micro), counts)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      ((loss, (parts, load, dropped)), grads), _ = jax.lax.scan(accumulate, zeros, micro)

    updates, opt = tx.update(grads, state["opt"], params)
    params = optax.apply_updates(params, updates)
    gamma = jnp.where(state["step"] < bias_stop, cfg.loss.bias_update_gamma, 0.0)
    model = nnx.merge(graphdef, params, rest)
    model.update_router_biases(load, gamma)
    _, _, rest = split_model(model)

    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "tokens": counts["lm"], **(load_stats(load) if load.shape[0] else {})}
    if load.shape[0]:  # (token, expert) assignments dropped by expert-parallel capacity (0: dropless)
      metrics["dropped_tokens"] = dropped
    return {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}, metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, replicated))


def make_eval_step(graphdef):
  """Summed next-token NLL and target count of one batch (main head only)."""

  def step(state, batch):
    model = nnx.merge(graphdef, state["params"], state["rest"])
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return (loss_lib.token_nll(logits, batch["targets"]) * mask).sum(), mask.sum()

  return jax.jit(step)
