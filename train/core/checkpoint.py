"""Orbax checkpoints of a training run: save, resume, preemption.

Layout: `RUN_DIR/checkpoints/<step>/`, one Orbax step directory written by `ocp.CheckpointManager`
(asynchronously: the arrays are copied to host memory, then written by a background thread while
training continues), holding the items

  model/      {"params", "rest"}: float32 master weights and the router biases (the `rest` of the
              model state), an Orbax PyTree (OCDBT); `python -m train.export` reads only this item
  optimizer/  {"opt", "step", "guard"}: the AdamW state, the step counter and the spike guard's running
              mean of the loss
  data/       the Grain iterator state of every process, `process_<i>-of-<n>.json`
              (grain.checkpoint.CheckpointSave); absent in checkpoints made from HF weights
  config/     the resolved TrainConfig (JSON, `TrainConfig.to_dict`)
  meta/       {"format", "step", "process_count", "device_count", "mesh", "data_seed", "pipeline_layout"}
  checksums/  a CRC-32 of every array shard saved, per process (train/core/checksums.py)

A restore checks every shard it reads against its checksum (`verify`: a restored shard holding
saved shards is checked on each of them, so a restore onto fewer devices is checked too; one split
finer than the save cannot be, and is counted as unchecked). A checkpoint that fails is named and
moved aside to `<step>.corrupt`, and the run falls back to the newest one that verifies (saying so),
or stops in one line when none does: "the last good checkpoint" of any message is never one known
bad. Checkpoints written before checksums existed restore unchecked (with a log line).

Training draws no random numbers after initialisation (no dropout), so there is no RNG state to
save: parameters, optimiser state, router biases and the data position determine the rest of the
run, and a resumed run reproduces the uninterrupted one bitwise (on the same hardware and mesh).

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and renames it to `<step>` once every
item is written, so a save interrupted by `kill -9` leaves only a temporary directory, which is
never taken for a checkpoint and is deleted at the next start.

Resuming (`resume: true`, the default) restores the newest step onto the current mesh: the arrays
are read with the shardings of the state `build` made, so a checkpoint saved on one mesh or device
count restores onto any other. With pipeline stages the MoE stack (with its optimizer moments and
router biases) is stored in the pipeline's slot order (parallel/pipeline.py), recorded in meta as
`pipeline_layout` [stages, repeats]; a checkpoint of another stage count or repeats is read in its own
order and rearranged on device (`relayout`). The data iterator:
  - same number of processes: every process continues its iterator exactly where it stopped (no
    document repeated or skipped);
  - a different number of processes, or a changed data pipeline (`data`, `tokenizer`, `seq_len`,
    `batch_size` or `seed`): the saved iterator states do not fit the new pipeline, so the data
    restarts with a new shuffle seed (derived from `seed` and the step, and recorded in later
    checkpoints): the documents of the epoch in progress may repeat or be skipped, and a warning
    says so.
`resume: false` refuses to start when the run directory holds checkpoints.

Preemption (SIGTERM / SIGINT: finish the step, save, exit 0; a second one aborts) is
train/core/preemption.py; an abort leaves an interrupted save as such a temporary directory. Reading
a step into a model for the tools is train/core/model_io.py; Orbax's noise when a save or a restore
fails, train/core/orbax_noise.py.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel import pipeline
from parallel.common.errors import CheckpointError, ConfigError, RunFailed
from parallel.pipeline import Layout
from train.core import orbax_noise
from train.core.checksums import ChecksumSave, any_process, read_checksums, shard_checksums, verify
from train.core.train_config import TrainConfig
from train.core.orbax_noise import TMP_MARK

log = logging.getLogger("train")

FORMAT = "deepseek-jax/train-checkpoint/1"
ITEMS = ("model", "optimizer", "data", "config", "meta", "checksums")
CORRUPT = ".corrupt"  # a step directory whose bytes failed their checksums, moved aside
# the keys that define the training data pipeline: an iterator state only fits the pipeline it came from
DATA_KEYS = ("data", "tokenizer", "seq_len", "batch_size", "seed", "data_workers")


def checkpoint_dir(run_dir) -> Path:
  return Path(run_dir) / "checkpoints"


def finished_steps(directory: Path) -> list[int]:
  """The steps of the finished checkpoints in a checkpoints directory, ascending (the temporary
  directory of a save in progress or interrupted never counts)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def resume_hint(directory: Path) -> str:
  """Where a run that stopped without saving resumes from (its checkpoints directory)."""
  done = finished_steps(directory)
  if not done:
    return "no checkpoint was written"
  return f"nothing saved after step {done[-1]}, the newest complete checkpoint; run the same command to resume from it"


