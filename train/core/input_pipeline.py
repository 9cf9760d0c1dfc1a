"""Training data: document sources, tokenizers, packing into fixed-length rows, and `prepare`.

Data spec (the `data` string of `make_dataset`, and each INPUT of `prepare`):

  default           the English documentation prose that ships with Python (`pydoc_data.topics`):
                    one document per help topic (Python 3.11: 79 documents, 466 KB); needs no download
  DIR or DIR/       a directory written by `prepare`: ArrayRecord shards of pre-tokenised documents
  PATH or GLOB      files, matched with `glob` (`**` recurses), read in sorted order; the kind comes
                    from each file's suffix:
                      .txt .md .rst   UTF-8 text, one document per file
                      .jsonl          one JSON object per line with a string field "text" (blank lines skipped)
                      .parquet        one document per row of the string column "text"

Tokenizers (`load_tokenizer(spec)`):

  byte              ids 0..255 are the UTF-8 bytes, then BOS=256, EOS=257, PAD=258; vocab_size 259
  PATH              an HF `tokenizer.json` (or a directory holding one), via the `tokenizers` library;
                    BOS/EOS/PAD come from a `tokenizer_config.json` beside it, else from well-known
                    token names; PAD falls back to EOS

Prepared directory (`prepare`, or `python -m train.data prepare INPUT... --out DIR [--tokenizer byte|PATH]`):
`shard-NNNNN.array_record` files, each record one document's token ids (without BOS/EOS) as
little-endian int32 bytes, and `metadata.json` with the tokenizer spec, vocab_size, bos/eos/pad ids and
counts. Reading it back needs a tokenizer with the same vocab_size and special ids.

Batches (numpy, B = per-process batch_size, T = seq_len):

  tokens       int32   [B, T]  input ids
  targets      int32   [B, T]  the next token of the same document
  segment_ids  int32   [B, T]  1, 2, ... per document (chunk) within the row; 0 = padding
  positions    int32   [B, T]  position within the document chunk, from 0
  loss_mask    float32 [B, T]  1 where targets is a real next token, 0 on padding

Each document becomes the sequence [BOS] + ids + [EOS]; its inputs are that sequence without the last
token and its targets the sequence shifted by one, so EOS is only ever a target and every non-padding
position has a real target (loss_mask == segment_ids > 0). Inputs and targets are packed together with
Grain's concat-then-split packing: rows are filled back to back; a document that does not fit is split,
and its remainder starts the next row as a new segment with positions restarting at 0 (the chunk cannot
attend to its earlier part, which lives in another row). The last token of a split chunk keeps its real
target (the first token of the next chunk). Attention must be masked by segment_ids; nothing crosses a
document boundary.

Splits: documents are split by index, independent of the seed: the eval split is the
max(4, 1%) documents (at most half) with the smallest hash of their index; train is the rest. The split
is then sharded across processes by taking every process_count-th document from process_index, so
processes read disjoint documents that together cover the split. Train iterates forever, reshuffled
every epoch from the seed; eval reads its documents once in order, and its last batch is padded with
empty rows (loss_mask 0). Processes may yield different numbers of eval batches. A corpus of one
document (a single text file, a prepared directory of one) is split by position instead: the eval split
is its last 1% (at least one character, or token when prepared), train the rest.

The returned `grain.IterDataset` is deterministic for a given (seed, process_index, process_count,
num_workers); `iter(ds)` is a checkpointable iterator (`get_state` / `set_state`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import grain
import numpy as np
import tqdm
from absl import flags

from parallel.common.errors import DataError
from train.core import jsonl

TEXT_SUFFIXES = (".txt", ".md", ".rst")
METADATA = "metadata.json"
SHARD_BYTES = 256 * 2**20  # start a new ArrayRecord shard after this many token bytes
EVAL_FRACTION = 0.01
MIN_EVAL_DOCS = 4


# ------------------------------------------------------------------------------------------ tokenizers
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  spec: str  # what load_tokenizer was given

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; BOS, EOS, PAD follow. Needs no files."""

  spec: str = "byte"
  bos_id: int = 256
  eos_id: int = 257
  pad_id: int = 258
  vocab_size: int = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
  """An HF `tokenizer.json` through the `tokenizers` library."""

  def __init__(self, path: Path, spec: str):
    import tokenizers  # pylint: disable=import-outside-toplevel

    self.spec = spec
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      raise DataError(f"{path}: not a valid HF tokenizer.json ({str(e).splitlines()[0]})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
    self.bos_id = self._special_id(config, "bos_token", _BOS_NAMES, path)
    self.eos_id = self._special_id(config, "eos_token", _EOS_NAMES, path)
    try:
      self.pad_id = self._special_id(config, "pad_token", _PAD_NAMES, path)
    except DataError:
      self.pad_id = self.eos_id

  def _special_id(self, config: dict, key: str, names: Sequence[str], path: Path) -> int:
    value = config.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    for name in [value] if value else names:
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    raise DataError(
        f"{path}: cannot find the {key} (tried {value or ', '.join(names)}); put a tokenizer_config.json"
        f" naming {key} beside it"
    )

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_tokenizer_config(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(spec: str) -> Tokenizer:
  """`byte`, or a path to an HF tokenizer.json (or to a directory holding one)."""
  if spec == "byte":
    return ByteTokenizer()
  path = Path(spec)
  if path.is_dir():
    if not (path / "tokenizer.json").is_file():
      raise DataError(f"tokenizer {spec!r}: the directory holds no tokenizer.json; give the path of an HF"
                      " tokenizer.json (or its directory), or 'byte'")
    path = path / "tokenizer.json"
  if path.is_file():
    if path.suffix == ".json":
      return HFTokenizer(path, spec)
    raise DataError(f"tokenizer {spec!r}: not a .json file; give the path of an HF tokenizer.json (or its"
                    " directory), or 'byte'")
  if path.suffix == ".json" or "/" in spec:
    raise DataError(f"tokenizer {spec!r}: no such file; give the path of an HF tokenizer.json (or its directory),"
                    " or 'byte'")
  raise DataError(f"unknown tokenizer {spec!r}: use 'byte' or the path of an HF tokenizer.json")


# --------------------------------------------------------------------------------------------- sources
def _default_documents() -> list[str]:
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  return [topics[k] for k in sorted(topics)]


def _match_files(pattern: str) -> list[Path]:
  paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
  files = [p for p in paths if p.is_file()]
  if not files:
    if glob.has_magic(pattern):
      raise DataError(f"{pattern}: the glob matches no files; check the pattern (quote it in a shell)")
    raise DataError(f"{pattern}: no such file; give an existing file, a glob, a prepared directory or 'default'")
  for f in files:
    if f.suffix not in (*TEXT_SUFFIXES, ".jsonl", ".parquet"):
      raise DataError(
          f"{f}: unknown file type {f.suffix!r}; use {'/'.join(TEXT_SUFFIXES)} (text), .jsonl, .parquet,"
          " or a directory written by `python -m train.data prepare`"
      )
    if f.stat().st_size == 0:
      raise DataError(f"{f}: empty file; remove it or narrow the glob")
  return files


def _text_documents(path: Path) -> Iterator[str]:
  try:
    yield path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
  count = 0
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); write one JSON object per line") from None
      if not isinstance(record, dict) or "text" not in record:
        raise DataError(f'{path}:{lineno}: no "text" field; each line must be an object like {{"text": "..."}}')
      if not isinstance(record["text"], str):
        raise DataError(f'{path}:{lineno}: "text" is {type(record["text"]).__name__}, not a string')
      count += 1
      yield record["text"]
  if not count:
    raise DataError(f"{path}: no documents (only blank lines); remove it or narrow the glob")


def _parquet_documents(path: Path) -> Iterator[str]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid for corrupt files
    raise DataError(f"{path}: not a Parquet file ({e})") from None
  if "text" not in pf.schema_arrow.names:
    columns = ", ".join(pf.schema_arrow.names)
    raise DataError(f'{path}: no "text" column (columns: {columns}); rename the text column')
  if pf.metadata.num_rows == 0:
    raise DataError(f"{path}: no rows; remove it or narrow the glob")
  row = 0
  for batch in pf.iter_batches(columns=["text"]):
    for text in batch.column(0).to_pylist():
      if not isinstance(text, str):
        raise DataError(f'{path}: row {row}: "text" is {type(text).__name__}, not a string')
      row += 1
      yield text


_READERS = {".jsonl": _jsonl_documents, ".parquet": _parquet_documents}


def iter_texts(spec: str) -> Iterator[str]:
  """Stream the documents of a text spec (`default` or files), one file at a time."""
  if spec == "default":
    yield from _default_documents()
    return
  if Path(spec).is_dir():
    raise DataError(f"{spec}: a prepared directory holds token ids, not text; give the original text files")
  for path in _match_files(spec):
    yield from _READERS.get(path.suffix, _text_documents)(path)


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """A directory written by `prepare`: ArrayRecord records of int32 token ids."""

  source: grain.sources.ArrayRecordDataSource

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> np.ndarray:
    return np.frombuffer(self.source[i], dtype="<i4")


def _open_prepared(path: Path, tokenizer: Tokenizer) -> _Prepared:
  meta_path = path / METADATA
  if not meta_path.is_file():
    raise DataError(f"{path}: no {METADATA}; write it with `python -m train.data prepare ... --out {path}`")
  meta = json.loads(meta_path.read_text())
  shards = sorted(path.glob("shard-*.array_record"))
  if not shards or meta["num_documents"] == 0:
    raise DataError(f"{path}: no documents; prepare it again from a non-empty input")
  ours = {k: getattr(tokenizer, k) for k in ("vocab_size", "bos_id", "eos_id", "pad_id")}
  theirs = {k: meta[k] for k in ours}
  if ours != theirs:
    raise DataError(
        f"{path}: prepared with tokenizer {meta['tokenizer']!r} {theirs}, but the tokenizer given is"
        f" {tokenizer.spec!r} {ours}; pass --tokenizer {meta['tokenizer']}"
    )
  records = 0
  for shard in shards:  # a truncated or damaged shard: one line naming it, before training starts
    try:
      records += len(grain.sources.ArrayRecordDataSource([str(shard)]))
    except (RuntimeError, ValueError, OSError) as e:
      raise DataError(f"{shard}: not a readable ArrayRecord shard ({str(e).splitlines()[0][:160]}); prepare"
                      f" {path} again") from None
  if records != meta["num_documents"]:
    raise DataError(f"{path}: its shards hold {records} documents, {METADATA} says {meta['num_documents']};"
                    " prepare it again")
  return _Prepared(grain.sources.ArrayRecordDataSource([str(s) for s in shards]))


def load_documents(spec: str, tokenizer: Tokenizer) -> Sequence[str] | _Prepared:
  """Random access to the documents of `spec`: texts in memory, or a prepared directory's token ids."""
  if spec != "default" and Path(spec).is_dir():
    return _open_prepared(Path(spec), tokenizer)
  return list(iter_texts(spec))


# ---------------------------------------------------------------------------------------------- splits
def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64: a fixed, platform-independent hash of document indices."""
  x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def split_indices(num_documents: int, split: str) -> np.ndarray:
  """Sorted indices of the documents in `split` ('train' or 'eval'); depends only on num_documents."""
  num_eval = min(num_documents // 2, max(MIN_EVAL_DOCS, math.ceil(num_documents * EVAL_FRACTION)))
  is_eval = np.zeros(num_documents, bool)
  is_eval[np.argsort(_mix(np.arange(num_documents)), kind="stable")[:num_eval]] = True
  if split == "train":
    return np.flatnonzero(~is_eval)
  if split == "eval":
    if not num_eval:
      raise DataError(f"split='eval' needs at least 2 documents, the data has {num_documents}; add documents")
    return np.flatnonzero(is_eval)
  raise DataError(f"unknown split {split!r}; use 'train' or 'eval'")


def split_documents(documents, split: str):
  """(documents, indices of `split`'s among them): one large document is a corpus too, whose end is
  held out (`split_by_position`); more are split whole (`split_indices`)."""
  if len(documents) == 1:
    return [split_by_position(documents[0], split)], np.arange(1)
  return documents, split_indices(len(documents), split)


def split_by_position(document, split: str):
  """The `split` part of a corpus of one document (text or token ids): eval is its last EVAL_FRACTION
  (at least one character or token), train the rest."""
  if split not in ("train", "eval"):
    raise DataError(f"unknown split {split!r}; use 'train' or 'eval'")
  cut = len(document) - max(1, math.ceil(len(document) * EVAL_FRACTION))
  return document[:cut] if split == "train" else document[cut:]


# --------------------------------------------------------------------------------------------- packing
@dataclasses.dataclass(frozen=True)
class _Encode:
  """Document index -> {'tokens': [BOS] + ids, 'targets': ids + [EOS]} (int32)."""

  documents: Sequence[str] | _Prepared
  tokenizer: Tokenizer

  def __call__(self, index) -> dict[str, np.ndarray]:
    doc = self.documents[int(index)]
    ids = self.tokenizer.encode(doc) if isinstance(doc, str) else doc
    seq = np.concatenate([[self.tokenizer.bos_id], ids, [self.tokenizer.eos_id]]).astype(np.int32)
    return {"tokens": seq[:-1], "targets": seq[1:]}


@dataclasses.dataclass(frozen=True)
class _Finish:
  """A packed row from ConcatThenSplit -> the batch fields (see the module docstring)."""

  pad_id: int

  def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["tokens_segment_ids"].astype(np.int32)
    real = segment_ids > 0
    return {
        "tokens": np.where(real, row["tokens"], self.pad_id).astype(np.int32),
        "targets": np.where(real, row["targets"], self.pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.where(real, row["tokens_positions"], 0).astype(np.int32),
        "loss_mask": real.astype(np.float32),
    }


@dataclasses.dataclass(frozen=True)
class _StackPadded:
  """Stacks rows into a batch, padding a short (final eval) batch with empty rows."""

  batch_size: int
  pad_id: int

  def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = self.batch_size - len(rows)
    if missing:
      for k, v in batch.items():
        fill = self.pad_id if k in ("tokens", "targets") else 0
        batch[k] = np.concatenate([v, np.full((missing, *v.shape[1:]), fill, v.dtype)])
    return batch


def pack_documents(examples: grain.IterDataset, seq_len: int, pad_id: int) -> grain.IterDataset:
  """{'tokens', 'targets'} per document -> packed rows of length seq_len (unbatched)."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
      examples, length_struct={"tokens": seq_len, "targets": seq_len}
  )
  return packed.map(_Finish(pad_id))


# ------------------------------------------------------------------------------------------ entry point
def make_dataset(
    data: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str,
    tokenizer: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    max_seq_len: int | None = None,
) -> grain.IterDataset:
  """Packed batches of this process's shard of `split` (see the module docstring).

  `batch_size` is per process. `num_workers` > 0 tokenises and packs in that many worker processes
  (Grain's mp_prefetch; the batches then depend on num_workers too); 0 works in this process.
  `max_seq_len` is the model's limit (max_position_embeddings).
  """
  _check_sizes(seq_len, batch_size, seed, max_seq_len, process_index, process_count)
  documents, indices = split_documents(load_documents(data, tokenizer), split)
  indices = indices[process_index::process_count]
  if not len(indices) and split == "train":
    raise DataError(
        f"{data}: process {process_index} of {process_count} gets no training documents (the split has"
        f" {len(split_indices(len(documents), split))}); use more documents or fewer processes"
    )
  ds = grain.MapDataset.source(indices)
  if split == "train":
    ds = ds.shuffle(seed).repeat(None)
  ds = ds.map(_Encode(documents, tokenizer)).to_iter_dataset()
  rows = pack_documents(ds, seq_len, tokenizer.pad_id)
  batches = rows.batch(batch_size, batch_fn=_StackPadded(batch_size, tokenizer.pad_id))
  if not num_workers:
    return batches
  if not flags.FLAGS.is_parsed():  # grain's worker start reads an absl flag; we use no absl flags
    flags.FLAGS.mark_as_parsed()
  return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _check_sizes(seq_len, batch_size, seed, max_seq_len, process_index, process_count) -> None:
  if max_seq_len is not None and seq_len > max_seq_len:
    raise DataError(
        f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_seq_len}; lower seq_len to"
        f" at most {max_seq_len}"
    )
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len {seq_len} and batch_size {batch_size} must both be >= 1")
  if not 0 <= seed < 2**32:
    raise DataError(f"seed {seed} must be in [0, 2**32)")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} must be in [0, process_count={process_count})")


