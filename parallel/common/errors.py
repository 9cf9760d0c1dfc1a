"""The project's error types: the bottom of the import graph (parallel/common/ is the layer every
other imports; it sits in parallel/ because that is the lowest of the project's packages).

Every bad input (a config key, a mesh, a data file, a checkpoint) is one of these errors, with a
message of one line that names the problem and the fix; the CLIs print it and exit 2. A run that
cannot go on is `RunFailed` (exit 4). The typed-config checks are in parallel/common/typed_config.py.
"""

from __future__ import annotations



class InputError(ValueError):
  """A bad input; the message is one line that names it and the fix."""


class ConfigError(InputError):
  """A bad configuration (key, value, mesh, model)."""


class DataError(InputError):
  """Bad data input (a file, a line, a tokenizer)."""


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used (a directory, a format, a model that does not match)."""


class RunFailed(Exception):
  """A run that cannot go on: it diverged, or a checkpoint could not be written. One line naming the
  step, the cause and the last good checkpoint; the CLIs exit with code 4."""


def divisors(n: int) -> str:
  """The sizes that divide `n`, in words: '1, 2, 4 or 8' (for messages that name what would fit)."""
  ds = [str(d) for d in range(1, n + 1) if n % d == 0]
  return ds[0] if len(ds) == 1 else f"{', '.join(ds[:-1])} or {ds[-1]}"


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)
