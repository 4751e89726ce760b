"""ISO prefill benchmark: baseline (stock megatron-core) vs ISO, against the ideal-overlap bound.

    torchrun --standalone --nproc-per-node 2 launch/bench.py --profiles ratio:1,gpu:4090/30b/tp4 \
        --seq-lens 1024,2048 --splits even,balanced,auto --output-json docs/bench.json --plot docs/bench.png

Links (`--link`):
  emulated  (default on CPU) every all-reduce runs for real over gloo, completion held to a
            modelled time (`iso_megatron.emulated`); `--profiles` say which: `ratio:R` (the
            all-reduces of the unsplit prompt take R x its measured compute, no communication)
            or `gpu:<device>/<model>/tp<N>` (the M/C ratio and link latency share that the cost
            model predicts for that GPU, model and TP at this prompt length). The baseline runs
            the UNTOUCHED stock code: megatron's synchronous reduce (`mappings._reduce`) goes
            through the same link, start + wait, so it pays the same modelled time per transfer.
  real      the process group's own all-reduce (NCCL on GPUs, gloo on CPU); no profiles.
  proxy     one device, TP pretended: each "all-reduce" copies the partial sum device->host->device
            on a side stream (CUDA) or a worker thread (CPU), which is how an all-reduce travels
            between GPUs without P2P (RTX 4090). Measures real compute/copy concurrency.
            Default for `--device cuda` with one process.

    python launch/bench.py --summarize docs/bench_cpu_emulated.json   # the JSON as a markdown table

Per setting: a compute-only pass (communication skipped) gives compute_ms; then warm-up and
`--reps` timed prefills (max over ranks per repetition, median over repetitions). Timed is the
decoder plus the output layer (`GPTModel.forward` with `decoder_input`, embedding skipped: its
all-reduce is the same with and without ISO and cannot overlap). Peak memory (`PeakMemory`):
bytes allocated by the prefill above what was alive before it, from CUDA's allocator stats or,
on CPU, from torch's CPU allocator through the profiler; measured after all timed runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

FIELDS = ("profile", "seq_len", "tp", "split", "num_chunks", "baseline_ms", "iso_ms", "compute_ms",
          "comm_ms", "ideal_ms", "hidden_fraction", "time_reduction", "peak_mem_ratio")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default="ratio:0.5,ratio:1,ratio:2,gpu:4090/30b/tp4,gpu:a800/30b/tp4")
    p.add_argument("--seq-lens", default="1024,2048")
    p.add_argument("--splits", default="even,balanced,auto")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--link", choices=("emulated", "real", "proxy"), default=None,
                   help="default: emulated on CPU, proxy on one GPU, real on several GPUs")
    p.add_argument("--real", choices=("shm", "lazy", "eager"), default="shm",
                   help="emulated link: where the real all-reduce runs (see iso_megatron.emulated)")
    p.add_argument("--family", choices=("llama", "gpt"), default="llama")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=1408)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--num-chunks", type=int, default=2, help="chunks for the even/balanced splits")
    p.add_argument("--max-chunks", type=int, default=4, help="largest K the auto split considers")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compute-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    return p.parse_args(argv)


# ---------------------------------------------------------------- process setup

def init_distributed(device: str):
    if "RANK" not in os.environ:  # plain `python launch/bench.py`: one process
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class PeakMemory:
    """Peak bytes allocated above the level at entry (tensors alive before do not count).

    CUDA: the caching allocator's max_memory_allocated. CPU: torch's CPU allocator reports every
    allocation and free to the profiler (`profile_memory=True`); the running sum of each op's
    own (self) allocations and of the frees between ops, in time order, peaks at the answer
    (to the op: a temporary allocated and freed inside one op counts at its net size).
    tracemalloc does not see torch's allocator, and RSS keeps freed heap memory.
    """

    def __init__(self, device: str):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return False
        self.prof.__exit__(*exc)
        events = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in self.prof.events()
                         if e.self_cpu_memory_usage), key=lambda x: x[0])
        cur = peak = 0
        for _, nbytes in events:
            cur += nbytes
            peak = max(peak, cur)
        self.peak = peak
        return False


# ---------------------------------------------------------------- the proxy link (one device)

class _ProxyHandle:
    def __init__(self, done):
        self.done = done

    def wait(self):
        if isinstance(self.done, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(self.done)
        else:
            self.done.result()
        return True


class ProxyLink:
    """'All-reduce' of one device: copy the partial sum D2H then H2D, in place, off the compute
    stream (a CUDA side stream; a single worker thread on CPU). Transfers queue in issue order."""

    def __init__(self, device: str):
        self.device = device
        self.buffers = {}
        if device == "cuda":
            self.stream = torch.cuda.Stream()
        else:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1)

    def __call__(self, group):
        return self

    def _host(self, tensor):
        key = (tensor.numel(), tensor.dtype)
        if key not in self.buffers:  # one per size: the transfers are serial, reuse is safe
            self.buffers[key] = torch.empty(tensor.numel(), dtype=tensor.dtype,
                                            pin_memory=self.device == "cuda")
        return self.buffers[key]

    def start(self, tensor):
        host = self._host(tensor)
        flat = tensor.view(-1)
        if self.device == "cuda":
            ready = torch.cuda.Event()
            ready.record()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                host.copy_(flat, non_blocking=True)
                flat.copy_(host, non_blocking=True)
                tensor.record_stream(self.stream)
                done = torch.cuda.Event()
                done.record()
            return _ProxyHandle(done)

        def copy():
            host.copy_(flat)
            flat.copy_(host)
        return _ProxyHandle(self.pool.submit(copy))

    def drain(self):
        if self.device == "cuda":
            self.stream.synchronize()
        else:
            self.pool.submit(lambda: None).result()

    @contextmanager
    def stock_reduces(self):
        """Stock megatron's reduce (a no-op at TP 1) through the proxy, synchronously."""
        from megatron.core.tensor_parallel import mappings

        stock = mappings._reduce

        def proxied(input_, group):
            t = input_.contiguous()
            self.start(t).wait()
            return t

        mappings._reduce = proxied
        try:
            yield self
        finally:
            mappings._reduce = stock


