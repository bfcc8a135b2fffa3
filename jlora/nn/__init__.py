"""Adapter math, adapter layers, and the two registries: layer types and adapter kinds (no models,
I/O or training)."""

from jlora.nn._adapters import AdapterModule, LoraAdapter, MoSLoraAdapter, WLoraAdapter, delta_weight
from jlora.nn._builtin_layers import LoraConv, LoraEinsum, LoraEmbed, LoraLinear, LoraLinearGeneral
from jlora.nn._config import AdapterConfig, LoraConfig, MoSLoraConfig, WLoraConfig, lora_scaling
from jlora.nn._dora import DoraAdapter
from jlora.nn._hotswap import SWAPPABLE_ROLES, hotswap_factors
from jlora.nn._init import rewrites_base
from jlora.nn._inject import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    lora_layers,
    module_copies,
    peft_config,
    per_sample_adapters,
    replace_module,
    set_adapter,
)
from jlora.nn._fused import MATMUL_MODES, cat_parts, lora_matmul, low_rank_grads
from jlora.nn._kinds import (
    FROZEN_ROLES,
    LORAPLUS_B_ROLES,
    ROLES,
    AdapterKind,
    PeftFormat,
    kind_for_config,
    kind_of,
    register_adapter_kind,
    is_frozen,
    registered_kinds,
    role_of,
    roles_along,
    unregister_adapter_kind,
)
from jlora.nn._layer import LoraLayer
from jlora.nn._lora_kinds import DEFAULT_LIKE, check_peft_fields
from jlora.nn._matmul import lora_projections, set_lora_matmul
from jlora.nn._modules_to_save import ModuleCopy, ModulesToSaveLayer, ModulesToSaveWrapper
from jlora.nn._merge import merge, merge_adapter, unload, unmerge, unmerge_adapter
from jlora.nn._scale import (
    disable_adapter_layers, enable_adapter_layers, scale_layer, set_scale, unscale_layer)
from jlora.nn._registry import lora_layer_type, register_lora_layer, registered_types, unregister_lora_layer
from jlora.nn._state import ADAPTER_STATE, adapter_state, load_adapter_state, split_adapter
from jlora.nn._targets import STACK_ATTR, Candidate, candidates, mark_stacked, name_matches, output_head_name
from jlora.nn._variables import TRAINABLE, LoraBuffer, LoraParam, LoraRngKey, UpstreamLoraParam
from jlora.nn._weighted import add_weighted_adapter
from jlora.nn import _wlora  # noqa: F401  (registers the WLoRA kind)

from jlora._deprecation import deprecated_names as _deprecated_names
from jlora.nn import _inject, _merge

# One meaning per name: the top-level ``jlora.get_peft_model`` (also loads WLoRA upstream directories)
# and ``jlora.merge_and_unload`` (also takes quantized models) do the whole job.
__getattr__ = _deprecated_names(__name__, {
    "get_peft_model": ("jlora.get_peft_model (or jlora.nn.add_adapter then set_adapter)", _inject.get_peft_model),
    "merge_and_unload": ("jlora.merge_and_unload (or jlora.nn.unload(model, merge=True))", _merge.merge_and_unload),
})
