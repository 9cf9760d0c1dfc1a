"""Context parallelism (mesh.context, issue 25's first slice): config errors in process, and one
training step of the tiny model on 8 simulated devices against the one-device step
(tests/context_worker.py, one subprocess for every mesh).

The layers run on the balanced layout (each slice holds chunks i and 2c-1-i). The batch packs
several documents per row whose edges fall inside and across the context slices, with padding; MTP (one token ahead across slice edges), group-limited routing and the sequence-wise balance
loss are on. float32: the loss within 1e-6 relative and each updated parameter within 1e-6 of the
update's L2 norm.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from moe.runtime import ImplConfig, Runtime
from parallel import mesh as mesh_lib
from parallel.common.errors import ConfigError
from parallel.mesh import MeshConfig
from tests.processes import TINY, cpu_env, last_json, run_together
from train.core.train_config import load_train_config

WORKER = Path(__file__).with_name("context_worker.py")
ROOT = WORKER.parent.parent


def tiny(*over):
  return load_train_config(ROOT / "configs/tiny.yaml", TINY + list(over))


# ------------------------------------------------------------------ in process (one device)
def test_context_is_a_mesh_axis_that_splits_the_sequence():
  assert mesh_lib.axis_sizes(MeshConfig(context=2, fsdp=2), 8) == dict(stage=1, data=2, fsdp=2, context=2,
                                                                        expert=1, tensor=1)
  from parallel import sharding
  spec = sharding.logical_to_spec(("batch", "seq", "embed"), (8, 16, 32), dict(data=2, fsdp=2, context=2))
  assert tuple(spec) == (("data", "fsdp"), "context")
  # parameters' hidden dimension is split over it after fsdp (ZeRO-3 over fsdp x context)
  assert sharding.logical_to_spec(("embed", "heads"), (32, 16), dict(context=2)) == sharding.P("context")
  assert sharding.logical_to_spec(("embed", "heads"), (32, 16), dict(fsdp=2, context=2)) == sharding.P(("fsdp", "context"))
  assert tiny("mesh.context=4").mesh.context == 4


def test_balanced_layout_and_its_mask():
  """context=2: chunks (0, 3 | 1, 2) of 2 tokens; the mask of the permuted tokens, causal by their
  original index, is the in-order mask permuted."""
  import jax.numpy as jnp
  import numpy as np
  from moe import mla
  from parallel.sharding import balanced_order

  order = balanced_order(8, 2)
  np.testing.assert_array_equal(order, [0, 1, 6, 7, 2, 3, 4, 5])
  assert balanced_order(8, 1) is None
  with pytest.raises(ConfigError, match=r"^seq_len=12 does not split into 2 x mesh.context=4 equal chunks"):
    balanced_order(12, 4)  # (mesh.context=-1: known only when the mesh is built)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  want = np.asarray(mla.attention_mask(seg))[:, :, order][:, :, :, order]
  np.testing.assert_array_equal(np.asarray(mla.attention_mask(seg[:, order], order)), want)


def test_config_errors_are_one_line():
  with pytest.raises(ConfigError, match=r"^seq_len=16 does not split into 2 x mesh.context=3 equal chunks \(the balanced"
                                        r" layout\): mesh.context=1, 2, 4 or 8 would$"):
    tiny("mesh.context=3")
  with pytest.raises(ConfigError, match=r"^seq_len=24 does not split into 2 x mesh.context=8 .*=1, 2, 3, 4, 6 or 12 would$"):
    tiny("mesh.context=8", "seq_len=24")
  with pytest.raises(ConfigError, match=r"^mesh.context=0 must be >= 1 or -1$"):
    MeshConfig(context=0)


def test_context_parallel_attention_is_the_latent_block_core():
  """With mesh.context > 1 `auto` picks the latent-block core (each slice's queries against key blocks
  of the gathered latent), `fused` also runs there; the kernels that assume the whole sequence on a
  device are refused in one line, and the latent core without context too."""
  import jax
  import numpy as np

  two = SimpleNamespace(context=2, mesh=SimpleNamespace(devices=np.asarray(jax.devices())),
                        context_attention="all_gather")  # what resolve reads
  assert Runtime.resolve(ImplConfig(), par=two, announce=False).attention == "latent"
  assert Runtime.resolve(ImplConfig(attention="fused"), par=two, announce=False).attention == "fused"
  with pytest.raises(ConfigError, match=r"^impl.attention=splash with mesh.context=2: .* set impl.attention=auto,"
                                        r" latent or fused$"):
    Runtime.resolve(ImplConfig(attention="splash"), par=two, announce=False)
  with pytest.raises(ConfigError, match=r"^impl.attention=latent is context-parallel attention: it needs"):
    Runtime.resolve(ImplConfig(attention="latent"), announce=False)
  ring = SimpleNamespace(**{**vars(two), "context_attention": "ring"})
  assert Runtime.resolve(ImplConfig(), par=ring, announce=False).attention == "ring"
  with pytest.raises(ConfigError, match=r"^impl.attention=fused with mesh.context_attention=ring: .* set"
                                        r" impl.attention=auto$"):
    Runtime.resolve(ImplConfig(attention="fused"), par=ring, announce=False)
  with pytest.raises(ConfigError, match=r"^mesh.context_attention: expected one of 'all_gather', 'ring', got str 'rings'"):
    tiny("mesh.context=2", "mesh.context_attention=rings")


def test_ring_without_context_says_it_has_no_effect(caplog):
  import jax

  with caplog.at_level("WARNING", logger="parallel"):
    mesh_lib.Parallelism.from_config(MeshConfig(data=1, context_attention="ring"), jax.devices()[:1])
  assert "mesh.context_attention=ring has no effect: each sequence is whole on a device (mesh.context=1)" in caplog.text


@pytest.mark.parametrize("c", [1, 2, 3, 4, 8])
def test_ring_tiles_cover_every_visible_pair_once_and_balance_the_work(c):
  """moe.kernels.ring_attention.tiles on the balanced layout, 5 tokens a chunk: every causally visible
  (query, key) pair lies in exactly one computed tile, each slice computes 2c + 1 tiles, and each
  slice's visible pairs (its useful work) are the same (the causal mask: no balance within 5% needed,
  they are equal)."""
  import numpy as np
  from moe.kernels.ring_attention import tiles
  from parallel.sharding import balanced_order

  chunk = 5
  order = np.arange(2 * chunk) if c == 1 else balanced_order(2 * c * chunk, c)
  places = order.reshape(c, 2, chunk)  # [slice, its chunk, token]: original index
  covered = np.zeros((2 * c * chunk,) * 2, int)
  useful = []
  for i in range(c):
    pairs = 0
    for j in range(c):
      for x, y in tiles(i, j):
        q, k = places[i, x][:, None], places[j, y][None, :]
        covered[q, k] += 1
        pairs += int((k <= q).sum())
    assert sum(len(tiles(i, j)) for j in range(c)) == 2 * c + 1
    useful.append(pairs)
  visible = np.tril(np.ones_like(covered, bool))
  assert (covered[visible] == 1).all()  # every visible pair once (hidden pairs may be in a tile: masked)
  assert len(set(useful)) == 1 and sum(useful) == visible.sum()


# ------------------------------------------------------------------ 8 simulated devices
@pytest.fixture(scope="module")
def eight():
  (out,) = run_together([(WORKER, "single")], cpu_env(), 900)
  return last_json(out)


@pytest.fixture(scope="module")
def ring():
  (out,) = run_together([(WORKER, "ring")], cpu_env(), 900)
  return last_json(out)


def test_ring_core_is_exact(ring):
  """The ring core on context 2, 3 and 4 (x data 1, 2, 2), packed documents and padding, float64: the
  output, the gradients of q, c_kv, k_pe and W_kv_b, and QK-clip's max logit equal the dense
  formula's."""
  assert set(ring["exact"]) == {"2", "3", "4"}
  for c, diffs in ring["exact"].items():
    for name, d in diffs.items():
      assert d < 1e-12 if name in ("out", "max_logit") else d < 1e-10, (c, name, d)


