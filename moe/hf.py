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
from parallel import sharding as sharding_lib
from parallel.common.errors import ConfigError
from parallel.mesh import MeshConfig, Parallelism
from parallel.pipeline import Layout

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


def weight_names(cfg: ModelConfig, layout: Layout | None = None) -> dict[str, Target]:
  """Every tensor of the released checkpoint layout -> where it lives in our model (the MoE layers at
  their slots in `layout`, a pipelined model's stack: parallel/pipeline.py)."""
  slot = (layout or Layout(cfg.num_moe_layers)).layer_slot()
  table = {"model.embed_tokens.weight": Target("embed/embedding", (), False),
           "model.norm.weight": Target("norm/scale", (), False)}
  if not cfg.tie_word_embeddings:
    table["lm_head.weight"] = Target("lm_head/kernel", (), True)
  k = cfg.first_k_dense_replace
  for i in range(cfg.num_hidden_layers):
    stack, j = ("dense_layers", i) if i < k else ("moe_layers", int(slot[i - k]))
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
  """Every tensor in a folder of .safetensors files, read lazily (whole or by slices) through
  `safetensors.safe_open`; `bytes_read` counts the tensor bytes read so far.

  Each read opens its file afresh: safe_open maps the whole file, and the pages a read touches count
  as this process's resident memory for as long as the mapping lives, so a reader kept open over a
  checkpoint would hold all of it by the end of a load."""

  _ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}

  def __init__(self, folder: Path):
    files = sorted(folder.glob("*.safetensors"))
    if not files:
      raise ConfigError(f"{folder}: no *.safetensors files (expected an HF checkpoint folder)")
    self.file_of, self._info = {}, {}
    for f in files:
      try:
        with safe_open(str(f), framework="numpy") as handle:
          for name in handle.keys():
            info = handle.get_slice(name)
            self.file_of[name] = f
            self._info[name] = (tuple(info.get_shape()), info.get_dtype())
      except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    self.bytes_read = 0

  def __contains__(self, name):
    return name in self.file_of

  def names(self):
    return self.file_of.keys()

  def shape(self, name) -> tuple[int, ...]:
    return self._info[name][0]

  def nbytes(self, name) -> int:
    """The stored size of tensor `name`."""
    shape, dtype = self._info[name]
    return int(np.prod(shape, dtype=np.int64)) * self._ITEMSIZE[dtype]

  def is_fp8(self, name) -> bool:
    return self._info[name][1] == "F8_E4M3"

  def get(self, name, index=()) -> np.ndarray:
    """The tensor, or its slice `index` (a tuple of slices), as stored."""
    f = self.file_of[name]
    try:
      with safe_open(str(f), framework="numpy") as handle:
        out = handle.get_slice(name)[index] if index else handle.get_tensor(name)
    except Exception as e:  # an unsupported dtype, a truncated file
      raise ConfigError(f"{f}: cannot read tensor {name} ({str(e).splitlines()[0]})") from None
    self.bytes_read += out.nbytes
    return out


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
  """DeepSeek's FP8 release: weight [out, in] float8 * scale of its 128x128 block -> float32."""
  out, inn = w.shape
  s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:out, :inn]
  return w.astype(np.float32) * s