def step_dir(run_dir, step: int | None = None) -> Path:
  """RUN_DIR/checkpoints/<step>: `step`, or the newest finished checkpoint."""
  root = checkpoint_dir(run_dir)
  if not Path(run_dir).is_dir():
    raise ConfigError(f"{run_dir}: no such run directory; give the run_dir of a training run")
  steps = finished_steps(root)
  if not steps:
    raise ConfigError(f"{run_dir}: no checkpoints (nothing in {root}); train first, or give another run directory")
  if step is None:
    return root / str(steps[-1])
  if step not in steps:
    raise ConfigError(f"{root}: no step {step}; it has {', '.join(map(str, steps[-10:]))}")
  return root / str(step)


def remove_interrupted_saves(directory: Path) -> None:
  """Delete the temporary directories of saves cut short (kill -9, a lost host): never a checkpoint."""
  if jax.process_index() == 0 and directory.is_dir():
    for p in directory.glob(f"*{TMP_MARK}*"):
      log.info("checkpoint: removing %s (a save that did not finish)", p)
      shutil.rmtree(p, ignore_errors=True)


def _cause(e: BaseException) -> str:
  """What made a write fail, short: the operating system's error where tensorstore's long message
  ends with one ("... No space left on device [os_error_code='28']"), else `_one_line`."""
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror} (errno {e.errno})"
  os_error = re.search(r"([^:]+) \[os_error_code='(\d+)'\]", str(e))
  if os_error:
    return f"{os_error.group(1).strip()} (errno {os_error.group(2)})"
  return _one_line(e)


def _corruption(e: BaseException) -> str | None:
  """What a restore error says is corrupt, when it says so (tensorstore: compressed bytes that no
  longer decompress, "Data corruption detected"), short; else None."""
  chain = []
  while e is not None and len(chain) < 8:
    chain.append(str(e))
    e = e.__cause__ or e.__context__
  for text in reversed(chain):  # the innermost says what; the outer ones wrap it in a TensorStore spec
    if re.search(r"data corruption|DATA_LOSS", text, re.IGNORECASE):
      m = re.search(r'Error reading "([^"]+)".*?: ([^;:]*(?:data corruption|DATA_LOSS)[^;]*)', text, re.IGNORECASE)
      return f"{m.group(1)}: {m.group(2).strip()}" if m else text.strip().splitlines()[0][:200]
  return None


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  line = f"{type(e).__name__}: {text[0] if text else ''}"
  return line if len(line) <= 240 else line[:237] + "..."


def _manager(directory: Path, keep_last: int = 0, keep_every: int = 0, read_only: bool = False):
  policies = [ocp.checkpoint_managers.LatestN(keep_last if keep_last > 0 else None)]
  if keep_every > 0:
    policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
  # The step directory is made before save() returns, so that a directory that cannot be written
  # fails the save at once (made in the background, a failure surfaces as a 300 s barrier timeout).
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True, cleanup_tmp_directories=False, create=not read_only,
      read_only=read_only, preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(directory.absolute(), options=options)


