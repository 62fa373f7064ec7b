"""The run's files: where each one lives, what it holds, how it is read and written.

    <output_dir>/
        run_config.json                  the run's settings and DeepSpeed config      (rank 0, at the start)
        lorasb_init.safetensors          B, A, R0 per module + metadata, INIT_FORMAT    (rank 0, after the init)
        metrics.jsonl                    one JSON record per step or event                  (runlog.py)
        checkpoints/stepNNNNNNNN/COMPLETE  a checkpoint's marker (JSON), written last   (checkpoint.py)
        adapter/lorasb_adapter.safetensors  the trained tensors + metadata, ADAPTER_FORMAT (rank 0, at the end)
        adapter/lorasb_init.safetensors     a copy of the init file
        run_summary.json                 what the run did                                 (rank 0, at the end)

Every file is written by ``atomic_write``: under a temporary name beside its place, flushed to disk,
then renamed over it, so a reader (or a resumed run) sees the old file or the new one, never half of one.
The init and adapter files are safetensors with their metadata as JSON under the key ``lorasb``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ConfigError

RUN_CONFIG_NAME = "run_config.json"
RUN_SUMMARY_NAME = "run_summary.json"
METRICS_NAME = "metrics.jsonl"
INIT_FILE_NAME = "lorasb_init.safetensors"
ADAPTER_DIR_NAME = "adapter"
ADAPTER_FILE_NAME = "lorasb_adapter.safetensors"
MARKER = "COMPLETE"
INIT_FORMAT = "lorasb-init-v1"
ADAPTER_FORMAT = "lorasb-adapter-v1"
FACTORS = ("B", "A", "R")

Adapter = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""{module name: (B (out x r), A (r x in), R (r x r))}, CPU fp32, as trained (LoRA-SB: R trained)."""


# --------------------------------------------------------------------------- writing


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is synced and renamed over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str) -> None:
    """``text`` (UTF-8) to ``path``."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` of ``tensors`` (made contiguous) with ``metadata`` to ``path``."""
    def write(tmp: str) -> None:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
        give_default_mode(tmp)

    atomic_write(path, write)


def give_default_mode(*paths: str) -> None:
    """Each file of ``paths`` (a folder: each file in it) gets the mode ``open`` would have given it,
    0666 less the umask, as the run's other files have: safetensors writes its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names] if os.path.isdir(path) else [path]
        for file in files:
            os.chmod(file, 0o666 & ~umask)


# --------------------------------------------------------------------------- run config, summary, marker


def own_init_file(output_dir: str) -> str:
    """Where a run keeps the init file it estimates itself (``train.init_file`` unset)."""
    return os.path.join(output_dir, INIT_FILE_NAME)


def is_own_init_file(path: str, output_dir: str) -> bool:
    """``path`` is the init file the run in ``output_dir`` estimated (not one it was given)."""
    return os.path.abspath(path) == os.path.abspath(own_init_file(output_dir))


def write_run_config(output_dir: str, run: dict, ds_config: dict) -> None:
    """``run_config.json``: the resolved run settings and the DeepSpeed config. Rank 0 only."""
    atomic_write_text(json.dumps({"run": run, "deepspeed": ds_config}, indent=2),
                      os.path.join(output_dir, RUN_CONFIG_NAME))


def holds_a_run(output_dir: str) -> bool:
    """A run has started in ``output_dir`` (its ``run_config.json`` is there)."""
    return os.path.exists(os.path.join(output_dir, RUN_CONFIG_NAME))


def write_run_summary(output_dir: str, summary: dict) -> None:
    """``run_summary.json``. Rank 0 only."""
    atomic_write_text(json.dumps(summary, indent=2), os.path.join(output_dir, RUN_SUMMARY_NAME))


def write_marker(checkpoint_dir: str, marker: dict) -> None:
    """A checkpoint's ``COMPLETE`` marker (JSON); written last, it makes the checkpoint count. Rank 0 only."""
    atomic_write_text(json.dumps(marker, indent=2), os.path.join(checkpoint_dir, MARKER))


def read_marker(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, MARKER)) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the init file


