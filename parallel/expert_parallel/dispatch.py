"""`dispatch_combine`: the routed experts of one MoE layer on a mesh (the package's entry point)."""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel import eplb, sharding as sharding_lib
from parallel.common.errors import ConfigError
from parallel.expert_parallel.exchange import exchange, in_chunks, in_halves, local, with_fast_path
from parallel.expert_parallel.plan import Plan, dropless_chunks, fast_plan, ranks_per_token

log = logging.getLogger("train")


def ep_size(par, n_experts: int) -> int:
  """Expert-parallel ranks the `n_experts` routed experts split over on `par`'s mesh."""
  if par is None:
    return 1
  spec = sharding_lib.logical_to_spec(("expert",), (n_experts,), dict(par.mesh.shape), dict(par.rules), "experts")
  return math.prod(par.mesh.shape[a] for a in sharding_lib.axes_of(spec[0] if len(spec) else None))


class Layout(NamedTuple):
  """What `dispatch_combine` decides for one shape of MoE layer on a mesh: made once per run (cached
  by `layout`) and logged when first made."""

  mesh: object  # the mesh to shard_map over (abstract inside the pipeline)
  free: frozenset  # its automatic axes, made manual by the shard_map
  weight_specs: tuple  # each weight's spec inside: expert axes first, then tensor-parallel dims
  tok: P  # the tokens' spec: batch, expert and context axes
  token_axes: tuple[str, ...]
  tp_axes: tuple[str, ...]  # the experts' partial outputs summed over these (tensor parallelism)
  plan: Plan | None  # the exchange (None: one expert-parallel rank)
  chunks: int  # consecutive slices of the tokens through the dropless exchange
  n_ep: int  # expert-parallel ranks
  e_local: int  # experts each rank holds
  fast: Plan | None = None  # the fast path's exchange, all tokens at once (mesh.ep_fast_path; None: none)

  def describe(self) -> str:
    if self.plan is None:
      return f"experts on one rank per token group ({'x'.join(self.token_axes)})"
    p = self.plan
    how = "dropless" if p.capacity_factor is None else f"capacity factor {p.capacity_factor}"
    fast = "" if self.fast is None else (
        f"all tokens at once in buffers of {self.fast.receive_rows} rows" + (
            f" ({self.fast.across_rows} across nodes, {self.fast.inside_rows} sent inside)" if p.nodes > 1 else "")
        + " when they hold every rank's, else ")
    return (f"expert-parallel exchange over {'x'.join(p.axes)}={p.n_ep} ({p.transport}, {how},"
            f" {p.nodes} node(s), at most {p.nodes_per_token} a token), {fast}in {self.chunks} chunk(s);"
            f" tokens over {'x'.join(self.token_axes)}" + (f", tensor-parallel over {'x'.join(self.tp_axes)}"
                                                          if self.tp_axes else ""))


