"""Evaluation of a trained LoRA-SB adapter: greedy generation and answer scoring, or GLUE classification.

``lorasb eval --task gsm8k|math|commonsense --data FILE.jsonl [--model DIR] --adapter OUT/adapter --out DIR``
``lorasb eval --task glue --glue_task sst2 --data FILE.jsonl [--model DIR] --adapter OUT/adapter --out DIR``
``lorasb eval --task gsm8k --data test.jsonl other.jsonl --out eval/test eval/other ...``: several data files
scored in one launch (the model loaded once), each into the ``--out`` directory of the same position.

GLUE (``--task glue``) runs the classifier instead of generating: one forward pass per batch (right
padded, cut at ``GLUE_MAX_LENGTH`` tokens), the predicted class is the argmax of the logits (``stsb``:
the single output as the score), and the summary holds the task's metrics (``glue.py``).

What it does, in order:

1. **Checks** (every rank, nothing loaded yet): each data file and its columns, every row's gold
   answer, the adapter files, the output directory, the launch variables. A problem is a
   ``ConfigError`` (exit code 2) naming the file, column or row.
2. **Model**: the base model (``AutoModelForCausalLM.from_pretrained(--model)``, or the built-in tiny
   Llama when no model is given), with the adapter (when ``--adapter`` is given; without it the base
   model is evaluated alone, e.g. zero-shot) applied by ``export.apply_adapter``: every target
   Linear wrapped in ``LoRASBLinear`` holding ``B``, ``A`` and the trained ``R``. Plain torch, no
   DeepSpeed: each rank holds the whole model on one device (``cuda:LOCAL_RANK`` when CUDA is
   available, else the CPU).
3. **Generation**: greedy decoding (``do_sample=False``, one beam) of at most ``--max_new_tokens``
   tokens, in batches of ``--batch_size`` prompts, left padded. Within a rank the prompts are taken
   longest first, which keeps padding small; greedy results do not depend on the batch a prompt is in
   (up to float rounding).
4. **Sharding**: started by ``torchrun``, the ``deepspeed`` runner, ``mpirun`` or ``srun`` (ranks found
   as for training, ``ranks.py``), rank k generates rows k, k + world, k + 2 world, ...
   Generation needs no communication; afterwards every rank makes exactly one ``gather_object`` to
   rank 0 (the rows of every data file) and one ``broadcast_object_list`` of the outcome (gloo: only
   Python objects travel), so a rank with fewer rows, or none, cannot make the others hang, and an
   error on any rank is reported by all. A single process needs no launcher.
5. **Outputs** (rank 0), per data file in its ``--out``: ``generations.jsonl`` (``predictions.jsonl``
   for GLUE; one line per row, in data order) and ``summary.json``.

Prompts
-------
``--prompt_template reference`` (the default): the Alpaca template of training
(``data.ALPACA_TEMPLATE``) with the query as instruction. For GSM8K and MATH the response header is
followed by the reference's chain-of-thought cue, so the prompt ends ``### Response: Let's think step
by step.``; commonsense rows get exactly the prompt of training (``data.alpaca_prompt``: the
``### Input:`` section when ``input`` is not empty). For GSM8K and MATH, ``--prompt_template
alpaca|plain|chat`` gives instead exactly the prompt that training with that ``data.prompt_template``
built for the same query (``data.format_prompt``; ``chat``: the model's chat template, which writes
the special tokens itself).

Data (local ``.json`` / ``.jsonl``, read with ``datasets``)
-----------------------------------------------------------
* ``gsm8k``: ``question``, ``answer``. Gold: the number after the last ``####`` of ``answer``; an
  ``answer`` without ``####`` must be a number by itself (e.g. ``"72"`` or ``72``).
* ``math``: ``problem`` and either ``answer`` (the final answer, used as given) or ``solution`` (gold:
  the content of its last ``\\boxed{...}`` / ``\\fbox{...}``, braces balanced).
* ``commonsense``: ``instruction``, ``answer``, optional ``input`` (the LLM-Adapters layout). Gold: one
  of the answer tokens ``answer1``-``answer5``, ``option1``-``option2``, ``solution1``-``solution2``,
  ``ending1``-``ending4``, ``true``/``false``; the token's family decides which tokens are looked for
  in that row's generation.

Scoring: ``scoring.py`` (its docstring states the rules).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from . import glue
from .config import ConfigError, could_be_hub_name
from .data import (PROMPT_TEMPLATES, alpaca_prompt, format_prompt, require_chat_template,
                   template_writes_special_tokens)
from .ranks import current_world, join_launch, start_gloo_group
from .files import atomic_write_text
from .scoring import (TASKS, Example, commonsense_family, format_number, gsm8k_gold, math_gold, math_value,
                      score)

GLUE_MAX_LENGTH = 512
DEFAULT_MAX_NEW_TOKENS = 256
GENERATIONS_FILE = "generations.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"  # --task glue
SUMMARY_FILE = "summary.json"
COT_CUE = " Let's think step by step."
RESPONSE_HEADER = "### Response:"

EVAL_PROMPT_TEMPLATES = ("reference", *PROMPT_TEMPLATES)


def eval_prompt(example: Example, template: str, tokenizer) -> str:
    """The prompt generated from: the example's reference prompt, or the training prompt of its query
    under ``data.prompt_template=template`` (GSM8K and MATH)."""
    return example.prompt if template == "reference" else format_prompt(example.query, template, tokenizer)


def math_prompt(query: str) -> str:
    """The Alpaca prompt with the reference's cue: ``... ### Response: Let's think step by step.``"""
    text = format_prompt(query, "alpaca")
    head, sep, tail = text.rpartition(RESPONSE_HEADER)
    if not sep or tail.strip():
        return text + COT_CUE.strip()
    return head + sep + COT_CUE


COLUMNS = {"gsm8k": ("question", "answer"), "math": ("problem",), "commonsense": ("instruction", "answer")}


def _read_rows(path: str):
    import datasets

    if not path.lower().endswith((".json", ".jsonl")):
        raise ConfigError(f"--data {path}: expected a .json or .jsonl file")
    if not os.path.isfile(path):
        raise ConfigError(f"--data: no such file '{path}'")
    with open(path, "rb") as f:
        blank = not f.read(1 << 16).strip()
    if blank:
        raise ConfigError(f"--data {path} is empty: it holds no rows")
    try:
        return datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise ConfigError(f"--data {path} could not be read as JSON/JSON Lines: {type(e).__name__}: {e}") from e


def load_examples(task: str, path: str, limit: int = 0, glue_task: str | None = None) -> list[Example]:
    """The rows of ``path`` as examples with prompts and parsed golds; every row checked up front."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    ds = _read_rows(path)
    columns = ds.column_names
    needed = (*glue.task_of(glue_task, "--glue_task").text_columns, "label") if task == "glue" else COLUMNS[task]
    missing = [c for c in needed if c not in columns]
    if task == "math" and "answer" not in columns and "solution" not in columns:
        missing.append("answer or solution")
    if missing:
        raise ConfigError(f"--data {path}: no column {', '.join(repr(c) for c in missing)} for --task {task} "
                          f"(columns present: {', '.join(columns)}); {task} needs {_needs(task)}")
    if len(ds) == 0:
        raise ConfigError(f"--data {path} is empty: it holds no rows")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    examples = []
    for i, row in enumerate(ds):
        try:
            examples.append(_glue_example(glue_task, i, row) if task == "glue" else _example(task, i, row))
        except ValueError as e:
            raise ConfigError(f"--data {path}, row {i}: cannot read the gold answer: {e}") from None
    return examples


