"""Tokenizers the job uses: UTF-8 bytes (no files needed) or a local Hugging Face tokenizer.

Both expose ``encode(text) -> list[int]`` (no special tokens), ``decode(ids) -> str``,
``eos_id``, ``pad_id``, ``vocab_size``, ``bos_ids`` (what the tokenizer puts
before a text of its own accord: ``[bos]`` or ``[]``) and ``chat_template``
(``None`` when there is none); an HF tokenizer with a chat template also has
``encode_chat(messages) -> (ids, loss_mask)``.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str | Path | None) -> bool:
  """Whether ``directory`` holds any of a Hugging Face tokenizer's files (``TOKENIZER_FILES``)."""
  return directory is not None and any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


class ByteTokenizer:
  """Ids 0..255 are UTF-8 bytes; 256 is end-of-sequence, 257 is padding.

  No files, no download: what the embedded demo and the presets use.
  """

  eos_id = 256
  pad_id = 257
  vocab_size = 258
  bos_ids: list[int] = []
  chat_template = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A ``transformers`` tokenizer loaded from a local directory (offline)."""

  def __init__(self, directory: str | Path):
    from transformers import AutoTokenizer

    if not has_tokenizer(directory):
      raise ValueError(
          f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): it is a checkpoint saved "
          "without its tokenizer. Set data.tokenizer=DIR to a directory that holds the model's tokenizer "
          "(e.g. the original checkpoint's), or data.tokenizer=bytes for a byte-level model.")
    self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    eos = self._tok.eos_token_id
    if eos is None:
      raise ValueError(
          f"The tokenizer in {directory} has no eos token; set data.tokenizer=bytes or add one.")
    self.eos_id = int(eos)
    pad = self._tok.pad_token_id
    self.pad_id = int(eos if pad is None else pad)
    self.vocab_size = len(self._tok)
    self.bos_ids = _added_prefix(self._tok)
    self.chat_template = getattr(self._tok, "chat_template", None) or None

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False))

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of ``messages`` rendered by the chat template; assistant turns are trained.

    A turn's span is found in characters: the conversation up to the turn
    rendered with the generation prompt (where the answer starts) and up to
    its end (where the next turn starts) must both be prefixes of the whole
    rendering; tokens whose first character lies in a span are trained.
    Character offsets, not token counts of the prefixes, so BPE merges
    across a boundary cannot shift the mask. The template writes any BOS
    itself (what ``apply_chat_template`` does), so none is added.
    """
    def render(ms, gen):
      try:
        return self._tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
      except Exception as e:  # jinja's TemplateError, or raise_exception() in the template (e.g. no system role)
        raise ValueError(f"the tokenizer's chat template rejects the conversation ({e})") from None

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      start, end = render(messages[:i], True), render(messages[:i + 1], False)
      if not (text.startswith(start) and text.startswith(end)) or len(end) < len(start):
        raise ValueError("the tokenizer's chat template renders a conversation's beginning differently from "
                         "the whole conversation, so the assistant turns cannot be located")
      spans.append((len(start), len(end)))
    enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _added_prefix(tok) -> list[int]:
  """The ids ``tok(text)`` puts before ``text``'s own tokens (its BOS, if it adds one)."""
  probe = "a"
  plain = tok.encode(probe, add_special_tokens=False)
  full = tok.encode(probe, add_special_tokens=True)
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      return list(full[:start])
  return []


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

