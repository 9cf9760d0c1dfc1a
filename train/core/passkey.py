"""Synthetic passkey retrieval (Mohtashami & Jaggi, 2023; the long-context check of LongLoRA and
YaRN): a random number hidden at a chosen depth of `seq_len` tokens of repeated filler text, then
the question; the model must continue with the number.

Each sample is scored in one forward pass, teacher-forced: the log-probability of the key's tokens
after the question, and whether each of them is the model's argmax there (then greedy decoding
writes the key: `retrieved`). Reported per depth (the needle's position as a fraction of the
filler before it) and over all: accuracy, and the key's mean log-probability per token, the
continuous metric that ranks small models where accuracy is all zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parallel.common.errors import ConfigError
from train.core.lm_eval_adapter import score_batch  # (the batch scorer lm-eval's requests use too)

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle(key: int) -> str:
  return f" The pass key is {key}. Remember it. {key} is the pass key."


def sample(tokenizer, seq_len: int, depth: float, key: int) -> tuple[list[int], list[int]]:
  """(prompt ids, key ids): [BOS] intro, as many fillers as fit in `seq_len` tokens with the needle
  after `depth` of them, the question; then " KEY"."""
  encode = lambda s: list(tokenizer.encode(s))
  head, fill, pin, tail, answer = encode(INTRO), encode(FILLER), encode(needle(key)), encode(QUESTION), encode(f" {key}")
  room = seq_len - 1 - len(head) - len(pin) - len(tail) - len(answer)
  if room < len(fill):
    raise ConfigError(f"--seq-len {seq_len}: too short for a passkey sample (at least"
                      f" {seq_len - room + len(fill)} tokens with this tokenizer)")
  n = room // len(fill)
  before = round(depth * n)
  prompt = [tokenizer.bos_id] + head + fill * before + pin + fill * (n - before) + tail
  return prompt, answer


def score(model, rows: list[tuple[list[int], list[int]]], seq_len: int, batch_size: int) -> list[tuple[float, bool]]:
  """(sum of log p(key), every key token the argmax) per (prompt, key), in right-padded batches."""
  graphdef, state = nnx.split(model)
  out = []
  for lo in range(0, len(rows), batch_size):
    chunk = rows[lo:lo + batch_size]
    tokens, targets = np.zeros((batch_size, seq_len), np.int32), np.zeros((batch_size, seq_len), np.int32)
    seg, scored = np.zeros((batch_size, seq_len), np.int32), np.zeros((batch_size, seq_len), bool)
    for r, (prompt, key) in enumerate(chunk):
      whole = prompt + key
      n = len(whole) - 1
      tokens[r, :n], targets[r, :n], seg[r, :n] = whole[:-1], whole[1:], 1
      scored[r, len(prompt) - 1:n] = True
    logp, greedy = jax.device_get(score_batch(graphdef, state, jnp.asarray(tokens), jnp.asarray(seg),
                                              jnp.asarray(targets)))
    for r in range(len(chunk)):
      m = scored[r]
      out.append((float(logp[r][m].sum()), bool(greedy[r][m].all())))
  return out


def evaluate(model, tokenizer, seq_len: int, samples: int = 10, depths=DEPTHS, seed: int = 0,
             batch_size: int = 8) -> dict:
  """Passkey retrieval at `seq_len` tokens: `samples` random 5-digit keys at each depth."""
  if seq_len > model.cfg.max_position_embeddings:
    raise ConfigError(f"--seq-len {seq_len}: over the model's max_position_embeddings"
                      f" {model.cfg.max_position_embeddings}")
  rng = np.random.default_rng(seed)
  rows, where = [], []
  for depth in depths:
    for _ in range(samples):
      rows.append(sample(tokenizer, seq_len, depth, int(rng.integers(10_000, 100_000))))
      where.append(depth)
  scores = score(model, rows, seq_len, batch_size)
  per_token = [lp / len(key) for (lp, _), (_, key) in zip(scores, rows)]

  def summary(idx):
    return {"accuracy": float(np.mean([scores[i][1] for i in idx])),
            "key_logprob_per_token": float(np.mean([per_token[i] for i in idx]))}

  return {"task": "passkey", "seq_len": seq_len, "samples": len(rows), **summary(range(len(rows))),
          "by_depth": {f"{d:g}": summary([i for i, w in enumerate(where) if w == d]) for d in depths}}
