"""Training: optimizers now; config, data, sharding, checkpointing and the loop follow."""

from jlora.train._optimizer import adapter_optimizer, trainable_mask
