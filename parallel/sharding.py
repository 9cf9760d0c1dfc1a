"""Logical axis names -> mesh axes: the one rules table, parameter shardings, activation constraints.

Model code names dimensions logically (every nnx.Variable carries `axes` metadata such as
("embed", "mlp"); activations are constrained with names such as ("batch", "seq", "embed")). This
table maps each name to mesh axes (parallel/mesh.py); `mesh.rules` in the config overrides entries,
e.g. `mesh.rules={embed: fsdp}` keeps dense parameters whole across the expert axis.

Resolving a tuple of logical names for an array of a given shape:
  - a mesh axis is used at most once per array: a later dimension asking for an axis an earlier
    one already took does not get it (so activations ("batch", "seq", "embed") are sharded on batch
    over data x fsdp x expert and replicated on embed, while parameters are sharded on embed over
    fsdp x expert, and the experts [expert, embed, moe_mlp] on embed over fsdp alone);
  - mesh axes of size 1 are dropped;
  - a dimension is only sharded over mesh axes whose product divides its size: the longest prefix
    of its rule's axes that does (`embed` over fsdp x expert, else over fsdp), else it is replicated
    (`state_shardings` logs each such parameter once).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel.common.errors import ConfigError, divisors

log = logging.getLogger("parallel")

MESH_AXES = ("stage", "data", "fsdp", "context", "expert", "tensor")

# logical name -> mesh axes. Batch over every data-like axis (`stage` too: outside the pipeline the
# stages split the batch; inside it, where `stage` is manual, `constrain` drops it) (experts use `expert` only inside the MoE
# block, so the rest of the model treats it as data); parameters fully sharded on their hidden
# (`embed`) dimension over fsdp and, for the dense ones, the expert axis too (it is a data axis
# outside the MoE block: ZeRO-3 over both; the experts' own `expert` dimension takes that axis first), and MLA's up-projections (q_b_proj [q_lora, heads], kv_b_proj
# [kv_lora, heads], which have no hidden dimension) on their LoRA rank, so that no large parameter is
# replicated when tensor=1; tensor parallelism on heads, FFN width and vocabulary; experts over
# `expert`. Stacked layers and norms stay whole, except the pipelined stack, whose slots (parallel/
# pipeline.py) split over `stage`; the weights outside the stack (embedding, head, dense layers, MTP)
# are sharded over `stage` too (their `embed` takes it last: the stack's slots take it first), so that
# their float32 weights and moments are not whole on every stage; the pipeline gathers them per step.
# Each sequence's tokens split over `context` (context parallelism: MLA gathers its latent over it,
# moe/mla.py), and the parameters' hidden and LoRA dimensions over it after fsdp (ZeRO-3 over fsdp x
# context, as MaxText does: a long-context run's weights and moments are not whole on every slice
# of a sequence).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("stage", "data", "fsdp", "expert"),
    "seq": ("context",),
    "embed": ("fsdp", "context", "expert", "stage"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "moe_mlp": ("tensor",),
    "expert": ("expert",),
    "layers": (),
    "stage_layers": ("stage",),
    "q_lora": ("fsdp", "context", "expert", "stage"),
    "kv_lora": ("fsdp", "context", "expert", "stage"),
    "norm": (),
    "mtp_concat": (),
}

# The output head's dimensions: by default those of the rest of the model (batch, embed, vocab above).
# With vocabulary parallelism (`mesh.vocab_parallel`) the head's vocabulary splits over fsdp as well as
# tensor and its tokens are gathered over fsdp instead: each device computes every fsdp peer's tokens'
# logits for its slice of the vocabulary, so that the head's weight is never gathered and its
# gradient never summed whole (Megatron's vocab-parallel cross-entropy, over the fsdp axis). The
# batch then takes fsdp as its minor axis: each device's rows of the head are its fsdp peers' rows
# side by side, one all-gather (with fsdp first they would interleave, and XLA re-lays them out whole).
HEAD_OF = {"head_batch": "batch", "head_embed": "embed", "head_vocab": "vocab"}


def _as_axes(value, where: str) -> tuple[str, ...]:
  if value is None:
    return ()
  axes = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else None
  if axes is None or not all(isinstance(a, str) for a in axes):
    raise ConfigError(f"{where}={value!r}: expected a mesh axis ({', '.join(MESH_AXES)}), a list of them, or null")
  for a in axes:
    if a not in MESH_AXES:
      raise ConfigError(f"{where}: {a!r} is not a mesh axis (one of {', '.join(MESH_AXES)})")
  if len(set(axes)) != len(axes):
    raise ConfigError(f"{where}: mesh axes repeat in {list(axes)}")
  return axes


def resolve_rules(overrides: Mapping | None = None, vocab_parallel: bool = False) -> dict[str, tuple[str, ...]]:
  """DEFAULT_RULES with `overrides` (name -> axis, list of axes, or null) applied; the head's rules
  (HEAD_OF) follow their model-wide names unless overridden, moved to vocabulary parallelism over
  fsdp with `vocab_parallel`."""
  if overrides is not None and not isinstance(overrides, Mapping):
    raise ConfigError(f"mesh.rules={overrides!r} must be a mapping")
  rules = dict(DEFAULT_RULES)
  given = {str(name): _as_axes(value, f"mesh.rules.{name}") for name, value in (overrides or {}).items()}
  rules.update(given)
  for head, name in HEAD_OF.items():
    rules[head] = given.get(head, rules[name])
  if vocab_parallel:  # fsdp last among the batch's axes, so that gathering over it is one all-gather
    if "fsdp" in rules["batch"]:
      rules["batch"] = tuple(a for a in rules["batch"] if a != "fsdp") + ("fsdp",)
    rules["head_batch"] = tuple(a for a in rules["head_batch"] if a != "fsdp")
    rules["head_embed"] = tuple(a for a in rules["head_embed"] if a != "fsdp")
    rules["head_vocab"] = tuple(a for a in rules["head_vocab"] if a != "fsdp") + ("fsdp",)
  return rules


def resolve_dims(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                 rules=None, what: str = "") -> tuple[P, list[str]]:
  """(PartitionSpec for an array of `shape` whose dimensions are named `logical_axes`, notes on the
  dimensions replicated because their size does not divide)."""
  rules = DEFAULT_RULES if rules is None else dict(rules)
  if len(logical_axes) != len(shape):
    raise ValueError(f"{what}: axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out, notes = [], []
  for dim, (name, size) in enumerate(zip(logical_axes, shape)):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ConfigError(f"{what}: logical axis {name!r} has no sharding rule (add it to mesh.rules)")
    axes = tuple(a for a in rules[name] if mesh_shape.get(a, 1) > 1 and a not in used)
    wanted = axes
    while axes and size % math.prod(mesh_shape[a] for a in axes):
      axes = axes[:-1]  # the longest prefix of the rule's axes that divides the dimension
    if axes != wanted:
      n = math.prod(mesh_shape[a] for a in wanted)
      kept = f"sharded over {'x'.join(axes)} only" if axes else "replicated"
      notes.append(f"{what or 'array'} dim {dim} ({name!r}, size {size}) does not divide by {'x'.join(wanted)}={n};"
                   f" {kept}")
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out), notes


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules=None, what: str = "") -> P:
  """PartitionSpec for an array of `shape` whose dimensions are named `logical_axes`."""
  return resolve_dims(logical_axes, shape, mesh_shape, rules, what)[0]


def _path_str(path) -> str:
  parts = []
  for e in path:
    for attr in ("key", "name", "idx"):
      if hasattr(e, attr):
        parts.append(str(getattr(e, attr)))
        break
  return "/".join(p for p in parts if p != "value")


def state_shardings(tree, mesh, rules=None):
  """The NamedSharding of every array in `tree` (a pytree of nnx.Variables and/or arrays, such as
  the trainer state {params, rest, opt, step}): from a Variable's `axes` metadata, replicated
  for anything without it. Same tree structure as `tree`, usable as `jit(out_shardings=...)`.
  Logs each parameter dimension that stays whole because it does not divide."""
  mesh_shape = dict(mesh.shape)
  notes: dict[str, None] = {}

  def one(path, x):
    if not isinstance(x, nnx.Variable):
      return NamedSharding(mesh, P())
    axes = x.get_metadata().get("axes")
    value = x.get_value() if hasattr(x, "get_value") else x.value
    if not hasattr(value, "shape"):  # no array: a placeholder such as optax's MaskedNode (partitioned optimizers)
      return x
    spec = P()
    if axes is not None:
      shape = np.shape(value)
      spec, why = resolve_dims(axes, shape, mesh_shape, rules, _path_str(path))
      notes.update(dict.fromkeys(why))
    return x.replace(NamedSharding(mesh, spec))

  out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for note in notes:
    log.info("sharding: %s", note)
  return out


def batch_sharding(mesh, shape: Sequence[int], rules=None) -> NamedSharding:
  """Sharding of a [batch, seq, ...] input array: batch over the batch axes."""
  names = ("batch", "seq") + (None,) * (len(shape) - 2)
  return NamedSharding(mesh, logical_to_spec(names[:len(shape)], shape, dict(mesh.shape), rules, "batch"))


def process_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
  """The contiguous rows of a global [batch, ...] array this process holds under `sharding`."""
  idx = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
  starts = [s[0].start or 0 for s in idx]
  stops = [global_shape[0] if s[0].stop is None else s[0].stop for s in idx]
  return slice(min(starts), max(stops))


def place_batch(batch: Mapping[str, np.ndarray], par=None, global_batch_size: int | None = None) -> dict:
  """Host batch -> global jax Arrays sharded over the batch axes of `par` (a parallel.mesh.Parallelism).

  Single process: `batch` is the global batch (jax.device_put). Several processes: `batch` is this
  process's rows and `global_batch_size` the total; jax.make_array_from_process_local_data assembles
  the global array, each process providing the rows `process_rows` names for it.
  """
  if par is None:
    return {k: jax.numpy.asarray(v) for k, v in batch.items()}
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, batch_sharding(par.mesh, v.shape, par.rules))
    else:
      shape = (global_batch_size or v.shape[0] * jax.process_count(),) + v.shape[1:]
      sharding = batch_sharding(par.mesh, shape, par.rules)
      out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out


def context(par):
  """(mesh, {axis: size}, the axes still automatic) to shard against here: `par.mesh` outside any
  shard_map; inside one that is manual over some axes (the pipeline's `stage`), the abstract mesh of
  that context with the manual axes at size 1, so that rules naming them leave them out (a nested
  shard_map then names only the automatic axes)."""
  abstract = jax.sharding.get_abstract_mesh()
  manual = set() if abstract.empty else set(abstract.manual_axes)
  free = frozenset(a for a in par.mesh.axis_names if a not in manual)
  if not manual:
    return par.mesh, dict(par.mesh.shape), free
  return abstract, {a: 1 if a in manual else n for a, n in par.mesh.shape.items()}, free


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names), as a tuple."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def splitting(par):
  """context(par), or None where nothing can split an array: no mesh, one device, or every automatic
  axis of size 1 (the helpers below are then the identity)."""
  if par is None or par.mesh.size == 1:
    return None
  mesh, shape, free = context(par)
  return None if math.prod(shape.values()) == 1 else (mesh, shape, free)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], par=None) -> jax.Array:
  """Sharding constraint on an activation by logical axis names, on the mesh of `par` (a
  parallel.mesh.Parallelism); a no-op without one or on a single device."""
  if (where := splitting(par)) is None:
    return x
  mesh, shape, _ = where
  spec = logical_to_spec(tuple(logical_axes), x.shape, shape, par.rules, "activation")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def per_row_block(fn, x: jax.Array, w: jax.Array, par=None, w_axes: Sequence[str | None] | None = None) -> jax.Array:
  """fn(x, w) on each device's block of x's rows, with w whole on every device, the result's rows
  where x's are: for a kernel XLA cannot partition (a Pallas custom call would otherwise get every
  device's whole batch). x's leading dimensions are tokens, [batch, seq, ...] or [tokens, ...], split
  as the batch (and seq) rules say. `w_axes`, w's logical axes: where the mesh axes that split w also
  split the rows (ZeRO-3 over fsdp), w comes in as its shard and is all-gathered here, so that its
  gradient leaves as a reduce-scatter (XLA, gathering it outside, summed the whole gradient on every
  device: an all-reduce of twice the bytes); other axes splitting it are gathered by XLA before."""
  if (where := splitting(par)) is None:
    return fn(x, w)
  mesh, shape, free = where
  names = ("batch", "seq") if x.ndim >= 3 else ("batch",)
  spec = logical_to_spec(names + (None,) * (x.ndim - len(names)), x.shape, shape, par.rules, "activation")
  rows = {a for e in spec for a in axes_of(e)}
  w_spec = P() if w_axes is None else logical_to_spec(tuple(w_axes), w.shape, shape, par.rules, "parameter")
  inside = [e if axes_of(e) and set(axes_of(e)) <= rows else None for e in w_spec]
  inside += [None] * (w.ndim - len(inside))

  def run(x, w):
    for dim, axes in enumerate(inside):
      if axes is not None:
        w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return fn(x, w)

  return jax.shard_map(run, mesh=mesh, in_specs=(spec, P(*inside)), out_specs=spec, axis_names=free,
                       check_vma=False)(x, w)


@jax.custom_vjp
def _reduced_here(w):
  """w; its gradient passes an optimization barrier, so that XLA keeps the reduce-scatter that made it
  where it is: XLA:TPU moved the head's out of the micro-batches' loop, summing the whole weight's
  gradient there in float32 (V3 on v5p-512: a 3.5 GB accumulator, 91.5 GiB a chip)."""
  return w


_reduced_here.defvjp(lambda w: (w, None), lambda _, g: (jax.lax.optimization_barrier(g),))


def tokens_with_weight(fn, x: jax.Array, t: jax.Array, w: jax.Array, par, x_axes: Sequence[str | None],
                       w_axes: Sequence[str | None]):
  """fn(x, t, w, split) on each device's tokens of x [..., features] and t [...] (laid out by `x_axes`),
  w [features, out] laid out by `w_axes`: the mesh axes that split both w's features and the tokens
  are all-gathered here once, so that however many times fn uses w (a loss over chunks of sequences),
  its gradient leaves as one reduce-scatter after fn is done (left to XLA inside a loop, w is gathered
  and its whole gradient summed at every chunk); `out` stays split as it is, over the mesh axes
  `split` that fn reduces over (a vocabulary-parallel loss); other axes splitting w are gathered by
  XLA before. fn(x, t, w, ()) without a mesh; None where a mesh axis splits x's features, or both its
  tokens and w's `out` (the caller's own path then)."""
  if (where := splitting(par)) is None:
    return fn(x, t, w, ())
  mesh, shape, free = where
  x_spec = (tuple(logical_to_spec(tuple(x_axes), x.shape, shape, par.rules, "activation")) + (None,) * x.ndim)[:x.ndim]
  if x_spec[-1] is not None:
    return None
  tokens = {a for e in x_spec for a in axes_of(e)}
  w_in, w_out = (tuple(logical_to_spec(tuple(w_axes), w.shape, shape, par.rules, "parameter")) + (None,) * 2)[:2]
  inside = tuple(a for a in axes_of(w_in) if a in tokens)
  split = axes_of(w_out)
  if tokens & set(split):
    return None

  def run(x, t, w):
    if inside:
      w = jax.lax.all_gather(w, inside, axis=0, tiled=True)
    return fn(x, t, w, split)

  entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
  t_spec = P(*x_spec[:-1])
  x, w = jax.lax.optimization_barrier((x, _reduced_here(w)))  # (w gathered for these tokens, not hoisted out of
  # the micro-batches' loop and held whole through the step: V3 on 4 x v6e-256 32.0 GiB of 31.2)
  return jax.shard_map(run, mesh=mesh, in_specs=(P(*x_spec), t_spec, P(entry(inside), w_out)), out_specs=t_spec,
                       axis_names=free)(x, t, w)


def gather_seq(x: jax.Array, logical_axes: Sequence[str | None], par=None) -> jax.Array:
  """`x` with its "seq" dimension whole on every device: one all-gather over the mesh axes that split
  it (context parallelism), written out so that exactly this array crosses them (XLA's partitioner
  could gather a larger one downstream); the identity where nothing splits it. Its transpose, in the
  backward pass, is a reduce-scatter of the gradient."""
  if (where := splitting(par)) is None:
    return x
  mesh, shape, free = where
  spec = tuple(logical_to_spec(tuple(logical_axes), x.shape, shape, par.rules, "activation"))
  spec += (None,) * (x.ndim - len(spec))
  dim = list(logical_axes).index("seq")
  if spec[dim] is None:
    return x
  whole = P(*(None if i == dim else e for i, e in enumerate(spec)))
  gather = lambda v: jax.lax.all_gather(v, spec[dim], axis=dim, tiled=True)
  # check_vma off: the gathered array is the same on every slice, which the out_specs say and JAX's
  # type check cannot infer from all_gather (the gradients match the one-device run: tests/test_context.py)
  return jax.shard_map(gather, mesh=mesh, in_specs=P(*spec), out_specs=whole, axis_names=free, check_vma=False)(x)


def gather_to(x: jax.Array, logical_axes: Sequence[str | None], target_axes: Sequence[str | None], par=None) -> jax.Array:
  """`x`, laid out by `logical_axes`, re-laid out by `target_axes` where each dimension's target mesh
  axes are a leading part of its current ones (e.g. "batch" -> "head_batch" with vocabulary
  parallelism: the rows of its fsdp peers side by side): one all-gather over the axes dropped, written
  out (XLA's partitioner re-lays such an array out whole on a mesh across slices); its transpose is a
  reduce-scatter. The identity where the layouts agree."""
  if (where := splitting(par)) is None:
    return x
  mesh, shape, free = where
  spec_of = lambda axes: [axes_of(e) for e in
                          tuple(logical_to_spec(tuple(axes), x.shape, shape, par.rules, "activation"))
                          + (None,) * x.ndim][:x.ndim]
  have, want = spec_of(logical_axes), spec_of(target_axes)
  if have == want:
    return x
  entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes

  def gather(v):
    for dim, (h, w) in enumerate(zip(have, want)):
      if h != w:
        if h[:len(w)] != w:
          raise ValueError(f"gather_to: dim {dim} goes from {h} to {w}, not a leading part of it")
        v = jax.lax.all_gather(v, h[len(w):], axis=dim, tiled=True)
    return v

  # check_vma off: the gathered rows are the same on the devices gathered over (as in gather_seq)
  return jax.shard_map(gather, mesh=mesh, in_specs=P(*map(entry, have)), out_specs=P(*map(entry, want)),
                       axis_names=free, check_vma=False)(x)


def check_balanced(seq_len: int, slices: int) -> None:
  """ConfigError (one line, with the sizes that would do) unless `seq_len` splits into 2 x `slices`
  equal chunks (the balanced layout); at config time and, for mesh.context=-1, once the mesh is built."""
  if slices > 1 and seq_len % (2 * slices):
    raise ConfigError(f"seq_len={seq_len} does not split into 2 x mesh.context={slices} equal chunks (the balanced"
                      f" layout): mesh.context={divisors(seq_len // 2) if seq_len % 2 == 0 else 1} would")


def take_seq(x, order: np.ndarray | None, axis: int = 1):
  """x[..., order, ...] along `axis` for a static `order` (NumPy); None: x itself. A gather, except
  inside a shard_map manual over some axes (the pipeline's `stage`), where it is written as slices of
  the order's runs of consecutive indices put side by side (the balanced layout's 2 x slices chunks):
  there XLA's partitioner failed a check on the gather (stage x context x data, on CPU), and outside
  libtpu failed on the slices ("Assigned barrier is not acceptable for opcode: ragged-all-to-all",
  V3 at 32K on v5p-512)."""
  if order is None:
    return x
  order = np.asarray(order)
  abstract = jax.sharding.get_abstract_mesh()
  if abstract.empty or not abstract.manual_axes:
    return jnp.take(x, order, axis=axis)
  cuts = np.flatnonzero(np.diff(order) != 1) + 1
  runs = np.split(order, cuts)
  index = lambda run: (slice(None),) * (axis % x.ndim) + (slice(int(run[0]), int(run[-1]) + 1),)
  return x[index(runs[0])] if len(runs) == 1 else jnp.concatenate([x[index(r)] for r in runs], axis=axis)


def balanced_order(seq_len: int, slices: int) -> np.ndarray | None:
  """The balanced (dual-chunk, zigzag) layout of a sequence over `slices` context slices: the tokens
  cut into 2 x slices chunks, slice i holding chunks i and 2 slices - 1 - i, so that every slice has
  the same causal attention work. [seq_len] original token index at each place; None for one slice."""
  if slices == 1:
    return None
  check_balanced(seq_len, slices)
  chunks = np.arange(seq_len).reshape(2 * slices, seq_len // (2 * slices))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * slices - 1 - i]]) for i in range(slices)])
