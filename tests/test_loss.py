"""train.loss: the V3 objective against hand-computed float64 NumPy values on tiny random logits."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.core import loss as loss_lib

B, S, V = 2, 6, 5
LAM, ALPHA = 0.3, 1e-2


class FakeStats(NamedTuple):
  balance_loss: jax.Array  # [L]


class FakeOut(NamedTuple):
  logits: jax.Array
  mtp_logits: tuple
  moe_stats: FakeStats | None
  order: np.ndarray | None = None


# Row 0: two documents in a row, then one padding position. Row 1: a document (the tail of a split
# one) followed by a second that runs to the end of the row.
SEG = np.array([[1, 1, 1, 2, 2, 0],
                [1, 1, 2, 2, 2, 2]], np.int32)
LOSS_MASK = (SEG > 0).astype(np.float32)
# MTP depth k at i counts iff targets[i + k] exists, is real and is in i's document (by hand).
MTP_MASK = {
    1: np.array([[1, 1, 0, 1, 0, 0],
                 [1, 0, 1, 1, 1, 0]], np.float32),
    2: np.array([[1, 0, 0, 0, 0, 0],
                 [0, 0, 1, 1, 0, 0]], np.float32),
}


def make_batch(rng):
  targets = rng.integers(0, V, (B, S)).astype(np.int32)
  targets[SEG == 0] = V - 1  # padding id
  positions = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]], np.int32)
  return {"tokens": rng.integers(0, V, (B, S)).astype(np.int32), "targets": targets, "segment_ids": SEG,
          "positions": positions, "loss_mask": LOSS_MASK}


def nll64(logits, targets):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  return logz - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def shifted(targets, k):
  return np.concatenate([targets[:, k:], np.zeros_like(targets[:, :k])], axis=1)


@pytest.fixture
def case():
  rng = np.random.default_rng(0)
  batch = make_batch(rng)
  out = FakeOut(logits=jnp.asarray(rng.standard_normal((B, S, V)) * 2, jnp.float32),
                mtp_logits=tuple(jnp.asarray(rng.standard_normal((B, S, V)) * 2, jnp.float32) for _ in range(2)),
                moe_stats=FakeStats(jnp.asarray([1.25, 0.75, 1.5], jnp.float32)))
  return batch, out


def expected(batch, out):
  """(total, lm, mtp per depth) in float64 NumPy."""
  lm = (nll64(out.logits, batch["targets"]) * LOSS_MASK).sum() / LOSS_MASK.sum()
  mtp = []
  for k, logits in enumerate(out.mtp_logits, start=1):
    m = MTP_MASK[k]
    mtp.append((nll64(logits, shifted(batch["targets"], k)) * m).sum() / m.sum())
  bal = float(np.sum(np.asarray(out.moe_stats.balance_loss, np.float64)))
  return lm + LAM * np.mean(mtp) + ALPHA * bal, lm, mtp, bal


def test_mtp_targets_mask_by_hand():
  rng = np.random.default_rng(1)
  batch = make_batch(rng)
  for k in (1, 2):
    targets, mask = loss_lib.mtp_targets(batch, k)
    np.testing.assert_array_equal(np.asarray(mask), MTP_MASK[k])
    m = MTP_MASK[k] > 0
    np.testing.assert_array_equal(np.asarray(targets)[m], shifted(batch["targets"], k)[m])
    np.testing.assert_array_equal(np.asarray(targets)[:, :S - k], batch["targets"][:, k:])


def test_token_counts():
  batch = make_batch(np.random.default_rng(2))
  c = loss_lib.token_counts(batch, 2)
  assert float(c["lm"]) == 11.0
  np.testing.assert_array_equal(np.asarray(c["mtp"]), [MTP_MASK[1].sum(), MTP_MASK[2].sum()])
  np.testing.assert_array_equal(np.asarray(c["mtp"]), [7.0, 3.0])
  assert loss_lib.token_counts(batch, 0)["mtp"].shape == (0,)


def test_token_nll_float64():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((B, S, V)) * 3
  targets = rng.integers(0, V, (B, S))
  got = loss_lib.token_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss_lib.token_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))),
                             nll64(logits, targets), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_objective_matches_numpy(case, depth):
  batch, out = case
  out = out._replace(mtp_logits=out.mtp_logits[:depth])
  counts = loss_lib.token_counts(batch, depth)
  loss, parts = loss_lib.objective(out, batch, counts, 1, LAM, ALPHA)
  total, lm, mtp, bal = expected(batch, out)
  assert len(mtp) == depth
  np.testing.assert_allclose(float(parts["lm_loss"]), lm, rtol=1e-6)
  np.testing.assert_allclose(float(parts["mtp_loss"]), np.mean(mtp), rtol=1e-6)
  np.testing.assert_allclose(float(parts["balance_loss"]), bal, rtol=1e-6)
  np.testing.assert_allclose(float(loss), total, rtol=1e-6)


def test_objective_without_mtp_or_moe(case):
  batch, out = case
  out = out._replace(mtp_logits=(), moe_stats=None)
  loss, parts = loss_lib.objective(out, batch, loss_lib.token_counts(batch, 0), 1, LAM, ALPHA)
  lm = (nll64(out.logits, batch["targets"]) * LOSS_MASK).sum() / LOSS_MASK.sum()
  assert "mtp_loss" not in parts and float(parts["balance_loss"]) == 0.0
  np.testing.assert_allclose(float(loss), lm, rtol=1e-6)


def test_micro_batches_sum_to_full_batch(case):
  """Each micro-batch (one row) normalised by the whole batch's counts, balance / n_micro: the
  micro-batch objectives and parts sum to the full-batch ones."""
  batch, out = case
  counts = loss_lib.token_counts(batch, 2)
  micro_bal = [jnp.asarray([1.0, 0.5, 2.0]), jnp.asarray([1.5, 1.0, 1.0])]
  full_out = out._replace(moe_stats=FakeStats((micro_bal[0] + micro_bal[1]) / 2))  # mean over sequences
  full_loss, full_parts = loss_lib.objective(full_out, batch, counts, 1, LAM, ALPHA)
  total, parts_sum = 0.0, {}
  for r in range(B):
    mb = {k: v[r:r + 1] for k, v in batch.items()}
    mo = FakeOut(out.logits[r:r + 1], tuple(x[r:r + 1] for x in out.mtp_logits), FakeStats(micro_bal[r]))
    loss, parts = loss_lib.objective(mo, mb, counts, B, LAM, ALPHA)
    total += float(loss)
    for k, v in parts.items():
      parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
  np.testing.assert_allclose(total, float(full_loss), rtol=1e-6)
  for k, v in full_parts.items():
    np.testing.assert_allclose(parts_sum[k], float(v), rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(float(full_loss), expected(batch, full_out)[0], rtol=1e-6)


def test_objective_on_a_permuted_layout(case):
  """Logits on another layout of the sequence (context parallelism's balanced one: `order` [S], each
  place's original index): the objective lays the targets and masks out the same way, so it equals
  the in-order objective, MTP depths included."""
  batch, out = case
  order = np.random.default_rng(7).permutation(S)
  laid = out._replace(logits=out.logits[:, order], mtp_logits=tuple(x[:, order] for x in out.mtp_logits),
                      order=order)
  counts = loss_lib.token_counts(batch, 2)
  want, want_parts = loss_lib.objective(out, batch, counts, 1, LAM, ALPHA)
  got, got_parts = loss_lib.objective(laid, batch, counts, 1, LAM, ALPHA)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  for k in want_parts:
    assert float(got_parts[k]) == pytest.approx(float(want_parts[k]), rel=1e-6), k
  assert float(want) == pytest.approx(expected(batch, out)[0], rel=1e-5)
