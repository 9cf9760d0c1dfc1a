"""Learning-rate schedules, and AdamW as DeepSeek-V3 trains (report §4.2, §3.3) or Muon (train/core/muon.py).

`t` below is optax's update count: 0 for the first update. Warm-up is `lr · t / W`, so the first
update has learning rate 0 (it only fills the moments).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from train.core import muon
from train.core.train_config import TrainConfig


# ------------------------------------------------------------------ schedules
def _cosine(u):
  """1 → 0 over u in [0, 1]: (1 + cos(π u)) / 2."""
  return 0.5 * (1 + jnp.cos(math.pi * u))


def _one_minus_sqrt(u):
  """1 → 0 over u in [0, 1]: 1 - √u (Hägele et al. 2024: beats a linear WSD cool-down)."""
  return 1 - jnp.sqrt(u)


def warmup_decay(peak, final, warmup, start, length, shape) -> optax.Schedule:
  """lr(t) = peak · t/warmup for t < warmup; peak until `start`; then
  final + (peak - final) · shape(u), u = (t - start)/length, over `length` steps; final after."""

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    ramp = peak * t / max(warmup, 1)
    u = jnp.clip((t - start) / max(length, 1), 0.0, 1.0)
    decay = final + (peak - final) * shape(u)
    return jnp.where(t < warmup, ramp, jnp.where(t < start, peak, decay))

  return schedule


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """The schedule `cfg.optimizer.schedule` names (see train.core.train_config.OptimizerConfig):
  `warmup_constant_cosine` cosine from decay_start over decay_steps; `wsd` the same with 1 - √u;
  `cosine` cosine from the end of warm-up to `cfg.steps`."""
  o = cfg.optimizer
  if o.schedule == "cosine":
    return warmup_decay(o.lr, o.final_lr, o.warmup_steps, o.warmup_steps, cfg.steps - o.warmup_steps, _cosine)
  shape = _cosine if o.schedule == "warmup_constant_cosine" else _one_minus_sqrt
  return warmup_decay(o.lr, o.final_lr, o.warmup_steps, o.decay_start_step(cfg.steps), o.decay_steps, shape)


# ------------------------------------------------------------------ AdamW
class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
  """Adam with both moments stored in `moment_dtype` (optax's mu_dtype covers only mu).

  In float32: m = b1·m + (1-b1)·g, v = b2·v + (1-b2)·g², update = m̂ / (√v̂ + eps) with
  m̂ = m/(1 - b1^t), v̂ = v/(1 - b2^t); m and v are rounded to `moment_dtype` only for storage.
  BF16 v is fine for b2 = 0.95 (a 5% step is far above BF16's 0.4% resolution), not for 0.999.
  """

  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)
    return ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), grads, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), grads, state.nu)
    c1, c2 = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
    step = lambda g, m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype)
    updates = jax.tree.map(step, grads, mu, nu)
    store = lambda x: x.astype(moment_dtype)
    return updates, ScaleByAdamState(count, jax.tree.map(store, mu), jax.tree.map(store, nu))

  return optax.GradientTransformation(init, update)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_name(path) -> str:
  """The parameter's name: the last path entry, skipping the `.value` that an nnx.State of
  Variables (not `nnx.as_pure`) appends."""
  names = [_key_name(e) for e in path]
  while names and names[-1] == "value":
    names.pop()
  return names[-1] if names else ""


def decays(path, leaf) -> bool:
  """Weight decay applies to leaves with ndim >= 2 whose name (see `leaf_name`) is not `scale` and
  does not end in `bias`: a norm scale stacked over layers is 2-D yet not decayed."""
  name = leaf_name(path)
  return jnp.ndim(leaf) >= 2 and name != "scale" and not name.endswith("bias")


def decay_mask(params):
  """Bool pytree (same structure: dict or nnx.State) of `decays(path, leaf)`."""
  return jax.tree_util.tree_map_with_path(decays, params)


def adamw(cfg: TrainConfig, schedule: optax.Schedule) -> tuple[optax.GradientTransformation, ...]:
  """AdamW with decoupled decay, p <- p - lr(t) * (m^/(sqrt(v^) + eps) + wd * mask * p), as the
  transformations to chain."""
  o = cfg.optimizer
  return (scale_by_adam(o.b1, o.b2, o.eps, jnp.dtype(o.moment_dtype)),
          optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
          optax.scale_by_learning_rate(schedule))


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule, par=None) -> optax.GradientTransformation:
  """`cfg.optimizer.name` on float32 master weights, after global-norm clipping
  g <- g * min(1, clip_norm/||g||_2): `adamw` (above) for every parameter, or `muon` for the matrices
  and AdamW for the rest (train/core/muon.py; `par`, the parallel.mesh.Parallelism, lays out its
  Newton-Schulz iterations)."""
  o = cfg.optimizer
  clip = optax.clip_by_global_norm(o.clip_norm)
  if o.name == "adamw":
    return optax.chain(clip, *adamw(cfg, schedule))
  return optax.chain(clip, muon.make_muon(o, schedule, optax.chain(*adamw(cfg, schedule)), par))