def _needs(task: str) -> str:
    return {"glue": "the task's text columns and 'label' (the GLUE layout)","gsm8k": "'question' and 'answer' (with '#### <number>')",
            "math": "'problem' and 'answer' or 'solution' (with \\boxed{...})",
            "commonsense": "'instruction' and 'answer' (an answer token), optionally 'input'"}[task]


def _example(task: str, index: int, row: dict) -> Example:
    if task == "gsm8k":
        value = gsm8k_gold(row["answer"])
        query = str(row["question"])
        return Example(index, query, math_prompt(query), format_number(value), gold_value=value)
    if task == "math":
        gold = math_gold(row)
        query = str(row["problem"])
        return Example(index, query, math_prompt(query), gold, gold_value=math_value(gold))
    gold = str(row["answer"]).strip()
    family = commonsense_family(gold)
    query = str(row["instruction"])
    extra = row.get("input")
    return Example(index, query, alpaca_prompt(query, None if extra is None else str(extra)), gold,
                   family=family)


def _glue_example(glue_task: str, index: int, row: dict) -> Example:
    task = glue.task_of(glue_task, "--glue_task")
    label = row["label"]
    if label is None or (not glue.is_regression(task) and label not in range(task.num_labels)):
        raise ValueError(f"label {label!r} is not a class of {glue_task} (GLUE test splits are unlabelled: "
                         "evaluate on the validation split)")
    texts = tuple(str(row[c]) for c in task.text_columns)
    return Example(index, " ||| ".join(texts), "", str(label), texts=texts, label=label)