@contextmanager
def pretend_tp(size: int):
    """Proxy mode: let ISO plan as if the TP group had `size` ranks (the proxy stands in for it)."""
    from iso_megatron import compat

    real = compat.tp_world_size
    compat.tp_world_size = lambda: size
    try:
        yield
    finally:
        compat.tp_world_size = real


# ---------------------------------------------------------------- the benchmark

class Bench:
    def __init__(self, args, rank, world):
        self.args, self.rank, self.world = args, rank, world
        self.device = args.device
        self.link_mode = args.link or ("emulated" if self.device == "cpu" else
                                       "proxy" if world == 1 else "real")
        if self.link_mode == "emulated" and self.device != "cpu":
            raise SystemExit("--link emulated is CPU only (its hold is a host-side sleep)")
        if self.link_mode == "proxy" and world != 1:
            raise SystemExit("--link proxy runs on one process (it stands in for the TP group)")
        if self.link_mode == "real" and world < 2:
            raise SystemExit("--link real needs >= 2 ranks (torchrun --nproc-per-node N)")
        self.tp = world if self.link_mode != "proxy" else 2
        dtype = args.dtype or ("fp32" if self.device == "cpu" else "bf16")
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.build_model()

    # -- model
    def build_model(self):
        from megatron.core import parallel_state

        from iso_megatron import apply_cpu_shims
        from iso_megatron.models import build_gpt, model_config

        a = self.args
        if self.device == "cpu":
            apply_cpu_shims()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.world)
        if self.device == "cuda":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        self.config = model_config(a.family, num_layers=a.num_layers, hidden_size=a.hidden_size,
                                   num_attention_heads=a.num_attention_heads,
                                   num_query_groups=a.num_query_groups, ffn_hidden_size=a.ffn_hidden_size,
                                   params_dtype=self.dtype)
        self.model = build_gpt(self.config, family=a.family, vocab_size=256,
                               max_sequence_length=max(self.seq_lens()) + 8)
        if self.device == "cuda":
            self.model = self.model.cuda()
        self.model.eval()
        self.esize = torch.tensor([], dtype=self.dtype).element_size()

    def seq_lens(self):
        return [int(s) for s in self.args.seq_lens.split(",") if s.strip()]

    def set_iso(self, iso):
        from iso_megatron import ISOConfig, apply_iso

        apply_iso(self.model, iso if iso is not None else ISOConfig(enabled=False))

    # -- timing
    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def barrier(self):
        self.sync()
        if self.world > 1:
            dist.barrier()

    def max_over_ranks(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            if self.device == "cuda":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def timed(self, fn, reps, drain=None):
        times = []
        out = None
        with torch.no_grad():
            for _ in range(reps):
                self.barrier()
                t0 = time.perf_counter()
                out = fn()
                if drain:
                    drain()
                self.sync()
                times.append(time.perf_counter() - t0)
        return self.max_over_ranks(times), out

    def peak(self, fn, drain=None):
        if self.args.no_memory:
            return None
        self.barrier()
        with torch.no_grad(), PeakMemory(self.device) as pm:
            fn()
            if drain:
                drain()
        return pm.peak

    # -- links
    def comm_context(self, link):
        """Both ISO's reduces and stock's synchronous ones over `link` (None: the real group)."""
        from iso_megatron.comm import use_reducer
        from iso_megatron.emulated import EmulatedLink, emulate

        if link is None:
            return nullcontext()
        if isinstance(link, EmulatedLink):
            return emulate(link)

        @contextmanager
        def ctx():
            with use_reducer(link), link.stock_reduces(), pretend_tp(2):
                yield link
                link.drain()
        return ctx()

    def measure_comm(self, link, nbytes_list):
        """Seconds of the given transfers one after another, each on its own (real/proxy links)."""
        from iso_megatron.comm import make_reducer
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        reducer = link(group) if link is not None else make_reducer(group)
        total = 0.0
        cache = {}
        for nbytes in nbytes_list:
            if nbytes not in cache:
                t = torch.zeros(nbytes // self.esize, dtype=self.dtype,
                                device="cuda" if self.device == "cuda" else "cpu")
                times, _ = self.timed(lambda: reducer.start(t).wait(), 4)
                cache[nbytes] = statistics.median(times[1:])
            total += cache[nbytes]
        return total

    # -- one prompt length
    def inputs(self, s):
        g = torch.Generator().manual_seed(s)  # identical on every rank
        b, h = self.args.batch, self.args.hidden_size
        dev = "cuda" if self.device == "cuda" else "cpu"
        x = (torch.randn(s, b, h, generator=g) * 0.5).to(dev, self.dtype)
        ids = torch.zeros(b, s, dtype=torch.long, device=dev)
        pos = torch.arange(s, device=dev)[None].expand(b, s)
        from iso_megatron import causal_mask

        mask = causal_mask(s, device=dev)
        return lambda: self.model(ids, pos, mask, decoder_input=x)

    def iso_config(self, split, bounds=None):
        from iso_megatron import ISOConfig

        if bounds is not None:  # replay exact boundaries (compute-only pass of an auto plan)
            s = bounds[-1]
            return ISOConfig(num_chunks=len(bounds) - 1, split=tuple((e - a) / s for a, e in zip(bounds, bounds[1:])),
                             min_tokens=0)
        if split is None:
            return None
        if split == "auto":
            return ISOConfig(num_chunks=self.args.max_chunks, split="auto", min_tokens=0)
        return ISOConfig(num_chunks=self.args.num_chunks, split=split, min_tokens=0)

    def bounds_for(self, split, s):
        from iso_megatron import autosplit
        from iso_megatron.split import TokenCost, chunk_boundaries

        c = self.config
        if self.tp < 2:
            return None  # TP 1: ISO steps aside (nothing to overlap), as plan_prefill does
        if split == "auto":
            return autosplit.last["boundaries"] if autosplit.last else None
        cost = TokenCost.from_dims(c.hidden_size, c.ffn_hidden_size,
                                   c.kv_channels * (c.num_query_groups or c.num_attention_heads),
                                   c.gated_linear_unit)
        b = chunk_boundaries(s, self.args.num_chunks, split, cost)
        return b if len(b) > 2 else None

    def compute_only(self, fwd, iso):
        """Stock prefill time with communication skipped: the least disturbed of a few runs
        (it sets the emulated link's speed, so a noisy run would skew every ratio)."""
        from iso_megatron.emulated import emulate, no_comm_link

        self.set_iso(iso)
        with emulate(no_comm_link()), (pretend_tp(2) if self.link_mode == "proxy" else nullcontext()):
            times, _ = self.timed(fwd, self.args.warmup + self.args.compute_reps)
        return min(times[self.args.warmup:])

    def make_link(self, profile, s, stock_compute_s):
        from iso_megatron.emulated import EmulatedLink, LinkModel, link_for_profile

        a = self.args
        if self.link_mode == "emulated" and self.tp < 2:
            return EmulatedLink(LinkModel(), real=a.real), LinkModel()  # TP 1: no all-reduce at all
        if self.link_mode == "emulated":
            model = link_for_profile(profile, s, a.batch, stock_compute_s, a.num_layers, a.hidden_size, self.esize)
            return EmulatedLink(model, real=a.real, max_bytes=s * a.batch * a.hidden_size * self.esize), model
        if self.link_mode == "proxy":
            return ProxyLink(self.device), None
        return None, None

    def run_profile(self, profile, s, fwd, stock_compute_s):
        """Baseline and every split under one link, interleaved rep by rep (so that a noisy
        machine slows them alike), each next to its compute-only twin."""
        from iso_megatron import autosplit
        from iso_megatron.emulated import emulate, no_comm_link

        a, L = self.args, self.args.num_layers
        b, h = a.batch, a.hidden_size
        full_bytes = s * b * h * self.esize
        link, link_model = self.make_link(profile, s, stock_compute_s)
        autosplit.clear_cache()
        drain = getattr(link, "drain", None)
        splits = [x.strip() for x in a.splits.split(",") if x.strip()]
        tp_ctx = (lambda: pretend_tp(2)) if self.link_mode == "proxy" else nullcontext

        # warm-up: every configuration once; auto calibrates and plans here (collectively)
        configs = {"baseline": None}
        bounds, auto_info, outs = {"baseline": None}, None, {}
        for split in splits:
            configs[split] = self.iso_config(split)
        for name, iso in configs.items():
            self.set_iso(iso)
            with self.comm_context(link), tp_ctx():
                _, outs[name] = self.timed(fwd, max(a.warmup, 1), drain)
                if name != "baseline":
                    bounds[name] = self.bounds_for(name, s)
                    if name == "auto" and autosplit.last:
                        auto_info = dict(autosplit.last)
                cal = autosplit.calibrate(self.config, s, b, self.tp)
        # compute-only twins replay the exact boundaries (an auto plan is not re-planned)
        compute_cfg = {name: (self.iso_config(name, bounds[name]) if bounds[name] else None) for name in configs}
        times = {name: [] for name in configs}
        ctimes = {name: [] for name in configs}
        for _ in range(a.reps):
            for name in configs:
                self.set_iso(configs[name])
                with self.comm_context(link), tp_ctx():
                    t, _ = self.timed(fwd, 1, drain)
                times[name] += t
                self.set_iso(compute_cfg[name])
                with emulate(no_comm_link()), tp_ctx():
                    t, _ = self.timed(fwd, 1)
                ctimes[name] += t
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        cmed = {n: statistics.median(v) * 1e3 for n, v in ctimes.items()}
        base_ms = med["baseline"]
        ref = outs["baseline"].float()
        if link_model is not None:
            comm = lambda nbytes: 2 * L * sum(link_model.seconds(n) for n in nbytes) * 1e3
        else:
            comm = lambda nbytes: self.measure_comm(link, list(nbytes) * (2 * L)) * 1e3
        base_comm_ms = comm([full_bytes])
        records = []
        for split in splits:
            bd = bounds[split]
            k = len(bd) - 1 if bd else 1
            err = float((outs[split].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            chunk_bytes = [(e - st) * b * h * self.esize for st, e in zip(bd[:-1], bd[1:])] if bd else [full_bytes]
            iso_ms, compute_ms, comm_ms = med[split], cmed[split], comm(chunk_bytes)
            ideal_ms = max(compute_ms, comm_ms)
            gap = base_ms - ideal_ms
            rec = dict(profile=profile if self.link_mode == "emulated" else self.link_mode,
                       seq_len=s, tp=self.tp, split=split, num_chunks=k, boundaries=bd,
                       baseline_ms=base_ms, iso_ms=iso_ms, compute_ms=compute_ms, comm_ms=comm_ms,
                       ideal_ms=ideal_ms,
                       hidden_fraction=(base_ms - iso_ms) / gap if gap > 0.01 * base_ms else None,
                       time_reduction=1 - iso_ms / base_ms, peak_mem_ratio=None,
                       baseline_compute_ms=cmed["baseline"], baseline_comm_ms=base_comm_ms,
                       baseline_ideal_ms=max(cmed["baseline"], base_comm_ms),
                       realized_ratio=base_comm_ms / cmed["baseline"], link_compute_ms=stock_compute_s * 1e3,
                       baseline_times_ms=[t * 1e3 for t in times["baseline"]],
                       iso_times_ms=[t * 1e3 for t in times[split]],
                       max_rel_err=err, batch=b, device=self.device, link=self.link_mode,
                       dtype=str(self.dtype).replace("torch.", ""), reps=a.reps)
            rec.update(self.model_prediction(s, bd, link_model, cal, base_ms, iso_ms))
            add_overlap_fields(rec)
            if link_model is not None:
                from iso_megatron.emulated import profile_ratio

                ratio, lat = profile_ratio(profile, s, b)
                rec.update(target_ratio=ratio, latency_fraction=lat, link_latency_us=link_model.latency_s * 1e6,
                           link_ms_per_mib=link_model.per_byte_s * 2 ** 20 * 1e3)
            if split == "auto" and auto_info is not None:
                rec["auto"] = auto_info
            records.append(rec)
            self.log(rec)
        return records

    def model_prediction(self, s, bounds, link_model, cal, base_ms, iso_ms):
        """The cost model on the calibrated machine, this exact link and the same boundaries."""
        from iso_megatron import costmodel as cm

        shape = cm.ModelShape.from_megatron_config(self.config)
        if link_model is not None:
            per_byte = max(link_model.per_byte_s, 1e-18)
            clink = cm.LinkProfile("emulated", link_model.latency_s * 1e6,
                                   2 * (self.tp - 1) / self.tp / per_byte / 1e9)
        else:
            clink = cal.link()
        p = cm.predict(shape, cal.device(), clink, self.tp, s, self.args.batch, boundaries=bounds or [0, s],
                       dtype_bytes=self.esize)
        return dict(calibration=cal._asdict(), model_baseline_ms=p.baseline_ms, model_iso_ms=p.iso_ms, model_compute_ms=p.compute_ms,
                    model_comm_ms=p.comm_ms, model_error=p.iso_ms / iso_ms - 1,
                    model_baseline_error=p.baseline_ms / base_ms - 1)

    def log(self, rec):
        if self.rank != 0:
            return
        hf = rec["hidden_fraction"]
        mem = rec["peak_mem_ratio"]
        print(f"[bench] {rec['profile']:>18} s={rec['seq_len']:5d} {rec['split']:>8} K={rec['num_chunks']} "
              f"base {rec['baseline_ms']:8.1f} iso {rec['iso_ms']:8.1f} ideal {rec['ideal_ms']:8.1f} "
              f"C {rec['compute_ms']:7.1f} (stock {rec['baseline_compute_ms']:7.1f}) M {rec['comm_ms']:7.1f} "
              f"hidden {'-' if hf is None else f'{hf:.3f}'} reduction {rec['time_reduction']:+.3f} "
              f"{'' if mem is None else f'mem {mem:.3f} '}model {rec['model_error']:+.3f}/"
              f"{rec['model_baseline_error']:+.3f} err {rec['max_rel_err']:.1e}", flush=True)

    def memory_pass(self, records):
        """Peak memory of baseline and of each plan measured, once per (prompt, boundaries),
        after all timing (the malloc setting it needs would slow the timed runs)."""
        if self.args.no_memory:
            return
        from iso_megatron.emulated import EmulatedLink

        link = EmulatedLink(real=self.args.real, max_bytes=max(self.seq_lens()) * self.args.batch
                            * self.args.hidden_size * self.esize) if self.link_mode == "emulated" else \
            ProxyLink(self.device) if self.link_mode == "proxy" else None
        drain = getattr(link, "drain", None)
        tp_ctx = (lambda: pretend_tp(2)) if self.link_mode == "proxy" else nullcontext
        cache = {}
        for s in self.seq_lens():
            fwd = self.inputs(s)
            plans = [None] + [tuple(r["boundaries"]) for r in records if r["seq_len"] == s and r["boundaries"]]
            for bd in dict.fromkeys(plans):
                self.set_iso(self.iso_config(None, list(bd)) if bd else None)
                with self.comm_context(link), tp_ctx():
                    with torch.no_grad():
                        fwd()
                    peaks = [self.peak(fwd, drain)]
                cache[(s, bd)] = self.max_over_ranks([min(peaks)])[0]
        for r in records:
            base = cache[(r["seq_len"], None)]
            iso = cache[(r["seq_len"], tuple(r["boundaries"]) if r["boundaries"] else None)]
            r.update(baseline_peak_mb=base / 2 ** 20, iso_peak_mb=iso / 2 ** 20,
                     peak_mem_ratio=iso / base if base > 0 else None)

    def run(self):
        a = self.args
        profiles = [p.strip() for p in a.profiles.split(",") if p.strip()]
        if self.link_mode != "emulated":
            profiles = [self.link_mode]
        records = []
        for s in self.seq_lens():
            fwd = self.inputs(s)
            for profile in profiles:
                # measured again right before each profile: the link's speed follows from it
                stock_compute_s = self.compute_only(fwd, None)
                records += self.run_profile(profile, s, fwd, stock_compute_s)
        self.memory_pass(records)
        if self.rank == 0:
            for r in records:
                print(f"[bench] memory {r['profile']:>18} s={r['seq_len']:5d} {r['split']:>8} "
                      f"peak ratio {r['peak_mem_ratio']}", flush=True)
        return records


# ---------------------------------------------------------------- output

def add_overlap_fields(rec):
    """Overlap quality on the ISO chunks themselves, apart from any change of compute.

    On CPU megatron's local attention computes the whole masked [queries, keys] square, and a
    chunk computes only its rows against the keys before it, so ISO's compute (compute_ms) is
    smaller than stock's (baseline_compute_ms) at long prompts, a saving fused causal kernels on
    GPUs do not have. These fields compare ISO with its own chunks run one after another:
      sequential_ms            compute_ms + comm_ms
      overlap_reduction        1 - iso / sequential
      chunk_hidden_fraction    (sequential - iso) / min(compute_ms, comm_ms)
    """
    seq = rec["compute_ms"] + rec["comm_ms"]
    hidden = min(rec["compute_ms"], rec["comm_ms"])
    rec.update(sequential_ms=seq, overlap_reduction=1 - rec["iso_ms"] / seq if seq > 0 else None,
               chunk_hidden_fraction=(seq - rec["iso_ms"]) / hidden
               if rec["num_chunks"] > 1 and hidden > 0.01 * seq else None)
    return rec


def plot(records, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return False
    profiles = list(dict.fromkeys(r["profile"] for r in records))
    cols = min(3, len(profiles))
    rows = math.ceil(len(profiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, prof in zip(axes.flat, profiles):
        rs = [r for r in records if r["profile"] == prof]
        lens = sorted({r["seq_len"] for r in rs})

        def series(split, key):
            out = []
            for s in lens:
                m = [r[key] for r in rs if r["seq_len"] == s and (split is None or r["split"] == split)]
                out.append(m[0] if m else float("nan"))
            return out
        ax.plot(lens, series(None, "baseline_ms"), "o-", color="black", label="baseline (stock)")
        for split, style in (("even", "s--"), ("balanced", "^:"), ("auto", "D-")):
            if any(r["split"] == split for r in rs):
                ax.plot(lens, series(split, "iso_ms"), style, label=f"ISO {split}")
        ideal_split = "auto" if any(r["split"] == "auto" for r in rs) else rs[0]["split"]
        ax.plot(lens, series(ideal_split, "ideal_ms"), "x-.", color="gray", label="ideal max(C, M)")
        ax.set_title(prof)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("prefill time (ms)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [str(s) for s in lens])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(profiles):]:
        ax.axis("off")
    fig.suptitle("ISO prefill vs stock Megatron-core (CPU, emulated link, TP 2)"
                 if records and records[0].get("link") == "emulated" else "ISO prefill vs stock Megatron-core")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def summarize(records) -> str:
    """Markdown table of a bench JSON: per profile, prompt length and split."""
    rows = ["| profile | prompt | split | K | baseline ms | ISO ms | ideal ms | C ms (stock) | M ms | hidden "
            "fraction | time reduction | overlap-only reduction | peak mem ratio | model error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    for r in records:
        if "overlap_reduction" not in r:
            add_overlap_fields(r)
        rows.append(f"| {r['profile']} | {r['seq_len']} | {r['split']} | {r['num_chunks']} | {r['baseline_ms']:.1f} | "
                    f"{r['iso_ms']:.1f} | {r['ideal_ms']:.1f} | {r['compute_ms']:.1f} ({r['baseline_compute_ms']:.1f}) | "
                    f"{r['comm_ms']:.1f} | {f(r['hidden_fraction'], '.3f')} | {r['time_reduction']:+.1%} | "
                    f"{f(r['overlap_reduction'], '+.1%')} | {f(r['peak_mem_ratio'], '.2f')} | "
                    f"{r['model_error']:+.1%} |")
    return "\n".join(rows)


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        with open(sys.argv[2]) as f:
            print(summarize(json.load(f)))
        return
    args = parse_args(argv)
    rank, world = init_distributed(args.device)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    bench = Bench(args, rank, world)
    records = bench.run()
    if rank == 0:
        if args.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
            with open(args.output_json, "w") as f:
                json.dump(records, f, indent=1)
            print(f"[bench] wrote {len(records)} records to {args.output_json}", flush=True)
        if args.plot:
            if plot(records, args.plot):
                print(f"[bench] wrote {args.plot}", flush=True)
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
