"""Top-level API pieces that join ``jlora.nn`` and ``jlora.io``.

``get_peft_model`` accepts WLoRA upstreams given as PEFT adapter directories;
it is defined in ``jlora.io`` (which ``jlora.train`` may import) and exposed here.
"""

from jlora.io._inject_dirs import get_peft_model

__all__ = ["get_peft_model"]
