"""ISO prefill, then decode, of a Megatron-core GPT model over tensor parallelism.

    torchrun --standalone --nproc-per-node 2 launch/infer.py                 # embedded default
    torchrun --nproc-per-node 2 launch/infer.py --load CKPT --use-checkpoint-args \\
        --tokenizer-type GPT2BPETokenizer --vocab-file V --merge-file M --prompts "Hello"

Model flags are Megatron-LM's (see --help). With no --load a small seeded model and a byte-level
tokenizer are built, so it runs on a fresh machine with nothing downloaded. Rank 0 prints.
`--bf16` / `--fp16` are Megatron-LM's: the model is built with that params_dtype and runs inside
megatron-core's Float16Module (norms and learned position embeddings in half precision too;
logits fp32). On the command line they win over the precision a checkpoint's args store.
Timings: one warm-up prefill (excluded), then the timed run; CUDA is synchronised before every
clock read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)

# A ~600-byte prompt: over ISO's default min_tokens (512), so the embedded default shows ISO.
DEFAULT_PROMPT = (
    "Tensor parallelism splits every weight matrix of a transformer across GPUs. Each layer then "
    "ends its attention and its MLP with an all-reduce of partial sums, and while that all-reduce "
    "runs, the GPUs wait. Intra-sequence overlap cuts the prompt into chunks along the sequence: "
    "while the first chunk's partial sums travel between GPUs, the second chunk computes. Causal "
    "attention lets the later chunk read the keys and values of the earlier one, which are "
    "already local to every rank, so no extra communication is needed. The outputs are the same "
    "as without the overlap, the checkpoints are the same, and prefill takes less time wherever "
    "the all-reduce is a large part of it, as on PCIe machines without peer-to-peer links."
)


def add_inference_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--prompts", nargs="+", metavar="TEXT")
    g.add_argument("--prompt-file", help="one prompt per line")
    g.add_argument("--prompt-token-ids", help="comma-separated token ids (bypasses the tokenizer)")
    g.add_argument("--num-tokens-to-generate", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--compare-baseline", action="store_true",
                   help="also time stock prefill on the same input; report the largest logit difference")
    g.add_argument("--output-json", metavar="PATH")
    g.add_argument("--save-logits", metavar="PATH", help="torch.save the prefill logits [s, vocab] of each prompt")
    g.add_argument("--deepspeed", action="store_true", help="wrap the model in DeepSpeed's inference engine")
    g.add_argument("--deepspeed-config", metavar="JSON", help="DeepSpeed inference config (may hold \"iso\")")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the --load checkpoint's files fully, as Megatron-LM does. "
                        "WARNING: this allows arbitrary code execution from the checkpoint: "
                        "use it only for checkpoints you trust. Without it, the files are read "
                        "with torch.load(weights_only=True) and an allowlist of the types "
                        "Megatron/DeepSpeed checkpoints hold, and anything else is refused")


def fail(parser, msg: str):
    """Megatron-style argument error: usage + message, exit 2, identical on every rank."""
    if parser is not None:
        parser.error(msg)
    raise SystemExit(f"error: {msg}")


def prepare_args(argv=None):
    """Parse and check everything that needs no process group: every rank fails alike."""
    from iso_megatron import ISOConfig, cli
    from iso_megatron.megatron import args as margs

    argv = sys.argv[1:] if argv is None else argv
    embedded = not any(a == "--load" or a.startswith("--load=") for a in argv)
    # no --load: the embedded default model's shape is the default of every model flag
    args, parser = margs.parse_args(add_inference_args, argv,
                                    margs.EMBEDDED_DEFAULT if embedded else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tensor_model_parallel_size is None:  # the processes a pipeline stage has
        args.tensor_model_parallel_size = max(1, world // max(1, args.pipeline_model_parallel_size))
    if args.load is None:
        if args.use_checkpoint_args:
            fail(parser, "--use-checkpoint-args needs --load")
    else:
        if os.path.isfile(args.load):
            fail(parser, f"--load {args.load}: a file, not a checkpoint directory (give the directory "
                         f"that holds latest_checkpointed_iteration.txt or the iter_*/release folders)")
        if not os.path.isdir(args.load):
            fail(parser, f"--load {args.load}: no such directory")
        if args.use_mp_args_from_checkpoint_args and not args.use_checkpoint_args:
            fail(parser, "--use-mp-args-from-checkpoint-args needs --use-checkpoint-args")
        if args.use_checkpoint_args:
            from iso_megatron.megatron.checkpoint import check_tp, checkpoint_args

            try:
                stored = checkpoint_args(args.load, ckpt_format=args.ckpt_format,
                                         trust_checkpoint=args.trust_checkpoint)
            except (OSError, ValueError) as e:
                fail(parser, f"--use-checkpoint-args: {e}")
            if not stored:
                fail(parser, f"--use-checkpoint-args: the checkpoint in {args.load} stores no args")
            take_parallel_args(args, stored, argv, world, parser)
            try:
                check_tp(stored, args.tensor_model_parallel_size, f"the checkpoint in {args.load}")
            except ValueError as e:
                fail(parser, f"--use-checkpoint-args: {e}")
            # --bf16 / --fp16 on the command line win (Megatron-LM's --use-checkpoint-args takes
            # the model's shape, not its precision); without either, the stored flags apply
            precision_asked = args.bf16 or args.fp16
            for k in margs.CHECKPOINT_ARGS:
                if precision_asked and k in ("bf16", "fp16"):
                    continue
                if k in stored and stored[k] is not None:
                    setattr(args, k, stored[k])
    if sum(x is not None for x in (args.prompts, args.prompt_file, args.prompt_token_ids)) > 1:
        fail(parser, "give only one of --prompts, --prompt-file, --prompt-token-ids")
    if args.num_tokens_to_generate < 1:
        fail(parser, "--num-tokens-to-generate must be >= 1")
    if args.deepspeed_config and not args.deepspeed:
        fail(parser, "--deepspeed-config needs --deepspeed")
    if args.micro_batch_size != 1:
        fail(parser, "--micro-batch-size: prompts are run one at a time; only 1 is supported")
    try:
        args.iso_config = cli.iso_config_from_args(args)
    except ValueError as e:
        fail(parser, str(e))
    args.ds_config = {}
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config) as f:
                args.ds_config = json.load(f)
        except (OSError, ValueError) as e:
            fail(parser, f"--deepspeed-config {args.deepspeed_config}: {e}")
        ds_dtype_error = deepspeed_dtype_error(args)
        if ds_dtype_error:
            fail(parser, ds_dtype_error)
        if "iso" in args.ds_config:  # DeepSpeed's "iso" section is the ISO setting on this path
            try:
                args.iso_config = ISOConfig(**args.ds_config["iso"])
            except (TypeError, ValueError) as e:
                fail(parser, f"--deepspeed-config \"iso\": {e}")
    tokenizer = None
    if args.tokenizer_type is None and args.prompt_token_ids is None:
        fail(parser, "--tokenizer-type is required for text prompts with --load "
                     "(or give --prompt-token-ids)")
    if args.tokenizer_type is not None and args.tokenizer_type != "NullTokenizer":
        try:
            tokenizer = build_tokenizer(args)
        except Exception as e:  # tokenizer files are the user's: say which one failed
            fail(parser, f"--tokenizer-type {args.tokenizer_type}: {type(e).__name__}: {e}")
        if args.vocab_size is None and args.padded_vocab_size is None:
            args.vocab_size = tokenizer.vocab_size
    if args.vocab_size is None and args.padded_vocab_size is None:
        fail(parser, "--vocab-size or --padded-vocab-size is required without a tokenizer")
    margs.complete_args(args, args.tensor_model_parallel_size)
    errors = margs.check_args(args, world)
    if errors:
        fail(parser, "; ".join(errors))
    args.prompt_ids = prompt_token_ids(args, tokenizer, parser)
    for ids in args.prompt_ids:
        bad = [i for i in ids if not 0 <= i < args.padded_vocab_size]
        if bad:
            fail(parser, f"prompt token id {bad[0]} outside the vocabulary [0, {args.padded_vocab_size})")
        if len(ids) + args.num_tokens_to_generate > args.max_position_embeddings:
            fail(parser, f"prompt ({len(ids)} tokens) + --num-tokens-to-generate "
                         f"({args.num_tokens_to_generate}) exceed --max-position-embeddings "
                         f"({args.max_position_embeddings})")
    return args, tokenizer


def _given(argv, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def take_parallel_args(args, stored: dict, argv, world: int, parser) -> None:
    """The stored parallel layout under --use-checkpoint-args. With
    --use-mp-args-from-checkpoint-args (Megatron-LM's flag) the stored TP and PP sizes and uneven
    first/last stage layer counts override the command line, and the processes must be TP x PP;
    without it the checkpoint is resharded to the sizes in use, taking its uneven first/last
    counts only where the pipeline size in use is the stored one and none is given."""
    tp, pp = stored.get("tensor_model_parallel_size"), stored.get("pipeline_model_parallel_size") or 1
    first, last = stored.get("decoder_first_pipeline_num_layers"), stored.get("decoder_last_pipeline_num_layers")
    if args.use_mp_args_from_checkpoint_args:
        if tp is None:
            fail(parser, f"--use-mp-args-from-checkpoint-args: the checkpoint in {args.load} stores "
                         "no tensor_model_parallel_size")
        if tp * pp != world:
            fail(parser, f"--use-mp-args-from-checkpoint-args: the checkpoint in {args.load} was saved "
                         f"at tensor-model-parallel size {tp} x pipeline-model-parallel size {pp} = "
                         f"{tp * pp} processes, but {world} run: run torchrun --nproc-per-node "
                         f"{tp * pp}, or leave the flag out to reshard to the sizes given")
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
        args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers = first, last
    elif args.pipeline_model_parallel_size == pp and not (
            _given(argv, "--decoder-first-pipeline-num-layers") or _given(argv, "--decoder-last-pipeline-num-layers")):
        args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers = first, last


def precision_name(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def deepspeed_dtype_error(args) -> "str | None":
    """DeepSpeed's engine casts the whole model to its config's "dtype": it must be the
    precision --bf16 / --fp16 give (default fp32), or it would undo (or redo) Float16Module."""
    if "dtype" not in args.ds_config:
        return None  # init_inference_megatron takes the model's own dtype
    from deepspeed.inference.config import DtypeEnum

    try:
        ds_dtype = DtypeEnum.from_str(args.ds_config["dtype"])
    except ValueError as e:
        return f"--deepspeed-config \"dtype\": {e}"
    if ds_dtype.name != precision_name(args):
        return (f"--deepspeed-config \"dtype\" is {args.ds_config['dtype']!r} but the model runs "
                f"{precision_name(args)} (--bf16 / --fp16 choose it): make them agree, or leave "
                "\"dtype\" out")
    return None


def build_tokenizer(args):
    from megatron.core.tokenizers import MegatronTokenizer

    if args.tokenizer_type == "ByteLevelTokenizer":
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "byte-level"})
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as mbuild

    defaults = dict(tokenizer_special_tokens=None, tokenizer_hf_use_fast=True,
                    trust_remote_code=False, tokenizer_hf_include_special_tokens=False,
                    tokenizer_sentencepiece_legacy=False, tokenizer_metadata=None,
                    tiktoken_pattern=None, tiktoken_num_special_tokens=1000)
    ns = argparse.Namespace(**{**defaults, **vars(args)})
    return mbuild(ns)


def detokenize(tokenizer, ids):
    """Text of `ids`; ids the tokenizer can't render (padded vocabulary) show as <id>."""
    try:
        return tokenizer.detokenize(ids)
    except Exception:
        parts = []
        for i in ids:
            try:
                parts.append(tokenizer.detokenize([i]))
            except Exception:
                parts.append(f"<{i}>")
        return "".join(parts)


def prompt_token_ids(args, tokenizer, parser):
    if args.prompt_token_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
        except ValueError:
            fail(parser, f"--prompt-token-ids: expected comma-separated integers, got {args.prompt_token_ids!r}")
        if not ids:
            fail(parser, "--prompt-token-ids is empty")
        return [ids]
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            fail(parser, f"--prompt-file: {e}")
    else:
        texts = args.prompts or [DEFAULT_PROMPT]
    if tokenizer is None:
        fail(parser, "text prompts need a tokenizer (--tokenizer-type), or use --prompt-token-ids")
    args.prompt_texts = texts
    out = [list(tokenizer.tokenize(t)) for t in texts]
    if any(not ids for ids in out):
        fail(parser, "a prompt tokenizes to no tokens")
    return out


def init_distributed(args):
    """Process group (iso_megatron.runtime), CPU shims, Megatron's parallel state, seeds."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from iso_megatron import apply_cpu_shims
    from iso_megatron.faults import distributed_timeout
    from iso_megatron.runtime import init_process_group

    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_shims()
    timeout = distributed_timeout(args.distributed_timeout_minutes)
    device = init_process_group("cuda" if cuda else "cpu", timeout)
    # Megatron's groups take the same bound (their own default is 30 minutes)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                             pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                             distributed_timeout_minutes=timeout.total_seconds() / 60)
    torch.manual_seed(args.seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    return device


def build_model(args, device):
    """The GPTModel as Megatron-LM builds it for inference: params_dtype from --bf16/--fp16,
    the checkpoint loaded into the GPTModel itself (its own keys), ISO applied, then megatron-core's
    Float16Module around it for --bf16/--fp16 (logits come out fp32), then DeepSpeed's engine."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from iso_megatron import apply_iso, get_gpt_layer_iso_spec
    from iso_megatron.megatron.args import gpt_model_kwargs, layer_spec, transformer_config
    from iso_megatron.megatron.cpu import tensor_cuda_on_cpu
    from iso_megatron.megatron.precision import float16_module

    config = transformer_config(args)
    spec = get_gpt_layer_iso_spec(layer_spec(args), args.iso_config)
    # a pipeline stage builds its part: embedding on the first, output layer on the last (with
    # tied embeddings megatron syncs the two copies at build time, moving them with .cuda())
    with tensor_cuda_on_cpu(device.type == "cpu" and args.pipeline_model_parallel_size > 1):
        model = GPTModel(config, spec, pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), **gpt_model_kwargs(args))
    if args.load:
        from iso_megatron.megatron.checkpoint import load_checkpoint

        load_checkpoint(model, args.load, ckpt_format=args.ckpt_format,
                        trust_checkpoint=args.trust_checkpoint)
    model = model.to(device).eval()
    apply_iso(model, args.iso_config)
    model = float16_module(model, config)
    if args.deepspeed:
        from iso_megatron.patches.deepspeed import init_inference_megatron

        model = init_inference_megatron(model, args.ds_config)
    return model


