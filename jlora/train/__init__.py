"""Training: config, data, optimizer, sharding, checkpointing and the job loop (``jlora.train``).

``jlora.train`` is this package, and calling it runs the job:
``jlora.train(cfg)`` is ``jlora.train.train(cfg)``, and
``from jlora.train import TrainConfig`` names the same package's parts.
"""

import sys as _sys
import types as _types

from jlora._deprecation import deprecated_names as _deprecated_names
from jlora.train._checkpoint import Checkpointer
from jlora.train._config import (
    CheckpointSection,
    ConfigError,
    DataSection,
    MeshSection,
    ModelSection,
    OptimSection,
    RENAMED as _RENAMED,
    ReportSection,
    TrainConfig,
    adapter_section,
    load_config,
)
from jlora.train._config_sections import JOB_LORA_DEFAULTS, adapter_kind, adapter_kinds
from jlora.train._data import (EMBEDDED_CORPUS, BatchStream, DataError, Rows, encode_record, load_rows, pack,
                              read_records, segment_bound)
from jlora.train._distributed import LaunchError, initialize_distributed
from jlora.train._compile_cache import compile_cache_dir, enable_compile_cache
from jlora.train._memory import Arch, MemoryPlan, plan_memory
from jlora.train._memory_fit import MemoryPlanError, choose_scan_unroll, device_capacity, plan_defaults, plan_job
from jlora.train._model import check_tokenizer_fits, load_model, presets, register_preset
from jlora.train._optimizer import adapter_optimizer, trainable_mask
from jlora.train._run_dir import OutputDirError
from jlora.train._sharding import AXES as MESH_AXES
from jlora.train._sharding import (MeshError, batch_sharding, make_mesh, param_spec, put_batch, shard_state,
                                   state_shardings)
from jlora.train._steps import make_eval_step, make_optimizer, make_train_step, masked_nll, split_model
from jlora.train._report import continue_prompts
from jlora.train._tokenizer import TOKENIZER_FILES, ByteTokenizer, has_tokenizer, load_tokenizer
from jlora.train._train import NonFiniteLossError, TrainingInterrupted, TrainResult, train


__getattr__ = _deprecated_names(__name__, _RENAMED)  # the sections' old names (ModelConfig, ...), deprecated


class _CallablePackage(_types.ModuleType):
  """The ``jlora.train`` package, callable as the training job (``jlora.train(cfg)``)."""

  def __call__(self, cfg: TrainConfig = TrainConfig(), *, model=None, tokenizer=None) -> TrainResult:
    return train(cfg, model=model, tokenizer=tokenizer)


_CallablePackage.__call__.__doc__ = train.__doc__
_sys.modules[__name__].__class__ = _CallablePackage
