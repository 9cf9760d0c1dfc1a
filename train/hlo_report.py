"""The step-time forecast for any compiled HLO text: this project's, or another stack's.

  python -m train.hlo_report FILE.hlo --target v5p-1024 [--tokens N] [--model-flops F] [--price USD]

FILE is the text of an optimised (compiled) module: `compiled.as_text()`, or what
`XLA_FLAGS=--xla_dump_to=DIR` writes (*after_optimizations.txt; MaxText's train_compile writes the
same). The target names the chip (configs/hardware/chips.yaml) and the granules behind the slow links:
replica-group positions in order, hosts of 8 GPUs or slices of the target's devices. One JSON line:
{"costs", "forecast"} as train.aot prints them (its docstring has the fields); with --tokens (per
step, all devices) and --model-flops (per step, all devices), tokens/s, TFLOP/s and MFU too. The
ragged dots' buffers count full (ragged_fill 1: an upper figure) unless --ragged-fill says otherwise;
this project's dropless fast path (operations under the `ep_fast_path` scope) at --fast-path-fill
(default the ragged fill): given train.aot's `ragged_fill` and `fast_path_fill` for the same program,
it reads the matmuls at train.aot's fills.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parallel import targets as targets_lib
from parallel.common.errors import InputError
from train import forecast
from train.core import jsonl


def hlo_report(text: str, target: targets_lib.Target, tokens: int = 0, model_flops: float = 0.0,
               price: float | None = None, ragged_fill: float = 1.0, fast_path_fill: float | None = None) -> dict:
  chip = forecast.chip_of(target.family)
  hw = targets_lib.hardware(target.family)
  p = forecast.Program(text)
  per_granule = target.devices_per_slice if target.platform == "tpu" else targets_lib.GPUS_PER_HOST
  cost = forecast.costs(p, chip, lambda i: i // per_granule, ragged_fill, fast_path_fill)
  devices = max(p.size, 1)
  chips = max(1, devices // hw["devices_per_chip"])
  price = price if price is not None else hw["price"]
  out = forecast.report(cost, chip, tokens=tokens, model_flops=model_flops, chips=chips, devices=devices,
                        price=price)
  return {"costs": forecast.summary(cost),
          "forecast": {**out, "chip": target.family, "devices": devices, "ragged_fill": ragged_fill,
                       **({"fast_path_fill": fast_path_fill} if fast_path_fill is not None else {}),
                       "price_per_chip_hour": price, "error": forecast.ERROR}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.hlo_report", description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("file", help="compiled HLO text (*after_optimizations.txt, compiled.as_text())")
  p.add_argument("--target", required=True, help="v5p-1024, tpu7x-512, h100x256, ... (the chip and its links)")
  p.add_argument("--slices", type=int, default=1, help="TPU slices")
  p.add_argument("--tokens", type=int, default=0, help="tokens per step, all devices")
  p.add_argument("--model-flops", type=float, default=0.0, help="model FLOPs per step, all devices")
  p.add_argument("--price", type=float, default=None, help="USD per chip-hour (default: configs/hardware/chips.yaml)")
  p.add_argument("--ragged-fill", type=float, default=1.0, help="share of ragged dots' buffer rows holding tokens")
  p.add_argument("--fast-path-fill", type=float, default=None,
                 help="the same share in the dropless fast path's buffers (default: --ragged-fill)")
  args = p.parse_args(argv)
  try:
    target = targets_lib.parse(args.target, args.slices)
    path = Path(args.file)
    if not path.is_file():
      raise InputError(f"{args.file}: no such file; pass a compiled HLO text dump")
    text = path.read_text(errors="replace")
    if "HloModule" not in text[:10000]:
      raise InputError(f"{args.file}: not HLO text (no HloModule line); pass compiled.as_text() or an"
                       " *after_optimizations.txt dump")
    print(jsonl.dumps(hlo_report(text, target, args.tokens, args.model_flops, args.price, args.ragged_fill,
                                 args.fast_path_fill)))
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
