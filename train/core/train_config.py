"""Training configuration: one YAML file, one typed dataclass per section.

  model:      the architecture, moe.config.ModelConfig (the fields of DeepSeek's config.json)
  impl:       how the model runs, moe.runtime.ImplConfig (kernels, remat, scan; `auto` = from the devices)
  mesh:       the device mesh and expert-parallel transport, parallel.mesh.MeshConfig
  pipeline:   the pipeline schedule when mesh.stage > 1, parallel.pipeline.PipelineConfig
  optimizer:  OptimizerConfig        loss: LossConfig
  top level:  TrainConfig (steps, batch_size, seq_len, data, precision, checkpoints, ...)

`precision` (float32 | bf16 | fp8) is the one compute-precision setting: master weights stay float32.
Command-line overrides are dotted `key=value` pairs whose values are parsed as YAML scalars
(`steps=100`, `model.hidden_size=64`, `optimizer.lr=3e-4`, `mesh.data=2`). Unknown keys, bad
types and bad values raise `ConfigError` with one line that names the key; a key given at the wrong
level is pointed to where it lives (`ep_transport=padded` -> mesh.ep_transport).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from moe.config import ModelConfig, load_config, model_section
from moe.runtime import ImplConfig
from parallel.common.errors import ConfigError, require
from parallel.common.typed_config import check_fields, dataclass_of, matches, reject_unknown
from parallel.mesh import MeshConfig
from parallel.pipeline import PipelineConfig
from parallel.sharding import check_balanced


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its learning-rate schedule (defaults: AdamW as DeepSeek-V3 report §4.2).

  `name`: `adamw` for every parameter, or `muon` (train/core/muon.py, Moonlight's recipe): Muon for the
  matrices (momentum `muon_beta`, Nesterov; update RMS matched to AdamW's by `muon_consistent_rms` x
  sqrt(max(A, B)), so `lr` and `weight_decay` mean what they mean for AdamW), AdamW (b1, b2, eps) for
  the embedding, head and norms; with `qk_clip_threshold` tau (Kimi K2's MuonClip; null: off) each
  attention head whose largest logit in the step exceeded tau has its query/key projections scaled
  down after the update.

  Schedules (see `train.core.optimizer.make_schedule`): linear warm-up to `lr` over `warmup_steps`, then
  - `warmup_constant_cosine` (V3): constant until `decay_start`, cosine to `final_lr` over
    `decay_steps`, then constant at `final_lr`;
  - `wsd` (warmup-stable-decay): the same, with a 1-sqrt decay shape instead of the cosine;
  - `cosine`: cosine to `final_lr` from the end of warm-up to the last step (`decay_start` and
    `decay_steps` unused).
  `decay_start: null` means `steps - decay_steps` (the decay ends on the last step).
  """

  name: Literal["adamw", "muon"] = "adamw"
  schedule: Literal["warmup_constant_cosine", "wsd", "cosine"] = "warmup_constant_cosine"
  lr: float = 2.2e-4  # peak
  final_lr: float = 2.2e-5
  warmup_steps: int = 20
  decay_start: int | None = None
  decay_steps: int = 300
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # global gradient norm
  moment_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # both AdamW moments (V3: BF16), Muon's momentum
  muon_beta: float = 0.95  # Muon's momentum (Moonlight, Kimi K2)
  muon_consistent_rms: float = 0.2  # Muon's update RMS (Moonlight's 0.2 x sqrt(max(A, B)))
  qk_clip_threshold: float | None = 100.0  # with name=muon (Kimi K2: 100; MaxText's default)

  def __post_init__(self):
    check_fields(self, "optimizer.")
    require(self.lr >= 0 and self.final_lr >= 0, f"optimizer.lr={self.lr}, final_lr={self.final_lr} must be >= 0")
    require(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
    require(self.decay_steps >= 0, f"optimizer.decay_steps={self.decay_steps} must be >= 0")
    require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer.b1={self.b1}, b2={self.b2} must be in [0, 1)")
    require(self.eps > 0, f"optimizer.eps={self.eps} must be > 0")
    require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
    require(self.clip_norm > 0, f"optimizer.clip_norm={self.clip_norm} must be > 0")
    require(0 <= self.muon_beta < 1, f"optimizer.muon_beta={self.muon_beta} must be in [0, 1)")
    require(self.muon_consistent_rms > 0, f"optimizer.muon_consistent_rms={self.muon_consistent_rms} must be > 0")
    t = self.qk_clip_threshold
    require(t is None or t > 0, f"optimizer.qk_clip_threshold={t} must be > 0 or null (off)")

  @property
  def qk_clip(self) -> float | None:
    """QK-clip's threshold when it runs (with Muon), else None."""
    return self.qk_clip_threshold if self.name == "muon" else None

  def decay_start_step(self, steps: int) -> int:
    """First step of the decay for `warmup_constant_cosine` and `wsd`."""
    return steps - self.decay_steps if self.decay_start is None else self.decay_start


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights and the auxiliary-loss-free balancing update (V3 report §2.1.2, §2.2).

  `L = CE + mtp_lambda/D · Σ_k CE_k + balance_alpha · L_bal`; after each step the router bias moves
  `b_i += γ · sign(mean(load) - load_i)`, with `γ = bias_update_gamma` until the last
  `bias_update_stop_fraction` of the steps and 0 after. V3 stops for its last 500B of 14.8T tokens
  (≈0.034); the default 0.0 never stops, as a short run has no separate final phase.
  """

  mtp_lambda: float = 0.3
  balance_alpha: float = 1e-4
  bias_update_gamma: float = 1e-3
  bias_update_stop_fraction: float = 0.0

  def __post_init__(self):
    check_fields(self, "loss.")
    for name in ("mtp_lambda", "balance_alpha", "bias_update_gamma"):
      require(getattr(self, name) >= 0, f"loss.{name}={getattr(self, name)} must be >= 0")
    f = self.bias_update_stop_fraction
    require(0 <= f <= 1, f"loss.bias_update_stop_fraction={f} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run. `batch_size` is global, in sequences of `seq_len` tokens, split into
  `grad_accum` micro-batches, or into micro-batches of `per_device_batch` sequences on each device
  the batch splits over (MaxText's per_device_batch_size: grad_accum follows from the mesh, so that
  one YAML runs on any pod; train/core/loop.py: on_mesh); `eval_every: 0` disables evaluation;
  `profile_steps: [start, stop]` traces steps start <= s < stop."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  run_dir: str = "runs/default"  # load_train_config: runs/<config stem>
  steps: int = 1000
  seed: int = 0
  batch_size: int = 8
  seq_len: int = 256
  grad_accum: int = 1
  per_device_batch: int | None = None
  data: str = "default"
  tokenizer: str = "byte"  # "byte" or a path to a tokenizer
  # Weights a fresh run starts from, read straight into their shardings; the optimizer starts fresh:
  # an HF folder (DeepSeek's release: config.json + safetensors, bf16 or FP8) whose config.json must
  # describe the `model:` section, or another run (its run directory, for its newest checkpoint, or a
  # step directory) whose weights have this model's shapes (a long-context stage: another seq_len,
  # YaRN). Ignored when the run resumes from its own checkpoint.
  init_from: str | None = None
  # Processes that tokenise and pack the training data (Grain mp_prefetch); 0: in the training process,
  # overlapping with the asynchronously dispatched step. The batch order depends on this number.
  data_workers: int = 0
  # The compute precision; master weights are float32. float32 | bf16 | fp8 (bf16 compute, FP8 E4M3
  # GEMMs in the attention projections, FFNs and routed experts: moe/kernels/fp8.py, docs/fp8.md)
  precision: Literal["float32", "bf16", "fp8"] = "float32"
  # A step whose loss or gradient norm is not finite is never applied (train/core/step.py); then
  # stop: the run ends with one line naming the step and the last good checkpoint (exit code 4);
  # skip: training goes on, and stops after `max_skipped` skipped steps in a row.
  on_nonfinite: Literal["stop", "skip"] = "stop"
  max_skipped: int = 10
  # Skip an update whose loss exceeds this many times the running mean of the loss (null: never).
  spike_skip_factor: float | None = None
  log_every: int = 10
  eval_every: int = 100
  eval_steps: int = 10
  # lm-evaluation-harness tasks (train/core/lm_eval_adapter.py; the `eval` extra) run at the same
  # cadence on the training mesh, logged as eval_<task>/<metric>: task names (a list, or "a,b"),
  # documents per task (null: all) and a folder of local task YAML files (null: lm-eval's tasks only).
  eval_tasks: tuple[str, ...] = ()
  eval_tasks_limit: int | None = None
  eval_tasks_path: str | None = None
  profile_steps: tuple[int, int] | None = None
  # Checkpoints (train/core/checkpoint.py) in RUN_DIR/checkpoints: saved asynchronously every `save_every`
  # steps (0: only at the end), always at the end and on SIGTERM/SIGINT; the last `keep_last` are kept
  # (0: all) plus every step divisible by `keep_every` (0: none). `resume: true` continues from the
  # newest checkpoint in run_dir; false refuses to start when run_dir has any.
  save_every: int = 1000
  keep_last: int = 3
  keep_every: int = 0
  resume: bool = True
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
  impl: ImplConfig = dataclasses.field(default_factory=ImplConfig)

  def __post_init__(self):
    if isinstance(self.profile_steps, list):
      object.__setattr__(self, "profile_steps", tuple(self.profile_steps))
    tasks = self.eval_tasks.split(",") if isinstance(self.eval_tasks, str) else self.eval_tasks
    require(isinstance(tasks, (list, tuple)) and all(isinstance(t, str) and t for t in tasks),
            f"eval_tasks={self.eval_tasks!r} must be a list of lm-eval task names (or 'a,b')")
    object.__setattr__(self, "eval_tasks", tuple(tasks))
    require(self.eval_tasks_limit is None or self.eval_tasks_limit >= 1,
            f"eval_tasks_limit={self.eval_tasks_limit} must be >= 1 or null (all documents)")
    require(not self.eval_tasks or self.eval_every > 0,
            f"eval_tasks={list(self.eval_tasks)} never run with eval_every=0: set eval_every (steps between evaluations)")
    check_fields(self, "")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_steps", "max_skipped"):
      require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
    require(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0: never)")
    f = self.spike_skip_factor
    require(f is None or f > 1, f"spike_skip_factor={f} must be > 1 (a multiple of the running mean loss) or null")
    for name in ("save_every", "keep_last", "keep_every", "data_workers"):
      require(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0 (0: see train/core/train_config.py)")
    require(self.per_device_batch is None or self.per_device_batch >= 1,
            f"per_device_batch={self.per_device_batch} must be >= 1 or null")
    require(self.per_device_batch is None or self.grad_accum == 1,
            f"per_device_batch={self.per_device_batch} and grad_accum={self.grad_accum}: set one of them"
            " (per_device_batch derives grad_accum from the mesh)")
    require(
        self.batch_size % self.grad_accum == 0,
        f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}",
    )
    require(
        self.seq_len <= self.model.max_position_embeddings,
        f"seq_len={self.seq_len} exceeds model.max_position_embeddings={self.model.max_position_embeddings}",
    )
    p = self.profile_steps
    require(
        p is None or (isinstance(p, tuple) and len(p) == 2 and all(map(_is_int, p)) and 0 <= p[0] < p[1]),
        f"profile_steps={list(p) if isinstance(p, tuple) else p!r} must be null or [start, stop] with"
        " 0 <= start < stop",
    )
    r, e = self.mesh.redundant_experts, self.model.n_routed_experts
    require(r <= e, f"mesh.redundant_experts={r} exceeds model.n_routed_experts={e}: EPLB fills at most one extra"
                    f" slot per expert (as many copies per rank as experts per rank); use at most {e}")
    c = self.mesh.context
    if c > 0:  # (-1: checked once the mesh is built, moe/model.py)
      check_balanced(self.seq_len, c)
    opt = self.optimizer
    if opt.schedule == "cosine":
      require(opt.warmup_steps <= self.steps, f"optimizer.warmup_steps={opt.warmup_steps} exceeds steps={self.steps}")
    else:
      start = opt.decay_start_step(self.steps)
      require(
          opt.warmup_steps <= start,
          f"optimizer: the decay starts at step {start} (decay_start={opt.decay_start}, steps={self.steps},"
          f" decay_steps={opt.decay_steps}), before warmup_steps={opt.warmup_steps} ends",
      )

  @property
  def compute_dtype(self) -> str:
    """The dtype of activations and matmuls `precision` sets."""
    return "float32" if self.precision == "float32" else "bfloat16"

  @property
  def fp8(self) -> bool:
    return self.precision == "fp8"

  def replace(self, **changes) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """The resolved configuration, in the YAML layout `load_train_config` reads."""
    d = dataclasses.asdict(self)
    if self.profile_steps is not None:
      d["profile_steps"] = list(self.profile_steps)
    d["eval_tasks"] = list(self.eval_tasks)
    return d

  @classmethod
  def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
    d = dict(d)
    reject_unknown(d, cls, where, _ELSEWHERE)
    d["model"] = ModelConfig.from_dict(_coerce(_section(d, "model", where), ModelConfig), f"{where}: model",
                                       _ELSEWHERE)
    for name, sub in _SECTIONS.items():
      if name in d and name != "model":
        s = _section(d, name, where)
        reject_unknown(s, sub, f"{where}: {name}", _ELSEWHERE)
        d[name] = sub(**_coerce(s, sub))
    return cls(**_coerce(d, cls))


_SECTIONS = {"model": ModelConfig, "impl": ImplConfig, "mesh": MeshConfig, "pipeline": PipelineConfig,
             "optimizer": OptimizerConfig, "loss": LossConfig}


def _key_places() -> dict[str, str]:
  """Every key -> where it lives ('steps', 'mesh.ep_transport', ...), for suggesting the right level
  of a key given at the wrong one; and the keys that moved out of the model section."""
  places: dict[str, list[str]] = {}
  for f in dataclasses.fields(TrainConfig):
    if f.name not in _SECTIONS:
      places.setdefault(f.name, []).append(f.name)
  for section, sub in _SECTIONS.items():
    for f in dataclasses.fields(sub):
      places.setdefault(f.name, []).append(f"{section}.{f.name}")
  out = {k: " or ".join(v) for k, v in places.items()}
  precision = "precision (float32 | bf16 | fp8; master weights stay float32)"
  out.update(dtype=precision, param_dtype=precision, fp8="precision=fp8", fp8_backend="impl.fp8_gemm")
  return out


_ELSEWHERE = _key_places()


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
  """Read `path`, apply `key=value` overrides in order, default `run_dir` to runs/<stem>."""
  raw = load_config(path)
  model_section(raw, path)
  for item in overrides:
    apply_override(raw, item)
  raw.setdefault("run_dir", f"runs/{Path(path).stem}")
  return TrainConfig.from_dict(raw, where=str(path))


def apply_override(raw: dict, item: str) -> None:
  """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as a YAML scalar."""
  key, sep, text = item.partition("=")
  if not sep or not key:
    raise ConfigError(f"override {item!r}: expected key=value (e.g. optimizer.lr=3e-4)")
  where = f"override {item!r}"
  *parents, leaf = key.split(".")
  cls, node = TrainConfig, raw
  for i, name in enumerate(parents):
    reject_unknown({name: None}, cls, where, _ELSEWHERE)
    hint = typing.get_type_hints(cls)[name]
    if _is_mapping(hint) and i == len(parents) - 1:  # a free-form mapping such as mesh.rules
      if not isinstance(node.get(name), dict):
        node[name] = {}
      node[name][leaf] = _yaml_value(text, where)
      return
    cls = dataclass_of(hint)
    if cls is None:
      raise ConfigError(f"{where}: '{name}' is not a section")
    if node.get(name) is None:
      node[name] = {}
    if not isinstance(node[name], dict):
      raise ConfigError(f"{where}: '{name}' in the config file is not a mapping")
    node = node[name]
  reject_unknown({leaf: None}, cls, where, _ELSEWHERE)
  node[leaf] = _yaml_value(text, where)


# ------------------------------------------------------------------ helpers
def _yaml_value(text: str, where: str):
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ConfigError(f"{where}: not a YAML value ({str(e).splitlines()[0]})") from None


def _is_mapping(tp) -> bool:
  """Whether a field annotation such as `dict[str, str] | None` is a mapping."""
  args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
  return any(a is dict or typing.get_origin(a) is dict for a in args)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _section(d: dict, name: str, where: str) -> dict:
  if not isinstance(d.get(name), dict):
    raise ConfigError(f"{where}: `{name}` must be a mapping, got {d.get(name)!r}")
  return d[name]


# YAML 1.1 (PyYAML) reads 1e-3 and 3E5 as strings; YAML 1.2 and people read them as numbers.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(d: dict, cls) -> dict:
  """Turn number-like strings into floats for the float-typed fields of `cls` (recursively)."""
  hints = typing.get_type_hints(cls)
  out = dict(d)
  for key, value in d.items():
    tp = hints.get(key)
    if tp is None:  # unknown key: from_dict rejects it
      continue
    sub = dataclass_of(tp)
    if sub is not None and isinstance(value, dict):
      out[key] = _coerce(value, sub)
    elif isinstance(value, str) and _NUMBER.match(value) and matches(1.5, tp)[0] and not matches("", tp)[0]:
      out[key] = float(value)
  return out
