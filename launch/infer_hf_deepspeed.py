"""A Hugging Face causal LM under DeepSpeed inference (AutoTP) with the "iso" config flag.

    torchrun --standalone --nproc-per-node 2 launch/infer_hf_deepspeed.py               # tiny Llama
    torchrun --standalone --nproc-per-node 2 launch/infer_hf_deepspeed.py --family opt --seq-len 1024
    torchrun --nproc-per-node 4 launch/infer_hf_deepspeed.py --model-dir /path/to/hf_model \\
        --bf16 --seq-len 2048 --deepspeed-config ds.json

Without --model-dir a small random-weight model of --family is built from a config (same seed on
every rank; nothing is downloaded). The DeepSpeed config is --deepspeed-config if given (its
"iso" section wins), else built from the flags (the shared launcher vocabulary, iso_megatron.cli:
Megatron-LM names for the shape, --iso-* for ISO, --timing-* for timing). Rank 0 prints the median prefill time with ISO and
without (the same engine, ISO switched off with apply_iso_hf), the largest logit difference, and
the greedy tokens of both. Prompts are random token ids unless --prompt and a tokenizer in
--model-dir are given.
"""

from __future__ import annotations

import argparse
import json
import os

from iso_megatron import cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = cli.add_shape_args(p)  # --num-query-groups: the Llama families' key/value heads
    m.add_argument("--model-dir", help="a local Hugging Face model directory (from_pretrained)")
    m.add_argument("--family", default="llama",
                   choices=["llama", "mistral", "qwen2", "opt", "gpt_neox", "gptj", "falcon", "phi"],
                   help="random-weight model family when no --model-dir (gpt_neox: Pythia's parallel "
                        "residual; falcon: new_decoder_architecture)")
    m.add_argument("--attn-impl", default="sdpa", choices=["sdpa", "eager"])
    cli.add_iso_args(p)
    cli.add_timing_args(p, repeats=5, warmup=1)
    r = p.add_argument_group("run")
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--prompt", help="text prompt (needs a tokenizer in --model-dir)")
    r.add_argument("--num-tokens-to-generate", type=int, default=8)
    r.add_argument("--deepspeed-config", metavar="JSON", help="DeepSpeed inference config (may hold \"iso\")")
    r.add_argument("--output-json", metavar="PATH", help="rank 0 writes the results here")
    p.set_defaults(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=512, vocab_size=1024, iso_min_tokens=0)
    return p.parse_args(argv)


