"""Tests for train/core/input_pipeline.py (and the train.data CLI): packing, splits, sharding, checkpointing, sources, tokenizers, errors."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

from parallel.common.errors import DataError
from train.core import input_pipeline as data

ROOT = Path(__file__).resolve().parents[1]
BYTE = data.ByteTokenizer()
BOS, EOS, PAD = BYTE.bos_id, BYTE.eos_id, BYTE.pad_id
FIELDS = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
          "loss_mask": np.float32}


def take(ds, n):
  return list(itertools.islice(iter(ds), n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def write_jsonl(path, texts):
  path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
  return path


def corpus(n=30):
  """Distinct documents of varied lengths, some longer than a row."""
  return [f"doc {i}: " + "xyz"[i % 3] * (i * 3 % 40) for i in range(n)]


def documents_of(batches, tok=BYTE):
  """Rebuilds the documents from packed batches, checking every invariant of the format on the way."""
  docs, current = [], None
  for b in batches:
    for k, dtype in FIELDS.items():
      assert b[k].dtype == dtype and b[k].shape == b["tokens"].shape, k
    for row in range(b["tokens"].shape[0]):
      seg, toks, tgts, pos = (b[k][row] for k in ("segment_ids", "tokens", "targets", "positions"))
      np.testing.assert_array_equal(b["loss_mask"][row], (seg > 0).astype(np.float32))
      assert np.all(toks[seg == 0] == tok.pad_id) and np.all(tgts[seg == 0] == tok.pad_id)
      real = seg[seg > 0]
      assert real.size == 0 or (real[0] == 1 and set(np.diff(real)) <= {0, 1}), "segments count up from 1"
      assert np.all(seg[len(real):] == 0), "padding only at the end of a row"
      for s in range(1, (real.max() if real.size else 0) + 1):
        t, g = toks[seg == s], tgts[seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(len(t)))
        np.testing.assert_array_equal(g[:-1], t[1:])  # next token, never across a segment
        if t[0] == tok.bos_id:
          assert current is None, "a document started before the previous one ended"
          current = []
        else:
          assert current is not None and s == 1, "a continuation chunk must open a row"
          assert current[-1] == t[0], "the last target of a chunk is the first token of the next"
          current.pop()
        current += [*t[1:], g[-1]] if t[0] == tok.bos_id else [*t, g[-1]]
        if g[-1] == tok.eos_id:
          docs.append(tok.decode(current[:-1]))
          current = None
  return docs, current


# ------------------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer():
  assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (259, 256, 257, 258)
  assert BYTE.encode("hé") == [104, 0xC3, 0xA9]
  assert BYTE.decode([BOS, 104, 0xC3, 0xA9, EOS, PAD]) == "hé"
  assert isinstance(data.load_tokenizer("byte"), data.ByteTokenizer)


def make_hf_tokenizer(directory: Path, with_config: bool) -> Path:
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["[UNK]", "[BEGIN]", "[END]", "[PAD]"] if with_config else ["[UNK]", "<s>", "</s>"]
  tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=specials))
  path = directory / "tokenizer.json"
  tok.save(str(path))
  if with_config:
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "[BEGIN]"}, "eos_token": "[END]", "pad_token": "[PAD]"}))
  return path


def test_hf_tokenizer_json(tmp_path):
  tok = data.load_tokenizer(str(make_hf_tokenizer(tmp_path, with_config=True)))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  assert tok.vocab_size > 10
  ids = tok.encode("doc 3 : xxxxxxxxx")
  assert tok.decode(ids) == "doc 3 : xxxxxxxxx" and max(ids) < tok.vocab_size
  assert data.load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a directory holding one
  ds = data.make_dataset(str(write_jsonl(tmp_path / "c.jsonl", corpus())), seq_len=8, batch_size=2, seed=0,
                         split="eval", tokenizer=tok)
  docs, _ = documents_of(list(ds), tok)
  expected = [corpus()[i] for i in data.split_indices(30, "eval")]
  assert [d.replace(" ", "") for d in docs] == [d.replace(" ", "") for d in expected]


def test_hf_tokenizer_well_known_names_and_pad_fallback(tmp_path):
  tok = data.load_tokenizer(str(make_hf_tokenizer(tmp_path, with_config=False)))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


# ---------------------------------------------------------------------------------------------- packing
def test_packing_hand_computed():
  # "ab", "cdefg", "h" as [BOS]+bytes+[EOS], inputs/targets shifted by one, rows of 4.
  docs = [[97, 98], [99, 100, 101, 102, 103], [104]]
  examples = [{"tokens": np.array([BOS, *d], np.int32), "targets": np.array([*d, EOS], np.int32)} for d in docs]
  rows = list(data.pack_documents(grain.MapDataset.source(examples).to_iter_dataset(), 4, PAD))
  expected = [
      dict(tokens=[BOS, 97, 98, BOS], targets=[97, 98, EOS, 99], segment_ids=[1, 1, 1, 2], positions=[0, 1, 2, 0],
           loss_mask=[1, 1, 1, 1]),
      dict(tokens=[99, 100, 101, 102], targets=[100, 101, 102, 103], segment_ids=[1, 1, 1, 1],
           positions=[0, 1, 2, 3], loss_mask=[1, 1, 1, 1]),
      dict(tokens=[103, BOS, 104, PAD], targets=[EOS, 104, EOS, PAD], segment_ids=[1, 2, 2, 0],
           positions=[0, 0, 1, 0], loss_mask=[1, 1, 1, 0]),
  ]
  assert len(rows) == len(expected)
  for row, want in zip(rows, expected):
    for k, v in want.items():
      np.testing.assert_array_equal(row[k], np.array(v, FIELDS[k]), err_msg=k)
      assert row[k].dtype == FIELDS[k]


def test_batches_rebuild_the_documents(tmp_path):
  src = str(write_jsonl(tmp_path / "c.jsonl", corpus()))
  batches = list(data.make_dataset(src, seq_len=16, batch_size=3, seed=0, split="eval", tokenizer=BYTE))
  docs, unfinished = documents_of(batches)
  assert unfinished is None
  assert docs == [corpus()[i] for i in data.split_indices(30, "eval")]
  assert batches[-1]["tokens"].shape == (3, 16)  # the last eval batch is padded to full size


def test_default_corpus_trains():
  documents = data.load_documents("default", BYTE)
  assert len(documents) > 50 and sum(map(len, documents)) > 300_000
  batches = take(data.make_dataset("default", seq_len=128, batch_size=4, seed=0, split="train", tokenizer=BYTE), 4)
  documents_of(batches)
  assert all(b["loss_mask"].sum() == 4 * 128 for b in batches)  # the infinite stream never pads


# ---------------------------------------------------------------------------- determinism, checkpoints
def test_same_seed_same_batches_other_seed_differs():
  make = lambda seed: take(data.make_dataset("default", seq_len=32, batch_size=2, seed=seed, split="train",
                                             tokenizer=BYTE), 3)
  assert_batches_equal(make(7), make(7))
  assert not np.array_equal(make(7)[0]["tokens"], make(8)[0]["tokens"])


def test_save_and_restore_state_is_exact(tmp_path):
  src = str(write_jsonl(tmp_path / "c.jsonl", corpus()))
  make = lambda: data.make_dataset(src, seq_len=16, batch_size=2, seed=3, split="train", tokenizer=BYTE)
  it = iter(make())
  take(it, 5)
  state = it.get_state()
  json.dumps(state)  # a checkpoint can store it
  after = take(it, 5)
  it.set_state(state)
  assert_batches_equal(take(it, 5), after)
  fresh = iter(make())
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 5), after)


def test_train_reshuffles_every_epoch(tmp_path):
  src = str(write_jsonl(tmp_path / "c.jsonl", [f"d{i:02d}" for i in range(20)]))  # 16 train documents
  # [BOS] d N N fills a row of 4 exactly, so each batch of 16 rows is one epoch.
  batches = take(data.make_dataset(src, seq_len=4, batch_size=16, seed=0, split="train", tokenizer=BYTE), 2)
  docs, _ = documents_of(batches)
  first, second = docs[:16], docs[16:]
  assert len(second) == 16 and sorted(first) == sorted(second) and first != second


def test_worker_process_gives_the_in_process_batches_and_restores():
  make = lambda workers: data.make_dataset("default", seq_len=64, batch_size=2, seed=0, split="train",
                                           tokenizer=BYTE, num_workers=workers)
  it = iter(make(1))  # one worker reads the whole shard, so the stream is the in-process one
  try:
    assert_batches_equal([{k: np.array(v) for k, v in b.items()} for b in take(it, 4)], take(make(0), 4))
    state = it.get_state()
    after = [{k: np.array(v) for k, v in b.items()} for b in take(it, 2)]
    it.set_state(state)
    assert_batches_equal([{k: np.array(v) for k, v in b.items()} for b in take(it, 2)], after)
  finally:
    it.close()


# ---------------------------------------------------------------------------------- sharding and splits
def test_two_processes_are_disjoint_and_complete(tmp_path):
  src = str(write_jsonl(tmp_path / "c.jsonl", corpus(40)))
  make = lambda split, i, n: data.make_dataset(src, seq_len=32, batch_size=4, seed=1, split=split,
                                               tokenizer=BYTE, process_index=i, process_count=n)
  for split in ("train", "eval"):
    whole = set(corpus(40)[i] for i in data.split_indices(40, split))
    if split == "train":
      parts = [set(documents_of(take(make(split, i, 2), 20))[0]) for i in range(2)]  # several epochs
    else:
      parts = [set(documents_of(list(make(split, i, 2)))[0]) for i in range(2)]
    assert not parts[0] & parts[1], split
    assert parts[0] | parts[1] == whole, split


def test_eval_split_is_disjoint_from_train():
  for n in (2, 3, 10, 79, 1000, 12345):
    train, ev = data.split_indices(n, "train"), data.split_indices(n, "eval")
    assert not set(train) & set(ev) and len(train) + len(ev) == n
    assert len(ev) == min(n // 2, max(4, -(-n // 100)))
  assert len(data.split_indices(1, "train")) == 1


def test_eval_is_finite_and_deterministic():
  make = lambda: list(data.make_dataset("default", seq_len=512, batch_size=4, seed=0, split="eval",
                                        tokenizer=BYTE))
  a = make()
  assert 0 < len(a) < 100
  assert_batches_equal(a, make())


# --------------------------------------------------------------------------------------------- sources
def test_text_files_one_document_per_file(tmp_path):
  for i, text in enumerate(["first file\n\nstill first", "second", "third"]):
    (tmp_path / f"{i}.txt").write_text(text)
  (tmp_path / "notes.md").write_text("markdown")
  assert data.load_documents(str(tmp_path / "*.txt"), BYTE) == ["first file\n\nstill first", "second", "third"]
  assert data.load_documents(str(tmp_path / "*"), BYTE)[-1] == "markdown"


def test_jsonl_source(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", ["a", "b"])
  path.write_text(path.read_text() + "\n" + json.dumps({"text": "c"}) + "\n")
  assert data.load_documents(str(path), BYTE) == ["a", "b", "c"]


def test_parquet_source(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"id": [0, 1], "text": ["one", "two"]}), tmp_path / "a.parquet")
  pq.write_table(pa.table({"text": ["three"]}), tmp_path / "b.parquet")
  assert data.load_documents(str(tmp_path / "*.parquet"), BYTE) == ["one", "two", "three"]


def test_prepare_command_round_trip(tmp_path):
  src = str(write_jsonl(tmp_path / "c.jsonl", corpus()))
  out = tmp_path / "prepared"
  result = subprocess.run([sys.executable, "-m", "train.data", "prepare", src, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  meta = json.loads((out / "metadata.json").read_text())
  assert (meta["tokenizer"], meta["vocab_size"], meta["num_documents"]) == ("byte", 259, 30)
  assert meta["num_tokens"] == sum(len(t.encode()) for t in corpus())
  docs = data.load_documents(str(out), BYTE)
  assert [BYTE.decode(docs[i]) for i in range(len(docs))] == corpus()
  for split in ("train", "eval"):
    make = lambda d: take(data.make_dataset(d, seq_len=16, batch_size=2, seed=0, split=split, tokenizer=BYTE), 4)
    assert_batches_equal(make(str(out)), make(src))  # same batches as tokenising the text on the fly


def test_prepare_with_hf_tokenizer_and_mismatch(tmp_path):
  tok_path = make_hf_tokenizer(tmp_path, with_config=True)
  tok = data.load_tokenizer(str(tok_path))
  meta = data.prepare([str(write_jsonl(tmp_path / "c.jsonl", corpus()))], tmp_path / "out", tok)
  assert meta["tokenizer"] == str(tok_path) and meta["vocab_size"] == tok.vocab_size
  assert take(data.make_dataset(str(tmp_path / "out"), seq_len=8, batch_size=2, seed=0, split="train",
                                tokenizer=tok), 1)
  with pytest.raises(DataError, match=f"pass --tokenizer {tok_path}"):
    data.make_dataset(str(tmp_path / "out"), seq_len=8, batch_size=2, seed=0, split="train", tokenizer=BYTE)
  with pytest.raises(DataError, match="already holds"):
    data.prepare(["default"], tmp_path / "out", tok)


# ---------------------------------------------------------------------------------------------- errors
def error(fn, *args, **kwargs) -> str:
  with pytest.raises(DataError) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)
  return str(e.value)


def make(spec, **kwargs):
  return data.make_dataset(spec, **{"seq_len": 8, "batch_size": 1, "seed": 0, "split": "train",
                                    "tokenizer": BYTE, **kwargs})


def test_error_missing_file_and_empty_glob(tmp_path):
  assert f"{tmp_path}/nope.jsonl: no such file" in error(make, str(tmp_path / "nope.jsonl"))
  assert "matches no files" in error(make, str(tmp_path / "*.txt"))


def test_error_empty_file(tmp_path):
  (tmp_path / "a.txt").write_text("")
  assert f"{tmp_path}/a.txt: empty file" in error(make, str(tmp_path / "*.txt"))
  (tmp_path / "b.jsonl").write_text("\n\n")
  assert "b.jsonl: no documents" in error(make, str(tmp_path / "b.jsonl"))


def test_error_jsonl_line_without_text(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  assert f'{path}:2: no "text" field' in error(make, str(path))
  path.write_text('{"text": "ok"}\n{"text": \n')
  assert f"{path}:2: not valid JSON" in error(make, str(path))


def test_error_parquet_without_text_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
  assert 'a.parquet: no "text" column (columns: body)' in error(make, str(tmp_path / "a.parquet"))


def test_error_seq_len_too_long():
  message = error(make, "default", seq_len=8192, max_seq_len=4096)
  assert "8192" in message and "4096" in message and "max_position_embeddings" in message


def test_error_unknown_tokenizer_and_file_type(tmp_path):
  assert "unknown tokenizer 'gpt9'" in error(data.load_tokenizer, "gpt9")
  (tmp_path / "a.csv").write_text("x")
  assert "unknown file type '.csv'" in error(make, str(tmp_path / "a.csv"))


def test_error_unknown_split_and_no_documents_for_a_process(tmp_path):
  assert "unknown split 'test'" in error(make, "default", split="test")
  src = str(write_jsonl(tmp_path / "c.jsonl", ["a", "b", "c"]))
  assert "process 3 of 4 gets no training documents" in error(make, src, process_index=3, process_count=4)


def test_prepare_command_reports_one_line_error(tmp_path):
  (tmp_path / "c.jsonl").write_text('{"x": 1}\n')
  result = subprocess.run([sys.executable, "-m", "train.data", "prepare", str(tmp_path / "c.jsonl"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last == f'error: {tmp_path}/c.jsonl:1: no "text" field; each line must be an object like {{"text": "..."}}'
  assert not list((tmp_path / "out").glob("shard-*"))  # no partial shards left behind


# ------------------------------------------------------------------ a cloze task from the held-out split
def test_cloze_task_is_the_held_out_text_and_what_is_committed(tmp_path):
  """train.data cloze (train/core/cloze.py): every question's context, a space (lm-eval's target
  delimiter) and correct choice are consecutive held-out text that the training split does not hold
  (help topics repeat paragraphs across documents), the distractors are other held-out words, the
  answers spread over the positions; the same corpus and seed write the same file, which is the
  one configs/scaling/tasks holds (the sweep's task)."""
  from train import data as data_cli
  from train.core import cloze

  root = Path(__file__).resolve().parents[1]
  assert data_cli.main(["cloze", "default", "--out", str(tmp_path)]) == 0
  written = (tmp_path / "heldout_cloze.jsonl").read_text()
  assert written == (root / "configs/scaling/tasks/heldout_cloze.jsonl").read_text()
  texts = cloze.split_texts("default")
  held, train_text = texts["eval"], texts["train"]
  docs = list(data.iter_texts("default"))
  assert train_text == "\n\n".join(docs[i] for i in data.split_indices(len(docs), "train"))
  qs = [json.loads(line) for line in written.splitlines()]
  assert len(qs) == 200
  for q in qs:
    assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
    passage = q["context"] + " " + q["choices"][q["answer"]]
    assert passage in held and passage not in train_text
    assert all(c in held and c == c.strip() and c for c in q["choices"])
  assert sorted(set(q["answer"] for q in qs)) == [0, 1, 2, 3]
  yaml_text = (tmp_path / "heldout_cloze.yaml").read_text()
  assert "task: heldout_cloze" in yaml_text and str(tmp_path / "heldout_cloze.jsonl") in yaml_text
  with pytest.raises(DataError, match="too short"):
    cloze.questions("a b c " * 50, n=200)
