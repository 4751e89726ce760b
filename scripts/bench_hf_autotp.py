"""Stock DeepSpeed AutoTP vs ISO on a parallel-residual model (GPT-NeoX / Pythia layout), over the
emulated link: what one reduce per layer saves.

    torchrun --standalone --nproc-per-node 2 scripts/bench_hf_autotp.py --ratios 0.5,1 --seq-len 1024

A random-weight GPTNeoXForCausalLM (use_parallel_residual, fp32, sdpa) under DeepSpeed AutoTP.
Every all-reduce of a prefill goes through ONE `iso_megatron.emulated.EmulatedLink` (real sums
through shared memory, completion held to a modelled time): stock AutoTP's synchronous
`LinearAllreduce` reduce (DeepSpeed's `inference_all_reduce`) as start + wait, ISO's deferred
reduces as started and waited by the schedule. The link is calibrated per ratio R: stock's
2 x layers all-reduces of the whole prompt take R x the prefill's compute, measured with
communication skipped. The variants are timed round-robin (each round: every variant once without
communication, then once over the link), so the machine's drift hits them alike. The lm_head's reduce (vocabulary 512: half a layer's) goes over the link too, in every row.

Rows per ratio (median over --repeats rounds, max over ranks, each after a barrier):
  stock AutoTP      two synchronous reduces per layer
  ISO merged K=1    one reduce per layer (attention + MLP partial sums added first), no chunking
                    (the planner itself runs stock for one chunk: forced here for the comparison)
  ISO K=2, K=3      one reduce per layer chunk, each overlapping the next chunk's compute
plus the largest logit difference against stock. The machine may be shared: figures are
indicative, not precise.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from contextlib import contextmanager

warnings.filterwarnings("ignore")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--ratios", default="0.5,1", help="stock's all-reduce time / compute time, comma-separated")
    p.add_argument("--chunks", default="1,2,3", help="ISO chunk counts (1: the merged reduce alone)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


VOCAB = 512


def build(args):
    import torch
    import transformers as tf

    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                           num_attention_heads=args.num_attention_heads, intermediate_size=args.ffn_hidden_size,
                           max_position_embeddings=max(2048, args.seq_len), use_parallel_residual=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.GPTNeoXForCausalLM(cfg).eval()


@contextmanager
def over_link(link):
    """Stock AutoTP's synchronous reduces and ISO's deferred ones, all over `link`."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    from iso_megatron.comm import use_reducer

    stock = ds_comm.inference_all_reduce

    def routed(tensor, op=None, group=None, **kwargs):
        if group is not None and dist.get_world_size(group) > 1:
            link.sync_reduce(tensor, group)
        return tensor

    ds_comm.inference_all_reduce = routed  # LinearAllreduce looks it up at every call
    try:
        with use_reducer(link):
            yield
    finally:
        ds_comm.inference_all_reduce = stock
        link.drain()


@contextmanager
def forced_chunks(engine, bounds):
    """ISO with exactly `bounds` (one chunk included), whatever the planner would say."""
    from iso_megatron.patches.hf_autotp import iso_stacks
    from iso_megatron.planner import PrefillPlan

    stacks = iso_stacks(engine)
    for stack in stacks:
        stack.plan = lambda *a, **k: PrefillPlan(tuple(bounds), "forced by the benchmark")
    try:
        yield
    finally:
        for stack in stacks:
            stack.__dict__.pop("plan", None)


