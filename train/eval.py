"""Held-out loss, perplexity and bits per byte of a model.

  python -m train.eval (RUN_DIR | HF_DIR) --data SPEC [--tokenizer byte|PATH] [--seq-len N]
      [--batch-size B] [--max-batches M] [--dtype D]

RUN_DIR: a training run directory (its newest checkpoint, and by default its tokenizer); HF_DIR: a
folder with config.json + safetensors. Reads the eval split of SPEC (train.core.evaluation.EvalSet: documents packed as in training,
[BOS] + text + [EOS], attention within each document) and prints one JSON line:

  loss            mean next-token cross-entropy over the real targets (nats per token; EOS targets count)
  perplexity      exp(loss)
  bits_per_byte   total nats / ln 2 / total UTF-8 bytes of the evaluated targets
  tokens, bytes, batches

Bytes: with the byte tokenizer, the number of targets that are bytes (ids < 256: every target but
EOS); with an HF tokenizer, for each document chunk of a row, len(decode(its targets without
BOS/EOS/PAD).encode('utf-8')) (a chunk boundary inside a multi-byte character may miscount it by a
few bytes). So for the byte tokenizer, bits_per_byte = loss / ln 2 x tokens / bytes, and exactly
loss / ln 2 when no EOS is among the targets.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from parallel.errors import ConfigError, DataError, InputError
from train.core import jsonl
from train.core.checkpoint import load_any, tokenizer_of
from train.core.data import ByteTokenizer, load_tokenizer
from train.core.evaluation import EvalSet
from train.core.step import make_eval_step
from train.generate import add_model_args


def target_bytes(batch: dict, tokenizer) -> int:
  """UTF-8 bytes of the real targets of a batch (see the module docstring)."""
  targets, real = batch["targets"], batch["loss_mask"] > 0
  if isinstance(tokenizer, ByteTokenizer):
    return int((real & (targets < 256)).sum())
  special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
  total = 0
  for row_t, row_s, row_r in zip(targets, batch["segment_ids"], real):
    for seg in np.unique(row_s[row_r]):
      ids = [int(t) for t in row_t[row_r & (row_s == seg)] if int(t) not in special]
      total += len(tokenizer.decode(ids).encode("utf-8"))
  return total


def evaluate(model, data: str, tokenizer, seq_len: int, batch_size: int, max_batches: int | None = None) -> dict:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  evals = EvalSet(data, tokenizer, seq_len=seq_len, batch_size=batch_size,
                  max_seq_len=model.cfg.max_position_embeddings, max_batches=max_batches)
  for batch in evals.batches:
    if int(batch["tokens"].max()) >= model.cfg.vocab_size:
      raise ConfigError(f"token id {int(batch['tokens'].max())} from tokenizer {tokenizer.spec!r} is outside the"
                        f" model's vocab_size {model.cfg.vocab_size}; pass the model's --tokenizer")
  got = evals.run(make_eval_step(graphdef), {"params": params, "rest": rest},
                  lambda b: {k: jnp.asarray(v) for k, v in b.items()})
  if not got["tokens"]:
    raise DataError(f"{data}: the eval split gave no targets")
  nbytes = sum(target_bytes(b, tokenizer) for b in evals.batches)
  loss, total_nats = got["loss"], got["nats"]
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": total_nats / math.log(2) / nbytes if nbytes else float("nan"),
          "tokens": int(got["tokens"]), "bytes": nbytes, "batches": got["batches"]}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n")[0])
  add_model_args(parser)
  parser.add_argument("--data", required=True, help="data spec as in training ('default', files, prepared dir)")
  parser.add_argument("--seq-len", type=int, default=None, help="default: min(512, max_position_embeddings)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-batches", type=int, default=None, help="default: the whole eval split")
  args = parser.parse_args(argv)
  try:
    tokenizer = load_tokenizer(tokenizer_of(args.model, args.tokenizer))
    model = load_any(args.model, args.dtype)
    seq_len = args.seq_len or min(512, model.cfg.max_position_embeddings)
    result = evaluate(model, args.data, tokenizer, seq_len, args.batch_size, args.max_batches)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(jsonl.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
