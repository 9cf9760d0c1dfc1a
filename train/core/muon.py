"""Muon (Moonlight, arXiv 2502.16982) and QK-clip (Kimi K2's MuonClip, arXiv 2507.20534).

Muon is optax's (`optax.contrib.scale_by_muon` and the consistent-RMS `scale_by_shape` that
`optax.contrib.muon` chains after it); this module says which parameters it gets and how each is a
matrix. For a matrix parameter W (the momentum M = beta M + g, Nesterov),

  W <- W - lr(t) * (0.2 * sqrt(max(A, B)) * NS5(M) + wd * W)     [A, B] the matrix's shape

with NS5 five quintic Newton-Schulz iterations on M / ||M||_F (an approximate U V^T of M's SVD); the
0.2 sqrt(max(A, B)) factor gives the update AdamW's RMS (Moonlight section 2.2), so AdamW's learning
rate and weight decay carry over. The other parameters go to the project's AdamW (train/core/
optimizer.py), as Moonlight does.

Assignment, from the logical axis names every parameter carries (moe/layers.py; the names
parallel/sharding.py's rules table maps to mesh axes), by MUON_AXES:
  batch axes (`layers`, `stage_layers`, `expert`): every scanned layer and every routed expert is its
      own matrix (optax vmaps the orthogonalisation over them);
  matrix axes: the two left after the batch axes are the matrix, [in, out] as Linear stores it. The
      MLA up-projections q_b_proj [q_lora, heads * qk_head_dim] and kv_b_proj [kv_lora, heads *
      (nope + v)] and o_proj [heads * v, hidden] are whole matrices, not one per head: MaxText's
      DeepSeek dimension numbers (wq_b, wkv_b: reduction (0,), output (heads, head_dim); out:
      reduction (heads, head_dim)) and Moonlight's 2-D weights do the same;
  AdamW: anything with a `vocab` or `norm` axis (embedding, output head, norm scales), and anything
      that is not a matrix (biases). The router's correction bias is not a parameter (no optimizer).

Sharding: `reshard_for_ns` lays each stacked update out for the Newton-Schulz iterations so that
they need no collective: the matrix dimensions whole, the batch dimensions (layers x experts) split
over the mesh axes the parameter was sharded over, one all-to-all in and one out (what MaxText does
along the layer axis), instead of the all-gathers and all-reduces that five iterations of sharded
matmuls on the parameter's own layout would cost (docs/muon.md has the numbers).

QK-clip (after the optimizer step, per attention head h of every MLA layer): with S_h the largest
pre-softmax logit q.k * softmax_scale the step's forward saw (moe/mla.py `max_logit`) and tau the
threshold, gamma_h = min(1, tau / S_h); the head's columns of q_b_proj (or q_proj) are scaled by
sqrt(gamma_h) in their non-rotary part (q_nope) and by gamma_h in their rotary part (q_pe), and its
k_nope columns of kv_b_proj by sqrt(gamma_h); the values and the rotary key k_pe (one for all heads,
from kv_a_proj_with_mqa) are left alone, as Kimi K2 does. Then q_nope.k_nope scales by gamma_h and
q_pe.k_pe by gamma_h, so the head's logits scale by gamma_h: the largest is tau for the same input.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import scale_by_shape  # optax.contrib.muon's consistent-RMS scaling

from moe.config import ModelConfig
from parallel.sharding import logical_to_spec

log = logging.getLogger("train")

BATCH, MATRIX, ADAMW = "batch", "matrix", "adamw"

# logical axis name -> its part in Muon (see the module docstring); None: an unnamed dimension (the
# router's experts in its [embed, E] kernel).
MUON_AXES: dict[str | None, str] = {
    "layers": BATCH, "stage_layers": BATCH, "expert": BATCH,
    "embed": MATRIX, "mlp": MATRIX, "moe_mlp": MATRIX, "heads": MATRIX, "q_lora": MATRIX, "kv_lora": MATRIX,
    "mtp_concat": MATRIX, None: MATRIX,
    "vocab": ADAMW, "head_embed": ADAMW, "head_vocab": ADAMW, "norm": ADAMW,
}


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def dims_of(axes) -> MuonDimensionNumbers | None:
  """Muon's dimension numbers for a parameter whose dimensions are named `axes`; None: AdamW."""
  unknown = [a for a in axes if a not in MUON_AXES]
  if unknown:
    raise ValueError(f"logical axis {unknown[0]!r} has no entry in train/core/muon.py MUON_AXES")
  roles = [MUON_AXES[a] for a in axes]
  matrix = [i for i, r in enumerate(roles) if r == MATRIX]
  if ADAMW in roles or len(matrix) < 2:
    return None
  if len(matrix) > 2:
    raise ValueError(f"axes {tuple(axes)}: more than two matrix dimensions; say in MUON_AXES which are batch axes")
  return MuonDimensionNumbers(reduction_axis=matrix[0], output_axis=matrix[1])


