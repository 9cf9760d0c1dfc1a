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
whole batch's token counts, so it equals the single-batch loss exactly. With remat full (or
full_offload), unpipelined and without redundant experts, the layer stacks' gradients are added into
the accumulator inside their backward scans (moe/decoder.py: accumulating), not returned whole and
added after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe import decoder
from moe import experts as experts_lib
from moe.config import ModelConfig
from moe.model import STACKS
from parallel import pipeline
from train.core import loss as loss_lib
from train.core import muon
from train.core import overlapped
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


OPTIMIZER = "optimizer"  # the named scope of the optimizer's update


def make_train_step(graphdef, model_cfg: ModelConfig, tx, lr_schedule, cfg: TrainConfig, state_shardings=None,
                    par=None, pipe_schedule: pipeline.Schedule | None = None):
  """The jitted step(state, batch) -> (state, metrics) of the model `graphdef` with architecture
  `model_cfg` (the one it was built with). `state_shardings` (parallel.sharding.state_shardings of
  the state) pins the new state to the layout of the old, and the metrics are then replicated; None
  lets XLA choose (single device). `par`: the parallel.mesh.Parallelism; with `pipe_schedule` (the
  pipeline schedule, train.core.loop.pipeline_schedule, given when `par` has stages) the MoE layers
  run through the pipeline (train/core/pipelined.py)."""
  depth = model_cfg.num_nextn_predict_layers
  bias_stop = int(round(cfg.steps * (1 - cfg.loss.bias_update_stop_fraction)))
  dropless = par is not None and par.dropless
  fast_path = par is not None and par.ep_fast_path is not None
  qk_clip = cfg.optimizer.qk_clip  # QK-clip's threshold (train/core/muon.py), or None
  staged = pipe_schedule is not None
  if cfg.impl.fb_overlap:  # the whole batch's gradient, micro-batch m's forward beside m-1's backward
    overlapped.check(cfg, par)
    grad_fn = overlapped.grad_fn(graphdef, cfg, par)
  else:
    grad_fn = pipeline_grad(graphdef, cfg, par, pipe_schedule) if staged else model_grad(graphdef, cfg)
  in_stacks = not staged and cfg.grad_accum > 1 and cfg.impl.remat_policy in decoder.ACCUMULATING
  rows = metric_rows(par.layout(model_cfg.num_moe_layers), depth) if staged else None

  def step(state, batch):
    params, rest, guard = state["params"], state["rest"], state["guard"]
    counts = loss_lib.token_counts(batch, depth)
    copy_weights, wrt, fixed = differentiated(params, rest)
    if cfg.impl.fb_overlap:
      (loss, (parts, load, exchanged, max_logits)), grads = grad_fn(wrt, fixed, batch, counts)
    else:
      (loss, (parts, load, exchanged, max_logits)), grads = accumulated(grad_fn, wrt, fixed, batch, counts,
                                                                      cfg.grad_accum, in_stacks and not copy_weights)
    if copy_weights:  # once per step, however many micro-batches
      grads = with_copy_grads(graphdef, grads, fixed)

    metric_load = load[rows] if staged else load
    dropped = exchanged["dropped"]
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lost = dropped > 0 if dropless else jnp.zeros((), bool)  # a dropless exchange that dropped: never applied
    skip = skipped(loss, finite, lost, guard, cfg.spike_skip_factor)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
    with jax.named_scope(OPTIMIZER):  # (its share of the step: train/forecast.py PARTS)
      updates, opt = tx.update(grads, state["opt"], params)
      new_params = optax.apply_updates(params, updates)
      if qk_clip is not None:
        new_params = muon.qk_clip(new_params, max_logits, qk_clip, model_cfg)
      new_params, opt = keep(new_params, params), keep(opt, state["opt"])
    gamma = jnp.where(state["step"] < bias_stop, cfg.loss.bias_update_gamma, 0.0)
    new_rest, rest = router_update(graphdef, new_params, rest, load, gamma, state["step"])
    guard = next_guard(guard, loss, finite, skip)

    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
               "tokens": counts["lm"], "nonfinite": (~finite).astype(jnp.int32), "skipped": skip.astype(jnp.int32),
               "lost": jnp.where(lost, dropped, 0),
               **(load_stats(metric_load) if load.shape[0] else {})}
    if qk_clip is not None:  # each MLA layer's largest attention logit in the step, before the clip
      in_order = pipelined.in_layer_order(max_logits, par.layout(model_cfg.num_moe_layers)) if staged else max_logits
      metrics["max_logit"] = muon.layer_max_logits(in_order)
    if load.shape[0]:  # (token, expert) assignments dropped by expert-parallel capacity (0: dropless)
      metrics["dropped_tokens"] = dropped
    if fast_path:  # MoE layers (of all micro-batches) whose exchange fell back from the fast path to its chunks
      metrics["ep_fallbacks"] = exchanged["fallbacks"]
    new_state = {"params": new_params, "rest": keep(new_rest, rest), "opt": opt,
                 "step": state["step"] + 1, "guard": guard}
    return new_state, metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, replicated),
                 compiler_options=par.compiler_options(host_offload=cfg.impl.remat_policy == "full_offload")
                 if par is not None else None)


