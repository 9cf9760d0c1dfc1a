"""Checkpoints to HF folders and back.

  python -m train.export RUN_DIR [--step S] --out HF_DIR [--dtype float32|bfloat16] [--fp8] [--allow-nonfinite]
      writes config.json + sharded safetensors (+ index) in the released DeepSeek naming
      (moe.hf.to_hf) from step S of RUN_DIR (default: its newest checkpoint), read sharded over all
      devices and gathered one tensor at a time; only the model item (weights and router biases) is
      read, never the optimiser state. --fp8: the linear weights in DeepSeek's FP8 release format.
      Weights holding NaN or Inf are refused in one line (exit 2, nothing written) unless
      --allow-nonfinite.

  python -m train.export --from-hf HF_DIR --out RUN_DIR [--config CONFIG] [key=value ...]
      (or, without the step-0 checkpoint, `python -m train CONFIG init_from=HF_DIR`)
      makes RUN_DIR/checkpoints/0 (the HF weights, a fresh optimiser state, step 0) and
      RUN_DIR/config.yaml: the model section comes from HF_DIR/config.json, the training keys from
      CONFIG (its model section is ignored; default: TrainConfig's defaults) and the overrides.
      Continue training or fine-tune with `python -m train RUN_DIR/config.yaml [key=value ...]`.
      The data starts from the beginning (the checkpoint has no data-iterator state).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import yaml

from moe import hf
from moe.config import load_config
from parallel.common.errors import ConfigError
from parallel.mesh import MeshConfig, Parallelism
from train.core import checkpoint as ckpt_lib, model_io
from train.core import loop
from train.core.train_config import TrainConfig, apply_override


def export(run_dir, out, step: int | None = None, dtype: str = "float32", max_shard_bytes: int = 4 << 30,
           fp8: bool = False, allow_nonfinite: bool = False) -> Path:
  """Write step `step` (default newest) of `run_dir` as an HF folder `out`; returns the step directory.

  The checkpoint (from a run on any mesh) is read sharded over all of this job's devices (fsdp), and
  written one tensor at a time: no host holds the model. Weights holding NaN or Inf are refused (a
  ConfigError naming the first such tensor, nothing written) unless `allow_nonfinite`."""
  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise ConfigError(f"{out}: exists and is not empty; choose a new --out directory")
  src = ckpt_lib.step_dir(run_dir, step)
  par = Parallelism.from_config(MeshConfig(data=1, fsdp=-1))
  model = model_io.load_model(src, dtype, par=par)
  if not allow_nonfinite:
    model_io.check_finite(model, src, "export an earlier --step, or pass --allow-nonfinite to write them anyway")
  hf.to_hf(model, out, max_shard_bytes=max_shard_bytes, fp8=fp8)
  return src


def train_config_for_hf(model_cfg, run_dir, config: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
  """TrainConfig with `model_cfg` as its model: the training keys of `config` (a YAML file) and
  `overrides`; run_dir set."""
  raw = load_config(config) if config else {}
  raw["model"] = dataclasses.asdict(model_cfg)
  for item in overrides:
    if item.split("=", 1)[0].startswith("model."):
      raise ConfigError(f"override {item!r}: the model comes from the HF config.json; only training keys can change")
    apply_override(raw, item)
  raw["run_dir"] = str(run_dir)
  return TrainConfig.from_dict(raw, where=config or "--from-hf")


def from_hf(hf_dir, run_dir, config: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
  """Make RUN_DIR/checkpoints/0 from an HF folder: its weights (float32), a fresh optimiser state,
  step 0; writes RUN_DIR/config.yaml. Returns the TrainConfig."""
  run_dir = Path(run_dir)
  root = ckpt_lib.checkpoint_dir(run_dir)
  if root.exists() and any(root.iterdir()):
    raise ConfigError(f"{root}: already holds checkpoints; choose a new --out run directory")
  cfg = train_config_for_hf(hf.config_of(hf_dir), run_dir, config, overrides)
  state = loop.build(cfg, init_from=str(hf_dir)).state  # read straight into the config's mesh
  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt_lib.save_state(run_dir, 0, state, cfg)
  (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  return cfg


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("run_dir", nargs="?", help="run directory to export (not with --from-hf)")
  p.add_argument("overrides", nargs="*", help="with --from-hf: training key=value overrides")
  p.add_argument("--out", required=True, help="HF folder to write; with --from-hf, the run directory to make")
  p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the written tensors")
  p.add_argument("--fp8", action="store_true",
                 help="the linear weights in DeepSeek's FP8 release format (E4M3 + 128x128 weight_scale_inv)")
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="write weights holding NaN or Inf (refused by default: nothing can use them)")
  p.add_argument("--from-hf", metavar="HF_DIR", help="make a step-0 checkpoint from an HF folder instead")
  p.add_argument("--config", help="with --from-hf: YAML with the training keys (its model section is ignored)")
  args = p.parse_args(argv)
  try:
    if args.from_hf:
      overrides = ([args.run_dir] if args.run_dir else []) + args.overrides  # key=value only
      bad = [o for o in overrides if "=" not in o]
      if bad or args.step is not None:
        raise ConfigError("--from-hf takes no RUN_DIR or --step; give the new run directory as --out")
      cfg = from_hf(args.from_hf, args.out, args.config, overrides)
      print(f"{args.out}/checkpoints/0: {args.from_hf} with a fresh optimiser state; continue with"
            f" python -m train {args.out}/config.yaml (steps={cfg.steps})")
    else:
      if not args.run_dir or args.overrides or args.config:
        raise ConfigError("give one RUN_DIR (and --out, optionally --step); key=value and --config go with --from-hf")
      src = export(args.run_dir, args.out, args.step, args.dtype, fp8=args.fp8, allow_nonfinite=args.allow_nonfinite)
      print(f"{args.out}: step {src.name} of {args.run_dir} as an HF folder ({args.dtype}{', FP8 linears' if args.fp8 else ''})")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
