"""The embedded training job on an NF4 base (``model.quantize=nf4``) against the bf16 base.

Both runs train the default adapter on the ``"tiny"`` preset (bfloat16
weights, byte tokenizer, embedded corpus) for the same few steps; the NF4 run
must reach a held-out loss within 3% of the bf16 run's.
"""

import pytest

from jlora.quant import QuantizedLinear
from jlora.train import TrainConfig, train

pytestmark = pytest.mark.slow


def run(tmp_path, quantize: str):
  cfg = TrainConfig().replace(**{
      "output_dir": str(tmp_path / (quantize or "bf16")), "model.name": "tiny", "model.dtype": "bfloat16",
      "model.quantize": quantize, "steps": 16, "batch_size": 4, "eval_every": 16, "eval_batches": 2,
      "data.seq_len": 32, "checkpoint.every": 16, "checkpoint.async_save": False, "samples": 0,
      "progress": False, "optim.warmup_steps": 2})
  return train(cfg)


def test_nf4_base_trains_to_within_3_percent_of_the_bf16_held_out_loss(tmp_path):
  bf16, nf4 = run(tmp_path, ""), run(tmp_path, "nf4")
  assert isinstance(nf4.model.model.layers.self_attn.q_proj.base_layer, QuantizedLinear)
  (_, start), (_, bf16_loss), nf4_loss = bf16.eval_losses[0], bf16.eval_losses[-1], nf4.eval_losses[-1][1]
  assert bf16_loss < start - 0.3  # the job learns, so the comparison means something
  assert abs(nf4_loss - bf16_loss) <= 0.03 * bf16_loss
  assert nf4.checks["reload_max_abs_diff"] < 1e-2
