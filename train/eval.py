"""Held-out loss, perplexity and bits per byte of a model; or lm-evaluation-harness tasks.

  python -m train.eval (RUN_DIR | HF_DIR) --data SPEC [--tokenizer byte|PATH] [--seq-len N]
      [--batch-size B] [--max-batches M] [--dtype D] [--by-position W]
  python -m train.eval (RUN_DIR | HF_DIR) --tasks T1,T2 [--num-fewshot K] [--limit N]
      [--include-path TASK_DIR] [--batch-size B] [--max-length L] [mesh.fsdp=8 ...]
  python -m train.eval (RUN_DIR | HF_DIR) --task passkey --seq-len L [--samples N] [--batch-size B]

Passkey mode (--task passkey; train/core/passkey.py): synthetic passkey retrieval at L tokens, a
random key hidden at depths 0, 0.25, ..., 1 of the filler; one JSON line with the accuracy (the key
is the greedy continuation) and the key's mean log-probability per token, over all and by depth.

Task mode (--tasks; the `eval` extra installs lm-eval) runs lm-eval's tasks in this process on the
JAX model (train/core/lm_eval_adapter.py), on one device, or with mesh.* keys on the mesh they
describe (as in training; batches sharded over the data axes). It prints lm-eval's table, then one
JSON line per task: {"task", lm-eval's metrics (acc, acc_norm, ..., their _stderr), and the
continuous ones: correct_logprob_per_token / correct_logprob_per_byte (choice tasks),
logprob_per_token / logprob_per_byte (rolling tasks), "samples"}.

Loss mode (--data):

RUN_DIR: a training run directory (its newest checkpoint, and by default its tokenizer); HF_DIR: a
folder with config.json + safetensors. Reads the eval split of SPEC (train.core.heldout.EvalSet: documents packed as in training,
[BOS] + text + [EOS], attention within each document) and prints one JSON line:

  loss            mean next-token cross-entropy over the real targets (nats per token; EOS targets count)
  perplexity      exp(loss)
  bits_per_byte   total nats / ln 2 / total UTF-8 bytes of the evaluated targets
  tokens, bytes, batches
  by_position     (--by-position W) the loss of the targets by their predicting token's position in
                  its document, in buckets of W: [{from, to, loss, tokens}] (long-context checks)

Bytes: with the byte tokenizer, the number of targets that are bytes (ids < 256: every target but
EOS); with an HF tokenizer, for each document chunk of a row, len(decode(its targets without
BOS/EOS/PAD).encode('utf-8')) (a chunk boundary inside a multi-byte character may miscount it by a
few bytes). So for the byte tokenizer, bits_per_byte = loss / ln 2 x tokens / bytes, and exactly
loss / ln 2 when no EOS is among the targets.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import hf
from parallel.common.errors import ConfigError, DataError, InputError
from parallel.mesh import MeshConfig, Parallelism
from train.core import jsonl, loss as loss_lib, passkey
from train.core.checkpoint import step_dir
from train.core.model_io import load_any, load_model, tokenizer_of
from train.core.train_config import apply_override
from train.core.input_pipeline import ByteTokenizer, load_tokenizer
from train.core.heldout import EvalSet
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


def evaluate(model, data: str, tokenizer, seq_len: int, batch_size: int, max_batches: int | None = None,
             by_position: int | None = None) -> dict:
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
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
         "bits_per_byte": total_nats / math.log(2) / nbytes if nbytes else float("nan"),
         "tokens": int(got["tokens"]), "bytes": nbytes, "batches": got["batches"]}
  if by_position:
    out["by_position"] = loss_by_position(graphdef, params, rest, evals.batches, by_position)
  return out


def loss_by_position(graphdef, params, rest, batches, width: int) -> list[dict]:
  """The loss of the targets by the position of the token that predicts them in its document (0: the
  first), in buckets of `width` positions: [{"from", "to", "loss", "tokens"}], empty buckets left out."""

  @jax.jit
  def nll(batch):
    model = nnx.merge(graphdef, params, rest)
    return loss_lib.token_nll(model(batch["tokens"], batch["segment_ids"], batch["positions"]), batch["targets"])

  nats, count = collections.Counter(), collections.Counter()
  for batch in batches:
    per_token = np.asarray(nll({k: jnp.asarray(v) for k, v in batch.items()}))
    real = batch["loss_mask"] > 0
    bucket = batch["positions"] // width
    np.add.at(nats_arr := np.zeros(bucket.max() + 1), bucket[real], per_token[real])
    for b, n in zip(*np.unique(bucket[real], return_counts=True)):
      nats[int(b)] += float(nats_arr[b])
      count[int(b)] += int(n)
  return [{"from": b * width, "to": (b + 1) * width, "loss": nats[b] / count[b], "tokens": count[b]}
          for b in sorted(count)]


def mesh_of(overrides: Sequence[str]) -> Parallelism | None:
  """The Parallelism the `mesh.*=value` overrides describe (None without any: one device)."""
  if not overrides:
    return None
  raw: dict = {}
  for item in overrides:
    if not item.startswith("mesh."):
      raise ConfigError(f"{item!r}: only mesh.* keys are accepted here (e.g. mesh.fsdp=8)")
    apply_override(raw, item)
  try:
    return Parallelism.from_config(MeshConfig(**raw["mesh"]))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"mesh: {e}") from None


def load_on(path: str, dtype: str | None, par: Parallelism | None):
  """The model of an HF folder or run directory, on one device or sharded over `par`'s mesh."""
  if par is None:
    return load_any(path, dtype)
  if (Path(path) / "config.json").is_file():
    return hf.from_hf(path, dtype=dtype, par=par)
  return load_model(step_dir(path), dtype or "float32", par)


