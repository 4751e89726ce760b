"""Where ISO's compute goes against stock's on one GPU (the proxy bench's model, communication
skipped): for each prompt length, stock and ISO K=2 (even split), each

  wall_ms    median of --repeats forwards, CUDA synchronised around each
  issue_ms   host time to issue one forward without waiting for the GPU (issue_ms ~ wall_ms:
             the host, not the GPU, sets the pace)
  gpu_ms     sum of the CUDA kernels' time in one forward (torch.profiler), and its split into
             matrix products, attention, the rest
  syncs      CUDA sync-debug warnings in one forward (host synchronisations)

then the kernels whose total time differs most between ISO and stock. Full tables go to --out.

    python scripts/gpu_profile_chunks.py --out OUT [--seq-lens 1024,8192]

Diagnosis only (issue 14: the proxy bench found ISO's compute above stock's on an H200); the
model and settings are scripts/gpu_check.py's proxy bench (launch/bench.py's Bench).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

BENCH_MODEL = ["--num-layers", "4", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
               "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8"]


def kind_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "sm90", "xmma", "nvjet", "cublas", "aten::mm",
                            "aten::addmm", "aten::bmm")):
        return "matmul"
    return "other"


CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def kernel_times(fn, reps: int):
    """{kernel name: (total us per forward, launches per forward)} over `reps` forwards (on CPU,
    a dry run: the aten ops' self time)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        sync()
    out = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if CUDA and e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name][0] += e.device_time_total / reps
            out[e.name][1] += 1 / reps
        elif not CUDA and e.name.startswith("aten::"):
            out[e.name][0] += e.self_cpu_time_total / reps
            out[e.name][1] += 1 / reps
    return {k: tuple(v) for k, v in out.items()}


def sync_warnings(fn) -> int:
    """CUDA sync-debug warnings in one call of `fn` (scripts/gpu_check.py's detector); -1 on CPU."""
    if not CUDA:
        return -1
    from gpu_check import count_syncs  # this script's folder is on the path

    return count_syncs(fn, "cuda")["sync_debug"]