def test_ring_computes_the_visible_tiles_only(ring):
  """Dot FLOPs per device in the compiled programs (context 4 x data 2: each device one sequence, 2 x 8
  of its 64 tokens, key blocks of 8), against a count from the shapes. A latent-core call on T queries
  and K keys costs, forward, K up-projections 2 K C H (nope + v) and the pairs' 2 T K H (nope + rope + v);
  its backward 3 up-projection-sized matmuls (keys again, W_kv_b's and c_kv's gradients) and 2 T K H
  (3 (nope + rope) + 2 v). all_gather: one call, the slice's 16 queries against all 64 keys: exactly
  that. ring: 2c + 1 = 9 calls of 8 x 8, and in the gradient the forwards of the 2 (c - 2) tiles of the
  checkpointed ring steps again: exactly that less the up-projections XLA shares between tiles of the
  same key chunk (at most all of them); under 3/4 of the all_gather core's."""
  from tests.test_latent_attention import C, H, NOPE, ROPE, V

  up = lambda k: 2 * k * C * H * (NOPE + V)
  pairs = lambda t, k, width: 2 * t * k * H * width
  fwd = lambda t, k: up(k) + pairs(t, k, NOPE + ROPE + V)
  grad = lambda t, k: fwd(t, k) + 3 * up(k) + pairs(t, k, 3 * (NOPE + ROPE) + 2 * V)
  c, chunk = 4, 8
  assert ring["flops"]["all_gather"] == {"fwd": fwd(2 * chunk, 64), "grad": grad(2 * chunk, 64)}
  tiles = 2 * c + 1
  again = 2 * (c - 2)  # tiles of the scanned (checkpointed) ring steps, forward again in the gradient
  hand = {"fwd": tiles * fwd(chunk, chunk), "grad": tiles * grad(chunk, chunk) + again * fwd(chunk, chunk)}
  ups = {"fwd": tiles, "grad": 4 * tiles + again}  # key up-projections in the count
  for mode in ("fwd", "grad"):
    got = ring["flops"]["ring"][mode]
    assert hand[mode] - ups[mode] * up(chunk) <= got <= hand[mode], (mode, got)
    assert got < 0.75 * ring["flops"]["all_gather"][mode]


