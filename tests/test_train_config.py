"""TrainConfig: YAML loading, dotted overrides, one-line errors, round trip."""

import pytest
import yaml

from moe.config import ModelConfig
from parallel.common.errors import ConfigError
from train.core.train_config import OptimizerConfig, TrainConfig, load_train_config

TINY = "configs/tiny.yaml"


def _write(tmp_path, text, name="run.yaml"):
  p = tmp_path / name
  p.write_text(text)
  return p


MODEL = yaml.safe_dump({"model": ModelConfig.load(TINY).to_dict()})


def test_tiny_loads_with_training_values():
  c = load_train_config(TINY)
  assert isinstance(c.model, ModelConfig) and c.model.hidden_size == 128
  assert c.run_dir == "runs/tiny"
  assert (c.steps, c.batch_size, c.seq_len, c.grad_accum) == (300, 8, 256, 1)
  assert c.optimizer.warmup_steps == 20 and isinstance(c.optimizer.lr, float)
  assert c.optimizer.eps == 1e-8 and c.loss.balance_alpha == 1e-4
  assert c.mesh.data == -1 and c.profile_steps is None


@pytest.mark.parametrize("name", ["bench-cpu", "deepseek-v3-671b", "deepseek-v2-lite", "deepseek-v2-236b",
                                  "deepseek-v3-671b-32k", "deepseek-v3-671b-128k", "deepseek-v2-lite-32k",
                                  "moonlight-16b-a3b", "kimi-k2"])
def test_every_config_loads(name):
  c = load_train_config(f"configs/{name}.yaml")
  assert c.run_dir == f"runs/{name}"


def test_long_context_stages_are_the_reports():
  """V3 report section 4.3: 1,000 steps each at 32K (1,920 sequences) and 128K (480), lr 7.3e-6,
  YaRN scale 40, alpha 1, beta 32 (added: pre-training has plain RoPE); the architecture otherwise the
  pre-training one (the `base:` file)."""
  v3 = load_train_config("configs/deepseek-v3-671b.yaml")
  for name, seq_len, batch in (("32k", 32768, 1920), ("128k", 131072, 480)):
    c = load_train_config(f"configs/deepseek-v3-671b-{name}.yaml")
    assert (c.seq_len, c.batch_size, c.steps) == (seq_len, batch, 1000)
    assert v3.model.rope_scaling is None and c.per_device_batch == 1 and c.precision == "bf16"
    assert c.model.replace(rope_scaling=None, max_position_embeddings=4096) == v3.model
    rope = c.model.rope_scaling
    assert (rope.factor, rope.beta_slow, rope.beta_fast, rope.original_max_position_embeddings) == (40, 1, 32, 4096)
    lrs = {c.optimizer.lr, c.optimizer.final_lr}
    assert lrs == {7.3e-6} and c.optimizer.warmup_steps == 0 and c.optimizer.decay_steps == 0
    assert seq_len % (2 * c.mesh.context) == 0


def test_base_config_is_merged_under_the_file(tmp_path):
  """`base:` names another config file (relative to this one): its keys, with this file's over them,
  mappings merged key by key."""
  _write(tmp_path, MODEL + "steps: 700\nseq_len: 64\noptimizer:\n  lr: 1.0e-3\n  b2: 0.9\n", "a.yaml")
  c = load_train_config(_write(tmp_path, "base: a.yaml\nseq_len: 32\noptimizer:\n  lr: 2.0e-3\n"))
  assert (c.steps, c.seq_len, c.optimizer.lr, c.optimizer.b2) == (700, 32, 2e-3, 0.9)
  assert c.model == ModelConfig.load(TINY) and c.run_dir == "runs/run"


@pytest.mark.parametrize("text, want", [("base: run.yaml\n", "leads back to itself"),
                                        ("base: nothere.yaml\n", "nothere.yaml: no such config file"),
                                        ("base: [a]\n", "base must be the path of another config file")])
def test_bad_base_is_one_line(tmp_path, text, want):
  with pytest.raises(ConfigError, match=want):
    load_train_config(_write(tmp_path, text))


def test_defaults_follow_v3():
  c = TrainConfig()
  o, loss = c.optimizer, c.loss
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)
  assert (o.lr, o.final_lr, o.moment_dtype) == (2.2e-4, 2.2e-5, "bfloat16")
  assert (loss.mtp_lambda, loss.balance_alpha, loss.bias_update_gamma) == (0.3, 1e-4, 1e-3)
  assert (c.data, c.tokenizer, c.precision, c.grad_accum) == ("default", "byte", "float32", 1)


def test_overrides():
  c = load_train_config(
      TINY,
      ["steps=100", "model.hidden_size=64", "optimizer.lr=3e-4", "mesh.data=2", "profile_steps=[3, 5]",
       "run_dir=/tmp/x", "precision=bf16", "model.rms_norm_eps=1e-5"],
  )
  assert c.steps == 100 and c.model.hidden_size == 64 and c.mesh.data == 2
  assert c.optimizer.lr == 3e-4 and c.model.rms_norm_eps == 1e-5  # YAML 1.1 reads 3e-4 as a string
  assert c.profile_steps == (3, 5) and c.run_dir == "/tmp/x" and c.precision == "bf16"


