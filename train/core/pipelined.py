"""The training objective and its gradients through the pipeline, when the mesh has stages.

Where each part runs (parallel/pipeline.py has the mechanics):
  embedding and the first dense layers  as a micro-batch enters the first stage, every stage computing
                                        a 1/N block of its rows (the stage axis carries data there, as
                                        in MaxText), gathered to the first stage; the backward likewise
  MoE layers                            pipelined: the stack's slots split over `stage`, EP / FSDP / TP
                                        inside each stage
  final norm, head, MTP, loss           after the last stage, folded into the last chunk's backward, so
                                        that a 1F1B backward starts as soon as a micro-batch leaves the
                                        last MoE layer; again every stage takes a 1/N block of the rows
                                        (DeepSeek put the embedding on the first and the head + MTP on the
                                        last stage; splitting them over all stages keeps them off the
                                        critical stage and keeps the control flow the same everywhere)
The non-pipelined weights are sharded over `stage` too (parallel/sharding.py) and gathered for the step.

`Pipelined.run` gives what `jax.value_and_grad` of the unpipelined objective gives (train/core/
step.py). Micro-batch m's loss is its share of the whole batch's (token sums over the whole batch's
counts; the balance loss over grad_accum x microbatches), so the sum over micro-batches is the
full-batch loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import experts as experts_lib
from moe import layers as layers_lib
from moe import model as model_lib
from parallel import pipeline
from parallel import sharding as sharding_lib
from parallel.common.errors import ConfigError, divisors
from train.core import loss as loss_lib

STACK = "moe_layers"


def split_stack(tree):
  """(tree without the MoE stack, the stack's `layers` state; empty when it has none, e.g. the rest of
  a model without router biases)."""
  stack = tree[STACK]["layers"] if STACK in tree else nnx.State({})
  return nnx.State({k: v for k, v in tree.items() if k != STACK}), stack


def _key(path) -> tuple:
  """A pytree path as plain strings, the same for a State of arrays and one of Variables (whose leaves'
  paths end in ".value"), and for a module's path plus its attribute's name."""
  key = tuple(str(getattr(k, "key", k)) for k in path)
  return key[:-1] if key[-1:] == (".value",) else key


def join_stack(like, other, stack):
  """The tree of `like` (the params) from the parts `split_stack` made of such a tree."""
  leaves = {_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(other)}
  leaves.update({(STACK, "layers") + _key(p): x for p, x in jax.tree_util.tree_leaves_with_path(stack)})
  return jax.tree_util.tree_map_with_path(lambda p, _: leaves[_key(p)], like)


def _shardings(state, par, drop: str | None = None) -> dict:
  """{path: NamedSharding} of the parameters in `state` laid out as the rules say, whole over the mesh
  axis `drop` (fsdp: pipeline.gather_once)."""
  rules = tuple((k, tuple(a for a in v if a != drop)) for k, v in par.rules)
  shardings = sharding_lib.state_shardings(state, par.mesh, rules)
  leaves = jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  return {_key(p): s for p, s in leaves}


def _compute_dtypes(module) -> dict:
  """{path: dtype} of the module's matrices that are only ever used cast to the compute dtype: the routed
  experts' weights (moe/experts.py) and the projections' kernels (moe/layers.py: Linear), so that their
  cast copies are what the pipeline gathers (the router's kernel stays float32, the embedding table too:
  its gradient is a scatter-add, kept in float32)."""
  names = lambda m: ("gate_proj", "up_proj", "down_proj") if isinstance(m, experts_lib.RoutedExperts) else (
      ("kernel",) if isinstance(m, layers_lib.Linear) else ())
  return {_key(path) + (name,): m.dtype for path, m in nnx.iter_modules(module) for name in names(m)}


def _compute_copies(tree, own: dict, dtypes: dict):
  """`tree` with its leaves in `dtypes` cast, each where its shard lies (`own`), so that what is gathered
  from them is the cast copy: cast in one go, XLA:GPU gathered the float32 weights and cast them after.
  Their gradients come back in the cast dtype, summed in float32 (parallel/pipeline.py)."""
  def one(p, x):
    k = _key(p)
    return jax.lax.with_sharding_constraint(x.astype(dtypes[k]), own[k]) if k in dtypes else x
  return jax.tree_util.tree_map_with_path(one, tree)


def _constrain(tree, shardings: dict):
  return jax.tree_util.tree_map_with_path(lambda p, x: jax.lax.with_sharding_constraint(x, shardings[_key(p)]), tree)


def schedule(par, rows: int, kind: str | None = None) -> pipeline.Schedule:
  """The schedule of `par.pipeline` for `rows` sequences per pipeline run (one grad-accumulation
  micro-batch); `kind` overrides the schedule (evaluation runs forwards only: gpipe)."""
  m = par.pipeline.microbatches or par.stages
  if rows % m:
    raise ConfigError(f"pipeline.microbatches={m} must divide the {rows} sequences of each step's micro-batch"
                      f" (batch_size / grad_accum): {divisors(rows)}")
  return pipeline.make_schedule(kind or par.pipeline.schedule, par.stages, m, par.pipeline.repeats)


def outer_functions(other_graph, mtp_lambda: float, balance_alpha: float, with_mtp: bool, n_total: int,
                    defer_head: bool = False):
  """(first_fn, last_fn): the model around its MoE stack (`other_graph`: the model without it, split
  into Params and the rest) on one micro-batch `mb` of `n_total` (the whole batch's loss is their sum).
  first_fn(q, qc, mb) -> (the MoE stack's input, what the dense layers sowed): embedding and dense
  layers; last_fn(q, qc, y, mb, blocks) -> (loss, {"parts", "stats": the MTP blocks' MoEStats}, what
  the MTP sowed) on one of `blocks` row blocks of the micro-batch: norm, head, MTP and the objective
  (without the stack's balance loss, which its caller adds); `defer_head`: the loss computes the
  logits a sequence chunk at a time (moe/model.py: Transformer.defer_head). `qc`: {"rest": the rest of the model,
  "counts": the whole batch's token counts}. With context parallelism everything runs on the balanced
  layout (moe/model.py: laid_out), the loss's targets laid out as the logits are."""
  def first_fn(q, qc, mb):
    model = nnx.merge(other_graph, q, qc["rest"])
    _, tokens, inner, _ = model.laid_out(mb["tokens"], mb["segment_ids"], mb["positions"])
    h = model.bottom(tokens, inner)[0]
    return h, nnx.pop(model, nnx.Intermediate)  # (the dense layers' max logits, with QK-clip)

  def last_fn(q, qc, y, mb, blocks=1):
    model = nnx.merge(other_graph, q, qc["rest"])
    model.defer_head = defer_head
    ctx, _, inner, order = model.laid_out(mb["tokens"], mb["segment_ids"], mb["positions"])
    logits, mtp_logits, mtp_stats = model.top(y, mb["tokens"], ctx, with_mtp, inner, order)
    stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *mtp_stats) if mtp_stats else None
    out = model_lib.ModelOutput(logits, mtp_logits, stats, order)
    loss, parts = loss_lib.objective(out, mb, qc["counts"], n_total * blocks, mtp_lambda, balance_alpha)
    if stats is not None:  # (a balance loss is a mean over a block's sequences)
      stats = stats._replace(balance_loss=stats.balance_loss / blocks)
    return loss, {"parts": parts, "stats": stats}, nnx.pop(model, nnx.Intermediate)  # (MTP's max logits)

  return first_fn, last_fn


class Pipelined:
  """The objective of the model `graphdef` (built with a stage > 1 Runtime) through `sched`."""

  def __init__(self, graphdef, params, rest, par, sched: pipeline.Schedule, mtp_lambda: float,
               balance_alpha: float, with_mtp: bool = True, max_logits: bool = False):
    model = nnx.merge(graphdef, params, rest)
    if max_logits:  # each MLA module leaves its max_logit (moe/mla.py), for QK-clip
      model.set_attributes(keep_max_logit=True)
    self.cfg, self.layout, self.apply = model.cfg, model.layout, model.moe_layers.apply
    layers = model.moe_layers.layers
    self.stack_copies, self.gathered = None, None
    if par.pipeline.gather_once:  # the stage's weights come whole over fsdp, its matrices as their bf16 copies
      state = nnx.state(layers, nnx.Param)
      self.stack_copies, self.gathered = (_shardings(state, par), _compute_dtypes(layers)), _shardings(state, par, "fsdp")
      for _, m in nnx.iter_modules(layers):
        if isinstance(m, experts_lib.RoutedExperts):
          m.gathered = True
    self.layer_graph = nnx.split(layers, nnx.Param, ...)[0]
    model.moe_layers = None
    # the weights outside the stack come whole over `stage`, their matrices as their bf16 copies
    self.other_copies = (_shardings(nnx.state(model, nnx.Param), par), _compute_dtypes(model))
    self.other_graph = nnx.split(model, nnx.Param, ...)[0]
    self.par, self.sched = par, sched
    self.lam, self.alpha, self.with_mtp = mtp_lambda, balance_alpha, with_mtp

  def _functions(self, n_total: int):
    first_fn, last_fn = outer_functions(self.other_graph, self.lam, self.alpha, self.with_mtp, n_total)

    def stage_fn(p, c, x, mb):
      _, _, ctx, _ = model_lib.laid_out(self.cfg, self.par, mb["tokens"], mb["segment_ids"], mb["positions"])
      h, stats, _, sown = self.apply(self.layer_graph, (p, c["rest"]), x, ctx.cos_sin, ctx.mask, ctx.valid,
                                     active_L=c["active"])
      return h, self.alpha * stats.balance_loss.sum() / n_total, stats, sown

    return first_fn, stage_fn, last_fn

  def _micro_batches(self, batch, m: int):
    """[rows, ...] -> [m, rows / m, ...], each micro-batch's rows over the batch axes but `stage` (every
    stage reads whole micro-batches). Reshaping rows sharded over stage x data instead left XLA's
    partitioner to rematerialise every input array ("Involuntary full rematerialization", logged
    once per array). Contiguous rows, unlike loss.micro_batches: with every stage reading whole
    micro-batches, the strided split compiled to more token-array collectives (13 against 9 on a tiny
    stage=2 x data=2 step on v5p-8)."""
    rules = tuple((k, tuple(a for a in v if a != pipeline.AXIS)) if k == "batch" else (k, v)
                  for k, v in self.par.rules)

    def split(x):
      y = x.reshape(m, -1, *x.shape[1:])
      spec = sharding_lib.batch_sharding(self.par.mesh, y.shape[1:], rules).spec
      return jax.lax.with_sharding_constraint(y, NamedSharding(self.par.mesh, P(None, *spec)))

    return jax.tree.map(split, batch)

  def run(self, params, rest, batch, counts, n_micro: int, train: bool = True):
    """(loss, parts, load [slots + MTP blocks, E] in the stack's slot order, exchanged (as model_grad's),
    grads or None, max logits): the max logits as model_grad's (train/core/step.py), the stack's [slots, heads] in
    slot order, -inf in padding slots (empty without `max_logits`)."""
    p_other, p_master = split_stack(params)
    r_other, r_stack = split_stack(rest)
    m = self.sched.microbatches
    n_total = n_micro * m

    mb = self._micro_batches(batch, m)
    first_fn, stage_fn, last_fn = self._functions(n_total)
    consts = {"rest": r_stack, "active": jnp.asarray(self.layout.slot_layer() >= 0)}
    p_stack = p_master
    if self.gathered is not None:  # pipeline.gather_once: one all-gather here, not one per tick
      p_stack = _constrain(_compute_copies(p_master, *self.stack_copies), self.gathered)
    loss, g_stack, g_other, stats, aux, peaks = pipeline.run(
        self.sched, self.par.mesh, self.layout.per_chunk, first_fn, stage_fn, last_fn, p_stack, consts,
        _compute_copies(p_other, *self.other_copies), {"rest": r_other, "counts": counts}, mb, train=train)
    like = lambda g, p: g.astype(p.dtype)  # (summed in float32)
    g_stack, g_other = jax.tree.map(like, g_stack, p_master), jax.tree.map(like, g_other, p_other)
    parts, extra = dict(aux["parts"]), aux["stats"]
    both = [stats] if extra is None else [stats, extra]
    parts["balance_loss"] = sum(s.balance_loss.sum() for s in both) / n_total
    load = jnp.concatenate([s.load for s in both])
    exchanged = experts_lib.exchange_counts(both)
    max_logits = nnx.State({**peaks["first"], **peaks["last"]})
    if len(peaks["stack"]):
      max_logits[STACK] = nnx.State({"layers": peaks["stack"]})
    return loss, parts, load, exchanged, join_stack(params, g_other, g_stack) if train else None, max_logits


def in_layer_order(max_logits, layout: pipeline.Layout):
  """`max_logits` of `Pipelined.run` with the stack's rows in layer order (padding slots dropped)."""
  if STACK not in max_logits:
    return max_logits
  out = nnx.State(dict(max_logits))
  out[STACK] = jax.tree.map(lambda v: v[layout.layer_slot()], max_logits[STACK])
  return out