def first_sync_site(fn) -> str:
    """Where the first host synchronisation of `fn` happens (sync-debug mode "error")."""
    import traceback

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return "".join(traceback.format_exception(e)[-8:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def measure(fn, repeats: int):
    walls, issues = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        issues.append((t1 - t0) * 1e3)
        walls.append((t2 - t0) * 1e3)
    return statistics.median(walls), statistics.median(issues)


def cuda_ms(fn, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_probe(s: int = 8192, heads: int = 16, groups: int = 4, hn: int = 128):
    """A later chunk (the last s/2 queries of s keys, grouped K/V) by each path, against fp32
    math attention: error and time; and stock's whole prompt."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from iso_megatron import sdpa

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, s, hn, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, groups, s, hn, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, groups, s, hn, device="cuda", dtype=torch.bfloat16, generator=g)
    qc, scale = q[:, :, s // 2:], hn ** -0.5
    kr, vr = sdpa.repeat_kv(k.float(), v.float(), heads)
    ref = F.scaled_dot_product_attention(qc.float(), kr, vr, attn_mask=causal_lower_right(s // 2, s)._materialize("cuda"), scale=scale)
    print(f"[probe] chunk path: {sdpa.chunk_path(qc, k)}; cudnn takes blocks: {sdpa._cudnn_takes_blocks(qc, k)}")
    paths = {"causal_attention": lambda: sdpa.causal_attention(qc, k, v, scale),
             "flash lower_right": lambda: sdpa.grouped_sdpa(qc, k, v, attn_mask=causal_lower_right(s // 2, s), scale=scale),
             "stock whole prompt": lambda: sdpa.grouped_sdpa(q, k, v, is_causal=True, scale=scale)}
    for name, fn in paths.items():
        try:
            out = fn()
            err = ((out[:, :, -s // 2:].float() - ref).norm() / ref.norm()).item()
            print(f"[probe] {name:20s} rel err {err:.2e}  {cuda_ms(fn):7.3f} ms")
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            print(f"[probe] {name:20s} FAILED {type(e).__name__}: {str(e)[:300]}")


def host_profile(fn, label: str, n: int = 10):
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    sync()
    pr.enable()
    for _ in range(n):
        fn()
    sync()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
    print(f"[host] {label}: {n} forwards, by own time\n" + "\n".join(buf.getvalue().splitlines()[4:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-lens", default="1024,8192")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--host-profile", action="store_true", help="cProfile stock and ISO at the first length")
    p.add_argument("--attention-probe", action="store_true", help="a later chunk's attention by each path")
    a = p.parse_args()
    if a.attention_probe and CUDA:
        attention_probe()
    os.makedirs(a.out, exist_ok=True)
    seq_lens = [int(x) for x in a.seq_lens.split(",")]

    from launch import bench as B
    from iso_megatron.runtime import init_process_group, shutdown

    device = "cuda" if CUDA else "cpu"  # CPU: a dry run of the script's logic (small model)
    model = BENCH_MODEL if CUDA else ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size",
                                      "512", "--num-attention-heads", "8"]
    args = B.parse_args(["--device", device, "--link", "proxy", "--splits", "even",
                         "--seq-lens", a.seq_lens, *(["--bf16"] if CUDA else []), *model])
    init_process_group(device)
    try:
        bench = B.Bench(args, 0, 1)
        rows, diffs = [], []
        with torch.no_grad():
            for s in seq_lens:
                fwd = bench.inputs(s)
                res = {}
                for mode, cfg in (("stock", None), ("iso", bench.iso_config("even"))):
                    bench.set_iso(cfg)
                    with bench.no_comm():
                        for _ in range(3):
                            fwd()
                        ran = bench.ran() if cfg is not None else None
                        if cfg is not None and ran is None:
                            raise SystemExit(f"s={s}: ISO did not split")
                        wall, issue = measure(fwd, a.repeats)
                        kt = kernel_times(fwd, 2)
                        syncs = sync_warnings(fwd)
                        if a.host_profile and s == seq_lens[0]:
                            host_profile(fwd, f"s={s} {mode}")
                        if syncs > 0:
                            print(f"[profile] s={s} {mode}: first host sync at:\n{first_sync_site(fwd)}")
                    by_kind = defaultdict(float)
                    for name, (us, _) in kt.items():
                        by_kind[kind_of(name)] += us / 1e3
                    gpu = sum(by_kind.values())
                    res[mode] = kt
                    rows.append((s, mode, ran, wall, issue, gpu, by_kind["matmul"], by_kind["attention"],
                                 by_kind["other"], sum(n for _, n in kt.values()), syncs))
                    with open(os.path.join(a.out, f"kernels_{s}_{mode}.txt"), "w") as f:
                        for name, (us, n) in sorted(kt.items(), key=lambda kv: -kv[1][0]):
                            f.write(f"{us / 1e3:9.3f} ms {n:6.1f}x  {name}\n")
                names = set(res["stock"]) | set(res["iso"])
                for name in names:
                    st, iso = res["stock"].get(name, (0.0, 0)), res["iso"].get(name, (0.0, 0))
                    diffs.append((s, (iso[0] - st[0]) / 1e3, st[0] / 1e3, iso[0] / 1e3, st[1], iso[1], name))
    finally:
        shutdown(None)

    print("\n   s mode  chunks            wall  issue   gpu  matmul  attn  other kernels syncs (ms)")
    for s, mode, ran, wall, issue, gpu, mm, at, ot, nk, sy in rows:
        print(f"{s:5d} {mode:5s} {str(ran):16s} {wall:6.2f} {issue:6.2f} {gpu:6.2f} {mm:6.2f} {at:6.2f} "
              f"{ot:6.2f} {nk:7.0f} {sy:5d}")
    print("\nkernels by ISO - stock time (ms per forward), the largest differences:")
    for s in seq_lens:
        top = sorted((d for d in diffs if d[0] == s), key=lambda d: -abs(d[1]))[:8]
        for _, d, st, iso, nst, niso, name in top:
            print(f"{s:5d} {d:+7.3f}  stock {st:7.3f} ({nst:4.0f}x)  iso {iso:7.3f} ({niso:4.0f}x)  {name[:90]}")


if __name__ == "__main__":
    main()