def _axes(v: nnx.Variable) -> tuple:
  return tuple(v.get_metadata()["axes"])


def labels(params):
  """'muon' or 'adamw' for every parameter of `params` (an nnx.State of Params)."""
  return jax.tree.map(lambda v: v.replace("adamw" if dims_of(_axes(v)) is None else "muon"), params,
                      is_leaf=is_variable)


def dimension_numbers(tree):
  """`tree` (params or updates, possibly with optax's masked-out leaves) with each Muon parameter's
  value replaced by its MuonDimensionNumbers, the shape optax.contrib.scale_by_muon expects."""
  def one(v):
    if not hasattr(v.get_value(), "ndim"):  # masked out: another partition's parameter
      return v
    return v.replace(dims_of(_axes(v)))

  return jax.tree.map(one, tree, is_leaf=is_variable)


def _path(path) -> str:
  names = [str(getattr(e, "key", getattr(e, "name", getattr(e, "idx", e)))) for e in path]
  return "/".join(n for n in names if n != "value")


def describe(params) -> str:
  """One line: how many parameters (and values) go where, and each Muon matrix's batch axes."""
  groups: Counter = Counter()
  sizes: Counter = Counter()
  for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]:
    axes, shape = _axes(v), v.get_value().shape
    d = dims_of(axes)
    if d is None:
      key = "adamw"
    else:
      batch = [a for a in axes if MUON_AXES[a] == BATCH]
      key = f"muon per {' x '.join(batch) or 'matrix'}"
    groups[key] += 1
    sizes[key] += math.prod(shape)
  return "; ".join(f"{k}: {groups[k]} params ({sizes[k] / 1e6:.2f}M)" for k in sorted(groups))


def assignment(params) -> dict[str, str]:
  """{parameter path: 'adamw' | 'muon (reduction, output)'}, for the log and the tests."""
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]:
    d = dims_of(_axes(v))
    out[_path(path)] = "adamw" if d is None else f"muon {d.reduction_axis},{d.output_axis}"
  return out


# ------------------------------------------------------------------ sharded Newton-Schulz
def lead_order(axes, shape) -> tuple[int, ...]:
  """The dimension order in which Muon sees a parameter: its longest batch dimension first (the
  experts of a stack [layers, experts, in, out]), then the other dimensions in order. optax merges the
  batch dimensions into one, which keeps a sharding only if it is on the first of them."""
  batch = [i for i, a in enumerate(axes) if MUON_AXES[a] == BATCH]
  if not batch:
    return tuple(range(len(axes)))
  lead = max(batch, key=lambda i: shape[i])
  return (lead,) + tuple(i for i in range(len(axes)) if i != lead)


def batch_first(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on the parameters (and updates) with their dimensions in `lead_order`, their axes
  metadata permuted alike (so that its state is laid out by the same rules); the updates it returns
  back in the parameters' order."""

  def permute(v):
    x = v.get_value()
    if not hasattr(x, "ndim"):  # masked out: another partition's parameter
      return v
    order = lead_order(_axes(v), x.shape)
    return v.replace(jnp.transpose(x, order), axes=tuple(_axes(v)[i] for i in order))

  def unpermute(u, like):
    x = u.get_value()
    if not hasattr(x, "ndim"):
      return like
    order = lead_order(_axes(like), like.get_value().shape)
    return like.replace(jnp.transpose(x, np.argsort(order)))

  def each(fn, tree):
    return jax.tree.map(fn, tree, is_leaf=is_variable)

  def init(params):
    return inner.init(each(permute, params))

  def update(updates, state, params=None):
    out, state = inner.update(each(permute, updates), state, None if params is None else each(permute, params))
    leaves, treedef = jax.tree.flatten(updates, is_leaf=is_variable)
    mine = jax.tree.leaves(out, is_leaf=is_variable)
    return jax.tree.unflatten(treedef, [unpermute(u, like) for u, like in zip(mine, leaves, strict=True)]), state

  return optax.GradientTransformation(init, update)


def ns_spec(axes, shape, mesh_shape, rules) -> P:
  """The layout in which to orthogonalise the update of a stacked parameter named `axes` of `shape`,
  in `lead_order` (its longest batch dimension first): every mesh axis of its own layout (parallel/
  sharding.py) moved to that first dimension where they divide it, so that the matrices are whole on
  every device, the Newton-Schulz iterations need no collective, and optax's merge of the batch
  dimensions keeps the sharding. With one batch dimension an axis that does not divide goes there
  unevenly (XLA pads: 58 layers over 256 devices, one layer's matrices on each of 58); with more, it
  stays where it was."""
  spec = list(logical_to_spec(axes, shape, mesh_shape, rules)) + [None] * len(shape)
  spec = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec[:len(shape)]]
  n_batch = sum(MUON_AXES[a] == BATCH for a in axes)
  if n_batch:
    for i in range(1, len(shape)):
      for a in spec[i]:
        if shape[0] % (math.prod(mesh_shape[b] for b in spec[0]) * mesh_shape[a]) == 0 or n_batch == 1:
          spec[0] += (a,)
          spec[i] = tuple(b for b in spec[i] if b != a)
  return P(*[None if not e else e[0] if len(e) == 1 else e for e in spec])


