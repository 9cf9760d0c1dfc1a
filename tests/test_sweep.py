"""train.sweep (expansion, size rule, commands, resumability) and train.sweep_report (fits recover known
laws from synthetic data; a fake sweep directory is reported on without training)."""

import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from parallel.common.errors import ConfigError
from train import sweep, sweep_report

ROOT = Path(__file__).resolve().parents[1]
CPU_SWEEP = ROOT / "configs/scaling/cpu-isoflop.yaml"


def write_spec(tmp_path, **changes) -> Path:
  spec = yaml.safe_load(CPU_SWEEP.read_text())
  spec["base"] = str(ROOT / spec["base"])
  spec["out_dir"] = str(tmp_path / "sweep")
  spec.update(changes)
  path = tmp_path / "sweep.yaml"
  path.write_text(yaml.safe_dump(spec, sort_keys=False))
  return path


# ------------------------------------------------------------------ train.sweep
def test_size_rule_scales_together():
  small, big = sweep.size_overrides(32), sweep.size_overrides(128)
  for key in ("model.num_hidden_layers", "model.num_attention_heads", "model.q_lora_rank", "model.kv_lora_rank",
              "model.moe_intermediate_size", "model.n_routed_experts"):
    assert big[key] > small[key], key
  assert big["model.q_lora_rank"] == 64 and big["model.kv_lora_rank"] == 32 and big["model.num_hidden_layers"] == 4
  with pytest.raises(ConfigError, match="multiple of 16"):
    sweep.size_overrides(40)


def test_isoflop_expansion_spends_each_budget(tmp_path):
  spec = sweep.load_sweep(write_spec(tmp_path))
  runs = sweep.expand(spec)
  assert len(runs) == len(spec["budgets"]) * len(spec["sizes"])
  for run in runs:
    assert run.flops == pytest.approx(run.budget, rel=0.05)  # steps rounded to an integer
    assert run.flops == run.flops_per_token * run.tokens
    assert run.overrides["steps"] == run.steps and run.overrides["eval_every"] == run.steps
    assert run.overrides["optimizer.warmup_steps"] == math.ceil(0.1 * run.steps)
    assert run.overrides["run_dir"] == str(tmp_path / "sweep" / run.name)
  for budget in spec["budgets"]:  # a bigger model gets fewer tokens at the same budget
    group = [r for r in runs if r.budget == budget]
    assert [r.active_params for r in group] == sorted(r.active_params for r in group)
    assert [r.tokens for r in group] == sorted((r.tokens for r in group), reverse=True)
  path = sweep.write_manifest(spec, runs)
  assert [r["name"] for r in json.loads(path.read_text())["runs"]] == [r.name for r in runs]


def test_grid_expansion_and_non_cosine_schedule(tmp_path):
  path = write_spec(tmp_path, budgets=None, sizes=None)
  spec = yaml.safe_load(path.read_text())
  del spec["budgets"], spec["sizes"]
  spec["grid"] = {"optimizer.lr": [1e-3, 3e-3], "model.hidden_size": [32, 64]}
  spec["overrides"] = {**spec["overrides"], "steps": 40, "optimizer.schedule": "wsd"}
  path.write_text(yaml.safe_dump(spec))
  runs = sweep.expand(sweep.load_sweep(path))
  assert len(runs) == 4 and len({r.name for r in runs}) == 4
  assert all(r.steps == 40 and r.budget is None for r in runs)
  assert all(r.overrides["optimizer.decay_steps"] == 40 - r.overrides.get("optimizer.warmup_steps", 20) for r in runs)


