"""Megatron-LM's command-line flags (the subset inference needs), same names and meanings.

megatron-core wheels ship no `megatron.training` argument parser, so the launcher parses these
names itself, with Megatron's defaults and derived values (`complete_args`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import cli

# The embedded default model (no --load): small, seeded, Llama-style, byte-level tokenizer.
EMBEDDED_DEFAULT = dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                        group_query_attention=True, num_query_groups=4, normalization="RMSNorm",
                        swiglu=True, disable_bias_linear=True, position_embedding_type="rope",
                        seq_length=4096,  # --max-position-embeddings follows it, as in Megatron-LM
                        untie_embeddings_and_output_weights=True, tokenizer_type="ByteLevelTokenizer")

# Model-shape flags that --use-checkpoint-args takes from the checkpoint (Megatron's list).
CHECKPOINT_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "group_query_attention", "num_query_groups", "kv_channels",
                   "max_position_embeddings", "position_embedding_type", "rotary_base",
                   "rotary_percent", "normalization", "norm_epsilon", "swiglu",
                   "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights",
                   "padded_vocab_size", "vocab_size", "make_vocab_size_divisible_by",
                   "apply_residual_connection_post_layernorm", "qk_layernorm", "seq_length",
                   "tokenizer_type", "bf16", "fp16")


# Megatron-LM's --attention-backend values (megatron.core.transformer.enums.AttnBackend).
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = cli.add_shape_args(p)  # the shape flags every launcher shares; Megatron-only ones below
    g.add_argument("--kv-channels", type=int, help="default hidden/heads")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (processes = TP x PP); a prompt's chunks flow through them")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers of the first stage where the split is uneven")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers of the last stage where the split is uneven")
    for flag in ("--virtual-pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage"):
        g.add_argument(flag, type=int, default=None, help="not supported (an error)")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Apply rope scaling as used in llama3.x")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0,
                   help="Rope scaling factor in llama3.x models")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--padded-vocab-size", type=int, help="padded vocabulary, as stored in checkpoints")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="Megatron-LM's names. transformer_engine: TE's backend of that name. "
                        "local: flash/fused/auto = torch's fused SDPA kernels (SDPAAttention), "
                        "unfused/local = megatron's DotProductAttention (materialises [s, s])")
    c = p.add_argument_group("checkpoint and tokenizer (Megatron-LM names)")
    c.add_argument("--load", help="checkpoint directory (Megatron torch/torch_dist or DeepSpeed)")
    c.add_argument("--ckpt-format", choices=["auto", "torch", "torch_dist", "deepspeed"], default="auto")
    c.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape from the args stored in the checkpoint (and, where "
                        "--pipeline-model-parallel-size is the stored one, its uneven first/last "
                        "stage layer counts unless given)")
    c.add_argument("--use-mp-args-from-checkpoint-args", action="store_true",
                   help="with --use-checkpoint-args: also take the stored tensor- and "
                        "pipeline-model-parallel sizes (and uneven first/last stage layer counts), "
                        "over the command line, as Megatron-LM; the processes must be TP x PP. "
                        "Without it the checkpoint is resharded to the sizes given")
    c.add_argument("--tokenizer-type", default=None,
                   help="ByteLevelTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, "
                        "SentencePieceTokenizer, Llama2Tokenizer, TikTokenizer, NullTokenizer")
    c.add_argument("--tokenizer-model")
    c.add_argument("--vocab-file")
    c.add_argument("--merge-file")


def vocab_size_with_padding(orig_vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: up to a multiple of make_vocab_size_divisible_by * TP."""
    multiple = divisible_by * tp
    return int(math.ceil(orig_vocab_size / multiple) * multiple)


def complete_args(args, tp: int) -> None:
    """Fill Megatron's derived defaults (ffn size, kv channels, groups, vocab padding)."""
    if args.ffn_hidden_size is None and args.hidden_size:
        args.ffn_hidden_size = (int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu
                                else 4 * args.hidden_size)
    if args.kv_channels is None and args.hidden_size and args.num_attention_heads:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.padded_vocab_size is None and args.vocab_size is not None:
        args.padded_vocab_size = vocab_size_with_padding(args.vocab_size,
                                                         args.make_vocab_size_divisible_by, tp)


