"""What the subcommands share: errors, loading a base model by preset name or directory, tokenizers."""

from __future__ import annotations

from pathlib import Path

from jlora.train import TOKENIZER_FILES, has_tokenizer

DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
  """A bad argument or input file; the message names the problem and the fix."""


def describe(doc: str) -> str:
  """A module docstring's second paragraph as ``--help`` text (RST literals unquoted)."""
  return doc.split("\n\n")[1].replace("``", "")


def _check_base_name(name: str) -> None:
  from jlora.train import presets

  if name not in presets() and not Path(name).expanduser().is_dir():
    raise CliError(f"{name!r} is neither a model preset ({', '.join(presets())}) nor a local checkpoint "
                   "directory; pass a directory holding config.json and model.safetensors.")


def load_base(name: str, dtype: str = "float32"):
  """``(model, checkpoint dir or None)`` for a preset name (``byte-stories``) or a local HF checkpoint dir."""
  from jlora.train import ModelSection, load_model

  _check_base_name(name)
  try:
    return load_model(ModelSection(name=name, dtype=dtype, remat="none"))
  except ValueError as e:
    raise CliError(str(e)) from None


def abstract_base(name: str):
  """``(model, checkpoint dir or None)`` like ``load_base``, built abstractly: config and shapes, no weights.

  What the arguments are checked against before the base (minutes for a large model) is loaded.
  """
  from flax import nnx

  from jlora.io import abstract_model
  from jlora.train import ModelSection, load_model, presets

  _check_base_name(name)
  try:
    if name in presets():
      return nnx.eval_shape(lambda: load_model(ModelSection(name=name, remat="none"))[0]), None
    return abstract_model(name), name
  except ValueError as e:
    raise CliError(str(e)) from None


def check_adapters(directories, base) -> None:
  """CliError naming the first adapter directory that cannot go on ``base`` (``jlora.io.check_adapter``)."""
  from jlora.io import check_adapter

  for directory in directories:
    try:
      check_adapter(directory, base)
    except ValueError as e:
      raise CliError(str(e)) from None


def tokenizer_for(model, model_dir: str | None, spec: str = ""):
  """``spec`` (``"bytes"`` or a tokenizer dir), else the checkpoint's tokenizer, else bytes where they fit.

  Presets, and checkpoints without tokenizer files whose vocabulary is the
  258 byte ids (the shipped base and models merged from it), use the byte
  tokenizer.
  """
  from jlora.train import ByteTokenizer, check_tokenizer_fits, load_tokenizer

  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  tokenizer = None
  if spec and spec != "bytes" and not Path(spec).expanduser().is_dir():
    raise CliError(f"--tokenizer {spec!r} is not a directory; pass a local tokenizer directory or 'bytes'.")
  try:
    if spec:
      tokenizer = load_tokenizer(spec, None)
    elif model_dir is None or has_tokenizer(model_dir):
      tokenizer = load_tokenizer("", model_dir)
  except (ValueError, OSError) as e:
    raise CliError(str(e)) from None
  if tokenizer is None and vocab == ByteTokenizer.vocab_size:
    tokenizer = ByteTokenizer()
  if tokenizer is not None:
    try:
      check_tokenizer_fits(tokenizer, model, "use the model's own tokenizer (--tokenizer DIR).")
    except ValueError as e:
      raise CliError(str(e)) from None
    return tokenizer
  raise CliError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR "
                 "(a directory with the model's tokenizer), or --tokenizer bytes for a byte-level model.")


def refuse_non_empty(directory: Path, what: str) -> None:
  """CliError unless ``directory`` is absent or an empty directory (nothing of the user's is replaced)."""
  if directory.exists() and not directory.is_dir():
    raise CliError(f"{what} {directory} is a file; pass a new directory path.")
  if directory.is_dir() and any(directory.iterdir()):
    raise CliError(f"{what} {directory} is not empty; choose a new directory or empty this one.")
