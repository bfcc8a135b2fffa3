"""Checkpoint I/O: Hugging Face safetensors directories."""

from jlora.io._adapter_check import abstract_model, check_adapter

from jlora.io._hf import from_pretrained, read_weights, save_pretrained
from jlora.io._peft_load import hotswap_adapter, load_peft, read_adapter
from jlora.io._peft_save import save_peft
