"""Fit scaling laws to a finished sweep: `python -m train.sweep_report SWEEP_DIR [--params active|total]
[--compare KEY]`.

Reads SWEEP_DIR/sweep.json (written by train.sweep) and each run's metrics.jsonl: the eval loss logged at
the run's last step (runs without it are unfinished and left out), its parameter count N (active
parameters by default: per-token parameters as DeepSeek counts them, lm_head included, input embedding
not), tokens D = steps x batch_size x seq_len and training FLOPs C = flops_per_token x D (moe.params).
Fits (numpy / scipy), written to SWEEP_DIR/fit.json:

- isoFLOP parabolas: per FLOP budget (>= 3 sizes), L = p2 (ln N)^2 + p1 ln N + p0 by least squares; its
  vertex gives the compute-optimal N_opt(C) and the loss there, L_opt(C). A budget whose parabola opens
  downwards has no minimum; a vertex outside the sizes run is reported but flagged `extrapolated` (the
  optimum lies beyond the sizes: run smaller or bigger ones). Both are left out of the N_opt / D_opt
  fits, and the frontier takes the budget's best run instead. D_opt(C) = C / flops_per_token(N_opt),
  with ln flops_per_token interpolated linearly in ln N over the sweep's runs (for a plain transformer
  this is C / 6N; here attention and the lm_head are in the FLOPs too).
- N_opt(C) = k_N C^a and D_opt(C) = k_D C^b: straight lines in log-log (>= 2 budgets).
- Loss vs compute: L(C) = a C^-b on the frontier (each budget's L_opt, or its best run when it has no
  parabola minimum within its sizes), fitted in log space with a soft-L1 loss (robust to one bad
  point); with >= 4 frontier points also L(C) = c + a C^-b (c: irreducible loss, bounded to [0, min L)).

- Downstream tasks (runs with `eval_tasks`): for each continuous task metric (`.../correct_logprob_per_byte`,
  `.../logprob_per_byte`: log-probabilities, so -value is a loss in nats per byte) the value of each
  budget's best run (lowest eval loss; for a grid, the loss frontier's runs), and -value = a C^-b fitted
  like L(C) (>= 2 points); accuracies are listed beside them, not fitted.
- Seeds (a sweep with `seeds:`): a point's runs (RUN_sSEED) are averaged into one row before any fit
  (eval loss and task metrics: the mean over its finished seeds), and `noise` gives their spread: per
  metric, the mean over points of the seeds' sample standard deviation.
- Families (an isoFLOP sweep with a `grid`, e.g. one per optimizer): each grid point's runs are fitted
  alone as above (fit.json `families`), and each family's compute multiplier over the first at equal
  loss: C_first(L) / C_family(L) from their L(C) = a C^-b, at the first family's frontier losses
  (`extrapolated` where that loss lies outside the family's own frontier), and their geometric mean.
- `--compare KEY` (a grid sweep, e.g. optimizer x learning rate x seeds with eval_every set): for each
  value of grid key KEY, its best point over the other grid keys (lowest final eval loss, seeds
  averaged: a tuned learning rate), and the step at which that point's eval curve (the seeds' mean,
  linear between evaluations) first reaches the first value's best final loss, as a ratio of the first
  value's steps; per seed too (fit.json `compare`, compare.png).

Plots in SWEEP_DIR: isoflop.png (loss vs N per budget, the parabolas and their minima), frontier.png
(every run's loss vs C, the frontier and its fit), optimal.png (N_opt and D_opt vs C with their fits;
hollow markers: extrapolated, not fitted), tasks.png (the task metrics' points and fits vs C, when any);
with families the same per family (isoflop_0.png, ...) and families.png (every family's frontier and L(C)).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import optimize

from parallel.common.errors import DataError
from train.core import jsonl
from train.sweep import MANIFEST, eval_curve, final_eval, final_tasks

CONTINUOUS = ("correct_logprob_per_byte", "logprob_per_byte")  # train/core/lm_eval_adapter.py


# ------------------------------------------------------------------ fits
def fit_power_law(x, y, *, offset: bool = False) -> dict:
  """y = a x^e (offset: y = c + a x^e, c in [0, min y)), least squares on ln y with a soft-L1 loss.
  Returns {a, e, c, rmse_log} (c = 0 without offset)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < (3 if offset else 2) or np.any(x <= 0) or np.any(y <= 0):
    raise ValueError(f"fit_power_law: need >= {3 if offset else 2} positive points, got {len(x)}")
  lx, ly = np.log(x), np.log(y)
  e0, la0 = np.polyfit(lx, ly, 1)
  scale = max(float(np.std(ly)), 1e-6) * 0.1

  if not offset:
    res = optimize.least_squares(lambda p: p[0] + p[1] * lx - ly, [la0, e0], loss="soft_l1", f_scale=scale)
    la, e = res.x
    return {"a": float(math.exp(la)), "e": float(e), "c": 0.0,
            "rmse_log": float(np.sqrt(np.mean((la + e * lx - ly) ** 2)))}
  ymin = float(y.min())
  lx0 = float(np.mean(lx))  # centre ln x so that ln a and e are not tied together

  def model(p):
    la, e, c = p
    return np.log(c + np.exp(la + e * (lx - lx0)))

  best = None
  for frac in (0.0, 0.3, 0.6, 0.9):  # several starts for c; keep the best
    c0 = frac * ymin
    e_start, la_start = np.polyfit(lx - lx0, np.log(np.maximum(y - c0, 1e-12)), 1)
    try:
      res = optimize.least_squares(lambda p: model(p) - ly, [la_start, min(e_start, -1e-3), c0],
                                   bounds=([-np.inf, -10.0, 0.0], [np.inf, 0.0, ymin * (1 - 1e-9)]),
                                   loss="soft_l1", f_scale=scale)
    except ValueError:
      continue
    if best is None or res.cost < best.cost:
      best = res
  la, e, c = best.x
  return {"a": float(math.exp(la - e * lx0)), "e": float(e), "c": float(c),
          "rmse_log": float(np.sqrt(np.mean((model(best.x) - ly) ** 2)))}


