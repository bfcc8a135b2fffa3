"""Training: config, data, optimizer, sharding, checkpointing and the job loop (``jlora.train``)."""

from jlora.train._checkpoint import Checkpointer
from jlora.train._config import (
    AdapterConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)
from jlora.train._data import (BatchStream, DataError, Rows, encode_record, load_rows, pack, read_records,
                              segment_bound)
from jlora.train._distributed import LaunchError, initialize_distributed
from jlora.train._compile_cache import compile_cache_dir, enable_compile_cache
from jlora.train._memory import Arch, MemoryPlan, plan_memory
from jlora.train._memory_fit import MemoryPlanError, choose_scan_unroll, device_capacity, plan_defaults, plan_job
from jlora.train._model import presets, register_preset
from jlora.train._optimizer import adapter_optimizer, trainable_mask
from jlora.train._run_dir import OutputDirError
from jlora.train._sharding import AXES as MESH_AXES
from jlora.train._sharding import (MeshError, batch_sharding, make_mesh, param_spec, put_batch, shard_state,
                                   state_shardings)
from jlora.train._steps import make_eval_step, make_optimizer, make_train_step, masked_nll, split_model
from jlora.train._tokenizer import ByteTokenizer
from jlora.train._train import NonFiniteLossError, TrainingInterrupted, TrainResult, train
