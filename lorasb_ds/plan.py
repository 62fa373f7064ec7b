"""Memory and traffic plan of a LoRA-SB run on ZeRO-3, per rank, before any weight is loaded.

The model is built from its ``config.json`` on the ``meta`` device (shapes only, no memory, a 70B
model in about a second), the targets are found with ``surgery.find_targets`` and the owners with
``estimate.assign_owners``, exactly as a run would. All figures are bytes **per rank**; ``p`` is the
size of the model dtype (bf16: 2), ``P`` the number of base parameters, ``w`` the world size, and for
every target module ``(o, i)`` = (out, in) of its weight ``W0``.

Model states (both phases)::

    W0 shard          P * p / w              frozen, ZeRO-3 partitioned (host memory with offload_param)
    W0 gathered       (M + prefetch) * p     M: the larger of the largest single module (ZeRO-3 gathers
                                             module by module) and one decoder layer (with checkpointing
                                             a recomputed layer stays gathered for its backward: its
                                             reuse distance is under stage3_max_reuse_distance), plus
                                             stage3_prefetch_bucket_size
    B and A           sum (o + i) * r * p    non-persistent buffers, replicated on every rank
    R                 sum r^2 * p            low-precision copy (<= persistence threshold: replicated)
                    + 12 * sum r^2 / w       fp32 master + Adam m and v, partitioned
                    + 4 * sum r^2 / w        fp32 gradient partition
    reduce bucket     reduce_bucket_size * p DeepSpeed's contiguous-gradient buffer, allocated in full

Estimation phase only (skipped when an init file is reused)::

    owner accumulators  4 * max_g max_k sum_{in group g, owned by k} o * i
                                                  fp32, greedy owners balanced by o * i; one group g, or
                                                  consecutive groups within lorasb.est_max_accum_gb, each
                                                  estimated in its own pass
    gradient in flight  3 * 4 * max(o * i)                   2 async reduces + the one being computed
                      + 4 * T * max(o + i)                   its fp32 copies of g (T x o) and x (T x i)
    reference approach  4 * sum o * i                        every gradient all-reduced to every rank

Activations, for T = b * s tokens (micro-batch b, sequence s) of a Llama-style decoder with hidden h,
query width q = heads * head_dim, key/value width kv, MLP width m, L layers, vocabulary V: what autograd
saves for backward. W0 is frozen, so a Linear keeps nothing (its input gradient needs only W0). One
decoder layer, in bytes per token::

    2 * (4 h + 4)       each RMSNorm: an fp32 copy of its input and the fp32 1/rms
    p * 2 (q + kv)      flash/SDPA attention: q and k after RoPE, v, and the attention output
      + 4 * heads       and the fp32 log-sum-exp
    p * 3 q             eager attention instead: q, k and v repeated to all heads
      + (4 + p) heads s and the fp32 softmax with its model-dtype copy (the s x s scores)
    p * 3 m             MLP: gate output (SiLU's input), SiLU output and up output (the product's inputs)

so ``8h + 8 + p (2q + 2kv + 3m) + 4 heads`` with flash/SDPA (the same order as the ``34 h`` of
Korthikanti et al. for a trained GPT layer, less the Linear inputs a frozen base does not keep). Checked
against the tensors autograd saves on a small model (tests/test_plan.py). The LoRA-SB path adds
``x A^T``: ``p * r`` per token and target, kept for R's gradient. The head adds ``T (4h + 4)`` (final
norm) and ``T V (p + 8)``: the model-dtype logits, the fp32 log-softmax kept by the loss and one fp32
gradient of that size in backward. Then::

    no checkpointing    L * layer + all adapter tensors + head
    checkpointing       L * T * h * p (layer inputs) + one layer + its adapter tensors + head

The estimation pass has no adapter path; instead each gradient tap keeps its Linear's input (``p * in``
per token; q/k/v and gate/up share one input; with flash/SDPA o_proj's input is the attention output,
already kept), and it has its own micro-batch.

Peaks::

    estimation  W0 shard (device) + W0 gathered + B,A + R + bucket + accumulators + in flight + acts
    training    W0 shard (device) + W0 gathered + B,A + R + bucket + activations

Traffic per rank and micro-batch: ZeRO-3 all-gathers W0 in forward and again in backward (with
checkpointing the recomputed forward's gather serves the layer's backward too):
``2 * P * p * (w - 1) / w`` received. A training step adds R's reduce-scatter and the all-gather of the updated R
(``2 * sum r^2 * p * (w - 1) / w``); an estimation micro-step adds the reduce of every module's fp32
gradient to its owner: ``4 * sum o * i`` sent.

Not counted: the CUDA context, NCCL buffers, allocator fragmentation and short-lived temporaries
(``check_fit`` keeps a headroom for them), persistent small parameters (norm weights: MBs), the
optimizer's own scratch. GB here is 10^9 bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from .config import LLAMA_TARGETS, ConfigError, LoraSBConfig
from .estimate import DEFAULT_BUCKET_BYTES, assign_owners, bucket_bytes, estimation_groups, max_accum_bytes
from .layer import shape_of
from .surgery import find_targets

GB = 1e9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4
ADAM_STATES = 3  # fp32 master, first and second moment
DEFAULT_PREFETCH = 50_000_000  # stage3_prefetch_bucket_size in ds_configs/zero3*.json
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (not set in ds_configs/)
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                "up_proj": "mlp_in"}  # Llama-style projections that read the same tensor


# ----------------------------------------------------------------------------------- the model


def load_model_config(source):
    """A ``PretrainedConfig`` from a config object, a dict (config.json contents), a file or a directory."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "config.json") if os.path.isdir(source) else str(source)
        if not os.path.isfile(path):
            raise ConfigError(f"--model_config: no such file '{path}' (a config.json or a directory holding one)")
        try:
            with open(path) as f:
                source = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model_config: '{path}' is not valid JSON: {e}") from None
    if not isinstance(source, dict) or "model_type" not in source:
        raise ConfigError("model config: a config.json with a 'model_type' is needed")
    values = {k: v for k, v in source.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(source["model_type"], **values)
    except ValueError as e:
        raise ConfigError(f"model config: {e}") from None


def meta_model(model_config) -> nn.Module:
    """The causal LM built from its config on the ``meta`` device: every shape, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_model_config(model_config))


def _shapes(model: nn.Module, target_modules: list[str], r: int) -> dict[str, tuple[int, int]]:
    return {name: shape_of(linear) for name, linear in find_targets(model, list(target_modules), r)}


def target_shapes(model_config, target_modules=LLAMA_TARGETS, r: int = 1) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of every target, in model order (r is checked against each shape)."""
    return _shapes(meta_model(model_config), target_modules, r)


def total_parameters(model_config) -> int:
    """Parameters of the base model (tied weights once)."""
    return sum(p.numel() for p in meta_model(model_config).parameters())


def largest_module_parameters(model: nn.Module) -> int:
    """Most parameters held directly by one module: what ZeRO-3 gathers at once (and what DeepSpeed's
    estimator calls the largest layer)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def largest_layer_parameters(model: nn.Module) -> int:
    """Parameters of the largest decoder layer (names holding ``.layers.N.``); 0 when there is none."""
    per_layer: dict[str, int] = {}
    for name, param in model.named_parameters():
        found = LAYER_INDEX.search("." + name)
        if found:
            per_layer[found.group(1)] = per_layer.get(found.group(1), 0) + param.numel()
    return max(per_layer.values(), default=0)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the model; from its config, through the meta model."""

    model_type: str
    layers: int
    hidden: int
    q_width: int
    """num_attention_heads * head_dim."""
    kv_width: int
    """num_key_value_heads * head_dim."""
    heads: int
    intermediate: int
    vocab: int
    total_params: int
    largest_module_params: int
    """Most parameters held directly by one module (DeepSpeed's "largest layer")."""
    largest_layer_params: int
    """Parameters of the largest decoder layer (``.layers.N.``)."""
    shapes: dict[str, tuple[int, int]] = field(repr=False)
    """{target name: (out, in)}."""

    @property
    def target_params(self) -> int:
        """sum of out * in over the targets."""
        return sum(o * i for o, i in self.shapes.values())

    def targets_in_one_layer(self) -> int:
        """Targets recomputed together under checkpointing: the busiest layer plus any outside layers."""
        per_layer: dict[str, int] = {}
        outside = 0
        for name in self.shapes:
            m = LAYER_INDEX.search("." + name)
            if m:
                per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + 1
            else:
                outside += 1
        return max(per_layer.values(), default=0) + outside


def describe_model(model_config, target_modules=LLAMA_TARGETS, r: int = 1) -> ModelShape:
    """Build the meta model once and read every shape the plan uses."""
    cfg = load_model_config(model_config)
    model = meta_model(cfg)
    try:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return ModelShape(
            model_type=cfg.model_type, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            q_width=heads * head_dim, kv_width=kv_heads * head_dim, heads=heads,
            intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
            total_params=sum(p.numel() for p in model.parameters()),
            largest_module_params=largest_module_parameters(model),
            largest_layer_params=largest_layer_parameters(model),
            shapes=_shapes(model, target_modules, r),
        )
    except AttributeError as e:
        raise ConfigError(f"model config: the activation estimate needs a Llama-style decoder config ({e})") from None


# ----------------------------------------------------------------------------------- activations


def layer_activation_bytes(m: ModelShape, micro_batch: int, seq_len: int, p: int, flash: bool) -> int:
    """Bytes one decoder layer keeps for backward with a frozen base (no adapter, no taps)."""
    h, q, kv, i = m.hidden, m.q_width, m.kv_width, m.intermediate
    norms = 2 * (FP32 * h + FP32)
    if flash:
        attention = p * 2 * (q + kv) + FP32 * m.heads
    else:
        attention = p * 3 * q + (FP32 + p) * m.heads * seq_len
    mlp = p * 3 * i
    return micro_batch * seq_len * (norms + attention + mlp)


def head_activation_bytes(m: ModelShape, tokens: int, p: int) -> int:
    """Final norm, logits in model dtype, fp32 log-softmax and one fp32 gradient of the logits."""
    return tokens * (FP32 * m.hidden + FP32 + m.vocab * (p + 2 * FP32))


def tap_input_widths(m: ModelShape, flash: bool) -> dict[str, int]:
    """Per layer (key: layer index, or '' outside layers): sum of the distinct target input widths the
    estimation taps keep; targets reading the same tensor (q/k/v, gate/up) count once, and with
    flash/SDPA o_proj's input is the attention output the kernel already keeps."""
    inputs: dict[str, dict[str, int]] = {}
    for name, (_, in_f) in m.shapes.items():
        found = LAYER_INDEX.search("." + name)
        layer = found.group(1) if found else ""
        parent, _, leaf = name.rpartition(".")
        if flash and leaf == "o_proj":
            continue
        inputs.setdefault(layer, {})[parent + "/" + SHARED_INPUT.get(leaf, leaf)] = in_f
    return {layer: sum(widths.values()) for layer, widths in inputs.items()}


def activation_bytes(m: ModelShape, micro_batch: int, seq_len: int, p: int, checkpointing: bool,
                     flash: bool = True, adapter_r: int = 0, taps: bool = False) -> int:
    """Bytes kept for backward per rank. Training: ``adapter_r`` = r adds LoRA-SB's x A^T (p * r per
    token and target). Estimation: ``taps`` adds the Linear inputs the gradient taps keep."""
    tokens = micro_batch * seq_len
    layer = layer_activation_bytes(m, micro_batch, seq_len, p, flash)
    adapter = tokens * adapter_r * p
    tap_widths = tap_input_widths(m, flash) if taps else {}
    tap_all = tokens * p * sum(tap_widths.values())
    if checkpointing:
        tap_one = tokens * p * (max((v for k, v in tap_widths.items() if k), default=0) + tap_widths.get("", 0))
        body = (m.layers * tokens * m.hidden * p + layer + adapter * m.targets_in_one_layer() + tap_one)
    else:
        body = m.layers * layer + adapter * len(m.shapes) + tap_all
    return body + head_activation_bytes(m, tokens, p)


# ----------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Settings:
    """The run settings a plan was made for (sizes in elements where they are DeepSpeed's)."""

    r: int
    world_size: int
    micro_batch: int
    est_micro_batch: int
    seq_len: int
    dtype: str = "bf16"
    offload_param: bool = False
    gradient_checkpointing: bool = True
    flash_attention: bool = True
    prefetch_bucket_size: int = DEFAULT_PREFETCH
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    est_max_accum_bytes: int | None = None
    """lorasb.est_max_accum_gb in bytes; None: one estimation pass."""
    est_bucket_bytes: int = DEFAULT_BUCKET_BYTES
    """lorasb.est_bucket_mb in bytes."""


@dataclass(frozen=True)
class Plan:
    """Every figure in bytes per rank unless its name says otherwise."""

    model: ModelShape
    settings: Settings
    r_params: int
    """sum r^2: the trained numbers (all ranks together)."""
    b_a_elements: int
    """sum (out + in) * r."""
    w0_shard: int
    w0_gathered: int
    b_and_a: int
    r_low_precision: int
    r_optimizer: int
    """fp32 master + Adam moments, this rank's partition."""
    r_optimizer_total: int
    """The same over all ranks."""
    r_gradient: int
    reduce_bucket: int
    owner_accumulators: tuple[int, ...] = field(repr=False)
    """Per rank k: 4 * sum of out * in of the modules k owns, in the pass where that is largest."""
    est_passes: int
    """Passes over the estimation batches: groups of modules under ``settings.est_max_accum_bytes``."""
    grad_in_flight: int
    activations_full: int
    """Training activations without checkpointing."""
    activations_checkpointed: int
    """Training activations with checkpointing."""
    activations_estimation: int
    """Estimation activations under the plan's checkpointing setting and est_micro_batch."""
    host_memory: int
    """Host bytes per rank: the W0 shard when offloaded."""
    traffic_estimation_step: int
    traffic_training_step: int
    reference_accumulators: int
    """4 * sum out * in: every module's gradient on every rank."""

    @property
    def owner_accumulator_max(self) -> int:
        return max(self.owner_accumulators)

    @property
    def r_total(self) -> int:
        return self.r_low_precision + self.r_optimizer + self.r_gradient

    @property
    def w0_on_device(self) -> int:
        return 0 if self.settings.offload_param else self.w0_shard

    @property
    def activations_training(self) -> int:
        return self.activations_checkpointed if self.settings.gradient_checkpointing else self.activations_full

    @property
    def model_states(self) -> int:
        """Device bytes of parameters, buffers and optimizer state (what DeepSpeed's estimator covers)."""
        return self.w0_on_device + self.w0_gathered + self.b_and_a + self.r_total + self.reduce_bucket

    @property
    def estimation_peak(self) -> int:
        return (self.model_states + self.owner_accumulator_max + self.grad_in_flight
                + self.activations_estimation)

    @property
    def training_peak(self) -> int:
        return self.model_states + self.activations_training

    @property
    def peak(self) -> int:
        return max(self.estimation_peak, self.training_peak)


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype: '{dtype}' is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def owner_loads(shapes: dict[str, tuple[int, int]], world_size: int,
                max_bytes: int | None = None) -> tuple[list[int], int]:
    """Elements (sum of out * in) each rank owns under ``assign_owners`` in its heaviest estimation
    pass, and the number of passes (``estimate.estimation_groups`` under ``max_bytes``)."""
    owners = assign_owners(shapes, world_size)
    groups = estimation_groups(shapes, owners, max_bytes)
    loads = [0] * world_size
    for group in groups:
        mine = [0] * world_size
        for name in group:
            mine[owners[name]] += shapes[name][0] * shapes[name][1]
        loads = [max(a, b) for a, b in zip(loads, mine)]
    return loads, len(groups)


def gathered_fraction(world_size: int) -> float:
    """Share of a gathered tensor that arrives from other ranks: (w - 1) / w."""
    return (world_size - 1) / world_size


def plan_from_shape(m: ModelShape, s: Settings) -> Plan:
    """The arithmetic of the plan (module docstring) for a described model; no model is built."""
    if s.world_size < 1 or s.micro_batch < 1 or s.est_micro_batch < 1 or s.seq_len < 1 or s.r < 1:
        raise ConfigError("r, world_size, micro_batch, est_micro_batch and seq_len must be at least 1")
    p, w = dtype_bytes(s.dtype), s.world_size
    r2 = len(m.shapes) * s.r * s.r
    b_a = sum((o + i) * s.r for o, i in m.shapes.values())
    largest_target = max(o * i for o, i in m.shapes.values())
    widest_target = max(o + i for o, i in m.shapes.values())
    w0_gather_traffic = 2 * m.total_params * p * gathered_fraction(w)
    w0_shard = math.ceil(m.total_params / w) * p
    loads, passes = owner_loads(m.shapes, w, s.est_max_accum_bytes)
    return Plan(
        model=m, settings=s, r_params=r2, b_a_elements=b_a,
        w0_shard=w0_shard,
        w0_gathered=(max(m.largest_module_params, m.largest_layer_params) + s.prefetch_bucket_size) * p,
        b_and_a=b_a * p,
        r_low_precision=r2 * p,
        r_optimizer=math.ceil(ADAM_STATES * FP32 * r2 / w),
        r_optimizer_total=ADAM_STATES * FP32 * r2,
        r_gradient=math.ceil(FP32 * r2 / w),
        reduce_bucket=s.reduce_bucket_size * p,
        owner_accumulators=tuple(FP32 * load for load in loads),
        est_passes=passes,
        grad_in_flight=(2 * (s.est_bucket_bytes + FP32 * largest_target)  # OwnerReducer: waiting + in flight
                        + FP32 * s.est_micro_batch * s.seq_len * widest_target),
        activations_full=activation_bytes(m, s.micro_batch, s.seq_len, p, False, s.flash_attention, s.r),
        activations_checkpointed=activation_bytes(m, s.micro_batch, s.seq_len, p, True, s.flash_attention, s.r),
        activations_estimation=activation_bytes(m, s.est_micro_batch, s.seq_len, p, s.gradient_checkpointing,
                                                s.flash_attention, taps=True),
        host_memory=w0_shard if s.offload_param else 0,
        traffic_estimation_step=int(w0_gather_traffic + FP32 * m.target_params),
        traffic_training_step=int(w0_gather_traffic + 2 * r2 * p * gathered_fraction(w)),
        reference_accumulators=FP32 * m.target_params,
    )


def plan_memory(model_config, r: int, target_modules=LLAMA_TARGETS, world_size: int = 1,
                micro_batch: int = 1, seq_len: int = 2048, dtype: str = "bf16", offload_param: bool = False,
                gradient_checkpointing: bool = True, est_micro_batch: int | None = None,
                flash_attention: bool = True, prefetch_bucket_size: int = DEFAULT_PREFETCH,
                reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET, est_max_accum_gb: float | None = None,
                est_bucket_mb: float = LoraSBConfig.est_bucket_mb) -> Plan:
    """Plan a run: builds the meta model once, then ``plan_from_shape``.

    ``est_micro_batch`` defaults to ``micro_batch``; ``flash_attention`` False counts eager attention's
    b * heads * s^2 score matrices; the bucket sizes are in elements (DeepSpeed's settings);
    ``est_max_accum_gb`` and ``est_bucket_mb`` as the ``lorasb`` settings of those names.
    """
    dtype_bytes(dtype)
    shape = describe_model(model_config, target_modules, r)
    settings = Settings(r=r, world_size=world_size, micro_batch=micro_batch,
                        est_micro_batch=est_micro_batch or micro_batch, seq_len=seq_len, dtype=dtype,
                        offload_param=offload_param, gradient_checkpointing=gradient_checkpointing,
                        flash_attention=flash_attention, prefetch_bucket_size=prefetch_bucket_size,
                        reduce_bucket_size=reduce_bucket_size,
                        est_max_accum_bytes=max_accum_bytes(est_max_accum_gb),
                        est_bucket_bytes=bucket_bytes(est_bucket_mb))
    return plan_from_shape(shape, settings)


def replan(plan: Plan, **changes) -> Plan:
    """The same model under changed settings (e.g. ``world_size=128``); arithmetic only."""
    return plan_from_shape(plan.model, replace(plan.settings, **changes))


# ----------------------------------------------------------------------------------- output


def gb(n: float) -> str:
    return f"{n / GB:,.2f}"


def format_plan(plan: Plan) -> str:
    """A table of every figure in GB (10^9 bytes) per rank."""
    m, s = plan.model, plan.settings
    p = DTYPE_BYTES[s.dtype]
    act_mark = {True: " <-", False: ""}
    rows = [
        ("model states", None, ""),
        (f"W0 shard ({s.dtype}, frozen){' [host]' if s.offload_param else ''}", plan.w0_shard,
         f"{m.total_params / 1e9:.2f} B params x {p} B / {s.world_size}"),
        ("W0 gathered (working set + prefetch)", plan.w0_gathered,
         f"(max(module {m.largest_module_params / 1e6:,.0f} M, layer {m.largest_layer_params / 1e6:,.0f} M)"
         f" + {s.prefetch_bucket_size / 1e6:,.0f} M) x {p} B"),
        ("B and A (replicated buffers)", plan.b_and_a, f"{plan.b_a_elements / 1e9:.3f} B elements x {p} B"),
        ("R + fp32 master/Adam + fp32 grad", plan.r_total,
         f"{plan.r_params / 1e6:.2f} M params; optimizer {plan.r_optimizer_total / 1e6:.1f} MB in all"),
        ("DeepSpeed reduce bucket", plan.reduce_bucket, f"reduce_bucket_size {s.reduce_bucket_size:,} x {p} B"),
        ("estimation phase (skipped with --init_file)", None, ""),
        ("owner accumulators, fp32 (max rank)", plan.owner_accumulator_max,
         f"{len(m.shapes)} modules, {m.target_params / 1e9:.2f} B elements over {s.world_size} ranks"
         + (f", {plan.est_passes} passes within {gb(s.est_max_accum_bytes)} GB"
            if s.est_max_accum_bytes is not None else ", one pass")),
        ("(all-reduce to every rank instead, fp32)", plan.reference_accumulators,
         "the reference approach's accumulators, for comparison"),
        ("gradients in flight, fp32", plan.grad_in_flight,
         f"2 x ({s.est_bucket_bytes / 1e6:g} MB bucket + largest out x in) + fp32 g, x"),
        (f"activations (micro-batch {s.est_micro_batch})", plan.activations_estimation,
         "checkpointed" if s.gradient_checkpointing else "not checkpointed"),
        ("activations, training", None, ""),
        (f"without checkpointing{act_mark[not s.gradient_checkpointing]}", plan.activations_full,
         f"micro-batch {s.micro_batch} x seq {s.seq_len}"
         + ("" if s.flash_attention else ", eager attention scores")),
        (f"with checkpointing{act_mark[s.gradient_checkpointing]}", plan.activations_checkpointed,
         f"{m.layers} layer inputs + 1 layer + logits"),
        ("peak per rank (device)", None, ""),
        ("estimation", plan.estimation_peak, "model states + accumulators + in flight + activations"),
        ("training", plan.training_peak, "model states + activations"),
        ("host memory (offloaded W0)", plan.host_memory, ""),
        ("traffic per rank", None, ""),
        ("estimation micro-step", plan.traffic_estimation_step,
         "W0 all-gathers x2 + fp32 reduce to owners"),
        ("training micro-step", plan.traffic_training_step, "W0 all-gathers x2 + R reduce-scatter/all-gather"),
    ]
    head = (f"LoRA-SB plan: {m.model_type}, {m.layers} layers, hidden {m.hidden}, r={s.r}, "
            f"{len(m.shapes)} targets, {s.world_size} ranks, micro-batch {s.micro_batch}, seq {s.seq_len}, "
            f"{s.dtype}{', offload_param' if s.offload_param else ''}"
            f"{', gradient checkpointing' if s.gradient_checkpointing else ''}")
    lines = [head, f"{'':44} {'GB/rank':>9}  how"]
    for label, value, how in rows:
        if value is None:
            lines.append(f"{label}:")
        else:
            lines.append(f"  {label:42} {gb(value):>9}  {how}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- fitting


HEADROOM = 0.10
"""Share of device memory a plan leaves for what it does not count (CUDA context, NCCL, fragmentation)."""


def usable_bytes(device_memory_gb: float, headroom: float = HEADROOM) -> float:
    """What a plan may take of ``device_memory_gb`` per rank: a plan fits when its peak is within it."""
    return device_memory_gb * GB * (1 - headroom)


def fewest_passes(plan: Plan, device_memory_gb: float, headroom: float = HEADROOM) -> Plan | None:
    """The plan with the fewest estimation passes whose estimation peak fits, and among those the
    smallest accumulator budget (the most even groups); None when even one module at a time does not
    fit. Budgets are multiples of 0.1 GB, so that one can be set as ``lorasb.est_max_accum_gb`` as
    printed."""
    step = 10 ** 8
    room = usable_bytes(device_memory_gb, headroom) - (plan.estimation_peak - plan.owner_accumulator_max)
    low = math.ceil(FP32 * max(o * i for o, i in plan.model.shapes.values()) / step)
    high = math.floor(room / step)
    if high < low:
        return None
    passes = owner_loads(plan.model.shapes, plan.settings.world_size, high * step)[1]
    while low < high:  # more budget never makes more groups: bisect for the least with as few passes
        mid = (low + high) // 2
        if owner_loads(plan.model.shapes, plan.settings.world_size, mid * step)[1] == passes:
            high = mid
        else:
            low = mid + 1
    return replan(plan, est_max_accum_bytes=high * step)


def check_fit(plan: Plan, device_memory_gb: float, headroom: float = HEADROOM) -> list[str]:
    """Knobs that lower the peak of a plan over ``device_memory_gb * (1 - headroom)``, largest effect
    first, each with the GB it saves and whether it alone is enough; [] when the plan fits.

    The headroom covers what the plan does not count (CUDA context, NCCL, fragmentation).
    """
    budget = usable_bytes(device_memory_gb, headroom)
    if plan.peak <= budget:
        return []
    s = plan.settings
    candidates: list[tuple[str, Plan]] = []
    if not s.gradient_checkpointing:
        candidates.append(("enable model.gradient_checkpointing", replan(plan, gradient_checkpointing=True)))
    if not s.offload_param:
        candidates.append(("use ds_configs/zero3_offload.json (offload_param: the W0 shard to host memory)",
                           replan(plan, offload_param=True)))
    if s.micro_batch > 1:
        candidates.append(("lower train_micro_batch_size_per_gpu to 1", replan(plan, micro_batch=1)))
    if s.est_micro_batch > 1:
        candidates.append(("lower lorasb.est_micro_batch to 1", replan(plan, est_micro_batch=1)))
    if not s.flash_attention:
        candidates.append(("use a flash or SDPA attention (no s x s score matrices)",
                           replan(plan, flash_attention=True)))
    if s.reduce_bucket_size > plan.r_params:
        candidates.append((f"set zero_optimization.reduce_bucket_size to {plan.r_params:,} (all of R)",
                           replan(plan, reduce_bucket_size=plan.r_params)))
    grouped = fewest_passes(plan, device_memory_gb, headroom)
    if grouped is not None and grouped.est_passes > plan.est_passes:
        candidates.append((f"set lorasb.est_max_accum_gb to {gb(grouped.settings.est_max_accum_bytes)} "
                           f"({grouped.est_passes} estimation passes)", grouped))
    candidates.append(_more_ranks(plan, budget))
    knobs = [(plan.peak - new.peak, text, new.peak <= budget) for text, new in candidates]
    knobs = sorted((k for k in knobs if k[0] > 0), key=lambda k: -k[0])
    if not knobs:
        return ["no setting planned here lowers the peak: use devices with more memory"]
    return [f"{text} [saves {gb(saved)} GB{'; enough alone' if enough else ''}]" for saved, text, enough in knobs]


@dataclass(frozen=True)
class Fit:
    """A plan judged against a device's memory per rank."""

    plan: Plan
    """the plan judged: when no accumulator budget was set and one pass is over, the fewest passes that fit"""
    fits: bool
    lines: list[str]
    """the verdict, then (when it does not fit) the knobs that lower the peak, largest effect first"""


def fit_on_device(plan: Plan, device_memory_gb: float, budget_set: bool) -> Fit:
    """Judge ``plan`` on ``device_memory_gb`` per rank. ``budget_set``: ``lorasb.est_max_accum_gb`` was
    given, so the passes are the user's; otherwise the estimation takes the fewest passes that fit."""
    budget = usable_bytes(device_memory_gb)
    passes_note = ""
    if not budget_set and plan.peak > budget:
        grouped = fewest_passes(plan, device_memory_gb)
        if grouped is not None and grouped.peak <= budget:
            plan = grouped
            passes_note = (f"; the estimation in {grouped.est_passes} passes: set lorasb.est_max_accum_gb="
                           f"{gb(grouped.settings.est_max_accum_bytes)}")
    threshold = f"{device_memory_gb * (1 - HEADROOM):.2f} GB ({device_memory_gb:g} GB less {HEADROOM:.0%} headroom)"
    if plan.peak <= budget:
        return Fit(plan, True, [f"fits: peak {plan.peak / 1e9:.2f} GB per rank within {threshold}{passes_note}"])
    knobs = check_fit(plan, device_memory_gb)
    return Fit(plan, False, [f"does NOT fit: peak {plan.peak / 1e9:.2f} GB per rank > {threshold}. "
                             "Knobs, largest effect first:", *(f"  - {knob}" for knob in knobs)])


def _more_ranks(plan: Plan, budget: float, max_factor: int = 64) -> tuple[str, Plan]:
    """The smallest doubling of the world size that fits (or the largest tried)."""
    world = plan.settings.world_size
    factor = 2
    while True:
        bigger = replan(plan, world_size=world * factor)
        if bigger.peak <= budget:
            return f"use more ranks ({world * factor} fit)", bigger
        if factor >= max_factor:
            return f"use more ranks (even {world * factor} do not fit alone)", bigger
        factor *= 2


# ----------------------------------------------------------------------------------- DeepSpeed's estimator


@dataclass(frozen=True)
class DeepSpeedEstimate:
    """``estimate_zero3_model_states_mem_needs`` for the same model and ranks (bytes)."""

    gpu_per_rank: int
    cpu_per_node: int
    largest_layer: int
    options: str
    ours: int
    """This plan's model states per rank, the comparable figure."""
    explanation: str


def deepspeed_estimate(plan: Plan, gpus_per_node: int = 8, additional_buffer_factor: float = 1.5
                       ) -> DeepSpeedEstimate:
    """DeepSpeed's own ZeRO-3 estimate of params + optimizer states + gradients per GPU.

    offload_param maps to DeepSpeed's ``cpu_offload=cpu_offload_params=True`` (its estimator has no
    setting that offloads parameters but keeps the optimizer on the device).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    m, s = plan.model, plan.settings
    per_node = min(gpus_per_node, s.world_size)
    nodes = math.ceil(s.world_size / per_node)
    offload = s.offload_param
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        m.total_params, m.largest_module_params, num_gpus_per_node=per_node, num_nodes=nodes,
        cpu_offload=offload, cpu_offload_params=offload, zero_init=True,
        additional_buffer_factor=additional_buffer_factor)
    trained = ADAM_STATES * FP32 * plan.r_params
    explanation = (
        f"DeepSpeed assumes every one of the {m.total_params / 1e9:.2f} B parameters is trained: a 2-byte "
        f"parameter plus fp32 master, gradient and Adam moments, about 18 bytes/param "
        f"({gb(18 * m.total_params)} GB over all ranks{', in host memory with offload' if offload else ''}), "
        f"plus 4 bytes x the largest layer on the device. Here W0 is frozen "
        f"(2 bytes/param, no gradient, no optimizer state) and only R is trained: {plan.r_params / 1e6:.2f} M "
        f"params, {trained / 1e6:.1f} MB of optimizer state in all; B and A ({gb(plan.b_and_a)} GB) are "
        f"replicated buffers DeepSpeed does not know about.")
    return DeepSpeedEstimate(
        gpu_per_rank=int(gpu), cpu_per_node=int(cpu), largest_layer=int(largest),
        options=(f"{nodes} node(s) x {per_node} GPUs, offload_optimizer={'cpu' if offload else 'none'}, "
                 f"offload_param={'cpu' if offload else 'none'}, zero_init=1"),
        ours=plan.model_states, explanation=explanation)


def format_deepspeed_comparison(est: DeepSpeedEstimate) -> str:
    return "\n".join([
        f"DeepSpeed's estimator (estimate_zero3_model_states_mem_needs; {est.options}):",
        f"  per GPU {gb(est.gpu_per_rank)} GB, per CPU node {gb(est.cpu_per_node)} GB "
        f"(largest layer {gb(est.largest_layer)} GB)",
        f"  this plan's model states per rank: {gb(est.ours)} GB (W0 shard + gathered + B, A + R + bucket)",
        textwrap.fill(est.explanation, width=100, initial_indent="  ", subsequent_indent="  "),
    ])
