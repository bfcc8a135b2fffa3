"""Training data: read records, tokenize with a loss mask, fit to seq_len, pack, shuffle, batch.

Records come from ``.jsonl`` / ``.json`` / ``.txt`` / ``.parquet`` files or a
``datasets`` directory (``save_to_disk``; needs the optional ``datasets``
package). A record is one of

- text: ``{"text": ...}`` (``data.text_field``); every token is trained;
- instruction: ``{"prompt": ..., "completion": ...}`` or Alpaca's
  ``{"instruction": ..., "input": ..., "output": ...}`` (in Alpaca's prompt);
  prompt tokens are masked out of the loss;
- chat: ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ShareGPT's
  ``{"conversations": [{"from": ..., "value": ...}, ...]}``; roles ``system``,
  ``user`` / ``human``, ``assistant`` / ``gpt`` / ``model``; rendered by the
  tokenizer's chat template when it has one, and only assistant turns are trained.

Each record becomes ids (the tokenizer's BOS first, if it adds one; EOS last)
plus a 0/1 loss mask over the same positions. Records longer than ``seq_len``
are truncated, dropped or split (``fit_records``). Packing fills rows of
``seq_len`` with whole records in order (the last row padded), with segment ids
that keep the records apart; without packing each record is one row.
Batches are drawn with ``grain``: a seeded permutation per epoch, random access
by batch index, so the iterator's whole state is one integer (checkpointed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import numpy as np

EMBEDDED_CORPUS = Path(__file__).parent / "data" / "tiny_stories.jsonl"
EMBEDDED_QA = Path(__file__).parent / "data" / "qa.jsonl"  # its Q/A records: the default job's data


class DataError(ValueError):
  """A data file that cannot be read, or a record without the fields its format needs."""


@dataclasses.dataclass(frozen=True)
class Rows:
  """Packed sequences: ``tokens``, ``loss_mask``, ``attention_mask``, ``segment_ids``, each ``[N, seq_len]``.

  ``loss_mask[n, t] == 1`` when token ``t`` is a training target (predicted
  from position ``t - 1``); ``attention_mask`` is 0 on padding;
  ``segment_ids`` number the records (pieces of records) in a row 1, 2, ...
  and are 0 on padding, so attention and positions restart at each record.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray
  segment_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  def take(self, index) -> "Rows":
    return Rows(*(a[index] for a in self.arrays()))

  def arrays(self) -> tuple[np.ndarray, ...]:
    return (self.tokens, self.loss_mask, self.attention_mask, self.segment_ids)

  def batch(self) -> dict[str, np.ndarray]:
    """The rows as a batch dict (the keys the train and eval steps read)."""
    return {"tokens": self.tokens, "loss_mask": self.loss_mask, "attention_mask": self.attention_mask,
            "segment_ids": self.segment_ids}


# ---------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[tuple[Any, str]]:
  """``(record, where)`` pairs; ``where`` (e.g. ``"data.jsonl:12"``) locates errors."""
  path = Path(path)
  if path.is_dir():
    return _read_saved_dataset(path)
  if not path.is_file():
    raise DataError(f"Data path {str(path)!r} does not exist; point data.path at a file or a saved dataset.")
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    records = []
    with path.open("rb") as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); a "
                          ".jsonl file must be UTF-8 JSON, one object per line. Is it a binary file?") from None
        if not line.strip():
          continue
        try:
          records.append((json.loads(line), f"{path.name}:{lineno}"))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); each line must be one JSON object.") from e
    return records
  if suffix == ".json":
    try:
      data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}).") from e
    if not isinstance(data, list):
      raise DataError(f"{path}: a .json data file must hold a list of records.")
    return [(r, f"{path.name}[{i}]") for i, r in enumerate(data)]
  if suffix in (".txt", ".text", ".md"):
    return [({"text": _read_text(path)}, path.name)]
  if suffix == ".parquet":
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [(r, f"{path.name} row {i}") for i, r in enumerate(rows)]
  raise DataError(f"Unsupported data file {path.name!r}: use .jsonl, .json, .txt, .parquet or a saved dataset dir.")


