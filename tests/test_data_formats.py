"""Records as practitioners bring them: chat templates, role names, BOS, Alpaca/ShareGPT, long records."""

import json

import numpy as np
import pytest

from jlora.train import ByteTokenizer, DataConfig, DataError, encode_record, load_rows
from jlora.train._tokenizer import HFTokenizer, load_tokenizer
from tokenizer_doubles import CHATML, CHATML_WITH_BOS, bpe_tokenizer_dir

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the hat?"},
        {"role": "assistant", "content": "It is red."}, {"role": "user", "content": "And the kite?"},
        {"role": "assistant", "content": "It is blue."}]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
  return HFTokenizer(bpe_tokenizer_dir(tmp_path_factory.mktemp("chat"), chat_template=CHATML_WITH_BOS))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
  """A BPE tokenizer that prepends BOS and has no chat template."""
  return HFTokenizer(bpe_tokenizer_dir(tmp_path_factory.mktemp("plain")))


def _trained(tok, ids, mask):
  return tok._tok.decode([i for i, m in zip(ids, mask) if m])


def test_chat_records_use_the_tokenizers_chat_template(chat_tok):
  ids, mask = encode_record({"messages": CHAT}, "x", chat_tok)
  expected = chat_tok._tok.apply_chat_template(CHAT, tokenize=False)
  assert chat_tok._tok.decode(ids) == expected + "</s>"


def test_chat_template_trains_every_assistant_turn_and_nothing_else(chat_tok):
  ids, mask = encode_record({"messages": CHAT}, "x", chat_tok)
  assert _trained(chat_tok, ids, mask) == "It is red.<|im_end|>\nIt is blue.<|im_end|>\n</s>"


def test_chat_template_that_writes_bos_gets_exactly_one(chat_tok):
  ids, _ = encode_record({"messages": CHAT}, "x", chat_tok)
  bos = chat_tok._tok.bos_token_id
  assert ids[0] == bos and ids.count(bos) == 1


def test_chat_without_a_template_uses_jloras_format_after_bos(plain_tok):
  ids, mask = encode_record({"messages": CHAT[1:3]}, "x", plain_tok)
  assert ids[0] == plain_tok._tok.bos_token_id and ids.count(plain_tok._tok.bos_token_id) == 1
  assert plain_tok._tok.decode(ids[1:]).startswith("<|user|>\nWhat color")
  assert _trained(plain_tok, ids, mask) == "It is red.\n</s>"


@pytest.mark.parametrize("user, assistant", [("human", "gpt"), ("user", "model")])
def test_role_names_of_real_datasets_are_accepted(chat_tok, user, assistant):
  renamed = [{"role": user, "content": "hi"}, {"role": assistant, "content": "yo"}]
  standard = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  assert encode_record({"messages": renamed}, "x", chat_tok) == encode_record({"messages": standard}, "x", chat_tok)


@pytest.mark.parametrize("tok", [ByteTokenizer(), None])
def test_an_unknown_role_is_an_error_naming_the_accepted_ones(tok, chat_tok):
  record = {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  with pytest.raises(DataError, match=r"f\.jsonl:3.*'usr'.*assistant.*gpt.*human.*model.*system.*user"):
    encode_record(record, "f.jsonl:3", tok or chat_tok)


def test_text_records_get_the_bos_the_tokenizer_adds(plain_tok):
  ids, mask = encode_record({"text": "Mia had a hat."}, "x", plain_tok)
  assert ids == plain_tok._tok("Mia had a hat.").input_ids + [plain_tok.eos_id]
  assert ids[0] == plain_tok._tok.bos_token_id and mask[0] == 0  # BOS is given, not predicted


def test_a_tokenizer_without_bos_adds_none(tmp_path):
  tok = HFTokenizer(bpe_tokenizer_dir(tmp_path, bos=False))
  ids, _ = encode_record({"prompt": "Q: hi\n", "completion": "A."}, "x", tok)
  assert tok._tok.bos_token_id not in ids


def test_alpaca_records_mask_the_instruction_and_train_the_output():
  record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
  ids, mask = encode_record(record, "x", ByteTokenizer())
  prompt = ByteTokenizer().decode([i for i, m in zip(ids, mask) if not m])
  assert "Add the numbers." in prompt and "2 and 3" in prompt
  assert ByteTokenizer().decode([i for i, m in zip(ids, mask) if m]) == "5"


def test_sharegpt_records_are_chats():
  record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
  chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  assert encode_record(record, "x", ByteTokenizer()) == encode_record(chat, "x", ByteTokenizer())


def test_an_unrecognised_record_lists_the_formats_that_exist():
  with pytest.raises(DataError, match=r"x: .*question.*text.*prompt.*completion.*instruction.*output.*messages"
                                      r".*conversations"):
    encode_record({"question": "q", "answer": "a"}, "x", ByteTokenizer())


# ---------------------------------------------------------------------------- records longer than seq_len


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _records_of(rows):
  """Each packed record's ``(tokens, loss_mask)`` as text, by segment."""
  tok = ByteTokenizer()
  out = []
  for t, m, s in zip(rows.tokens, rows.loss_mask, rows.segment_ids):
    for seg in range(1, s.max() + 1):
      out.append((tok.decode(t[s == seg]), tok.decode(t[(s == seg) & (m == 1)])))
  return out


def test_truncation_defaults_to_truncate():
  assert DataConfig().truncation == "truncate"


@pytest.mark.parametrize("packing", [True, False])
def test_truncate_keeps_the_prompt_and_cuts_the_answers_tail(tmp_path, packing):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "abcd", "completion": "efghijkl"}, {"text": "xy"}])
  said = []
  rows = load_rows(path, ByteTokenizer(), seq_len=8, packing=packing, say=said.append)
  assert _records_of(rows)[0] == ("abcdefgh", "efgh")
  assert any("1 of 2 records" in s and "answer" in s for s in said)


