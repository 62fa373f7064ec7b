"""Every data format and task type through training: instruction tuning of a Llama-style decoder on each
instruction format, and GLUE sequence classification of a RoBERTa-style encoder (single sentences,
pairs, regression), each a short 2-rank ZeRO-3 run. The classifiers are then evaluated, exported to
PEFT and merged. One classifier starts from an encoder saved as pretrained encoders are published (an
LM head, no classifier): its head is new, its LM head unused.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import RobertaForMaskedLM

from conftest import REPO, torchrun
from lorasb_ds.evaluate import EvalSettings, run_eval
from lorasb_ds.export import apply_adapter, export_peft, merge_checkpoint
from lorasb_ds.files import ADAPTER_FILE_NAME
from lorasb_ds.modeling import tiny_llama, tiny_roberta, tiny_roberta_config, tiny_tokenizer

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "workers", "tasks_worker.py")
SAMPLES = os.path.join(REPO, "data", "samples")
R = 4
ENCODER_TARGETS = "[query,value,attention.output.dense,output.dense]"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
COMMON = [f"lorasb.r={R}", "lorasb.est_samples=4", "lorasb.est_micro_batch=2", "train.max_steps=2",
          "train.lr=1e-2", "train.warmup_ratio=0"]
SAMPLE = {"metamath": "metamath.jsonl", "alpaca": "alpaca.jsonl", "commonsense": "commonsense.json",
          "chat": "chat.jsonl"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    chat_model, encoder = out / "chat-model", out / "encoder"
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_llama().save_pretrained(chat_model)
    tokenizer.save_pretrained(chat_model)
    tiny_roberta(2).save_pretrained(encoder, max_shard_size="150KB")  # several shards, for merge
    tiny_tokenizer().save_pretrained(encoder)
    pretrained = out / "masked-lm"  # as a pretrained encoder is published: an LM head, no classifier
    mlm_config = tiny_roberta_config(2)
    mlm_config.problem_type = None
    RobertaForMaskedLM(mlm_config).save_pretrained(pretrained)
    tiny_tokenizer().save_pretrained(pretrained)
    cases = {}
    for fmt, sample in SAMPLE.items():
        cases[fmt] = [f"data.format={fmt}", f"data.path={SAMPLES}/{sample}"]
    cases["chat"].append(f"model.name_or_path={chat_model}")
    for task, model in (("sst2", None), ("mrpc", encoder), ("stsb", pretrained)):
        cases[f"glue-{task}"] = ["model.task=seq_cls", "data.format=glue", f"data.glue_task={task}",
                                 f"data.path={SAMPLES}/glue_{task}.jsonl", f"lorasb.target_modules={ENCODER_TARGETS}",
                                 *([f"model.name_or_path={model}"] if model else [])]
    spec = [{"overrides": [*COMMON, *o, f"train.output_dir={out / name}"]} for name, o in cases.items()]
    (out / "cases.json").write_text(json.dumps(spec))
    torchrun(2, WORKER, str(out / "cases.json"))
    return out, encoder, pretrained


@pytest.mark.parametrize("name", [*SAMPLE, "glue-sst2", "glue-mrpc", "glue-stsb"])
def test_each_format_and_task_trains(runs, name):
    out = runs[0]
    run_dir = out / name
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert records[0]["event"] == "init" and records[0]["estimated"] is True
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert os.path.isfile(run_dir / "adapter" / ADAPTER_FILE_NAME)


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_classifier_trains_R_and_the_whole_head(runs, task):
    out = runs[0]
    run_dir = out / f"glue-{task}"
    trained = load_file(run_dir / "adapter" / ADAPTER_FILE_NAME)
    base = tiny_roberta(1 if task == "stsb" else 2)
    head = {n: p for n, p in base.named_parameters() if n.startswith("classifier.")}
    assert set(trained) == set(head) | {k for k in trained if k.endswith(".lora_R")}
    assert len([k for k in trained if k.endswith(".lora_R")]) == 8  # 4 targets x 2 layers
    assert all(trained[n].shape == p.shape for n, p in head.items())
    if task == "sst2":  # the built-in model: its head before training is known
        assert all((trained[n] - p.detach()).abs().max() > 0 for n, p in head.items())  # the head moved
    summary = json.load(open(run_dir / "run_summary.json"))
    assert summary["trainable_parameters"] == 8 * R * R + sum(p.numel() for p in head.values())
    meta = json.load(open(run_dir / "run_config.json"))
    assert meta["run"]["model"]["task"] == "seq_cls"


@pytest.mark.parametrize("task, metrics", [("sst2", {"accuracy"}), ("mrpc", {"accuracy", "f1"}),
                                           ("stsb", {"pearson", "spearman"})])
def test_classifiers_evaluate_with_their_metrics(runs, task, metrics, tmp_path):
    out, encoder, pretrained = runs
    model = {"sst2": None, "mrpc": str(encoder), "stsb": str(pretrained)}[task]
    [summary] = run_eval(EvalSettings(task="glue", glue_task=task, data=f"{SAMPLES}/glue_{task}.jsonl",
                                      adapter=str(out / f"glue-{task}" / "adapter"), out=str(tmp_path), model=model))
    assert set(summary["metrics"]) == metrics and summary["rows"] == 40
    assert all(-1.0 <= v <= 1.0 for v in summary["metrics"].values())
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert [r["index"] for r in rows] == list(range(40))
    kind = float if task == "stsb" else int
    assert all(isinstance(r["prediction"], kind) for r in rows)


def test_classifier_exports_to_peft_and_merges_with_the_same_logits(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out, encoder, _ = runs
    adapter = str(out / "glue-mrpc" / "adapter")
    ours = AutoModelForSequenceClassification.from_pretrained(encoder, dtype=torch.float32)
    apply_adapter(ours, adapter)
    ids = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    export_peft(adapter, str(tmp_path / "peft"), str(encoder))
    config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(encoder),
                                           str(tmp_path / "peft"))
    assert (logits(peft_model) - logits(ours)).abs().max() <= 1e-4
    merge_checkpoint(str(encoder), adapter, str(tmp_path / "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logits(merged) - logits(ours)).abs().max() <= 1e-4
    plain = AutoModelForSequenceClassification.from_pretrained(encoder, dtype=torch.float32)
    assert (logits(plain) - logits(ours)).abs().max() > 1e-4  # the adapter and head change the output