def test_isoflop_sweep_per_grid_point(tmp_path):
  """budgets + sizes + grid: an isoFLOP family per grid point; a mapping value sets its keys together."""
  grid = {"optimizer": [{"name": "adamw", "lr": 3e-3}, {"name": "muon", "lr": 6e-3}]}
  runs = sweep.expand(sweep.load_sweep(write_spec(tmp_path, budgets=[3e11], sizes=[16, 32], grid=grid)))
  assert [r.name for r in runs] == ["optimizer=adamw-0.003_C3e11_d16", "optimizer=adamw-0.003_C3e11_d32",
                                    "optimizer=muon-0.006_C3e11_d16", "optimizer=muon-0.006_C3e11_d32"]
  assert [r.point for r in runs] == [{"optimizer.name": "adamw", "optimizer.lr": 3e-3}] * 2 + [
      {"optimizer.name": "muon", "optimizer.lr": 6e-3}] * 2
  assert all(r.overrides["optimizer.name"] == r.point["optimizer.name"] and r.overrides["optimizer.lr"] == r.point[
      "optimizer.lr"] for r in runs)
  assert [r.steps for r in runs[:2]] == [r.steps for r in runs[2:]] and runs[0].size == "d16"
  assert all(r.point is None for r in sweep.expand(sweep.load_sweep(write_spec(tmp_path))))


def test_seeds_repeat_every_run(tmp_path):
  runs = sweep.expand(sweep.load_sweep(write_spec(tmp_path, budgets=[3e11], sizes=[16, 32], seeds=[0, 3])))
  assert [r.name for r in runs] == ["C3e11_d16_s0", "C3e11_d16_s3", "C3e11_d32_s0", "C3e11_d32_s3"]
  assert [(r.seed, r.overrides["seed"]) for r in runs] == [(0, 0), (3, 3)] * 2
  assert runs[0].steps == runs[1].steps and runs[0].overrides["run_dir"].endswith("C3e11_d16_s0")
  for bad in ([], [1, 1], ["a"], 2):
    with pytest.raises(ConfigError, match="seeds"):
      sweep.load_sweep(write_spec(tmp_path, seeds=bad))
  spec = yaml.safe_load(CPU_SWEEP.read_text())
  with pytest.raises(ConfigError, match="not both"):
    sweep.load_sweep(write_spec(tmp_path, seeds=[0, 1], overrides={**spec["overrides"], "seed": 2}))


def test_seeds_are_averaged_with_their_spread():
  """sweep_report.merge_seeds: a point's finished seeds averaged (loss and task metrics), their sample
  standard deviation kept, and the noise the mean of those over points; by hand."""
  key = "cloze/correct_logprob_per_byte"
  row = lambda name, seed, loss, task: {"name": f"{name}_s{seed}", "seed": seed, "budget": 1.0, "flops": 1.0,
                                        "eval_loss": loss, "tasks": {} if task is None else {key: task}}
  rows = [row("a", 0, 2.0, -1.0), row("a", 1, 2.2, -1.4), row("b", 0, 1.0, -0.5), row("b", 1, 1.1, -0.6),
          row("b", 2, 1.2, -0.7), row("c", 0, None, None), {"name": "plain", "seed": None, "eval_loss": 3.0, "tasks": {}}]
  merged, noise = sweep_report.merge_seeds(rows)
  by = {r["name"]: r for r in merged}
  assert set(by) == {"a", "b", "c", "plain"} and by["c"]["eval_loss"] is None and by["plain"]["eval_loss"] == 3.0
  assert by["a"]["eval_loss"] == pytest.approx(2.1) and by["a"]["tasks"][key] == pytest.approx(-1.2)
  assert by["a"]["sd"]["eval_loss"] == pytest.approx(0.2 / math.sqrt(2)) and by["b"]["sd"][key] == pytest.approx(0.1)
  assert by["b"]["seeds"] == [0, 1, 2]
  assert noise["eval_loss"] == pytest.approx((0.2 / math.sqrt(2) + 0.1) / 2)
  assert noise[key] == pytest.approx((0.4 / math.sqrt(2) + 0.1) / 2)


def test_bad_sweep_files(tmp_path):
  with pytest.raises(ConfigError, match="or both"):
    sweep.load_sweep(write_spec(tmp_path, sizes=None))
  with pytest.raises(ConfigError, match="grid: expected"):
    sweep.expand(sweep.load_sweep(write_spec(tmp_path, grid={"seed": 1})))
  with pytest.raises(ConfigError, match="unknown key"):
    sweep.load_sweep(write_spec(tmp_path, budget=[1]))
  with pytest.raises(ConfigError, match="unknown key"):  # a bad override names itself
    sweep.expand(sweep.load_sweep(write_spec(tmp_path, overrides={"optimizer.lrr": 1})))


