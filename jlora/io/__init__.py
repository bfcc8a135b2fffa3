"""Checkpoint I/O: Hugging Face safetensors directories."""

from jlora.io._adapter_check import abstract_model, check_adapter
from jlora.io._files import fresh_dir
from jlora.io._hf import from_pretrained, read_weights, save_pretrained
from jlora.io._inject_dirs import get_peft_model
from jlora.io._peft_check import LORA_FACTOR_SUFFIXES
from jlora.io._peft_config import CONFIG_NAME, from_peft_dict, read_json
from jlora.io._peft_load import WEIGHTS_NAME, hotswap_adapter, load_peft, read_adapter
from jlora.io._peft_save import save_peft
from jlora.io._safetensors import describe as describe_safetensors
from jlora.io._safetensors import read as read_safetensors
from jlora.io._safetensors import write as write_safetensors
