"""The job's ``adapters`` section: several named adapters trained together, each with its own optimizer.

In YAML a list of mappings, each ``name`` plus the keys of an ``adapter``
section (``kind`` and that kind's fields) and an optional ``optim`` mapping of
``OptimSection`` keys that override the job's ``optim`` for this adapter::

  adapters:
    - {name: knowledge, kind: lora, r: 16, optim: {learning_rate: 1.0e-4}}
    - {name: style, kind: moslora, r: 4, optim: {learning_rate: 5.0e-4, loraplus_lr_ratio: 16}}

Every listed adapter is active on every row (joint training: one loss,
gradients to all of them), each updated by its own AdamW group: its own
learning rate and schedule, weight decay, LoRA+ ratio and gradient clipping
(the global norm of its own gradient), as a loop with one optimizer per
adapter would.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from jlora.train._config_parse import ConfigError, from_dict
from jlora.train._config_sections import OptimSection, adapter_to_dict, parse_adapter, planned_adapter

_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Job-wide settings an adapter cannot change: every group steps together.
_JOB_WIDE = ("grad_accum",)


@dataclasses.dataclass(frozen=True)
class NamedAdapter:
  """One entry of ``adapters``.

  Attributes:
    name: the adapter's name (``[A-Za-z0-9_-]+``): its PEFT directory is ``adapters/<name>``.
    config: the adapter kind's own config (``jlora.LoraConfig``, ``MoSLoraConfig``, ...).
    optim: ``(key, value)`` overrides of the job's ``optim`` section for this adapter.
  """

  name: str
  config: Any
  optim: tuple[tuple[str, Any], ...] = ()

  def optim_section(self, job: OptimSection) -> OptimSection:
    """The job's ``optim`` section with this adapter's overrides."""
    return dataclasses.replace(job, **dict(self.optim))


def parse_adapters(values, prefix: str = "adapters.") -> tuple[NamedAdapter, ...]:
  """The ``adapters`` list as ``NamedAdapter`` entries; refuses a missing, bad or repeated name."""
  key = prefix.rstrip(".")
  if not isinstance(values, (list, tuple)):
    raise ConfigError(f"{key} must be a list of {{name, kind, <kind fields>, optim}} mappings, got "
                      f"{type(values).__name__}.")
  entries, seen = [], set()
  for i, value in enumerate(values):
    where = f"{key}[{i}]"
    if isinstance(value, NamedAdapter):
      entry = value
    else:
      entry = _parse_entry(value, where)
    if entry.name in seen:
      raise ConfigError(f"{where}: two adapters are named {entry.name!r}; give each adapter its own name.")
    seen.add(entry.name)
    entries.append(entry)
  return tuple(entries)


def _parse_entry(value, where: str) -> NamedAdapter:
  if not isinstance(value, Mapping):
    raise ConfigError(f"{where} must be a mapping of name, kind, <kind fields> and optim, got "
                      f"{type(value).__name__}.")
  fields = dict(value)
  name = fields.pop("name", None)
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ConfigError(f"{where}.name must be a name of letters, digits, '_' or '-', got {name!r}.")
  optim = fields.pop("optim", None) or {}
  if not isinstance(optim, Mapping):
    raise ConfigError(f"{where}.optim must be a mapping of optim keys, got {type(optim).__name__}.")
  for job_wide in _JOB_WIDE:
    if job_wide in optim:
      raise ConfigError(f"{where}.optim.{job_wide}: every adapter steps together; set optim.{job_wide} for "
                        "the whole job instead.")
  checked = dataclasses.asdict(from_dict(optim, OptimSection, f"{where}.optim."))  # type-checks the keys
  config = parse_adapter(fields, f"{where}.")
  return NamedAdapter(name, config, tuple((k, checked[k]) for k in optim))


def adapters_to_list(entries: tuple[NamedAdapter, ...]) -> list[dict]:
  """The section as YAML writes it: ``[{name, kind, <fields>, optim}]`` (``optim`` only when set)."""
  out = []
  for e in entries:
    item = {"name": e.name, **adapter_to_dict(e.config)}
    if e.optim:
      item["optim"] = dict(e.optim)
    out.append(item)
  return out


def adapters_field():
  """``TrainConfig.adapters``: ``()`` (the single ``adapter`` section) or the named adapters."""
  return dataclasses.field(default=(), metadata={"parse": parse_adapters, "plain": adapters_to_list})


def planned_adapters(adapter, entries: tuple[NamedAdapter, ...]) -> tuple[int, Any]:
  """``(rank, target_modules)`` the memory plan counts: the single ``adapter``'s, or for named adapters
  the sum of their ranks over the first one's targets (an estimate when their targets differ)."""
  if not entries:
    return planned_adapter(adapter)
  plans = [planned_adapter(e.config) for e in entries]
  return sum(r for r, _ in plans), plans[0][1]