def test_override_creates_missing_section(tmp_path):
  p = _write(tmp_path, MODEL + "seq_len: 64\n")
  c = load_train_config(p, ["loss.mtp_lambda=0.1"])
  assert c.loss.mtp_lambda == 0.1 and c.run_dir == "runs/run"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stepz=3"], r"^override 'stepz=3': unknown key 'stepz' \(did you mean 'steps'\?\)$"),
        (["optimizer.lrr=1"], r"unknown key 'lrr' \(did you mean 'lr'\?\)"),
        (["model.hiddn_size=3"], r"did you mean 'hidden_size'"),
        (["steps.x=1"], r"'steps' is not a section"),
        (["steps"], r"expected key=value"),
        (["steps=abc"], r"^steps: expected an integer, got str 'abc'$"),
        (["steps=true"], r"^steps: expected an integer"),
        (["optimizer.lr=fast"], r"^optimizer.lr: expected a number"),
        (["optimizer.moment_dtype=float16"], r"optimizer.moment_dtype: expected one of 'bfloat16', 'float32'"),
        (["precision=fp16"], r"^precision: expected one of 'float32', 'bf16', 'fp8'"),
        (["optimizer.schedule=linear"], r"optimizer.schedule: expected one of"),
        (["mesh.data=0"], r"mesh.data=0 must be >= 1 or -1"),
        (["data_workers=-1"], r"^data_workers=-1 must be >= 0"),
        (["impl.scan_layers=maybe"], r"^impl.scan_layers: expected a boolean"),
        (["impl.attention=xformers"], r"^impl.attention: expected one of 'auto', 'fused', 'blocked', 'splash', 'flash', 'latent'"),
        (["impl.experts=sparse"], r"^impl.experts: expected one of 'auto', 'megablox', 'triton', 'ragged_dot', 'blocked', 'dense'"),
        (["mesh.ep_transport=nccl"], r"^mesh.ep_transport: expected one of 'auto', 'padded', 'ragged'"),
        (["mesh.rules.embed=model"], r"mesh.rules.embed: 'model' is not a mesh axis"),
        # a key at the wrong level names where it lives
        (["ep_transport=padded"], r"unknown key 'ep_transport' \(it lives at mesh.ep_transport\)$"),
        (["model.scan_layers=false"], r"unknown key 'scan_layers' \(it lives at impl.scan_layers\)$"),
        (["remat_policy=full"], r"unknown key 'remat_policy' \(it lives at impl.remat_policy\)$"),
        (["model.dtype=bfloat16"], r"unknown key 'dtype' \(it lives at precision \(float32 \| bf16 \| fp8"),
        (["model.fp8=true"], r"unknown key 'fp8' \(it lives at precision=fp8\)$"),
        (["optimizer.seq_len=3"], r"unknown key 'seq_len' \(it lives at seq_len\)$"),
        (["mesh.fsdp=-1"], r"at most one axis may be -1"),
        (["batch_size=6", "grad_accum=4"], r"divisible by grad_accum=4"),
        (["profile_steps=[5, 3]"], r"profile_steps=\[5, 3\] must be null or \[start, stop\]"),
        (["profile_steps=7"], r"profile_steps=7 must be"),
        (["optimizer.warmup_steps=150"], r"decay starts at step 100 .* before warmup_steps=150"),
        (["optimizer.b2=1.0"], r"b2=1.0 must be in \[0, 1\)"),
        (["loss.bias_update_stop_fraction=2"], r"bias_update_stop_fraction=2 must be in \[0, 1\]"),
        (["seq_len=4096"], r"exceeds model.max_position_embeddings=1024"),
        (["optimizer.lr=[1"], r"not a YAML value"),
    ],
)
def test_bad_overrides_one_line(overrides, match):
  with pytest.raises(ConfigError, match=match) as e:
    load_train_config(TINY, overrides)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("stepz: 3\n", r"run.yaml: unknown key 'stepz' \(did you mean 'steps'\?\)"),
        ("optimizer:\n  warmup: 3\n", r"run.yaml: optimizer: unknown key 'warmup' \(did you mean 'warmup_steps'\?\)"),
        ("optimizer: 3\n", r"`optimizer` must be a mapping"),
        ("log_every: 0\n", r"log_every=0 must be >= 1"),
    ],
)
def test_bad_file_one_line(tmp_path, extra, match):
  with pytest.raises(ConfigError, match=match):
    load_train_config(_write(tmp_path, MODEL + extra))


def test_model_dtype_in_yaml_is_an_error_not_ignored(tmp_path):
  """`precision` is the one compute-precision setting: a model.dtype in the file (which precision
  used to override silently) stops the run with one line naming precision."""
  path = _write(tmp_path, MODEL.replace("model:\n", "model:\n  dtype: bfloat16\n", 1) + "precision: float32\n")
  with pytest.raises(ConfigError, match=r"run.yaml: model: unknown key 'dtype' \(it lives at precision") as e:
    load_train_config(path)
  assert "\n" not in str(e.value)
  c = load_train_config(TINY, ["precision=bf16"])
  assert (c.compute_dtype, c.fp8) == ("bfloat16", False)
  assert (load_train_config(TINY, ["precision=fp8"]).compute_dtype, load_train_config(TINY).compute_dtype) == (
      "bfloat16", "float32")


def test_missing_model_section(tmp_path):
  with pytest.raises(ConfigError, match="needs a `model:` mapping"):
    load_train_config(_write(tmp_path, "steps: 3\n"))


def test_decay_start_default_is_steps_minus_decay_steps():
  o = OptimizerConfig(decay_steps=300)
  assert o.decay_start_step(1000) == 700
  assert OptimizerConfig(decay_start=50).decay_start_step(1000) == 50
  with pytest.raises(ConfigError, match="decay starts at step -100"):
    TrainConfig(steps=200, optimizer=OptimizerConfig(decay_steps=300))


def test_to_dict_round_trip(tmp_path):
  c = load_train_config(TINY, ["profile_steps=[2, 4]", "optimizer.lr=3e-4"])
  d = c.to_dict()
  assert d["profile_steps"] == [2, 4] and d["model"]["hidden_size"] == 128 and d["run_dir"] == "runs/tiny"
  p = _write(tmp_path, yaml.safe_dump(d), "saved.yaml")
  assert load_train_config(p) == c