def _read_text(path: Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text (byte offset {e.start}); data files must be UTF-8. Is it a "
                    "binary file?") from None


def _read_saved_dataset(path: Path) -> list[tuple[Any, str]]:
  try:
    import datasets
  except ImportError as e:
    raise DataError(
        f"{path} is a directory: reading a saved dataset needs `pip install datasets`, "
        "or export it to .jsonl / .parquet.") from e
  ds = datasets.load_from_disk(str(path))
  if isinstance(ds, datasets.DatasetDict):
    if "train" not in ds:
      raise DataError(f"{path} holds splits {list(ds)}; point data.path at one split's directory.")
    ds = ds["train"]
  return [(r, f"{path.name} row {i}") for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------- encoding

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant"}  # the role names datasets use -> the chat template's
FORMATS = ("text: {\"text\": ...} (data.text_field)", "instruction: {\"prompt\": ..., \"completion\": ...}",
           "Alpaca: {\"instruction\": ..., \"input\": ... (optional), \"output\": ...}",
           "chat: {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}",
           "ShareGPT: {\"conversations\": [{\"from\": ..., \"value\": ...}, ...]}")
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def record_kind(record: Any, fmt: str, text_field: str) -> str:
  """``"text"``, ``"instruction"`` or ``"chat"``: ``fmt`` itself unless ``"auto"``; ``""`` when no format fits."""
  if fmt != "auto":
    return fmt
  if isinstance(record, dict):
    if "messages" in record or "conversations" in record:
      return "chat"
    if ("prompt" in record and "completion" in record) or ("instruction" in record and "output" in record):
      return "instruction"
    if text_field in record:
      return "text"
  return ""


def encode_record(record: Any, where: str, tokenizer, fmt: str = "auto",
                  text_field: str = "text") -> tuple[list[int], list[int]]:
  """``(ids, loss_mask)`` for one record: the tokenizer's BOS first (given, not trained), EOS last (trained).

  Chat records use the tokenizer's chat template when it has one (it writes
  any BOS itself), else jlora's ``<|role|>`` lines.
  """
  if not isinstance(record, dict):
    raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
  kind = record_kind(record, fmt, text_field)
  bos = list(getattr(tokenizer, "bos_ids", []))
  if kind == "text":
    text = _field(record, text_field, where, f"(a text record; set data.text_field if it is named otherwise)")
    ids = tokenizer.encode(text)
    return bos + ids + [tokenizer.eos_id], [0] * len(bos) + [1] * (len(ids) + 1)
  if kind == "instruction":
    prompt_text, answer_text = _instruction(record, where)
    prompt, answer = tokenizer.encode(prompt_text), tokenizer.encode(answer_text)
    return bos + prompt + answer + [tokenizer.eos_id], [0] * (len(bos) + len(prompt)) + [1] * (len(answer) + 1)
  if kind == "chat":
    return _encode_chat(_messages(record, where), where, tokenizer, bos)
  have = ", ".join(sorted(map(str, record))) or "none"
  raise DataError(f"{where}: no field {text_field!r} (data.text_field) nor the fields of another format; the "
                  f"record has fields: {have}. The formats are: " + "; ".join(FORMATS)
                  + ". Rename the fields, or set data.format / data.text_field.")


def _instruction(record: dict, where: str) -> tuple[str, str]:
  """``(prompt, answer)`` of an instruction record: ``prompt``/``completion``, or Alpaca's fields in its prompt."""
  if "instruction" in record and "prompt" not in record:
    instruction = _field(record, "instruction", where, "(an Alpaca record)")
    context = record.get("input") or ""
    if not isinstance(context, str):
      raise DataError(f"{where}: Alpaca field 'input' must be a string, got {type(context).__name__}.")
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if context else "",
        instruction=instruction, input=f"### Input:\n{context}\n\n" if context else "")
    return prompt, _field(record, "output", where, "(an Alpaca record)")
  return (_field(record, "prompt", where, "(an instruction record)"),
          _field(record, "completion", where, "(an instruction record)"))


