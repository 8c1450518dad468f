"""The one home of configuration validation: every rule once, each message naming its fields.

    errors = config_errors(cfg, world_size=8)     # [] when the run config can work
    validate_config(cfg, world_size=8)            # raises ConfigError listing all of them
    validate_config(cfg, world_size=8, check_files=True)   # and data.path / data.tokenizer exist
    raise_errors(tokenizer_errors(cfg.data, cfg.model.lm))  # the tokenizer fits the LM (reads it)

`model_config_errors` checks the model sections alone (for tools that build a model without a run).
The data loader, the loss and the layer specs rely on these checks instead of repeating them; where
they need a rule's value (the positions one image takes), they call the function defined here.
"""

import os
import sys
from typing import List, Optional

from megatron_lcl.config.model import LMConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_lcl.config.run import BACKGROUND_SAVES_SUPPORTED, DataConfig, LCLConfig, path_weight, data_blend
from megatron_lcl.data.shard_paths import shard_paths
from megatron_lcl.data.tokenizer import LCLTokenizer

PACKINGS = ("auto", "truncate", "concat", "pack")
LOSS_MODES = ("lcl", "gen", "con")
CONTRASTIVE_BATCHES = ("step", "micro_batch")
CONTRASTIVE_LOSSES = ("infonce", "sigmoid")
VISION_ACTIVATIONS = ("gelu", "quick_gelu")
IMAGE_TOKENS = ("latents", "pooled_values")
RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# Of megatron-core 0.16.1's selective modules only core_attn works here: "layernorm" always takes the
# Transformer Engine path (`CheckpointWithoutOutput.fp8 = fp8 is not None`, True for False), and "mlp"
# hands the local fc2's bias Parameter out of the checkpoint (its backward then recurses without end).
RECOMPUTE_MODULES = ("core_attn",)


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the fields involved."""


def min_seq_length(num_image_tokens: int) -> int:
    """Shortest sequence that holds one image with context before it: a text token (at least `<s>`),
    `<BoI>`, the M image positions and `<EoI>`. The loader's packing rules place images with it."""
    return num_image_tokens + 3


def max_images_per_sample(num_image_tokens: int, seq_length: int) -> int:
    """Upper bound on the images one sample can hold: each takes `<BoI>`, M positions and `<EoI>`."""
    return seq_length // (num_image_tokens + 2)


def raise_errors(errors: List[str]) -> None:
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def validate_config(cfg: LCLConfig, world_size: Optional[int] = None, check_files: bool = False) -> None:
    """Fail before start-up with every problem listed, each naming its fields."""
    raise_errors(config_errors(cfg, world_size, check_files))


def validate_model_config(model: ModelConfig, parallel: ParallelConfig,
                          precision: Optional[PrecisionConfig] = None,
                          seq_length: Optional[int] = None) -> None:
    raise_errors(model_config_errors(model, parallel, precision, seq_length))


def config_errors(cfg: LCLConfig, world_size: Optional[int] = None, check_files: bool = False) -> List[str]:
    """Every problem of a run config; with `world_size`, also the batch/parallel arithmetic; with
    `check_files`, also that the data and tokenizer files exist (on the machine that runs it)."""
    errors = model_config_errors(cfg.model, cfg.parallel, cfg.precision, cfg.data.seq_length)
    errors += _run_errors(cfg)
    errors += _overlap_loss_errors(cfg)
    errors += fp8_row_errors(cfg.precision, cfg.parallel, cfg.data.seq_length, cfg.data.micro_batch_size)
    if world_size is not None:
        errors += _batch_errors(cfg, world_size)
    if check_files:
        errors += data_file_errors(cfg.data)
    return errors


