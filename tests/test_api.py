"""The library API (lorasb_ds.api): README's example runs as written in one process, and LoRA-SB inside
transformers' Trainer with a ZeRO-3 config at 2 ranks: one estimation, only R in the optimizer, and an
adapter that stock PEFT loads with the same logits."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, torchrun
from lorasb_ds.cli import main as cli_main


def readme_api_example() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Library API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs_as_written(tmp_path):
    proc = subprocess.run([sys.executable, "-c", readme_api_example()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[lorasb] estimation: 2 micro-batches per rank" in proc.stdout
    trained = load_file(tmp_path / "out" / "adapter" / "lorasb_adapter.safetensors")
    init = load_file(tmp_path / "out" / "adapter" / "lorasb_init.safetensors")
    assert trained and all(k.endswith(".lora_R") for k in trained)
    assert any(not torch.equal(trained[k], init[k]) for k in trained)  # the loop trained R
    assert cli_main(["export", "--adapter", str(tmp_path / "out" / "adapter"), "--out", str(tmp_path / "peft")]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind,ranks", [("trainer", 2), ("sft", 1)])
def test_trainer_with_zero3_trains_only_R_and_exports_to_peft(tmp_path, kind, ranks):
    """transformers' Trainer at 2 ranks; TRL's SFTTrainer at 1 (at 2 gloo ranks TRL's own token-accuracy
    metric fails: accelerate's gather of a 0-d tensor)."""
    import peft
    from transformers import AutoModelForCausalLM

    from lorasb_ds.modeling import TINY_LLAMA_DIR

    if kind == "sft":
        pytest.importorskip("trl")
    out = tmp_path / kind
    proc = torchrun(ranks, "tests/workers/trainer_worker.py", str(out), kind)
    assert proc.stdout.count("[lorasb] estimation: 3 micro-batches per rank") == 1
    report = json.load(open(out / "report.json"))
    assert report["estimations"] == 1 and report["global_step"] == 2
    assert all(name.endswith(".lora_R") for name in report["trained_names"])
    assert report["fp32_master_elements"] == report["r_elements"] == 28 * 8 * 8
    assert report["adam_state_elements"] == 2 * report["r_elements"]
    assert cli_main(["export", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    saved = torch.load(out / "logits.pt")
    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA_DIR, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base.eval()(input_ids=saved["ids"]).logits.float()
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        got = peft_model(input_ids=saved["ids"]).logits.float()
    assert float((saved["logits"] - base_logits).abs().max()) > 1e-3  # the adapter does something
    assert float((got - saved["logits"]).abs().max()) <= 1e-4
