"""Held-out evaluation: the eval split's batches, read and packed once, and the next-token loss of a
model over them. The trainer evaluates every `eval_every` steps with it, `python -m train.eval` once.

With several processes each holds its own share of the eval documents (train.core.input_pipeline) and every
process must run the same number of steps (each step is one collective program): `run(..., steps=N)`
runs exactly N, with empty batches (loss_mask 0) once a process's batches run out.
"""

from __future__ import annotations

import itertools

import numpy as np

from train.core import input_pipeline as data_lib


class EvalSet:
  """This process's batches of the eval split of `data` (at most `max_batches`)."""

  def __init__(self, data: str, tokenizer, *, seq_len: int, batch_size: int, max_seq_len: int | None = None,
               max_batches: int | None = None, process_index: int = 0, process_count: int = 1):
    ds = data_lib.make_dataset(data, seq_len=seq_len, batch_size=batch_size, seed=0, split="eval",
                               tokenizer=tokenizer, max_seq_len=max_seq_len, process_index=process_index,
                               process_count=process_count)
    self.batches = list(itertools.islice(ds, max_batches))
    zeros = np.zeros((batch_size, seq_len), np.int32)
    self.empty = {"tokens": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
                  "loss_mask": zeros.astype(np.float32)}

  def run(self, eval_step, state, place, steps: int | None = None) -> dict:
    """{loss (nats per target token), nats, tokens, batches} of `eval_step(state, place(batch))` ->
    (summed NLL, target count) over the batches; `steps`: run exactly that many (see the module
    docstring)."""
    batches = self.batches if steps is None else self.batches[:steps]
    if steps is not None:
      batches = batches + [self.empty] * (steps - len(batches))
    nats, tokens = 0.0, 0.0
    for batch in batches:
      s, c = eval_step(state, place(batch))
      nats, tokens = nats + float(s), tokens + float(c)
    return {"loss": nats / max(tokens, 1.0), "nats": nats, "tokens": tokens, "batches": len(batches)}
