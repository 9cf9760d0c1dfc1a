"""FP8 against BF16 on the same run: `python -m train.fp8_check CONFIG [key=value ...] --steps N`.

Trains the model of CONFIG twice from the same seed (so the same float32 initial weights) on the
same batches (same data seed): once with `precision=bf16`, once with `precision=fp8` (bf16 compute,
FP8 E4M3 GEMMs in the linears and routed experts, moe/kernels/fp8.py). Progress goes to stderr; the last
line on stdout is one JSON object:

  bf16_loss, fp8_loss   the main next-token cross-entropy (the objective's `lm_loss`, without the
                        MTP and balance terms), mean over the last `--tail` fraction of the steps
  rel_loss_diff         (fp8_loss - bf16_loss) / bf16_loss (signed; the V3 report's bound on its
                        absolute value is 0.25%)
  bf16_eval_loss, fp8_eval_loss, rel_eval_loss_diff   held-out loss after the last step
                        (`eval_steps` batches; not with --no-eval)
  fp8_path              how the FP8 GEMMs ran (native FP8 dots or quantise->dequantise)
  float32_loss, rel_loss_diff_{bf16,fp8}_vs_float32   with --float32: a third, float32 run

`--out DIR` also writes DIR/losses.json (per-step losses of both runs) and `--plot FILE.png` the
two loss curves and their relative difference.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from parallel.common.errors import ConfigError, InputError
from train.core import input_pipeline as data_lib
from train.core import jsonl
from train.core import loop
from train.core.train_config import TrainConfig, load_train_config

log = logging.getLogger("train.fp8_check")


def train_losses(cfg: TrainConfig, log_every: int = 0, evaluate: bool = True) -> dict:
  """Per-step `lm_loss` and `loss` of `cfg` (as trained by train.core.loop's step), the eval loss, and
  how the FP8 GEMMs ran."""
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  batches = iter(data_lib.make_dataset(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                       split="train", tokenizer=tokenizer,
                                       max_seq_len=cfg.model.max_position_embeddings))
  state, train_step, eval_step, rt, *_ = loop.build(cfg)
  metrics, t0 = [], time.perf_counter()
  for step in range(cfg.steps):
    state, m = train_step(state, loop.to_device(next(batches)))
    metrics.append({"lm_loss": m["lm_loss"], "loss": m["loss"]})
    if log_every and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
      log.info("%s step %d/%d: lm_loss %.4f (%.1f s)", cfg.precision, step + 1, cfg.steps,
               float(m["lm_loss"]), time.perf_counter() - t0)
  got = jax.device_get(metrics)
  eval_loss = loop.evaluate(eval_step, state, cfg, loop.eval_set(cfg, tokenizer)) if evaluate else None
  return {"lm_loss": [float(m["lm_loss"]) for m in got], "loss": [float(m["loss"]) for m in got],
          "eval_loss": eval_loss, "seconds": time.perf_counter() - t0,
          "fp8_path": rt.fp8.describe() if rt.fp8 is not None else None}


def compare(cfg: TrainConfig, tail: float = 0.1, log_every: int = 0, evaluate: bool = True,
            float32: bool = False) -> tuple[dict, dict]:
  """(summary, per-step losses {"bf16": ..., "fp8": ...}) of the bf16 and fp8 runs of `cfg` (and of
  a float32 reference run with `float32`)."""
  precisions = ("bf16", "fp8") + (("float32",) if float32 else ())
  runs = {p: train_losses(cfg.replace(precision=p), log_every, evaluate) for p in precisions}
  n = max(1, int(round(cfg.steps * tail)))
  b, f = (float(np.mean(runs[p]["lm_loss"][-n:])) for p in ("bf16", "fp8"))
  summary = {"config": cfg.run_dir, "steps": cfg.steps, "tail_steps": n, "backend": jax.default_backend(),
             "fp8_path": runs["fp8"]["fp8_path"], "seconds": {p: round(runs[p]["seconds"], 1) for p in runs}}
  be, fe = runs["bf16"]["eval_loss"], runs["fp8"]["eval_loss"]
  if be is not None:
    summary.update(bf16_eval_loss=be, fp8_eval_loss=fe, rel_eval_loss_diff=(fe - be) / be)
  if float32:
    r = float(np.mean(runs["float32"]["lm_loss"][-n:]))
    summary.update(float32_loss=r, rel_loss_diff_bf16_vs_float32=(b - r) / r, rel_loss_diff_fp8_vs_float32=(f - r) / r)
  summary.update(bf16_loss=b, fp8_loss=f, rel_loss_diff=(f - b) / b)
  return summary, runs


def plot(runs: dict, path: str | Path, tail_steps: int, title: str = "") -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
  smooth = lambda v, w=10: np.convolve(v, np.ones(w) / w, mode="valid") if len(v) >= w else np.asarray(v)
  for p, color in (("bf16", "tab:blue"), ("fp8", "tab:orange"), ("float32", "tab:green")):
    if p not in runs:
      continue
    v = np.asarray(runs[p]["lm_loss"])
    steps = np.arange(1, len(v) + 1)
    ax.plot(steps, v, color=color, alpha=0.25, lw=0.8)
    s = smooth(v)
    ax.plot(steps[len(v) - len(s):], s, color=color, label=f"{p} (10-step mean)")
  b, f = np.asarray(runs["bf16"]["lm_loss"]), np.asarray(runs["fp8"]["lm_loss"])
  pairs = [("fp8 vs bf16", f, b, "tab:red")]
  if "float32" in runs:
    r = np.asarray(runs["float32"]["lm_loss"])
    pairs += [("fp8 vs float32", f, r, "tab:orange"), ("bf16 vs float32", b, r, "tab:blue")]
  for label, x, ref, color in pairs:
    rel = smooth((x - ref) / ref) * 100
    ax2.plot(np.arange(len(b) - len(rel) + 1, len(b) + 1), rel, color=color, label=label, lw=1.2)
  ax2.axhline(0, color="k", lw=0.5)
  ax2.axvspan(len(b) - tail_steps + 0.5, len(b) + 0.5, color="grey", alpha=0.2, label="averaged stretch")
  ax.set_ylabel("train lm_loss")
  ax.legend()
  ax.set_title(title)
  ax2.set_ylabel("relative difference [%]\n(10-step mean)")
  ax2.set_xlabel("step")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.fp8_check", description=__doc__.splitlines()[0])
  p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  p.add_argument("overrides", nargs="*", help="key=value overrides (precision is set by the check)")
  p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
  p.add_argument("--tail", type=float, default=0.1, help="fraction of the last steps averaged (default 0.1)")
  p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
  p.add_argument("--float32", action="store_true", help="also train a float32 reference run")
  p.add_argument("--out", default=None, help="folder for losses.json")
  p.add_argument("--plot", default=None, help="PNG of both loss curves")
  args = p.parse_intermixed_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
  try:
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])
    cfg = load_train_config(args.config, overrides)
    if not 0 < args.tail <= 1:
      raise ConfigError(f"--tail={args.tail} must be in (0, 1]")
    summary, runs = compare(cfg, args.tail, log_every=cfg.log_every, evaluate=not args.no_eval, float32=args.float32)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(jsonl.dumps({"summary": summary, "runs": runs}))
  if args.plot:
    plot(runs, args.plot, summary["tail_steps"],
         f"{args.config}: bf16 vs fp8, {cfg.steps} steps (rel. diff {summary['rel_loss_diff'] * 100:+.3f}%)")
  print(jsonl.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
