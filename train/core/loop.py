"""The training loop: data -> jitted step -> metrics, eval, checkpoints and profiling.

`build` makes everything a run needs from the config, once: the mesh (parallel.mesh.Parallelism),
the model's runtime (moe.runtime.Runtime: dtypes, kernels, FP8 path, logged), the sharded state and
the jitted steps. `train` runs the loop; `python -m train CONFIG` (train/__main__.py) is its CLI.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from moe import hf
from moe import params as params_lib
from moe.model import Transformer
from moe.runtime import Runtime
from parallel import pipeline
from parallel import sharding as sharding_lib
from parallel.common.errors import ConfigError, RunFailed
from parallel.mesh import Parallelism
from train.core import checkpoint as checkpoint_lib
from train.core import input_pipeline as data_lib
from train.core import model_io
from train.core import optimizer as optimizer_lib
from train.core import pipelined
from train.core import preemption
from train.core import rundir
from train.core import step as step_lib
from train.core.train_config import TrainConfig
from train.core.heldout import EvalSet
from train.core.metrics import MetricsLogger, device_memory, measure_peak_flops

log = logging.getLogger("train")


def batch_devices(par: Parallelism) -> tuple[int, str]:
  """(how many ways a batch's rows split on `par`'s mesh, over which axes, "fsdp x expert")."""
  axes = [a for a in dict(par.rules).get("batch", ()) if par.mesh.shape.get(a, 1) > 1]
  return math.prod(par.mesh.shape[a] for a in axes), " x ".join(axes) or "no axis"


def check_vocab_parallel(cfg: TrainConfig, par: Parallelism) -> None:
  """With `mesh.vocab_parallel` the head's tokens are gathered over fsdp: a vocabulary the head's
  axes do not divide would leave every fsdp device computing the same logits, so it is an error."""
  if not par.cfg.vocab_parallel:
    return
  axes = [a for a in dict(par.rules)["head_vocab"] if par.mesh.shape.get(a, 1) > 1]
  n, v = math.prod(par.mesh.shape[a] for a in axes), cfg.model.vocab_size
  if v % n:
    raise ConfigError(f"mesh.vocab_parallel: model.vocab_size={v} does not divide by {' x '.join(axes)} = {n};"
                      f" set mesh.vocab_parallel=false, or pad the vocabulary to {-(-v // n) * n}")


def on_mesh(cfg: TrainConfig, par: Parallelism) -> TrainConfig:
  """`cfg` with grad_accum resolved from `per_device_batch` for `par`'s mesh (unchanged without it):
  batch_size = grad_accum x per_device_batch x the devices the batch splits over. Checks that the
  mesh's output head divides the vocabulary (check_vocab_parallel)."""
  check_vocab_parallel(cfg, par)
  if cfg.per_device_batch is None:
    return cfg
  n, axes = batch_devices(par)
  rows = cfg.per_device_batch * n
  if cfg.batch_size % rows:
    raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of per_device_batch={cfg.per_device_batch} x"
                      f" the {n} devices the batch splits over ({axes}) = {rows}: change batch_size or"
                      " per_device_batch, or give grad_accum instead")
  log.info("per_device_batch=%d on %d batch devices (%s): grad_accum=%d", cfg.per_device_batch, n, axes,
           cfg.batch_size // rows)
  return cfg.replace(grad_accum=cfg.batch_size // rows, per_device_batch=None)


def parallelism(cfg: TrainConfig, devices=None) -> Parallelism:
  """The device mesh (cfg.mesh over `devices`, default all) with its sharding rules and transport."""
  par = Parallelism.from_config(cfg.mesh, devices, cfg.pipeline)
  log.info("parallel: %s", par.describe())
  if par.stages == 1 and cfg.pipeline != type(cfg.pipeline)():
    log.warning("pipeline: %s has no effect without stages (set mesh.stage)", cfg.pipeline)
  return par


def pipeline_schedule(cfg: TrainConfig, par: Parallelism) -> pipeline.Schedule | None:
  """The training step's pipeline schedule on `par`'s stages (None without): each grad-accumulation
  micro-batch, batch_size / grad_accum sequences (`cfg` on the mesh), per pipeline run; logged."""
  if par.stages == 1:
    return None
  rows = cfg.batch_size // cfg.grad_accum
  sched = pipelined.schedule(par, rows)
  log.info("%s; MoE %s", sched.describe(), par.layout(cfg.model.num_moe_layers).describe())
  if (rows // sched.microbatches) % par.stages:
    log.warning("pipeline: micro-batches of %d sequences do not split over the %d stages, so every stage runs the"
                " embedding, dense layers and head on all of them (%dx their work): make batch_size / grad_accum /"
                " pipeline.microbatches a multiple of mesh.stage", rows // sched.microbatches, par.stages, par.stages)
  return sched


def runtime(cfg: TrainConfig, par: Parallelism) -> Runtime:
  """How the model runs on `par`'s devices: `precision` sets the compute dtype (fp8: bf16 plus FP8
  GEMMs), master weights are float32, `impl` picks the kernels; logged once."""
  return Runtime.resolve(cfg.impl, dtype=cfg.compute_dtype, param_dtype="float32", fp8=cfg.fp8, par=par)


class Setup(NamedTuple):
  """Everything a run is made of but the arrays: what `build` initialises and `train.aot` compiles."""

  par: Parallelism
  rt: Runtime
  tx: object  # the optimizer (optax)
  init: object  # () -> the freshly initialised state {params, rest, opt, step, guard}
  abstract_state: dict  # ShapeDtypeStructs of the state, with their shardings
  shardings: object  # the state's NamedShardings (None on one device)
  train_step: object  # jitted (state, batch) -> (state, metrics)
  eval_step: object  # jitted (state, batch) -> (summed NLL, target count)
  pipe_schedule: pipeline.Schedule | None  # the training step's (None without stages)

  def batch_spec(self, batch_size: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a global training batch, sharded as `to_device` places it."""
    shape = (batch_size, seq_len)
    sharding = sharding_lib.batch_sharding(self.par.mesh, shape, self.par.rules)
    return {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32 if k == "loss_mask" else jax.numpy.int32,
                                    sharding=sharding)
            for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}


def setup(cfg: TrainConfig, par: Parallelism | None = None, rt: Runtime | None = None) -> Setup:
  """The mesh, runtime, state layout and jitted steps of `cfg`, without allocating anything.

  On a multi-device mesh the state's shardings come from its parameters' logical axes
  (parallel.sharding.state_shardings); the model carries the mesh (its Runtime) for its activation
  constraints and expert-parallel MoE. `par` may be built on compile-only devices (train.aot).
  """
  par = parallelism(cfg) if par is None else par
  cfg = on_mesh(cfg, par)
  pipe_schedule = pipeline_schedule(cfg, par)  # (a schedule that does not fit is an error before any tracing)
  rt = runtime(cfg, par) if rt is None else rt
  schedule = optimizer_lib.make_schedule(cfg)
  tx = optimizer_lib.make_optimizer(cfg, schedule, par)

  def init():
    return step_lib.init_state(Transformer(cfg.model, rt, rngs=nnx.Rngs(cfg.seed)), tx)[1]

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rt, rngs=nnx.Rngs(cfg.seed))))
  abstract = jax.eval_shape(init)
  if par.mesh.size == 1:
    # the sharding the step returns, so that the second step does not compile again
    replicated = jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec())
    layout, shardings = jax.tree.map(lambda _: replicated, abstract), None
  else:
    layout = shardings = sharding_lib.state_shardings(abstract, par.mesh, par.rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, layout)
  train_step = step_lib.make_train_step(graphdef, cfg.model, tx, schedule, cfg, shardings, par, pipe_schedule)
  return Setup(par, rt, tx, init, abstract, shardings, train_step, step_lib.make_eval_step(graphdef, par),
               pipe_schedule)


class Built(NamedTuple):
  state: dict  # {params, rest, opt, step}, laid out on the mesh
  train_step: object  # jitted (state, batch) -> (state, metrics)
  eval_step: object  # jitted (state, batch) -> (summed NLL, target count)
  rt: Runtime
  shardings: object  # the state's NamedShardings (None on one device)
  par: Parallelism
  pipe_schedule: pipeline.Schedule | None  # the training step's (None without stages)


def build(cfg: TrainConfig, par: Parallelism | None = None, rt: Runtime | None = None,
          init_from: str | None = None) -> Built:
  """A freshly initialised state, laid out on the mesh, and the jitted steps (see `setup`); with
  `init_from`, the weights of that HF folder or of that run's checkpoint (read straight into their
  shardings) and a fresh optimizer. Feed the steps `to_device(batch, par)`."""
  s = setup(cfg, par, rt)
  layout = jax.tree.map(lambda a: a.sharding, s.abstract_state)
  if init_from is not None and (Path(init_from) / "config.json").is_file():
    state = state_from_hf(cfg, s, init_from, layout)
  elif init_from is not None:
    state = state_from_run(cfg, s, init_from, layout)
  else:  # one program, also on one device (op by op, the tiny model's init took 18 s on a CPU core)
    state = jax.jit(s.init, out_shardings=layout)()
  return Built(state, s.train_step, s.eval_step, s.rt, s.shardings, s.par, s.pipe_schedule)


def state_from_hf(cfg: TrainConfig, s: Setup, path: str, layout) -> dict:
  """The training state with the weights of the HF folder `path` (float32 master weights), a fresh
  optimizer state and step 0. Its config.json must describe `cfg.model`."""
  theirs, ours = dataclasses.asdict(hf.config_of(path)), dataclasses.asdict(cfg.model)
  for key in ours:
    if key != "initializer_range" and theirs[key] != ours[key]:
      raise ConfigError(f"init_from={path}: its config.json gives {key}={theirs[key]!r} but model.{key} is"
                        f" {ours[key]!r}; make the config's model: section match the checkpoint")
  model = hf.from_hf(path, rt=s.rt, par=s.par)
  log.info("init_from %s: %.2f GB read by this process", path, model.loaded_bytes / 1e9)
  _, params, rest = step_lib.split_model(model)
  return with_fresh_optimizer(s, params, rest, layout)


def state_from_run(cfg: TrainConfig, s: Setup, path: str, layout) -> dict:
  """The training state with the weights of another run's checkpoint (`path`: its run directory, for the
  newest, or one step directory), a fresh optimizer state and step 0: a long-context stage started from
  pre-training, at another seq_len and with YaRN (model_io.weights_from_run says what may differ)."""
  target = {k: s.abstract_state[k] for k in ("params", "rest")}
  got = model_io.weights_from_run(path, target, cfg.model, checkpoint_lib.pipeline_layout(cfg, s.par), s.par)
  return with_fresh_optimizer(s, got["params"], got["rest"], layout)


def with_fresh_optimizer(s: Setup, params, rest, layout) -> dict:
  """{params, rest} with a freshly initialised optimizer state, step 0 and spike guard."""
  fresh = jax.jit(lambda p: {"opt": s.tx.init(p), "step": jnp.zeros((), jnp.int32),
                             "guard": {"loss_mean": jnp.zeros((), jnp.float32), "accepted": jnp.zeros((), jnp.int32)}},
                  out_shardings={k: layout[k] for k in ("opt", "step", "guard")})(params)
  return {"params": params, "rest": rest, **fresh}


def to_device(batch: dict, par: Parallelism | None = None, global_batch_size: int | None = None) -> dict:
  """Host batch -> device arrays; with `par`, global arrays sharded over the batch axes (with several
  processes `batch` is this process's rows of a global batch of `global_batch_size`)."""
  return sharding_lib.place_batch(batch, par, global_batch_size)


def eval_set(cfg: TrainConfig, tokenizer) -> EvalSet:
  """This process's `eval_steps` batches of the held-out split (read once per run)."""
  n_proc = jax.process_count()
  return EvalSet(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size // n_proc,
                 max_seq_len=cfg.model.max_position_embeddings, max_batches=cfg.eval_steps,
                 process_index=jax.process_index(), process_count=n_proc)


def evaluate(eval_step, state, cfg: TrainConfig, evals: EvalSet, par=None) -> float:
  """Mean next-token loss over the eval batches; with several processes every process runs exactly
  `eval_steps` steps."""
  steps = cfg.eval_steps if jax.process_count() > 1 else None
  return evals.run(eval_step, state, lambda b: to_device(b, par, cfg.batch_size), steps)["loss"]


class Guard:
  """The host side of the non-finite guard (train/core/step.py skips such updates on device): reads the
  flags of the steps synced at each log interval or before a save; `on_nonfinite: stop` ends the run
  at the first, `skip` after `max_skipped` skipped steps in a row."""

  def __init__(self, cfg: TrainConfig, ckpt):
    self.cfg, self.ckpt, self.in_a_row = cfg, ckpt, 0

  def check(self, first_step: int, metrics: list[dict]) -> None:
    for i, m in enumerate(metrics):
      step = first_step + i
      if m["lost"]:
        self.fail(step, f"the dropless expert-parallel exchange (mesh.ep_transport={self.cfg.mesh.ep_transport})"
                        f" could not send {int(m['lost'])} (token, expert) assignments: a bug in its buffer bounds"
                        " (please report it); the step was not applied. mesh.ep_transport=padded avoids it")
      if m["skipped"]:
        self.in_a_row += 1
        if m["nonfinite"] and self.cfg.on_nonfinite == "stop":
          self.fail(step, f"the loss ({float(m['loss']):.4g}) or the gradient norm ({float(m['grad_norm']):.4g}) is"
                          " not finite (on_nonfinite=stop)")
        if self.in_a_row > self.cfg.max_skipped:
          self.fail(step, f"{self.in_a_row} updates in a row were skipped (non-finite or spiking loss;"
                          f" max_skipped={self.cfg.max_skipped})")
        log.warning("step %d: update skipped (%s)", step, "non-finite loss or gradient" if m["nonfinite"] else
                    f"loss spike: {float(m['loss']):.4g}")
      else:
        self.in_a_row = 0

  def fail(self, step: int, why: str):
    self.ckpt.wait()  # a save in flight was of a good state: let it finish
    good = self.ckpt.steps()
    last = (f"the last good checkpoint is {self.ckpt.directory / str(good[-1])} (resume from it, e.g. with a lower"
            " optimizer.lr)" if good else "no checkpoint was written")
    raise RunFailed(f"step {step}: {why}; stopped, nothing saved after it; {last}")


def train(cfg: TrainConfig, progress: bool = True, peak_flops: float | None = None) -> dict:
  """Train per `cfg`; returns {first_loss, last_loss, steps, ...}. Resumes from the newest checkpoint
  in RUN_DIR/checkpoints and saves checkpoints as train/core/checkpoint.py describes; SIGTERM/SIGINT
  stop after the current step with a checkpoint (`stopped_by` in the result). `peak_flops`: the
  FLOP/s MFU is measured against (default: measured here, train.core.metrics.measure_peak_flops).

  Everything that can be checked is checked before the first step (the run directory writable and
  not in use, the resume accepted, the data and the eval split readable); RUN_DIR/config.yaml is
  written only then. A diverged step or a checkpoint that cannot be written raises RunFailed."""
  # Until the first step has finished a signal ends the run at once (nothing to save); StopSignal
  # outlives ckpt: a signal while the last save is being written must not cut it short
  hint = lambda: checkpoint_lib.resume_hint(checkpoint_lib.checkpoint_dir(cfg.run_dir))  # noqa: E731
  with preemption.StopSignal(jax.process_count(), hint=hint, started=False) as stop:
    return _train(cfg, stop, progress, peak_flops)


def _train(cfg: TrainConfig, stop, progress: bool, peak_flops: float | None) -> dict:
  run_dir = rundir.prepare(cfg.run_dir)
  with rundir.RunLock(run_dir, active=jax.process_index() == 0):
    ckpt = checkpoint_lib.Checkpoints(cfg)
    try:
      plan = ckpt.resume_plan()  # before anything is written: resume=false must leave the run untouched
      if plan is not None and plan["step"] >= cfg.steps:  # nothing to build, load or write
        log.info("nothing to train: the checkpoint is at step %d and steps=%d", plan["step"], cfg.steps)
        ckpt.close()
        return {"first_loss": None, "last_loss": None, "steps": cfg.steps, "run_dir": str(run_dir),
                "start_step": plan["step"], "stopped_by": None, "last_step": plan["step"]}
      tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
      if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is"
                          f" {cfg.model.vocab_size}: raise model.vocab_size")
      n_proc = jax.process_count()
      if cfg.batch_size % n_proc:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {n_proc} processes")
      batches = iter(data_lib.make_dataset(
          cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size // n_proc, seed=ckpt.data_seed, split="train",
          tokenizer=tokenizer, max_seq_len=cfg.model.max_position_embeddings, process_index=jax.process_index(),
          process_count=n_proc, num_workers=cfg.data_workers))
      evals = eval_set(cfg, tokenizer) if cfg.eval_every else None  # a bad eval split fails now, not at step 100
      tasks = None
      if cfg.eval_every and cfg.eval_tasks:  # an unknown task fails now too
        from train.core.lm_eval_adapter import TrainingTasks
        tasks = TrainingTasks(cfg, tokenizer)
      par = parallelism(cfg)
      cfg = on_mesh(cfg, par)
      built = build(cfg, par, init_from=cfg.init_from if plan is None else None)
      start = 0
      if plan is not None:
        state = ckpt.restore(plan, built.state, batches, par)
        state["rest"] = model_io.valid_copies(state["rest"], cfg.model, par)  # (restored from another mesh?)
        built, start = built._replace(state=state), plan["step"]
    except BaseException:
      ckpt.close()
      raise
    if jax.process_index() == 0:  # the configuration is accepted
      write_atomically(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return _loop(cfg, Run(run_dir, ckpt, stop, batches, evals, tasks), built, start, progress, peak_flops)


def write_atomically(path, text: str) -> None:
  """`path` holds the old text or the new, whenever the process ends."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


class Run(NamedTuple):
  """What the loop runs with besides the built state and steps, all opened before the first step."""

  dir: Path  # the run directory
  ckpt: checkpoint_lib.Checkpoints
  stop: preemption.StopSignal
  batches: Iterator[dict]  # this process's rows of the training batches
  evals: EvalSet | None  # the held-out batches (None without eval_every)
  tasks: object  # the lm-eval tasks of each evaluation (train.core.lm_eval_adapter.TrainingTasks), or None


@dataclasses.dataclass
class Interval:
  """The loop's state since the last log record: the steps' metrics (device arrays until the host
  sync at a log or a save; the first `checked` of them passed the guard) and the `timed` steps since
  `t0` that the throughput counts (not the first step's compilation, nor saves or evaluations)."""

  t0: float = dataclasses.field(default_factory=time.perf_counter)
  pending: list = dataclasses.field(default_factory=list)
  timed: int = 0
  checked: int = 0

  def restart_clock(self, timed: int = 0) -> None:
    self.t0, self.timed = time.perf_counter(), timed


NOT_LOGGED = ("tokens", "skipped", "nonfinite", "lost")  # the guard's inputs (train/core/step.py)


def logged(m: dict) -> dict:
  """A step's metrics as metrics.jsonl has them: the guard's inputs left out, whether it was skipped."""
  return {**{k: v for k, v in m.items() if k not in NOT_LOGGED}, "skipped_steps": int(m["skipped"])}


def interval_record(got: list[dict], pipe_schedule: pipeline.Schedule | None) -> dict:
  """The log record of an interval's synced metrics: the last step's, with the interval's mean loss
  and skipped steps; with stages the schedule and its predicted idle share (parallel/pipeline.py)."""
  record = {**logged(got[-1]), "loss": float(np.mean([m["loss"] for m in got])),
            "skipped_steps": int(sum(m["skipped"] for m in got))}
  if pipe_schedule is not None:
    record["pipeline_schedule"] = pipe_schedule.kind
    record["pipeline_bubble"] = pipe_schedule.bubble()
  return record


def check_interval(guard: Guard, logger: MetricsLogger, step: int, got: list[dict], checked: int) -> None:
  """The guard's check of the interval's synced metrics `got` (its last step `step`) past the first
  `checked`, so that nothing non-finite is saved; when it stops the run, every step of the interval is
  logged first, one record each (the steps that led to the stop are the ones a user needs)."""
  first = step + 2 - len(got)
  try:
    guard.check(first + checked, got[checked:])
  except RunFailed:
    for i, m in enumerate(got):
      logger.log(first + i, logged(m))
    raise


def log_first_step(metrics, t0: float) -> None:
  """Waits for the first step's metrics; logs its time since `t0` (compilation included) and the
  device memory after it."""
  jax.block_until_ready(metrics)
  log.info("first step (compilation included): %.1f s", time.perf_counter() - t0)
  if (memory := device_memory()) is not None:
    log.info("device memory after the first step: peak %s GiB in use of %s GiB", memory["peak_GiB"],
             memory.get("limit_GiB", "?"))


def _loop(cfg: TrainConfig, run: Run, built: Built, start: int, progress: bool, peak_flops: float | None) -> dict:
  counts = params_lib.count(cfg.model, cfg.seq_len)
  log.info("model: %.2fM params (%.2fM active), %s compute on %d %s device(s)", counts["total_params"] / 1e6,
           counts["active_params"] / 1e6, built.rt.dtype, jax.device_count(), built.rt.platform)
  peak = measure_peak_flops(built.rt.compute_dtype) if peak_flops is None else peak_flops
  tokens_per_step = cfg.batch_size * cfg.seq_len
  guard = Guard(cfg, run.ckpt)
  state, par = built.state, built.par
  first = last = None
  stopped = False
  with run.ckpt, MetricsLogger(run.dir, cfg.steps, progress=progress, start_step=start,
                               is_main=jax.process_index() == 0) as logger:
    interval = Interval()
    for step in range(start, cfg.steps):
      if cfg.profile_steps and step == cfg.profile_steps[0]:
        jax.profiler.start_trace(str(run.dir / "profile"))
      state, metrics = built.train_step(state, to_device(next(run.batches), par, cfg.batch_size))
      if cfg.profile_steps and step + 1 == cfg.profile_steps[1]:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      interval.pending.append(metrics)
      if step == start:  # keep compilation out of tokens/s
        log_first_step(metrics, interval.t0)
        interval.restart_clock(timed=-1)
        run.stop.start()  # from now on a signal stops after the step in progress, with a checkpoint
      interval.timed += 1
      stopped = run.stop.requested(step + 1)
      last_step = step + 1 == cfg.steps
      log_due = (step + 1) % cfg.log_every == 0 or last_step or stopped
      saving = stopped or last_step or run.ckpt.due(step + 1)
      if log_due or saving:
        got = jax.device_get(interval.pending)  # the one host sync per log interval (and before a save)
        check_interval(guard, logger, step, got, interval.checked)
        interval.checked = len(got)
        if log_due:
          record = interval_record(got, built.pipe_schedule)
          if interval.timed > 0:  # the interval of the first step (compilation) has no throughput
            record["tokens_per_s"] = tokens_per_step * interval.timed / (time.perf_counter() - interval.t0)
            record["mfu"] = record["tokens_per_s"] * counts["flops_per_token"] / peak
          logger.log(step + 1, record)
          first = record["loss"] if first is None else first
          last = record["loss"]
          interval = Interval()
      # the final checkpoint before the final evaluation: a late failure never costs trained steps
      if run.ckpt.save(step + 1, state, run.batches, force=stopped or last_step, par=par):
        interval.restart_clock()
      if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last_step):
        logger.write_eval(step + 1, {"loss": evaluate(built.eval_step, state, cfg, run.evals, par),
                                     **(run.tasks.run(state, built.rt) if run.tasks else {})})
        interval.restart_clock()
      if stopped:
        log.info("%s: stopped after step %d; the checkpoint is being written", run.stop.received, step + 1)
        break
    if (memory := device_memory()) is not None:
      log.info("device memory: peak %s GiB in use of %s GiB", memory["peak_GiB"], memory.get("limit_GiB", "?"))
  return {"first_loss": first, "last_loss": last, "steps": cfg.steps, "run_dir": str(run.dir), "start_step": start,
          "stopped_by": run.stop.received if stopped else None, "last_step": step + 1}
