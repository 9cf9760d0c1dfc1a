"""HF DeepSeek-V2/V3 checkpoints in and out, tensor by tensor.

`from_hf(path)` reads a folder as released (config.json + safetensors shards; FP8 weights with
128x128 `weight_scale_inv` blocks are dequantised) or as `transformers` saves it, and returns a
`Transformer`. `to_hf(model, path)` writes a folder `transformers` loads. One table,
`weight_names(cfg)`, maps every HF tensor name to (our parameter path, index, transposed?).
Tensors are read and written with the `safetensors` library; loading holds one checkpoint tensor
beside the model at a time, saving one shard (at most `max_shard_bytes`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from moe.config import ModelConfig
from moe.model import Transformer
from moe.runtime import Runtime
from parallel.errors import ConfigError

log = logging.getLogger(__name__)


class Target(NamedTuple):
  path: str  # our variable path, "/"-joined
  index: tuple  # position inside a stacked variable (layer, expert)
  transpose: bool  # HF linear weights are [out, in]; our kernels are [in, out]


# ------------------------------------------------------------------ the table
def _layer_names(cfg: ModelConfig, moe: bool):
  """(HF suffix inside a layer, our suffix, transpose?, expert index or None)."""
  attn = ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
  attn += ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
  for name in attn:
    yield f"self_attn.{name}.weight", f"self_attn/{name}/kernel", True, None
  norms = ["input_layernorm", "post_attention_layernorm", "self_attn.kv_a_layernorm"]
  norms += [] if cfg.q_lora_rank is None else ["self_attn.q_a_layernorm"]
  for name in norms:
    yield f"{name}.weight", f"{name.replace('.', '/')}/scale", False, None
  if not moe:
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield f"mlp.{proj}.weight", f"mlp/{proj}/kernel", True, None
    return
  yield "mlp.gate.weight", "mlp/gate/kernel", True, None
  if cfg.topk_method == "noaux_tc":
    yield "mlp.gate.e_score_correction_bias", "mlp/gate/e_score_correction_bias", False, None
  for e in range(cfg.n_routed_experts):
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield f"mlp.experts.{e}.{proj}.weight", f"mlp/experts/{proj}", True, e
  if cfg.n_shared_experts:
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield f"mlp.shared_experts.{proj}.weight", f"mlp/shared_experts/{proj}/kernel", True, None


def weight_names(cfg: ModelConfig) -> dict[str, Target]:
  """Every tensor of the released checkpoint layout -> where it lives in our model."""
  table = {"model.embed_tokens.weight": Target("embed/embedding", (), False),
           "model.norm.weight": Target("norm/scale", (), False)}
  if not cfg.tie_word_embeddings:
    table["lm_head.weight"] = Target("lm_head/kernel", (), True)
  k = cfg.first_k_dense_replace
  for i in range(cfg.num_hidden_layers):
    stack, j = ("dense_layers", i) if i < k else ("moe_layers", i - k)
    for hf, ours, t, e in _layer_names(cfg, moe=i >= k):
      table[f"model.layers.{i}.{hf}"] = Target(f"{stack}/layers/{ours}", (j,) if e is None else (j, e), t)
  for d in range(cfg.num_nextn_predict_layers):
    pre = f"model.layers.{cfg.num_hidden_layers + d}"
    table[f"{pre}.enorm.weight"] = Target(f"mtp/{d}/enorm/scale", (), False)
    table[f"{pre}.hnorm.weight"] = Target(f"mtp/{d}/hnorm/scale", (), False)
    table[f"{pre}.eh_proj.weight"] = Target(f"mtp/{d}/eh_proj/kernel", (), True)
    table[f"{pre}.shared_head.norm.weight"] = Target(f"mtp/{d}/norm/scale", (), False)
    for hf, ours, t, e in _layer_names(cfg, moe=cfg.n_routed_experts > 0):
      table[f"{pre}.{hf}"] = Target(f"mtp/{d}/block/{ours}", () if e is None else (e,), t)
  return table


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
  """The MTP layers' own copies of embedding and head in the release -> the shared tensor."""
  out = {}
  for d in range(cfg.num_nextn_predict_layers):
    pre = f"model.layers.{cfg.num_hidden_layers + d}"
    out[f"{pre}.embed_tokens.weight"] = "model.embed_tokens.weight"
    out[f"{pre}.shared_head.head.weight"] = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
  return out


# ------------------------------------------------------------ safetensors I/O
# safetensors' NumPy reader names float8 dtypes as NumPy attributes, which NumPy lacks
# (safetensors#682); ml_dtypes provides them.
for _name in ("float8_e4m3fn", "float8_e5m2"):
  if not hasattr(np, _name):
    setattr(np, _name, getattr(ml_dtypes, _name))


