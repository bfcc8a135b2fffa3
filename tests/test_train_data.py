"""Training data: reading, loss masks, packing, deterministic resumable batches, record errors."""

import json

import numpy as np
import pytest

from jlora.train import BatchStream, ByteTokenizer, DataError, encode_record, load_rows, pack, read_records
from jlora.train._data import EMBEDDED_CORPUS, split_rows

TOK = ByteTokenizer()


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_text_record_trains_every_token_and_ends_in_eos():
  ids, mask = encode_record({"text": "hi"}, "x", TOK)
  assert ids == [ord("h"), ord("i"), TOK.eos_id] and mask == [1, 1, 1]


def test_instruction_prompt_is_masked_out_of_the_loss():
  ids, mask = encode_record({"prompt": "ab", "completion": "c"}, "x", TOK)
  assert ids == [97, 98, 99, TOK.eos_id] and mask == [0, 0, 1, 1]


def test_chat_trains_only_assistant_turns():
  record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  ids, mask = encode_record(record, "x", TOK)
  text = TOK.decode([i for i, m in zip(ids, mask) if m])
  assert text == "a\n"


def test_packing_cuts_one_stream_into_full_rows():
  rows = pack([([1, 2, 3], [1, 1, 1]), ([4, 5, 6], [0, 1, 1])], seq_len=4, pad_id=0)
  np.testing.assert_array_equal(rows.tokens, [[1, 2, 3, 4], [5, 6, 0, 0]])
  np.testing.assert_array_equal(rows.loss_mask, [[0, 1, 1, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(rows.attention_mask, [[1, 1, 1, 1], [1, 1, 0, 0]])


def test_without_packing_each_record_is_one_padded_row():
  rows = pack([([1, 2], [1, 1]), ([3], [1])], seq_len=3, pad_id=9, packing=False)
  np.testing.assert_array_equal(rows.tokens, [[1, 2, 9], [3, 9, 9]])


def test_malformed_jsonl_line_is_named(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(DataError, match=r"d\.jsonl:2"):
    read_records(path)


def test_record_missing_its_field_is_named_with_line(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
  with pytest.raises(DataError, match=r"d\.jsonl:3.*'text'.*body"):
    load_rows(path, TOK, seq_len=8)


def test_text_file_and_parquet_read_as_text_records(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  (tmp_path / "a.txt").write_text("hello")
  pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "b.parquet")
  assert [r for r, _ in read_records(tmp_path / "a.txt")] == [{"text": "hello"}]
  assert [r for r, _ in read_records(tmp_path / "b.parquet")] == [{"text": "x"}, {"text": "y"}]


def test_unsupported_file_type_is_an_error(tmp_path):
  (tmp_path / "d.csv").write_text("a,b\n")
  with pytest.raises(DataError, match="Unsupported"):
    read_records(tmp_path / "d.csv")


def _rows(n=10, seq_len=3):
  return pack([([i] * seq_len, [1] * seq_len) for i in range(n)], seq_len, pad_id=0, packing=False)


def test_batches_are_deterministic_for_a_seed_and_differ_across_seeds():
  a = [next(BatchStream(_rows(), 2, seed=1))["tokens"][:, 0] for _ in range(2)]
  firsts = lambda seed: np.concatenate([b["tokens"][:, 0] for b, _ in zip(BatchStream(_rows(), 2, seed), range(5))])
  np.testing.assert_array_equal(a[0], a[1])
  assert sorted(firsts(1)) == list(range(10)) and not np.array_equal(firsts(1), firsts(2))


def test_every_epoch_is_a_fresh_permutation():
  stream = BatchStream(_rows(), 5, seed=0)
  epochs = [np.concatenate([next(stream)["tokens"][:, 0] for _ in range(2)]) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
  assert not np.array_equal(epochs[0], epochs[1])


def test_restored_stream_continues_exactly():
  a = BatchStream(_rows(), 3, seed=4)
  for _ in range(5):
    next(a)
  b = BatchStream(_rows(), 3, seed=4)
  b.restore(a.state())
  for _ in range(4):
    np.testing.assert_array_equal(next(a)["tokens"], next(b)["tokens"])


def test_too_little_data_for_one_batch_is_an_error():
  with pytest.raises(DataError, match="batch_size"):
    BatchStream(_rows(n=2), 4, seed=0)


def test_split_holds_out_a_disjoint_fraction():
  train, held = split_rows(_rows(n=10), 0.2, seed=0)
  assert len(held) == 2 and len(train) == 8
  assert not set(held.tokens[:, 0]) & set(train.tokens[:, 0])


def test_embedded_corpus_is_small_and_mixes_text_and_instructions():
  records = [r for r, _ in read_records(EMBEDDED_CORPUS)]
  assert EMBEDDED_CORPUS.stat().st_size < 400_000
  assert any("text" in r for r in records) and any("prompt" in r for r in records)


def test_a_directory_needs_the_datasets_package(tmp_path):
  try:
    import datasets  # noqa: F401
  except ImportError:
    with pytest.raises(DataError, match="pip install datasets"):
      read_records(tmp_path)
  else:
    with pytest.raises(Exception):
      read_records(tmp_path)  # an empty directory is no saved dataset
