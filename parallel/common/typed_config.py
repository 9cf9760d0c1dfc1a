"""Typed config dataclasses that check themselves: the check every layer's config runs.

The config dataclasses (`parallel.mesh.MeshConfig`, `parallel.pipeline.PipelineConfig`,
`moe.config.ModelConfig`, `moe.runtime.ImplConfig`, `train.core.train_config.TrainConfig`) type-check
their fields with `check_fields` and reject unknown keys with `reject_unknown`, which suggests the key
meant; both raise `ConfigError` with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Literal, Mapping

from parallel.common.errors import ConfigError


def reject_unknown(keys, cls, where: str, elsewhere: Mapping[str, str] | None = None) -> None:
  """ConfigError for the first key that is not a field of the dataclass `cls`: with the field it
  probably meant, or, when `elsewhere` maps it to a place it lives (e.g. 'ep_transport' ->
  'mesh.ep_transport'), that place."""
  names = [f.name for f in dataclasses.fields(cls)]
  for key in keys:
    if key in names:
      continue
    if elsewhere and str(key) in elsewhere:
      raise ConfigError(f"{where}: unknown key '{key}' (it lives at {elsewhere[str(key)]})")
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"{where}: unknown key '{key}'{hint}")


def check_fields(obj, prefix: str) -> None:
  """Type-check a config dataclass against its annotations (nested dataclasses check themselves;
  tuples are checked by their owner)."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if isinstance(value, tuple):
      continue
    ok, want = matches(value, hints[f.name])
    if not ok:
      raise ConfigError(f"{prefix}{f.name}: expected {want}, got {type(value).__name__} {value!r}")


def matches(value, tp) -> tuple[bool, str]:
  """(whether `value` fits the annotation `tp`, what `tp` wants in words)."""
  origin = typing.get_origin(tp)
  if origin is Literal:
    choices = typing.get_args(tp)
    return value in choices, "one of " + ", ".join(map(repr, choices))
  if origin in (typing.Union, types.UnionType):
    results = [matches(value, a) for a in typing.get_args(tp)]
    return any(r[0] for r in results), " or ".join(r[1] for r in results)
  if tp is type(None):
    return value is None, "null"
  if tp is bool:
    return isinstance(value, bool), "a boolean"
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool), "an integer"
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
  if tp is str:
    return isinstance(value, str), "a string"
  if origin is dict or tp is dict:
    return isinstance(value, dict), "a mapping"
  if dataclasses.is_dataclass(tp):
    return isinstance(value, tp), f"a {tp.__name__} mapping"
  return True, str(tp)


def dataclass_of(tp):
  """The dataclass in a field annotation such as `RopeScaling | None`, else None."""
  args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
  return next((a for a in args if dataclasses.is_dataclass(a)), None)
