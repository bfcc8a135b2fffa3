"""jlora: LoRA fine-tuning the JAX way.

Adapters are Flax NNX modules whose parameters form their own pytree, apart
from the frozen base model; merging is a pure function on those pytrees.
"""

from jlora.nn import (
    ADAPTER_STATE,
    LoraConfig,
    LoraLayer,
    LoraParam,
    MoSLoraConfig,
    UpstreamLoraParam,
    WLoraConfig,
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    adapter_state,
    delete_adapter,
    disable_adapters,
    get_peft_model,
    load_adapter_state,
    lora_layers,
    mark_stacked,
    merge,
    merge_adapter,
    merge_and_unload,
    peft_config,
    per_sample_adapters,
    register_lora_layer,
    set_adapter,
    split_adapter,
    unload,
    unmerge,
    unmerge_adapter,
)
from jlora._api import get_peft_model  # noqa: F811  (also takes PEFT dirs as WLoRA upstreams)
from jlora.io import load_peft, save_peft
from jlora.train import adapter_optimizer, trainable_mask
from jlora.train import TrainConfig, train  # noqa: E402  (`jlora.train` is the function; use `from jlora.train import ...` for the package)
from jlora.io import from_pretrained, save_pretrained
from jlora.models import generate

__version__ = "0.1.0"
