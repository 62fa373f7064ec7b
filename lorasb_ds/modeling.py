"""Model and tokenizer loading.

* A named or local model: without ZeRO-3, ``AutoModelForCausalLM.from_pretrained``. Under ZeRO-3,
  ``zero3_loading.load_partitioned``: the model is built partitioned inside ``deepspeed.zero.Init``
  and each rank reads from the safetensors files only the slice of each weight that it holds, so no
  rank ever has a full copy of the model in host memory. Checkpoints that loader cannot read (no
  safetensors files, a class ``from_config`` cannot build, NVMe / hpZ / quantized ZeRO settings) go
  through ``from_pretrained`` with an ``HfDeepSpeedConfig`` alive, with a warning: the result is
  partitioned too, but every rank reads whole checkpoint shards on the way.
* With no model named, the built-in tiny Llama: 0.82M parameters pretrained on synthetic arithmetic
  text, shipped in ``lorasb_ds/assets/tiny-llama`` (for ``model.task: seq_cls`` a tiny RoBERTa encoder
  with a classification head, built from code with a fixed seed), and a character tokenizer, so the
  whole pipeline runs on any machine with no download. It is built unpartitioned (it is tiny) and
  partitioned by ``deepspeed.initialize``.
"""

from __future__ import annotations

import os
import string

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, RobertaConfig,
                          RobertaForSequenceClassification)

from .config import ConfigError, ModelConfig, RunConfig, could_be_hub_name, precision
from .zero3_loading import INDEX_FILE, SINGLE_FILE, CannotBuild, load_partitioned, unsupported_reason

TINY_SEED = 1234


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII; ``<s>`` is prepended to every encoding, and a
    pair is encoded ``<s> a </s> b`` (for sentence-pair classification)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# The built-in causal LM: a small Llama pretrained by ``bench/pretrain.py`` on a synthetic corpus of
# equations, number facts and stories, shipped with the package (config.json, model.safetensors,
# tokenizer files, pretrain.json: the recipe and loss curve; README.md: what it knows).
TINY_LLAMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-llama")


def tiny_llama_config() -> LlamaConfig:
    """The shipped model's shape: 4 layers, hidden 128, MLP 384, 4 query / 2 key-value heads (k/v
    projections are 64 wide), 128 character tokens."""
    return LlamaConfig.from_pretrained(TINY_LLAMA_DIR)


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The built-in default model (0.82M parameters), the same weights on every rank and every run."""
    from safetensors.torch import load_file

    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, leaves the caller's RNG alone
        model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(load_file(os.path.join(TINY_LLAMA_DIR, "model.safetensors")), strict=True)
    return model.to(dtype)


def tiny_roberta_config(num_labels: int, vocab_size: int = 128) -> RobertaConfig:
    """2 layers, hidden 64, 4 heads, MLP 128; positions for 512 tokens (RoBERTa offsets them by pad + 1)."""
    return RobertaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512 + 2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, num_labels=num_labels,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )


def tiny_roberta(num_labels: int, dtype: torch.dtype = torch.float32) -> RobertaForSequenceClassification:
    """The built-in classifier (``model.task: seq_cls``): same weights on every rank and run (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = RobertaForSequenceClassification(tiny_roberta_config(num_labels))
    return model.to(dtype)


def builtin_name(task: str) -> str:
    """How init files and adapters name the built-in model of a task."""
    return "builtin:tiny-roberta" if task == "seq_cls" else "builtin:tiny-llama"


def auto_class(task: str):
    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def task_kwargs(task: str, num_labels: int | None) -> dict:
    """``from_pretrained``/``from_config`` arguments of a classifier: its number of outputs and loss."""
    if task != "seq_cls":
        return {}
    return {"num_labels": num_labels,
            "problem_type": "regression" if num_labels == 1 else "single_label_classification"}


def num_labels_of(cfg: RunConfig) -> int | None:
    """Outputs of the classification head (``model.task: seq_cls``): from the GLUE task."""
    from .glue import task_of

    return task_of(cfg.data.glue_task).num_labels if cfg.model.task == "seq_cls" else None


def model_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the model is built in: the ds_config's precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(ds_config)]


def model_config_of(cfg: RunConfig):
    """The model's configuration alone (no weights): the tiny default's or the checkpoint's."""
    if not cfg.model.name_or_path:
        return tiny_roberta_config(num_labels_of(cfg)) if cfg.model.task == "seq_cls" else tiny_llama_config()
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    for key, value in task_kwargs(cfg.model.task, num_labels_of(cfg)).items():
        setattr(config, key, value)
    return config


def load_tokenizer(cfg: ModelConfig):
    if not cfg.name_or_path:
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_model_source(cfg: ModelConfig) -> None:
    """The model's config.json can be read: a local directory holds one, a hub name resolves (from the
    cache alone under HF_HUB_OFFLINE=1). Each failure is one ConfigError, before anything heavy."""
    p = cfg.name_or_path
    if not p:
        return
    local = os.path.expanduser(p)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ConfigError(f"model.name_or_path: '{p}' holds no config.json; point it at a Hugging Face "
                              "checkpoint directory (as save_pretrained or lorasb fetch write one)")
        return
    if not could_be_hub_name(p):
        raise ConfigError(f"model.name_or_path: no such directory '{p}' (a hub model is named like "
                          "owner/name, e.g. meta-llama/Llama-3.2-3B)")
    try:
        AutoConfig.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        import huggingface_hub.constants

        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if huggingface_hub.constants.HF_HUB_OFFLINE
               else str(e).strip().splitlines()[0])
        raise ConfigError(f"model.name_or_path: '{p}' is no local directory and its config could not be read "
                          f"from the hub ({why}); check the name, download it, or give a local checkpoint "
                          "directory (offline: set HF_HUB_OFFLINE=1 to fail fast)") from None


