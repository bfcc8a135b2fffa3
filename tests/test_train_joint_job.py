"""``jlora.train`` with several named adapters: one PEFT directory each, loadable by peft; resume."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
import yaml
from peft import PeftModel

from jlora.train import ByteTokenizer, load_config, train
from train_doubles import tiny_job

LLAMA = dict(vocab_size=258, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
ADAPTERS = [{"name": "knowledge", "kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
             "init_lora_weights": False},
            {"name": "style", "kind": "lora", "r": 2, "use_rslora": True, "target_modules": ["q_proj", "o_proj"],
             "optim": {"learning_rate": 5e-2, "weight_decay": 0.1, "loraplus_lr_ratio": 4}}]


def write_yaml(path, values):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(yaml.safe_dump(values))
  return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  path = tmp_path_factory.mktemp("base")
  model.save_pretrained(str(path))
  return path, model


def joint_job(out, base_path, **overrides):
  cfg = tiny_job(out, **{"model.name": str(base_path), "data.tokenizer": "bytes", "steps": 4,
                         "eval_every": 2, **overrides})
  values = {k: v for k, v in cfg.to_dict().items() if k != "adapter"}
  return load_config(write_yaml(out.parent / f"{out.name}.yaml", {**values, "adapters": ADAPTERS}))


@pytest.fixture(scope="module")
def job(tmp_path_factory, base):
  return train(joint_job(tmp_path_factory.mktemp("joint") / "run", base[0]), tokenizer=ByteTokenizer())


def test_each_adapter_gets_its_own_peft_directory(job):
  assert set(job.adapter_dirs) == {"knowledge", "style"}
  assert job.adapter_dir is None
  for name, path in job.adapter_dirs.items():
    assert path == job.output_dir / "adapters" / name
    assert (path / "adapter_model.safetensors").is_file()
  assert job.checks["reload_max_abs_diff"] < 1e-5


def test_peft_loads_the_adapters_and_gives_the_trained_logits(job, base):
  peft_model = PeftModel.from_pretrained(copy.deepcopy(base[1]), job.adapter_dirs["knowledge"],
                                         adapter_name="knowledge")
  peft_model.load_adapter(job.adapter_dirs["style"], adapter_name="style")
  peft_model.base_model.set_adapter(["knowledge", "style"])
  ids = np.arange(3, 15, dtype=np.int32)[None]
  job.model.eval()
  want = np.asarray(job.model(ids))
  with torch.no_grad():
    got = peft_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_metrics_log_each_adapters_learning_rate(job):
  records = [json.loads(l) for l in job.metrics_path.read_text().splitlines()]
  step = [r for r in records if "loss" in r][-1]
  assert "lr" not in step
  assert 0 < step["lr/knowledge"] < step["lr/style"]  # style's own learning rate is the higher one


def test_a_resumed_joint_run_restores_every_adapter_and_its_optimizer(tmp_path, base, job):
  cfg = joint_job(tmp_path / "run", base[0], **{"checkpoint.every": 2, "checkpoint.keep": 3})
  whole = train(cfg, tokenizer=ByteTokenizer())
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # as if the run had stopped after step 2
  resumed = train(cfg, tokenizer=ByteTokenizer())
  assert resumed.resumed_from == 2
  for name in ("knowledge", "style"):
    want = (whole.adapter_dirs[name] / "adapter_model.safetensors").read_bytes()
    assert (resumed.adapter_dirs[name] / "adapter_model.safetensors").read_bytes() == want, name
