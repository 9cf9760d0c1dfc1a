"""Plot a run: `python -m train.plot RUN_DIR [--out PNG]`.

Reads RUN_DIR/metrics.jsonl (train.core.metrics) and draws the training objective, the training
next-token loss (`lm_loss`, comparable with eval) and the eval loss vs step and, when the run
logged `expert_load_cv` (one value per MoE layer), the expert-load coefficient of variation
std(load)/mean(load) per layer vs step. Saves RUN_DIR/loss.png unless --out says otherwise.

A metrics.jsonl whose steps start again (written before the trainer moved the records no checkpoint
covers to metrics.dropped.jsonl, or joined by hand) is drawn as its latest history only, with a
warning naming how many records were left out: never as a zig-zag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parallel.errors import DataError

CV_KEY = "expert_load_cv"  # train/core/step.py


def read_metrics(run_dir: Path) -> list[dict]:
  if not run_dir.is_dir():
    raise DataError(f"{run_dir}: no such run directory")
  path = run_dir / "metrics.jsonl"
  if not path.is_file():
    raise DataError(f"{path}: no such file (has the run logged a step yet?)")
  records = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
  if not records:
    raise DataError(f"{path}: no metrics yet")
  return records


def latest_history(records: list[dict]) -> tuple[list[dict], int]:
  """(the records of the latest history, how many earlier ones were left out): read from the end, a
  record belongs to it while its step is below that of every later training record (an eval record
  follows the training record of its step, so it is read first)."""
  kept, floor = [], float("inf")
  for r in reversed(records):
    if r.get("step", 0) < floor:
      kept.append(r)
      if "loss" in r:
        floor = r.get("step", 0)
  return kept[::-1], len(records) - len(kept)


def series(records: list[dict], key: str) -> tuple[list[int], list]:
  """(steps, values) of the records that have a finite `key` (a diverged step logs null)."""
  rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  return [s for s, _ in rows], [v for _, v in rows]


def draw(records: list[dict], out: Path, title: str) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cv_steps, cv = series(records, CV_KEY)
  fig, axes = plt.subplots(1, 2 if cv else 1, figsize=(12 if cv else 6.5, 4.5), squeeze=False)
  ax = axes[0, 0]
  curves = (("loss", "train objective", dict(lw=1, alpha=0.5)), ("lm_loss", "train next-token", dict(lw=1.2)),
            ("eval_loss", "eval next-token", dict(marker="o", lw=1.2)))
  for key, label, style in curves:
    steps, values = series(records, key)
    if steps:
      ax.plot(steps, values, label=label, **style)
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  if cv:
    ax = axes[0, 1]
    for layer in range(max(map(len, cv))):
      rows = [(s, v[layer]) for s, v in zip(cv_steps, cv) if layer < len(v)]
      ax.plot([s for s, _ in rows], [v for _, v in rows], lw=1, label=f"MoE layer {layer}")
    ax.set(xlabel="step", ylabel="std(load) / mean(load)", title="expert load CV")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", type=Path)
  parser.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/loss.png)")
  args = parser.parse_args(argv)
  try:
    records = read_metrics(args.run_dir)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  records, left_out = latest_history(records)
  if left_out:
    print(f"warning: {args.run_dir / 'metrics.jsonl'}: its steps start again; drawing the latest history (steps"
          f" {records[0]['step']}..{records[-1]['step']}), {left_out} earlier record(s) left out", file=sys.stderr)
  print(draw(records, args.out or args.run_dir / "loss.png", args.run_dir.name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