def load_model(cfg: ModelConfig, ds_config: dict, dtype: torch.dtype,
               num_labels: int | None = None) -> torch.nn.Module:
    """The base model in ``dtype``; partitioned while loading when the DeepSpeed config is ZeRO-3.

    ``num_labels``: outputs of the classification head (``model.task: seq_cls``)."""
    if not cfg.name_or_path:
        return tiny_roberta(num_labels, dtype) if cfg.task == "seq_cls" else tiny_llama(dtype)
    if cfg.task == "seq_cls":  # a pretrained encoder or decoder gets a fresh head; its LM head goes unused
        return load_pretrained(AutoModelForSequenceClassification, cfg, ds_config, dtype,
                               new=(r"^(classifier|score)\.",), unused=(r"^lm_head\.", r"\.pooler\."),
                               **task_kwargs(cfg.task, num_labels))
    return load_pretrained(AutoModelForCausalLM, cfg, ds_config, dtype)


def load_pretrained(model_class, cfg: ModelConfig, ds_config: dict, dtype: torch.dtype,
                    new: tuple[str, ...] = (), unused: tuple[str, ...] = (), **config_kwargs) -> torch.nn.Module:
    """``model_class`` (an ``AutoModelFor...`` class) with the weights of ``cfg.name_or_path`` in ``dtype``.

    Under ZeRO-3 each rank reads only its partition (``load_partitioned``; ``new`` / ``unused`` name
    parameters absent from the checkpoint and checkpoint keys to skip, e.g. a fresh classification
    head and an unused LM head), else see the module docstring. ``config_kwargs`` go to the config.
    """
    path, trust = cfg.name_or_path, cfg.trust_remote_code
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if zero3:
        reason = unsupported_reason(ds_config)
        model_dir = None if reason else safetensors_dir(path)
        if model_dir is None and reason is None:
            reason = (f"no {SINGLE_FILE} or {INDEX_FILE}; convert the checkpoint once with "
                      "from_pretrained(...).save_pretrained(...) to load it partitioned")
        if reason is None:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust, **config_kwargs)
            try:
                return load_partitioned(
                    model_dir, lambda c: model_class.from_config(c, dtype=dtype, trust_remote_code=trust),
                    config, ds_config, dtype, new, unused)
            except CannotBuild as e:
                reason = str(e)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"[lorasb] warning: loading {path} with from_pretrained under ZeRO-3 ({reason}): every "
                  "rank reads whole checkpoint shards into host memory before keeping its partition",
                  flush=True)
    keep_alive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers consults a global weak reference to this object inside from_pretrained.
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model = model_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **config_kwargs)
    del keep_alive
    return model


def safetensors_dir(name_or_path: str) -> str | None:
    """The local directory of the model's safetensors checkpoint, or None when it has none. A hub
    name is fetched first (its JSON files and ``model*.safetensors`` only)."""
    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(name_or_path, allow_patterns=["*.json", "model*.safetensors"])
    return path if any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE_FILE, INDEX_FILE)) else None
