"""A Transformer's structure with random NumPy weights, or with its own initialisation in one program,
shared by the model-level tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.model import Transformer


def random_state(cfg, seed=0, std=0.15, rt=None):
  """(graphdef, state) of Transformer(cfg, rt) (eval_shape: no init compile) with random weights:
  RMSNorm scales near one, router biases small, everything else normal with `std`."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rt, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    if "scale" in names:
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif "e_score_correction_bias" in names:
      value = 0.05 * rng.standard_normal(leaf.shape)
    else:
      value = std * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, state)


def initialised(cfg, rt=None, seed=0):
  """Transformer(cfg, rt, rngs=nnx.Rngs(seed)) as built eagerly, but initialised by one jitted program
  (op by op, the tiny model's init takes about 15 s)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rt, rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.state(Transformer(cfg, rt, rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)