@pytest.mark.parametrize("packing", [True, False])
def test_a_prompt_longer_than_seq_len_loses_its_head_not_its_answer(tmp_path, packing):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "0123456789abcdef", "completion": "XY"}] * 2)
  said = []
  rows = load_rows(path, ByteTokenizer(), seq_len=8, packing=packing, say=said.append)
  assert all(text.endswith("XY") and trained == "XY" for text, trained in _records_of(rows))
  assert rows.loss_mask.sum(axis=1).min() > 0
  assert any("2 of 2 records" in s and "prompt" in s for s in said)


def test_packed_records_never_straddle_two_rows(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}] * 3)
  rows = load_rows(path, ByteTokenizer(), seq_len=8)
  assert [r for r, _ in _records_of(rows)] == ["abcd"] * 3


def test_drop_leaves_long_records_out_and_says_so(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}, {"text": "x" * 20}])
  said = []
  rows = load_rows(path, ByteTokenizer(), seq_len=8, truncation="drop", say=said.append)
  assert [r for r, _ in _records_of(rows)] == ["abc"]
  assert any("dropped 1 of 2" in s for s in said)


def test_split_continues_a_long_record_in_the_next_row_and_counts_untrained_pieces(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "0123456789", "completion": "XY"}, {"text": "ab"}])
  said = []
  rows = load_rows(path, ByteTokenizer(), seq_len=8, packing=False, truncation="split", say=said.append)
  assert [r for r, _ in _records_of(rows)] == ["01234567", "89XY", "ab"]
  assert any("1 " in s and "no trained token" in s for s in said)


def test_no_record_with_a_trained_token_stops_with_the_fix(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "0123456789abcdef", "completion": "XY"}] * 3)
  with pytest.raises(DataError, match=r"data\.seq_len.*data\.truncation"):
    load_rows(path, ByteTokenizer(), seq_len=8, truncation="drop")


def test_unknown_truncation_is_an_error(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"text": "ab"}])
  with pytest.raises(DataError, match=r"drop.*truncate.*split"):
    load_rows(path, ByteTokenizer(), seq_len=8, truncation="cut")


# ---------------------------------------------------------------------------- tokenizer directories


def test_a_checkpoint_dir_without_tokenizer_files_names_the_cause_and_the_fix(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"no tokenizer files.*data\.tokenizer=DIR") as e:
    load_tokenizer("", str(tmp_path))
  assert "sentencepiece" not in str(e.value)


def test_prompts_to_continue_start_with_the_bos_training_records_had(plain_tok, monkeypatch):
  import jax.numpy as jnp

  import jlora.models
  from jlora.train._report import continue_prompts

  seen = []

  def generate(model, ids, max_new_tokens, **kwargs):
    seen.append(np.asarray(ids)[0].tolist())
    return jnp.concatenate([ids, jnp.full((ids.shape[0], max_new_tokens), plain_tok.eos_id, ids.dtype)], axis=1)

  monkeypatch.setattr(jlora.models, "generate", generate)
  assert continue_prompts(None, plain_tok, ["Mia had"], 2) == [""]
  assert seen == [plain_tok._tok("Mia had").input_ids]


def test_a_conversation_the_chat_template_rejects_is_one_data_error(tmp_path):
  no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
               "{% endif %}" + CHATML)
  tok = HFTokenizer(bpe_tokenizer_dir(tmp_path, chat_template=no_system))
  with pytest.raises(DataError, match=r"f\.jsonl:1: .*chat template rejects.*System role not supported"):
    encode_record({"messages": CHAT}, "f.jsonl:1", tok)
