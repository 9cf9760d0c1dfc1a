"""train.bench_eval on a small task: the row's structure, and that the in-process JAX backend and lm-eval's
`hf` backend (transformers on the exported folder) give the same accuracy and per-request
log-likelihoods (within 1e-4) and greedy flags. Timings are printed by the benchmark, never tested.
Also JaxLM's shared-prefix path against its padded path on requests that exercise its cases."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from train import bench_eval  # noqa: E402
from train.core import jsonl  # noqa: E402


def test_bench_eval_small_task(tmp_path):
  row = bench_eval.run("configs/tiny.yaml", n=20, repeats=1, batch_size=8, workdir=tmp_path)
  assert row["questions"] == 20 and row["requests"] == 80 and row["repeats"] == 1
  for side in ("ours", "hf"):
    s = row[side]
    assert {"load_s", "first_s", "warm_s", "median_s", "cpu_s", "requests_per_s", "questions_per_s", "acc",
            "backend"} <= set(s)
    assert len(s["warm_s"]) == 1 and 0 <= s["acc"] <= 1
  assert row["threads"]["torch"] == row["threads"]["jax_cpus"] == bench_eval.cpus()
  ours, theirs = row["per_request"]["ours"], row["per_request"]["hf"]
  assert [len(q) for q in ours] == [len(q) for q in theirs] == [4] * 20
  flat = [(a, b) for qa, qb in zip(ours, theirs) for a, b in zip(qa, qb)]
  for (ll, greedy), (ll_hf, greedy_hf) in flat:
    assert ll == pytest.approx(ll_hf, abs=1e-4)
    assert greedy == greedy_hf
  assert len({round(ll, 3) for (ll, _), _ in flat}) > 40  # real numbers, not all alike
  assert row["ours"]["acc"] == row["hf"]["acc"] and row["acc_same"] and row["greedy_same"]
  assert row["max_abs_diff"] < 1e-4 and row["argmax_differs"] == 0
  line = jsonl.dumps({k: v for k, v in row.items() if k != "per_request"})  # what --out gets: strict JSON
  assert "NaN" not in line and "Infinity" not in line


def test_bad_source_is_one_line(tmp_path, capsys):
  assert bench_eval.main([str(tmp_path / "missing.yaml"), "--n", "2"]) == 2
  assert capsys.readouterr().err.count("\n") == 1


def test_shared_prefix_path_equals_padded_path():
  """JaxLM's shared-prefix path (prefixes through moe/decode.py's latent cache, continuations on copies
  of it) against the padded training forward pass, within 1e-4 with the same greedy flags: groups of
  continuations of one context (among them each context's greedy continuation, 1 and 3 tokens), a
  chunk of one-token continuations only, requests truncated differently (each then its own prefix:
  padded), singletons; batch size 2, so that prefixes fall into several chunks."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moe.model import Transformer
  from tests.test_lm_eval import BOS, CFG
  from train.core import lm_eval_adapter
  from train.core.input_pipeline import ByteTokenizer

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray((1.0 if "scale" in str(p) else 0.0) + 0.2 * rng.standard_normal(x.shape), x.dtype),
      state)
  model = nnx.merge(graphdef, state)

  forward = jax.jit(lambda tokens: model(tokens))

  def greedy(ids, n):  # n argmax tokens after the last MAX_LEN of ids (right-padded: one shape, one compile)
    ids = list(ids)
    for _ in range(n):
      row = ids[-CFG.max_position_embeddings:]
      tokens = np.zeros((1, CFG.max_position_embeddings), np.int32)
      tokens[0, :len(row)] = row
      ids.append(int(forward(jnp.asarray(tokens))[0, len(row) - 1].argmax()))
    return ids[-n:]

  enc = lambda s: list(s.encode())
  pairs = []
  for text in ("Q: 1", "Q: 22", "a longer context here", "x" * 70, "y" * 63):  # MAX_LEN 64: the last two truncate
    ctx = [BOS, *enc(text)]
    pairs += [(ctx, enc(x)) for x in (" a", " bb", " ccc dd", "z", "w" * 30)] + [(ctx, greedy(ctx, 3))]
  for text in ("on", "tw"):  # the shortest prefixes: their chunk has one-token continuations only
    ctx = [BOS, *enc(text)]
    pairs += [(ctx, enc("A")), (ctx, greedy(ctx, 1))]
  pairs.append(([BOS, *enc("solo")], enc(" only")))
  shared = lm_eval_adapter.JaxLM(model, ByteTokenizer(), batch_size=2)
  padded = lm_eval_adapter.JaxLM(model, ByteTokenizer(), batch_size=2, share_prefixes=False)
  got, want = shared.score_tokens(pairs), padded.score_tokens(pairs)
  for (g, g_greedy), (w, w_greedy), pair in zip(got, want, pairs, strict=True):
    assert g == pytest.approx(w, abs=1e-4), pair
    assert g_greedy == w_greedy, pair
  assert sum(w for _, w in want) >= 5  # the greedy continuations (the truncated ones may not be)
  assert 0 in shared._widths and len(shared._widths) > 1  # a chunk of one-token continuations, and longer ones
  assert not padded._widths
