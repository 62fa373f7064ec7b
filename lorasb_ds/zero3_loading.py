"""Partitioned loading under ZeRO-3: every rank reads only its own slice of each weight.

``from_pretrained`` under ZeRO-3 reads every checkpoint shard in full on every rank and gathers each
parameter to load it. Here instead:

1. the model is built from its config inside ``deepspeed.zero.Init`` with weight initialization
   switched off: each module's parameters are partitioned as soon as that module is constructed, so
   at most one module's full weights exist at a time, allocated but never written;
2. each rank copies, from the checkpoint's safetensors files, only the flat range of each tensor that
   its partition holds into ``param.ds_tensor``.

No collective runs, except to initialize parameters the checkpoint does not have (``new``).

ZeRO-3 layout (deepspeed ``partition_parameters.py``, ``_partition_param``): a parameter of
``n = ds_numel`` elements is flattened and padded to ``ps * w`` elements over its partition group of
``w`` ranks, ``ps = ds_tensor.numel() = ceil(n / w)``; the group's rank ``k`` holds flat elements
``[k*ps, (k+1)*ps)``, the part past ``n`` (on the last ranks) being padding.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from .config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
READ_BLOCK_BYTES = 16 << 20


class CannotBuild(Exception):
    """The model class cannot be built from its config (raised before anything is partitioned)."""


def unsupported_reason(ds_config: dict) -> str | None:
    """Why a ZeRO-3 config needs transformers' own loader (partitions that are not plain slices)."""
    zero = ds_config.get("zero_optimization", {})
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        return "parameters offloaded to NVMe"
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        return "hpZ secondary partitions (zero_hpz_partition_size > 1)"
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        return "quantized weights"
    return None