def gpt_model(model):
    """The megatron-core GPTModel inside DeepSpeed's engine and/or Float16Module."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(model, "decoder", return_model_obj=True)


def run(args, tokenizer, device, rank: int, watch) -> dict:
    import torch
    from tqdm import tqdm

    from iso_megatron import ISOConfig, apply_iso, cli
    from iso_megatron.megatron.generate import generate, time_prefill

    mcore = getattr(args, "_mcore_model", None)
    results, all_logits = [], []
    bar = tqdm(total=len(args.prompt_ids) * args.num_tokens_to_generate, desc="generating",
               disable=rank != 0, file=sys.stderr)
    for ids in args.prompt_ids:
        with watch.phase("prefill"):
            time_prefill(args.model, ids, device)  # warm-up, excluded from the timings
        plan = getattr(mcore.decoder, "iso_plan", None)  # what that prefill ran (None: stock model)
        gen = generate(args.model, ids, args.num_tokens_to_generate, args.temperature, args.top_k,
                       args.top_p, args.seed, getattr(tokenizer, "eod", None) if args.temperature else None,
                       args.max_position_embeddings, device, progress=bar, phase=watch.phase)
        rec = dict(prompt_token_ids=ids, generated_token_ids=gen.generated_token_ids,
                   prefill_ms=round(gen.prefill_ms, 3),
                   decode_ms_per_token=round(gen.decode_ms_per_token, 3))
        if tokenizer is not None:
            rec["generated_text"] = detokenize(tokenizer, gen.generated_token_ids)
        rec["iso_chunk_bounds"] = None if plan is None or plan.bounds is None else list(plan.bounds)
        rec["iso_plan_reason"] = "stock model (--no-iso)" if plan is None else plan.reason
        all_logits.append(gen.prefill_logits.cpu())
        if args.compare_baseline:
            with watch.phase("prefill"):
                iso_ms, iso_logits = time_prefill(args.model, ids, device, args.timing_repeats)
                apply_iso(mcore, ISOConfig(enabled=False))
                time_prefill(args.model, ids, device)  # warm-up of the stock path
                base_ms, base_logits = time_prefill(args.model, ids, device, args.timing_repeats)
                apply_iso(mcore, args.iso_config)
                rec.update(prefill_ms=round(iso_ms, 3), baseline_prefill_ms=round(base_ms, 3),
                           speedup=round(base_ms / iso_ms, 4),
                           max_abs_logit_diff=float((iso_logits - base_logits).abs().max()),
                           max_rel_logit_diff=float((iso_logits - base_logits).abs().max()
                                                    / base_logits.abs().max().clamp_min(1e-30)))
        results.append(rec)
    bar.close()
    if args.save_logits and rank == 0:
        cli.write_atomically(args.save_logits, lambda f: torch.save(all_logits, f), binary=True)
    iso = args.iso_config
    return dict(tp=args.tensor_model_parallel_size, device=str(device), precision=precision_name(args),
                iso=dict(enabled=iso.enabled, num_chunks=iso.num_chunks,
                         split=iso.split if isinstance(iso.split, str) else list(iso.split),
                         min_tokens=iso.min_tokens),
                checkpoint=args.load, timing_note=("one warm-up prefill excluded; with --compare-baseline both prefill "
                             f"times are medians of {args.timing_repeats}"),
                **results[0], results=results)


def main(argv=None) -> int:
    args, tokenizer = prepare_args(argv)
    from iso_megatron.runtime import shutdown

    try:  # every exit, success or error, tears the process groups down in order
        return _main(args, tokenizer)
    finally:
        shutdown()


def _main(args, tokenizer) -> int:
    import torch.distributed as dist
    from tqdm import tqdm

    from iso_megatron.faults import RankLost, watch_job

    device = init_distributed(args)
    rank = dist.get_rank()
    watch = watch_job()  # a rank that fails or dies is named by the others, with the phase
    try:
        with watch.phase("loading the checkpoint" if args.load else "building the model"), \
                tqdm(total=1, desc="loading" if args.load else "building embedded default model",
                     disable=rank != 0, file=sys.stderr) as bar:
            args.model = build_model(args, device)
            args._mcore_model = gpt_model(args.model)
            bar.update(1)
        out = run(args, tokenizer, device, rank, watch)
    except RankLost as e:  # each surviving rank says it, in its own words
        print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        if rank == 0 or watch.reported:  # agreed errors once; a rank's own failure by that rank
            print(f"error: {e}" if rank == 0 else f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        watch.stop()
    if rank == 0:
        r = out
        print(f"TP={out['tp']} device={out['device']} precision={out['precision']} ISO={out['iso']}")
        for i, rec in enumerate(out["results"]):
            line = (f"prompt {i}: {len(rec['prompt_token_ids'])} tokens, prefill "
                    f"{rec['prefill_ms']:.1f} ms, decode {rec['decode_ms_per_token']:.1f} ms/token")
            if "baseline_prefill_ms" in rec:
                line += (f", stock prefill {rec['baseline_prefill_ms']:.1f} ms "
                         f"(x{rec['speedup']:.3f}), max |logit diff| {rec['max_abs_logit_diff']:.3g}")
            print(line)
            print(f"  generated ids: {rec['generated_token_ids']}")
            if "generated_text" in rec:
                print(f"  generated text: {rec['generated_text']!r}")
        if args.output_json:
            from iso_megatron import cli

            cli.write_json(args.output_json, r)
    return 0




if __name__ == "__main__":
    from iso_megatron.runtime import run_main

    run_main(main)