def reshard_for_ns(par) -> optax.GradientTransformation:
  """Stateless: every stacked Muon update (in `lead_order`) laid out by `ns_spec` (`par`:
  parallel.mesh.Parallelism; None or one device: the identity). XLA moves each update with all-to-alls
  over the axes that move, and back when the update meets its parameter."""

  def one(v):
    x = v.get_value()
    if par is None or not hasattr(x, "ndim") or x.ndim <= 2:
      return v
    spec = ns_spec(_axes(v), x.shape, dict(par.mesh.shape), par.rules)
    return v.replace(jax.lax.with_sharding_constraint(x, NamedSharding(par.mesh, spec)))

  def update(updates, state, params=None):
    del params
    if par is None or par.mesh.size == 1:
      return updates, state
    return jax.tree.map(one, updates, is_leaf=is_variable), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_muon(o, schedule: optax.Schedule, adamw: optax.GradientTransformation, par=None):
  """Muon for the matrices, `adamw` (unclipped, with its own learning rate and decay) for the rest;
  `o` the OptimizerConfig. Clip the gradients before."""
  muon = batch_first(optax.chain(
      reshard_for_ns(par),
      optax.contrib.scale_by_muon(beta=o.muon_beta, mu_dtype=jnp.dtype(o.moment_dtype),
                                  weight_dimension_numbers=dimension_numbers),
      scale_by_shape(dimension_numbers, consistent_rms=o.muon_consistent_rms),
      optax.add_decayed_weights(o.weight_decay),
      optax.scale_by_learning_rate(schedule),
  ))
  tx = optax.partition({"muon": muon, "adamw": adamw}, labels)

  def init(params):
    line = describe(params)
    if line not in _logged:  # (init is traced more than once)
      _logged.add(line)
      log.info("optimizer: %s", line)
    return tx.init(params)

  def update(updates, state, params=None):
    with jax.named_scope("muon"):  # (train.aot and its readers find the optimizer's collectives by it)
      return tx.update(updates, state, params)

  return optax.GradientTransformation(init, update)


_logged: set[str] = set()


# ------------------------------------------------------------------ QK-clip
def clip_factors(max_logit, threshold: float):
  """gamma = min(1, tau / S) per head (1 where S <= tau, including S <= 0)."""
  s = jnp.asarray(max_logit, jnp.float32)
  return jnp.where(s > threshold, threshold / jnp.maximum(s, 1e-30), 1.0)


def _scale_heads(kernel, split: int, first, second, heads: int):
  """kernel [..., in, heads * (a + b)]: each head's first `split` columns times first[..., h], the
  rest times second[..., h] (factors [..., heads], the kernel's leading axes)."""
  *lead, d_in, d_out = kernel.shape
  k = kernel.reshape(*lead, d_in, heads, d_out // heads)
  col = jnp.arange(d_out // heads) < split
  f = jnp.where(col, first[..., None, :, None], second[..., None, :, None])
  return (k * f.astype(k.dtype)).reshape(kernel.shape)


def qk_clip(params, max_logits, threshold: float, cfg: ModelConfig):
  """`params` after QK-clip (module docstring) given `max_logits`: the `max_logit` intermediates the
  forward sowed (nnx.pop(model, nnx.Intermediate)), [layers, heads] or [heads] per MLA module."""
  h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
  gammas = {}
  for path, v in jax.tree_util.tree_flatten_with_path(max_logits, is_leaf=is_variable)[0]:
    names = _path(path).split("/")
    if names[-1] == "max_logit":
      gammas["/".join(names[:-1])] = clip_factors(v.get_value(), threshold)

  def one(path, v):
    names = _path(path).split("/")
    module, proj = "/".join(names[:-2]), names[-2] if len(names) >= 2 else ""
    if module not in gammas or names[-1] != "kernel":
      return v
    g = gammas[module]
    if proj in ("q_b_proj", "q_proj"):
      return v.replace(_scale_heads(v.get_value(), nope, jnp.sqrt(g), g, h))
    if proj == "kv_b_proj":
      return v.replace(_scale_heads(v.get_value(), nope, jnp.sqrt(g), jnp.ones_like(g), h))
    return v

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_variable)


def layer_max_logits(max_logits):
  """The largest logit of each MLA layer, in layer order (dense stack, MoE stack, MTP): [layers]."""
  rows = [jnp.reshape(v.get_value(), (-1, v.get_value().shape[-1])).max(-1)
          for v in jax.tree.leaves(max_logits, is_leaf=is_variable)]
  return jnp.concatenate(rows) if rows else jnp.zeros((0,), jnp.float32)