@dataclass
class LayerInit:
    B: torch.Tensor  # (out, r) fp32
    A: torch.Tensor  # (r, in) fp32
    R: torch.Tensor  # (r, r) fp32
    energy: float  # sum(S_r^2) / ||dW||_F^2
    svd_iterations: int = 0  # TruncatedSVD.iterations of the SVD that made B, A (0: none, or exact)


def save_init_file(path: str, inits: dict[str, LayerInit], metadata: dict) -> None:
    """B, A, R per module plus ``metadata`` (and each module's energy and SVD iterations). Rank 0 only."""
    tensors = {}
    for name, init in inits.items():
        tensors.update({f"{name}.lora_{m}": getattr(init, m) for m in FACTORS})
    meta = dict(metadata, format=INIT_FORMAT, energy={n: i.energy for n, i in inits.items()},
                svd_iterations={n: i.svd_iterations for n, i in inits.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save_file(tensors, path, {"lorasb": json.dumps(meta)})


def read_init_metadata(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("lorasb")
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"train.init_file {path} cannot be read as safetensors ({e}); it may be truncated: "
                          "use a complete init file or drop train.init_file to estimate anew") from None
    if raw is None:
        raise ConfigError(f"train.init_file {path} is not a LoRA-SB init file (no 'lorasb' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != INIT_FORMAT:
        raise ConfigError(f"train.init_file {path}: format {meta.get('format')!r}, expected {INIT_FORMAT}")
    return meta


def check_init_metadata(path: str, meta: dict, expected: dict) -> None:
    """The init file must come from the same model, targets and rank as this run."""
    for key, want in expected.items():
        if meta.get(key) != want:
            raise ConfigError(
                f"train.init_file {path} was made for {key} = {meta.get(key)!r}, this run has {want!r}; "
                "use an init file of this configuration or drop train.init_file to estimate anew"
            )


def load_init_file(path: str, layers: dict) -> tuple[dict[str, LayerInit], dict]:
    """Read every module's B, A, R (CPU fp32); names and shapes checked against ``layers``
    (``{module name: LoRASBLinear}``)."""
    meta = read_init_metadata(path)
    inits: dict[str, LayerInit] = {}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        wanted = {f"{n}.lora_{m}" for n in layers for m in FACTORS}
        if keys != wanted:
            extra, missing = sorted(keys - wanted)[:3], sorted(wanted - keys)[:3]
            raise ConfigError(f"train.init_file {path} does not match this model's targets "
                              f"(missing {missing}, unexpected {extra})")
        for name, layer in layers.items():
            B, A, R = (f.get_tensor(f"{name}.lora_{m}").float() for m in FACTORS)
            want = [(layer.out_features, layer.r), (layer.r, layer.in_features), (layer.r, layer.r)]
            if [tuple(B.shape), tuple(A.shape), tuple(R.shape)] != want:
                raise ConfigError(f"train.init_file {path}: shapes of '{name}' differ from this model's")
            inits[name] = LayerInit(B, A, R, float(meta.get("energy", {}).get(name, float("nan"))),
                                    int(meta.get("svd_iterations", {}).get(name, 0)))
    return inits, meta


# --------------------------------------------------------------------------- the adapter directory


def save_adapter(adapter_dir: str, trained: dict[str, torch.Tensor], init_path: str, init_meta: dict) -> None:
    """``adapter/lorasb_adapter.safetensors`` beside a copy of the init file (B, A, R0). Rank 0 only.

    ``trained``: every trained tensor by its parameter name in the wrapped model: ``<module>.lora_R``
    for LoRA-SB and LoRA-XS, ``<module>.lora_A``/``.lora_B`` for LoRA, every weight for ``full``.
    """
    os.makedirs(adapter_dir, exist_ok=True)
    init_copy = os.path.join(adapter_dir, INIT_FILE_NAME)
    if os.path.abspath(init_path) != os.path.abspath(init_copy):
        atomic_write(init_copy, lambda tmp: shutil.copyfile(init_path, tmp))
    meta = {"format": ADAPTER_FORMAT, "init_file": INIT_FILE_NAME, "method": init_meta.get("method", "lorasb"),
            "task": init_meta.get("task", "causal_lm"), "modules_to_save": init_meta.get("modules_to_save", []),
            "training": init_meta.get("training", {}),
            **{k: init_meta[k] for k in ("init_id", "model", "target_modules", "r")}}
    atomic_save_file(trained, os.path.join(adapter_dir, ADAPTER_FILE_NAME), {"lorasb": json.dumps(meta)})


def load_adapter(adapter_dir: str) -> tuple[Adapter, dict[str, torch.Tensor], dict]:
    """Read ``lorasb_adapter.safetensors`` (the trained tensors) over its init file (the starting B, A, R).

    Returns ``(adapter, weights, meta)``: ``adapter`` is ``{module: (B, A, R)}`` (out x r, r x in,
    r x r; CPU fp32) with the trained factors in place of their initial values; ``weights`` holds every
    other trained tensor by parameter name (all weights for ``method: full``); ``meta`` is the adapter's
    metadata (``method``, ``init_id``, ``model``, ``target_modules``, ``r``, ...).
    """
    adapter_path = os.path.join(adapter_dir, ADAPTER_FILE_NAME)
    meta = _read_lorasb_meta(adapter_path, ADAPTER_FORMAT, adapter_dir)
    meta.setdefault("method", "lorasb")
    init_path = os.path.join(adapter_dir, meta.get("init_file") or INIT_FILE_NAME)
    init_meta = _read_lorasb_meta(init_path, INIT_FORMAT, adapter_dir)
    if init_meta.get("init_id") != meta.get("init_id"):
        raise ConfigError(
            f"--adapter {adapter_dir}: init_id {meta.get('init_id')!r} of {ADAPTER_FILE_NAME} differs from "
            f"init_id {init_meta.get('init_id')!r} of {os.path.basename(init_path)}: it was trained from other "
            "B, A; put the init file of the same run beside the adapter"
        )
    trained = _read_tensors(adapter_path)
    init = _read_tensors(init_path)
    names = _module_names(init, adapter_dir)
    factors = {f"{n}.lora_{m}" for n in names for m in FACTORS}
    adapter = {n: tuple(trained.get(f"{n}.lora_{m}", init[f"{n}.lora_{m}"]) for m in FACTORS) for n in names}
    weights = {key: t for key, t in trained.items() if key not in factors}
    stray = [key for key in weights if ".lora_" in key]
    if stray:
        raise ConfigError(f"--adapter {adapter_dir}: trained tensors {stray[:3]} belong to no module of the "
                          "init file; use the init file of the same run")
    _check_shapes(adapter, int(meta["r"]), adapter_dir)
    return adapter, weights, meta


def _read_lorasb_meta(path: str, expected_format: str, adapter_dir: str) -> dict:
    """The JSON under the safetensors metadata key ``lorasb``, checked to be of ``expected_format``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--adapter {adapter_dir}: no file {os.path.basename(path)}; "
                          "pass the adapter/ directory written by `lorasb train`")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("lorasb")
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ConfigError(f"--adapter {adapter_dir}: {os.path.basename(path)} is not a readable safetensors "
                          f"file ({e}); write the adapter again") from None
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != expected_format:
        raise ConfigError(f"--adapter {adapter_dir}: {os.path.basename(path)} has format "
                          f"{meta.get('format')!r}, expected {expected_format!r}; "
                          "pass the adapter/ directory written by `lorasb train`")
    return meta


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key).float().contiguous() for key in f.keys()}


def _module_names(init: dict, adapter_dir: str) -> list[str]:
    """Module names of the init file, sorted; each must have its B, A and R."""
    names = sorted({key.rsplit(".lora_", 1)[0] for key in init})
    wanted = {f"{n}.lora_{m}" for n in names for m in FACTORS}
    if set(init) != wanted:
        missing = sorted(wanted - set(init))[:3]
        raise ConfigError(f"--adapter {adapter_dir}: the init file lacks {missing}; it is damaged, use the "
                          "init file of the same run")
    return names


def _check_shapes(adapter: Adapter, r: int, adapter_dir: str) -> None:
    for name, (B, A, R) in adapter.items():
        if B.shape[1] != r or A.shape[0] != r or tuple(R.shape) != (r, r):
            raise ConfigError(f"--adapter {adapter_dir}: '{name}' has B {tuple(B.shape)}, A {tuple(A.shape)}, "
                              f"R {tuple(R.shape)}, not (out x {r}), ({r} x in), ({r} x {r}); the files are "
                              "inconsistent, export again from the training run's adapter/")