class SafetensorsFolder:
  """Every tensor in a folder of .safetensors files, read lazily through `safetensors.safe_open`."""

  def __init__(self, folder: Path):
    files = sorted(folder.glob("*.safetensors"))
    if not files:
      raise ConfigError(f"{folder}: no *.safetensors files (expected an HF checkpoint folder)")
    self.handles, self.file_of = {}, {}
    for f in files:
      try:
        handle = safe_open(str(f), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
      self.handles[f] = handle
      self.file_of.update(dict.fromkeys(handle.keys(), f))

  def __contains__(self, name):
    return name in self.file_of

  def names(self):
    return self.file_of.keys()

  def get(self, name) -> np.ndarray:
    f = self.file_of[name]
    try:
      return self.handles[f].get_tensor(name)
    except Exception as e:  # an unsupported dtype, a truncated file
      raise ConfigError(f"{f}: cannot read tensor {name} ({str(e).splitlines()[0]})") from None


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
  """DeepSeek's FP8 release: weight [out, in] float8 * scale of its 128x128 block -> float32."""
  out, inn = w.shape
  s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:out, :inn]
  return w.astype(np.float32) * s


def _read(ckpt: SafetensorsFolder, name: str) -> np.ndarray:
  w = ckpt.get(name)
  if w.dtype == ml_dtypes.float8_e4m3fn:
    scale = name.removesuffix(".weight") + ".weight_scale_inv"
    if scale not in ckpt:
      raise ConfigError(f"{name} is float8 but {scale} is missing from the checkpoint")
    return dequantize_fp8(np.asarray(w), np.asarray(ckpt.get(scale)))
  return np.asarray(w, dtype=np.float32)


# --------------------------------------------------------------------- loading
def _variables(model) -> dict:
  return {"/".join(map(str, p)): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def dtype_name(dtype) -> str:
  """'float32' or 'bfloat16' for a string, a NumPy or a JAX dtype."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype {dtype!r}: expected float32 or bfloat16")
  return name


def from_hf(path: str | Path, dtype=None, *, rt: Runtime | None = None) -> Transformer:
  """Load an HF DeepSeek-V2/V3 folder. `dtype` (a name, NumPy or JAX dtype) sets the compute and
  parameter dtype (default float32); `rt` instead gives the whole moe.runtime.Runtime.

  If the checkpoint has no MTP weights (as `transformers` saves it), the model gets
  num_nextn_predict_layers = 0.
  """
  path = Path(path)
  cfg = ModelConfig.from_hf_json(path)
  if rt is None:
    name = dtype_name(dtype or "float32")
    rt = Runtime.resolve(dtype=name, param_dtype=name, announce=False)
  ckpt = SafetensorsFolder(path)
  if cfg.num_nextn_predict_layers and f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" not in ckpt:
    log.info("%s has no MTP weights: loading with num_nextn_predict_layers=0", path)
    cfg = cfg.replace(num_nextn_predict_layers=0)

  model = nnx.eval_shape(lambda: Transformer(cfg, rt, rngs=nnx.Rngs(0)))
  variables = _variables(model)
  buffers = {p: np.zeros(v.shape, np.dtype(v.dtype)) for p, v in variables.items()}
  filled = set()
  table = weight_names(cfg)
  skip = set(_mtp_copies(cfg)) | {n for n in ckpt.names() if n.endswith("weight_scale_inv")}
  for name in ckpt.names():
    if name in skip:
      continue
    if name not in table:
      raise ConfigError(f"{path}: tensor {name} does not belong to the configured model (config.json mismatch?)")
    target = table[name]
    w = _read(ckpt, name)
    w = w.T if target.transpose else w
    buf = buffers[target.path]
    want = buf[target.index].shape if target.index else buf.shape
    if w.shape != want:
      raise ConfigError(f"{path}: {name} has shape {w.shape[::-1] if target.transpose else w.shape},"
                        f" the config implies {want[::-1] if target.transpose else want}")
    buf[target.index] = w
    filled.add(name)
  missing = sorted(n for n in table if n not in filled)
  if missing:
    raise ConfigError(f"{path}: checkpoint lacks {', '.join(missing[:3])}"
                      + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
  for p, v in variables.items():
    v.set_value(jnp.asarray(buffers.pop(p), dtype=v.dtype))  # frees each host buffer as it goes
  return model


# --------------------------------------------------------------------- saving
def to_hf(model: Transformer, path: str | Path, max_shard_bytes: int = 4 << 30) -> None:
  """Write config.json + sharded safetensors (+ index) in the released naming, one shard at a time,
  in the model's parameter dtype."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cfg = model.cfg
  variables = _variables(model)
  out_dtype = np.dtype(np.float32 if model.rt.param_dtype == "float32" else ml_dtypes.bfloat16)
  table = weight_names(cfg)
  copies = _mtp_copies(cfg)

  def spec(name):
    t = table[copies.get(name, name)]
    shape = variables[t.path].shape[len(t.index):]
    dt = np.dtype(np.float32) if name.endswith("e_score_correction_bias") else out_dtype
    return name, shape[::-1] if t.transpose else shape, dt

  def get(name, dt):
    t = table[copies.get(name, name)]
    v = variables[t.path][...]
    w = np.asarray(jax.device_get(v[t.index] if t.index else v)).astype(np.float32)
    return np.ascontiguousarray(w.T if t.transpose else w, dtype=dt)

  shards, size = [[]], 0
  for s in map(spec, list(table) + list(copies)):
    nbytes = int(np.prod(s[1], dtype=np.int64)) * s[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += nbytes
  weight_map, total = {}, 0
  for i, specs in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {name: get(name, dt) for name, _, dt in specs}
    save_file(tensors, str(path / fname), metadata={"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(tensors, fname))
    del tensors
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(torch_dtype=model.rt.param_dtype), indent=2))