def read_float32(ckpt: SafetensorsFolder, name: str, rows: slice, cols: slice | None = None) -> np.ndarray:
  """float32 `name[rows, cols]` (a 1-D tensor: `name[rows]`); an FP8 weight is dequantised with the
  128x128 blocks of its `weight_scale_inv` that the slice touches."""
  if cols is None:
    return np.asarray(ckpt.get(name, (rows,)), np.float32)
  if not ckpt.is_fp8(name):
    return np.asarray(ckpt.get(name, (rows, cols)), np.float32)
  scale = name.removesuffix(".weight") + ".weight_scale_inv"
  if scale not in ckpt:
    raise ConfigError(f"{ckpt.file_of[name]}: {name} is float8 but {scale} is missing from the checkpoint")
  b = 128
  r0, c0 = rows.start // b * b, cols.start // b * b
  s = ckpt.get(scale, (slice(r0 // b, -(-rows.stop // b)), slice(c0 // b, -(-cols.stop // b))))
  full = np.repeat(np.repeat(s.astype(np.float32), b, 0), b, 1)
  s = full[rows.start - r0: rows.stop - r0, cols.start - c0: cols.stop - c0]
  return ckpt.get(name, (rows, cols)).astype(np.float32) * s


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


def config_of(path: str | Path) -> ModelConfig:
  """The architecture of an HF folder, as `from_hf` loads it (without MTP when it has no MTP weights)."""
  path = Path(path)
  cfg = ModelConfig.from_hf_json(path)
  names = SafetensorsFolder(path).names()
  if cfg.num_nextn_predict_layers and f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" not in names:
    log.info("%s has no MTP weights: loading with num_nextn_predict_layers=0", path)
    cfg = cfg.replace(num_nextn_predict_layers=0)
  return cfg


def check_tensors(ckpt: SafetensorsFolder, cfg: ModelConfig, variables: dict, path: Path,
                  layout: Layout | None = None) -> dict:
  """{variable path: [(index, HF name, transposed?)]} for every tensor of `cfg`, after checking that
  the checkpoint has each of them in the shape the config implies and nothing else (before anything
  is read: a bad checkpoint is one line naming the tensor and its file, and nothing is half-loaded)."""
  table = weight_names(cfg, layout)
  skip = set(_mtp_copies(cfg)) | {n for n in ckpt.names() if n.endswith("weight_scale_inv")}
  for name in ckpt.names():
    if name not in table and name not in skip:
      raise ConfigError(f"{ckpt.file_of[name]}: tensor {name} does not belong to the model of {path}/config.json")
  missing = sorted(n for n in table if n not in ckpt)
  if missing:
    raise ConfigError(f"{path}: the checkpoint lacks tensor {missing[0]}"
                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + " that config.json implies")
  plan = {}
  for name, t in table.items():
    want = tuple(variables[t.path].shape[len(t.index):])
    want = want[::-1] if t.transpose else want
    if ckpt.shape(name) != want:
      raise ConfigError(f"{ckpt.file_of[name]}: {name} has shape {ckpt.shape(name)}, the config implies {want}")
    plan.setdefault(t.path, []).append((t.index, name, t.transpose))
  return plan


def _block(ckpt, entries, shape, index, dtype=np.float32) -> np.ndarray:
  """`variable[index]` in `dtype` for the global slices `index` of one variable of `shape`: its leading
  stacked dimensions (layer, expert) pick the HF tensors, the others slice each of them (read as
  float32 one tensor's slice at a time, cast as it is stored; a pipeline's padding slots are zero)."""
  index = tuple(slice(*sl.indices(n)) for sl, n in zip(index, shape))
  lead = len(entries[0][0])
  ranges = [range(sl.start, sl.stop) for sl in index[:lead]]
  inner = index[lead:]
  out = np.zeros([len(r) for r in ranges] + [sl.stop - sl.start for sl in inner], dtype)
  for pos, name, transpose in entries:
    if not all(i in r for i, r in zip(pos, ranges)):
      continue
    if transpose:  # HF linear weights are [out, in], ours [in, out]
      piece = read_float32(ckpt, name, inner[1], inner[0]).T
    else:
      piece = read_float32(ckpt, name, *inner)
    out[tuple(i - r.start for i, r in zip(pos, ranges))] = piece
  return out


@jax.jit(donate_argnums=0)
def _set_layer(x, part, i):
  return jax.lax.dynamic_update_index_in_dim(x, part, i, 0)


def _place(ckpt, entries, shape, sharding, dtype) -> jax.Array:
  """One variable as a global array in `sharding`, this process's devices' parts read from `ckpt`.
  A stacked variable whose layer dimension is not sharded is filled one layer at a time in place, so
  that the host holds one layer's parts at a time, not the process's whole share of the stack."""
  spec = getattr(sharding, "spec", ())
  if not entries[0][0] or shape[0] == 1 or (len(spec) and spec[0] is not None):
    return jax.make_array_from_callback(shape, sharding, lambda index: _block(ckpt, entries, shape, index, dtype))
  if isinstance(sharding, jax.sharding.NamedSharding):
    layer_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  else:
    layer_sharding = sharding
  out = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
  for i in range(shape[0]):
    part = jax.make_array_from_callback(
        shape[1:], layer_sharding, lambda index, i=i: _block(ckpt, entries, shape, (slice(i, i + 1), *index), dtype)[0])
    out = _set_layer(out, part, i)
  return out


def from_hf(path: str | Path, dtype=None, *, mesh=None, rt: Runtime | None = None, par=None) -> Transformer:
  """Load an HF DeepSeek-V2/V3 folder (config.json + safetensors shards, bf16 or DeepSeek's FP8 with
  128x128 `weight_scale_inv`). `dtype` (a name, NumPy or JAX dtype) sets the compute and parameter
  dtype (default float32); `rt` instead gives the whole moe.runtime.Runtime. `mesh` (a jax Mesh with
  the axes data, fsdp, expert, tensor) or `par` (a parallel.mesh.Parallelism: the mesh with its
  sharding rules): every parameter is made directly in its shardings there, each
  device's part read from the files by slices (`safe_open(...).get_slice`), FP8 weights dequantised
  block by block, so that a process reads only what its devices hold. Beyond the devices' arrays the
  host holds this process's parts of one variable at a time, of one layer of it for stacked variables
  (a layer's embedding-sized tensor, or one layer's experts), plus one float32 slice being read.

  If the checkpoint has no MTP weights (as `transformers` saves it), the model gets
  num_nextn_predict_layers = 0.
  """
  path = Path(path)
  cfg = config_of(path)
  if par is None and mesh is not None:
    par = Parallelism.on(mesh, MeshConfig(ep_transport="padded", ep_nodes=1))
  if rt is None:
    name = dtype_name(dtype or "float32")
    rt = Runtime.resolve(dtype=name, param_dtype=name, par=par, announce=False)
  ckpt = SafetensorsFolder(path)
  model = nnx.eval_shape(lambda: Transformer(cfg, rt, rngs=nnx.Rngs(0)))
  variables = _variables(model)
  plan = check_tensors(ckpt, cfg, variables, path, model.layout)
  mesh_shape = dict(par.mesh.shape) if par is not None else {}
  single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for p, v in variables.items():
    if par is None or par.mesh.size == 1:
      sharding = single if par is None else jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec())
    else:
      spec, _ = sharding_lib.resolve_dims(v.get_metadata()["axes"], v.shape, mesh_shape, par.rules, p)
      sharding = jax.sharding.NamedSharding(par.mesh, spec)
    v.set_value(_place(ckpt, plan[p], tuple(v.shape), sharding, np.dtype(v.dtype)))
  model.loaded_bytes = ckpt.bytes_read  # (this process's reads: a test checks it stays under the total)
  return model


# --------------------------------------------------------------------- saving
def quantize_fp8(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """DeepSeek's FP8 release format for a weight [out, in]: (float8_e4m3fn weight, float32
  `weight_scale_inv` [ceil(out/128), ceil(in/128)]), scale = max(amax, 1e-4) / 448 per 128x128 block."""
  out, inn = w.shape
  wp = np.pad(w.astype(np.float32), ((0, -out % block), (0, -inn % block)))
  t = wp.reshape(wp.shape[0] // block, block, wp.shape[1] // block, block)
  scale = np.maximum(np.abs(t).max((1, 3)), 1e-4) / 448.0
  q = np.clip(t / scale[:, None, :, None], -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
  # contiguous: safetensors writes a strided view's underlying buffer, not its elements
  return np.ascontiguousarray(q.reshape(wp.shape)[:out, :inn]), scale.astype(np.float32)


def fp8_in_release(name: str) -> bool:
  """The linear weights DeepSeek released in FP8: attention, dense, shared and routed expert projections
  (not the embedding, the heads, the router, the norms or the MTP projection)."""
  return name.endswith("_proj.weight") and ".layers." in name and not name.endswith("eh_proj.weight")


def to_hf(model: Transformer, path: str | Path, max_shard_bytes: int = 4 << 30, fp8: bool = False) -> None:
  """Write config.json + sharded safetensors (+ index) in the released naming, in the model's parameter
  dtype, or with `fp8` the linear weights in DeepSeek's FP8 release format (E4M3 + 128x128
  `weight_scale_inv`, what its inference code and vLLM/SGLang load). The model's arrays may be sharded
  over devices and processes: tensors are gathered to the host one at a time (with several processes
  every process takes part and process 0 writes), and a file holds at most `max_shard_bytes`."""
  path = Path(path)
  writer = jax.process_index() == 0
  if writer:
    path.mkdir(parents=True, exist_ok=True)
  cfg = model.cfg
  variables = _variables(model)
  out_dtype = np.dtype(np.float32 if model.rt.param_dtype == "float32" else ml_dtypes.bfloat16)
  table = weight_names(cfg, model.layout)
  copies = _mtp_copies(cfg)

  def spec(name):
    t = table[copies.get(name, name)]
    shape = variables[t.path].shape[len(t.index):]
    shape = shape[::-1] if t.transpose else shape
    if fp8 and fp8_in_release(name):
      return [(name, shape, np.dtype(ml_dtypes.float8_e4m3fn)),
              (name + "_scale_inv", tuple(-(-n // 128) for n in shape), np.dtype(np.float32))]
    dt = np.dtype(np.float32) if name.endswith("e_score_correction_bias") else out_dtype
    return [(name, shape, dt)]

  def host(x):
    if jax.process_count() > 1 and not x.is_fully_addressable:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  def get(name) -> dict:
    t = table[copies.get(name, name)]
    v = variables[t.path][...]
    w = host(v[t.index] if t.index else v).astype(np.float32)
    w = np.ascontiguousarray(w.T if t.transpose else w)
    if fp8 and fp8_in_release(name):
      q, scale = quantize_fp8(w)
      return {name: q, name + "_scale_inv": scale}
    return {name: w.astype(spec(name)[0][2])}

  shards, size = [[]], 0
  for name in list(table) + list(copies):
    nbytes = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, shape, dt in spec(name))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  weight_map, total = {}, 0
  for i, names in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {k: v for name in names for k, v in get(name).items()}
    if writer:
      save_file(tensors, str(path / fname), metadata={"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(tensors, fname))
    del tensors
  if not writer:
    return
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  config = cfg.to_hf_dict(torch_dtype=model.rt.param_dtype)
  if fp8:
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
  (path / "config.json").write_text(json.dumps(config, indent=2))
