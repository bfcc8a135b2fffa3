"""Real ``transformers`` tokenizers built locally (no hub): a tiny byte-level BPE saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_WITH_BOS = "{{ bos_token }}" + CHATML


def bpe_tokenizer_dir(directory: str | Path, *, bos: bool = True, chat_template: str | None = None,
                      vocab_size: int = 400) -> Path:
  """A ``PreTrainedTokenizerFast`` trained on the embedded corpus, saved in ``directory``.

  Specials: ``<s>`` (BOS; ``tokenizer(text)`` prepends it when ``bos``), ``</s>`` (EOS), ``<pad>``,
  ``<|im_start|>`` and ``<|im_end|>``; ``chat_template`` is set when given.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  from jlora.train._data import EMBEDDED_CORPUS

  specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train([str(EMBEDDED_CORPUS)], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos:
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  if chat_template is not None:
    fast.chat_template = chat_template
  directory = Path(directory)
  fast.save_pretrained(directory)
  return directory