def model_grad(graphdef, cfg: TrainConfig):
  """(params, rest, batch, counts) -> ((loss, (parts, load, exchanged, max_logits)), grads) of one
  micro-batch of the model `graphdef`, by autodiff; exchanged: {"dropped": assignments dropped by
  expert-parallel capacity, "fallbacks": MoE layers whose exchange fell back from its fast path};
  max_logits: with QK-clip each MLA module's largest attention logit (moe/mla.py), else None."""
  n_micro, lam, alpha = cfg.grad_accum, cfg.loss.mtp_lambda, cfg.loss.balance_alpha
  qk_clip = cfg.optimizer.qk_clip

  def loss_fn(params, rest, batch, counts, acc=None):
    """`acc`: the gradient so far, into which the layer stacks add theirs (see `accumulated`)."""
    model = nnx.merge(graphdef, params, rest)
    model.defer_head = True  # the loss computes the logits a sequence chunk at a time (train/core/loss.py)
    if acc is not None:
      for name in STACKS:
        if getattr(model, name) is not None:
          getattr(model, name).grad_acc = nnx.data(jax.tree.leaves(acc[name]["layers"]))
    if qk_clip is not None:
      model.set_attributes(keep_max_logit=True)  # each MLA module leaves its max_logit (moe/mla.py)
    out = model.forward(batch["tokens"], batch["segment_ids"], batch["positions"], keep_layout=True)
    loss, parts = loss_lib.objective(out, batch, counts, n_micro, lam, alpha)
    load = out.moe_stats.load if out.moe_stats is not None else jnp.zeros((0, 1))
    exchanged = experts_lib.exchange_counts([] if out.moe_stats is None else [out.moe_stats])
    max_logits = nnx.pop(model, nnx.Intermediate) if qk_clip is not None else None  # per MLA module
    return loss, (parts, load, exchanged, max_logits)

  return jax.value_and_grad(loss_fn, has_aux=True)


def pipeline_grad(graphdef, cfg: TrainConfig, par, pipe_schedule: pipeline.Schedule):
  """`model_grad` through the pipeline's forwards and backwards (train/core/pipelined.py), not
  autodiff; the max logits (with QK-clip) have the MoE stack's rows in slot order, as its parameters."""
  qk_clip = cfg.optimizer.qk_clip is not None

  def grad_fn(params, rest, batch, counts):
    pipe = pipelined.Pipelined(graphdef, params, rest, par, pipe_schedule, cfg.loss.mtp_lambda, cfg.loss.balance_alpha,
                               max_logits=qk_clip)
    loss, parts, load, exchanged, grads, max_logits = pipe.run(params, rest, batch, counts, cfg.grad_accum)
    return (loss, (parts, load, exchanged, max_logits if qk_clip else None)), grads

  return grad_fn


def metric_rows(layout: pipeline.Layout, depth: int):
  """The rows of the pipelined stack's load the metrics read: the MoE layers in layer order (padding
  slots left out), then the `depth` MTP blocks."""
  return np.concatenate([layout.layer_slot(), layout.slots + np.arange(depth)])


def differentiated(params, rest):
  """(copy weights, what is differentiated, what is not). Redundant experts' copies (moe/experts.py)
  are differentiated like parameters (as float32, so that their gradients accumulate in float32), and
  their gradients summed into their experts' (`with_copy_grads`)."""
  copy_weights, fixed = experts_lib.split_copies(rest)
  if not copy_weights:
    return copy_weights, params, rest
  return copy_weights, nnx.merge_state(params, jax.tree.map(lambda w: w.astype(jnp.float32), copy_weights)), fixed


def in_a_stack(path) -> bool:
  return getattr(path[0], "key", None) in STACKS