def run_task_mode(args, overrides: Sequence[str]) -> int:
  from train.core import lm_eval_adapter

  lm_eval_adapter.require_lm_eval()
  tasks = [t for t in args.tasks.split(",") if t]
  if args.limit is not None and args.limit <= 0:
    raise ConfigError(f"--limit {args.limit}: must be > 0")
  tokenizer = load_tokenizer(tokenizer_of(args.model, args.tokenizer))
  model = load_on(args.model, args.dtype, mesh_of(overrides))
  lm = lm_eval_adapter.JaxLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  results, table = lm_eval_adapter.run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit,
                                             include_path=args.include_path)
  print(table, flush=True)
  for task, metrics in results.items():
    print(jsonl.dumps({"task": task, **metrics}), flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n")[0])
  add_model_args(parser)
  parser.add_argument("--data", default=None, help="data spec as in training ('default', files, prepared dir)")
  parser.add_argument("--seq-len", type=int, default=None, help="default: min(512, max_position_embeddings)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-batches", type=int, default=None, help="default: the whole eval split")
  parser.add_argument("--by-position", type=int, default=None, metavar="W",
                      help="also the loss by position in the document, in buckets of W positions")
  parser.add_argument("--tasks", default=None, help="lm-eval task names, comma-separated (task mode)")
  parser.add_argument("--num-fewshot", type=int, default=None, help="task mode: few-shot examples (default: the task's)")
  parser.add_argument("--limit", type=float, default=None, help="task mode: documents per task (< 1: a fraction)")
  parser.add_argument("--include-path", default=None, help="task mode: a folder of local task YAML files")
  parser.add_argument("--max-length", type=int, default=None,
                      help="task mode: context window in tokens (default: max_position_embeddings)")
  parser.add_argument("--task", choices=["passkey"], default=None, help="a built-in task: passkey retrieval at --seq-len")
  parser.add_argument("--samples", type=int, default=10, help="passkey: samples per depth")
  parser.add_argument("overrides", nargs="*", metavar="mesh.KEY=VALUE", help="task mode: the mesh, as in training")
  args = parser.parse_intermixed_args(argv)  # mesh keys before or after the options
  try:
    if sum(x is not None for x in (args.data, args.tasks, args.task)) != 1:
      raise ConfigError("give --data SPEC (held-out loss), --tasks T1,T2 (lm-eval tasks) or --task passkey, one of them")
    if args.tasks is not None:
      return run_task_mode(args, args.overrides)
    if args.overrides:
      raise ConfigError(f"{args.overrides[0]!r}: mesh keys are for task mode (--tasks)")
    tokenizer = load_tokenizer(tokenizer_of(args.model, args.tokenizer))
    model = load_any(args.model, args.dtype)
    seq_len = args.seq_len or min(512, model.cfg.max_position_embeddings)
    if args.task == "passkey":
      if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be at least 1")
      result = passkey.evaluate(model, tokenizer, seq_len, args.samples, batch_size=args.batch_size)
    else:
      if args.by_position is not None and args.by_position < 1:
        raise ConfigError(f"--by-position {args.by_position}: must be at least 1")
      result = evaluate(model, args.data, tokenizer, seq_len, args.batch_size, args.max_batches, args.by_position)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(jsonl.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
