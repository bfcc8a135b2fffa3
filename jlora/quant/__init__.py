"""Quantized frozen base weights (QLoRA-style): NF4, int8 and fp8 kernels under adapters.

``jlora.quantize(model, "nf4")`` swaps a model's ``nnx.Linear`` layers for
``QuantizedLinear`` in place; ``jlora.from_pretrained(path, quantize="nf4")``
does it tensor by tensor while loading. Adapters go on top through the
public layer registry (``QuantizedLoraLinear``), so LoRA, MoSLoRA, WLoRA,
per-sample adapters and PEFT checkpoints work as on a full-precision base.

Dependency choice: our own code, not qwix. qwix (Google's JAX quantization
library) quantizes by intercepting ``dot_general``/``einsum`` calls inside an
intercepted copy of the model class and stores each quantized kernel as a
``QArray`` boxed *inside the original* ``nnx.Param``. That does not fit
jlora: (1) the frozen weights would still be ``nnx.Param``, which jlora's
splits, optimizer masks and HF export select as parameters, where a separate
frozen variable type keeps them out by construction; (2) the layer stays an
``nnx.Linear``, so the adapter registry would wrap it with ``LoraLinear``,
whose merge writes float deltas into the boxed ``QArray``; (3) the kernel's
state becomes a nested ``kernel/array/{qvalue,scale}`` tree, which breaks the
sharding rules and HF/PEFT names keyed on ``kernel``; (4) its NF4 keeps one
code per ``uint4`` element with no double quantization of the scales, and its
LoRA support is a parallel adapter system without PEFT checkpoints. The
formats here are small (``_formats.py``) and a layer type the registry
understands carries the rest.
"""

from jlora.quant._formats import FORMATS, NF4_CODEBOOK, QuantSpec, dequantize as dequantize_arrays
from jlora.quant._formats import quantize as quantize_array
from jlora.quant._fp8 import FP8_BACKWARDS, fp8_lora_matmuls, fp8_matmuls
from jlora.quant._linear import QuantizedLinear, QuantizedWeight, quantized_matmul, set_fp8_matmul
from jlora.quant._load import LoadQuantizer
from jlora.quant._lora import QuantizedLoraLinear
from jlora.quant._model import dequantize, merge_and_unload, plan, quantize, quantized_layers

__all__ = [
    "FORMATS", "FP8_BACKWARDS", "NF4_CODEBOOK", "LoadQuantizer", "QuantSpec", "QuantizedLinear", "QuantizedLoraLinear",
    "QuantizedWeight", "dequantize", "dequantize_arrays", "merge_and_unload", "plan", "quantize",
    "fp8_lora_matmuls", "fp8_matmuls", "quantize_array", "quantized_layers", "quantized_matmul", "set_fp8_matmul",
]