def fit_isoflop(params, losses) -> dict | None:
  """L = p2 (ln N)^2 + p1 ln N + p0; None with < 3 sizes or a parabola without a minimum."""
  n, loss = np.asarray(params, np.float64), np.asarray(losses, np.float64)
  if len(np.unique(n)) < 3:
    return None
  p2, p1, p0 = np.polyfit(np.log(n), loss, 2)
  if p2 <= 0:
    return None
  ln_opt = -p1 / (2 * p2)
  return {"coeffs": [float(p2), float(p1), float(p0)], "n_opt": float(math.exp(ln_opt)),
          "loss_opt": float(p0 - p1 * p1 / (4 * p2)),
          "extrapolated": bool(ln_opt < np.log(n.min()) or ln_opt > np.log(n.max()))}


def fit_flops_per_token(params, fpt) -> tuple[float, float]:
  """(slope, intercept) of ln flops_per_token vs ln N over the runs."""
  n, f = np.log(np.asarray(params, np.float64)), np.log(np.asarray(fpt, np.float64))
  if len(np.unique(n)) < 2:
    return 1.0, float(np.mean(f - n))  # one size: flops_per_token proportional to N
  slope, intercept = np.polyfit(n, f, 1)
  return float(slope), float(intercept)


def fit_sweep(rows: list[dict], params_key: str = "active_params") -> dict:
  """All the fits of the module docstring for finished runs `rows` (dicts with budget, flops, tokens,
  eval_loss, flops_per_token and params_key)."""
  rows = [r for r in rows if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
  if not rows:
    raise DataError("no finished runs (no run has an eval loss at its last step)")
  slope, intercept = fit_flops_per_token([r[params_key] for r in rows], [r["flops_per_token"] for r in rows])
  budgets = sorted({r["budget"] for r in rows if r.get("budget") is not None})
  isoflop, frontier = [], []
  for b in budgets:
    group = sorted((r for r in rows if r.get("budget") == b), key=lambda r: r[params_key])
    best = min(group, key=lambda r: r["eval_loss"])
    fit = fit_isoflop([r[params_key] for r in group], [r["eval_loss"] for r in group])
    entry = {"budget": b, "runs": [r["name"] for r in group], "best_run": best["name"],
             "best_loss": best["eval_loss"], "best_params": best[params_key]}
    if fit is not None:
      d_opt = b / math.exp(intercept + slope * math.log(fit["n_opt"]))
      entry.update(fit, d_opt=d_opt, tokens_per_param=d_opt / fit["n_opt"])
    else:
      entry.update(coeffs=None, n_opt=None, loss_opt=None, d_opt=None, extrapolated=None)
    if fit is not None and not fit["extrapolated"]:
      frontier.append({"flops": b, "loss": fit["loss_opt"], "from": "parabola"})
    else:
      frontier.append({"flops": b, "loss": best["eval_loss"], "from": "best run"})
    isoflop.append(entry)
  if not budgets:  # a grid sweep: the lower envelope of loss vs FLOPs
    running, last = math.inf, None
    for r in sorted(rows, key=lambda r: (r["flops"], r["eval_loss"])):  # at equal FLOPs the lowest loss only
      if r["eval_loss"] < running and r["flops"] != last:
        last = r["flops"]
        running = r["eval_loss"]
        frontier.append({"flops": r["flops"], "loss": r["eval_loss"], "from": r["name"]})
  out = {"params_key": params_key, "n_runs": len(rows), "budgets": budgets, "isoflop": isoflop,
         "flops_per_token_fit": {"slope": slope, "intercept": intercept,
                                 "note": "ln flops_per_token = intercept + slope ln N"},
         "frontier": frontier, "loss_vs_compute": None, "loss_vs_compute_offset": None,
         "n_opt_fit": None, "d_opt_fit": None}
  if len(frontier) >= 2:
    fc, fl = [f["flops"] for f in frontier], [f["loss"] for f in frontier]
    p = fit_power_law(fc, fl)
    out["loss_vs_compute"] = {"a": p["a"], "b": -p["e"], "rmse_log": p["rmse_log"], "form": "L = a C^-b"}
    if len(frontier) >= 4:
      q = fit_power_law(fc, fl, offset=True)
      out["loss_vs_compute_offset"] = {"a": q["a"], "b": -q["e"], "c": q["c"], "rmse_log": q["rmse_log"],
                                       "form": "L = c + a C^-b"}
  opt = [e for e in isoflop if e.get("n_opt") and not e["extrapolated"]]
  if len(opt) >= 2:
    c = [e["budget"] for e in opt]
    pn = fit_power_law(c, [e["n_opt"] for e in opt])
    pd = fit_power_law(c, [e["d_opt"] for e in opt])
    out["n_opt_fit"] = {"k": pn["a"], "a": pn["e"], "rmse_log": pn["rmse_log"], "form": "N_opt = k C^a"}
    out["d_opt_fit"] = {"k": pd["a"], "b": pd["e"], "rmse_log": pd["rmse_log"], "form": "D_opt = k C^b"}
  out["tasks"] = fit_tasks(rows, budgets, frontier)
  return out


def fit_tasks(rows: list[dict], budgets: list, frontier: list[dict]) -> dict:
  """{<task>/<metric>: {"points": [[C, value, run]], "fit": -value = a C^-b or None}} over each budget's
  best run (a grid: the frontier's runs); continuous metrics are fitted, accuracies only listed."""
  if budgets:
    chosen = [min((r for r in rows if r.get("budget") == b), key=lambda r: r["eval_loss"]) for b in budgets]
  else:
    names = {f["from"] for f in frontier}
    chosen = [r for r in rows if r["name"] in names]
  keys = sorted({k for r in chosen for k in r.get("tasks", {})
                 if k.rsplit("/", 1)[-1] in CONTINUOUS + ("acc", "acc_norm", "exact_match")})
  out = {}
  for key in keys:
    points = [[r["flops"], r["tasks"][key], r["name"]] for r in chosen
              if isinstance(r.get("tasks", {}).get(key), (int, float))]
    fit = None
    if key.rsplit("/", 1)[-1] in CONTINUOUS and len(points) >= 2 and all(v < 0 for _, v, _ in points):
      p = fit_power_law([c for c, _, _ in points], [-v for _, v, _ in points])
      fit = {"a": p["a"], "b": -p["e"], "rmse_log": p["rmse_log"], "form": "-value = a C^-b"}
    out[key] = {"points": points, "fit": fit}
  return out


# ------------------------------------------------------------------ sweep directory
def load_rows(sweep_dir: str | Path) -> list[dict]:
  """One dict per run of SWEEP_DIR/sweep.json with its final eval loss (None if unfinished)."""
  sweep_dir = Path(sweep_dir)
  path = sweep_dir / MANIFEST
  if not path.is_file():
    raise DataError(f"{path}: no such file (run `python -m train.sweep SWEEP.yaml` first)")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not JSON ({e.msg})") from None
  rows = []
  for run in manifest.get("runs", []):
    run_dir = sweep_dir / run["name"]
    if not run_dir.is_dir():
      run_dir = Path(run["overrides"].get("run_dir", run_dir))
    row = {k: run[k] for k in ("name", "budget", "size", "steps", "tokens", "flops", "total_params",
                               "active_params", "flops_per_token")}
    row["seed"], row["point"] = run.get("seed"), run.get("point")
    row["curve"] = eval_curve(run_dir)
    row["eval_loss"] = final_eval(run_dir, run["steps"])
    row["tasks"] = final_tasks(run_dir, run["steps"])
    rows.append(row)
  return rows


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, axes, path: Path) -> Path:
  for ax in np.atleast_1d(axes):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)
  return path