def safetensors_files(model_dir: str) -> list[str] | None:
    """File names of a checkpoint's safetensors shards: those of its index, or the single
    ``model.safetensors``; None when it has neither."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
        return [SINGLE_FILE]
    return None


def checkpoint_tensors(model_dir: str) -> dict[str, tuple[str, list[int]]] | None:
    """``{tensor name: (safetensors file, shape)}`` of a single-file or sharded checkpoint (headers
    only); None when the directory holds neither ``model.safetensors`` nor its sharded index."""
    files = safetensors_files(model_dir)
    if files is None:
        return None
    tensors = {}
    for name in files:
        path = os.path.join(model_dir, name)
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensors[key] = (path, list(f.get_slice(key).get_shape()))
    return tensors


def read_flat(path: str, key: str, start: int, out: torch.Tensor, block_bytes: int = READ_BLOCK_BYTES) -> None:
    """Copy the flat (row-major) elements ``[start, start + out.numel())`` of tensor ``key`` into the
    1-D ``out``, converting to its dtype. Whole rows of dim 0 are read in blocks of about
    ``block_bytes``; the file is reopened per block because safetensors hands out views of a memory
    map that stay resident (and count in RSS) until every view and the file are released."""
    stop, pos = start + out.numel(), start
    while pos < stop:
        with safe_open(path, framework="pt") as f:
            sliced = f.get_slice(key)
            shape = sliced.get_shape()
            if not shape:  # a scalar
                out.copy_(f.get_tensor(key).reshape(1))
                return
            row = math.prod(shape[1:])
            row_bytes = max(1, row * sliced[0:1].element_size())
            r0 = pos // row
            r1 = min(-(-stop // row), r0 + max(1, block_bytes // row_bytes))
            take = min(stop, r1 * row) - pos
            block = sliced[r0:r1].reshape(-1)
            out[pos - start:pos - start + take].copy_(block[pos - r0 * row:pos - r0 * row + take])
            del block, sliced
        pos += take


def parameter_names(model: torch.nn.Module) -> list[tuple[list[str], torch.nn.Parameter]]:
    """Every distinct parameter with all of its names (tied parameters have several)."""
    groups: dict[int, tuple[list[str], torch.nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), ([], p))[0].append(name)
    return list(groups.values())


def match_checkpoint(model: torch.nn.Module, tensors: dict[str, tuple[str, list[int]]],
                     new: Iterable[str] = (), unused: Iterable[str] = ()) -> tuple[dict[str, str], list[str]]:
    """Pair the model's parameters and persistent buffers with checkpoint keys, by exact name.

    Returns ``({first name of each parameter / buffer: checkpoint key}, [parameters to initialize])``.
    A tied parameter needs any one of its names in the checkpoint. Parameters matching a regex of
    ``new`` (or the model's ``_keys_to_ignore_on_load_missing``) may be absent: the model's own init
    gives them values. Keys matching ``unused`` (or ``_keys_to_ignore_on_load_unexpected``) are
    skipped. Anything else missing or unexpected, and shape mismatches, raise ``ConfigError``. Works
    on a model built on the meta device, before anything is partitioned.

    A checkpoint of the bare base model (e.g. a ``BertModel``, as sentence-transformers ships it) under a
    model with a head has no ``base_model_prefix`` (``bert.``) on its keys: as ``from_pretrained`` does,
    its keys are then read with that prefix. A non-persistent buffer that an older checkpoint still holds
    (BERT's ``position_ids``) is skipped: the model computes it itself."""
    new = [*new, *(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    unused = [*unused, *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    key_of = {k: k for k in tensors}  # the model's name of each checkpoint tensor -> its key in the file
    prefix = getattr(model, "base_model_prefix", "")
    if (prefix and isinstance(getattr(model, prefix, None), torch.nn.Module)
            and not any(k.startswith(prefix + ".") for k in tensors)):
        key_of = {f"{prefix}.{k}": k for k in tensors}
    sources, fresh, missing, known, wrong = {}, [], [], set(), []
    for names, p in parameter_names(model):
        known.update(names)
        name = next((n for n in names if n in key_of), None)
        if name is not None:
            key = sources[names[0]] = key_of[name]
            if list(tensors[key][1]) != list(p.shape):
                wrong.append(f"{key}: checkpoint {tensors[key][1]}, model {list(p.shape)}")
        elif any(re.search(pat, n) for pat in new for n in names):
            fresh.append(names[0])
        else:
            missing.append(" = ".join(names))
    buffers = dict(model.named_buffers())
    persistent = model.state_dict().keys()
    for name in persistent - known:  # persistent buffers: loaded when present
        known.add(name)
        if name in key_of:
            key = sources[name] = key_of[name]
            if list(tensors[key][1]) != list(buffers[name].shape):
                wrong.append(f"{key}: checkpoint {tensors[key][1]}, model {list(buffers[name].shape)}")
    known.update(buffers.keys() - persistent)  # non-persistent: never loaded
    unexpected = sorted(key_of[k] for k in key_of.keys() - known if not any(re.search(pat, k) for pat in unused))
    problems = []
    for what, names in (("missing from the checkpoint", missing), ("in the checkpoint but not in the model",
                        unexpected), ("of the wrong shape", wrong)):
        if names:
            shown = ", ".join(sorted(names)[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{len(names)} tensor(s) {what}: {shown}")
    if problems:
        raise ConfigError(
            "model.name_or_path: the checkpoint's tensor names do not match the model built from its "
            f"config ({model.__class__.__name__}): " + "; ".join(problems) + ". Partitioned loading "
            "under ZeRO-3 needs a checkpoint whose names are those of model.state_dict() (what "
            "save_pretrained of transformers 5 writes); re-save a legacy or converted checkpoint once "
            "with from_pretrained(...).save_pretrained(...).")
    return sources, fresh


def _init_without_broadcast():
    """``deepspeed.zero.Init`` that partitions each new parameter without first broadcasting rank 0's
    values: they are uninitialized and about to be overwritten. Besides the traffic, the broadcast
    would make every other rank write the full tensor of each module it receives."""
    import deepspeed

    class InitWithoutBroadcast(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


def load_partitioned(model_dir: str, build: Callable[[object], torch.nn.Module], config, ds_config: dict,
                     dtype: torch.dtype, new: Iterable[str] = (), unused: Iterable[str] = ()) -> torch.nn.Module:
    """Build ``build(config)`` (e.g. ``AutoModelForCausalLM.from_config`` with ``dtype``) partitioned
    over the ZeRO-3 group and fill each rank's partition from the safetensors checkpoint in
    ``model_dir``. Every rank runs this; the names are checked on a meta-device copy first, so a bad
    checkpoint fails on every rank before anything is built. ``new`` / ``unused``: see
    ``match_checkpoint``."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    tensors = checkpoint_tensors(model_dir)
    if tensors is None:
        raise ConfigError(f"model.name_or_path: no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    try:
        with torch.device("meta"):
            skeleton = build(config)
    except Exception as e:  # e.g. remote code that from_config does not know; the caller falls back
        raise CannotBuild(f"from_config cannot build it: {type(e).__name__}: {e}") from e
    sources, fresh = match_checkpoint(skeleton, tensors, new, unused)
    partitioned = _init_without_broadcast()(config_dict_or_path=ds_config, dtype=dtype)
    # deepspeed 0.19's Init._set_dtype turns an explicit dtype into bf16 where fp16 is unsupported (CPU).
    partitioned.dtype = dtype
    # zero.Init casts torch.arange to its dtype unless told otherwise, which would change RoPE buffers.
    with no_init_weights(), prevent_arange_dtype_change(), partitioned:
        model = build(config)
    model.tie_weights()  # no_init_weights skipped it
    if sorted(model.state_dict().keys()) != sorted(skeleton.state_dict().keys()):
        raise RuntimeError("the model built under zero.Init differs from its meta-device copy")
    del skeleton
    with torch.no_grad():
        for names, p in parameter_names(model):
            if names[0] not in sources:
                continue
            key = sources[names[0]]
            if not hasattr(p, "ds_id"):  # not partitioned (created outside zero.Init): all of it
                read_flat(tensors[key][0], key, 0, p.data.view(-1))
                continue
            ps = p.ds_tensor.numel()
            start = ps * deepspeed.comm.get_rank(group=p.ds_process_group)
            stop = min(p.ds_numel, start + ps)
            if start < stop:
                read_flat(tensors[key][0], key, start, p.ds_tensor.narrow(0, 0, stop - start))
        for name, buf in model.named_buffers():
            if name in sources:
                with safe_open(tensors[sources[name]][0], framework="pt") as f:
                    buf.copy_(f.get_tensor(sources[name]))
        modules = dict(model.named_modules())
        for owner in dict.fromkeys(name.rpartition(".")[0] for name in fresh):
            module = modules[owner]  # the model's own init on the gathered parameters; rank 0's values are kept
            with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
                model._init_weights(module)
    if model.can_generate() and os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()  # as from_pretrained returns it
