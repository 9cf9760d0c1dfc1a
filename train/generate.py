"""Sample text from a model with MLA's latent KV cache (moe/decode.py).

  python -m train.generate (RUN_DIR | HF_DIR) --prompt "..." [--prompt "..." ...]
      [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--tokenizer byte|PATH] [--dtype D]

HF_DIR: a folder with config.json + safetensors (moe.hf.from_hf). RUN_DIR: a training run directory:
its newest checkpoint (train/core/checkpoint.py; master weights, in --dtype), and by default its tokenizer.
Each prompt is encoded as [BOS] + tokens (as training
documents start); several prompts run as one right-padded batch. Temperature 0 is greedy; top-p < 1
samples from the nucleus. Generation of a row stops after EOS. Prints each prompt followed by its
completion (special tokens dropped), one block per prompt.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from moe.decode import Generator
from parallel.common.errors import ConfigError, InputError
from train.core.model_io import load_any, tokenizer_of
from train.core.input_pipeline import load_tokenizer


def add_model_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model", metavar="RUN_DIR|HF_DIR",
                      help="HF folder (config.json + safetensors) or training run directory (newest checkpoint)")
  parser.add_argument("--tokenizer", default=None,
                      help="'byte' or the path of an HF tokenizer.json (default: the run's tokenizer; byte for HF_DIR)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="compute and parameter dtype (default float32)")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n")[0])
  add_model_args(parser)
  parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1: off)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 0:
      raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 0")
    tokenizer = load_tokenizer(tokenizer_of(args.model, args.tokenizer))
    model = load_any(args.model, args.dtype)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in args.prompt]
    top = max(max(p) for p in prompts)
    if top >= model.cfg.vocab_size:
      raise ConfigError(f"token id {top} from tokenizer {tokenizer.spec!r} is outside the model's vocab_size"
                        f" {model.cfg.vocab_size}; pass the model's --tokenizer")
    check_length(max(map(len, prompts)), args.max_new_tokens, model.cfg.max_position_embeddings)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  outputs = Generator(model).generate(prompts, args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id)
  for text, new in zip(args.prompt, outputs):
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    print(text + tokenizer.decode([t for t in new if t not in special]), flush=True)
  return 0


def check_length(prompt_len: int, max_new_tokens: int, max_positions: int) -> None:
  """ConfigError when the longest prompt (with BOS) and the new tokens would run past the positions
  the model was trained for (max_position_embeddings): RoPE beyond them is extrapolation."""
  if prompt_len + max_new_tokens <= max_positions:
    return
  if prompt_len >= max_positions:
    raise ConfigError(f"the longest prompt is {prompt_len} tokens (with BOS), and the model's max_position_embeddings"
                      f" is {max_positions}: shorten the prompt")
  raise ConfigError(f"the longest prompt ({prompt_len} tokens with BOS) + --max-new-tokens {max_new_tokens} ="
                    f" {prompt_len + max_new_tokens} positions, past the model's max_position_embeddings"
                    f" {max_positions}; use --max-new-tokens {max_positions - prompt_len} or less")


if __name__ == "__main__":
  sys.exit(main())
