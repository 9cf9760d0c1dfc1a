"""Scaling sweeps: `python -m train.sweep SWEEP.yaml [--list] [--print-commands [FILE]] [--subprocess] [--run NAME]`.

A sweep file expands into training runs (train.core.loop.train), one run directory each under `out_dir`,
and a manifest `out_dir/sweep.json` (every run's name, overrides, size, parameter and FLOP counts)
that `python -m train.sweep_report out_dir` reads. Format:

  base: configs/tiny.yaml        # the training config every run starts from (path from the cwd)
  out_dir: runs/scaling/NAME     # run directories go to out_dir/RUN_NAME
  overrides:                     # fixed dotted overrides for every run (as on the train command line)
    seq_len: 128
    optimizer.schedule: cosine
  # (a) an isoFLOP sweep: every budget x every size
  budgets: [3e12, 1e13]          # training FLOPs per run
  sizes: [32, 48, 64, 96]        # hidden sizes, expanded by the size rule below, or mappings
                                 #   {name: s1, overrides: {model.hidden_size: 48, ...}} for any model
  warmup_fraction: 0.1           # optimizer.warmup_steps = ceil(fraction * steps) (default 0.1)
  min_steps: 10                  # a run shorter than this is skipped, with a warning (default 10)
  seeds: [0, 1]                  # optional: every run once per seed (`seed=`), named RUN_sSEED; the
                                 #   report averages them and states their spread
  # (b) or a grid: the cartesian product of override values (steps etc. from base/overrides)
  grid:
    optimizer.lr: [1e-3, 3e-3]
    model.hidden_size: [32, 64]
  # (c) or both: an isoFLOP sweep per grid point (a family; the report fits each and compares them);
  #     a mapping sets several keys together, e.g. each optimizer with its own learning rate:
  grid:
    optimizer: [{name: adamw, lr: 3e-3}, {name: muon, lr: 6e-3}]   # runs optimizer=adamw-0.003_C3e12_d32

Steps of an isoFLOP run: steps = round(budget / (flops_per_token * batch_size * seq_len)), with
flops_per_token from moe.params (6 x active matmul params + attention core, MTP included), so a run
spends its budget up to rounding; the report uses the run's actual FLOPs. Every run also gets
`run_dir`, `eval_every = steps` (one eval, at the end) and `log_every = max(1, steps // 10)` unless the
fixed overrides set them, and, for the warm-up/decay schedules other than cosine, a decay over all the
steps after warm-up (`optimizer.decay_start=null`, `decay_steps = steps - warmup_steps`).

Size rule (DeepSeek-style; one knob d = hidden_size, a multiple of 16):
  num_hidden_layers      max(2, round(d / 32))      first_k_dense_replace 1 (the rest are MoE)
  num_attention_heads    max(1, d // 32)            head dims: qk_nope 32, qk_rope 16, v 32
  q_lora_rank            d // 2                     kv_lora_rank  d // 4
  intermediate_size      3 d (the dense layer)      moe_intermediate_size  d // 2
  n_routed_experts       max(4, d // 16), in n_group 2 (topk_group 1), 2 routed + 1 shared per token
So width, depth, heads, the MLA ranks and the expert count grow together; active parameters grow
roughly as d^3 (d^2 per layer x d/32 layers) while the embedding grows as d.

Execution: by default the runs go one after another in this process (the CPU matmul peak used for
MFU is measured once, not per run); `--subprocess` starts `python -m train` for each; `--print-commands`
writes one command per run (`python -m train.sweep SWEEP.yaml --run NAME`, which runs that run alone)
for a cluster's job array and trains nothing. A run is skipped when its directory holds a `done`
marker (written after a run finishes) or its metrics.jsonl has the final eval record (step == steps),
so a killed sweep continues where it stopped (an unfinished run resumes from its checkpoint).
With `eval_tasks` among the overrides (lm-eval tasks, train/core/lm_eval_adapter.py) every run also
evaluates them at its end; the `done` marker and the report record their metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from moe import params as params_lib
from moe.config import load_yaml
from parallel.common.errors import ConfigError
from train.core import jsonl
from train.core import loop
from train.core.train_config import load_train_config
from train.core.metrics import measure_peak_flops

log = logging.getLogger("train.sweep")

MANIFEST = "sweep.json"
DONE = "done"
SWEEP_KEYS = {"base", "out_dir", "overrides", "budgets", "sizes", "grid", "warmup_fraction", "min_steps", "seeds"}


def size_overrides(d: int) -> dict:
  """The size rule of the module docstring: dotted model overrides for hidden size `d`."""
  if d < 16 or d % 16:
    raise ConfigError(f"size {d}: the size rule needs a hidden size that is a multiple of 16")
  experts = max(4, d // 16)
  experts += experts % 2  # two groups
  return {
      "model.hidden_size": d,
      "model.num_hidden_layers": max(2, round(d / 32)),
      "model.first_k_dense_replace": 1,
      "model.num_attention_heads": max(1, d // 32),
      "model.qk_nope_head_dim": 32,
      "model.qk_rope_head_dim": 16,
      "model.v_head_dim": 32,
      "model.q_lora_rank": d // 2,
      "model.kv_lora_rank": d // 4,
      "model.intermediate_size": 3 * d,
      "model.moe_intermediate_size": d // 2,
      "model.n_routed_experts": experts,
      "model.n_shared_experts": 1,
      "model.num_experts_per_tok": 2,
      "model.n_group": 2,
      "model.topk_group": 1,
  }


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict  # dotted key -> value, in order: fixed, size, derived
  budget: float | None = None
  size: str | None = None
  steps: int = 0
  tokens: int = 0
  flops: float = 0.0  # actual training FLOPs: flops_per_token * tokens
  total_params: int = 0
  active_params: int = 0
  flops_per_token: int = 0
  seed: int | None = None  # with `seeds:` (the report averages a point's seeds)
  point: dict | None = None  # the grid's values for this run (an isoFLOP sweep with a grid: its family)

  def override_list(self) -> list[str]:
    return [f"{k}={_scalar(v)}" for k, v in self.overrides.items()]


def _scalar(v) -> str:
  if isinstance(v, float):
    return repr(v)
  return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path: str | Path) -> dict:
  path = Path(path)
  spec = load_yaml(path, "sweep file")
  unknown = set(spec) - SWEEP_KEYS
  if unknown:
    raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} (expected {sorted(SWEEP_KEYS)})")
  for key in ("base", "out_dir"):
    if not isinstance(spec.get(key), str):
      raise ConfigError(f"{path}: `{key}` must be a path")
  if not spec.get("sizes") and "grid" not in spec:
    raise ConfigError(f"{path}: give `budgets` + `sizes` (isoFLOP), `grid`, or both (an isoFLOP sweep per grid point)")
  if spec.get("sizes") and not spec.get("budgets"):
    raise ConfigError(f"{path}: `sizes` needs `budgets` (training FLOPs per run)")
  spec.setdefault("overrides", {})
  spec["overrides"] = spec["overrides"] or {}
  if not isinstance(spec["overrides"], dict):
    raise ConfigError(f"{path}: `overrides` must be a mapping of dotted keys")
  spec["budgets"] = [float(b) for b in spec.get("budgets") or []]
  seeds = spec.get("seeds")
  if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
    raise ConfigError(f"{path}: `seeds` must be a list of distinct integers, got {seeds!r}")
  if seeds is not None and "seed" in spec["overrides"]:
    raise ConfigError(f"{path}: give the seed in `seeds` or in `overrides`, not both")
  return spec


def _size_entries(sizes) -> list[tuple[str, dict]]:
  out = []
  for s in sizes:
    if isinstance(s, int) and not isinstance(s, bool):
      out.append((f"d{s}", size_overrides(s)))
    elif isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("overrides"), dict):
      out.append((s["name"], dict(s["overrides"])))
    else:
      raise ConfigError(f"sizes: {s!r}: expected a hidden size or {{name: ..., overrides: {{...}}}}")
  return out


def _grid_points(grid) -> list[tuple[str, dict]]:
  """(name, dotted overrides) for each point of the grid's cartesian product; a value that is a mapping
  sets several keys under its key together (`optimizer: [{name: muon, lr: 4e-3}]`)."""
  if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
    raise ConfigError("grid: expected a mapping of dotted keys to non-empty lists of values")
  points = []
  for values in itertools.product(*grid.values()):
    point, parts = {}, []
    for key, value in zip(grid, values):
      if isinstance(value, dict):
        point.update({f"{key}.{k}": v for k, v in value.items()})
        parts.append(f"{key.split('.')[-1]}=" + "-".join(_scalar(v) for v in value.values()))
      else:
        point[key] = value
        parts.append(f"{key.split('.')[-1]}={_scalar(value)}")
    points.append(("_".join(parts).replace("/", "-"), point))
  return points


def _budget_name(b: float) -> str:
  mantissa, exp = f"{b:.2e}".split("e")
  return f"C{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def expand(spec: dict) -> list[Run]:
  """The sweep's runs, with steps and counts resolved (configs validated; nothing trained)."""
  base, out_dir, fixed = spec["base"], Path(spec["out_dir"]), dict(spec["overrides"])
  runs = []
  points = _grid_points(spec["grid"]) if "grid" in spec else [(None, None)]
  for point_name, point in points:
    if not spec.get("sizes"):
      runs.append(Run(point_name, {**fixed, **point}, point=point))
      continue
    for budget in spec["budgets"]:
      for size_name, size in _size_entries(spec["sizes"]):
        name = "_".join(x for x in (point_name, _budget_name(budget), size_name) if x)
        runs.append(Run(name, {**fixed, **(point or {}), **size}, budget=budget, size=size_name, point=point))
  if spec.get("seeds"):
    runs = [dataclasses.replace(r, name=f"{r.name}_s{seed}", overrides={**r.overrides, "seed": seed}, seed=seed)
            for r in runs for seed in spec["seeds"]]
  frac, min_steps = float(spec.get("warmup_fraction", 0.1)), int(spec.get("min_steps", 10))
  kept = []
  for run in runs:
    run.overrides["run_dir"] = str(out_dir / run.name)
    cfg = load_train_config(base, run.override_list())
    counts = params_lib.count(cfg.model, cfg.seq_len)
    steps = cfg.steps
    if run.budget is not None:
      steps = round(run.budget / (counts["flops_per_token"] * cfg.batch_size * cfg.seq_len))
      if steps < min_steps:
        log.warning("skipping %s: %d steps < min_steps=%d (raise the budget)", run.name, steps, min_steps)
        continue
      run.overrides["steps"] = steps
      if "optimizer.warmup_steps" not in fixed:
        run.overrides["optimizer.warmup_steps"] = math.ceil(frac * steps)
    derived = {"eval_every": steps, "log_every": max(1, steps // 10)}
    run.overrides.update({k: v for k, v in derived.items() if k not in fixed})
    cfg = load_train_config(base, run.override_list() + ["optimizer.decay_start=null", "optimizer.decay_steps=0"])
    if cfg.optimizer.schedule != "cosine" and "optimizer.decay_steps" not in fixed:
      run.overrides["optimizer.decay_start"] = None
      run.overrides["optimizer.decay_steps"] = steps - cfg.optimizer.warmup_steps
    cfg = load_train_config(base, run.override_list())  # validates the final config
    run.steps, run.tokens = cfg.steps, cfg.steps * cfg.batch_size * cfg.seq_len
    run.total_params, run.active_params = counts["total_params"], counts["active_params"]
    run.flops_per_token = counts["flops_per_token"]
    run.flops = float(run.flops_per_token) * run.tokens
    kept.append(run)
  names = [r.name for r in kept]
  if len(set(names)) != len(names):
    raise ConfigError("the sweep has two runs with the same name; give the sizes distinct names")
  return kept


def write_manifest(spec: dict, runs: list[Run]) -> Path:
  out = Path(spec["out_dir"])
  out.mkdir(parents=True, exist_ok=True)
  path = out / MANIFEST
  doc = {"base": spec["base"], "overrides": spec["overrides"], "budgets": spec["budgets"],
         "runs": [dataclasses.asdict(r) for r in runs]}
  path.write_text(jsonl.dumps(doc, indent=1) + "\n")
  return path


def eval_curve(run_dir: Path) -> list[list]:
  """[[step, eval loss], ...] logged in run_dir/metrics.jsonl, by step (a resumed run's later record wins)."""
  path = Path(run_dir) / "metrics.jsonl"
  curve = {}
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "eval_loss" in r and isinstance(r.get("step"), int):
      curve[r["step"]] = r["eval_loss"]
  return [[step, curve[step]] for step in sorted(curve)]


def final_eval(run_dir: Path, steps: int) -> float | None:
  """The eval loss logged at step == steps in run_dir/metrics.jsonl, else None."""
  return dict(map(tuple, eval_curve(run_dir))).get(steps)


def final_tasks(run_dir: Path, steps: int) -> dict:
  """The lm-eval task metrics (`eval_tasks`; eval_<task>/<metric>, named <task>/<metric> here) logged
  at step == steps in run_dir/metrics.jsonl; {} without any."""
  path = Path(run_dir) / "metrics.jsonl"
  out = {}
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if r.get("step") == steps:
      out.update({k[len("eval_"):]: v for k, v in r.items() if k.startswith("eval_") and "/" in k})
  return out


def is_done(run: Run) -> bool:
  run_dir = Path(run.overrides["run_dir"])
  return (run_dir / DONE).exists() or final_eval(run_dir, run.steps) is not None


def mark_done(run: Run, seconds: float | None = None) -> None:
  run_dir = Path(run.overrides["run_dir"])
  record = {"name": run.name, "eval_loss": final_eval(run_dir, run.steps), "seconds": seconds,
            "tasks": final_tasks(run_dir, run.steps)}
  (run_dir / DONE).write_text(jsonl.dumps(record) + "\n")


def run_in_process(spec: dict, run: Run, peak_flops: float | None = None) -> None:
  """Train `run` in this process; `peak_flops`: the FLOP/s its MFU is measured against (measured
  once per sweep, not per run)."""
  cfg = load_train_config(spec["base"], run.override_list())
  t0 = time.time()
  result = loop.train(cfg, progress=False, peak_flops=peak_flops)
  if result["stopped_by"]:
    raise KeyboardInterrupt(f"{run.name}: stopped by {result['stopped_by']}")
  mark_done(run, time.time() - t0)


def train_command(spec_path: str, run: Run) -> list[str]:
  return [sys.executable, "-m", "train.sweep", str(spec_path), "--run", run.name]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.sweep",
                              description="Run a scaling sweep (see the module docstring).")
  p.add_argument("sweep", help="sweep YAML, e.g. configs/scaling/cpu-isoflop.yaml")
  p.add_argument("--print-commands", nargs="?", const="-", metavar="FILE",
                 help="write one launch command per unfinished run (to FILE, default stdout) and train nothing")
  p.add_argument("--subprocess", action="store_true", help="run each run as `python -m train` in a subprocess")
  p.add_argument("--run", metavar="NAME", help="run only this run")
  p.add_argument("--list", action="store_true", help="print the runs (steps, params, FLOPs) and exit")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  try:
    spec = load_sweep(args.sweep)
    runs = expand(spec)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.run:
    runs = [r for r in runs if r.name == args.run]
    if not runs:
      print(f"error: no run named {args.run!r} in {args.sweep}", file=sys.stderr)
      return 2
  else:
    write_manifest(spec, runs)
  if args.list:
    for r in runs:
      print(f"{r.name:24s} steps {r.steps:6d}  active {r.active_params / 1e6:7.3f}M  total {r.total_params / 1e6:7.3f}M"
            f"  tokens {r.tokens / 1e6:8.3f}M  FLOPs {r.flops:.3e}  {'done' if is_done(r) else ''}")
    return 0
  todo = [r for r in runs if not is_done(r)]
  for r in runs:
    if r not in todo:
      log.info("sweep: %s is done, skipped", r.name)
  if args.print_commands:
    lines = "".join(shlex.join(["python", *train_command(args.sweep, r)[1:]]) + "\n" for r in todo)
    if args.print_commands == "-":
      sys.stdout.write(lines)
    else:
      Path(args.print_commands).write_text(lines)
      print(f"{len(todo)} commands in {args.print_commands}")
    return 0
  t_start = time.time()
  peak = {}  # compute dtype -> FLOP/s, measured once
  for i, run in enumerate(todo, 1):
    log.info("sweep: run %d/%d %s (%d steps, %.3gM active params, %.3g FLOPs)", i, len(todo), run.name, run.steps,
             run.active_params / 1e6, run.flops)
    t0 = time.time()
    if args.subprocess:
      cmd = [sys.executable, "-m", "train", spec["base"], *run.override_list()]
      rc = subprocess.run(cmd).returncode
      if rc:
        print(f"error: {run.name}: `{shlex.join(cmd)}` exited with {rc}", file=sys.stderr)
        return rc
      mark_done(run, time.time() - t0)
    else:
      dtype = load_train_config(spec["base"], run.override_list()).compute_dtype
      if dtype not in peak:
        peak[dtype] = measure_peak_flops(dtype)
      run_in_process(spec, run, peak[dtype])
    log.info("sweep: %s done in %.0f s (sweep %.0f s so far)", run.name, time.time() - t0, time.time() - t_start)
  print(f"sweep done: {len(runs)} runs in {spec['out_dir']} (report: python -m train.sweep_report {spec['out_dir']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
