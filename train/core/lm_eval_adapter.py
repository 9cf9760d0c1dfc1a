"""lm-evaluation-harness tasks run in-process on the JAX model (`lm-eval` on the package index).

`JaxLM(model, tokenizer)` is an `lm_eval.api.model.LM` backed by a moe.model.Transformer, on
whatever mesh the model was built for (its Runtime's Parallelism; a training state works as is):

- Tokens: a text is encoded as [BOS] + tokens (as training documents and train.generate start), like
  lm-eval's `hf` backend with add_bos_token; a (context, continuation) pair is split as lm-eval's
  TemplateLM does (trailing spaces of the context move to the continuation; the continuation is what
  encode(context + continuation) adds to encode(context)).
- loglikelihood: the input is (context + continuation)[-(max_length + 1):][:-1], left-truncated as
  the `hf` backend does; the sum of log p(continuation token) and whether each was the argmax.
  Requests run longest first, right-padded (padding is its own segment 0: no real token attends to
  it) into batches of `batch_size` rows (rounded up to a multiple of the devices the batch splits
  over, sharded over them) and lengths rounded up to a power of two, so few shapes compile.
  On one device, requests that share their prefix (the input up to the token that predicts the first
  continuation token: the choices of a multiple-choice question) run it once instead: the prefixes
  into moe/decode.py's latent KV cache, each request's remaining tokens on a copy of its prefix's
  cache (`share_prefixes`, on by default; the same numbers within float32 rounding, about 2x faster
  on 4-choice questions: docs/perf.md, train/bench_eval.py).
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens, conditioned on BOS:
  the text's tokens are scored, BOS is context only, as the `hf` backend with add_bos_token=False and
  prefix_token_id=BOS (with add_bos_token=True it puts BOS in the token list and scores it too, after a
  second BOS: a term more, and every token conditioned on two BOS).
- generate_until: the latent-cache decoder (moe/decode.py); the context left-truncated to
  max_length - max_gen_toks; greedy unless do_sample (then temperature / top_p); a row stops at EOS
  or when its text holds a stop string (cut before it).

`run_tasks` evaluates tasks and adds, per task, the continuous metrics that rank small models
better than accuracy (DataDecide, arXiv 2504.11393): for choice tasks the correct answer's
log-probability per token and per UTF-8 byte (each averaged over documents), for rolling
tasks the total log-probability per token and per byte.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import decode
from moe.decode import Generator
from moe.model import Transformer
from parallel import sharding as sharding_lib
from parallel.common.errors import ConfigError
from train.core import jsonl

try:
  from lm_eval.api.model import TemplateLM
except ImportError:  # the optional `eval` extra; JaxLM() says how to install it
  TemplateLM = object


def require_lm_eval() -> None:
  if TemplateLM is object:
    raise ConfigError("lm-evaluation-harness is not installed: pip install -e '.[eval]'")


def batch_rows(par) -> int:
  """How many ways a batch's rows split on `par`'s mesh (1 without one)."""
  if par is None:
    return 1
  axes = dict(par.rules).get("batch", ())
  return math.prod(par.mesh.shape.get(a, 1) for a in axes)


def bucket(n: int, cap: int) -> int:
  """n rounded up to a power of two (at least 16), at most `cap`."""
  return min(cap, max(16, 1 << (n - 1).bit_length()))


def fine_bucket(n: int, cap: int) -> int:
  """n rounded up to a multiple of an eighth of the next power of two (at least 8): four lengths per
  octave (65..128 -> 80, 96, 112, 128), at most 25% padding; at most `cap`."""
  step = max(8, (1 << max(n - 1, 0).bit_length()) // 8)
  return min(cap, -(-max(n, 1) // step) * step)


SCORE_BYTES = 1 << 30  # the shared-prefix path's largest attention-score array (absorbed MLA: [B, H, T, L] f32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, tokens_PxT, lengths_P, max_len):
  """The shared prefixes of one chunk into a latent cache of `max_len` slots: (log-softmax at each
  row's last token [P, V], the cache)."""
  model = nnx.merge(graphdef, state)
  cache = decode.init_cache(model, tokens_PxT.shape[0], max_len)
  logits, cache = decode.extend(model, cache, tokens_PxT, lengths_P, last_only=True)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache


@functools.partial(jax.jit, static_argnums=0)
def _continue(graphdef, state, last_logp_PxV, cache, rows_B, first_B, tokens_BxT, n_new_B, targets_BxT):
  """B requests, each continuing prefix `rows[b]` of a chunk's cache: (log p(first continuation token)
  [B], its greedy flag [B], log p(targets) [B, T], greedy flags [B, T]) where the T tokens (the rest of
  the continuation but its last, right-padded to T; n_new real) are run on a copy of the prefix's cache."""
  model = nnx.merge(graphdef, state)
  last = last_logp_PxV[rows_B]
  first = (jnp.take_along_axis(last, first_B[:, None], axis=-1)[:, 0], jnp.argmax(last, axis=-1) == first_B)
  if tokens_BxT.shape[1] == 0:  # one-token continuations only
    return first + (jnp.zeros((len(rows_B), 0), jnp.float32), jnp.zeros((len(rows_B), 0), bool))
  rows = decode.KVCache(tuple(decode.LatentCache(c.c_kv[:, rows_B], c.k_pe[:, rows_B]) for c in cache.stacks),
                        cache.lengths[rows_B])
  logits, _ = decode.extend(model, rows, tokens_BxT, n_new_B)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return first + (jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0],
                  jnp.argmax(logits, axis=-1) == targets_BxT)


