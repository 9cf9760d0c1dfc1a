"""One jitted training step with donated state: forward, backward, AdamW, router-bias update.

The state is a plain pytree {params, rest, opt, step, guard}: `params` the nnx.Param leaves (float32
master weights), `rest` every other model variable (the router biases), `opt` the optax state,
`guard` the running mean of the loss for the spike guard.

The update is skipped - parameters, router biases and optimizer state come out bitwise as they went
in, the step counter still advances - when the loss or the global gradient norm is not finite, or,
with `spike_skip_factor` k, when the loss exceeds k x its running mean (an exponential mean of the
accepted losses, decay 0.99, from the 20th accepted step). The metrics say so (`nonfinite`,
`skipped`); the training loop stops or carries on (`on_nonfinite`). A non-finite value therefore
never reaches the weights, and no checkpoint can hold one.
Gradient accumulation runs `grad_accum` micro-batches in a scan; the loss is normalised by the
whole batch's token counts, so it equals the single-batch loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe import experts as experts_lib
from moe.config import ModelConfig
from train.core import loss as loss_lib
from train.core import muon
from train.core import pipelined
from train.core.train_config import TrainConfig


def split_model(model):
  """(graphdef, params, rest) of an nnx model."""
  return nnx.split(model, nnx.Param, ...)


LOSS_DECAY = 0.99  # the spike guard's running mean of the loss
SPIKE_WARMUP = 20  # accepted steps before the spike guard acts


def init_state(model, tx: optax.GradientTransformation):
  graphdef, params, rest = split_model(model)
  guard = {"loss_mean": jnp.zeros((), jnp.float32), "accepted": jnp.zeros((), jnp.int32)}
  return graphdef, {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
                    "guard": guard}


def load_stats(load_LxE):
  """Per-layer expert load: max/mean, min/mean and coefficient of variation (std/mean)."""
  mean = jnp.maximum(load_LxE.mean(-1), 1e-9)
  return {"expert_load_max": load_LxE.max(-1) / mean, "expert_load_min": load_LxE.min(-1) / mean,
          "expert_load_cv": load_LxE.std(-1) / mean}


def make_train_step(graphdef, model_cfg: ModelConfig, tx, schedule, cfg: TrainConfig, state_shardings=None,
                    par=None):
  """The jitted step(state, batch) -> (state, metrics) of the model `graphdef` with architecture
  `model_cfg` (the one it was built with). `state_shardings` (parallel.sharding.state_shardings of
  the state) pins the new state to the layout of the old, and the metrics are then replicated; None
  lets XLA choose (single device). With `par` (parallel.mesh.Parallelism) of more than one stage the
  MoE layers run through the pipeline (train/core/pipelined.py)."""
  depth = model_cfg.num_nextn_predict_layers
  n_micro = cfg.grad_accum
  lam, alpha = cfg.loss.mtp_lambda, cfg.loss.balance_alpha
  bias_stop = int(round(cfg.steps * (1 - cfg.loss.bias_update_stop_fraction)))
  spike_factor = cfg.spike_skip_factor
  dropless = par is not None and par.dropless
  qk_clip = cfg.optimizer.qk_clip  # QK-clip's threshold (train/core/muon.py), or None

  def loss_fn(params, rest, batch, counts):
    model = nnx.merge(graphdef, params, rest)
    if qk_clip is not None:
      model.set_attributes(keep_max_logit=True)  # each MLA module leaves its max_logit (moe/mla.py)
    out = model.forward(batch["tokens"], batch["segment_ids"], batch["positions"])
    loss, parts = loss_lib.objective(out, batch, counts, n_micro, lam, alpha)
    load = out.moe_stats.load if out.moe_stats is not None else jnp.zeros((0, 1))
    dropped = out.moe_stats.dropped.sum() if out.moe_stats is not None else jnp.zeros((), jnp.int32)
    max_logits = nnx.pop(model, nnx.Intermediate) if qk_clip is not None else None  # per MLA module
    return loss, (parts, load, dropped, max_logits)

  staged = par is not None and par.stages > 1
  if not staged:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  else:
    sched = pipelined.schedule(par, cfg.batch_size // n_micro)
    layout = par.layout(model_cfg.num_moe_layers)
    # the metrics' rows: the MoE layers in layer order (padding slots left out), then the MTP blocks
    metric_rows = np.concatenate([layout.layer_slot(), layout.slots + np.arange(depth)])

    def grad_fn(params, rest, batch, counts):  # the pipeline's forwards and backwards, not autodiff
      pipe = pipelined.Pipelined(graphdef, params, rest, par, sched, lam, alpha)
      loss, parts, load, dropped, grads = pipe.run(params, rest, batch, counts, n_micro)
      return (loss, (parts, load, dropped, None)), grads

  def step(state, batch):
    params, rest = state["params"], state["rest"]
    counts = loss_lib.token_counts(batch, depth)
    # Redundant experts' copies (moe/experts.py) are differentiated like parameters (as float32, so
    # that their gradients accumulate in float32) and their gradients summed into their experts' below.
    copy_weights, fixed = experts_lib.split_copies(rest)
    wrt, fixed = (nnx.merge_state(params, jax.tree.map(lambda w: w.astype(jnp.float32), copy_weights)), fixed) \
        if copy_weights else (params, rest)
    if n_micro == 1:
      (loss, (parts, load, dropped, max_logits)), grads = grad_fn(wrt, fixed, batch, counts)
    else:
      micro = jax.tree.map(lambda x: x.reshape(n_micro, -1, *x.shape[1:]), batch)

      def accumulate(carry, mb):  # sums, but the max logits' max
        (c_loss, (*c_aux, c_max)), c_grads = carry
        (loss, (*aux, max_logits)), grads = grad_fn(wrt, fixed, mb, counts)
        summed = jax.tree.map(jnp.add, ((c_loss, c_aux), c_grads), ((loss, aux), grads))
        return ((summed[0][0], (*summed[0][1], jax.tree.map(jnp.maximum, c_max, max_logits))), summed[1]), None

      shapes = jax.eval_shape(grad_fn, wrt, fixed, jax.tree.map(lambda x: x[0], micro), counts)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      ((loss, (parts, load, dropped, max_logits)), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    if copy_weights:  # once per step, however many micro-batches
      grads_model = nnx.merge(graphdef, grads, fixed)
      for experts in experts_lib.copy_experts(grads_model):
        experts.add_copy_grads()
      grads = split_model(grads_model)[1]

    metric_load = load[metric_rows] if staged else load
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lost = dropped > 0 if dropless else jnp.zeros((), bool)  # a dropless exchange that dropped: never applied
    guard = state["guard"]
    skip = ~finite | lost
    if spike_factor is not None:
      mean = guard["loss_mean"] / (1 - LOSS_DECAY ** guard["accepted"].astype(jnp.float32))
      skip = skip | ((guard["accepted"] >= SPIKE_WARMUP) & (loss > spike_factor * mean))
    updates, opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    if qk_clip is not None:
      new_params = muon.qk_clip(new_params, max_logits, qk_clip, model_cfg)
    gamma = jnp.where(state["step"] < bias_stop, cfg.loss.bias_update_gamma, 0.0)
    old_rest = jax.tree.leaves(rest)  # (the bias update below writes into the merged model's variables)
    model = nnx.merge(graphdef, new_params, rest)
    model.update_router_biases(load, gamma)
    model.replace_expert_copies(load, state["step"] + 1)
    for experts in experts_lib.copy_experts(model):  # the copies equal their experts' new weights
      experts.make_copies()
    _, _, new_rest = split_model(model)
    rest = jax.tree.unflatten(jax.tree.structure(new_rest), old_rest)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
    guard = {"loss_mean": jnp.where(skip, guard["loss_mean"], LOSS_DECAY * guard["loss_mean"]
                                    + (1 - LOSS_DECAY) * jnp.where(finite, loss, 0.0)),
             "accepted": guard["accepted"] + (~skip).astype(jnp.int32)}

    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": counts["lm"], "nonfinite": (~finite).astype(jnp.int32), "skipped": skip.astype(jnp.int32),
               "lost": jnp.where(lost, dropped, 0),
               **(load_stats(metric_load) if load.shape[0] else {})}
    if qk_clip is not None:  # each MLA layer's largest attention logit in the step, before the clip
      metrics["max_logit"] = muon.layer_max_logits(max_logits)
    if load.shape[0]:  # (token, expert) assignments dropped by expert-parallel capacity (0: dropless)
      metrics["dropped_tokens"] = dropped
    new_state = {"params": keep(new_params, params), "rest": keep(new_rest, rest), "opt": keep(opt, state["opt"]),
                 "step": state["step"] + 1, "guard": guard}
    return new_state, metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, replicated),
                 compiler_options=par.compiler_options() if par is not None else None)


def make_eval_step(graphdef, par=None):
  """Summed next-token NLL and target count of one batch (main head only). With `par` of more than
  one stage the MoE layers run through the pipeline's forwards (gpipe order)."""

  def step(state, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    if par is not None and par.stages > 1:
      sched = pipelined.schedule(par, batch["tokens"].shape[0], kind="gpipe")
      pipe = pipelined.Pipelined(graphdef, state["params"], state["rest"], par, sched, 0.0, 0.0, with_mtp=False)
      counts = {"lm": jnp.ones((), jnp.float32), "mtp": jnp.ones((0,), jnp.float32)}
      _, parts, _, _, _ = pipe.run(state["params"], state["rest"], batch, counts, 1, train=False)
      return parts["lm_loss"], mask.sum()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    return (loss_lib.token_nll(logits, batch["targets"]) * mask).sum(), mask.sum()

  return jax.jit(step)
