"""Writes the colab/*.ipynb notebooks from the cell sources below (edit here, then run this).

Every notebook starts with a cell tagged ``parameters``: ``MODEL`` is
``"byte-stories"``, the small pretrained base shipped inside jlora (no
download), or a Hugging Face hub id / local checkpoint dir. CI
(tests/test_notebooks.py) cuts the steps and runs each notebook top to bottom.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = '''import sys
from pathlib import Path

if "google.colab" in sys.modules:  # Colab: install jlora (and the TPU/GPU jax the runtime provides)
    get_ipython().run_line_magic("pip", "install -q jlora huggingface_hub")

def local_model(name):
    """A preset shipped with jlora, a local checkpoint dir, or a hub download of ``name``."""
    from jlora.train import presets
    if name in presets() or Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download
    return snapshot_download(name)

model_dir = local_model(MODEL)
print("model:", model_dir)'''

QUICKSTART = [
    new_markdown_cell("# jlora quickstart\n\nFine-tune a LoRA (or MoSLoRA) adapter that teaches a small "
                      "pretrained model a skill it lacks, compare its answers before and after, look at "
                      "the loss curve, merge it, and export it in PEFT format. The default base, "
                      "`byte-stories`, ships inside jlora: a byte-level Llama that writes children's "
                      "stories and has never seen a question."),
    new_code_cell('MODEL = "byte-stories"  # or a hub id / local dir, e.g. "HuggingFaceTB/SmolLM2-135M" (then LR = 2e-3)\n'
                  'KIND = "moslora"        # "lora" or "moslora"\n'
                  'STEPS = 300\nSEQ_LEN = 128\nLR = 1e-2\nOUTPUT_DIR = "runs/quickstart"',
                  metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP),
    new_markdown_cell("The job is one frozen config. `data.path=''` uses the Q/A records shipped with "
                      "jlora; point it at your own `.jsonl` (`text`, `prompt`/`completion` or `messages` "
                      "records), `.txt` or `.parquet` file."),
    new_code_cell('import jlora\n\ncfg = jlora.TrainConfig().replace(**{\n'
                  '    "model.name": model_dir, "adapter.kind": KIND, "adapter.r": 8,\n'
                  '    "adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],\n'
                  '    "data.seq_len": SEQ_LEN, "steps": STEPS, "eval_every": max(STEPS // 4, 1),\n'
                  '    "optim.learning_rate": LR, "output_dir": OUTPUT_DIR, "overwrite": True,\n'
                  '})\ncfg'),
    new_code_cell("result = jlora.train(cfg)\n"
                  "print(f'held-out loss: base {result.eval_losses[0][1]:.3f} -> adapter {result.eval_losses[-1][1]:.3f}')"),
    new_markdown_cell("The same held-out prompts, answered by the base model and by the adapted one:"),
    new_code_cell("from IPython.display import Image, display\n\n"
                  "for prompt, before, after in zip(result.sample_prompts, result.base_samples, result.samples):\n"
                  "    print(repr(prompt), '\\n  base:   ', repr(before[len(prompt):]), '\\n  adapter:', repr(after[len(prompt):]))\n"
                  "display(Image(str(result.plot_path)))"),
    new_markdown_cell("The adapter directory is a PEFT adapter (`adapter_config.json` + "
                      "`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads too. "
                      "The job already checked that reloading it and merging it reproduce the trained "
                      "model's logits:"),
    new_code_cell("print(sorted(p.name for p in result.adapter_dir.iterdir()))\nprint(result.checks)\n"
                  "assert result.checks['reload_max_abs_diff'] < 1e-4"),
    new_code_cell("merged = jlora.merge_and_unload(result.model)  # a plain model again, adapter folded in\n"
                  "type(merged).__name__"),
]

WLORA = [
    new_markdown_cell("# WLoRA: a learned mix of two LoRA adapters\n\nTrain two LoRA adapters on two "
                      "kinds of data, then train only the per-layer mixing weights of a WLoRA adapter "
                      "over them (the upstream adapters stay frozen)."),
    new_code_cell('MODEL = "byte-stories"  # or a hub id / local checkpoint dir\nSTEPS = 100\nSEQ_LEN = 128\nOUTPUT_DIR = "runs/wlora"',
                  metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP),
    new_code_cell('import json\nfrom jlora.train import EMBEDDED_CORPUS, read_records\n\n'
                  'records = [r for r, _ in read_records(EMBEDDED_CORPUS)]\n'
                  'Path(OUTPUT_DIR).mkdir(parents=True, exist_ok=True)\n'
                  'parts = {"stories": [r for r in records if "text" in r],\n'
                  '         "qa": [r for r in records if "prompt" in r]}\n'
                  'for name, rows in parts.items():\n'
                  '    Path(OUTPUT_DIR, f"{name}.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))\n'
                  '{k: len(v) for k, v in parts.items()}'),
    new_code_cell('import jlora\n\ndef job(name, **overrides):\n'
                  '    base = {"model.name": model_dir, "data.seq_len": SEQ_LEN, "steps": STEPS,\n'
                  '            "eval_every": max(STEPS // 2, 1), "samples": 0, "overwrite": True,\n'
                  '            "adapter.target_modules": ["q_proj", "v_proj"],\n'
                  '            "output_dir": f"{OUTPUT_DIR}/{name}"}\n'
                  '    return jlora.TrainConfig().replace(**{**base, **overrides})\n\n'
                  'upstream = {name: jlora.train(job(name, **{"data.path": f"{OUTPUT_DIR}/{name}.jsonl"}))\n'
                  '            for name in ("stories", "qa")}\n'
                  '{k: r.eval_losses[-1] for k, r in upstream.items()}'),
    new_code_cell('mix = jlora.train(job("mix", **{\n'
                  '    "adapter.kind": "wlora", "optim.learning_rate": 5e-2,\n'
                  '    "adapter.upstream_loras": [str(upstream["stories"].adapter_dir), str(upstream["qa"].adapter_dir)],\n'
                  '}))\nmix.eval_losses'),
    new_code_cell("import jax\n\nfor path, layer in list(jlora.lora_layers(mix.model))[:2]:\n"
                  "    adapter = layer.adapters['default']  # the WLoRA adapter the job trained\n"
                  "    print('.'.join(map(str, path)), 'weights (stories, qa) per layer:')\n"
                  "    print(jax.device_get(adapter.weights()))"),
]

SHARDING = [
    new_markdown_cell("# Sharding over devices\n\nOne code path from one CPU to a TPU VM or a multi-GPU "
                      "host: the job builds a `(data, fsdp, tensor)` mesh; the batch is split over "
                      "`data` and `fsdp`, weights over `fsdp` and `tensor`, each adapter like its base "
                      "layer. Without accelerators, `SIMULATE_DEVICES` CPU devices stand in."),
    new_code_cell('MODEL = "byte-stories"  # or a hub id / local checkpoint dir\nSIMULATE_DEVICES = 8   # used only when no TPU/GPU\n'
                  'FSDP = 2\nTENSOR = 2\nSTEPS = 50\nSEQ_LEN = 128\nOUTPUT_DIR = "runs/sharding"',
                  metadata={"tags": ["parameters"]}),
    new_code_cell('import os\n\n# Must happen before jax starts: CPU devices to stand in for accelerators.\n'
                  'if SIMULATE_DEVICES and not os.environ.get("TPU_NAME") and not os.path.exists("/dev/nvidia0"):\n'
                  '    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={SIMULATE_DEVICES}"\n'
                  '    os.environ.setdefault("JAX_PLATFORMS", "cpu")\n'
                  'import jax\njax.devices()'),
    new_code_cell(SETUP),
    new_code_cell('import jlora\n\nbatch = 2 * jax.device_count() // TENSOR\ncfg = jlora.TrainConfig().replace(**{\n'
                  '    "model.name": model_dir, "mesh.fsdp": FSDP, "mesh.tensor": TENSOR,  # data = the rest\n'
                  '    "batch_size": batch, "data.seq_len": SEQ_LEN, "steps": STEPS, "samples": 0,\n'
                  '    "eval_every": max(STEPS // 2, 1), "output_dir": OUTPUT_DIR, "overwrite": True,\n'
                  '})\nresult = jlora.train(cfg)\nresult.eval_losses'),
    new_code_cell("from jlora.train import make_mesh, param_spec\nfrom flax import nnx\n\n"
                  "mesh = make_mesh((jax.device_count() // (FSDP * TENSOR), FSDP, TENSOR))\n"
                  "for path, v in list(nnx.to_flat_state(nnx.state(result.model, nnx.Param)))[:8]:\n"
                  "    print('.'.join(map(str, path)), v[...].shape, param_spec(path, v[...].shape, mesh))"),
]

TPU = [
    new_markdown_cell("# An 8B Llama on a TPU v5e-8 / v6e-8\n\nLoRA on every linear layer of an 8B-class "
                      "Llama in bfloat16, its weights split over 8 chips (`mesh.fsdp=8`: each chip holds "
                      "1/8 of every weight, about 2 GB of the 16 GB base). On TPU, attention runs as "
                      "Pallas splash attention over packed rows (segment ids keep the records apart) and "
                      "the loss runs the 128k-vocabulary output head 4096 tokens at a time, so the "
                      "`[tokens, vocab]` logits never exist at once.\n\nRuntime: a TPU VM or Colab "
                      "runtime with 8 chips (v5e-8, v6e-8), or one v5e chip with `QUANTIZE = \"nf4\"` and "
                      "`FSDP = 1` (QLoRA: the frozen base stored in 4 bits). Llama 3.1 is gated on the hub: accept its "
                      "licence and run `huggingface_hub.login()` first, or point `MODEL` at a local copy. "
                      "Without a TPU the same cells run on `SIMULATE_DEVICES` CPU devices (CI runs them "
                      "that way with a tiny model)."),
    new_code_cell('MODEL = "meta-llama/Llama-3.1-8B"  # hub id or local checkpoint dir\n'
                  'SIMULATE_DEVICES = 8               # used only when no TPU/GPU\n'
                  'FSDP = 8\nBATCH = 8                           # sequences per step, over all chips\n'
                  'SEQ_LEN = 2048\nSTEPS = 200\nDTYPE = "bfloat16"\n'
                  'QUANTIZE = ""   # "nf4": the 8B base in 4 bits fits one v5e chip (16 GB); then FSDP = 1\n'
                  'OUTPUT_DIR = "runs/tpu"',
                  metadata={"tags": ["parameters"]}),
    new_code_cell('import os\n\n# Must happen before jax starts: CPU devices to stand in for TPU chips.\n'
                  'if SIMULATE_DEVICES and not os.environ.get("TPU_NAME") and not os.path.exists("/dev/accel0") \\\n'
                  '        and not os.path.exists("/dev/vfio") and not os.path.exists("/dev/nvidia0"):\n'
                  '    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={SIMULATE_DEVICES}"\n'
                  '    os.environ.setdefault("JAX_PLATFORMS", "cpu")\n'
                  'import jax\nprint(jax.default_backend(), jax.device_count(), "devices")'),
    new_code_cell(SETUP),
    new_markdown_cell("One config for the job. `mesh.data=-1` gives the batch every device that `fsdp` "
                      "leaves (none here); `model.remat=full` keeps only each layer's input for the "
                      "backward pass; `model.attention=auto` picks splash attention on TPU (XLA's on CPU)."),
    new_code_cell('import jlora\n\ncfg = jlora.TrainConfig().replace(**{\n'
                  '    "model.name": model_dir, "model.dtype": DTYPE, "model.remat": "full",\n'
                  '    "model.attention": "auto", "model.quantize": QUANTIZE, "mesh.fsdp": FSDP, "mesh.data": -1,\n'
                  '    "adapter.target_modules": "all-linear", "adapter.r": 16, "adapter.lora_alpha": 32,\n'
                  '    "batch_size": BATCH, "data.seq_len": SEQ_LEN, "loss_chunk_tokens": 4096,\n'
                  '    "steps": STEPS, "eval_every": max(STEPS // 4, 1), "optim.learning_rate": 2e-4,\n'
                  '    "samples": 2, "output_dir": OUTPUT_DIR, "overwrite": True,\n'
                  '})\ncfg'),
    new_code_cell("result = jlora.train(cfg)\nresult.eval_losses"),
    new_code_cell("tokens_per_s = [r['tokens_per_s'] for r in result.history if 'tokens_per_s' in r]\n"
                  "print(f'{tokens_per_s[-1]:,.0f} tokens/s over {jax.device_count()} devices')\n"
                  "stats = jax.devices()[0].memory_stats()  # None on CPU\n"
                  "if stats:\n    print(f\"peak HBM on chip 0: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB\")\n"
                  "for s in result.samples:\n    print(repr(s))"),
    new_markdown_cell("`result.adapter_dir` is a PEFT adapter: `peft.PeftModel.from_pretrained` loads it "
                      "onto the same base model."),
    new_code_cell("print(sorted(p.name for p in result.adapter_dir.iterdir()))\nprint(result.checks)"),
]


def main() -> None:
  for name, cells in (("quickstart", QUICKSTART), ("wlora", WLORA), ("sharding", SHARDING), ("tpu", TPU)):
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "colab": {"provenance": []}})
    nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
  main()