def _messages(record: dict, where: str) -> list[dict[str, str]]:
  """The record's turns as ``[{"role", "content"}]`` with standard roles (ShareGPT's ``from``/``value`` too)."""
  sharegpt = "messages" not in record
  key, role_key, text_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
  turns = record.get(key)
  if not isinstance(turns, list) or not turns:
    raise DataError(f"{where}: {key!r} must be a non-empty list of {{{role_key}, {text_key}}} objects.")
  out = []
  for i, m in enumerate(turns):
    if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
      raise DataError(f"{where}: {key}[{i}] must be an object with string {role_key!r} and {text_key!r}.")
    role = ROLES.get(m[role_key])
    if role is None:
      raise DataError(f"{where}: {key}[{i}] has the unknown role {m[role_key]!r}; the accepted roles are "
                      f"{', '.join(sorted(ROLES))} (human = user; gpt, model = assistant).")
    out.append({"role": role, "content": m[text_key]})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on.")
  return out


def _encode_chat(messages: list[dict[str, str]], where: str, tokenizer, bos: list[int]):
  if getattr(tokenizer, "chat_template", None):
    try:
      ids, mask = tokenizer.encode_chat(messages)
    except ValueError as e:
      raise DataError(f"{where}: {e}; give the records as prompt/completion instead.") from None
    if not ids or ids[-1] != tokenizer.eos_id:
      ids, mask = ids + [tokenizer.eos_id], mask + [1]
    return ids, mask
  ids, mask = list(bos), [0] * len(bos)
  for m in messages:
    header = tokenizer.encode(f"<|{m['role']}|>\n")
    body = tokenizer.encode(m["content"] + "\n")
    ids += header + body
    mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
  return ids + [tokenizer.eos_id], mask + [1]


def _field(record: dict, name: str, where: str, what: str) -> str:
  value = record.get(name)
  if not isinstance(value, str):
    have = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(f"{where}: missing string field {name!r} {what}; the record has fields: {have}.")
  return value


# ---------------------------------------------------------------------------- records longer than seq_len

TRUNCATIONS = ("drop", "truncate", "split")


