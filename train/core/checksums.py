"""Checksums of a checkpoint's bytes: a CRC-32 per array shard, written with the step and checked at
every restore (train/core/checkpoint.py says what a failure does).

  checksums/  `process_<i>-of-<n>.json` of every process: {array: {"dtype", "shards": {index: CRC-32}}},
              the CRC-32 of the host bytes of each array shard this process saved (replica 0), its
              index as "start:stop,..." (`shard_checksums`); an Orbax item (`ChecksumHandler`), so
              committed with the step

`verify` checks a restored shard on every saved shard it contains, so a restore onto fewer devices
is checked too; one split finer than the save cannot be, and is counted as unchecked.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.core import jsonl


def _index(index: tuple, shape: tuple) -> str:
  """A shard's index (a tuple of slices) as "start:stop,start:stop" ("" for a scalar)."""
  return ",".join("{}:{}".format(*sl.indices(n)[:2]) for sl, n in zip(index, shape))


def _bounds(text: str) -> list[tuple[int, int]]:
  return [tuple(map(int, part.split(":"))) for part in text.split(",")] if text else []


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _crc(a) -> str:
  """CRC-32 of an array's bytes, read in place (about 1 GB/s a core; zlib releases the GIL)."""
  return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


def shard_checksums(tree) -> dict:
  """{array name: {"dtype", "shards": {index: CRC-32 hex}}} of the shards of `tree`'s arrays that this
  process holds (replica 0 of each: every shard is summed by exactly one process), on a thread per
  core."""
  shards = [(_name(path), x, s) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, jax.Array) for s in x.addressable_shards if s.replica_id == 0]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    crcs = pool.map(lambda item: _crc(np.asarray(item[2].data)), shards)
  out = {}
  for (name, x, s), crc in zip(shards, crcs, strict=True):
    out.setdefault(name, {"dtype": str(x.dtype), "shards": {}})["shards"][_index(s.index, x.shape)] = crc
  return out


def read_checksums(path: Path) -> dict | None:
  """The checksums of every process of the checkpoint step directory `path`, merged; None when it
  has none (written before checksums existed)."""
  files = sorted((path / "checksums").glob("process_*-of-*.json"))
  if not files:
    return None
  merged = {}
  for f in files:
    try:
      part = json.loads(f.read_text())
    except (OSError, ValueError) as e:
      first = (str(e).strip().splitlines() or [""])[0][:200]
      return {"": {"dtype": "", "shards": {}, "unreadable": f"{f.name}: {type(e).__name__}: {first}"}}
    for name, entry in part.items():
      merged.setdefault(name, {"dtype": entry["dtype"], "shards": {}})["shards"].update(entry["shards"])
  return merged


def verify(tree, saved: dict) -> tuple[list[str], int]:
  """(the shards of `tree` this process restored whose bytes differ from their checksum at save, as
  "array [index]", how many saved shards it checked). A restored shard is checked on every saved
  shard it contains; arrays restored in another dtype (a cast on read) cannot be checked."""
  if "" in saved:
    return [f"checksums {saved['']['unreadable']}"], 0
  bad, checked = [], 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    entry = saved.get(_name(path))
    if entry is None or not isinstance(x, jax.Array) or entry["dtype"] != str(x.dtype):
      continue
    pieces = [(_bounds(k), crc, k) for k, crc in entry["shards"].items()]
    for shard in (s for s in x.addressable_shards if s.replica_id == 0):  # the others read the same bytes
      have = _bounds(_index(shard.index, x.shape))
      host = None
      for b, crc, k in pieces:
        if all(h0 <= s0 and s1 <= h1 for (s0, s1), (h0, h1) in zip(b, have)):
          host = np.asarray(shard.data) if host is None else host
          part = host[tuple(slice(s0 - h0, s1 - h0) for (s0, s1), (h0, _) in zip(b, have))]
          checked += 1
          if _crc(part) != crc:
            bad.append(f"{_name(path)} [{k}] fails its checksum")
  return sorted(set(bad)), checked


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process gets the same answer)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


class ChecksumHandler:
  """Orbax CheckpointHandler writing this process's `shard_checksums` as
  checksums/process_<i>-of-<n>.json (the pattern of grain's iterator handler: every process writes its
  own file into the step's temporary directory, committed with the step)."""

  def save(self, directory, item=None, args=None):
    item = item if item is not None else args.item
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(jsonl.dumps(item))

  def restore(self, directory, item=None, args=None):
    return read_checksums(Path(directory).parent)

  def structure(self, directory):
    return None

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ChecksumHandler, for_restore=True)  # orbax wants both; reads use read_checksums
@dataclasses.dataclass
class ChecksumRestore(ocp.args.CheckpointArgs):
  item: Any = None
