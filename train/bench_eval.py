"""In-process lm-eval against lm-eval's `hf` backend, side by side on one CPU:
`python -m train.bench_eval [CONFIG | RUN_DIR | HF_DIR] [--n 1000] [--repeats 3] [--batch-size B] [--out JSON]`.

The model: a run directory's newest checkpoint exported by train.export, an HF folder as it is, or
by default a freshly initialised configs/tiny.yaml model (a CONFIG's model, initialised as training
initialises it, from its `seed`) written by moe.hf.to_hf (what train.export writes with), into a
temporary folder. The task: `--n`
questions of the held-out cloze task of the built-in `default` data (train/core/cloze.py, what
`python -m train.data cloze default --n N` writes; four choices each, so 4 N loglikelihood requests).

Both sides read the same HF folder in float32 and run the same call, lm-eval's simple_evaluate with
run_tasks's arguments (train/core/lm_eval_adapter.simple_evaluate: samples logged, 100 bootstrap
iterations), with the same batch size and maximum length: (a) `ours`, JaxLM (what `python -m train.eval
HF_DIR --tasks ...` runs) on the model read by moe.hf.from_hf; (b) `hf`, lm-eval's HFLM on the model
read by transformers (AutoModelForCausalLM, float32, CPU, its default attention), with the tokenizer
as an HF tokenizer (the byte tokenizer written out as one) that adds BOS as ours does, and
torch.set_num_threads(the CPUs this process may run on: what XLA's CPU client uses).

One-time costs are timed apart: `load_s` (the model read; for ours also JaxLM), the task's dataset
built into the `datasets` cache before any timed run, and `first_s` (the first evaluation of each:
for ours it includes the jit compile of each batch shape). Then `--repeats` warm evaluations each,
interleaved (ours, hf, ours, hf, ...), so that other load on the machine falls on both alike;
`warm_s` lists them, `median_s` is their median, `cpu_s` the process CPU seconds of each (less
sensitive to other load than wall time). requests_per_s and questions_per_s are from the median.
`speedup` = hf median / ours median (> 1: ours is faster). `acc` is each side's accuracy; the
per-request log-likelihoods and greedy flags of the two are compared (`max_abs_diff`,
`requests_over_1e-4`, `greedy_same`, `argmax_differs`: questions whose chosen answer differs). A
request can differ by far more than float32 rounding where a token's router scores tie (an untrained
model's sigmoid scores can be equal in float32) and the two backends pick different experts. Prints a
summary and one JSON line (train.core.jsonl), also written to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from parallel.common.errors import ConfigError
from train.bench import one_line_errors
from train.core import jsonl

TASK = "heldout_cloze"


def cpus() -> int:
  """The CPUs this process may run on (XLA's CPU client sizes its thread pool by them)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_model(source: str, out: Path) -> tuple[Path, str]:
  """(HF folder, tokenizer spec) of `source`: an HF folder as it is, a run directory's newest checkpoint
  exported (train.export), or a config's freshly initialised model written by moe.hf.to_hf."""
  from flax import nnx
  import jax

  from moe import hf
  from moe.model import Transformer
  from moe.runtime import Runtime
  from train import export
  from train.core.model_io import tokenizer_of
  from train.core.train_config import load_train_config

  path = Path(source)
  if path.is_dir():
    if (path / "config.json").is_file():
      return path, "byte"
    export.export(path, out / "hf")
    return out / "hf", tokenizer_of(path)
  if not path.is_file():
    raise ConfigError(f"{source}: no such file or directory; give a config YAML, a run directory or an HF folder")
  cfg = load_train_config(path)
  rt = Runtime.resolve(cfg.impl, dtype="float32", param_dtype="float32", devices=jax.local_devices()[:1],
                       announce=False)
  make = lambda: Transformer(cfg.model, rt, rngs=nnx.Rngs(cfg.seed))
  state = jax.jit(lambda: nnx.state(make()))()  # the training init's weights (train/core/loop.py), one compile
  hf.to_hf(nnx.merge(nnx.graphdef(nnx.eval_shape(make)), state), out / "hf")
  return out / "hf", cfg.tokenizer


def hf_tokenizer(tokenizer):
  """Our tokenizer (train.core.input_pipeline) as an HF PreTrainedTokenizerFast that encodes text to the
  same ids and, with add_special_tokens, puts BOS first as JaxLM does. The byte tokenizer: byte b is id
  b (GPT-2's byte-to-character map, no merges), BOS/EOS/PAD their ids."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  if tokenizer.spec == "byte":
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    names = {tokenizer.bos_id: "<bos>", tokenizer.eos_id: "<eos>", tokenizer.pad_id: "<pad>"}
    tok = Tokenizer(models.BPE(vocab={chr(c): b for b, c in zip(bs, cs)} | {v: k for k, v in names.items()},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(names.values()))
  else:
    tok = Tokenizer.from_str(tokenizer._tok.to_str())  # pylint: disable=protected-access
    names = {i: tok.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)}
  bos = names[tokenizer.bos_id]
  tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_id)])
  out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=names[tokenizer.eos_id],
                                pad_token=names[tokenizer.pad_id])
  probe = "The cat é 12"
  if out(probe)["input_ids"] != [tokenizer.bos_id, *tokenizer.encode(probe)]:
    raise ConfigError(f"tokenizer {tokenizer.spec!r}: its HF form does not encode as ours does")
  return out


def per_request(results: dict) -> list[list[tuple[float, bool]]]:
  """[(log-likelihood, greedy) per choice] per question, in document order, from simple_evaluate's samples."""
  samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
  return [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in samples]


def timed(fn) -> tuple[object, float, float]:
  """(fn(), wall seconds, this process's CPU seconds)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - wall, time.process_time() - cpu


def run(source: str = "configs/tiny.yaml", n: int = 1000, repeats: int = 3, batch_size: int = 16,
        workdir: str | Path | None = None, share_prefixes: bool = True) -> dict:
  """The benchmark (module docstring): the row it prints, and `per_request`: {side: [[(log-likelihood,
  greedy) per choice] per question]}."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if n < 1 or repeats < 1 or batch_size < 1:
    raise ConfigError(f"--n {n}, --repeats {repeats}, --batch-size {batch_size}: each must be >= 1")
  from train.core import cloze, lm_eval_adapter
  from train.core.input_pipeline import load_tokenizer
  from train.core.model_io import load_any

  lm_eval_adapter.require_lm_eval()
  torch_first = "torch" not in sys.modules  # OpenMP reads OMP_WAIT_POLICY when torch loads it
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
  except ImportError:
    raise ConfigError("the hf side needs torch and transformers: pip install -e '.[bench-eval]'") from None

  with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
    work = Path(workdir) if workdir is not None else Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"source": source, "questions": n, "batch_size": batch_size, "repeats": repeats}
    cloze.write_task("default", work / "tasks", n=n, name=TASK)  # first: too many questions fail before the export
    (hf_dir, spec), row["export_s"], _ = timed(lambda: write_model(source, work))
    tokenizer = load_tokenizer(spec)
    manager = lm_eval_adapter.task_manager([TASK], str(work / "tasks"))

    _, row["task_setup_s"], _ = timed(lambda: manager.load([TASK]))  # builds the task's `datasets` cache

    threads = cpus()
    torch.set_num_threads(threads)
    row["threads"] = {"jax_cpus": threads, "torch": torch.get_num_threads(),
                      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"] if torch_first else "torch loaded before"}

    def load_ours():
      model = load_any(hf_dir, "float32")
      return lm_eval_adapter.JaxLM(model, tokenizer, batch_size=batch_size, share_prefixes=share_prefixes)

    def load_hf():
      model, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32",
                                                                      output_loading_info=True)
      if info["missing_keys"] or info["mismatched_keys"]:
        raise ConfigError(f"{hf_dir}: transformers left weights at random init: {info}")
      lm = HFLM(pretrained=model.eval(), tokenizer=hf_tokenizer(tokenizer), batch_size=batch_size,
                max_length=ours.max_length, add_bos_token=True, prefix_token_id=tokenizer.bos_id, device="cpu",
                dtype="float32")
      return lm, model.config._attn_implementation  # pylint: disable=protected-access

    ours, ours_load, _ = timed(load_ours)
    (theirs, attn), hf_load, _ = timed(load_hf)
    path = "shared prefixes" if share_prefixes else "padded only"
    sides = {"ours": {"backend": f"JaxLM (train/core/lm_eval_adapter.py, {path})", "load_s": ours_load},
             "hf": {"backend": f"lm-eval HFLM, transformers {transformers.__version__}, torch {torch.__version__},"
                               f" attention {attn}", "load_s": hf_load}}
    lms = {"ours": ours, "hf": theirs}
    got = {}
    row["loadavg_start"] = list(os.getloadavg())
    for i in range(repeats + 1):
      for name, lm in lms.items():
        results, wall, cpu = timed(lambda lm=lm: lm_eval_adapter.simple_evaluate(lm, [TASK], manager=manager))
        side = sides[name]
        if i == 0:
          side["first_s"], side["first_cpu_s"] = wall, cpu
          side["acc"] = results["results"][TASK]["acc,none"]
          got[name] = per_request(results)
        else:
          side.setdefault("warm_s", []).append(wall)
          side.setdefault("cpu_s", []).append(cpu)
    row["loadavg_end"] = list(os.getloadavg())

  requests = sum(len(q) for q in got["ours"])
  row["requests"] = requests
  for side in sides.values():
    side["median_s"] = statistics.median(side["warm_s"])
    side["requests_per_s"] = requests / side["median_s"]
    side["questions_per_s"] = n / side["median_s"]
  row.update(sides)
  row["speedup"] = sides["hf"]["median_s"] / sides["ours"]["median_s"]
  pairs = [(a, b) for qa, qb in zip(got["ours"], got["hf"], strict=True) for a, b in zip(qa, qb, strict=True)]
  row["max_abs_diff"] = max(abs(a[0] - b[0]) for a, b in pairs)
  row["requests_over_1e-4"] = sum(abs(a[0] - b[0]) > 1e-4 for a, b in pairs)
  row["greedy_same"] = all(a[1] == b[1] for a, b in pairs)
  pick = lambda q: max(range(len(q)), key=lambda c: q[c][0])
  row["argmax_differs"] = sum(pick(a) != pick(b) for a, b in zip(got["ours"], got["hf"]))
  row["acc_same"] = sides["ours"]["acc"] == sides["hf"]["acc"]
  row["per_request"] = got  # {side: [[(ll, greedy) per choice] per question]}; not printed
  return row


