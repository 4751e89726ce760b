"""A Hugging Face causal LM under DeepSpeed inference (AutoTP) with the "iso" config flag.

    torchrun --standalone --nproc-per-node 2 launch/infer_hf_deepspeed.py               # tiny Llama
    torchrun --standalone --nproc-per-node 2 launch/infer_hf_deepspeed.py --family opt --seq-len 1024
    torchrun --nproc-per-node 4 launch/infer_hf_deepspeed.py --model-dir /path/to/hf_model \\
        --dtype bf16 --seq-len 2048 --deepspeed-config ds.json

Without --model-dir a small random-weight model of --family is built from a config (same seed on
every rank; nothing is downloaded). The DeepSpeed config is --deepspeed-config if given (its
"iso" section wins), else built from the flags. Rank 0 prints the median prefill time with ISO and
without (the same engine, ISO switched off with apply_iso_hf), the largest logit difference, and
the greedy tokens of both. Prompts are random token ids unless --prompt and a tokenizer in
--model-dir are given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-dir", help="a local Hugging Face model directory (from_pretrained)")
    m.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "opt"],
                   help="random-weight model family when no --model-dir")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=4, help="Llama-family GQA key/value heads")
    m.add_argument("--ffn", type=int, default=512)
    m.add_argument("--vocab", type=int, default=1024)
    m.add_argument("--attn-impl", default="sdpa", choices=["sdpa", "eager"])
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    r = p.add_argument_group("run")
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--prompt", help="text prompt (needs a tokenizer in --model-dir)")
    r.add_argument("--new-tokens", type=int, default=8)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--iters", type=int, default=5)
    r.add_argument("--seed", type=int, default=1234)
    d = p.add_argument_group("deepspeed / iso")
    d.add_argument("--deepspeed-config", metavar="JSON", help="DeepSpeed inference config (may hold \"iso\")")
    d.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world size)")
    d.add_argument("--no-iso", action="store_true", help="leave the \"iso\" key out")
    d.add_argument("--num-chunks", type=int, default=2)
    d.add_argument("--split", default="balanced")
    d.add_argument("--min-tokens", type=int, default=0)
    d.add_argument("--output-json", metavar="PATH", help="rank 0 writes the results here")
    return p.parse_args(argv)


def build_model(args, torch_dtype):
    import torch
    import transformers as tf

    if args.model_dir:
        return tf.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch_dtype,
                                                       attn_implementation=args.attn_impl).eval()
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, max_position_embeddings=max(4096, args.seq_len + args.new_tokens),
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama = dict(common, intermediate_size=args.ffn, num_key_value_heads=args.kv_heads)
    config = {"llama": lambda: tf.LlamaConfig(**llama),
              "mistral": lambda: tf.MistralConfig(**llama, sliding_window=None),
              "qwen2": lambda: tf.Qwen2Config(**llama),
              "opt": lambda: tf.OPTConfig(**common, ffn_dim=args.ffn, word_embed_proj_dim=args.hidden,
                                          activation_function="gelu")}[args.family]()
    config._attn_implementation = args.attn_impl
    torch.manual_seed(args.seed)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "opt": tf.OPTForCausalLM}[args.family]
    model = cls(config).to(torch_dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: always generate --new-tokens
    return model


def main(argv=None):
    args = parse_args(argv)
    # First: restores LOCAL_SIZE (torchrun does not set it) before DeepSpeed's comm starts.
    import iso_megatron.patches.deepspeed  # noqa: F401
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from iso_megatron import ISOConfig
    from iso_megatron.hf import apply_iso_hf, iso_stacks

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            ds_config = json.load(f)
    else:
        ds_config = {}
    ds_config.setdefault("dtype", torch_dtype)
    ds_config.setdefault("tensor_parallel", {"tp_size": args.tp or world})
    if "max_tokens" not in ds_config and "max_out_tokens" not in ds_config:
        # DeepSpeed's generate() rejects prompts longer than this (default 1024)
        ds_config["max_out_tokens"] = max(1024, args.seq_len + args.new_tokens)
    if not args.no_iso:
        ds_config.setdefault("iso", {"enabled": True, "num_chunks": args.num_chunks, "split": args.split,
                                     "min_tokens": args.min_tokens})
    if world > 1:
        deepspeed.init_distributed()

    model = build_model(args, torch_dtype)
    engine = deepspeed.init_inference(model, config=ds_config)
    iso_cfg = getattr(engine, "iso_config", None)
    device = get_accelerator().current_device_name()

    if args.prompt:
        from transformers import AutoTokenizer

        if not args.model_dir:
            raise SystemExit("error: --prompt needs a tokenizer: give --model-dir")
        ids = AutoTokenizer.from_pretrained(args.model_dir)(args.prompt, return_tensors="pt").input_ids
        ids = ids.expand(args.batch, -1)
    else:
        vocab = engine.module.config.vocab_size
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)

    def sync():
        get_accelerator().synchronize()
        if dist.is_initialized():
            dist.barrier()

    def measure():
        with torch.inference_mode():
            for _ in range(args.warmup):
                engine(ids, use_cache=False)
            times = []
            for _ in range(args.iters):
                sync()
                t0 = time.perf_counter()
                logits = engine(ids, use_cache=False).logits
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            tokens = engine.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        return statistics.median(times), logits.float(), tokens[:, ids.shape[1]:].tolist()

    runs_before = sum(s.runs for s in iso_stacks(engine))
    res = {"model": args.model_dir or f"random {args.family}", "world_size": world,
           "tp": engine._config.tensor_parallel.tp_size, "seq_len": ids.shape[1], "batch": ids.shape[0],
           "dtype": args.dtype, "iso": None if iso_cfg is None else vars(iso_cfg).copy()}
    if iso_cfg is not None and iso_cfg.enabled:
        iso_ms, iso_logits, iso_tokens = measure()
        res["iso_prefills_run"] = sum(s.runs for s in iso_stacks(engine)) - runs_before
        apply_iso_hf(engine, ISOConfig(enabled=False))  # the same engine, stock DeepSpeed path
        stock_ms, stock_logits, stock_tokens = measure()
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
        stock_ms, _, stock_tokens = measure()
        res.update(prefill_ms_stock=round(stock_ms, 3), tokens_stock=stock_tokens)

    if rank == 0:
        if isinstance(res["iso"], dict) and not isinstance(res["iso"]["split"], str):
            res["iso"]["split"] = list(res["iso"]["split"])
        print(f"model {res['model']}  TP {res['tp']}  batch {res['batch']}  seq {res['seq_len']}  "
              f"dtype {args.dtype}  device {device}")
        print(f"iso: {res['iso']}")
        if "prefill_ms_iso" in res:
            print(f"prefill (median of {args.iters}): stock {res['prefill_ms_stock']:.2f} ms   "
                  f"ISO {res['prefill_ms_iso']:.2f} ms   speedup {res['speedup']:.3f}x   "
                  f"(ISO prefills run: {res['iso_prefills_run']})")
            if "prefill_ms_stock_torch_allreduce" in res:
                print(f"  stock with torch.distributed all-reduce (as ISO uses; DeepSpeed's CPU shm "
                      f"kernel off): {res['prefill_ms_stock_torch_allreduce']:.2f} ms")
            print(f"max relative logit difference ISO vs stock: {res['max_rel_logit_diff']:.3g}")
            print(f"generated tokens ISO  : {res['tokens_iso'][0]}")
            print(f"generated tokens stock: {res['tokens_stock'][0]}")
            print(f"tokens identical: {res['tokens_identical']}")
        else:
            print(f"prefill (median of {args.iters}): stock {res['prefill_ms_stock']:.2f} ms")
            print(f"generated tokens: {res['tokens_stock'][0]}")
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(res, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
    return res


if __name__ == "__main__":
    main()
