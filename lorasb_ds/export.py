"""Export a finished LoRA-SB adapter (the directory ``files.save_adapter`` writes): as a stock PEFT LoRA
adapter, or merged into the base weights; or load it into a plain model (``apply_adapter``).

A LoRA-SB layer computes, for x of shape (..., in),

    y = W0 x + b + s * B R A x,         s = 1,   B (out x r),  A (r x in),  R (r x r)

with B, A frozen (in the init file) and only R trained (in the adapter file). PEFT's LoRA computes

    y = W0 x + b + (alpha / r) * B' A' x,       B' (out x r),  A' (r x in)

so the two agree exactly (up to float rounding) with

    A' = A,     B' = B R,     alpha = r   (PEFT's scaling alpha / r = 1 = s).

The exported adapter therefore has the size of a plain rank-r LoRA; it loads with
``peft.PeftModel.from_pretrained`` and needs nothing from this package.

Merging folds the adapter into the base weights once and for all:

    W = W0 + s * B R A        (out x in; computed in fp32, stored in W0's dtype)

The base checkpoint's safetensors shards are rewritten one at a time: a shard is opened (memory
mapped), its target weights are replaced, it is written to the output directory and closed before the
next one is opened. Peak memory is about one shard plus the adapter, whatever the size of the model.
Every other file of the checkpoint (config, tokenizer, shard index) is copied unchanged: the tensor
names, shapes and dtypes do not change, so the index stays valid.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError
from .files import FACTORS, Adapter, atomic_save_file, atomic_write_text, give_default_mode, load_adapter
from .layer import merged_weight
from .methods import METHODS
from .zero3_loading import INDEX_FILE, SINGLE_FILE, safetensors_files

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the causal LM


# --------------------------------------------------------------------------- loading an adapter into a model


def apply_adapter(model: torch.nn.Module, adapter_dir: str) -> dict:
    """Wrap the adapter's targets of a plain (unpartitioned) model and load its tensors.

    Every module named in the adapter becomes a ``LoRASBLinear`` (``surgery.wrap_targets`` with the
    adapter's targets and r; the whole model is frozen) holding the adapter's B, A, R in the dtype and
    on the device of its base weight, so the model computes ``W0 x + b + B R A x`` at each target;
    other trained tensors (all weights for ``method: full``) are copied into the model's parameters.
    Everything is checked before the model is touched: the adapter's modules must be exactly the
    model's targets, with the same (out, in) shapes. Returns ``{module name: LoRASBLinear}``.
    """
    from .layer import shape_of
    from .surgery import find_targets, wrap_targets

    adapter, weights, meta = load_adapter(adapter_dir)
    targets, r = list(meta["target_modules"]), int(meta["r"])
    hint = f"pass the model the adapter was trained on ({meta.get('model')})"
    found = {}
    if adapter:
        try:
            found = dict(find_targets(model, targets, r))
        except ConfigError as e:
            raise ConfigError(f"--adapter {adapter_dir} does not fit this model: {e}; {hint}") from None
    missing, extra = sorted(set(adapter) - set(found)), sorted(set(found) - set(adapter))
    if missing or extra:
        raise ConfigError(f"--adapter {adapter_dir} does not fit this model: adapter modules not in the model "
                          f"{missing[:3]}, model targets not in the adapter {extra[:3]}; {hint}")
    for name, linear in found.items():
        B, A, _ = adapter[name]
        if shape_of(linear) != (B.shape[0], A.shape[1]):
            raise ConfigError(f"--adapter {adapter_dir} does not fit this model: '{name}' is {shape_of(linear)} "
                              f"in the model, {(B.shape[0], A.shape[1])} in the adapter; {hint}")
    params = dict(model.named_parameters())
    for key, t in weights.items():
        if key not in params or params[key].shape != t.shape:
            shape = tuple(params[key].shape) if key in params else None
            raise ConfigError(f"--adapter {adapter_dir} does not fit this model: its tensor '{key}' "
                              f"{tuple(t.shape)} is {shape} in the model; {hint}")
    layers = wrap_targets(model, targets, r) if adapter else {}
    with torch.no_grad():
        for key, t in weights.items():
            params[key].copy_(t)
        for name, layer in layers.items():
            layer.to(layer.base.weight.device)
            for part, value in zip(FACTORS, adapter[name]):
                getattr(layer, f"lora_{part}").copy_(value)
    model.requires_grad_(False)
    return layers


# --------------------------------------------------------------------------- PEFT export


def export_peft(adapter_dir: str, out_dir: str, base_model: str | None = None) -> str:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and a model card (``README.md``) of a
    PEFT LoRA adapter to out_dir.

    ``base_model`` is recorded as ``base_model_name_or_path`` (default: the model the adapter was
    trained on; for the built-in model, the checkpoint this package ships, or for the built-in
    classifier a copy written to ``out_dir/base_model``, so the name always resolves). Each file is
    written atomically. Returns out_dir.
    """
    adapter, weights, meta = load_adapter(adapter_dir)
    if not METHODS[meta["method"]].wraps:
        raise ConfigError(f"--adapter {adapter_dir}: method 'full' trained every weight and has no LoRA form; "
                          "write the fine-tuned model with `lorasb merge` instead")
    os.makedirs(out_dir, exist_ok=True)
    base_model = base_model or resolvable_base_model(meta, weights, out_dir)
    atomic_save_file(peft_state_dict(adapter, weights), os.path.join(out_dir, PEFT_WEIGHTS_NAME), {"format": "pt"})
    config = peft_config(meta, base_model)
    atomic_write_text(json.dumps(config, indent=2) + "\n", os.path.join(out_dir, PEFT_CONFIG_NAME))
    atomic_write_text(model_card(meta, config, out_dir), os.path.join(out_dir, "README.md"))
    return out_dir


def resolvable_base_model(meta: dict, weights: dict[str, torch.Tensor], out_dir: str) -> str:
    """The training model as ``from_pretrained`` can load it: a name or path as given; the built-in Llama
    as the checkpoint this package ships; the built-in classifier (built from code) saved to
    ``out_dir/base_model`` with the head size of the trained one."""
    from .modeling import TINY_LLAMA_DIR, builtin_name, tiny_roberta, tiny_tokenizer

    model = meta.get("model")
    if model == builtin_name("causal_lm"):
        return TINY_LLAMA_DIR
    if model == builtin_name("seq_cls"):
        head = [t for key, t in weights.items() if key.endswith("out_proj.weight")]
        path = os.path.join(os.path.abspath(out_dir), "base_model")
        tiny_roberta(head[0].shape[0] if head else 2).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        return path
    return model


VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts (its LoRAConfig, 2025)."""


def model_card(meta: dict, config: dict, out_dir: str) -> str:
    """README.md of an exported adapter: what it is, how it was trained, how to load and serve it."""
    r, t = int(meta["r"]), meta.get("training") or {}
    method = {"lorasb": "LoRA-SB (arXiv 2411.19557): R trained, B and A from the estimated first update",
              "loraxs": "LoRA-XS: R trained, B and A from the SVD of the base weights",
              "lora": "LoRA: B and A trained"}[meta["method"]]
    auto = "AutoPeftModelForSequenceClassification" if meta.get("task") == "seq_cls" else "AutoPeftModelForCausalLM"
    vllm = next((k for k in VLLM_MAX_LORA_RANKS if k >= r), None)
    facts = [("base model", config["base_model_name_or_path"]), ("trained on", meta.get("model")),
             ("method", method), ("rank r", r), ("target modules", ", ".join(meta["target_modules"])),
             ("trained numbers", f"{t['trainable_parameters']:,}" if "trainable_parameters" in t else None),
             ("data", t.get("data")), ("optimizer steps", t.get("steps")), ("global batch", t.get("global_batch")),
             ("final training loss", t.get("final_loss")), ("best validation loss", t.get("best_eval_loss")),
             ("stopped early", t.get("stopped_early"))]
    lines = [f"# {meta['method']} adapter of {meta.get('model')}", "",
             "A PEFT LoRA adapter written by lorasb-ds (`lorasb export`): lora_B = B R, lora_A = A, "
             "lora_alpha = r, so PEFT computes exactly the trained layer W0 x + B R A x.", ""]
    lines += [f"- {name}: {value:.4f}" if isinstance(value, float) else f"- {name}: {value}"
              for name, value in facts if value is not None]
    lines += ["", "## Load with PEFT", "", "```python", f"from peft import {auto}", "",
              f"model = {auto}.from_pretrained({os.path.abspath(out_dir)!r})", "```", "",
              "## Serve with vLLM", "",
              f"vLLM needs `--max-lora-rank` at least r = {r}: " + (
                  f"`--enable-lora --max-lora-rank {vllm}` (it accepts {', '.join(map(str, VLLM_MAX_LORA_RANKS))})."
                  if vllm else f"r = {r} is above every value it accepts ({VLLM_MAX_LORA_RANKS[-1]} at most)."), ""]
    return "\n".join(lines)


def peft_state_dict(adapter: Adapter, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT's saved keys: ``lora_A.weight`` = A (r x in) and ``lora_B.weight`` = B R (out x r), fp32;
    the tensors of ``modules_to_save`` (a classifier's head) under their own names."""
    tensors = {f"{PEFT_PREFIX}{key}": t.contiguous() for key, t in (weights or {}).items()}
    for name, (B, A, R) in adapter.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (B @ R).contiguous()
    return tensors


def peft_config(meta: dict, base_model: str | None) -> dict:
    """``adapter_config.json`` of a LoRA with scaling alpha / r = 1 and no dropout or bias."""
    r = int(meta["r"])
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if meta.get("task") == "seq_cls" else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(meta["target_modules"]),
        "modules_to_save": list(meta.get("modules_to_save") or []) or None,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


# --------------------------------------------------------------------------- merged checkpoint


def merge_checkpoint(base_model_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Write a copy of the base checkpoint with every target weight replaced by ``W0 + B R A``.

    Shards are processed one at a time (see the module docstring). Everything is checked before the
    first byte is written; the result is assembled in a temporary sibling directory and renamed to
    out_dir at the end, so a failed merge leaves no half-written out_dir. Returns out_dir.
    """
    _check_out_dir(base_model_dir, out_dir)
    adapter, weights, _ = load_adapter(adapter_dir)
    shards = list_shards(base_model_dir)
    plan = locate_targets(base_model_dir, shards, adapter, weights)
    tmp_dir = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp_dir)
    try:
        for shard in shards:
            keys = plan.get(shard, [])
            merge_shard(os.path.join(base_model_dir, shard), os.path.join(tmp_dir, shard),
                        {name: adapter[name] for name in keys if name in adapter},
                        {key: weights[key] for key in keys if key in weights})
        # the base model's card describes the base model, not this one: left behind
        _copy_other_files(base_model_dir, tmp_dir, skip=set(shards) | {"README.md"})
        give_default_mode(*(os.path.join(tmp_dir, shard) for shard in shards))
        os.replace(tmp_dir, out_dir)  # out_dir is absent or empty: an atomic rename
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _check_out_dir(base_model_dir: str, out_dir: str) -> None:
    if not os.path.isdir(base_model_dir):
        raise ConfigError(f"--base_model {base_model_dir}: no such directory; pass a local checkpoint "
                          "directory (config.json + *.safetensors)")
    if os.path.realpath(out_dir) == os.path.realpath(base_model_dir):
        raise ConfigError(f"--out {out_dir} is the base model directory; merging never overwrites the base, "
                          "pass a new directory")
    inside = os.path.commonpath([os.path.realpath(out_dir), os.path.realpath(base_model_dir)])
    if inside == os.path.realpath(base_model_dir):
        raise ConfigError(f"--out {out_dir} lies inside the base model directory; pass a directory outside it")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"--out {out_dir} exists and is not an empty directory; pass a new directory "
                          "or remove it first")


def list_shards(base_model_dir: str) -> list[str]:
    """File names of the safetensors shards: those of the index, else the single ``model.safetensors``."""
    files = safetensors_files(base_model_dir)
    if files is None:
        raise ConfigError(f"--base_model {base_model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found; "
                          "re-save the model with save_pretrained (safetensors) first")
    return files


def locate_targets(base_model_dir: str, shards: list[str], adapter: Adapter,
                   weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{shard: [adapter modules whose ``.weight`` it holds, and trained tensor names it holds]}, from the
    shard headers alone (no weights read).

    Raises when a target weight or a trained tensor is in no shard, or its shape differs.
    """
    wanted = {f"{name}.weight": (name, (B.shape[0], A.shape[1])) for name, (B, A, _) in adapter.items()}
    wanted.update({key: (key, tuple(t.shape)) for key, t in weights.items()})
    plan: dict[str, list[str]] = {}
    found = set()
    for shard in shards:
        with safe_open(os.path.join(base_model_dir, shard), framework="pt") as f:
            for key in f.keys():
                if key not in wanted:
                    continue
                name, expected = wanted[key]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected:
                    raise ConfigError(f"--base_model {base_model_dir}: '{key}' is {shape}, the adapter "
                                      f"expects {expected}; pass the model the adapter was trained on")
                plan.setdefault(shard, []).append(name)
                found.add(key)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ConfigError(f"--base_model {base_model_dir}: no shard holds {missing[:3]}"
                          f"{' and more' if len(missing) > 3 else ''}; pass the model the adapter was trained on")
    return plan


def merge_shard(src: str, dst: str, updates: Adapter, replacements: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the shard ``src`` to ``dst`` with ``{name}.weight <- W0 + B R A`` for each of ``updates`` and
    each tensor of ``replacements`` (trained outside any adapter layer) written in place of its original.

    The source is memory mapped: untouched tensors go from the mapping straight to the writer, and only
    the updated weights are materialized. Shard metadata and dtypes are kept.
    """
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        for name, (B, A, R) in updates.items():
            key = f"{name}.weight"
            tensors[key] = merged_weight(tensors[key], B, A, R)
        for key, t in (replacements or {}).items():
            tensors[key] = t.to(tensors[key].dtype)
        save_file(tensors, dst, metadata=metadata)
        del tensors


def _copy_other_files(src_dir: str, dst_dir: str, skip: set[str]) -> None:
    """Every file and folder of src_dir but those of ``skip``, unchanged (the index included)."""
    for entry in sorted(os.listdir(src_dir)):
        if entry in skip:
            continue
        src, dst = os.path.join(src_dir, entry), os.path.join(dst_dir, entry)
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
