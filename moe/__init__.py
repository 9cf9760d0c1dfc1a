"""DeepSeek-V2/V3 in Flax NNX. `moe.from_hf(path)` / `moe.to_hf(model, path)`: HF weights in and out."""


def __getattr__(name):  # lazy, so `import moe.config` stays light
  if name in ("from_hf", "to_hf"):
    from moe import hf

    return getattr(hf, name)
  raise AttributeError(f"module 'moe' has no attribute {name!r}")
