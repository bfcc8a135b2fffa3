"""Adapter math, adapter layers and the layer registry (no models, I/O or training)."""

from jlora.nn._adapters import LoraAdapter, WLoraAdapter, delta_weight
from jlora.nn._builtin_layers import LoraConv, LoraEinsum, LoraEmbed, LoraLinear, LoraLinearGeneral
from jlora.nn._config import LoraConfig, MoSLoraConfig, WLoraConfig, lora_scaling
from jlora.nn._dora import DoraAdapter
from jlora.nn._hotswap import hotswap_factors
from jlora.nn._inject import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    get_peft_model,
    lora_layers,
    peft_config,
    per_sample_adapters,
    set_adapter,
)
from jlora.nn._fused import MATMUL_MODES, lora_matmul, low_rank_grads
from jlora.nn._layer import LoraLayer
from jlora.nn._matmul import lora_projections, set_lora_matmul
from jlora.nn._modules_to_save import ModulesToSaveLayer
from jlora.nn._merge import merge, merge_adapter, merge_and_unload, unload, unmerge, unmerge_adapter
from jlora.nn._registry import lora_layer_type, register_lora_layer, registered_types, unregister_lora_layer
from jlora.nn._state import ADAPTER_STATE, adapter_state, load_adapter_state, split_adapter
from jlora.nn._targets import mark_stacked
from jlora.nn._variables import TRAINABLE, LoraBuffer, LoraParam, LoraRngKey, UpstreamLoraParam
from jlora.nn._weighted import add_weighted_adapter
