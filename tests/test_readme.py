"""Every fenced ``python`` block of README.md runs as written, in a directory holding the files it names."""

import os
import re
import stat
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
  assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
  """The paths the blocks name exist: ``path/to/llama`` (a tiny Llama checkpoint) and ``peft_adapter_dir``
  (an adapter saved by real ``peft``)."""
  import hf_doubles
  import torch_oracle

  torch_model = hf_doubles.save("llama", tmp_path / "path" / "to" / "llama")
  torch_oracle.peft_model(torch_model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(
      str(tmp_path / "peft_adapter_dir"))
  monkeypatch.chdir(tmp_path)
  exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_saved_adapter_directories_follow_the_umask(tmp_path):
  import jlora
  from jlora import testing

  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  old = os.umask(0o022)
  try:
    jlora.save_peft(model, tmp_path / "adapter")
  finally:
    os.umask(old)
  assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755


def command_lines() -> list[str]:
  """The ``jlora VERB ...`` lines of the README's command-line summary (an indented shell block)."""
  section = README.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
  return [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("    jlora ")]


def test_every_command_the_readme_lists_exists_with_the_options_it_shows(capsys):
  """The summary's shell block is checked, not run (it trains and merges real models): each verb has
  ``--help``, and each ``--option`` the line shows is in that help."""
  from jlora.cli import main

  lines = command_lines()
  assert [line.split()[1] for line in lines] == ["train", "merge", "generate", "inspect", "convert"]
  for line in lines:
    with pytest.raises(SystemExit) as e:
      main([line.split()[1], "--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    for option in re.findall(r"--[a-z][a-z-]*", line):
      assert option in shown, (line, option)