def model_config_errors(model: ModelConfig, parallel: ParallelConfig,
                        precision: Optional[PrecisionConfig] = None,
                        seq_length: Optional[int] = None) -> List[str]:
    """Configs megatron-core would choke on deep inside, found at start-up."""
    errors = _width_errors(model, parallel.tensor_model_parallel_size)
    errors += _parallel_errors(parallel)
    errors += _pipeline_split_errors(model.lm.num_layers, parallel)
    errors += _perf_knob_errors(model, parallel)
    v, lm = model.vision, model.lm

    def need(cond, msg):
        if not cond:
            errors.append(msg)

    need(v.image_size % v.patch_size == 0,
         f"model.vision.image_size ({v.image_size}) must be divisible by "
         f"model.vision.patch_size ({v.patch_size})")
    need(v.activation in VISION_ACTIVATIONS,
         f"model.vision.activation ({v.activation!r}) must be one of {', '.join(VISION_ACTIVATIONS)}")
    need(0.0 <= v.drop_path_rate < 1.0,
         f"model.vision.drop_path_rate ({v.drop_path_rate}) must be in [0, 1)")
    need(model.heads.embed_dim % model.heads.pool_num_heads == 0 and
         v.hidden_size % model.heads.pool_num_heads == 0,
         f"model.heads.pool_num_heads ({model.heads.pool_num_heads}) must divide "
         f"model.vision.hidden_size ({v.hidden_size})")
    errors += _image_token_errors(model)
    need(model.transformer_impl in ("auto", "transformer_engine", "local"),
         f"model.transformer_impl ({model.transformer_impl!r}) must be auto, transformer_engine or local")
    need(model.attention in ("sdpa", "unfused"),
         f"model.attention ({model.attention!r}) must be sdpa or unfused")
    if seq_length is not None:
        need(seq_length <= lm.max_position_embeddings,
             f"data.seq_length ({seq_length}) exceeds model.lm.max_position_embeddings "
             f"({lm.max_position_embeddings})")
        need(not parallel.sequence_parallel or seq_length % parallel.tensor_model_parallel_size == 0,
             f"parallel.sequence_parallel splits the sequence over tensor-parallel ranks: data.seq_length "
             f"({seq_length}) must be divisible by parallel.tensor_model_parallel_size "
             f"({parallel.tensor_model_parallel_size})")
        need(min_seq_length(v.num_image_tokens) <= seq_length,
             f"one image needs model.vision.num_image_tokens + 3 = {min_seq_length(v.num_image_tokens)} "
             f"positions (context, <BoI>, {v.num_image_tokens} image positions, <EoI>), more than "
             f"data.seq_length ({seq_length})")
    if precision is not None:
        errors += _precision_errors(precision, model, parallel.tensor_model_parallel_size)
    return errors


def _image_token_errors(model: ModelConfig) -> List[str]:
    """`model.vision.image_tokens`: pooled_values is the released code's pooling block, whose output
    projection (to the LM width) gives both the LM's image tokens and v_i: no W1, so embed_dim is the LM
    width, and its heads split the LM width."""
    v, heads, lm_width = model.vision, model.heads, model.lm.hidden_size
    if v.image_tokens not in IMAGE_TOKENS:
        return [f"model.vision.image_tokens ({v.image_tokens!r}) must be one of {', '.join(IMAGE_TOKENS)}"]
    if v.image_tokens == "latents":
        return []
    errors = []
    if heads.embed_dim != lm_width:
        errors.append(f"model.vision.image_tokens=pooled_values projects the pooled latent to the LM width and "
                      f"uses it as v_i (no W1, as the released code): model.heads.embed_dim ({heads.embed_dim}) "
                      f"must equal model.lm.hidden_size ({lm_width})")
    if lm_width % heads.pool_num_heads:
        errors.append(f"model.heads.pool_num_heads ({heads.pool_num_heads}) must divide model.lm.hidden_size "
                      f"({lm_width}) (model.vision.image_tokens=pooled_values: the pooling heads split the LM width)")
    return errors


