"""CPU time of causal attention for a whole prompt vs the sum over its ISO chunks.

    python3 scripts/attention_timing.py [--seq-lens 2048 4096] [--chunks 2 3 4] [--threads N]
    python3 scripts/attention_timing.py --device cuda --dtype bfloat16 --heads 32 --head-dim 128

For each length: torch's unchunked causal SDPA (`is_causal=True`), then the prompt cut into K
even chunks (the planner's boundaries), each chunk's queries attending to keys [0, end)
bottom-right causal as SDPAAttention runs it (iso_megatron/sdpa.py `causal_attention`; `chunk_path`
names the kernel path: on CPU and with CUDA's cuDNN kernel, a past block without mask and a
causal diagonal block merged by log-sum-exp) and, for comparison, torch's `causal_lower_right`
mask. Times are medians (torch.utils.benchmark) over interleaved rounds, so that load from other
processes hits all variants alike; the ratio is sum(chunks) / unchunked (issue 10's target on
CPU: within 5%). On a shared CPU, `--threads 1` gives steadier figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch.nn.attention.bias import causal_lower_right


def median_s(fn, min_run_time: float) -> float:
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def chunk_bounds(seq: int, k: int):
    """The even split ISO runs (iso_megatron.planner: boundaries on 64-token tiles)."""
    from iso_megatron.planner import chunk_boundaries

    return chunk_boundaries(seq, k, "even")


def main(argv=None) -> int:
    from iso_megatron.sdpa import causal_attention, chunk_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    where = (f"CPU, {torch.get_num_threads()} threads" if a.device == "cpu"
             else torch.cuda.get_device_name(a.device))
    print(f"torch {torch.__version__}, {where}, {a.dtype}, batch 1, {a.heads} heads x head dim "
          f"{a.head_dim}; medians of {a.rounds} interleaved rounds")
    print(f"{'tokens':>6} {'K':>2} {'unchunked ms':>13} {'chunks ms':>10} {'ratio':>6} "
          f"{'lower-right ms':>15} {'ratio':>6}")
    scale = a.head_dim ** -0.5
    with torch.no_grad():
        for seq in a.seq_lens:
            g = torch.Generator().manual_seed(seq)
            q, k, v = (torch.randn(1, a.heads, seq, a.head_dim, generator=g).to(a.device, dtype)
                       for _ in range(3))

            def full():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

            def chunked(bounds, lower_right: bool):
                def run(s, e):
                    if lower_right and s > 0:
                        return F.scaled_dot_product_attention(
                            q[:, :, s:e], k[:, :, :e], v[:, :, :e],
                            attn_mask=causal_lower_right(e - s, e), scale=scale)
                    return causal_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale)
                return [lambda s=s, e=e: run(s, e) for s, e in zip(bounds, bounds[1:])]

            variants = {"full": [full]}
            for kk in a.chunks:
                b = chunk_bounds(seq, kk)
                variants[("sdpa", kk)] = chunked(b, False)
                variants[("lower_right", kk)] = chunked(b, True)
                # the chunks put together are the unchunked attention
                got = torch.cat([fn() for fn in variants[("sdpa", kk)]], dim=2)
                want = full()
                err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
                if err > (1e-5 if dtype == torch.float32 else 2.0 ** -7):
                    raise SystemExit(f"chunked attention differs from unchunked by {err}")
            times = {name: [] for name in variants}
            for _ in range(a.rounds):
                for name, fns in variants.items():
                    times[name].append(sum(median_s(fn, a.min_run_time / len(fns)) for fn in fns))
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            b = chunk_bounds(seq, 2)
            print(f"chunk kernel path: {chunk_path(q[:, :, b[1]:], k)}")
            for kk in a.chunks:
                c, lr = med[("sdpa", kk)], med[("lower_right", kk)]
                print(f"{seq:>6} {kk:>2} {med['full']:>13.1f} {c:>10.1f} {c / med['full']:>6.3f} "
                      f"{lr:>15.1f} {lr / med['full']:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