def build_model(args, torch_dtype):
    import torch
    import transformers as tf

    if args.model_dir:
        return tf.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch_dtype,
                                                       attn_implementation=args.attn_impl).eval()
    common = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                  num_attention_heads=args.num_attention_heads,
                  max_position_embeddings=max(4096, args.seq_len + args.num_tokens_to_generate),
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama = dict(common, intermediate_size=args.ffn_hidden_size, num_key_value_heads=args.num_query_groups)
    ffn = dict(common, intermediate_size=args.ffn_hidden_size)
    falcon = dict(common, ffn_hidden_size=args.ffn_hidden_size, new_decoder_architecture=True,
                  num_kv_heads=args.num_query_groups)
    builders = {
        "llama": (tf.LlamaConfig, llama, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, dict(llama, sliding_window=None), tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, llama, tf.Qwen2ForCausalLM),
        "opt": (tf.OPTConfig, dict(common, ffn_dim=args.ffn_hidden_size, word_embed_proj_dim=args.hidden_size,
                                   activation_function="gelu"), tf.OPTForCausalLM),
        "gpt_neox": (tf.GPTNeoXConfig, ffn, tf.GPTNeoXForCausalLM),  # parallel residual (Pythia)
        "gptj": (tf.GPTJConfig, dict(vocab_size=args.vocab_size, n_embd=args.hidden_size, n_layer=args.num_layers,
                                     n_head=args.num_attention_heads, n_inner=args.ffn_hidden_size,
                                     rotary_dim=max(2, args.hidden_size // args.num_attention_heads // 4),
                                     n_positions=common["max_position_embeddings"], pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2), tf.GPTJForCausalLM),
        "falcon": (tf.FalconConfig, falcon, tf.FalconForCausalLM),  # new_decoder_architecture
        "phi": (tf.PhiConfig, ffn, tf.PhiForCausalLM),
    }
    config_cls, fields, cls = builders[args.family]
    config = config_cls(**fields)
    config._attn_implementation = args.attn_impl
    torch.manual_seed(args.seed)
    model = cls(config).to(torch_dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: always --num-tokens-to-generate
    return model


def main(argv=None):
    args = parse_args(argv)
    from iso_megatron.runtime import shutdown

    try:  # every exit, success or error, tears the process groups down in order
        return _main(args)
    finally:
        shutdown()


def _main(args):
    # First: restores LOCAL_SIZE (torchrun does not set it) before DeepSpeed's comm starts.
    import iso_megatron.patches.deepspeed  # noqa: F401
    import deepspeed
    import torch

    from iso_megatron.faults import distributed_timeout, watch_job

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        torch_dtype = cli.dtype_from_args(args)
        iso_section = cli.iso_config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[torch_dtype]
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            ds_config = json.load(f)
    else:
        ds_config = {}
    ds_config.setdefault("dtype", torch_dtype)
    ds_config.setdefault("tensor_parallel", {"tp_size": args.tensor_model_parallel_size or world})
    if "max_tokens" not in ds_config and "max_out_tokens" not in ds_config:
        # DeepSpeed's generate() rejects prompts longer than this (default 1024)
        ds_config["max_out_tokens"] = max(1024, args.seq_len + args.num_tokens_to_generate)
    if args.iso:  # --no-iso leaves the "iso" key out
        split = iso_section.split
        ds_config.setdefault("iso", {"enabled": True, "num_chunks": iso_section.num_chunks,
                                     "split": split if isinstance(split, str) else list(split),
                                     "min_tokens": iso_section.min_tokens})
    if world > 1:
        deepspeed.init_distributed(timeout=distributed_timeout(args.distributed_timeout_minutes))
    watch = watch_job()  # a rank that fails or dies is named by the others
    try:
        return _run(args, watch, torch_dtype, ds_config, world, rank, dtype_name)
    finally:
        watch.stop()  # before the process groups go (shutdown)


def _run(args, watch, torch_dtype, ds_config, world, rank, dtype_name):
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from iso_megatron import ISOConfig
    from iso_megatron.patches.hf_autotp import apply_iso_hf, iso_stacks


    model = build_model(args, torch_dtype)
    engine = deepspeed.init_inference(model, config=ds_config)
    iso_cfg = getattr(engine, "iso_config", None)
    device = get_accelerator().current_device_name()

    if args.prompt:
        from transformers import AutoTokenizer

        if not args.model_dir:
            raise SystemExit("error: --prompt needs a tokenizer: give --model-dir")
        ids = AutoTokenizer.from_pretrained(args.model_dir)(args.prompt, return_tensors="pt").input_ids
        ids = ids.expand(args.micro_batch_size, -1)
    else:
        vocab = engine.module.config.vocab_size
        ids = torch.randint(3, vocab, (args.micro_batch_size, args.seq_len),
                            generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)

    def sync():
        get_accelerator().synchronize()
        if dist.is_initialized():
            dist.barrier()

    def measure():
        """(median prefill ms, logits of the last prefill, greedy tokens), and what it ran."""
        out = {}

        def prefill():
            out["logits"] = engine(ids, use_cache=False).logits

        with torch.inference_mode():
            times = cli.time_ms(prefill, args.timing_repeats, args.timing_warmup, sync)
            plans = [s.iso_plan for s in iso_stacks(engine)]
            tokens = engine.generate(ids, max_new_tokens=args.num_tokens_to_generate, do_sample=False)
        return cli.median(times), out["logits"].float(), tokens[:, ids.shape[1]:].tolist(), plans

    res = {"model": args.model_dir or f"random {args.family}", "world_size": world,
           "tp": engine._config.tensor_parallel.tp_size, "seq_len": ids.shape[1], "batch": ids.shape[0],
           "dtype": dtype_name, "iso": None if iso_cfg is None else vars(iso_cfg).copy()}
    if iso_cfg is not None and iso_cfg.enabled:
        with watch.phase("prefill and generation (ISO)"):
            iso_ms, iso_logits, iso_tokens, plans = measure()
        # what the timed prefill ran, as the stack recorded it (bounds None: stock path)
        res["iso_chunk_bounds"] = [None if p is None or p.bounds is None else list(p.bounds) for p in plans]
        res["iso_plan_reason"] = [None if p is None else p.reason for p in plans]
        apply_iso_hf(engine, ISOConfig(enabled=False))  # the same engine, stock DeepSpeed path
        with watch.phase("prefill and generation (stock)"):
            stock_ms, stock_logits, stock_tokens, _ = measure()
        backend = getattr(deepspeed.comm.comm, "cdb", None)
        if getattr(backend, "shm_vector_kernel_level", 0):
            # CPU: DeepSpeed's stock all-reduce is its shared-memory kernel, ISO's is
            # torch.distributed (gloo); time stock over torch.distributed too, like for like
            level, backend.shm_vector_kernel_level = backend.shm_vector_kernel_level, 0
            try:
                res["prefill_ms_stock_torch_allreduce"] = round(measure()[0], 3)
            finally:
                backend.shm_vector_kernel_level = level
        apply_iso_hf(engine, iso_cfg)
        err = float((iso_logits - stock_logits).abs().max() / stock_logits.abs().max().clamp_min(1e-30))
        res.update(prefill_ms_iso=round(iso_ms, 3), prefill_ms_stock=round(stock_ms, 3),
                   speedup=round(stock_ms / iso_ms, 4), max_rel_logit_diff=err,
                   tokens_iso=iso_tokens, tokens_stock=stock_tokens, tokens_identical=iso_tokens == stock_tokens)
    else:
        with watch.phase("prefill and generation (stock)"):
            stock_ms, _, stock_tokens, _ = measure()
        res.update(prefill_ms_stock=round(stock_ms, 3), tokens_stock=stock_tokens)

    if rank == 0:
        if isinstance(res["iso"], dict) and not isinstance(res["iso"]["split"], str):
            res["iso"]["split"] = list(res["iso"]["split"])
        print(f"model {res['model']}  TP {res['tp']}  batch {res['batch']}  seq {res['seq_len']}  "
              f"dtype {dtype_name}  device {device}")
        print(f"iso: {res['iso']}")
        if "prefill_ms_iso" in res:
            print(f"prefill (median of {args.timing_repeats}): stock {res['prefill_ms_stock']:.2f} ms   "
                  f"ISO {res['prefill_ms_iso']:.2f} ms   speedup {res['speedup']:.3f}x   "
                  f"(ISO chunks: {res['iso_chunk_bounds']})")
            if "prefill_ms_stock_torch_allreduce" in res:
                print(f"  stock with torch.distributed all-reduce (as ISO uses; DeepSpeed's CPU shm "
                      f"kernel off): {res['prefill_ms_stock_torch_allreduce']:.2f} ms")
            print(f"max relative logit difference ISO vs stock: {res['max_rel_logit_diff']:.3g}")
            print(f"generated tokens ISO  : {res['tokens_iso'][0]}")
            print(f"generated tokens stock: {res['tokens_stock'][0]}")
            print(f"tokens identical: {res['tokens_identical']}")
        else:
            print(f"prefill (median of {args.timing_repeats}): stock {res['prefill_ms_stock']:.2f} ms")
            print(f"generated tokens: {res['tokens_stock'][0]}")
        if args.output_json:
            cli.write_json(args.output_json, res)
    return res


if __name__ == "__main__":
    from iso_megatron.runtime import run_main

    run_main(main)
