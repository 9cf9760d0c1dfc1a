"""The DeepSeek-V3 training objective (report section 2.1.2, 2.2):

  L = CE(main) + (lambda / D) sum_k CE(MTP depth k) + alpha sum_layers L_bal

CE is the mean next-token cross-entropy over real targets, in float32. MTP depth k at position i
predicts t_{i+k+1} = targets[i+k]; it counts only where that target exists, is real, and belongs to
the same document as position i. L_bal is the complementary sequence-wise balance loss of each
MoE layer (moe.router.sequence_balance_loss), summed over layers. (lambda / D) sum_k is written
lambda * mean_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.model import HEAD_ROWS, HeadInput
from moe.mtp import roll_left
from parallel.sharding import take_seq, tokens_with_weight


def token_nll(logits_BxSxV, targets_BxS):
  """-log p(target) per token, float32. `logits` may be a moe.model.HeadInput: then the output head
  runs on one sequence chunk at a time and again in the backward, so that one chunk's logits (and
  their gradient) are held, not the whole sequence's ([batch, seq, vocab] float32: 2 GiB for V3's
  vocabulary and one 4096-token sequence)."""
  if isinstance(logits_BxSxV, HeadInput):
    return token_nlls([logits_BxSxV], [targets_BxS])[0]
  return _nll(logits_BxSxV, targets_BxS, ())


def token_nlls(logits: list, targets: list) -> list:
  """token_nll of each pair; HeadInputs of one head (the main and MTP heads) in one pass over their
  chunks, on each device's tokens with the head's weight gathered once for all of them and its
  gradient, summed over them, reduce-scattered once (parallel.sharding.tokens_with_weight; XLA had
  done both at every chunk of every head, and one pass a head held each head's whole gradient across
  the MTP block). Where the hidden dimension is split over devices, XLA's partitioning of each chunk."""
  first = logits[0]
  if not all(isinstance(x, HeadInput) and x.chunks == first.chunks for x in logits):
    return [token_nll(x, t) for x, t in zip(logits, targets)]
  if first.chunks == 1:
    return [_nll(x.head(x.h_BxSxD), t, ()) for x, t in zip(logits, targets)]
  h_HxBxSxD, t_HxBxS = jnp.stack([x.h_BxSxD for x in logits]), jnp.stack(targets)
  dot = lambda x, w: jnp.dot(x.astype(w.dtype), w)
  nll = tokens_with_weight(_by_chunks(first.chunks, dot), h_HxBxSxD, t_HxBxS, first.weight, first.par,
                           (None, *HEAD_ROWS), first.weight_axes)
  if nll is None:
    nll = jnp.stack([_by_chunks(x.chunks, lambda h, _, x=x: x.head(h))(x.h_BxSxD[None], t[None], None, ())[0]
                     for x, t in zip(logits, targets)])
  return list(nll)


def _nll(logits_BxSxV, targets_BxS, split):
  """-log p(target) from logits whose vocabulary may be split over the mesh axes `split` (inside a
  shard_map: each device holds a contiguous slice, the log-sum-exp and the target's logit summed
  over them, as Megatron's vocabulary-parallel cross-entropy)."""
  logits = logits_BxSxV.astype(jnp.float32)
  if not split:
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
  v = logits.shape[-1]
  top = jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=-1)), split)  # (for range only: no gradient)
  logz = top + jnp.log(jax.lax.psum(jnp.exp(logits - top[..., None]).sum(axis=-1), split))
  local = targets_BxS - jax.lax.axis_index(split) * v
  here = (local >= 0) & (local < v)
  picked = jnp.take_along_axis(logits, jnp.clip(local, 0, v - 1)[..., None], axis=-1)[..., 0]
  return logz - jax.lax.psum(jnp.where(here, picked, 0.0), split)


def _by_chunks(n: int, head):
  """nll(h [heads, batch, seq, hidden], targets, w, split): the loss over n chunks of each sequence,
  each chunk's logits `head`(h chunk, w) computed again in the backward."""
  def nll(h, targets, w, split):
    k, b, s, d = h.shape
    chunked = lambda a: a.reshape(k, b, n, s // n, *a.shape[3:]).swapaxes(1, 2).reshape(k * n, b, s // n, *a.shape[3:])

    @jax.checkpoint
    def chunk(_, xs):
      return None, _nll(head(xs[0], w), xs[1], split)

    _, nll_KNxBxC = jax.lax.scan(chunk, None, (chunked(h), chunked(targets)))
    return nll_KNxBxC.reshape(k, n, b, s // n).swapaxes(1, 2).reshape(k, b, s)
  return nll


def mtp_targets(batch, k: int):
  """(targets, mask) for MTP depth k: targets[i + k] where it continues position i's document."""
  seg = batch["segment_ids"]
  same_doc = roll_left(seg, k, fill=-1) == seg
  mask = roll_left(batch["loss_mask"], k, fill=0) * same_doc
  return roll_left(batch["targets"], k), mask.astype(jnp.float32)


def token_counts(batch, depth: int):
  """Real targets in the whole batch: the normalisers, known before the model runs (so gradient
  accumulation over micro-batches gives exactly the full-batch loss)."""
  counts = {"lm": batch["loss_mask"].astype(jnp.float32).sum()}
  counts["mtp"] = jnp.stack([mtp_targets(batch, k)[1].sum() for k in range(1, depth + 1)]) if depth else jnp.zeros((0,))
  return counts


def micro_batches(batch, n_micro: int):
  """The batch as [n_micro, rows / n_micro, ...], micro-batch m of rows m, m + n_micro, m + 2 n_micro, ...:
  the mesh splits the batch's rows in contiguous blocks of per_device_batch x grad_accum, so each
  device's block gives every micro-batch its own rows and the split moves nothing between devices
  (micro-batches of contiguous rows had XLA reshuffle the whole batch over the mesh each step)."""
  return jax.tree.map(lambda x: x.reshape(-1, n_micro, *x.shape[1:]).swapaxes(0, 1), batch)


def objective(out, batch, counts, n_micro: int, mtp_lambda: float, balance_alpha: float):
  """(L for this micro-batch's share, parts): token sums / whole-batch counts, balance / n_micro. The
  targets laid out as the logits are (`out.order`: context parallelism's balanced layout)."""
  lay = lambda x: take_seq(x, out.order)
  mask = lay(batch["loss_mask"]).astype(jnp.float32)
  depths = [mtp_targets(batch, k) for k in range(1, len(out.mtp_logits) + 1)]
  nll, *mtp_nll = token_nlls([out.logits, *out.mtp_logits], [lay(batch["targets"]), *(lay(t) for t, _ in depths)])
  lm = (nll * mask).sum() / jnp.maximum(counts["lm"], 1.0)
  balance = out.moe_stats.balance_loss.sum() / n_micro if out.moe_stats is not None else jnp.zeros(())
  parts = {"lm_loss": lm, "balance_loss": balance}
  loss = lm + balance_alpha * balance
  if out.mtp_logits:
    per_depth = []
    for k, (nll_k, (_, m)) in enumerate(zip(mtp_nll, depths), start=1):
      per_depth.append((nll_k * lay(m)).sum() / jnp.maximum(counts["mtp"][k - 1], 1.0))
    parts["mtp_loss"] = jnp.stack(per_depth).mean()
    loss = loss + mtp_lambda * parts["mtp_loss"]
  return loss, parts