@pytest.mark.parametrize("mesh", ["c2", "c4", "c2f2e2", "c4_latent", "c8", "c2f2t2", "c2_ring", "c4_ring", "c8_ring",
                                  "c2f2t2_ring", "c2f2e2_ring", "s2c2", "s2c2_ring"])
def test_context_meshes_match_one_device(eight, mesh):
  r = eight["meshes"][mesh]
  ref = r["ref"]
  assert r["init_diff"] == 0, mesh
  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
    assert r["metrics"][k] == pytest.approx(ref[k], rel=1e-6), (mesh, k)
  assert r["update_diff"] < 1e-6 * r["update_norm"] and r["update_scale"] > 1e-2, mesh  # max |diff| vs the L2 norm
  assert r["metrics"]["dropped_tokens"] == 0


def test_attention_gathers_the_latent_not_the_keys(eight):
  """context=2 (x data=4, 2 sequences per data shard, parameters whole over `context`): the compiled
  step's float all-gathers of whole sequences ([2, 16, ...]) are MLA's latent, kv_lora_rank +
  qk_rope_head_dim = 24 values per token, one per attention layer (dense, MoE, MTP); never the hidden
  state (32: the head, MTP and the loss run on the balanced layout, the targets laid out as the logits),
  the per-head keys [.., 16, 4, 16] or values [.., 16, 4, 8]."""
  gathers = eight["c2_gathers"]
  whole_seq = sorted(g for g in gathers if g.startswith("f32[2,16,"))
  assert whole_seq == ["f32[2,16,24]"] * 3, gathers
  assert not [g for g in gathers if g.count(",") == 3], gathers