# --------------------------------------------------------------------------- model


@dataclass
class EvalSettings:
    task: str
    data: list[str]  # data files (a str: one), scored in one launch, each into the out at its position
    adapter: str | None  # None: the base model alone (a zero-shot baseline)
    out: list[str]  # one output directory per data file (a str: one)
    model: str | None = None
    glue_task: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 8
    limit: int | list[int] = 0  # the first N rows of every file (0: all), or one N per data file
    dtype: str = "auto"
    device: str = "auto"
    dist_timeout_minutes: float = 60.0
    trust_remote_code: bool = False
    prompt_template: str = "reference"  # or a data.prompt_template: the training prompt of the same query

    def __post_init__(self):
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        self.out = [self.out] if isinstance(self.out, str) else list(self.out)
        self.limit = [self.limit] if isinstance(self.limit, int) else list(self.limit)
        if len(self.limit) == 1:
            self.limit = self.limit * len(self.data)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_settings(s: EvalSettings) -> None:
    if s.task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {s.task!r}")
    if (s.task == "glue") != (s.glue_task is not None):
        raise ConfigError("--glue_task names the GLUE task and goes with --task glue only")
    if s.task == "glue":
        glue.task_of(s.glue_task, "--glue_task")
    for name, value, low in (("--max_new_tokens", s.max_new_tokens, 1), ("--batch_size", s.batch_size, 1),
                             ("--limit", min(s.limit, default=0), 0)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    if s.dtype != "auto" and s.dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be auto, fp32, bf16 or fp16, got {s.dtype!r}")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {s.device!r}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")
    if s.dist_timeout_minutes <= 0:
        raise ConfigError(f"--dist_timeout_minutes must be positive, got {s.dist_timeout_minutes}")
    if s.prompt_template not in EVAL_PROMPT_TEMPLATES:
        raise ConfigError(f"--prompt_template must be one of {', '.join(EVAL_PROMPT_TEMPLATES)}, "
                          f"got {s.prompt_template!r}")
    if s.prompt_template != "reference" and s.task not in ("gsm8k", "math"):
        raise ConfigError(f"--prompt_template {s.prompt_template} applies to --task gsm8k and math only; "
                          f"--task {s.task} uses its training prompt as it is")
    if s.model and not os.path.isdir(os.path.expanduser(s.model)) and not could_be_hub_name(s.model):
        raise ConfigError(f"--model: no such directory '{s.model}'")
    if s.adapter is not None and not os.path.isdir(s.adapter):
        raise ConfigError(f"--adapter: no such directory '{s.adapter}'; pass the adapter/ directory "
                          "written by `lorasb train`")
    if len(s.out) != len(s.data):
        raise ConfigError(f"--data names {len(s.data)} file(s) but --out {len(s.out)} director(y/ies): give one "
                          "--out directory per --data file, in the same order")
    if len(s.limit) != len(s.data):
        raise ConfigError(f"--data names {len(s.data)} file(s) but --limit gives {len(s.limit)} numbers: give one "
                          "--limit for every file, or one per --data file, in the same order")
    if len({os.path.abspath(o) for o in s.out}) != len(s.out):
        raise ConfigError(f"--out {' '.join(s.out)}: a directory named twice; each data file needs its own")
    for out in s.out:
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"--out {out} exists and is not a directory")
        parent = os.path.abspath(out)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"--out {out}: {parent} is not writable")