def _width_errors(model: ModelConfig, tp: int) -> List[str]:
    errors = []
    for name, section in (("model.vision", model.vision), ("model.lm", model.lm)):
        if section.hidden_size % section.num_attention_heads:
            errors.append(f"{name}.hidden_size ({section.hidden_size}) must be divisible by "
                          f"{name}.num_attention_heads ({section.num_attention_heads})")
        if section.num_attention_heads % tp:
            errors.append(f"{name}.num_attention_heads ({section.num_attention_heads}) must be divisible by "
                          f"parallel.tensor_model_parallel_size ({tp})")
        if section.ffn_hidden_size % tp:
            errors.append(f"{name}.ffn_hidden_size ({section.ffn_hidden_size}) must be divisible by "
                          f"parallel.tensor_model_parallel_size ({tp})")
    return errors


def _parallel_errors(parallel: ParallelConfig) -> List[str]:
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    errors = []
    if parallel.sequence_parallel and pp > 1:
        errors.append("parallel.sequence_parallel with parallel.pipeline_model_parallel_size > 1 is not "
                      "supported: the carried v_i rows would be split over tensor-parallel ranks with the sequence")
    if parallel.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    if parallel.virtual_pipeline_model_parallel_size is not None:
        errors.append("parallel.virtual_pipeline_model_parallel_size: the interleaved (virtual) pipeline "
                      "schedule is not supported by the vision-language pipeline; leave it unset")
    return errors


def _pipeline_split_errors(num_layers: int, parallel: ParallelConfig) -> List[str]:
    pp = parallel.pipeline_model_parallel_size
    first, last = parallel.num_layers_in_first_pipeline_stage, parallel.num_layers_in_last_pipeline_stage
    if pp == 1:
        if first is not None or last is not None:
            return ["parallel.num_layers_in_first/last_pipeline_stage need "
                    "parallel.pipeline_model_parallel_size > 1"]
        return []
    rest_layers = num_layers - (first or 0) - (last or 0)
    rest_stages = pp - (first is not None) - (last is not None)
    if rest_layers < 0 or (rest_stages == 0 and rest_layers != 0) or (
            rest_stages > 0 and rest_layers % rest_stages != 0):
        return [f"pipeline split does not add up: model.lm.num_layers ({num_layers}) minus "
                f"num_layers_in_first_pipeline_stage ({first}) and num_layers_in_last_pipeline_stage "
                f"({last}) must divide evenly over the remaining {rest_stages} of "
                f"parallel.pipeline_model_parallel_size ({pp}) stages"]
    return []