def accumulated(grad_fn, wrt, fixed, batch, counts, n_micro: int, in_stacks: bool = False):
  """`grad_fn` of the whole batch: over its `n_micro` micro-batches in a scan, everything summed but
  the max logits, of which the max. `in_stacks`: `grad_fn` (model_grad's) is given the gradient so
  far and returns the layer stacks' already summed into it."""
  if n_micro == 1:
    return grad_fn(wrt, fixed, batch, counts)
  micro = loss_lib.micro_batches(batch, n_micro)

  def accumulate(carry, mb):
    (c_loss, (*c_aux, c_max)), c_grads = carry
    (loss, (*aux, max_logits)), grads = grad_fn(wrt, fixed, mb, counts, *((c_grads,) if in_stacks else ()))
    summed = jax.tree.map(jnp.add, (c_loss, c_aux), (loss, aux))
    grads = jax.tree_util.tree_map_with_path(lambda path, c, g: g if in_stacks and in_a_stack(path) else c + g,
                                             c_grads, grads)
    return ((summed[0], (*summed[1], jax.tree.map(jnp.maximum, c_max, max_logits))), grads), None

  shapes = jax.eval_shape(grad_fn, wrt, fixed, jax.tree.map(lambda x: x[0], micro), counts)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.scan(accumulate, zeros, micro)[0]


def with_copy_grads(graphdef, grads, fixed):
  """The parameters' gradients, each expert's with its redundant copies' summed in."""
  grads_model = nnx.merge(graphdef, grads, fixed)
  for experts in experts_lib.copy_experts(grads_model):
    experts.add_copy_grads()
  return split_model(grads_model)[1]


def skipped(loss, finite, lost, guard, spike_factor: float | None):
  """Whether the update is skipped: the loss or the gradient norm not finite (`finite` false), a
  dropless exchange that dropped (`lost`), or with `spike_factor` k the loss above k x its running
  mean (`guard`), from the SPIKE_WARMUP-th accepted step."""
  skip = ~finite | lost
  if spike_factor is not None:
    mean = guard["loss_mean"] / (1 - LOSS_DECAY ** guard["accepted"].astype(jnp.float32))
    skip = skip | ((guard["accepted"] >= SPIKE_WARMUP) & (loss > spike_factor * mean))
  return skip


def next_guard(guard, loss, finite, skip):
  """The spike guard after the step: the exponential mean of the accepted losses, and their count."""
  return {"loss_mean": jnp.where(skip, guard["loss_mean"], LOSS_DECAY * guard["loss_mean"]
                                 + (1 - LOSS_DECAY) * jnp.where(finite, loss, 0.0)),
          "accepted": guard["accepted"] + (~skip).astype(jnp.int32)}


def router_update(graphdef, params, rest, load, gamma, step):
  """(the new `rest`, `rest` in its tree structure): the router biases moved by `gamma` against the
  measured `load` with the new `params`, the redundant experts re-placed (as of the step after `step`,
  this one) and their copies made from their experts' new weights (moe/experts.py)."""
  old_rest = jax.tree.leaves(rest)  # (the bias update below writes into the merged model's variables)
  model = nnx.merge(graphdef, params, rest)
  model.update_router_biases(load, gamma)
  model.replace_expert_copies(load, step + 1)
  for experts in experts_lib.copy_experts(model):  # the copies equal their experts' new weights
    experts.make_copies()
  _, _, new_rest = split_model(model)
  return new_rest, jax.tree.unflatten(jax.tree.structure(new_rest), old_rest)


def make_eval_step(graphdef, par=None):
  """Summed next-token NLL and target count of one batch (main head only). With `par` of more than
  one stage the MoE layers run through the pipeline's forwards (gpipe order)."""

  def step(state, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    if par is not None and par.stages > 1:
      sched = pipelined.schedule(par, batch["tokens"].shape[0], kind="gpipe")
      pipe = pipelined.Pipelined(graphdef, state["params"], state["rest"], par, sched, 0.0, 0.0, with_mtp=False)
      counts = {"lm": jnp.ones((), jnp.float32), "mtp": jnp.ones((0,), jnp.float32)}
      _, parts, *_ = pipe.run(state["params"], state["rest"], batch, counts, 1, train=False)
      return parts["lm_loss"], mask.sum()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    return (loss_lib.token_nll(logits, batch["targets"]) * mask).sum(), mask.sum()

  return jax.jit(step)