def test_print_commands_and_skip_finished(tmp_path, capsys):
  path = write_spec(tmp_path, budgets=[2.0e11], sizes=[32, 64])
  runs = sweep.expand(sweep.load_sweep(path))
  # one run finished by its done marker, one by its final eval record; the third is not finished
  done_dir = Path(runs[0].overrides["run_dir"])
  done_dir.mkdir(parents=True)
  (done_dir / sweep.DONE).write_text("{}\n")
  eval_dir = Path(runs[1].overrides["run_dir"])
  eval_dir.mkdir(parents=True)
  (eval_dir / "metrics.jsonl").write_text(json.dumps({"step": runs[1].steps - 1, "eval_loss": 2.0}) + "\n")
  assert not sweep.is_done(runs[1])
  with open(eval_dir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": runs[1].steps, "eval_loss": 1.5}) + "\n")
  assert sweep.is_done(runs[0]) and sweep.is_done(runs[1])
  assert sweep.main([str(path), "--print-commands"]) == 0
  assert capsys.readouterr().out == ""  # both finished: nothing to launch
  out_file = tmp_path / "cmds.txt"
  (done_dir / sweep.DONE).unlink()
  assert sweep.main([str(path), "--print-commands", str(out_file)]) == 0
  lines = out_file.read_text().splitlines()
  assert lines == [shlex.join(["python", "-m", "train.sweep", str(path), "--run", runs[0].name])]
  assert (tmp_path / "sweep" / sweep.MANIFEST).is_file()
  assert sweep.main([str(path), "--run", "nope"]) == 2


# ------------------------------------------------------------------ fits on synthetic data
def test_power_law_recovers_exponent():
  rng = np.random.default_rng(0)
  c = np.geomspace(1e15, 1e21, 12)
  loss = 30.0 * c ** -0.07 * np.exp(rng.normal(0, 0.003, c.size))
  loss[4] *= 1.3  # one bad run: the soft-L1 loss keeps it from dragging the fit
  p = sweep_report.fit_power_law(c, loss)
  assert p["e"] == pytest.approx(-0.07, abs=0.004)
  loss = 1.7 + 400.0 * c ** -0.15 * np.exp(rng.normal(0, 0.002, c.size))
  q = sweep_report.fit_power_law(c, loss, offset=True)
  assert q["e"] == pytest.approx(-0.15, abs=0.02) and q["c"] == pytest.approx(1.7, abs=0.1)


def chinchilla_rows(alpha=0.34, beta=0.28, noise=0.0, seed=0):
  """Runs on isoFLOP grids around the optimum of L = E + A/N^alpha + B/D^beta with D = C / 6N."""
  E, A, B = 1.69, 406.4, 410.7
  rng = np.random.default_rng(seed)
  g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
  rows = []
  for budget in np.geomspace(1e18, 1e22, 5):
    n_star = g * (budget / 6) ** (beta / (alpha + beta))
    for n in n_star * np.geomspace(1 / 8, 8, 9):
      d = budget / (6 * n)
      loss = (E + A / n**alpha + B / d**beta) * math.exp(rng.normal(0, noise))
      rows.append({"name": f"{budget:.0e}_{n:.0f}", "budget": budget, "flops": budget, "tokens": d,
                   "active_params": n, "flops_per_token": 6 * n, "eval_loss": loss})
  return rows


def test_isoflop_fit_recovers_chinchilla_exponents():
  alpha, beta = 0.34, 0.28
  fit = sweep_report.fit_sweep(chinchilla_rows(alpha, beta, noise=0.001))
  assert fit["n_opt_fit"]["a"] == pytest.approx(beta / (alpha + beta), abs=0.03)
  assert fit["d_opt_fit"]["b"] == pytest.approx(alpha / (alpha + beta), abs=0.03)
  assert fit["n_opt_fit"]["a"] + fit["d_opt_fit"]["b"] == pytest.approx(1.0, abs=1e-6)  # C = 6 N D
  assert fit["flops_per_token_fit"]["slope"] == pytest.approx(1.0)
  assert all(not e["extrapolated"] for e in fit["isoflop"])
  assert fit["loss_vs_compute"]["b"] > 0 and fit["loss_vs_compute_offset"] is not None


def test_isoflop_without_minimum_falls_back_to_best_run():
  assert sweep_report.fit_isoflop([1, 2, 4], [1.0, 2.0, 2.5]) is None  # concave: no minimum
  assert sweep_report.fit_isoflop([1, 2], [1.0, 2.0]) is None
  rows = [{"name": f"r{n}", "budget": 1e12, "flops": 1e12, "tokens": 1e12 / (6 * n), "active_params": n,
           "flops_per_token": 6 * n, "eval_loss": loss} for n, loss in [(1e5, 1.0), (2e5, 2.0), (4e5, 2.5)]]
  fit = sweep_report.fit_sweep(rows)
  assert fit["isoflop"][0]["n_opt"] is None and fit["frontier"] == [{"flops": 1e12, "loss": 1.0, "from": "best run"}]
  # a convex curve whose vertex lies below the smallest size: flagged, kept out of the N_opt fit
  rows = [dict(r, eval_loss=loss) for r, loss in zip(rows, [1.0, 1.2, 1.6])]
  rows += [dict(r, budget=1e13, flops=1e13, name=r["name"] + "b") for r in rows]
  fit = sweep_report.fit_sweep(rows)
  assert all(e["extrapolated"] and e["n_opt"] < 1e5 for e in fit["isoflop"])
  assert fit["n_opt_fit"] is None and [f["from"] for f in fit["frontier"]] == ["best run"] * 2


def test_compute_multiplier_between_families():
  """Family B is family A with every run's compute divided by k (same sizes, same losses): B reaches each
  loss with k x less compute, so its multiplier over A is k at every loss; and C(L) by hand."""
  at = sweep_report.compute_multiplier({"a": 2.0, "b": 0.5}, {"a": 1.0, "b": 0.5}, [1.0])[0]
  assert (at["flops_ref"], at["flops"], at["multiplier"]) == (4.0, 1.0, 4.0)  # (2/1)^2 and (1/1)^2
  k, rows = 1.8, chinchilla_rows(noise=0.002, seed=2)
  a = [dict(r, point={"optimizer.name": "adamw"}) for r in rows]
  b = [dict(r, name="b" + r["name"], budget=r["budget"] / k, flops=r["flops"] / k, tokens=r["tokens"] / k,
            point={"optimizer.name": "muon"}) for r in rows]
  fit = sweep_report.fit_families(a + b)
  assert [f["label"] for f in fit["families"]] == ["optimizer.name=adamw", "optimizer.name=muon"]
  law_a, law_b = (f["fit"]["loss_vs_compute"] for f in fit["families"])
  assert law_b["b"] == pytest.approx(law_a["b"], rel=1e-4)
  (m,) = fit["multiplier"]
  assert m["family"] == "optimizer.name=muon" and len(m["at"]) == 5 and not any(x["extrapolated"] for x in m["at"])
  assert m["geomean"] == pytest.approx(k, rel=1e-3) and all(x["multiplier"] == pytest.approx(k, rel=1e-3) for x in m["at"])
  assert "compute multiplier of optimizer.name=muon over optimizer.name=adamw at equal loss: 1.8" in sweep_report.summary(fit)


def test_steps_to_reach_interpolates_between_evals():
  curve = [[100, 2.6], [200, 2.0], [300, 1.9]]
  assert sweep_report.steps_to_reach(curve, 2.1) == pytest.approx(100 + 0.5 / 0.6 * 100)
  assert sweep_report.steps_to_reach(curve, 3.0) == 100.0 and sweep_report.steps_to_reach(curve, 1.0) is None


# ------------------------------------------------------------------ a fake sweep directory
def write_fake_sweep(sweep_dir: Path, rows: list[dict], steps: int = 100, unfinished=()) -> Path:
  """A sweep directory as train.sweep leaves it: the manifest and each run's metrics.jsonl (the eval records
  of row["curve"], else one at steps // 2 and the final one)."""
  manifest = {"base": "configs/tiny.yaml", "overrides": {}, "budgets": sorted({r["budget"] for r in rows
                                                                               if r.get("budget")}), "runs": []}
  for i, r in enumerate(rows):
    run_dir = sweep_dir / r["name"]
    run_dir.mkdir(parents=True)
    curve = r.get("curve") or [[steps // 2, 9.0], [steps, r["eval_loss"]]]
    records = [{"step": steps // 2, "loss": 9.0}, {"step": steps, "loss": 9.0}]
    records += [{"step": s, "elapsed_s": 1.0, "eval_loss": v} for s, v in curve if i not in unfinished or s < steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    manifest["runs"].append({"name": r["name"], "overrides": {"run_dir": "elsewhere/" + r["name"]},
                             "budget": r.get("budget"), "size": None, "steps": steps, "tokens": r["tokens"],
                             "flops": r["flops"], "total_params": 2 * r["active_params"],
                             "active_params": r["active_params"], "flops_per_token": r["flops_per_token"],
                             "seed": r.get("seed"), "point": r.get("point")})
  (sweep_dir / sweep.MANIFEST).write_text(json.dumps(manifest))
  return sweep_dir


def test_report_on_fake_sweep_dir(tmp_path, capsys):
  rows = chinchilla_rows(noise=0.002, seed=1)
  sweep_dir = write_fake_sweep(tmp_path / "fake", rows, unfinished={3})  # run 3: no final eval record
  assert sweep_report.main([str(sweep_dir)]) == 0
  out = capsys.readouterr().out
  assert "N_opt =" in out and "L(C) =" in out
  fit = json.loads((sweep_dir / "fit.json").read_text())
  assert fit["n_runs"] == len(rows) - 1 and len(fit["isoflop"]) == 5
  assert fit["n_opt_fit"]["a"] == pytest.approx(0.28 / 0.62, abs=0.05)
  for name in ("isoflop.png", "frontier.png", "optimal.png"):
    assert (sweep_dir / name).stat().st_size > 1000
  assert sweep_report.main([str(tmp_path / "missing")]) == 2


def test_report_on_fake_families(tmp_path, capsys):
  """An isoFLOP sweep with an optimizer grid is fitted per family; plots per family and families.png."""
  rows = chinchilla_rows(noise=0.002, seed=3)
  rows = [dict(r, name=f"{o}_{r['name']}", point={"optimizer.name": o},
               **({"eval_loss": r["eval_loss"] * 0.95} if o == "muon" else {})) for o in ("adamw", "muon") for r in rows]
  sweep_dir = write_fake_sweep(tmp_path / "fam", rows)
  assert sweep_report.main([str(sweep_dir)]) == 0
  out = capsys.readouterr().out
  assert "[optimizer.name=adamw]" in out and "[optimizer.name=muon]" in out and "compute multiplier of" in out
  fit = json.loads((sweep_dir / "fit.json").read_text())
  assert [len(f["fit"]["isoflop"]) for f in fit["families"]] == [5, 5] and fit["multiplier"][0]["geomean"] > 1
  for name in ("isoflop_0.png", "frontier_1.png", "families.png"):
    assert (sweep_dir / name).stat().st_size > 1000


def test_compare_finds_each_optimizers_best_point_and_its_steps(tmp_path, capsys):
  """--compare optimizer.name on a grid (optimizer x lr x 2 seeds) with eval curves made by hand: the tuned
  lr per optimizer by the seeds' mean final loss, and where each mean curve reaches AdamW's, by hand."""
  curves = {("adamw", 1e-3): [[3.0, 2.6, 2.4], [3.0, 2.6, 2.4]], ("adamw", 2e-3): [[2.9, 2.5, 2.2], [2.9, 2.5, 2.0]],
            ("muon", 1e-3): [[2.5, 1.9, 1.9], [2.7, 2.05, 1.9]], ("muon", 2e-3): [[2.8, 2.4, 2.3], [2.8, 2.4, 2.3]]}
  base = {"budget": None, "flops": 1e12, "tokens": 1e6, "active_params": 1e5, "flops_per_token": 1e6}
  rows = [dict(base, name=f"name={o}_lr={lr}_s{s}", seed=s, point={"optimizer.name": o, "optimizer.lr": lr},
               eval_loss=c[s][-1], curve=[[100 * (i + 1), v] for i, v in enumerate(c[s])])
          for (o, lr), c in curves.items() for s in (0, 1)]
  sweep_dir = write_fake_sweep(tmp_path / "grid", rows, steps=300)
  assert sweep_report.main([str(sweep_dir), "--compare", "optimizer.name"]) == 0
  out = capsys.readouterr().out
  cmp = json.loads((sweep_dir / "fit.json").read_text())["compare"]
  adamw, muon = cmp["values"]
  assert cmp["target_loss"] == pytest.approx(2.1) and adamw["best_point"] == {"optimizer.lr": 2e-3}
  assert muon["best_point"] == {"optimizer.lr": 1e-3} and muon["final_loss"] == pytest.approx(1.9)
  assert adamw["steps_to_match"] == pytest.approx(300) and adamw["step_ratio"] == pytest.approx(1.0)
  mean = [2.6, (1.9 + 2.05) / 2]  # muon's mean curve at 100 and 200 steps
  assert muon["steps_to_match"] == pytest.approx(100 + (mean[0] - 2.1) / (mean[0] - mean[1]) * 100)
  assert muon["step_ratio"] == pytest.approx(muon["steps_to_match"] / 300)
  assert muon["seed_steps_to_match"] == {"0": pytest.approx(100 + 0.4 / 0.6 * 100), "1": pytest.approx(100 + 0.6 / 0.65 * 100)}
  assert "muon: best optimizer.lr=0.001, final 1.9000 +- 0.0000" in out and (sweep_dir / "compare.png").stat().st_size > 1000
  assert sweep_report.main([str(sweep_dir), "--compare", "optimizer.b1"]) == 2
  assert "--compare optimizer.b1" in capsys.readouterr().err


def test_real_micro_sweep_runs_resumes_and_reports(tmp_path):
  """Two 20-step d32 runs in process, a rerun that skips them, then the report (a minute or more)."""
  fpt_tokens = sweep.expand(sweep.load_sweep(write_spec(tmp_path, budgets=[1e12], sizes=[32])))[0]
  per_step = fpt_tokens.flops / fpt_tokens.steps
  path = write_spec(tmp_path, budgets=[20 * per_step, 40 * per_step], sizes=[32], min_steps=5)
  assert sweep.main([str(path)]) == 0
  runs = sweep.expand(sweep.load_sweep(path))
  assert [r.steps for r in runs] == [20, 40]
  for r in runs:
    marker = json.loads((Path(r.overrides["run_dir"]) / sweep.DONE).read_text())
    assert marker["name"] == r.name and 0 < marker["eval_loss"] < 10
  mtime = (tmp_path / "sweep" / runs[0].name / "metrics.jsonl").stat().st_mtime
  assert sweep.main([str(path)]) == 0  # everything finished: trains nothing
  assert (tmp_path / "sweep" / runs[0].name / "metrics.jsonl").stat().st_mtime == mtime
  fit = sweep_report.report(tmp_path / "sweep", plots=False)
  assert fit["n_runs"] == 2 and fit["loss_vs_compute"] is not None


def test_subprocess_mode_launches_train_and_marks_done(tmp_path, monkeypatch):
  path = write_spec(tmp_path, budgets=[2.0e11], sizes=[32])
  calls = []

  def fake_run(cmd):
    calls.append(cmd)
    overrides = dict(item.split("=", 1) for item in cmd[4:])
    run_dir = Path(overrides["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": int(overrides["steps"]), "eval_loss": 2.5}) + "\n")
    return type("Done", (), {"returncode": 0})()

  monkeypatch.setattr(sweep.subprocess, "run", fake_run)
  assert sweep.main([str(path), "--subprocess"]) == 0
  (run,) = sweep.expand(sweep.load_sweep(path))
  base = yaml.safe_load(path.read_text())["base"]
  assert calls == [[sys.executable, "-m", "train", base, *run.override_list()]]
  assert json.loads((Path(run.overrides["run_dir"]) / sweep.DONE).read_text())["eval_loss"] == 2.5
  assert sweep.main([str(path), "--subprocess"]) == 0 and len(calls) == 1  # finished: not launched again


def test_docs_task_law_is_the_committed_fit():
  """docs/scaling.md's downstream law, noise and table are docs/scaling_tasks_fit.json's (the report
  of configs/scaling/cpu-isoflop-tasks.yaml's sweep), rounded as printed."""
  fit = json.loads((ROOT / "docs/scaling_tasks_fit.json").read_text())
  text = (ROOT / "docs/scaling.md").read_text()
  law = fit["tasks"]["heldout_cloze/correct_logprob_per_byte"]["fit"]
  assert f"**{law['a']:.0f} C^-{law['b']:.3f}**" in text and f"rmse {law['rmse_log']:.3f}" in text
  assert f"L(C) = {fit['loss_vs_compute']['a']:.0f} C^-{fit['loss_vs_compute']['b']:.3f}" in text
  assert f"({fit['noise']['heldout_cloze/correct_logprob_per_byte']:.3f} on average" in text
  rows = {r["name"]: r for r in fit["runs"]}
  for c, name in (("3e11", "C3e11_d16"), ("7e11", "C7e11_d32"), ("1.5e12", "C1.5e12_d48")):
    r, key = rows[name], "heldout_cloze/correct_logprob_per_byte"
    line = (f"| {c} | {name.split('_')[1]} | {r['eval_loss']:.3f} ({r['sd']['eval_loss']:.3f}) | "
            f"{r['tasks'][key]:.3f} ({r['sd'][key]:.3f}) | {r['tasks']['heldout_cloze/acc']:.3f}"
            f" ({r['sd']['heldout_cloze/acc']:.3f}) |")
    assert line in text, line


def test_docs_optimizer_comparison_is_the_committed_fit():
  """docs/scaling.md's AdamW-against-Muon numbers are the committed reports' (configs/scaling/
  tiny-optimizers.yaml --compare, cpu-isoflop-optimizers.yaml families), rounded as printed, and the
  goal it states (Muon at AdamW's step-300 loss in at most 0.75x the steps, every seed) holds in them."""
  text = (ROOT / "docs/scaling.md").read_text()
  cmp = json.loads((ROOT / "docs/scaling_optimizers_fit.json").read_text())["compare"]
  adamw, muon = cmp["values"]
  assert (adamw["value"], muon["value"]) == ("adamw", "muon") and adamw["seeds"] == muon["seeds"] == [0, 1, 2]
  for e, lr in ((adamw, "2e-3"), (muon, "8e-3")):
    assert e["best_point"]["optimizer.lr"] == float(lr)
    assert f"| {lr} | {e['final_loss']:.3f} ({e['sd']:.3f}) |" in text
  assert muon["step_ratio"] <= 0.75 and all(s is not None and s <= 0.75 * 300 for s in muon["seed_steps_to_match"].values())
  seeds = ", ".join(f"{s:.0f}" for s in muon["seed_steps_to_match"].values())
  assert f"**{muon['steps_to_match']:.0f} = {muon['step_ratio']:.3f}x** (per seed: {seeds})" in text
  fam = json.loads((ROOT / "docs/scaling_optimizer_families_fit.json").read_text())
  for f, name in zip(fam["families"], ("AdamW", "Muon")):
    law = f["fit"]["loss_vs_compute"]
    assert f"{name} **L(C) = {law['a']:.0f} C^-{law['b']:.3f}**" in text.replace("\n", " ")
  (m,) = fam["multiplier"]
  assert f"is **{m['geomean']:.2f}**" in text.replace("\n", " ")
  for a in m["at"]:
    assert f"{a['multiplier']:.2f} at L = {a['loss']:.3f}" in text.replace("\n", " ")
  assert f"{fam['noise']['eval_loss']:.3f} on average" in text