@functools.partial(jax.jit, static_argnums=0)
def score_batch(graphdef, state, tokens_BxS, segment_ids_BxS, targets_BxS):
  """(log p(target) [B, S], target == argmax [B, S]) of one right-padded batch, replicated (every
  process reads them whole)."""
  model = nnx.merge(graphdef, state)
  logits = model(tokens_BxS, segment_ids_BxS).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  out = (jnp.take_along_axis(logp, targets_BxS[..., None], axis=-1)[..., 0], jnp.argmax(logits, axis=-1) == targets_BxS)
  par = model.rt.par
  return out if par is None else jax.lax.with_sharding_constraint(out, NamedSharding(par.mesh, P()))


class JaxLM(TemplateLM):
  """An lm-eval LM on a moe.model.Transformer (see the module docstring)."""

  def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
               max_gen_toks: int = 256, share_prefixes: bool = True):
    require_lm_eval()
    super().__init__()
    self.tokenizer, self.cfg, self.par = tokenizer, model.cfg, model.rt.par
    self.max_length = max_length or model.cfg.max_position_embeddings
    self.max_gen_toks = max_gen_toks
    self.share_prefixes = share_prefixes
    self._widths: dict[int, set[int]] = {}  # the shared-prefix path's compiled prefix widths, per continuation length
    rows = batch_rows(self.par)
    self.batch_size = -(-batch_size // rows) * rows
    self._generator = None
    self.load(model)
    self.continuation_tokens: dict[tuple[str, str], int] = {}  # for the per-token metrics

  def load(self, model) -> None:
    """Evaluate `model` (the same architecture, e.g. the training state of a later step) from now on."""
    self.graphdef, self.state = nnx.split(model)
    if self._generator is not None:
      self._generator.state = self.state

  # ---------------------------------------------------------------- tokens
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer.bos_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = list(self.tokenizer.encode(string))
    return ids if add_special_tokens is False else [self.tokenizer.bos_id] + ids

  def tok_decode(self, ids) -> str:
    special = {self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id}
    return self.tokenizer.decode([int(t) for t in ids if int(t) not in special])

  def _check_ids(self, ids) -> None:
    top = max(ids, default=0)
    if top >= self.cfg.vocab_size:
      raise ConfigError(f"token id {top} from tokenizer {self.tokenizer.spec!r} is outside the model's vocab_size"
                        f" {self.cfg.vocab_size}; pass the model's --tokenizer")

  # ---------------------------------------------------------------- scoring
  def _place(self, arrays: dict) -> dict:
    """Host batch (the same on every process) -> arrays sharded over the batch axes."""
    if self.par is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    out = {}
    for k, v in arrays.items():
      sharding = sharding_lib.batch_sharding(self.par.mesh, v.shape, self.par.rules)
      out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out

  def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation), all greedy) per (context ids, continuation ids), left-truncated.
    Requests whose input up to their first scored token (the prefix) another request shares run
    through the shared-prefix path on one device (`_score_shared`), the others padded (`_score_padded`)."""
    rows = []
    for ctx, cont in pairs:
      whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
      self._check_ids(whole)
      rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    groups: dict[tuple, list[int]] = {}
    if self.share_prefixes and self.par is None:
      for i, (inp, _, n) in enumerate(rows):
        if n > 0:
          groups.setdefault(tuple(inp[:len(inp) - n + 1]), []).append(i)
    shared = {p: idx for p, idx in groups.items() if len(idx) > 1}
    done = self._score_shared(rows, shared, out)
    self._score_padded(rows, [i for i in range(len(rows)) if i not in done], out)
    return out

  def _score_padded(self, rows, which: list[int], out: list) -> None:
    """Each request its own right-padded row, longest first, `batch_size` rows and a power-of-two length
    per batch (the training forward pass, on the mesh if any)."""
    order = sorted(which, key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = bucket(max(len(rows[i][0]) for i in chunk), self.max_length)
      arrays = {k: np.zeros((self.batch_size, length), np.int32) for k in ("tokens", "segments", "targets")}
      for r, i in enumerate(chunk):
        inp, tgt, _ = rows[i]
        arrays["tokens"][r, :len(inp)], arrays["targets"][r, :len(inp)] = inp, tgt
        arrays["segments"][r, :len(inp)] = 1
      a = self._place(arrays)
      logp, greedy = jax.device_get(score_batch(self.graphdef, self.state, a["tokens"], a["segments"], a["targets"]))
      for r, i in enumerate(chunk):
        n_inp, n_cont = len(rows[i][0]), rows[i][2]
        part = slice(n_inp - n_cont, n_inp)
        out[i] = (float(logp[r, part].astype(np.float64).sum()), bool(greedy[r, part].all()))

  def _score_shared(self, rows, groups: dict[tuple, list[int]], out: list) -> set[int]:
    """Requests that share their prefix (the input up to and including the token that predicts the first
    continuation token: e.g. the choices of one multiple-choice question) run it once. `batch_size`
    prefixes at a time (longest first; padded to a width compiled before if that pads the longest by at
    most 25%, else to its fine_bucket: few compiles, little padding) go into moe/decode.py's latent KV
    cache, and each request runs only the rest of its continuation (the chunk's longest rounded up to a
    power of two, at least 8) on a copy of its prefix's cache, `batch_size` rows per call. A chunk whose
    attention scores would pass SCORE_BYTES is left to the padded path. Returns the requests scored."""
    prefixes = sorted(groups, key=lambda p: -len(p))
    done: set[int] = set()
    for start in range(0, len(prefixes), self.batch_size):
      chunk = prefixes[start:start + self.batch_size]
      need = len(chunk[0])
      rest = max(rows[i][2] for p in chunk for i in groups[p]) - 1
      t = min(self.max_length, max(8, 1 << (rest - 1).bit_length())) if rest else 0
      compiled = [w for w in self._widths.get(t, ()) if need <= w <= need * 5 // 4]
      width = min(compiled) if compiled else fine_bucket(need, self.max_length)
      if self.batch_size * self.cfg.num_attention_heads * width * (width + t) * 4 > SCORE_BYTES:
        continue
      self._widths.setdefault(t, set()).add(width)
      reqs = sorted(((r, i) for r, p in enumerate(chunk) for i in groups[p]), key=lambda ri: -rows[ri[1]][2])
      tokens = np.zeros((self.batch_size, width), np.int32)
      lengths = np.ones(self.batch_size, np.int32)
      for r, p in enumerate(chunk):
        tokens[r, :len(p)], lengths[r] = p, len(p)
      last_logp, cache = _prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(lengths), width + t)
      pending = []
      for s0 in range(0, len(reqs), self.batch_size):
        batch = reqs[s0:s0 + self.batch_size]
        arrays = {k: np.zeros((self.batch_size, t), np.int32) for k in ("tokens", "targets")}
        rows_b, first, n_new = (np.zeros(self.batch_size, np.int32) for _ in range(3))
        for b, (r, i) in enumerate(batch):
          inp, tgt, n = rows[i]
          p = len(inp) - n  # the first scored position: the prefix's last token
          rows_b[b], first[b], n_new[b] = r, tgt[p], n - 1
          arrays["tokens"][b, :n - 1], arrays["targets"][b, :n - 1] = inp[p + 1:], tgt[p + 1:]
        pending.append((batch, _continue(self.graphdef, self.state, last_logp, cache, jnp.asarray(rows_b),
                                         jnp.asarray(first), jnp.asarray(arrays["tokens"]), jnp.asarray(n_new),
                                         jnp.asarray(arrays["targets"]))))
      for batch, got in pending:  # fetched after the chunk's calls are all dispatched
        first_lp, first_greedy, logp, greedy = jax.device_get(got)
        for b, (_, i) in enumerate(batch):
          m = rows[i][2] - 1
          out[i] = (float(first_lp[b].astype(np.float64) + logp[b, :m].astype(np.float64).sum()),
                    bool(first_greedy[b] and greedy[b, :m].all()))
          done.add(i)
    return done

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    got = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, cont), answer in zip(requests, got):
      if key is not None:
        self.continuation_tokens[tuple(key)] = len(cont)
        self.cache_hook.add_partial("loglikelihood", tuple(key), answer)
    return got

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    from lm_eval import utils
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      ids = self.tok_encode(string, add_special_tokens=False)
      self.continuation_tokens[("", string)] = len(ids)
      for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
          token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append(w)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self.score_tokens(windows)):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ---------------------------------------------------------------- generation
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = [""] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    for idx in groups.values():
      kwargs = dict(requests[idx[0]].args[1])
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      do_sample = bool(kwargs.pop("do_sample", False))
      temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
      top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
      idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
      for start in range(0, len(idx), self.batch_size):
        chunk = idx[start:start + self.batch_size]
        texts = self.generate([requests[i].args[0] for i in chunk], until, max_new, temperature, top_p, seed=start)
        for i, text in zip(chunk, texts):
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _decoding_model(self):
    """The model for moe/decode.py, which has no expert-parallel exchange or pipeline: on a mesh, the
    same arrays under a Runtime without the mesh (XLA partitions the MoE layers as they are sharded)."""
    model = nnx.merge(self.graphdef, self.state)
    if self.par is None:
      return model
    if self.par.stages > 1:
      raise ConfigError("generate_until does not run on a pipelined mesh (mesh.stage > 1): evaluate generation"
                        " tasks with mesh.stage=1")
    rt = dataclasses.replace(model.rt, par=None)
    return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(self.cfg, rt, rngs=nnx.Rngs(0)))), self.state)

  def generate(self, contexts: list[str], until: list[str], max_new: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Completions of `contexts` (at most batch_size), each cut before its first stop string."""
    if max_new < 1:
      return [""] * len(contexts)
    if self._generator is None:
      self._generator = Generator(self._decoding_model())
    gen = self._generator
    keep = max(1, self.max_length - max_new)
    prompts = [self.tok_encode(c)[-keep:] for c in contexts]
    for p in prompts:
      self._check_ids(p)
    prompts += [prompts[0]] * (self.batch_size - len(prompts))  # fixed shapes: pad rows repeat row 0
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = bucket(int(lengths.max()), keep)
    tokens = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
      tokens[r, :len(p)] = p
    cache = gen.init_cache(len(prompts), width + max_new)
    logits, cache = gen.extend(gen.state, cache, jnp.asarray(tokens), jnp.asarray(lengths), True)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    nxt = gen.sample(logits, sub, temperature, top_p)
    new = [[] for _ in contexts]
    done = np.zeros(len(contexts), bool)
    for step in range(max_new):
      ids = np.asarray(nxt)
      for r in np.flatnonzero(~done):
        new[r].append(int(ids[r]))
        text = self.tok_decode(new[r])
        if int(ids[r]) == self.tokenizer.eos_id or any(s in text for s in until):
          done[r] = True
      if done.all() or step + 1 == max_new:
        break
      key, sub = jax.random.split(key)
      nxt, _, cache = gen.step(gen.state, cache, nxt, sub, temperature, top_p)
    texts = [self.tok_decode(n) for n in new]
    return [min((t.split(s)[0] for s in until if s), key=len, default=t) for t in texts]


