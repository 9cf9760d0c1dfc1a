"""A multiple-choice cloze task from the held-out split of a text corpus, for lm-evaluation-harness
(train/core/lm_eval_adapter.py): no network, and about the text a small model was trained on, so that
its continuous metric (the correct continuation's log-probability per byte) moves with training.

Each question: a passage of the held-out documents cut at a word boundary (the last `context`
characters before the cut), the true next words (up to `answer` characters, ending at a word end)
and `distractors` continuations cut the same way from other places of the held-out text; the choices
in a random order. A passage whose context and answer also occur in the training split is left out
(help topics repeat paragraphs: 72 of the first 200 did). Everything follows from the corpus and `seed`.
"""

from __future__ import annotations

import itertools

from pathlib import Path

import numpy as np

from parallel.common.errors import DataError
from train.core import jsonl
from train.core.input_pipeline import iter_texts, split_documents

YAML = """# lm-eval task (train/core/cloze.py): {n} questions from the held-out split of `{data}`, seed {seed}
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {jsonl}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""


def split_texts(data: str) -> dict[str, str]:
  """{'train': ..., 'eval': ...}: the documents of `data` in each split as training splits them, one
  text each."""
  docs = list(iter_texts(data))
  return {split: "\n\n".join(d[i] for i in idx) for split in ("train", "eval")
          for d, idx in [split_documents(docs, split)]}


def _word_starts(text: str) -> np.ndarray:
  """Positions where a word begins after one space that follows a word: context + " " + answer is
  then the text itself (lm-eval joins them with its target_delimiter, one space)."""
  c = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  word = lambda x: (x != ord(" ")) & (x != ord("\n"))
  return np.flatnonzero(word(c[:-2]) & (c[1:-1] == ord(" ")) & word(c[2:])) + 2


def questions(text: str, n: int, seed: int = 0, context: int = 96, answer: int = 24, distractors: int = 3,
              exclude: str = "") -> list:
  """`n` questions {context, choices, answer} from `text` (module docstring), none whose context and
  answer occur in `exclude`."""
  starts = _word_starts(text)
  ok = starts[(starts >= context) & (starts + 2 * answer < len(text))]

  def span(at: int) -> str:  # `answer` characters from `at`, cut back to the last word end
    s = text[at:at + answer]
    return (s[:s.rfind(" ")] if " " in s[1:] else s).rstrip()

  rng = np.random.default_rng(seed)
  out, pool = [], iter(rng.permutation(ok))
  for cut in pool:
    if len(out) == n:
      break
    before, true = text[cut - context:cut - 1], span(cut)
    if before + " " + true in exclude:
      continue
    wrong = [span(o) for o in itertools.islice(pool, distractors)]
    if len(wrong) < distractors:
      break
    order = rng.permutation(distractors + 1)
    out.append({"context": before, "choices": [([true] + wrong)[i] for i in order],
                "answer": int(np.flatnonzero(order == 0)[0])})
  if len(out) < n:
    raise DataError(f"the held-out text ({len(text)} characters) is too short for {n} questions; ask for fewer")
  return out


def write_task(data: str, out: str | Path, n: int = 200, seed: int = 0, name: str = "heldout_cloze") -> Path:
  """Write OUT/NAME.yaml and OUT/NAME.jsonl; returns the YAML's path."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  data_file = out / f"{name}.jsonl"
  with open(data_file, "w") as f:
    texts = split_texts(data)
    for q in questions(texts["eval"], n, seed, exclude=texts["train"]):
      f.write(jsonl.dumps(q) + "\n")
  yaml = out / f"{name}.yaml"
  yaml.write_text(YAML.format(n=n, data=data, seed=seed, name=name, jsonl=data_file.as_posix()))
  return yaml