def fit_records(examples: list[tuple[list[int], list[int]]], seq_len: int, truncation: str = "truncate",
                source: str = "the data") -> tuple[list[tuple[list[int], list[int]]], list[str]]:
  """``(examples no longer than seq_len, sentences saying what was cut)`` for records over ``seq_len`` tokens.

  ``truncate`` keeps the prompt (the tokens before the first trained one) and
  cuts the answer's tail; a prompt that alone fills ``seq_len`` loses its head
  instead, keeping its last ``max(seq_len // 2, seq_len - answer)`` tokens, so
  the answer still trains after its prompt's end. ``drop`` leaves such
  records out; ``split`` cuts them into pieces of ``seq_len`` (a later piece
  trains without its prompt; pieces without a trained token are counted).
  Raises DataError when no record keeps a trained token.
  """
  if truncation not in TRUNCATIONS:
    raise DataError(f"data.truncation={truncation!r}; use one of {', '.join(TRUNCATIONS)}.")
  out, said, tails, heads, untrained = [], [], 0, 0, 0
  long = sum(len(ids) > seq_len for ids, _ in examples)
  for ids, mask in examples:
    if len(ids) <= seq_len:
      out.append((ids, mask))
    elif truncation == "split":
      pieces = [(ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
      untrained += sum(not any(m) for _, m in pieces)
      out += pieces
    elif truncation == "truncate":
      first = mask.index(1) if 1 in mask else len(mask)
      if first < seq_len:
        tails += 1
        out.append((ids[:seq_len], mask[:seq_len]))
      else:
        heads += 1
        keep = max(seq_len // 2, seq_len - (len(ids) - first))
        out.append((ids[first - keep:first - keep + seq_len], mask[first - keep:first - keep + seq_len]))
  total = len(examples)
  if long and truncation == "truncate":
    said.append(f"{source}: {long} of {total} records are longer than data.seq_len={seq_len} tokens: "
                f"{tails} had the answer's tail cut, {heads} the prompt's head (their prompt alone filled "
                "the sequence).")
  elif long and truncation == "drop":
    said.append(f"{source}: dropped {long} of {total} records longer than data.seq_len={seq_len} tokens.")
  elif long:
    said.append(f"{source}: split {long} of {total} records longer than data.seq_len={seq_len} tokens into "
                f"pieces; {untrained} pieces have no trained token (prompt only).")
  if not any(any(m) for _, m in out):
    raise DataError(f"{source}: no record keeps a trained token within data.seq_len={seq_len} tokens "
                    f"(data.truncation={truncation}, {long} of {total} records are longer), so there is nothing "
                    "to learn; raise data.seq_len, shorten the prompts, or set data.truncation=truncate (keeps "
                    "each answer, cutting the prompt's head).")
  return out, said


# ---------------------------------------------------------------------------- packing


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
         packing: bool = True, whole: bool = False) -> Rows:
  """Rows of ``seq_len`` tokens: records packed into rows, or one record per row.

  Each record keeps its own segment id, so a packed row's records never see
  (or predict) each other. ``whole`` packs records in order without cutting
  any (a record that does not fit the row's rest starts the next row; each
  must be at most ``seq_len`` long, see ``fit_records``); else one stream is
  cut into full rows, and a record cut by a row boundary continues in the
  next row as a fresh segment.
  """
  if packing and whole:
    chunks, row = [], []
    for e in examples:
      if sum(len(ids) for ids, _ in row) + len(e[0]) > seq_len and row:
        chunks.append(_joined(row))
        row = []
      row.append(e)
    if row:
      chunks.append(_joined(row))
  elif packing:
    ids = np.fromiter((t for e, _ in examples for t in e), np.int32)
    mask = np.fromiter((m for _, ms in examples for m in ms), np.int32)
    record = np.repeat(np.arange(len(examples), dtype=np.int32), [len(e) for e, _ in examples])
    chunks = [(ids[i:i + seq_len], mask[i:i + seq_len], record[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
  else:
    chunks = [(np.asarray(e[:seq_len], np.int32), np.asarray(m[:seq_len], np.int32),
               np.zeros(min(len(e), seq_len), np.int32)) for e, m in examples]
  n = len(chunks)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((n, seq_len), np.int32)
  attention = np.zeros((n, seq_len), np.int32)
  segments = np.zeros((n, seq_len), np.int32)
  for row, (t, m, r) in enumerate(chunks):
    tokens[row, :len(t)] = t
    loss_mask[row, :len(m)] = m
    attention[row, :len(t)] = 1
    segments[row, :len(r)] = r - r[0] + 1 if len(r) else r
  loss_mask[:, 0] = 0  # nothing predicts the first token of a row
  return Rows(tokens, loss_mask, attention, segments)


def _joined(records: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One row's ``(ids, loss mask, record index)`` of whole records."""
  return (np.asarray([t for ids, _ in records for t in ids], np.int32),
          np.asarray([m for _, ms in records for m in ms], np.int32),
          np.repeat(np.arange(len(records), dtype=np.int32), [len(ids) for ids, _ in records]))


def segment_bound(segment_ids: np.ndarray) -> int:
  """Records per row to make room for: the most runs of equal ids in a row of ``segment_ids [N, T]``.

  Trailing padding counts as a run. Rounded up to a power of two, so data of
  a similar shape compiles the same step. A model's ``max_segments`` takes
  it: cuDNN's packed attention sizes its buffers by it (``AttentionMask``).
  """
  if segment_ids.size == 0:
    return 1
  runs = 1 + np.count_nonzero(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)
  return 1 << int(runs.max() - 1).bit_length()


def load_rows(path: str | Path, tokenizer, seq_len: int, fmt: str = "auto", text_field: str = "text",
              packing: bool = True, truncation: str = "truncate", say: Callable[[str], None] | None = None) -> Rows:
  """Read, validate and pack one data source (every record checked before any compute).

  Records longer than ``seq_len`` are handled by ``truncation``
  (``fit_records``); ``say`` gets one sentence on what was cut, if anything.
  Packed rows keep every record whole unless ``truncation="split"``.
  """
  records = read_records(path)
  if not records:
    raise DataError(f"{path} holds no records.")
  examples = [encode_record(r, where, tokenizer, fmt, text_field) for r, where in records]
  examples, said = fit_records(examples, seq_len, truncation, str(path))
  for sentence in said:
    (say or print)(sentence)
  return pack(examples, seq_len, tokenizer.pad_id, packing, whole=truncation != "split")


def check_vocab(rows: Rows, vocab_size: int, source: str) -> None:
  """Every token id of ``rows`` must be a row of the model's embedding (``< vocab_size``)."""
  if rows.tokens.size and (rows.tokens.min() < 0 or rows.tokens.max() >= vocab_size):
    bad = int(rows.tokens.max()) if rows.tokens.max() >= vocab_size else int(rows.tokens.min())
    raise DataError(f"{source}: token id {bad} is outside the model's vocabulary [0, {vocab_size}); the "
                    "tokenizer does not belong to this model (use data.tokenizer='' for the model's own).")


def split_rows(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows]:
  """A seeded ``(train, held_out)`` split of rows; ``held_out`` is empty when the fraction is 0."""
  n_eval = int(round(len(rows) * eval_fraction))
  if eval_fraction > 0:
    n_eval = max(n_eval, 1)
  order = np.random.default_rng(seed).permutation(len(rows))
  return rows.take(np.sort(order[n_eval:])), rows.take(np.sort(order[:n_eval]))


# ---------------------------------------------------------------------------- batching


class BatchStream:
  """Batches of ``batch_size`` rows, reshuffled every epoch, addressed by a step index.

  ``state()`` / ``restore(state)`` give and take the position; a restored
  stream yields exactly the batches the original would have yielded next.
  ``local`` (a slice of ``range(batch_size)``) makes it yield only those rows
  of each global batch: a process of a multi-host job gathers just its own
  share, and the shares of all processes make up the one global batch.
  """

  def __init__(self, rows: Rows, batch_size: int, seed: int, shuffle: bool = True, local: slice = slice(None)):
    if len(rows) < batch_size:
      raise DataError(
          f"The training data packs into {len(rows)} sequences of data.seq_len tokens, fewer than "
          f"batch_size={batch_size}; add data, or lower batch_size or data.seq_len.")
    self.rows = rows
    self.batch_size = batch_size
    ds = grain.MapDataset.range(len(rows))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    self._indices = ds.repeat(None).batch(batch_size, drop_remainder=True)
    self.local = local
    self.position = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.position)
    self.position += 1
    return batch

  def batch_at(self, index: int) -> dict[str, np.ndarray]:
    return self.rows.take(np.asarray(self._indices[index])[self.local]).batch()

  def state(self) -> dict[str, int]:
    return {"position": int(self.position)}

  def restore(self, state: dict[str, int]) -> None:
    self.position = int(state["position"])


def eval_batches(rows: Rows, batch_size: int, limit: int = 0) -> list[dict[str, np.ndarray]]:
  """Held-out rows in order, in batches of ``batch_size`` (the last one padded with loss-free rows)."""
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows.take(slice(start, start + batch_size))
    pad = batch_size - len(chunk)
    if pad:
      chunk = Rows(*(np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in chunk.arrays()))
    out.append(chunk.batch())
    if limit and len(out) >= limit:
      break
  return out
