"""Tokenise a corpus once, for training on it many times:

  python -m train.data prepare INPUT... --out DIR [--tokenizer byte|PATH]

writes ArrayRecord shards of pre-tokenised documents and metadata.json (train/core/input_pipeline.py, `prepare`);
train on them with `data=DIR`.

  python -m train.data cloze DATA --out DIR [--n 200] [--seed 0] [--name heldout_cloze]

writes a multiple-choice cloze task for lm-eval from DATA's held-out split (train/core/cloze.py):
DIR/NAME.yaml and DIR/NAME.jsonl, for `eval_tasks: [NAME]` with `eval_tasks_path: DIR`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from parallel.common.errors import DataError
from train.core import cloze
from train.core.input_pipeline import load_tokenizer, prepare


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("prepare", help="tokenise a corpus into ArrayRecord shards")
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="'default', a file, or a glob (quoted)")
  p.add_argument("--out", required=True, help="output directory (new or empty)")
  p.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of an HF tokenizer.json")
  c = commands.add_parser("cloze", help="a multiple-choice cloze task from the held-out split, for lm-eval")
  c.add_argument("data", help="'default', a file, or a glob (quoted)")
  c.add_argument("--out", required=True, help="output directory")
  c.add_argument("--n", type=int, default=200, help="questions")
  c.add_argument("--seed", type=int, default=0)
  c.add_argument("--name", default="heldout_cloze", help="the task's name")
  args = parser.parse_args(argv)
  try:
    if args.command == "cloze":
      print(cloze.write_task(args.data, args.out, args.n, args.seed, args.name))
      return 0
    meta = prepare(args.inputs, args.out, load_tokenizer(args.tokenizer))
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.out}: {meta['num_documents']} documents, {meta['num_tokens']} tokens, {meta['num_shards']} shard(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