def _check_directory(directory: Path) -> None:
  if directory.exists() and not directory.is_dir():
    raise CheckpointError(f"{directory}: exists but is not a directory; move it away or pick another run_dir")


def validate_step_dir(path: Path) -> dict:
  """The meta of a finished checkpoint directory; CheckpointError if it is not one of ours."""
  missing = [i for i in ("model", "optimizer", "config", "meta") if not (path / i).is_dir()]
  if missing:
    raise CheckpointError(f"{path}: not a checkpoint written by `python -m train` (no {', '.join(missing)});"
                          " move it out of the checkpoints directory or pick another run_dir")
  try:
    meta = json.loads((path / "meta" / "metadata").read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable meta ({_one_line(e)}); delete this step directory to resume from"
                          " an earlier one") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: meta format {meta.get('format') if isinstance(meta, dict) else meta!r} is not"
                          f" {FORMAT!r}; move it away or pick another run_dir")
  return meta


def read_config(path: Path) -> TrainConfig:
  """The TrainConfig stored in a checkpoint step directory."""
  try:
    raw = json.loads((path / "config" / "metadata").read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable config ({_one_line(e)})") from None
  raw["profile_steps"] = raw.get("profile_steps")
  return TrainConfig.from_dict(raw, where=f"{path}/config")


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
  """'key old -> new' for every leaf that differs between two TrainConfig dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_changes(a, b, f"{prefix}{k}.")
    elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
      out.append(f"{prefix}{k} {a!r} -> {b!r}")
  return out


def data_seed_after(seed: int, step: int) -> int:
  """The shuffle seed of a data pipeline restarted at `step` (a process-count change)."""
  return (seed * 1_000_003 + step * 7919 + 1) % 2**32


class Checkpoints:
  """The checkpoints of one run: `resume_plan()` at start-up, `restore()`, `save()` in the loop,
  `close()` at the end (waits for the last save to be written)."""

  def __init__(self, cfg: TrainConfig):
    orbax_noise.quiet()  # a failed save or restore: the one-line error says it
    self.cfg = cfg
    self.directory = checkpoint_dir(cfg.run_dir)
    _check_directory(self.directory)
    self.data_seed = cfg.seed
    self.saving, self.broken, self.now = None, False, None
    remove_interrupted_saves(self.directory)  # before anything else looks at the directory
    self.mngr = _manager(self.directory, cfg.keep_last, cfg.keep_every)

  # ------------------------------------------------------------------ resuming
  def steps(self) -> list[int]:
    return finished_steps(self.directory)

  def resume_plan(self) -> dict | None:
    """None for a fresh run; else {step, path, meta, restore_data, data_seed} of the newest checkpoint.
    Sets `self.data_seed`: build the training data with it."""
    steps = self.steps()
    if not steps:
      return None
    if not self.cfg.resume:
      raise CheckpointError(f"{self.directory} holds checkpoints (steps {', '.join(map(str, steps[-3:]))}) and"
                            " resume=false: pick another run_dir or delete them")
    return self._plan(steps[-1])

  def _plan(self, step: int) -> dict:
    path = self.directory / str(step)
    meta = validate_step_dir(path)
    n_proc = jax.process_count()
    has_data = (path / "data").is_dir()
    same = meta.get("process_count") == n_proc
    old = read_config(path).to_dict()
    pipeline = [c for c in config_changes({k: old.get(k) for k in DATA_KEYS},
                                          {k: getattr(self.cfg, k) for k in DATA_KEYS})]
    restore_data = has_data and same and not pipeline
    self.data_seed = int(meta.get("data_seed", self.cfg.seed))
    if has_data and not restore_data:
      self.data_seed = data_seed_after(self.cfg.seed, step)
      why = (f"the data pipeline changed ({', '.join(pipeline)})" if pipeline else
             f"it was written by {meta.get('process_count')} process(es), this run has {n_proc}")
      log.warning("checkpoint %s: %s, so the data iterators cannot continue where they stopped: the data"
                  " restarts with shuffle seed %d (documents of the epoch in progress may repeat or be"
                  " skipped)", path, why, self.data_seed)
    return {"step": step, "path": path, "meta": meta, "restore_data": restore_data, "data_seed": self.data_seed}

  def restore(self, plan: dict, state, data_iter, par=None):
    """The state of `plan`'s checkpoint, laid out like `state` (the fresh state `build` made; its
    arrays are freed first, so memory holds one state at a time); `data_iter` continues in place
    when `plan['restore_data']`. A checkpoint that fails its checksums is moved aside and the newest
    earlier one that verifies is restored instead (see the module docstring): `plan` is updated in
    place to the one restored (its "step" is where the run continues)."""
    target = abstract_like(state, par)
    for x in jax.tree.leaves(state):
      if isinstance(x, jax.Array):
        x.delete()
    del state
    failed = []
    while True:
      got, bad = self._restore_checked(plan, target, data_iter, par)
      if not bad:
        break
      failed.append(f"{plan['path']} ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})")
      self._set_aside(plan["step"])
      older = self.steps()
      if not older:
        raise CheckpointError(f"checkpoint {'; '.join(failed)} is corrupt (its bytes changed on disk after it was"
                              f" written), moved aside as <step>{CORRUPT}; no checkpoint of {self.directory} verifies:"
                              " run the same command to start from step 0, or restore the files from a copy")
      seed, bad_step = self.data_seed, plan["step"]
      plan.update(self._plan(older[-1]))
      if plan["data_seed"] != seed:
        raise CheckpointError(f"checkpoint {failed[-1]} is corrupt, moved aside as <step>{CORRUPT}; the newest that"
                              f" remains, {plan['path']}, was written with another data order: run the same command"
                              " to resume from it")
      log.warning("checkpoint %s is corrupt (its bytes changed on disk after it was written): moved aside as %s%s;"
                  " falling back to %s", failed[-1], bad_step, CORRUPT, plan["path"])
    return got

  def _restore_checked(self, plan: dict, target, data_iter, par):
    """(the restored state, the shards that failed their checksums on any process)."""
    path, step = plan["path"], plan["step"]
    src = saved_layout(plan["meta"], self.cfg.model.num_moe_layers)
    dst = pipeline_layout(self.cfg, par)
    final, target = target, relayout_target(target, src, dst)
    items = {
        "model": ocp.args.StandardRestore({"params": target["params"], "rest": target["rest"]}),
        "optimizer": ocp.args.StandardRestore({"opt": target["opt"], "step": target["step"],
                                               "guard": target["guard"]}),
    }
    if plan["restore_data"]:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    orbax_noise.quiet()
    try:
      got = self.mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean this directory is unusable
      changes = [c for c in config_changes(read_config(path).to_dict(), self.cfg.to_dict())
                 if c.startswith(("model.", "mesh.redundant_experts "))]  # (the copies' placement is saved)
      if changes:
        raise CheckpointError(f"{path}: written for another model ({'; '.join(changes[:3])}): undo the change or"
                              f" pick another run_dir ({_one_line(e)})") from None
      # Compressed bytes that no longer decompress, or (where the changed bytes fall on the array store's
      # index rather than on a chunk) files that no longer read: either way this step's files changed.
      got, bad = None, [_corruption(e) or f"unreadable: {_one_line(e)}"]
    else:
      saved = read_checksums(path)
      bad, checked = verify({"model": got["model"], "optimizer": got["optimizer"]}, saved) if saved is not None else ([], 0)
    if any_process(bool(bad)):
      return None, bad or ["a shard of another process fails its checksum"]
    if saved is None:
      log.info("checkpoint %s has no checksums (written before they existed): restored unchecked", path)
    elif checked:
      log.info("checkpoint %s: %d array shard(s) match their checksums", path, checked)
    else:
      log.warning("checkpoint %s: none of its checksums fits a shard restored here (saved on finer shards, or in"
                  " another dtype): restored unchecked", path)
    old = read_config(path).to_dict()
    changes = [c for c in config_changes(old, self.cfg.to_dict()) if not c.startswith(("run_dir ", "resume "))]
    log.info("resumed from step %d (%s)%s", step, path,
             f"; config changed: {', '.join(changes)}" if changes else "")
    if src != dst:
      log.info("checkpoint %s: MoE stack rearranged from %s to %s", path, src.describe(), dst.describe())
    return relayout({**got["model"], **got["optimizer"]}, src, dst, final), []

  def _set_aside(self, step: int) -> None:
    """Move a checkpoint that failed its checksums out of the steps (to <step>.corrupt, or
    <step>.corrupt-<n> when that exists): kept for a look, never restored or counted again."""
    if jax.process_index() == 0:
      path = self.directory / str(step)
      dest = path.with_name(f"{step}{CORRUPT}")
      n = 1
      while dest.exists():
        dest, n = path.with_name(f"{step}{CORRUPT}-{n}"), n + 1
      path.rename(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.mngr.reload()

  # ------------------------------------------------------------------ saving
  def due(self, step: int) -> bool:
    return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

  def save(self, step: int, state, data_iter, *, force: bool = False, par=None) -> bool:
    """Start an asynchronous save of `step` when it is due (`save_every`) or `force`; returns whether
    it started. The arrays are copied to host before this returns, so the next (donating) step may
    run at once."""
    self.now = step
    self.check()
    if not (force or self.due(step)) or step in self.steps():
      return False
    self.wait()  # a failure of the previous save is reported as that step's (orbax would raise it in this save)
    meta = {"format": FORMAT, "step": int(step), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "data_seed": int(self.data_seed),
            "mesh": dict(par.mesh.shape) if par is not None else None,
            "pipeline_layout": [pipeline_layout(self.cfg, par).stages, pipeline_layout(self.cfg, par).repeats]}
    items = {
        "model": ocp.args.StandardSave({"params": state["params"], "rest": state["rest"]}),
        "optimizer": ocp.args.StandardSave({"opt": state["opt"], "step": state["step"], "guard": state["guard"]}),
        "config": ocp.args.JsonSave(self.cfg.to_dict()),
        "meta": ocp.args.JsonSave(meta),
        "checksums": ChecksumSave(shard_checksums({"model": {"params": state["params"], "rest": state["rest"]},
                                                   "optimizer": {"opt": state["opt"], "step": state["step"],
                                                                 "guard": state["guard"]}})),
    }
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore/the OS: all mean this save did not happen
      self._failed(step, e)
    self.saving = step
    log.info("checkpoint: saving step %d to %s", step, self.directory / str(step))
    return True

  def check(self) -> None:
    """RunFailed if the asynchronous save in progress (or just finished) failed."""
    try:
      self.mngr.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._failed(self.saving, e)

  def _failed(self, step, e: BaseException):
    orbax_noise.quiet()
    good = [s for s in self.steps() if s != step]
    last = f"the last good checkpoint is {self.directory / str(good[-1])}" if good else "no earlier checkpoint"
    after = self.now - step if self.now is not None and step is not None else 0
    lost = f"{after} step(s) trained after it are not saved; " if after > 0 else ""
    self.broken = True
    raise RunFailed(f"step {step}: writing the checkpoint to {self.directory / str(step)} failed ({_cause(e)});"
                    f" {lost}{last}") from None

  def wait(self) -> None:
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._failed(self.saving, e)

  def close(self) -> None:
    try:
      if not self.broken:  # else the failure was reported, and orbax raises it again here
        self.wait()
    finally:
      try:
        self.mngr.close()
      except Exception:  # noqa: BLE001 - a manager whose last save failed: already reported
        if not self.broken:
          raise

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
      return  # an abort (train/core/preemption.py): a save in flight is abandoned, not waited for
    self.close()


def pipeline_layout(cfg: TrainConfig, par=None) -> Layout:
  """The pipeline layout a state built for `par` stores the MoE stack in."""
  return par.layout(cfg.model.num_moe_layers) if par is not None else Layout(cfg.model.num_moe_layers)


def saved_layout(meta: dict, moe_layers: int) -> Layout:
  """The pipeline layout a checkpoint (its `meta`) stores the MoE stack of `moe_layers` layers in."""
  return Layout(moe_layers, *meta.get("pipeline_layout", (1, 1)))


def _in_stack(path) -> bool:
  return "moe_layers" in jax.tree_util.keystr(path)


def relayout_target(target, src: Layout, dst: Layout):
  """`target` with the MoE stack's arrays (parameters, moments, router biases) in `src`'s slots,
  their slot dimension unsharded (to be rearranged on device)."""
  if src == dst:
    return target

  def leaf(path, x):
    if not _in_stack(path):
      return x
    s = x.sharding
    sharding = NamedSharding(s.mesh, P(None, *tuple(s.spec)[1:])) if isinstance(s, NamedSharding) else s
    return jax.ShapeDtypeStruct((src.slots,) + x.shape[1:], x.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(leaf, target)


def relayout(state, src: Layout, dst: Layout, target):
  """The restored `state` with the MoE stack moved from `src`'s slots to `dst`'s, laid out as `target`."""
  if src == dst:
    return state

  def leaf(path, x, t):
    if not _in_stack(path):
      return x
    return jax.jit(lambda a: pipeline.convert(a, src, dst), out_shardings=t.sharding)(x)

  return jax.tree_util.tree_map_with_path(leaf, state, target)


def abstract_like(state, par=None):
  """ShapeDtypeStructs of `state` with its shardings; on a one-device mesh the replicated
  NamedSharding a jitted step returns (so the first step after a restore does not compile twice)."""
  one = NamedSharding(par.mesh, P()) if par is not None and par.mesh.size == 1 else None

  def leaf(x):
    s = x.sharding if isinstance(x.sharding, NamedSharding) or one is None else one
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(leaf, state)


def save_state(run_dir, step: int, state, cfg: TrainConfig, data_iter=None, par=None) -> Path:
  """Write one checkpoint synchronously (e.g. step 0 made from HF weights); returns its directory."""
  with Checkpoints(cfg) as ckpt:
    if step in ckpt.steps():
      raise CheckpointError(f"{ckpt.directory / str(step)} already exists; pick another run_dir")
    ckpt.save(step, state, data_iter, force=True, par=par)
  return checkpoint_dir(run_dir) / str(step)


def restore_model(path, target: dict):
  """{"params", "rest"} of the checkpoint directory `path` (a step directory), read into `target`
  (ShapeDtypeStructs with shardings; orbax casts to their dtypes and reads each device's part). Reads
  neither optimiser state nor data."""
  path = Path(path)
  validate_step_dir(path)
  orbax_noise.quiet()
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  with ocp.CheckpointManager(path.parent.absolute(), options=options) as m:
    try:
      got = m.restore(int(path.name), args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))["model"]
    except Exception as e:
      if _corruption(e) is None:
        raise CheckpointError(f"{path}: cannot restore the model: {_one_line(e)}") from None
      got, bad = None, [_corruption(e)]
    else:
      saved = read_checksums(path)
      bad = verify({"model": got}, saved)[0] if saved is not None else []
  if any_process(bool(bad)):
    earlier = [s for s in finished_steps(path.parent) if s < int(path.name)]
    raise CheckpointError(f"{path} is corrupt ({(bad or ['a shard of another process fails its checksum'])[0]}): its"
                          " bytes changed on disk after it was written; " +
                          (f"use an earlier step (--step {earlier[-1]})" if earlier else "restore the files from a copy"))
  return got

