"""Plot a run: `python -m train.plot RUN_DIR [--out PNG]`; or held-out loss by position:
`python -m train.plot --by-position LABEL=EVAL.json [LABEL=EVAL.json ...] --out PNG`.

Reads RUN_DIR/metrics.jsonl (train.core.metrics) and draws the training objective, the training
next-token loss (`lm_loss`, comparable with eval) and the eval loss vs step and, when the run
logged `expert_load_cv` (one value per MoE layer), the expert-load coefficient of variation
std(load)/mean(load) per layer vs step, when it logged `max_logit` (QK-clip: each MLA layer's largest
attention logit in the step, before the clip) those per layer, and when the run evaluated lm-eval tasks (`eval_tasks`), each
task's continuous metric (the correct answer's log-probability per byte, or the text's for rolling
tasks) with its accuracy on a second axis. Saves RUN_DIR/loss.png unless --out says otherwise.

--by-position draws the `by_position` buckets of `python -m train.eval ... --by-position W` JSON
lines (one curve per LABEL=FILE), the loss against the position in the document: what a
long-context extension changes (docs/long-context.md).

A metrics.jsonl whose steps start again (written before the trainer moved the records no checkpoint
covers to metrics.dropped.jsonl, or joined by hand) is drawn as its latest history only, with a
warning naming how many records were left out: never as a zig-zag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parallel.common.errors import DataError

CV_KEY = "expert_load_cv"  # train/core/step.py
LOGIT_KEY = "max_logit"  # train/core/step.py, with optimizer.qk_clip_threshold
TASK_CURVES = ("correct_logprob_per_byte", "logprob_per_byte")  # train/core/lm_eval_adapter.py
TASK_SCORES = ("acc", "exact_match")


def task_keys(records: list[dict], metrics: tuple[str, ...]) -> list[str]:
  """The eval_<task>/<metric> keys of the records for `metrics`, in order of appearance."""
  keys = dict.fromkeys(k for r in records for k in r if k.startswith("eval_") and k.rsplit("/", 1)[-1] in metrics)
  return list(keys)


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

  per_layer = [(key, *series(records, key)) for key in (CV_KEY, LOGIT_KEY)]
  per_layer = [(key, steps, vectors) for key, steps, vectors in per_layer if vectors]
  task_curves, task_scores = task_keys(records, TASK_CURVES), task_keys(records, TASK_SCORES)
  panels = 1 + len(per_layer) + bool(task_curves or task_scores)
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 0.5, 4.5), squeeze=False)
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
  labels = {CV_KEY: ("MoE layer", "std(load) / mean(load)", "expert load CV"),
            LOGIT_KEY: ("MLA layer", "max attention logit", "max logit per layer (QK-clip)")}
  for i, (key, steps, vectors) in enumerate(per_layer, start=1):
    ax, (name, ylabel, panel_title) = axes[0, i], labels[key]
    for layer in range(max(map(len, vectors))):
      rows = [(s, v[layer]) for s, v in zip(steps, vectors) if layer < len(v) and v[layer] is not None]
      ax.plot([s for s, _ in rows], [v for _, v in rows], lw=1, label=f"{name} {layer}")
    ax.set(xlabel="step", ylabel=ylabel, title=panel_title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  if task_curves or task_scores:
    ax = axes[0, -1]
    for key in task_curves:
      ax.plot(*series(records, key), marker="o", lw=1.2, label=key[len("eval_"):])
    ax.set(xlabel="step", ylabel="log-probability per byte", title="lm-eval tasks")
    ax.grid(alpha=0.3)
    if task_scores:
      twin = ax.twinx()
      for key in task_scores:
        twin.plot(*series(records, key), marker="s", ls="--", lw=1, label=key[len("eval_"):])
      twin.set(ylabel="accuracy")
      twin.legend(fontsize="small", loc="lower right")
    if task_curves:
      ax.legend(fontsize="small", loc="upper left")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def read_by_position(specs: list[str]) -> dict[str, list[dict]]:
  """{label: by_position buckets} of LABEL=FILE specs (train.eval's JSON line, its last line)."""
  curves = {}
  for spec in specs:
    label, sep, path = spec.partition("=")
    if not sep:
      raise DataError(f"--by-position {spec!r}: expected LABEL=EVAL.json")
    if not Path(path).is_file():
      raise DataError(f"{path}: no such file")
    lines = Path(path).read_text().strip().splitlines()
    record = json.loads(lines[-1]) if lines else {}
    if "by_position" not in record:
      raise DataError(f"{path}: no by_position in its last line; run python -m train.eval ... --by-position W")
    curves[label] = record["by_position"]
  return curves


def draw_by_position(curves: dict[str, list[dict]], out: Path) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, buckets in curves.items():
    ax.plot([(b["from"] + b["to"]) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o", lw=1.2, label=label)
  ax.set(xlabel="position in the document", ylabel="held-out loss (nats per token)", title="loss by position")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", type=Path, nargs="?")
  parser.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/loss.png)")
  parser.add_argument("--by-position", nargs="+", metavar="LABEL=EVAL.json", help="loss by position curves")
  args = parser.parse_args(argv)
  if args.by_position:
    if args.out is None or args.run_dir is not None:
      print("error: --by-position draws eval files: give --out PNG and no RUN_DIR", file=sys.stderr)
      return 2
    try:
      print(draw_by_position(read_by_position(args.by_position), args.out))
    except DataError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  if args.run_dir is None:
    print("error: give RUN_DIR (or --by-position LABEL=EVAL.json ... --out PNG)", file=sys.stderr)
    return 2
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
