"""``jlora generate MODEL --prompt TEXT``: continue prompts with a base model and optional adapters.

``MODEL`` is a local HF checkpoint directory or a preset name
(``byte-stories``, the base shipped with jlora). The tokenizer is the
checkpoint's own (its tokenizer files); the shipped base and checkpoints
merged from it use the byte tokenizer. Every ``--adapter`` (a PEFT adapter
directory) is loaded and all are active together (their deltas add).
Greedy by default; ``--temperature`` and ``--top-p`` sample.
"""

from __future__ import annotations

import math

from jlora._cli._common import DTYPES, CliError, abstract_base, check_adapters, describe, load_base, tokenizer_for


def add_parser(sub) -> None:
  p = sub.add_parser("generate", help="continue prompts with a model (and adapters)",
                     description=describe(__doc__))
  p.add_argument("model", metavar="MODEL", help="checkpoint directory or preset name (byte-stories)")
  p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
  p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                 help="PEFT adapter directory to apply (repeatable; all are active)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", default="", help="a tokenizer directory, or 'bytes' (default: the model's)")
  p.add_argument("--dtype", choices=DTYPES, default="float32")
  p.set_defaults(run=run)


def run(args) -> int:
  from jlora.io import load_peft
  from jlora.nn import set_adapter
  from jlora.train import continue_prompts, enable_compile_cache

  if args.max_new_tokens < 1:
    raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
  if not 0.0 <= args.temperature < math.inf:
    raise CliError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}.")
  if not 0.0 < args.top_p <= 1.0:
    raise CliError(f"need 0 < --top-p <= 1, got {args.top_p}.")
  base, model_dir = abstract_base(args.model)  # every argument is checked before the weights are loaded
  tokenizer = tokenizer_for(base, model_dir, args.tokenizer)
  if any(not tokenizer.encode(p) for p in args.prompt):
    raise CliError("--prompt is empty; pass some text to continue.")
  check_adapters(args.adapter, base)
  enable_compile_cache()  # a second generation of the same shapes loads its programs (GPU/TPU)
  model, _ = load_base(args.model, args.dtype)
  names = [f"adapter{i}" for i in range(len(args.adapter))]
  for name, directory in zip(names, args.adapter):
    try:
      load_peft(model, directory, adapter_name=name)
    except ValueError as e:
      raise CliError(str(e)) from None
  if names:
    set_adapter(model, names)
  model.eval()
  texts = continue_prompts(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                           args.seed)
  for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
    print(("---\n" if i else "") + prompt + text)
  return 0
