"""TrainConfig: defaults, YAML, --set overrides, and one clear error per bad key or type."""

import re

import pytest

from jlora.train import ConfigError, TrainConfig, load_config


def test_defaults_build_a_valid_config():
  cfg = TrainConfig()
  assert cfg.model.name == "byte-stories" and cfg.steps > 0 and cfg.data.path == ""


def test_yaml_sections_set_nested_fields(tmp_path):
  path = tmp_path / "job.yaml"
  path.write_text("steps: 7\noptim:\n  learning_rate: 0.5\nadapter:\n  target_modules: [q_proj, v_proj]\n")
  cfg = load_config(path)
  assert (cfg.steps, cfg.optim.learning_rate, cfg.adapter.target_modules) == (7, 0.5, ("q_proj", "v_proj"))


def test_set_overrides_win_over_yaml(tmp_path):
  path = tmp_path / "job.yaml"
  path.write_text("steps: 7\n")
  cfg = load_config(path, ["steps=9", "data.packing=false", "mesh.fsdp=2"])
  assert (cfg.steps, cfg.data.packing, cfg.mesh.fsdp) == (9, False, 2)


def test_int_is_accepted_where_a_float_is_expected():
  assert load_config(None, ["optim.learning_rate=1"]).optim.learning_rate == 1.0


def test_unknown_key_names_the_key_and_the_valid_ones():
  with pytest.raises(ConfigError, match=r"optim\.lr.*learning_rate"):
    load_config(None, ["optim.lr=0.1"])


def test_unknown_yaml_section_is_an_error(tmp_path):
  path = tmp_path / "job.yaml"
  path.write_text("optimizer:\n  learning_rate: 0.1\n")
  with pytest.raises(ConfigError, match="optimizer"):
    load_config(path)


def test_wrong_type_names_key_and_expected_type():
  with pytest.raises(ConfigError, match=r"steps must be an int.*'many'"):
    load_config(None, ["steps=many"])


def test_bool_is_not_an_int():
  with pytest.raises(ConfigError, match="batch_size"):
    load_config(None, ["batch_size=true"])


def test_literal_field_rejects_other_values():
  with pytest.raises(ConfigError, match=r"adapter\.kind must be one of"):
    load_config(None, ["adapter.kind=dora"])


def test_out_of_range_value_is_an_error():
  with pytest.raises(ConfigError, match="eval_fraction"):
    load_config(None, ["data.eval_fraction=1.5"])


def test_override_without_equals_sign_is_an_error():
  with pytest.raises(ConfigError, match="key=value"):
    load_config(None, ["steps"])


def test_replace_round_trips_through_to_dict():
  cfg = TrainConfig().replace(**{"optim.grad_accum": 4})
  assert cfg.optim.grad_accum == 4 and TrainConfig().replace() == TrainConfig()


def test_wlora_without_upstreams_is_an_error():
  with pytest.raises(ConfigError, match="upstream_loras"):
    load_config(None, ["adapter.kind=wlora"])


def test_exponent_without_a_dot_is_a_float():
  assert load_config(None, ["optim.learning_rate=2e-2"]).optim.learning_rate == 0.02


# Out of range for each numeric field outside the adapter section: (override, the range the message names).
OUT_OF_RANGE = [
    ("steps=0", ">= 1"), ("batch_size=0", ">= 1"), ("eval_every=0", ">= 1"), ("eval_batches=-1", ">= 0"),
    ("log_every=0", ">= 1"), ("loss_chunk_tokens=-1", ">= 0"), ("samples=-1", ">= 0"), ("seed=-1", ">= 0"),
    ("model.seed=-1", ">= 0"), ("model.scan_unroll=0", ">= 1"),
    ("data.seq_len=1", ">= 2"), ("data.eval_fraction=1", "in [0, 1)"), ("data.eval_fraction=-0.1", "in [0, 1)"),
    ("data.seed=-3", ">= 0"),
    ("optim.learning_rate=0", "> 0"), ("optim.warmup_steps=-1", ">= 0"), ("optim.end_lr_ratio=-1", "in [0, 1]"),
    ("optim.end_lr_ratio=1.5", "in [0, 1]"), ("optim.weight_decay=-1", ">= 0"), ("optim.b1=2", "in [0, 1)"),
    ("optim.b1=1", "in [0, 1)"), ("optim.b2=1.5", "in [0, 1)"), ("optim.b2=-0.1", "in [0, 1)"),
    ("optim.grad_clip=-1", ">= 0"), ("optim.grad_accum=0", ">= 1"), ("optim.loraplus_lr_ratio=0", "> 0"),
    ("optim.loraplus_lr_embedding=0", "> 0"),
    ("mesh.data=0", ">= 1 or -1"), ("mesh.fsdp=-2", ">= 1 or -1"), ("mesh.tensor=0", ">= 1"),
    ("mesh.device_memory_gib=-1", ">= 0"), ("checkpoint.every=0", ">= 1"), ("checkpoint.keep=0", ">= 1"),
]


@pytest.mark.parametrize("override,allowed", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_a_numeric_field_out_of_its_range_names_the_field_and_the_range(override, allowed):
  key, value = override.split("=")
  with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be {re.escape(allowed)}.*got {value}"):
    load_config(None, [override])


@pytest.mark.parametrize("override", ["optim.b1=0", "optim.b2=0.5", "optim.end_lr_ratio=1", "optim.end_lr_ratio=0",
                                      "optim.grad_clip=0", "optim.weight_decay=0", "mesh.fsdp=-1", "seed=0"])
def test_the_edges_of_each_range_are_accepted(override):
  load_config(None, [override])