def main(argv=None):
    args = parse_args(argv)
    import iso_megatron.patches.deepspeed  # noqa: F401  (before DeepSpeed's comm starts)
    import deepspeed
    import torch
    import torch.distributed as dist

    from iso_megatron import ISOConfig
    from iso_megatron.emulated import EmulatedLink, LinkModel, no_comm_link
    from iso_megatron.patches.hf_autotp import apply_iso_hf, iso_stacks
    from iso_megatron.planner import chunk_boundaries
    from iso_megatron.shape import TokenCost

    deepspeed.init_distributed()
    rank, tp = dist.get_rank(), dist.get_world_size()
    model = build(args)
    engine = deepspeed.init_inference(copy.deepcopy(model), config={
        "dtype": torch.float32, "tensor_parallel": {"tp_size": tp}, "iso": {"num_chunks": 2, "min_tokens": 0}})
    s, L, h = args.seq_len, args.num_layers, args.hidden_size
    ids = torch.randint(0, VOCAB, (1, s), generator=torch.Generator().manual_seed(1))
    nbytes = s * h * 4

    def once(fn, link):
        """Seconds of one call over `link`, max over ranks (a barrier before and after)."""
        dist.barrier()
        with over_link(link):
            start = time.perf_counter()
            out = fn()
        dist.barrier()
        t = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item(), out

    def stock_run():
        apply_iso_hf(engine, ISOConfig(enabled=False))
        return engine(ids).logits

    def iso_run(k):
        apply_iso_hf(engine, ISOConfig(num_chunks=max(k, 2), min_tokens=0))
        cost = TokenCost.from_shape(iso_stacks(engine)[0].shape)
        bounds = chunk_boundaries(s, k, "balanced", cost)  # k = 1: [0, s]
        with forced_chunks(engine, bounds):
            out = engine(ids).logits
            assert iso_stacks(engine)[0].iso_plan.bounds == tuple(bounds)
            return out

    chunk_counts = [int(c) for c in args.chunks.split(",")]
    with torch.no_grad():
        reference = stock_run()  # the real all-reduces: logits to compare with
        compute_ms = 1e3 * statistics.median(once(stock_run, no_comm_link())[0] for _ in range(3))
        rows = []
        for ratio in [float(r) for r in args.ratios.split(",")]:
            link_model = LinkModel.for_ratio(ratio, compute_ms / 1e3, 2 * L, nbytes)
            variants = [("stock AutoTP (2 reduces/layer)", 2 * L, stock_run)] + [
                ("ISO merged K=1 (1 reduce/layer)" if k == 1 else f"ISO K={k} (1 reduce/layer chunk)",
                 L * k, (lambda k=k: iso_run(k))) for k in chunk_counts]
            times = {name: [] for name, _, _ in variants}
            compute_only = {name: [] for name, _, _ in variants}
            errs = {}
            # round-robin: every round times each variant once with the link and once without
            # (compute only: the same work apart from the overlap, or the row measures something
            # else), so the machine's drift hits all alike
            for r in range(args.warmup + args.repeats):
                for name, _, fn in variants:
                    c, _ = once(fn, no_comm_link())
                    t, out = once(fn, EmulatedLink(link_model, max_bytes=max(nbytes, s * VOCAB * 4)))
                    if r >= args.warmup:
                        times[name].append(t)
                        compute_only[name].append(c)
                    errs[name] = float((out - reference).abs().max() / reference.abs().max())
            base = statistics.median(times[variants[0][0]])
            base_c = statistics.median(compute_only[variants[0][0]])
            for name, n, _ in variants:
                ms, c = statistics.median(times[name]), statistics.median(compute_only[name])
                rows.append((ratio, name, n, ms * 1e3, errs[name], base / ms, c * 1e3, c / base_c))
    if rank == 0:
        print(f"GPT-NeoX parallel residual, {L} layers, hidden {h}, ffn {args.ffn_hidden_size}, seq {s}, "
              f"TP {tp}, fp32; link calibrated on compute (no communication) {compute_ms:.1f} ms; "
              f"median of {args.repeats} round-robin rounds")
        print(f"{'M/C':>5}  {'run':34} {'layer reduces':>13} {'ms':>9} {'vs stock':>9} {'compute-only ms':>16} "
              f"{'/ stock':>8} {'max rel. logit diff':>20}")
        for ratio, name, n, ms, err, speedup, comp, comp_ratio in rows:
            print(f"{ratio:5.2f}  {name:34} {n:13d} {ms:9.1f} {speedup:8.3f}x {comp:16.1f} {comp_ratio:8.3f} "
                  f"{err:20.2e}")
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from iso_megatron.runtime import run_main

    run_main(main)