def check_args(args, world_size: int) -> List[str]:
    """Megatron-style messages for flags that can't work together (empty when all is well)."""
    errors = []
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        # Megatron-LM: --max-position-embeddings defaults to --seq-length (complete_args)
        if getattr(args, name) is None and not (name == "max_position_embeddings" and args.seq_length):
            flag = "--max-position-embeddings (or --seq-length)" if name == "max_position_embeddings" \
                else f"--{name.replace('_', '-')}"
            errors.append(f"{flag} is required (or --load with --use-checkpoint-args)")
    if errors:
        return errors
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if pp < 1:
        errors.append(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
        return errors
    if tp * pp != world_size:
        sizes = f"--tensor-model-parallel-size ({tp})" + (f" x --pipeline-model-parallel-size ({pp})" if pp > 1 else "")
        errors.append(f"{sizes} must equal the number of processes ({world_size}); run torchrun "
                      f"--nproc-per-node {tp * pp}")
    errors += pipeline_errors(args)
    if args.bf16 and args.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if args.hidden_size % args.num_attention_heads and args.kv_channels is None:
        errors.append(f"--hidden-size ({args.hidden_size}) must be divisible by "
                      f"--num-attention-heads ({args.num_attention_heads}) unless --kv-channels is set")
    if args.num_attention_heads % tp:
        errors.append(f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
                      f"--tensor-model-parallel-size ({tp})")
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    if args.group_query_attention and args.num_attention_heads % groups:
        errors.append(f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
                      f"--num-query-groups ({groups})")
    if groups % tp and tp % groups:
        errors.append(f"--num-query-groups ({groups}) must be a multiple or divisor of "
                      f"--tensor-model-parallel-size ({tp})")
    if args.attention_backend == "local" and args.transformer_impl != "local":
        errors.append("--attention-backend local is only supported with --transformer-impl local")
    if args.use_rope_scaling and args.position_embedding_type != "rope":
        errors.append("--use-rope-scaling needs --position-embedding-type rope")
    if args.padded_vocab_size is not None and args.padded_vocab_size % tp:
        errors.append(f"--padded-vocab-size ({args.padded_vocab_size}) must be divisible by "
                      f"--tensor-model-parallel-size ({tp})")
    return errors


def pipeline_errors(args) -> List[str]:
    """What Megatron-LM would refuse about the pipeline flags, said before any process group."""
    pp, layers = args.pipeline_model_parallel_size, args.num_layers
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    errors = []
    if args.virtual_pipeline_model_parallel_size or args.num_layers_per_virtual_pipeline_stage:
        errors.append("virtual pipeline stages (--virtual-pipeline-model-parallel-size, "
                      "--num-layers-per-virtual-pipeline-stage) are not supported: one stage per rank")
    if pp == 1:
        if first is not None or last is not None:
            errors.append("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        return errors
    if getattr(args, "deepspeed", False):
        errors.append("--pipeline-model-parallel-size > 1 with --deepspeed is not supported")
    fixed = [n for n in (first, last) if n is not None]
    if any(n < 1 for n in fixed):
        errors.append("--decoder-first/last-pipeline-num-layers must be >= 1")
        return errors
    middle_stages, middle_layers = pp - len(fixed), layers - sum(fixed)
    if middle_layers < middle_stages or (middle_stages == 0 and middle_layers != 0) or \
            (middle_stages and middle_layers % middle_stages):
        errors.append(f"--num-layers ({layers}) does not split over {pp} pipeline stages"
                      + (f" with {first} first / {last} last stage layers" if fixed else "")
                      + ": the other stages need an equal number of layers, at least one each")
    return errors


def transformer_config(args):
    """megatron.core TransformerConfig from Megatron-LM args (inference: no dropout)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return TransformerConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        apply_residual_connection_post_layernorm=args.apply_residual_connection_post_layernorm,
        qk_layernorm=args.qk_layernorm, attention_backend=AttnBackend[args.attention_backend],
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        bf16=args.bf16, fp16=args.fp16, use_cpu_initialization=not torch.cuda.is_available(),
        bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=fused_softmax_available(),
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        **pipeline_config(args, dtype))


def pipeline_config(args, dtype) -> dict:
    """TransformerConfig's pipeline fields, as Megatron-LM maps its flags (empty at PP 1)."""
    pp = getattr(args, "pipeline_model_parallel_size", 1)
    if pp == 1:
        return {}
    return dict(pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
                num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
                num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers)


def layer_spec(args):
    """The stock megatron-core layer spec the flags choose (ISO swaps its classes in after).

    --attention-backend, Megatron-LM's vocabulary, maps to core attention as follows:
      transformer_engine  flash | fused | unfused | auto: TE's spec; TE picks the backend
                          (megatron-core sets NVTE_*_ATTN from config.attention_backend).
                          local: an error, as in Megatron-LM.
      local               flash | fused | auto: SDPAAttention (iso_megatron.megatron.attention),
                          torch's fused SDPA kernels (cuDNN / flash / memory-efficient on
                          CUDA, flash on CPU), no [s, s] scores;
                          unfused | local: megatron-core's DotProductAttention, Megatron-LM's
                          local spec as it is (materialises [b*heads, s, s] scores).
    Megatron-LM's local spec ignores the flag (always DotProductAttention); here its default,
    auto, picks the fused kernels, whose output is DotProductAttention's (tests/test_attention.py).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if args.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {args.attention_backend!r}: choose one of {ATTENTION_BACKENDS}")
    if args.transformer_impl == "transformer_engine":
        if args.attention_backend == "local":
            raise ValueError("--attention-backend local is only supported with --transformer-impl local")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    if args.transformer_impl != "local":
        raise ValueError(f"--transformer-impl {args.transformer_impl!r}: local or transformer_engine")
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
    if args.attention_backend in ("flash", "fused", "auto"):
        from .attention import sdpa_layer_spec

        spec = sdpa_layer_spec(spec)
    return spec


def gpt_model_kwargs(args) -> dict:
    """GPTModel's constructor arguments besides the config and the layer spec, as Megatron-LM's
    gpt_builders passes them (RoPE scaling: Llama-3.1's, megatron-core's implementation)."""
    import inspect

    from megatron.core.models.gpt import GPTModel

    kwargs = dict(vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                  position_embedding_type=args.position_embedding_type,
                  rotary_base=args.rotary_base, rotary_percent=args.rotary_percent,
                  share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    if args.use_rope_scaling:
        if "rope_scaling_factor" not in inspect.signature(GPTModel.__init__).parameters:
            raise ValueError("--use-rope-scaling: this megatron-core's GPTModel has no rope scaling")
        kwargs.update(rope_scaling=True, rope_scaling_factor=args.rope_scaling_factor)
    return kwargs


def fused_softmax_available() -> bool:
    """Megatron's fused masked-softmax CUDA kernels come from a separate build (Apex/Megatron-LM)."""
    return torch.cuda.is_available() and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def parse_args(extra_args_provider, argv: Optional[List[str]] = None, defaults: Optional[dict] = None):
    """Our parser with Megatron-LM's names. (megatron-core wheels ship no megatron.training, and
    its parser validates training-only arguments with other defaults, so it is not reused.)"""
    p = argparse.ArgumentParser(prog="launch/infer.py", allow_abbrev=False,
                                description="ISO prefill + decode of a Megatron-core GPT model")
    add_model_args(p)
    cli.add_iso_args(p)
    cli.add_timing_args(p, repeats=5, warmup=1)
    extra_args_provider(p)
    p.set_defaults(**(defaults or {}))
    return p.parse_args(argv), p
