"""Tokenizers the job uses: UTF-8 bytes (no files needed) or a local Hugging Face tokenizer.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``eos_id``, ``pad_id`` and ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
  """Ids 0..255 are UTF-8 bytes; 256 is end-of-sequence, 257 is padding.

  No files, no download: what the embedded demo and the presets use.
  """

  eos_id = 256
  pad_id = 257
  vocab_size = 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A ``transformers`` tokenizer loaded from a local directory (offline)."""

  def __init__(self, directory: str | Path):
    from transformers import AutoTokenizer

    self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    eos = self._tok.eos_token_id
    if eos is None:
      raise ValueError(
          f"The tokenizer in {directory} has no eos token; set data.tokenizer=bytes or add one.")
    self.eos_id = int(eos)
    pad = self._tok.pad_token_id
    self.pad_id = int(eos if pad is None else pad)
    self.vocab_size = len(self._tok)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False))

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str, model_dir: str | None):
  """``spec`` ``"bytes"``, a tokenizer dir, or ``""`` (the model dir's tokenizer, else bytes)."""
  if spec == "bytes":
    return ByteTokenizer()
  directory = spec or model_dir
  if directory is None:
    return ByteTokenizer()
  if not Path(directory).is_dir():
    raise ValueError(f"data.tokenizer={directory!r} is not a directory; use a local tokenizer dir or 'bytes'.")
  return HFTokenizer(directory)

