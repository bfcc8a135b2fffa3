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
    load_config(None, ["adapter.kind=ia3"])


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


# ---- the adapter section is the adapter kind's own config ------------------------------------

def test_the_adapter_section_is_a_lora_config_with_the_jobs_defaults():
  from jlora.nn import LoraConfig
  from jlora.train import JOB_LORA_DEFAULTS

  adapter = TrainConfig().adapter
  assert type(adapter) is LoraConfig
  assert (adapter.r, adapter.lora_alpha, adapter.target_modules) == tuple(JOB_LORA_DEFAULTS.values())
  assert adapter.init_lora_weights is True and adapter.modules_to_save is None  # LoraConfig's own defaults


def test_every_lora_config_field_is_a_yaml_key(tmp_path):
  path = tmp_path / "job.yaml"
  path.write_text("adapter:\n  init_lora_weights: gaussian\n  rank_pattern: {q_proj: 4}\n  alpha_pattern: {q_proj: 8}\n"
                  "  modules_to_save: [lm_head]\n  layers_to_transform: [0]\n  layers_pattern: layers\n"
                  "  target_modules: [q_proj, v_proj]\n  exclude_modules: [k_proj]\n  use_rslora: true\n")
  adapter = load_config(path).adapter
  assert adapter.init_lora_weights == "gaussian" and dict(adapter.rank_pattern) == {"q_proj": 4}
  assert dict(adapter.alpha_pattern) == {"q_proj": 8.0} and adapter.modules_to_save == ("lm_head",)
  assert (adapter.layers_to_transform, adapter.layers_pattern) == ((0,), "layers") and adapter.use_rslora


def test_set_reaches_mapping_and_union_fields():
  adapter = load_config(None, ["adapter.rank_pattern={o_proj: 2}", "adapter.alpha_pattern.q_proj=3",
                               "adapter.init_lora_weights=false", "adapter.target_modules=all-linear"]).adapter
  assert dict(adapter.rank_pattern) == {"o_proj": 2} and dict(adapter.alpha_pattern) == {"q_proj": 3.0}
  assert adapter.init_lora_weights is False and adapter.target_modules == "all-linear"


def test_the_kind_picks_its_config_class_with_its_own_fields():
  from jlora.nn import MoSLoraConfig, WLoraConfig

  mos = load_config(None, ["adapter.kind=moslora", "adapter.mixer_init=orthogonal"]).adapter
  assert type(mos) is MoSLoraConfig and mos.mixer_init == "orthogonal" and mos.r == 16
  wlora = load_config(None, ["adapter.kind=wlora", "adapter.upstream_loras=[a, b]"]).adapter
  assert type(wlora) is WLoraConfig and wlora.upstream_loras == ("a", "b") and wlora.target_modules is None


def test_a_key_the_kind_does_not_have_names_the_kinds_keys():
  with pytest.raises(ConfigError, match=r"adapter\.mixer_init.*valid keys under adapter: .*lora_alpha"):
    load_config(None, ["adapter.mixer_init=orthogonal"])
  with pytest.raises(ConfigError, match=r"adapter\.r.*valid keys under adapter: seed, target_modules, upstream_loras"):
    load_config(None, ["adapter.kind=wlora", "adapter.upstream_loras=[a]", "adapter.r=4"])


def test_a_value_the_kind_refuses_is_one_config_error():
  with pytest.raises(ConfigError, match=r"adapter \(kind lora\): init_lora_weights='svd' is not supported"):
    load_config(None, ["adapter.init_lora_weights=svd"])
  with pytest.raises(ConfigError, match=r"adapter \(kind lora\): r must be a positive integer rank, got 0"):
    load_config(None, ["adapter.r=0"])


def test_the_adapter_round_trips_through_to_dict_and_replace():
  cfg = load_config(None, ["adapter.kind=moslora", "adapter.rank_pattern={q_proj: 4}", "adapter.r=6"])
  assert cfg.to_dict()["adapter"]["kind"] == "moslora" and cfg.replace() == cfg
  assert cfg.replace(**{"adapter.lora_dropout": 0.1}).adapter.rank_pattern == cfg.adapter.rank_pattern


def test_replace_with_another_kind_starts_that_kinds_section_afresh():
  cfg = TrainConfig().replace(**{"adapter.r": 4})
  wlora = cfg.replace(**{"adapter.kind": "wlora", "adapter.upstream_loras": ["a"]}).adapter
  assert wlora.upstream_loras == ("a",) and wlora.target_modules is None


def test_a_kind_config_built_in_code_is_the_section():
  from jlora.nn import LoraConfig

  adapter = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian")
  cfg = TrainConfig(adapter=adapter)
  assert cfg.adapter is adapter and cfg.replace().adapter == adapter
  with pytest.raises(ConfigError, match="adapter must be an adapter kind's config"):
    TrainConfig(adapter="lora")


def test_adapter_section_builds_a_kind_over_the_jobs_defaults():
  from jlora.nn import MoSLoraConfig
  from jlora.train import adapter_section

  adapter = adapter_section("moslora", r=8)
  assert type(adapter) is MoSLoraConfig and (adapter.r, adapter.lora_alpha) == (8, 16.0)


@pytest.mark.parametrize("overrides", [{"adapter.init_lora_weights": "pissa_niter_4", "adapter.layers_to_transform": [1]},
                                       {"adapter.kind": "moslora", "adapter.alpha_pattern": {"v_proj": 2}},
                                       {"adapter.kind": "wlora", "adapter.upstream_loras": ["u"]}])
def test_the_written_config_loads_back_as_the_same_job(tmp_path, overrides):
  import yaml

  cfg = TrainConfig().replace(**overrides)
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
  assert load_config(tmp_path / "job.yaml") == cfg


def test_every_registered_kind_is_a_section_kind():
  from jlora.kinds import VeraConfig
  from jlora.train import adapter_kinds

  assert {"lora", "dora", "moslora", "wlora", "vera"} <= set(adapter_kinds())
  vera = load_config(None, ["adapter.kind=vera", "adapter.target_modules=[q_proj]"]).adapter
  assert type(vera) is VeraConfig and vera.r == VeraConfig.r  # not a LoRA-family kind: its own defaults


def test_dora_is_the_lora_config_that_selects_it():
  assert load_config(None, ["adapter.kind=dora", "adapter.use_dora=true"]).to_dict()["adapter"]["kind"] == "dora"
  assert load_config(None, ["adapter.use_dora=true"]).to_dict()["adapter"]["kind"] == "dora"
  with pytest.raises(ConfigError, match=r"kind=dora, but this LoraConfig makes a lora adapter.*use_dora=true"):
    load_config(None, ["adapter.kind=dora"])


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
