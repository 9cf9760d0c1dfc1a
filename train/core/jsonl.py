"""Strict JSON (RFC 8259) for everything the tools print or write: NaN and +-Inf become null.

Python's json writes `NaN` and `Infinity`, which no strict parser reads (`jq`, JavaScript, Go); a
diverged loss must not make a tool's output unreadable. metrics.jsonl names the null fields in each
record's `nonfinite` list (train/core/metrics.py).
"""

from __future__ import annotations

import json
import math

import numpy as np


def finite(value):
  """`value` with every non-finite float (Python or NumPy, in dicts, lists and tuples) made None and
  NumPy scalars made Python numbers."""
  if isinstance(value, dict):
    return {k: finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def dumps(value, **kwargs) -> str:
  """json.dumps of `finite(value)`; never writes NaN or Infinity (allow_nan=False guards it)."""
  return json.dumps(finite(value), allow_nan=False, **kwargs)
