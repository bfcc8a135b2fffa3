"""Every colab/ notebook runs top to bottom on CPU, on the shipped base as users run it, steps cut to a handful.

The quickstart also runs on a tiny Llama checkpoint directory written here
(random weights, a byte-level BPE tokenizer trained on the embedded corpus),
the path a hub model takes.
"""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COLAB = Path(__file__).parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
OVERRIDES = {
    "quickstart.ipynb": 'KIND = "moslora"\nSTEPS = 6\nSEQ_LEN = 32\n',
    "wlora.ipynb": "STEPS = 4\nSEQ_LEN = 32\n",
    "sharding.ipynb": "SIMULATE_DEVICES = 8\nFSDP = 2\nTENSOR = 2\nSTEPS = 4\nSEQ_LEN = 32\n",
    "tpu.ipynb": "MODEL = 'byte-stories'\nSIMULATE_DEVICES = 8\nFSDP = 8\nBATCH = 8\nSTEPS = 2\nSEQ_LEN = 32\n",
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
  """A Llama checkpoint dir (config, safetensors, tokenizer) of a few thousand params."""
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

  from jlora.train._data import EMBEDDED_CORPUS

  out = tmp_path_factory.mktemp("tiny-llama")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train([str(EMBEDDED_CORPUS)], trainer)
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(out)
  torch.manual_seed(0)
  config = LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)
  LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
  return out


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_on_the_shipped_base(notebook, tmp_path):
  _run(notebook, tmp_path, model=None)


def test_quickstart_runs_on_a_checkpoint_directory(tiny_checkpoint, tmp_path):
  _run(COLAB / "quickstart.ipynb", tmp_path, model=str(tiny_checkpoint))


def _run(notebook, tmp_path, model):
  import nbformat
  from nbclient import NotebookClient

  nb = nbformat.read(notebook, as_version=4)
  (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  params.source += (f"\n# CI overrides\nOUTPUT_DIR = {str(tmp_path / 'runs')!r}\n"
                    + (f"MODEL = {model!r}\n" if model else "") + OVERRIDES.get(notebook.name, ""))
  env_before = dict(os.environ)
  os.environ["JAX_PLATFORMS"] = "cpu"  # the kernel inherits it
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_before)