@functools.lru_cache(maxsize=None)
def layout(par, mesh, shape_items: tuple, free: frozenset, t: int, k: int, weight_shapes: tuple, weight_axes: tuple,
           routing: tuple | None) -> Layout:
  """The Layout for `t` tokens of top-`k` and the experts' weights (shapes, logical axes) on `par`'s
  mesh as seen here (`sharding_lib.context`: `mesh`, its axis sizes, its automatic axes)."""
  shape, rules = dict(shape_items), dict(par.rules)

  def full_spec(wshape, axes):
    spec = tuple(sharding_lib.logical_to_spec(axes, wshape, shape, rules, "experts"))
    return spec + (None,) * (len(wshape) - len(spec))

  specs = [full_spec(ws, a) for ws, a in zip(weight_shapes, weight_axes)]
  ep_axes = sharding_lib.axes_of(specs[0][0])
  n_ep = math.prod(shape[a] for a in ep_axes)

  # Token axes: the batch axes in the batch's order, plus the expert axes (each EP rank must hold its own
  # tokens), then the axes that split each sequence (context parallelism): [batch * seq] flattened, as
  # the tokens lie.
  batch_axes = [a for a in rules.get("batch", ()) if shape.get(a, 1) > 1 and a not in ep_axes]
  seq_axes = [a for a in rules.get("seq", ()) if shape.get(a, 1) > 1 and a not in ep_axes + tuple(batch_axes)]
  in_batch = [a for a in rules.get("batch", ()) if a in batch_axes or a in ep_axes]
  token_axes = in_batch + [a for a in ep_axes if a not in in_batch] + seq_axes
  if t % n_ep:
    raise ValueError(f"expert parallelism: {t} tokens do not divide over {'x'.join(ep_axes)}={n_ep}")
  while t % math.prod(shape[a] for a in token_axes):
    token_axes.remove(batch_axes.pop())
  # The experts' other dimensions: sharded over the non-token axes (tensor parallelism), whose
  # partial outputs are summed.
  inner = [tuple(tuple(a for a in sharding_lib.axes_of(s) if a not in token_axes) for s in spec[1:]) for spec in specs]
  tp_axes = tuple(dict.fromkeys(a for dims in inner for axes in dims for a in axes))
  ep = ep_axes if ep_axes else None
  weight_specs = tuple(P(ep, *(axes or None for axes in dims)) for dims in inner)
  tok = P(tuple(token_axes) if token_axes else None)

  t_local = t // math.prod(shape[a] for a in token_axes)
  e_local = weight_shapes[0][0] // n_ep
  chunks = dropless_chunks(t_local, k, n_ep, e_local, par.ep_chunks) if par.dropless and n_ep > 1 else 1
  nodes = par.ep_nodes
  if n_ep % nodes:
    raise ConfigError(f"mesh.ep_nodes={nodes} does not divide the {n_ep} expert-parallel ranks"
                      f" ({'x'.join(ep_axes) or 'expert'}={n_ep})")
  plan = None
  if n_ep > 1:
    n_experts, n_group, topk_group = routing or (n_ep * e_local, 1, 1)
    plan = Plan(ep_axes, n_ep, nodes, par.ep_transport, par.capacity_factor,
                ranks_per_token(n_experts, nodes, k, n_group, topk_group))
  if par.ep_overlap and n_ep > 1 and t_local % (2 * chunks):
    raise ConfigError(f"mesh.ep_overlap: the {t_local} tokens of each expert-parallel rank do not split into"
                      f" {chunks} chunk(s) of two halves")
  fast = None
  if plan is not None and par.ep_fast_path:
    # (with mesh.ep_overlap each half of the tokens is exchanged on its own, in buffers for half of them)
    halves = 2 if par.ep_overlap else 1
    fast = fast_plan(plan, t_local // halves, k, e_local, par.ep_fast_path)
  out = Layout(mesh, free, weight_specs, tok, tuple(token_axes), tp_axes, plan, chunks, n_ep, e_local, fast)
  log.info("MoE layer of %d tokens: %s", t, out.describe())
  return out


def dispatch_combine(x_TxD, idx_TxK, w_TxK, weights: Sequence[jax.Array], weight_axes: Sequence[tuple],
                     expert_fn: Callable, par=None, routing: tuple[int, int, int] | None = None,
                     copies: jax.Array | None = None, keep_exchanged: bool = False):
  """Routed experts of one MoE layer: (y [T, D] = sum_k w[t, k] expert_{idx[t, k]}(x[t]), dropped
  assignments [] int32, fallbacks [] int32: 1 where the dropless exchange's fast path (mesh.ep_fast_path)
  could not hold the layer's tokens and the chunks ran, else 0).

  weights: the experts' stacked parameters, [E, ...] each, with logical axes `weight_axes` (the first
  "expert"; a None dimension is gathered whole inside). expert_fn(rows [R, D], local expert [R],
  *local weights, group_sizes=None) -> [R, D]: the expert FFN of each row, whose local expert id E_l
  (the number of local experts) marks an empty row (its output and gradient undefined: never used);
  `group_sizes` [E_l], where given: the rows are already sorted by expert, that many of each from the
  first row (the ragged exchange's), so that a kernel that sorts them need not. par: a
  parallel.mesh.Parallelism, or None (one device).
  routing: (logical experts, n_group, topk_group) of device-limited routing, which bounds the nodes a
  token reaches in the two-level dispatch (None: no limit). copies: redundant experts
  (mesh.redundant_experts), (slots [R], copy weights): the logical expert held by each redundant
  slot (parallel/eplb.py) and its weights [R, ...] (`make_copies` of `weights`, with their
  `weight_axes`), R = n_ep * r_l; each assignment goes to one copy of its expert
  (eplb.physical_ids), and nothing moves the weights here. Ignored without expert parallelism. keep_exchanged:
  the backward of chunked dropless exchanges keeps their rows rather than exchanging again (in_chunks).
  """
  if (where := sharding_lib.splitting(par)) is None:
    return *local(x_TxD, idx_TxK, w_TxK, *weights, expert_fn=expert_fn), jnp.zeros((), jnp.int32)
  mesh, shape, free = where  # (inside the pipeline, `stage` is already manual)
  lay = layout(par, mesh, tuple(shape.items()), free, x_TxD.shape[0], idx_TxK.shape[1],
               tuple(w.shape for w in weights), tuple(weight_axes), routing)

  def local_fn(rows, expert, *ws, **sorted_rows):
    y = expert_fn(rows, expert, *ws, **sorted_rows)
    return jax.lax.psum(y, lay.tp_axes) if lay.tp_axes else y

  if lay.plan is None:
    fn = functools.partial(local, expert_fn=local_fn)
  else:
    fn = functools.partial(exchange, expert_fn=local_fn, plan=lay.plan)
  if par.ep_overlap and lay.plan is not None:
    fn = in_halves(fn)
  chunks, token_axes, weight_specs, tok = lay.chunks, lay.token_axes, lay.weight_specs, lay.tok
  n_ep, e_local = lay.n_ep, lay.e_local
  fn = in_chunks(fn, chunks, keep_exchanged)
  if lay.fast is None:
    chunked = fn
    fn = lambda *args: (*chunked(*args), jnp.zeros((), jnp.int32))  # (no fast path: nothing falls back)
  else:
    fast = functools.partial(exchange, expert_fn=local_fn, plan=lay.fast)
    fn = with_fast_path(in_halves(fast) if par.ep_overlap else fast, fn, lay.fast, tuple(token_axes),
                        parts=2 if par.ep_overlap else 1)
  slots, copy_weights = (None, ()) if copies is None or n_ep == 1 else copies

  def body(x, idx, w, slots_R, *ws):
    if slots_R is not None:  # this rank's copies follow its own experts
      k = len(ws) // 2
      ws = [jnp.concatenate([a, c.astype(a.dtype)]) for a, c in zip(ws[:k], ws[k:])]
      idx = eplb.physical_ids(idx, slots_R, n_ep * e_local, n_ep)
    y, dropped, fallbacks = fn(x, idx, w, *ws)  # (fallbacks: the same on every device, a pmax decided it)
    return y, jax.lax.psum(dropped, tuple(token_axes)) if token_axes else dropped, fallbacks

  # check_vma off: a Pallas kernel (impl.experts=megablox) declares its outputs without the axes they
  # vary over, which JAX's check refuses inside shard_map; the exchange's gradients are checked against
  # one device by the expert-parallel tests.
  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P(), *weight_specs, *weight_specs[:len(copy_weights)]),
                       out_specs=(tok, P(), P()), axis_names=free, check_vma=False)(
      x_TxD, idx_TxK, w_TxK, slots, *weights, *copy_weights)
