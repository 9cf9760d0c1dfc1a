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

from moe.model import HeadInput
from moe.mtp import roll_left
from parallel.sharding import take_seq


def token_nll(logits_BxSxV, targets_BxS):
  """-log p(target) per token, float32. `logits` may be a moe.model.HeadInput: then the output head
  runs on one sequence chunk at a time and again in the backward, so that one chunk's logits (and
  their gradient) are held, not the whole sequence's ([batch, seq, vocab] float32: 2 GiB for V3's
  vocabulary and one 4096-token sequence)."""
  if isinstance(logits_BxSxV, HeadInput):
    return _chunked_nll(logits_BxSxV, targets_BxS)
  logits = logits_BxSxV.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
  return logz - picked


def _chunked_nll(deferred: HeadInput, targets_BxS):
  h, n = deferred.h_BxSxD, deferred.chunks
  if n == 1:
    return token_nll(deferred.head(h), targets_BxS)
  b, s, d = h.shape
  h_NxBxCxD = h.reshape(b, n, s // n, d).swapaxes(0, 1)
  t_NxBxC = targets_BxS.reshape(b, n, s // n).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(_, xs):
    return None, token_nll(deferred.head(xs[0]), xs[1])

  _, nll_NxBxC = jax.lax.scan(chunk, None, (h_NxBxCxD, t_NxBxC))
  return nll_NxBxC.swapaxes(0, 1).reshape(b, s)


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
  lm = (token_nll(out.logits, lay(batch["targets"])) * mask).sum() / jnp.maximum(counts["lm"], 1.0)
  balance = out.moe_stats.balance_loss.sum() / n_micro if out.moe_stats is not None else jnp.zeros(())
  parts = {"lm_loss": lm, "balance_loss": balance}
  loss = lm + balance_alpha * balance
  if out.mtp_logits:
    per_depth = []
    for k, logits in enumerate(out.mtp_logits, start=1):
      targets, m = mtp_targets(batch, k)
      per_depth.append((token_nll(logits, lay(targets)) * lay(m)).sum() / jnp.maximum(counts["mtp"][k - 1], 1.0))
    parts["mtp_loss"] = jnp.stack(per_depth).mean()
    loss = loss + mtp_lambda * parts["mtp_loss"]
  return loss, parts
