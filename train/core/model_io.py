"""Models for the tools (export, eval, generate): a checkpoint step read into a Transformer, or an HF
folder or a run directory, whichever the user gives; and the tokenizer that goes with it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from moe import hf
from moe.config import ModelConfig
from moe.experts import valid_placements
from moe.model import Transformer
from moe.runtime import Runtime
from parallel.common.errors import ConfigError
from parallel.expert_parallel import ep_size
from parallel.pipeline import Layout
from parallel.sharding import state_shardings
from train.core.checkpoint import (checkpoint_dir, config_changes, finished_steps, pipeline_layout, read_config,
                                   relayout, relayout_target, restore_model, saved_layout, step_dir,
                                   validate_step_dir)

log = logging.getLogger("train")


def load_model(path, dtype: str = "float32", par=None) -> Transformer:
  """The Transformer of the checkpoint step directory `path`: the float32 master weights cast to
  `dtype` (parameters and compute; FP8 GEMMs off), on the first local device, or with `par` (a
  parallel.mesh.Parallelism) sharded over its mesh by the logical-axis rules (exporting a model larger
  than one device)."""
  path = Path(path)
  meta = validate_step_dir(path)
  cfg = read_config(path)
  devices = None if par is not None else jax.local_devices()[:1]
  rt = Runtime.resolve(cfg.impl, dtype=dtype, param_dtype=dtype, devices=devices, par=par, announce=False)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rt, rngs=nnx.Rngs(0))),
                                     nnx.Param, ...)
  abstract = {"params": params, "rest": rest}
  if par is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  else:
    shardings = state_shardings(abstract, par.mesh, par.rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  got = _read_weights(path, saved_layout(meta, cfg.model.num_moe_layers), target, pipeline_layout(cfg, par), cfg.model,
                      par)
  return nnx.merge(graphdef, got["params"], got["rest"])


def valid_copies(rest, model: ModelConfig, par):
  """`rest` with its redundant experts' placements valid on `par`'s mesh, as restored from a checkpoint
  (moe.experts.valid_placements)."""
  if par is None or not par.redundant_experts:
    return rest
  e = model.n_routed_experts
  return valid_placements(rest, e, ep_size(par, e), par.ep_nodes)


def _read_weights(step: Path, src: Layout, target: dict, dst: Layout, model: ModelConfig, par) -> dict:
  """{"params", "rest"} of the checkpoint `step` read into `target`, its MoE stack moved from the layout
  it was saved in (`src`) to `dst`, its redundant experts placed for `par`'s mesh."""
  got = relayout(restore_model(step, relayout_target(target, src, dst)), src, dst, target)
  return {**got, "rest": valid_copies(got["rest"], model, par)}


def weights_from_run(path, target: dict, model: ModelConfig, dst: Layout, par=None) -> dict:
  """{"params", "rest"} of another training run, for a new run that starts from its weights (a long-context
  stage after pre-training: another seq_len, YaRN added), read into `target` (ShapeDtypeStructs with
  the new run's shardings, its MoE stack in `dst`'s layout). `path`: a run directory (its newest
  checkpoint) or one checkpoint step directory. The two `model:` sections may differ only where no
  weight's shape does (rope_scaling, max_position_embeddings, rope_theta, ...); what differs is logged."""
  path = Path(path)
  step = step_dir(path) if finished_steps(checkpoint_dir(path)) else path
  if not step.is_dir():
    raise ConfigError(f"init_from={path}: no such directory; give an HF folder, a run directory or a checkpoint step")
  meta = validate_step_dir(step)
  old = read_config(step).model
  changes = config_changes(dataclasses.asdict(old), dataclasses.asdict(model), "model.")
  try:
    got = _read_weights(step, saved_layout(meta, old.num_moe_layers), target, dst, model, par)
  except ConfigError as e:
    raise ConfigError(f"init_from={step}: its weights do not fit this model ({'; '.join(changes[:3]) or e})") from None
  log.info("init_from %s: weights of step %s%s", step, step.name,
           f" (model changed: {', '.join(changes)})" if changes else "")
  return got


def load_any(path, dtype: str | None = None) -> Transformer:
  """A Transformer from an HF folder (config.json present) or a training run directory (its newest
  checkpoint). `dtype`: compute and parameter dtype (default float32). Weights holding NaN or Inf are
  a ConfigError: nothing useful can be computed from them."""
  path = Path(path)
  if (path / "config.json").is_file():
    model = hf.from_hf(path, dtype=dtype)
  else:
    path = _newest_of_run(path)
    model = load_model(path, dtype or "float32")
  check_finite(model, path, "use an earlier checkpoint")
  return model


def check_finite(model, path, fix: str) -> None:
  """ConfigError naming the first tensor of `model` (read from `path`) that holds NaN or Inf."""
  bad = [p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Variable)) if not bool(jnp.isfinite(v[...]).all())]
  if bad:
    raise ConfigError(f"{path}: the weights hold NaN or Inf ({'/'.join(map(str, bad[0]))}"
                      f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); {fix}")


def _newest_of_run(path: Path) -> Path:
  """The newest checkpoint of `path`, given where an HF folder or a run directory is expected."""
  if not path.is_dir():
    raise ConfigError(f"{path}: no such directory; give an HF folder (with config.json) or a run directory")
  if not finished_steps(checkpoint_dir(path)):
    raise ConfigError(f"{path}: neither an HF folder (no config.json) nor a run directory with checkpoints"
                      f" (nothing in {checkpoint_dir(path)})")
  return step_dir(path)


def tokenizer_of(path, given: str | None = None) -> str:
  """`given` if set; else the run's `tokenizer` for a run directory, 'byte' for an HF folder."""
  if given is not None:
    return given
  path = Path(path)
  if path.is_dir() and not (path / "config.json").is_file():
    return read_config(_newest_of_run(path)).tokenizer
  return "byte"