def plot(sweep_dir: Path, rows: list[dict], fit: dict, tag: str = "", title: str = "") -> list[Path]:
  plt = _pyplot()
  save = lambda fig, ax, path: _save(fig, ax, path.with_name(path.stem + tag + path.suffix))
  prefix = f"{title}: " if title else ""

  key = fit["params_key"]
  done = [r for r in rows if r["eval_loss"] is not None]
  label_n = "active parameters N" if key == "active_params" else "total parameters N"
  paths = []
  colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(fit["isoflop"]), 1)))

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for color, e in zip(colors, fit["isoflop"]):
    group = [r for r in done if r["budget"] == e["budget"]]
    n = np.array([r[key] for r in group])
    ax.scatter(n, [r["eval_loss"] for r in group], color=color, label=f"C = {e['budget']:.2g}")
    if e.get("coeffs"):
      lo, hi = min(n.min(), e["n_opt"]), max(n.max(), e["n_opt"])
      grid = np.exp(np.linspace(np.log(lo) - 0.2, np.log(hi) + 0.2, 100))
      ax.plot(grid, np.polyval(e["coeffs"], np.log(grid)), color=color, lw=1)
      ax.scatter([e["n_opt"]], [e["loss_opt"]], color="none" if e["extrapolated"] else color, marker="*", s=160,
                 edgecolor="k", zorder=3)
  ax.set_xscale("log")
  ax.set_xlabel(label_n)
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title(prefix + "isoFLOP curves (star: parabola minimum; hollow: extrapolated)", fontsize=10)
  paths.append(save(fig, ax, sweep_dir / "isoflop.png"))

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  sc = ax.scatter([r["flops"] for r in done], [r["eval_loss"] for r in done], c=np.log10([r[key] for r in done]),
                  cmap="viridis", s=25)
  fig.colorbar(sc, ax=ax, label=f"log10 {label_n}")
  fr = fit["frontier"]
  ax.scatter([f["flops"] for f in fr], [f["loss"] for f in fr], marker="*", s=160, color="red", edgecolor="k",
             zorder=3, label="frontier")
  grid = np.geomspace(min(r["flops"] for r in done) / 1.5, max(r["flops"] for r in done) * 3, 100)
  if fit["loss_vs_compute"]:
    p = fit["loss_vs_compute"]
    ax.plot(grid, p["a"] * grid ** -p["b"], "r-", lw=1, label=f"L = {p['a']:.3g} C^-{p['b']:.3f}")
  if fit["loss_vs_compute_offset"]:
    q = fit["loss_vs_compute_offset"]
    ax.plot(grid, q["c"] + q["a"] * grid ** -q["b"], "r--", lw=1,
            label=f"L = {q['c']:.3g} + {q['a']:.3g} C^-{q['b']:.3f}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training FLOPs C")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title(prefix + "loss vs compute")
  paths.append(save(fig, ax, sweep_dir / "frontier.png"))

  opt = [e for e in fit["isoflop"] if e.get("n_opt")]
  if opt:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    c = np.array([e["budget"] for e in opt])
    face = ["none" if e["extrapolated"] else None for e in opt]  # hollow: extrapolated, not fitted
    for i, (what, color) in enumerate((("n_opt", "C0"), ("d_opt", "C1"))):
      ax.scatter(c, [e[what] for e in opt], facecolors=[f or color for f in face], edgecolors=color,
                 label=("N_opt (params)", "D_opt (tokens)")[i])
    grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
    if fit["n_opt_fit"]:
      f = fit["n_opt_fit"]
      ax.plot(grid, f["k"] * grid ** f["a"], "C0-", lw=1, label=f"N_opt = {f['k']:.3g} C^{f['a']:.3f}")
      g = fit["d_opt_fit"]
      ax.plot(grid, g["k"] * grid ** g["b"], "C1-", lw=1, label=f"D_opt = {g['k']:.3g} C^{g['b']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_title(prefix + "compute-optimal parameters and tokens (hollow: extrapolated)", fontsize=10)
    paths.append(save(fig, ax, sweep_dir / "optimal.png"))
  fitted = {k: v for k, v in fit.get("tasks", {}).items() if v["fit"] is not None}
  if fitted:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, entry in fitted.items():
      c = np.array([p[0] for p in entry["points"]])
      sd = {r["name"]: r.get("sd", {}).get(key, 0.0) for r in rows}  # (seeds: their spread as error bars)
      line = ax.errorbar(c, [-p[1] for p in entry["points"]], yerr=[sd.get(p[2], 0.0) for p in entry["points"]],
                         fmt="o", capsize=3, label=key).lines[0]
      grid = np.geomspace(c.min(), c.max(), 50)
      ax.plot(grid, entry["fit"]["a"] * grid ** -entry["fit"]["b"], color=line.get_color(), lw=1,
              label=f"{entry['fit']['a']:.3g} C^-{entry['fit']['b']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="-log-probability per byte (nats)",
           title=prefix + "downstream tasks vs compute")
    paths.append(save(fig, ax, sweep_dir / "tasks.png"))
  return paths


def merge_seeds(rows: list[dict]) -> tuple[list[dict], dict]:
  """(one row per point, its seeds averaged; the noise: {metric: mean over points of the seeds' sample
  standard deviation}). Rows without a seed pass through."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    key = r["name"].removesuffix(f"_s{r['seed']}") if r.get("seed") is not None else r["name"]
    groups.setdefault(key, []).append(r)
  out, spreads = [], {}
  for key, group in groups.items():
    done = [r for r in group if r["eval_loss"] is not None]
    if group[0].get("seed") is None or not done:
      out.extend(group if group[0].get("seed") is None else [{**group[0], "name": key, "seeds": []}])
      continue
    row = {**done[0], "name": key, "seeds": [r["seed"] for r in done]}
    metrics = {"eval_loss": [r["eval_loss"] for r in done]}
    for k in sorted({k for r in done for k in r["tasks"] if not k.endswith("_stderr")}):
      values = [r["tasks"][k] for r in done if isinstance(r["tasks"].get(k), (int, float))]
      if len(values) == len(done):
        metrics[k] = values
    row["eval_loss"] = float(np.mean(metrics["eval_loss"]))
    row["seed_curves"] = {r["seed"]: r.get("curve", []) for r in done}
    steps = [[s for s, _ in c] for c in row["seed_curves"].values()]
    if all(st == steps[0] for st in steps) and steps[0]:  # the mean curve where every seed evaluated alike
      losses = np.array([[v for _, v in c] for c in row["seed_curves"].values()])
      row["curve"] = [[s, float(v)] for s, v in zip(steps[0], losses.mean(0))]
      row["curve_sd"] = [float(v) for v in (losses.std(0, ddof=1) if len(done) > 1 else 0 * losses[0])]
    else:  # seeds evaluated at different steps: no mean curve (not one seed's in its place)
      row["curve"], row["curve_sd"] = [], None
    row["tasks"] = {k: float(np.mean(v)) for k, v in metrics.items() if k != "eval_loss"}
    row["sd"] = {k: float(np.std(v, ddof=1)) for k, v in metrics.items() if len(v) > 1}
    for k, sd in row["sd"].items():
      spreads.setdefault(k, []).append(sd)
    out.append(row)
  return out, {k: float(np.mean(v)) for k, v in spreads.items()}


# ------------------------------------------------------------------ families and comparisons
def _label(point: dict | None) -> str:
  return ", ".join(f"{k}={v}" for k, v in (point or {}).items()) or "all"


def _family_key(row: dict) -> str:
  return repr(sorted((row.get("point") or {}).items()))


def compute_multiplier(ref: dict, other: dict, losses) -> list[dict]:
  """The compute multiplier of `other` over `ref` at equal loss from their laws L = a C^-b: at each loss L,
  C_ref(L) / C_other(L) with C(L) = (a / L)^(1/b) (> 1: `other` reaches L with less compute)."""
  flops = lambda law, loss: (law["a"] / loss) ** (1 / law["b"])
  return [{"loss": float(x), "flops_ref": flops(ref, x), "flops": flops(other, x),
           "multiplier": flops(ref, x) / flops(other, x)} for x in losses]


def fit_families(rows: list[dict], params_key: str = "active_params") -> dict:
  """An isoFLOP sweep with a grid: each grid point's runs (a family) fitted alone (fit_sweep), and each
  family's compute multiplier over the first family at the first's frontier losses (`extrapolated` where
  a loss lies outside the other family's frontier; the geometric mean is over the others, or all)."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(_family_key(r), []).append(r)
  families = []
  for group in groups.values():
    try:
      fit = fit_sweep(group, params_key)
    except DataError:
      fit = None  # nothing finished in this family yet
    families.append({"label": _label(group[0].get("point")), "point": group[0].get("point"), "fit": fit})
  ref, multipliers = families[0], []
  for fam in families[1:]:
    entry = {"family": fam["label"], "vs": ref["label"], "at": [], "geomean": None}
    laws = [f["fit"] and f["fit"]["loss_vs_compute"] for f in (ref, fam)]
    if all(laws):
      own = [f["loss"] for f in fam["fit"]["frontier"]]
      entry["at"] = compute_multiplier(*laws, [f["loss"] for f in ref["fit"]["frontier"]])
      for a in entry["at"]:
        a["extrapolated"] = not min(own) <= a["loss"] <= max(own)
      inside = [a["multiplier"] for a in entry["at"] if not a["extrapolated"]] or [a["multiplier"] for a in entry["at"]]
      entry["geomean"] = float(np.exp(np.mean(np.log(inside))))
    multipliers.append(entry)
  return {"params_key": params_key, "n_runs": sum(f["fit"]["n_runs"] for f in families if f["fit"]),
          "families": families, "multiplier": multipliers}


def steps_to_reach(curve: list, target: float) -> float | None:
  """The first step at which `curve` ([[step, loss], ...]) is at or below `target`, linear between
  evaluations; None if it never is."""
  for i, (step, loss) in enumerate(curve):
    if loss <= target:
      if i == 0:
        return float(step)
      s0, l0 = curve[i - 1]
      return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
  return None


def compare(rows: list[dict], key: str) -> dict:
  """A grid sweep's points grouped by the value of grid key `key` (e.g. optimizer.name): for each value its
  best point over the grid's other keys (lowest final eval loss, seeds averaged: e.g. its tuned learning
  rate) and the steps its eval curve (the seeds' mean) takes to reach the first value's best final loss,
  with their ratio to the first value's steps; per seed as well."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    if key not in (r.get("point") or {}):
      raise DataError(f"--compare {key}: run {r['name']} has no grid value for {key}"
                      f" (its grid: {sorted(r.get('point') or {})})")
    groups.setdefault(repr(r["point"][key]), []).append(r)
  entries = []
  for group in groups.values():
    entry = {"value": group[0]["point"][key], "points": [
        {"name": r["name"], "point": {k: v for k, v in r["point"].items() if k != key}, "eval_loss": r["eval_loss"],
         "sd": r.get("sd", {}).get("eval_loss")} for r in group]}
    done = [r for r in group if r["eval_loss"] is not None]
    if done:
      best = min(done, key=lambda r: r["eval_loss"])
      entry.update(best=best["name"], best_point=entry["points"][group.index(best)]["point"],
                   final_loss=best["eval_loss"], sd=best.get("sd", {}).get("eval_loss"), steps=best["steps"],
                   seeds=best.get("seeds"), curve=best["curve"], curve_sd=best.get("curve_sd"),
                   seed_curves=best.get("seed_curves", {}))
    entries.append(entry)
  ref = entries[0]
  if "final_loss" not in ref:
    raise DataError(f"--compare {key}: no finished run for {key}={ref['value']} (the reference)")
  for e in entries:
    if "final_loss" not in e:
      continue
    e["steps_to_match"] = steps_to_reach(e["curve"], ref["final_loss"])
    e["step_ratio"] = e["steps_to_match"] / ref["steps"] if e["steps_to_match"] is not None else None
    e["seed_steps_to_match"] = {seed: steps_to_reach(c, ref["final_loss"]) for seed, c in e.pop("seed_curves").items()}
  return {"key": key, "reference": ref["value"], "target_loss": ref["final_loss"], "values": entries}


def report(sweep_dir: str | Path, params_key: str = "active_params", plots: bool = True,
           compare_key: str | None = None) -> dict:
  sweep_dir = Path(sweep_dir)
  rows, noise = merge_seeds(load_rows(sweep_dir))
  if len({_family_key(r) for r in rows if r.get("budget") is not None}) > 1:
    fit = fit_families(rows, params_key)
  else:
    fit = fit_sweep(rows, params_key)
  if compare_key:
    fit["compare"] = compare(rows, compare_key)
  fit["runs"] = rows
  if noise:
    fit["noise"] = noise
  (sweep_dir / "fit.json").write_text(jsonl.dumps(fit, indent=1) + "\n")
  if plots:
    fit["plots"] = [str(p) for p in plot_all(sweep_dir, rows, fit)]
  return fit


def plot_all(sweep_dir: Path, rows: list[dict], fit: dict) -> list[Path]:
  """plot() for a sweep, or for each family (files tagged _<family number>) plus families.png; compare.png."""
  if "families" not in fit:
    paths = plot(sweep_dir, rows, fit)
  else:
    paths = []
    for i, fam in enumerate(fit["families"]):
      if fam["fit"]:
        group = [r for r in rows if _family_key(r) == _family_key(fam)]
        paths += plot(sweep_dir, group, fam["fit"], tag=f"_{i}", title=fam["label"])
    paths.append(plot_families(sweep_dir, rows, fit))
  if "compare" in fit:
    paths.append(plot_compare(sweep_dir, fit["compare"]))
  return paths


def plot_families(sweep_dir: Path, rows: list[dict], fit: dict) -> Path:
  """families.png: every family's runs and frontier vs compute with its L(C), the multipliers in the title."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.6, 4.6))
  for i, fam in enumerate(fit["families"]):
    done = [r for r in rows if _family_key(r) == _family_key(fam) and r["eval_loss"] is not None]
    ax.scatter([r["flops"] for r in done], [r["eval_loss"] for r in done], color=f"C{i}", s=12, alpha=0.5)
    if not fam["fit"]:
      continue
    fr = fam["fit"]["frontier"]
    ax.scatter([f["flops"] for f in fr], [f["loss"] for f in fr], color=f"C{i}", marker="*", s=150, edgecolor="k",
               zorder=3, label=f"{fam['label']} (frontier)")
    law = fam["fit"]["loss_vs_compute"]
    if law:
      grid = np.geomspace(min(f["flops"] for f in fr) / 1.5, max(f["flops"] for f in fr) * 1.5, 50)
      ax.plot(grid, law["a"] * grid ** -law["b"], color=f"C{i}", lw=1, label=f"L = {law['a']:.3g} C^-{law['b']:.3f}")
  mult = "; ".join(f"{m['family']}: x{m['geomean']:.2f}" for m in fit["multiplier"] if m["geomean"])
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="final eval loss (nats/token)")
  ax.set_title("loss vs compute per family" + (f"\ncompute multiplier at equal loss vs {fit['families'][0]['label']}: "
                                               f"{mult}" if mult else ""), fontsize=9)
  return _save(fig, ax, sweep_dir / "families.png")


def plot_compare(sweep_dir: Path, cmp: dict) -> Path:
  """compare.png: final eval loss over each value's points (the tuning curve), and each value's best point's
  eval curve (seeds' mean, +-sd) with the reference's final loss and where each reaches it."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
  for i, e in enumerate(cmp["values"]):
    pts = [q for q in e["points"] if q["eval_loss"] is not None]
    xs = [next(iter(q["point"].values()), j) if len(q["point"]) == 1 else j for j, q in enumerate(pts)]
    left.errorbar(xs, [q["eval_loss"] for q in pts], yerr=[q["sd"] or 0 for q in pts], fmt="o-", capsize=3,
                  color=f"C{i}", label=f"{cmp['key']}={e['value']}")
    if "curve" not in e:
      continue
    steps, loss = np.array([c[0] for c in e["curve"]]), np.array([c[1] for c in e["curve"]])
    sd = np.array(e["curve_sd"] or np.zeros_like(loss))
    right.plot(steps, loss, color=f"C{i}", label=f"{e['value']} ({_label(e['best_point'])})")
    right.fill_between(steps, loss - sd, loss + sd, color=f"C{i}", alpha=0.2)
    if e.get("steps_to_match") is not None:
      right.axvline(e["steps_to_match"], color=f"C{i}", ls=":", lw=1)
  first = cmp["values"][0]["points"][0]["point"]
  if len(first) == 1 and all(isinstance(v, (int, float)) for v in first.values()):
    left.set_xscale("log")
    left.set_xlabel(next(iter(first)))
  else:
    left.set_xlabel("grid point")
  left.set(ylabel="final eval loss (seeds' mean +- sd)", title="tuning")
  right.axhline(cmp["target_loss"], color="k", ls="--", lw=1, label=f"{cmp['reference']}'s final loss")
  ratios = ", ".join(f"{e['value']}: {e['step_ratio']:.2f}x" for e in cmp["values"] if e.get("step_ratio"))
  right.set(xlabel="step", ylabel="eval loss", ylim=(cmp["target_loss"] * 0.9, cmp["target_loss"] * 1.4),
            title=f"best points; steps to the reference's final loss: {ratios}")
  right.title.set_fontsize(9)
  return _save(fig, (left, right), sweep_dir / "compare.png")


def summary(fit: dict) -> str:
  if "families" in fit:
    lines = [f"{fit['n_runs']} finished runs in {len(fit['families'])} families; N = {fit['params_key']}"]
    for fam in fit["families"]:
      lines.append(f"[{fam['label']}]")
      lines += ["  " + x for x in (summary(fam["fit"]).splitlines() if fam["fit"] else ["no finished runs"])]
    for m in fit["multiplier"]:
      at = ", ".join(f"{a['multiplier']:.3g} at L={a['loss']:.4g}{' (extrapolated)' if a['extrapolated'] else ''}"
                     for a in m["at"])
      lines.append(f"compute multiplier of {m['family']} over {m['vs']} at equal loss: "
                   + (f"{m['geomean']:.3g} (geometric mean; {at})" if m["geomean"] else "needs L(C) for both"))
    return "\n".join(lines + _compare_lines(fit))
  lines = [f"{fit['n_runs']} finished runs; N = {fit['params_key']}"]
  for e in fit["isoflop"]:
    if e.get("n_opt"):
      lines.append(f"C = {e['budget']:.3g}: N_opt {e['n_opt']:.4g}, D_opt {e['d_opt']:.4g} ({e['tokens_per_param']:.1f}"
                   f" tokens/param), L_opt {e['loss_opt']:.4f}{' (extrapolated)' if e['extrapolated'] else ''}")
    else:
      lines.append(f"C = {e['budget']:.3g}: no parabola minimum; best run {e['best_run']} loss {e['best_loss']:.4f}")
  if fit["loss_vs_compute"]:
    p = fit["loss_vs_compute"]
    lines.append(f"L(C) = {p['a']:.4g} C^-{p['b']:.4f}")
  if fit["loss_vs_compute_offset"]:
    q = fit["loss_vs_compute_offset"]
    lines.append(f"L(C) = {q['c']:.4g} + {q['a']:.4g} C^-{q['b']:.4f}")
  if fit["n_opt_fit"]:
    lines.append(f"N_opt = {fit['n_opt_fit']['k']:.4g} C^{fit['n_opt_fit']['a']:.4f};"
                 f" D_opt = {fit['d_opt_fit']['k']:.4g} C^{fit['d_opt_fit']['b']:.4f}")
  for key, entry in fit.get("tasks", {}).items():
    values = ", ".join(f"{v:.4g}" for _, v, _ in entry["points"])
    law = f"; -value = {entry['fit']['a']:.4g} C^-{entry['fit']['b']:.4f}" if entry["fit"] else ""
    lines.append(f"{key}: {values} (best run per budget){law}")
  for key, sd in fit.get("noise", {}).items():
    lines.append(f"seed-to-seed sd of {key}: {sd:.4g} (mean over points)")
  return "\n".join(lines + _compare_lines(fit))


def _compare_lines(fit: dict) -> list[str]:
  if "compare" not in fit:
    return []
  cmp = fit["compare"]
  lines = [f"compare {cmp['key']}: target = {cmp['reference']}'s best final eval loss {cmp['target_loss']:.4f}"]
  for e in cmp["values"]:
    if "final_loss" not in e:
      lines.append(f"  {e['value']}: no finished run")
      continue
    sd = f" +- {e['sd']:.4f}" if e.get("sd") is not None else ""
    reach = (f"reaches the target at step {e['steps_to_match']:.0f} = {e['step_ratio']:.3f}x of {e['steps']}"
             if e["steps_to_match"] is not None else "never reaches the target")
    seeds = ", ".join(f"s{k}: {v:.0f}" if v is not None else f"s{k}: never" for k, v in e["seed_steps_to_match"].items())
    lines.append(f"  {e['value']}: best {_label(e['best_point'])}, final {e['final_loss']:.4f}{sd}; {reach}"
                 + (f" (per seed: {seeds})" if seeds else ""))
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.sweep_report", description="Fit scaling laws to a sweep directory.")
  p.add_argument("sweep_dir", help="the sweep's out_dir (holds sweep.json)")
  p.add_argument("--params", choices=["active", "total"], default="active", help="parameter count N (default: active)")
  p.add_argument("--compare", metavar="KEY", help="a grid key (e.g. optimizer.name): each value's best point over"
                 " the other keys and the steps it takes to reach the first value's final loss")
  p.add_argument("--no-plots", action="store_true")
  args = p.parse_args(argv)
  try:
    fit = report(args.sweep_dir, f"{args.params}_params", plots=not args.no_plots, compare_key=args.compare)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary(fit))
  print(f"fit: {Path(args.sweep_dir) / 'fit.json'}" + (f"; plots: {', '.join(fit['plots'])}" if "plots" in fit else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