def pick_device(s: EvalSettings) -> torch.device:
    if s.device == "cpu" or (s.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def pick_dtype(s: EvalSettings, device: torch.device) -> torch.dtype:
    if s.dtype != "auto":
        return _DTYPES[s.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(s: EvalSettings):
    """The tokenizer of ``--model`` (the built-in one without it), loaded as training loads it."""
    from .config import ModelConfig
    from .modeling import load_tokenizer as load_model_tokenizer

    try:
        return load_model_tokenizer(ModelConfig(name_or_path=s.model, trust_remote_code=s.trust_remote_code))
    except OSError as e:
        raise ConfigError(f"--model {s.model}: cannot load its tokenizer ({e}); pass a local model directory") from None


def load_model_and_tokenizer(s: EvalSettings, device: torch.device, dtype: torch.dtype):
    """The base model with the adapter applied (eval mode, on ``device``) and its tokenizer (left padding
    for generation, right padding for GLUE)."""
    from .export import apply_adapter
    from .modeling import auto_class, task_kwargs, tiny_llama, tiny_roberta

    model_task = "seq_cls" if s.task == "glue" else "causal_lm"
    num_labels = glue.task_of(s.glue_task, "--glue_task").num_labels if s.task == "glue" else None
    tokenizer = load_tokenizer(s)
    if s.model:
        try:
            # straight onto the GPU: no rank holds a host copy of the whole model
            placement = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
            model = auto_class(model_task).from_pretrained(s.model, dtype=dtype, trust_remote_code=s.trust_remote_code,
                                                           **task_kwargs(model_task, num_labels), **placement)
        except OSError as e:
            raise ConfigError(f"--model {s.model}: cannot load it ({e}); pass a local model directory") from None
    else:
        model = tiny_roberta(num_labels, dtype) if s.task == "glue" else tiny_llama(dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right" if s.task == "glue" else "left"
    if s.adapter:
        apply_adapter(model, s.adapter)
    return model.to(device).eval(), tokenizer


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             device: torch.device, progress=None, add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (same order), decoded without special tokens.

    ``add_special_tokens=False`` for prompts that hold their special tokens (a chat template's), as
    training tokenized them.

    Token ids the tokenizer does not know (``len(tokenizer)`` up to the model's vocabulary size) are
    suppressed. Batches are formed longest prompt first; each is left padded, so every prompt ends at the last
    input position and generation starts for all rows at once.
    """
    from transformers import GenerationConfig

    # Ids past the tokenizer's vocabulary (an embedding padded to a round size) decode to nothing: never
    # pick them.
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else getattr(model.config, "vocab_size", len(tokenizer))
    unreachable = list(range(len(tokenizer), vocab)) or None
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id, suppress_tokens=unreachable)
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    texts: list[str | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b, batch in enumerate(batches):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(**enc, generation_config=config)
        new_tokens = out[:, enc["input_ids"].shape[1]:].cpu()
        decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for i, text in zip(batch, decoded):
            texts[i] = text
        if progress:
            progress(b + 1, len(batches))
    return texts


@torch.inference_mode()
def classify(model, tokenizer, examples: list[Example], batch_size: int, device: torch.device,
             regression: bool) -> list:
    """The predicted class of every example (argmax of the logits), or its score for a regression head."""
    predictions: list = []
    for i in range(0, len(examples), batch_size):
        columns = list(zip(*(e.texts for e in examples[i:i + batch_size])))
        enc = tokenizer(*columns, return_tensors="pt", padding=True, truncation=True, max_length=GLUE_MAX_LENGTH)
        logits = model(input_ids=enc["input_ids"].to(device),
                       attention_mask=enc["attention_mask"].to(device)).logits.float()
        predictions += logits[:, 0].tolist() if regression else logits.argmax(-1).tolist()
    return predictions


# --------------------------------------------------------------------------- processes


def _collect(payload: dict, rank: int, world: int) -> tuple[list[dict] | None, list[dict]]:
    """Every rank's payload on rank 0, and every rank's error on every rank.

    Each rank makes exactly one ``gather_object`` and one ``broadcast_object_list``, whatever happened
    to it before, so no rank is left waiting.
    """
    if world == 1:
        return [payload], [payload["error"]] if payload["error"] else []
    import torch.distributed as dist

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    box = [[p["error"] for p in gathered if p["error"]] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return gathered, box[0]


def _raise_errors(errors: list[dict], world: int) -> None:
    """One exception for every rank's errors: ``ConfigError`` when all are configuration errors."""
    by_message: dict[str, list[int]] = {}
    for e in errors:
        by_message.setdefault(e["message"], []).append(e["rank"])
    if world == 1:
        message = next(iter(by_message))
    else:
        message = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {m}"
                            for m, r in by_message.items())
    if all(e["config"] for e in errors):
        raise ConfigError(message)
    raise RuntimeError(f"evaluation failed: {message}")


def run_eval(s: EvalSettings) -> list[dict] | None:
    """Evaluate; rank 0 writes the outputs and returns one summary per data file (None on other ranks)."""
    started = time.time()
    check_settings(s)
    rank, world = join_launch()
    examples = [load_examples(s.task, path, limit, s.glue_task) for path, limit in zip(s.data, s.limit)]
    from .files import load_adapter

    # the files are checked before anything heavy starts; no adapter: the base model alone
    adapter_meta = load_adapter(s.adapter)[2] if s.adapter else {}
    if s.prompt_template == "chat":
        require_chat_template(load_tokenizer(s), "--prompt_template chat")
    trained_for = adapter_meta.get("task", "seq_cls" if s.task == "glue" else "causal_lm")
    if (trained_for == "seq_cls") != (s.task == "glue"):
        raise ConfigError(f"--adapter {s.adapter} was trained for model.task={trained_for}, which --task {s.task} "
                          "cannot evaluate: GLUE needs a classifier's adapter, the other tasks a causal LM's")
    owns_group = start_gloo_group(rank, world, s.dist_timeout_minutes)
    rank, world = current_world()
    try:
        return _evaluate(s, examples, adapter_meta, rank, world, started)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate(s: EvalSettings, examples: list[list[Example]], adapter_meta: dict, rank: int, world: int,
              started: float) -> list[dict] | None:
    """Load the model once, then score every data file's share of rows of this rank (``examples``: one
    list per data file); one gather of all of it to rank 0, which writes each file's outputs."""
    payload = {"rank": rank, "error": None, "rows": [[] for _ in examples]}
    seconds = [0.0 for _ in examples]  # rank 0's own, for its summaries
    device = pick_device(s)
    dtype = pick_dtype(s, device)
    try:
        model, tokenizer = load_model_and_tokenizer(s, device, dtype)
        trained_on, evaluated_on = adapter_meta.get("model"), s.model or _builtin_name(s)
        if rank == 0 and trained_on and trained_on != evaluated_on:
            print(f"[lorasb] eval: note: the adapter was trained on {trained_on}, evaluated on {evaluated_on}",
                  flush=True)
        for k, split in enumerate(examples):
            if rank == 0:
                of_file = f" of {s.data[k]}" if len(s.data) > 1 else ""
                print(f"[lorasb] eval: {s.task}, {len(split)} rows{of_file} on {world} rank(s), batch "
                      f"{s.batch_size}, max_new_tokens {s.max_new_tokens}, {device} "
                      f"{str(dtype).removeprefix('torch.')}", flush=True)
            t0 = time.time()
            payload["rows"][k] = _score_rows(s, model, tokenizer, split[rank::world], device, rank)
            seconds[k] = time.time() - t0
    except ConfigError as e:
        payload["error"] = {"rank": rank, "config": True, "message": str(e)}
    except Exception as e:  # reported through the collectives, so no rank waits for a failed one
        payload["error"] = {"rank": rank, "config": False, "message": f"{type(e).__name__}: {e}"}
    gathered, errors = _collect(payload, rank, world)
    if errors:
        _raise_errors(errors, world)
    if rank != 0:
        return None
    summaries = []
    for k, (data, out) in enumerate(zip(s.data, s.out)):
        rows = sorted((row for p in gathered for row in p["rows"][k]), key=lambda row: row["index"])
        summary = _summary(s, data, s.limit[k], rows, adapter_meta, world, device, dtype, seconds[k],
                           time.time() - started)
        _write_outputs(out, PREDICTIONS_FILE if s.task == "glue" else GENERATIONS_FILE, rows, summary)
        if s.task == "glue":
            scores = ", ".join(f"{metric} {value:.4f}" for metric, value in summary["metrics"].items())
            print(f"[lorasb] eval: glue {s.glue_task} on {summary['rows']} rows: {scores}; written to {out}",
                  flush=True)
        else:
            print(f"[lorasb] eval: {s.task} strict accuracy {summary['accuracy_strict']:.4f} "
                  f"({summary['correct_strict']}/{summary['rows']}), flexible {summary['accuracy_flexible']:.4f}; "
                  f"written to {out}", flush=True)
        summaries.append(summary)
    return summaries


def _score_rows(s: EvalSettings, model, tokenizer, mine: list[Example], device: torch.device,
                rank: int) -> list[dict]:
    """This rank's rows of one data file, generated and scored (or classified, GLUE)."""

    def progress(done: int, total: int) -> None:
        if rank == 0 and (done == total or done % 10 == 0):
            print(f"[lorasb] eval: rank 0 batch {done}/{total}", flush=True)

    if s.task == "glue":
        regression = glue.is_regression(glue.task_of(s.glue_task))
        predictions = classify(model, tokenizer, mine, s.batch_size, device, regression)
        return [{"index": e.index, "texts": list(e.texts), "label": e.label, "prediction": p}
                for e, p in zip(mine, predictions)]
    prompts = [eval_prompt(e, s.prompt_template, tokenizer) for e in mine]
    texts = generate(model, tokenizer, prompts, s.max_new_tokens, s.batch_size, device, progress,
                     add_special_tokens=not template_writes_special_tokens("metamath", s.prompt_template))
    return [{"index": e.index, "prompt": prompt, "generation": text, "gold": e.gold, **score(s.task, text, e)}
            for e, prompt, text in zip(mine, prompts, texts)]


def _builtin_name(s: EvalSettings) -> str:
    from .modeling import builtin_name

    return builtin_name("seq_cls" if s.task == "glue" else "causal_lm")


def _summary(s: EvalSettings, data: str, limit: int, rows: list[dict], adapter_meta: dict, world: int,
             device: torch.device, dtype: torch.dtype, gen_seconds: float, seconds: float) -> dict:
    n = len(rows)
    common = {"model": s.model or _builtin_name(s), "adapter": os.path.abspath(s.adapter) if s.adapter else None,
              "adapter_model": adapter_meta.get("model"), "adapter_init_id": adapter_meta.get("init_id"),
              "r": adapter_meta.get("r"), "method": adapter_meta.get("method"), "batch_size": s.batch_size,
              "limit": limit, "world_size": world, "device": device.type,
              "dtype": str(dtype).removeprefix("torch."), "seconds": round(seconds, 3)}
    if s.task == "glue":
        task = glue.task_of(s.glue_task)
        metrics = glue.compute_metrics(task, [r["prediction"] for r in rows], [r["label"] for r in rows])
        return {"task": "glue", "glue_task": s.glue_task, "data": os.path.abspath(data), "rows": n,
                "metrics": metrics, "classification_seconds_rank0": round(gen_seconds, 3), **common}
    correct_strict = sum(r["correct_strict"] for r in rows)
    correct_flexible = sum(r["correct_flexible"] for r in rows)
    return {
        "task": s.task,
        "data": os.path.abspath(data),
        "rows": n,
        "correct_strict": correct_strict,
        "correct_flexible": correct_flexible,
        "no_prediction_strict": sum(r["prediction_strict"] is None for r in rows),
        "accuracy_strict": correct_strict / n,
        "accuracy_flexible": correct_flexible / n,
        "max_new_tokens": s.max_new_tokens,
        "decoding": "greedy",
        "generation_seconds_rank0": round(gen_seconds, 3),
        **common,
    }


def _write_outputs(out: str, rows_file: str, rows: list[dict], summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    atomic_write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), os.path.join(out, rows_file))
    atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(out, SUMMARY_FILE))
