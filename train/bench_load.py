"""Peak host memory of loading released weights onto many devices:
`python -m train.bench_load CONFIG [model.key=value ...] --dir DIR [--processes N] [--devices D]`.

If DIR holds no checkpoint, first writes one with random weights for the config's model
(moe.hf.to_hf: bf16, or with --fp8 DeepSeek's FP8 release format). Then N fresh processes (D simulated
CPU devices in all, D/N each; XLA_FLAGS is set for them) load it with moe.hf.from_hf into fsdp over all
D devices, in --dtype, and each prints one JSON line: checkpoint_bytes (its tensors), baseline_rss
(after JAX and the devices are up, before loading), peak_rss (the process's high-water mark, VmHWM),
device_bytes (this process's shards of the loaded parameters), read_bytes (tensor bytes it read) and
seconds. On simulated CPU devices the devices' arrays are host memory too, so peak_rss counts them.

  python -m train.bench_load configs/deepseek-v2-lite.yaml model.num_hidden_layers=2 --dir /tmp/v2l2
  python -m train.bench_load configs/deepseek-v2-lite.yaml model.num_hidden_layers=2 --dir /tmp/v2l2 --processes 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def rss_kib(field: str) -> int:
  """VmRSS (now) or VmHWM (peak) of this process, KiB."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def write_checkpoint(config: str, overrides, out: Path, fp8: bool) -> None:
  from flax import nnx

  from moe import hf
  from moe.model import Transformer
  from moe.runtime import Runtime
  from train.core.train_config import load_train_config

  cfg = load_train_config(config, list(overrides)).model
  model = Transformer(cfg, Runtime.resolve(dtype="bfloat16", param_dtype="bfloat16", announce=False),
                      rngs=nnx.Rngs(0))
  hf.to_hf(model, out, max_shard_bytes=1 << 30, fp8=fp8)


def worker(path: Path, dtype: str) -> dict:
  import jax

  from moe import hf
  from parallel.mesh import MeshConfig, Parallelism

  par = Parallelism.from_config(MeshConfig(data=1, fsdp=-1), jax.devices())
  folder = hf.SafetensorsFolder(path)
  checkpoint_bytes = sum(folder.nbytes(n) for n in folder.names())
  del folder
  baseline = rss_kib("VmRSS")
  t = time.perf_counter()
  model = hf.from_hf(path, dtype=dtype, par=par)
  leaves = [v[...] for _, v in hf._variables(model).items()]
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - t
  device_bytes = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  return {"process": jax.process_index(), "devices": jax.local_device_count(), "checkpoint_bytes": checkpoint_bytes,
          "baseline_rss": baseline * 1024, "peak_rss": rss_kib("VmHWM") * 1024, "device_bytes": device_bytes,
          "read_bytes": model.loaded_bytes, "seconds": round(seconds, 1)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.bench_load", description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("config", nargs="?", help="YAML config whose model: section the random checkpoint has")
  p.add_argument("overrides", nargs="*")
  p.add_argument("--dir", required=True, type=Path, help="HF folder to load (written first if absent)")
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices in all")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--fp8", action="store_true", help="write the checkpoint in DeepSeek's FP8 release format")
  p.add_argument("--worker", nargs=3, metavar=("COORDINATOR", "N", "ID"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    from parallel import distributed
    from train.core import jsonl

    coordinator, n, i = args.worker
    if int(n) > 1:
      distributed.initialize(coordinator, int(n), int(i))
    print(jsonl.dumps(worker(args.dir, args.dtype)))
    return 0
  if args.devices % args.processes:
    print(f"error: --devices {args.devices} does not divide over --processes {args.processes}", file=sys.stderr)
    return 2
  if not (args.dir / "config.json").exists():
    if not args.config:
      print(f"error: {args.dir} holds no checkpoint; give a CONFIG to write a random one", file=sys.stderr)
      return 2
    print(f"writing a random checkpoint of {args.config} {' '.join(args.overrides)} to {args.dir}", file=sys.stderr)
    write_checkpoint(args.config, args.overrides, args.dir, args.fp8)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices // args.processes}")
  procs = [subprocess.Popen([sys.executable, "-m", "train.bench_load", "--dir", str(args.dir), "--dtype", args.dtype,
                             "--worker", f"127.0.0.1:{port}", str(args.processes), str(i)], env=env,
                            stdout=subprocess.PIPE, text=True) for i in range(args.processes)]
  rc = 0
  for proc in procs:
    out, _ = proc.communicate()
    rc = rc or proc.returncode
    if out.strip():
      print(out.strip().splitlines()[-1])
  return rc


if __name__ == "__main__":
  sys.exit(main())