# ------------------------------------------------------------------- tasks
def _correct_index(sample: dict) -> int | None:
  target, args = sample["target"], sample["arguments"]
  if isinstance(target, (int, np.integer)) and 0 <= int(target) < len(args):
    return int(target)
  if isinstance(target, str):
    conts = [a[1].strip() for a in args]
    return conts.index(target.strip()) if target.strip() in conts else None
  return None


def continuous_metrics(samples: list[dict], output_type: str, lm: JaxLM) -> dict:
  """Choice tasks (multiple_choice, loglikelihood): the correct answer's log-probability per token and
  per UTF-8 byte, each averaged over documents. Rolling tasks: the total log-probability per token and
  per byte. Other tasks: {}."""
  if output_type in ("multiple_choice", "loglikelihood"):
    per_token, per_byte = [], []
    for s in samples:
      i = _correct_index(s) if output_type == "multiple_choice" else 0
      if i is None:
        continue
      ctx, cont = s["arguments"][i]
      ll, n = float(s["filtered_resps"][i][0]), lm.continuation_tokens.get((ctx, cont))
      if n:
        per_token.append(ll / n)
      if cont:
        per_byte.append(ll / len(cont.encode("utf-8")))
    return {"correct_logprob_per_token": float(np.mean(per_token)) if per_token else None,
            "correct_logprob_per_byte": float(np.mean(per_byte)) if per_byte else None}
  if output_type == "loglikelihood_rolling":
    total = sum(float(s["filtered_resps"][0]) for s in samples)
    texts = [s["arguments"][0][0] for s in samples]
    tokens = sum(lm.continuation_tokens.get(("", t), 0) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"logprob_per_token": total / tokens if tokens else None,
            "logprob_per_byte": total / nbytes if nbytes else None}
  return {}