def summary(row: dict) -> str:
  lines = [f"{row['questions']} questions ({row['requests']} requests), batch {row['batch_size']}, "
           f"threads {row['threads']}, load average {row['loadavg_start'][0]:.2f} -> {row['loadavg_end'][0]:.2f}"]
  for name in ("ours", "hf"):
    s = row[name]
    lines.append(f"{name:>4}: load {s['load_s']:.2f} s, first {s['first_s']:.2f} s, warm median {s['median_s']:.2f} s"
                 f" ({', '.join(f'{t:.2f}' for t in s['warm_s'])}), {s['requests_per_s']:.1f} requests/s,"
                 f" {s['questions_per_s']:.1f} questions/s, acc {s['acc']:.4f}  [{s['backend']}]")
  lines.append(f"speedup (hf / ours): {row['speedup']:.2f}x; max |ll diff| {row['max_abs_diff']:.2e} (over 1e-4:"
               f" {row['requests_over_1e-4']} of {row['requests']}), greedy flags"
               f" {'same' if row['greedy_same'] else 'DIFFER'}, questions answered differently {row['argmax_differs']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.bench_eval", description=__doc__.splitlines()[0])
  p.add_argument("source", nargs="?", default="configs/tiny.yaml",
                 help="config YAML (a fresh model), run directory (its newest checkpoint) or HF folder")
  p.add_argument("--n", type=int, default=1000, help="questions of the cloze task (4 requests each)")
  p.add_argument("--repeats", type=int, default=3, help="warm evaluations per side, interleaved")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--padded", action="store_true",
                 help="ours without the shared-prefix path (JaxLM(share_prefixes=False)): every request padded")
  p.add_argument("--out", default=None, help="also write the JSON line to this file")
  args = p.parse_args(argv)

  def bench() -> int:
    row = run(args.source, args.n, args.repeats, args.batch_size, share_prefixes=not args.padded)
    print(summary(row), flush=True)
    line = jsonl.dumps({k: v for k, v in row.items() if k != "per_request"})
    print(line, flush=True)
    if args.out:
      Path(args.out).write_text(line + "\n")
    return 0

  return one_line_errors(bench)


if __name__ == "__main__":
  sys.exit(main())