def _perf_knob_errors(model: ModelConfig, parallel: ParallelConfig) -> List[str]:
    """Activation recomputation and DDP overlap (ParallelConfig's performance knobs)."""
    p, errors = parallel, []
    granularity, method, n = p.recompute_granularity, p.recompute_method, p.recompute_num_layers
    if granularity not in (None,) + RECOMPUTE_GRANULARITIES:
        errors.append(f"parallel.recompute_granularity ({granularity!r}) must be null, selective or full")
    if granularity == "full":
        if method not in RECOMPUTE_METHODS or n is None or n < 1:
            errors.append(f"parallel.recompute_granularity=full needs parallel.recompute_method uniform or "
                          f"block (got {method!r}) and parallel.recompute_num_layers >= 1 (got {n!r})")
        elif method == "uniform":
            blocks = {"model.vision.num_layers": [model.vision.num_layers],
                      "the model.lm.num_layers of each pipeline stage": _lm_stage_layers(model.lm.num_layers, p)}
            errors += [f"parallel.recompute_method=uniform recomputes chunks of parallel.recompute_num_layers "
                       f"({n}) layers: it must divide {where} ({layers})"
                       for where, layers in blocks.items() if any(k % n for k in layers)]
    elif method is not None or n is not None:
        errors.append(f"parallel.recompute_method ({method!r}) and parallel.recompute_num_layers ({n!r}) "
                      f"apply to parallel.recompute_granularity=full only (it is {granularity!r}); leave them null")
    if granularity == "selective":
        unknown = [m for m in p.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or not p.recompute_modules:
            errors.append(f"parallel.recompute_modules ({p.recompute_modules}) must be a non-empty list of "
                          f"{', '.join(RECOMPUTE_MODULES)}")
    if p.bucket_size is not None and (not p.overlap_grad_reduce or p.bucket_size < 1):
        errors.append(f"parallel.bucket_size ({p.bucket_size}) must be >= 1 and needs "
                      "parallel.overlap_grad_reduce=true (megatron-core uses one bucket without it)")
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        errors.append("parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true and "
                      "parallel.overlap_grad_reduce=true (the parameters are gathered per gradient bucket)")
    return errors


def _lm_stage_layers(num_layers: int, parallel: ParallelConfig) -> List[int]:
    """LM layers on each pipeline stage (as `_pipeline_split_errors` accepts the split)."""
    pp, first, last = (parallel.pipeline_model_parallel_size, parallel.num_layers_in_first_pipeline_stage,
                       parallel.num_layers_in_last_pipeline_stage)
    ends = [k for k in (first, last) if k is not None]
    rest_stages = pp - len(ends)
    if rest_stages == 0:
        return ends
    return ends + [(num_layers - sum(ends)) // rest_stages]


def _overlap_loss_errors(cfg: LCLConfig) -> List[str]:
    """megatron-core's overlapped reduce starts a bucket when every parameter in it has its gradient,
    and waits for that at the end of the step: every parameter must get one in every step."""
    if cfg.parallel.overlap_grad_reduce and cfg.loss.mode != "lcl":
        return [f"parallel.overlap_grad_reduce needs loss.mode=lcl: with loss.mode={cfg.loss.mode} some heads "
                "get no gradient, and megatron-core's overlapped reduce waits for every parameter's"]
    return []


def _precision_errors(precision: PrecisionConfig, model: ModelConfig, tp: int) -> List[str]:
    errors = []
    if precision.params_dtype not in ("fp32", "bf16"):
        errors.append(f"precision.params_dtype ({precision.params_dtype!r}) must be fp32 or bf16")
    if precision.fp8 not in (None, "hybrid", "e4m3"):
        errors.append(f"precision.fp8 ({precision.fp8!r}) must be null, hybrid or e4m3")
    if precision.fp8 is not None and model.transformer_impl == "local":
        errors.append("precision.fp8 needs Transformer Engine layers; model.transformer_impl is 'local'")
    if precision.fp8 is not None:
        errors += _fp8_width_errors(model.lm, tp)
    return errors


# Transformer Engine's fp8 GEMMs (`transformer_engine.pytorch.utils.assert_dim_for_fp8_exec`, TE 2.x) want
# every linear's input `[rows, in]` and weight `[out, in]` with rows and out divisible by FP8_ROWS and in
# by FP8_WIDTH. fp8 applies to the LM only (`models.transformer_config.build_transformer_config`).
FP8_ROWS, FP8_WIDTH = 8, 16


def _fp8_width_errors(lm: LMConfig, tp: int) -> List[str]:
    """The LM's GEMM inputs are h wide (qkv, fc1), h/tp (proj) and ffn/tp (fc2) on each TP rank."""
    return [f"precision.fp8: Transformer Engine's fp8 GEMMs need {name} ({size}) / "
            f"parallel.tensor_model_parallel_size ({tp}) divisible by {FP8_WIDTH}"
            for name, size in (("model.lm.hidden_size", lm.hidden_size), ("model.lm.ffn_hidden_size", lm.ffn_hidden_size))
            if size % tp or (size // tp) % FP8_WIDTH]


def fp8_row_errors(precision: PrecisionConfig, parallel: ParallelConfig, seq_length: int,
                   micro_batch_size: int) -> List[str]:
    """The LM's GEMM rows: seq_length x micro-batch, of which each TP rank holds 1/tp under sequence
    parallelism (the input of qkv and fc1). Every micro-batch has `seq_length` positions (padded)."""
    if precision.fp8 is None:
        return []
    tp = parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
    rows = seq_length // tp * micro_batch_size
    if seq_length % tp or rows % FP8_ROWS == 0:  # the first: the sequence_parallel rule says it
        return []
    per_rank = " / parallel.tensor_model_parallel_size" if parallel.sequence_parallel else ""
    return [f"precision.fp8: Transformer Engine's fp8 GEMMs need the LM's rows, data.seq_length ({seq_length})"
            f"{per_rank} x data.micro_batch_size ({micro_batch_size}) = {rows}, divisible by {FP8_ROWS}"]


def backend_errors(precision: Optional[PrecisionConfig], impl: str) -> List[str]:
    """What the backend `models.specs.select_transformer_impl` resolved at run time cannot run."""
    if precision is not None and precision.fp8 is not None and impl != "transformer_engine":
        return [f"precision.fp8 needs Transformer Engine layers; model.transformer_impl resolved to {impl!r} "
                "here (no CUDA or no importable transformer_engine)"]
    return []


def _run_errors(cfg: LCLConfig) -> List[str]:
    t, o, d, c = cfg.train, cfg.optimizer, cfg.data, cfg.checkpoint
    checks = [
        (bool(d.path), f"data.path is required, got {d.path!r}: the prepared shards (tools/prepare_data.py)"),
        (d.tokenizer is not None, "data.tokenizer is required: a .model from tools/train_tokenizer.py"),
        (cfg.loss.mode in LOSS_MODES, f"loss.mode ({cfg.loss.mode!r}) must be lcl, gen or con"),
        (cfg.loss.contrastive_batch in CONTRASTIVE_BATCHES,
         f"loss.contrastive_batch ({cfg.loss.contrastive_batch!r}) must be step or micro_batch"),
        (cfg.loss.contrastive_loss in CONTRASTIVE_LOSSES,
         f"loss.contrastive_loss ({cfg.loss.contrastive_loss!r}) must be infonce or sigmoid"),
        (cfg.loss.contrastive_loss != "sigmoid" or cfg.model.heads.logit_bias_init is not None,
         "loss.contrastive_loss=sigmoid needs model.heads.logit_bias_init (SigLIP: -10, with "
         "model.heads.logit_scale_init=10)"),
        (cfg.loss.contrastive_loss != "infonce" or cfg.model.heads.logit_bias_init is None,
         f"model.heads.logit_bias_init ({cfg.model.heads.logit_bias_init}) is only used by "
         "loss.contrastive_loss=sigmoid: set it to null for infonce"),
        (t.train_steps > 0, f"train.train_steps ({t.train_steps}) must be > 0"),
        (d.micro_batch_size > 0, f"data.micro_batch_size ({d.micro_batch_size}) must be > 0"),
        (d.num_workers >= 0, f"data.num_workers ({d.num_workers}) must be >= 0"),
        (d.num_readers > 0, f"data.num_readers ({d.num_readers}) must be > 0"),
        (o.decay_style in ("cosine", "linear", "constant"),
         f"optimizer.decay_style ({o.decay_style!r}) must be cosine, linear or constant"),
        (0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must be in [0, optimizer.lr ({o.lr})]"),
        (o.warmup_steps >= 0, f"optimizer.warmup_steps ({o.warmup_steps}) must be >= 0"),
        (d.packing in PACKINGS, f"data.packing ({d.packing!r}) must be auto, truncate, concat or pack"),
        (cfg.logging.log_interval > 0, f"logging.log_interval ({cfg.logging.log_interval}) must be > 0"),
        (c.optimizer_format in ("auto", "fully_reshardable", "dp_reshardable"),
         f"checkpoint.optimizer_format ({c.optimizer_format!r}) must be auto, fully_reshardable or dp_reshardable"),
        (c.keep_last >= 1, f"checkpoint.keep_last ({c.keep_last}) must be >= 1"),
        (not c.async_save or BACKGROUND_SAVES_SUPPORTED,
         f"checkpoint.async_save=true needs Linux (a background writer must die with its rank); this is "
         f"{sys.platform}: set it to false or null"),
        (c.save_interval is None or c.save_interval > 0,
         f"checkpoint.save_interval ({c.save_interval}) must be > 0 or null"),
    ]
    return [msg for ok, msg in checks if not ok] + _data_path_errors(d.path)


def _data_path_errors(path) -> List[str]:
    """A weighted blend alternates positive weights and paths; a plain list holds paths only."""
    if not path:
        return []
    blend = data_blend(path)
    if blend is None:
        if any(path_weight(p) is not None for p in path):
            return [f"data.path ({path}) mixes weights and paths: a weighted blend alternates them, "
                    f"weight first ([0.5, /data/laion, 0.5, /data/mmc4]), plain paths have no weights"]
        return []
    errors = [f"data.path: weight {w} of {p} must be > 0" for w, p in blend if not w > 0]
    errors += [f"data.path: {p!r} is where a path should follow weight {w}" for w, p in blend
               if path_weight(p) is not None]
    return errors


def data_file_errors(data: DataConfig) -> List[str]:
    """`data.tokenizer` is a file; every `data.path` entry (folder, glob or shard) gives prepared shards."""
    errors = []
    if data.tokenizer and not os.path.isfile(data.tokenizer):
        errors.append(f"data.tokenizer ({data.tokenizer}) does not exist; train one with tools/train_tokenizer.py")
    blend = data_blend(data.path) if data.path else None
    for path in [p for _, p in blend] if blend else [str(p) for p in data.path or []]:
        if not shard_paths(path):
            errors.append(f"data.path: no prepared shards (*.tar) at {path}; run tools/prepare_data.py")
    return errors


def tokenizer_errors(data: DataConfig, lm: LMConfig) -> List[str]:
    """The tokenizer (where its file exists) has no more tokens than `model.lm.vocab_size`. It loads the
    tokenizer, so it is not part of `config_errors`: the trainer checks it where it reads the data."""
    if not (data.tokenizer and os.path.isfile(data.tokenizer)):
        return []
    vocab = LCLTokenizer(data.tokenizer).vocab_size
    if vocab > lm.vocab_size:
        return [f"data.tokenizer ({data.tokenizer}) has {vocab} tokens, more than model.lm.vocab_size "
                f"({lm.vocab_size})"]
    return []


def _batch_errors(cfg: LCLConfig, world_size: int) -> List[str]:
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if model_parallel > world_size:
        return [f"parallel.tensor_model_parallel_size ({p.tensor_model_parallel_size}) x "
                f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size}) = {model_parallel} "
                f"ranks per model replica, more than the world size ({world_size})"]
    if world_size % model_parallel:
        return [f"world size ({world_size}) must be divisible by parallel.tensor_model_parallel_size "
                f"({p.tensor_model_parallel_size}) x parallel.pipeline_model_parallel_size "
                f"({p.pipeline_model_parallel_size})"]
    dp = world_size // model_parallel
    errors = []
    if cfg.data.num_readers > 0 and cfg.data.num_readers % dp:
        errors.append(f"data.num_readers ({cfg.data.num_readers}) must be divisible by the data-parallel size "
                      f"({dp} = world size {world_size} / parallel.tensor_model_parallel_size x "
                      f"parallel.pipeline_model_parallel_size): each DP rank runs the same number of readers")
    per_step = cfg.data.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        errors.append(f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                      f"data.micro_batch_size ({cfg.data.micro_batch_size}) x data-parallel size ({dp})")
    return errors