def task_manager(tasks: list[str], include_path: str | None = None):
  """lm-eval's TaskManager that knows `tasks`: the local folder alone when it defines them all
  (indexing lm-eval's own ~15k task files takes half a minute), else lm-eval's tasks too."""
  require_lm_eval()
  from lm_eval.tasks import TaskManager

  if include_path is not None:
    if not Path(include_path).is_dir():
      raise ConfigError(f"include path {include_path}: no such directory (a folder of task YAML files)")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
      return local
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm-eval ls tasks`, or give the folder"
                      " of a local task's YAML as the include path")
  return manager


def simple_evaluate(lm, tasks: list[str], *, manager, num_fewshot: int | None = None,
                    limit: int | float | None = None, seed: int = 0) -> dict:
  """lm-eval's simple_evaluate on any lm-eval LM (JaxLM, or lm-eval's `hf` backend in train.bench_eval)
  with the arguments run_tasks uses: samples logged, every seed `seed`, 100 bootstrap iterations."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  from lm_eval import evaluator

  return evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=True, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                   bootstrap_iters=100, verbosity="WARNING")


def run_tasks(lm: JaxLM, tasks: list[str], *, num_fewshot: int | None = None, limit: int | float | None = None,
              include_path: str | None = None, manager=None, seed: int = 0) -> tuple[dict, str]:
  """({task: {metric: value}}, lm-eval's table) for `tasks` on `lm` (`manager`: a task_manager to
  reuse). Metric names drop lm-eval's ',none' filter suffix (other filters keep theirs as
  'metric/filter'); non-finite values become None."""
  from lm_eval.utils import make_table

  manager = manager or task_manager(tasks, include_path)
  lm.continuation_tokens.clear()
  results = simple_evaluate(lm, tasks, num_fewshot=num_fewshot, limit=limit, manager=manager, seed=seed)
  table = make_table(results)
  out = {}
  for task, metrics in results["results"].items():
    row = {}
    for key, value in metrics.items():
      if "," not in key or not isinstance(value, (int, float)):
        continue
      name, filt = key.split(",", 1)
      row[name if filt == "none" else f"{name}/{filt}"] = float(value)
    if task in results.get("samples", {}):
      output_type = results.get("configs", {}).get(task, {}).get("output_type", "")
      row.update(continuous_metrics(results["samples"][task], output_type, lm))
    row["samples"] = len(results.get("samples", {}).get(task, []))
    out[task] = jsonl.finite(row)
  return out, table


class TrainingTasks:
  """lm-eval tasks run on the training state every `eval_every` steps (train/core/loop.py), on the
  training mesh: contexts of at most `seq_len` tokens (what the model is trained on), batches of a
  micro-batch's rows. Built before the first step, so that an unknown task fails then."""

  def __init__(self, cfg, tokenizer):
    self.cfg, self.tokenizer, self.lm, self.graphdef = cfg, tokenizer, None, None
    self.manager = task_manager(list(cfg.eval_tasks), cfg.eval_tasks_path)

  def run(self, state: dict, rt) -> dict:
    """{"<task>/<metric>": value} of the model in `state` ({"params", "rest", ...})."""
    if self.graphdef is None:  # the training state's split (train/core/step.py: split_model)
      abstract = nnx.eval_shape(lambda: Transformer(self.cfg.model, rt, rngs=nnx.Rngs(0)))
      self.graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    model = nnx.merge(self.graphdef, state["params"], state["rest"])
    if self.lm is None:
      self.lm = JaxLM(model, self.tokenizer, batch_size=self.cfg.batch_size // self.cfg.grad_accum,
                      max_length=self.cfg.seq_len)
    else:
      self.lm.load(model)
    results, _ = run_tasks(self.lm, list(self.cfg.eval_tasks), limit=self.cfg.eval_tasks_limit,
                           manager=self.manager, seed=self.cfg.seed)
    return {f"{task}/{name}": v for task, row in results.items() for name, v in row.items() if name != "samples"}