# --------------------------------------------------------------------------------------------- prepare
def prepare(inputs: Sequence[str], out: str | Path, tokenizer: Tokenizer) -> dict:
  """Tokenises the documents of `inputs` into ArrayRecord shards in `out`; returns the metadata."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

  out = Path(out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"--out {out}: cannot make it a directory ({e.strerror}); choose a new --out directory") from None
  if any(out.glob("shard-*.array_record")) or (out / METADATA).exists():
    raise DataError(f"{out}: already holds a prepared dataset; choose an empty --out directory")
  paths, num_docs, num_tokens, shard_bytes = [], 0, 0, SHARD_BYTES
  writer = None
  try:
    with tqdm.tqdm(unit=" doc", desc=f"prepare -> {out}") as bar:
      for text in (t for spec in inputs for t in iter_texts(spec)):
        if shard_bytes >= SHARD_BYTES:
          if writer is not None:
            writer.close()
          paths.append(out / f"shard-{len(paths):05d}.array_record")
          writer, shard_bytes = ArrayRecordWriter(str(paths[-1]), "group_size:1"), 0
        record = np.asarray(tokenizer.encode(text), dtype="<i4").tobytes()
        writer.write(record)
        num_docs, num_tokens, shard_bytes = num_docs + 1, num_tokens + len(record) // 4, shard_bytes + len(record)
        bar.update()
        bar.set_postfix(tokens=num_tokens, refresh=False)
  finally:
    if writer is not None:
      writer.close()
    if sys.exc_info()[0] is not None:  # leave no partial shards behind: a rerun must not find them
      for path in paths:
        path.unlink(missing_ok=True)
  meta = {
      "format": "one document per record: its token ids (no BOS/EOS) as little-endian int32",
      "tokenizer": tokenizer.spec,
      "vocab_size": tokenizer.vocab_size,
      "bos_id": tokenizer.bos_id,
      "eos_id": tokenizer.eos_id,
      "pad_id": tokenizer.pad_id,
      "num_documents": num_docs,
      "num_tokens": num_tokens,
      "num_shards": len(paths),
      "inputs": list(inputs),
  }
  (out / METADATA).write_text(jsonl.dumps(meta, indent=2) + "\n")
  return meta


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """A batch of random tokens, one document per row (benchmarks and tests)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}
