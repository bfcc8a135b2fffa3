"""jlora: LoRA fine-tuning the JAX way.

Adapters are Flax NNX modules whose parameters form their own pytree, apart
from the frozen base model; merging is a pure function on those pytrees.

The user API, by concern:

* adapters (``jlora.nn``): configs, injection, multi-adapter control, merging;
* checkpoints (``jlora.io``): HF safetensors models and PEFT adapters, both ways;
* models (``jlora.models``): generation with a KV cache;
* quantized bases (``jlora.quant``): NF4 / int8 / fp8 frozen kernels under adapters;
* training (``jlora.train``): the job and its optimizer helpers.

``jlora.train`` is the training package, and calling it runs the job:
``jlora.train(cfg)``; its other names come with ``from jlora.train import ...``.
"""

from jlora import train
from jlora.io import from_pretrained, get_peft_model, hotswap_adapter, load_peft, save_peft, save_pretrained
from jlora.kinds import VeraConfig
from jlora.models import generate
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
    disable_adapter_layers,
    disable_adapters,
    enable_adapter_layers,
    load_adapter_state,
    lora_layers,
    mark_stacked,
    merge,
    merge_adapter,
    peft_config,
    per_sample_adapters,
    register_adapter_kind,
    register_lora_layer,
    scale_layer,
    set_adapter,
    set_lora_matmul,
    set_scale,
    split_adapter,
    unload,
    unmerge,
    unmerge_adapter,
    unscale_layer,
)
from jlora.quant import dequantize, merge_and_unload, quantize
from jlora.train import TrainConfig, adapter_optimizer, trainable_mask

__version__ = "0.1.0"
