"""Adapter kinds beyond LoRA, each added only through ``jlora.register_adapter_kind``.

Importing this package registers them; ``jlora`` does so on import.
"""

from jlora.kinds.vera import VeraAdapter, VeraConfig
