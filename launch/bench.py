"""ISO prefill benchmark: baseline (stock megatron-core) vs ISO, against the ideal-overlap bound.

    torchrun --standalone --nproc-per-node 2 launch/bench.py --profiles ratio:1,gpu:4090/30b/tp4 \\
        --seq-lens 1024,2048 --splits even,balanced,auto --output-json docs/bench.json --plot docs/bench.png
    python launch/bench.py --link proxy --splits balanced --seq-lens 1024   # one process, TP 2 stood in for
    python launch/bench.py --summarize docs/bench_cpu_emulated.json         # a bench JSON as a markdown table

Model, precision and timing flags are the other launchers' (`iso_megatron.cli`, Megatron-LM's
names): `--num-layers`, `--hidden-size`, `--micro-batch-size`, `--bf16` / `--fp16` (default fp32
on CPU, bf16 on CUDA), `--timing-repeats`, `--timing-warmup`, `--iso-chunks`, `--iso-min-tokens`.
In bf16/fp16 the model runs as Megatron-LM runs it: built with that params_dtype, inside
megatron-core's Float16Module (everything in half precision, norms included; logits cast to fp32).

Links (`--link`). Each is put in place with `with` around the runs it carries and is gone after
them; this launcher patches no module:
  emulated  (default on CPU) `iso_megatron.emulated.emulate`: every all-reduce runs for real,
            by default through shared memory between the ranks of this host (`--real shm`, as
            NCCL's SHM transport; `--real lazy|eager`: gloo over TCP loopback), and its completion
            is held to a modelled time. `--profiles` say which: `ratio:R` (the all-reduces of the
            unsplit prompt take R x its measured compute, no communication) or
            `gpu:<device>/<model>/tp<N>` (the M/C ratio and link latency share that the cost model
            predicts for that GPU, model and TP at this prompt length; `iso_megatron.costmodel`).
            The baseline runs the UNTOUCHED stock code: inside `emulate`, megatron's synchronous
            reduce goes through the same link, start + wait, so it pays the same modelled time.
  real      the process group's own all-reduce (NCCL on GPUs, gloo on CPU) for ISO
            (`comm.TorchDistReducer`) and stock alike; no profiles.
  proxy     `iso_megatron.proxy.stand_in`: one process plans ISO as TP `--tensor-model-parallel-size`
            (default 2) and each "all-reduce" copies the partial sum device->host->device on a side
            stream (CUDA) or a worker thread (CPU), which is how an all-reduce travels between GPUs
            without P2P (RTX 4090); stock's reduces take the same copy. Measures real compute/copy
            concurrency. Default for `--device cuda` with one process.

Per setting: a compute-only pass (communication skipped) gives compute_ms; then warm-up and
`--timing-repeats` timed prefills (every rank starts after a barrier and stops after another:
max over ranks per repetition, median over repetitions; `cli.time_ms`). What ISO ran is read from
the block (`model.decoder.iso_plan`), and the compute-only twin replays exactly those chunks.
Timed is the decoder plus the output layer (`GPTModel.forward` with `decoder_input`, embedding
skipped: its all-reduce is the same with and without ISO and cannot overlap; in bf16/fp16 also
Float16Module's cast of the logits to fp32). Peak memory
(`PeakMemory`): bytes allocated by the prefill above what was alive before it, from CUDA's
allocator stats or, on CPU, from torch's CPU allocator through the profiler; measured after all
timed runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from iso_megatron import cli
from iso_megatron import costmodel as cm

warnings.filterwarnings("ignore")

FIELDS = ("profile", "seq_len", "tp", "split", "num_chunks", "baseline_ms", "iso_ms", "compute_ms",
          "comm_ms", "ideal_ms", "hidden_fraction", "time_reduction", "peak_mem_ratio")
SPLITS = ("even", "balanced", "auto")
# the bench's default model (docs/bench_results.md): Llama style, GQA 8 heads / 4 groups
DEFAULT_MODEL = dict(num_layers=8, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                     group_query_attention=True, num_query_groups=4, vocab_size=256)


def build_parser() -> argparse.ArgumentParser:
    defaults = DEFAULT_MODEL
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"The bench's defaults (its own model, not a tokenizer's): --num-layers {defaults['num_layers']} "
               f"--hidden-size {defaults['hidden_size']} --ffn-hidden-size {defaults['ffn_hidden_size']} "
               f"--num-attention-heads {defaults['num_attention_heads']}, grouped-query attention on with "
               f"--num-query-groups {defaults['num_query_groups']} (as many groups as heads: plain multi-head), "
               f"--vocab-size {defaults['vocab_size']}, --micro-batch-size 1, --seed 1234. Precision: fp32 on "
               "--device cpu, bf16 on --device cuda; --bf16 or --fp16 choose (fp32 cannot be asked for on CUDA).")
    cli.add_shape_args(p)
    iso = p.add_argument_group("ISO (launch/infer.py's flags; the splits compared are --splits)")
    iso.add_argument("--iso-chunks", type=int, default=2,
                     help="chunks of the even and balanced splits (default 2)")
    iso.add_argument("--iso-min-tokens", type=int, default=0,
                     help="prompts shorter run stock in every ISO run (default 0: every prompt is "
                          "split; auto still applies its calibrated threshold)")
    cli.add_timing_args(p, repeats=5, warmup=1)
    g = p.add_argument_group("benchmark")
    g.add_argument("--profiles", default="ratio:0.5,ratio:1,ratio:2,gpu:4090/30b/tp4,gpu:a800/30b/tp4",
                   help="emulated link: ratio:<R> or gpu:<device>/<model>/tp<N>, comma-separated")
    g.add_argument("--seq-lens", default="1024,2048", help="prompt lengths, comma-separated")
    g.add_argument("--splits", default="even,balanced,auto",
                   help="ISO splits compared with the baseline, comma-separated: even, balanced, auto")
    g.add_argument("--max-chunks", type=int, default=4,
                   help="largest K the auto split considers (its --iso-chunks; bench-specific so that "
                        "one run compares K=--iso-chunks fixed splits with auto up to this)")
    g.add_argument("--output-json", default=None)
    g.add_argument("--plot", default=None)
    g.add_argument("--summarize", metavar="JSON", default=None,
                   help="print a bench JSON as a markdown table and exit (nothing is run)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="default precision: fp32 on cpu, bf16 on cuda (--bf16 / --fp16 choose)")
    g.add_argument("--link", choices=("emulated", "real", "proxy"), default=None,
                   help="default: emulated on CPU, proxy on one GPU, real on several GPUs")
    g.add_argument("--real", choices=("shm", "lazy", "eager"), default="shm",
                   help="emulated link: how the real all-reduce travels (see iso_megatron.emulated)")
    g.add_argument("--family", choices=("llama", "gpt"), default="llama")
    g.add_argument("--compute-reps", type=int, default=3,
                   help="compute-only runs that set the link's speed (the least disturbed counts)")
    g.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.set_defaults(**DEFAULT_MODEL)
    return p


def _ints(text):
    return [int(s) for s in text.split(",") if s.strip()]


def _names(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    """Parse and check everything that needs no process group: every rank fails alike."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.summarize:
        return args
    try:
        args.dtype = cli.dtype_from_args(args, torch.bfloat16 if args.device == "cuda" else torch.float32)
        lens = _ints(args.seq_lens)
    except ValueError as e:
        p.error(str(e))
    if not lens or min(lens) < 2:
        p.error(f"--seq-lens: want comma-separated lengths >= 2, got {args.seq_lens!r}")
    bad = [s for s in _names(args.splits) if s not in SPLITS]
    if bad or not _names(args.splits):
        p.error(f"--splits: want a comma-separated subset of {', '.join(SPLITS)}, got {args.splits!r}")
    for spec in _names(args.profiles):
        try:
            cm.parse_profile(spec)
        except ValueError as e:
            p.error(f"--profiles: {e}")
    for flag, value, least in (("--iso-chunks", args.iso_chunks, 1), ("--max-chunks", args.max_chunks, 1),
                               ("--iso-min-tokens", args.iso_min_tokens, 0),
                               ("--timing-repeats", args.timing_repeats, 1),
                               ("--timing-warmup", args.timing_warmup, 0),
                               ("--compute-reps", args.compute_reps, 1),
                               ("--micro-batch-size", args.micro_batch_size, 1)):
        if value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    return args


# ---------------------------------------------------------------- memory

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
        tp = args.tensor_model_parallel_size
        if self.link_mode == "proxy":
            self.tp = 2 if tp is None else tp  # the TP size the proxy stands in for
            if self.tp < 2:
                raise SystemExit("--link proxy: --tensor-model-parallel-size must be >= 2 (the TP "
                                 "size ISO plans for in this one process)")
        else:
            if tp not in (None, world):
                raise SystemExit(f"--tensor-model-parallel-size {tp}: the bench runs TP = the number "
                                 f"of processes ({world}); only --link proxy stands in for another")
            self.tp = world
        self.dtype = args.dtype
        self.esize = torch.tensor([], dtype=self.dtype).element_size()
        self.build_model()

    # -- model
    def build_model(self):
        from megatron.core import parallel_state

        from iso_megatron import apply_cpu_shims
        from iso_megatron.megatron.block import attention_kind
        from iso_megatron.megatron.models import build_gpt, model_config
        from iso_megatron.megatron.precision import float16_module
        from iso_megatron.planner import Environment
        from iso_megatron.shape import ModelShape

        a = self.args
        if self.device == "cpu":
            apply_cpu_shims()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.world)
        if self.device == "cuda":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(a.seed)
        torch.manual_seed(a.seed)
        groups = a.num_query_groups if a.group_query_attention else a.num_attention_heads
        self.config = model_config(a.family, num_layers=a.num_layers, hidden_size=a.hidden_size,
                                   num_attention_heads=a.num_attention_heads, num_query_groups=groups,
                                   ffn_hidden_size=a.ffn_hidden_size, params_dtype=self.dtype)
        self.gpt = build_gpt(self.config, family=a.family, vocab_size=a.vocab_size,
                             max_sequence_length=max(_ints(a.seq_lens)) + 8)
        if self.device == "cuda":
            self.gpt = self.gpt.cuda()
        self.gpt.eval()
        # what Megatron-LM runs for --bf16 / --fp16: megatron-core's Float16Module around it
        self.model = float16_module(self.gpt, self.config)
        self.param_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()})
        self.shape = ModelShape.from_megatron_config(self.config)
        self.group = parallel_state.get_tensor_model_parallel_group()
        dev = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")
        # the attention the bench model runs, as the block's own auto plan measures it
        self.env = Environment(dev, self.dtype, self.group,
                               attention=attention_kind(list(self.gpt.decoder.layers)))

    def set_iso(self, iso):
        from iso_megatron import ISOConfig, apply_iso

        apply_iso(self.model, iso if iso is not None else ISOConfig(enabled=False))

    def iso_config(self, split, bounds=None):
        from iso_megatron import ISOConfig

        a = self.args
        if bounds is not None:  # replay exact boundaries (compute-only twin of any plan)
            s = bounds[-1]
            return ISOConfig(num_chunks=len(bounds) - 1, min_tokens=0,
                             split=tuple((e - b) / s for b, e in zip(bounds, bounds[1:])))
        if split == "auto":
            return ISOConfig(num_chunks=a.max_chunks, split="auto", min_tokens=a.iso_min_tokens)
        return ISOConfig(num_chunks=a.iso_chunks, split=split, min_tokens=a.iso_min_tokens)

    def ran(self):
        """The chunk boundaries the latest ISO forward ran (None: the stock path), as recorded
        by the block itself."""
        plan = self.gpt.decoder.iso_plan
        return None if plan.bounds is None else list(plan.bounds)

    # -- links: each is a `with` around the runs it carries
    def over(self, link):
        """ISO's reduces and stock's synchronous ones over `link` for one `with` block."""
        from iso_megatron.comm import TorchDistReducer, use_reducer
        from iso_megatron.emulated import emulate
        from iso_megatron.proxy import stand_in

        if self.link_mode == "emulated":
            return emulate(link)
        if self.link_mode == "proxy":
            return stand_in(link, self.tp)
        return use_reducer(TorchDistReducer)  # real: the process group's own, stock's too

    @contextmanager
    def no_comm(self):
        """Communication skipped (compute-only runs): ISO's and stock's reduces over a link that
        neither communicates nor takes time; under the proxy ISO still plans as its TP size."""
        from iso_megatron.comm import stand_in_tp
        from iso_megatron.emulated import emulate, no_comm_link

        with emulate(no_comm_link()), (stand_in_tp(self.tp) if self.link_mode == "proxy" else nullcontext()):
            yield

    def make_link(self, profile, s, stock_compute_s):
        """(link, its LinkModel or None) for one profile and prompt length."""
        from iso_megatron.emulated import EmulatedLink, LinkModel
        from iso_megatron.proxy import ProxyLink

        a = self.args
        if self.link_mode == "emulated":
            if self.tp < 2:
                return EmulatedLink(LinkModel(), real=a.real), LinkModel()  # TP 1: no all-reduce at all
            model = cm.link_for_profile(profile, s, a.micro_batch_size, stock_compute_s, a.num_layers,
                                        a.hidden_size, self.esize)
            return EmulatedLink(model, real=a.real, max_bytes=s * a.micro_batch_size * a.hidden_size * self.esize), model
        if self.link_mode == "proxy":
            return ProxyLink(self.device), None
        return None, None

    # -- timing
    def barrier(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        if self.world > 1:
            dist.barrier()

    def max_over_ranks(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            if self.device == "cuda":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def timed(self, fn, repeats, warmup=0):
        """ms of each repetition of `fn`, max over ranks (`cli.time_ms`; every clock read after
        a barrier, and CUDA synchronised)."""
        return self.max_over_ranks(cli.time_ms(fn, repeats, warmup, sync=self.barrier))

    def peak(self, fn):
        self.barrier()
        with PeakMemory(self.device) as pm:
            fn()
        return pm.peak

    def measure_comm(self, link, nbytes_list):
        """ms of the given transfers one after another, each timed on its own (real/proxy links)."""
        from iso_megatron.comm import make_reducer

        total, cache = 0.0, {}
        with self.over(link):
            reducer = make_reducer(self.group)
            for nbytes in nbytes_list:
                if nbytes not in cache:
                    t = torch.zeros(nbytes // self.esize, dtype=self.dtype,
                                    device="cuda" if self.device == "cuda" else "cpu")
                    cache[nbytes] = cli.median(self.timed(lambda: reducer.start(t).wait(), 3, warmup=1))
                total += cache[nbytes]
        return total

    # -- one prompt length
    def inputs(self, s):
        g = torch.Generator().manual_seed(s)  # identical on every rank
        b, h = self.args.micro_batch_size, self.args.hidden_size
        dev = "cuda" if self.device == "cuda" else "cpu"
        x = (torch.randn(s, b, h, generator=g) * 0.5).to(dev, self.dtype)
        ids = torch.zeros(b, s, dtype=torch.long, device=dev)
        pos = torch.arange(s, device=dev)[None].expand(b, s)
        from iso_megatron import causal_mask

        mask = causal_mask(s, device=dev)
        return lambda: self.model(ids, pos, mask, decoder_input=x)

    def compute_only(self, fwd):
        """Stock prefill time (s) with communication skipped: the least disturbed of a few runs
        (it sets the emulated link's speed, so a noisy run would skew every ratio)."""
        self.set_iso(None)
        with self.no_comm():
            times = self.timed(fwd, self.args.compute_reps, warmup=self.args.timing_warmup)
        return min(times) / 1e3

    def run_profile(self, profile, s, fwd, stock_compute_s):
        """Baseline and every split under one link, interleaved rep by rep (so that a noisy
        machine slows them alike), each next to its compute-only twin."""
        from iso_megatron.calibrate import calibrate, clear_cache

        a, L = self.args, self.args.num_layers
        b, h = a.micro_batch_size, a.hidden_size
        full_bytes = s * b * h * self.esize
        link, link_model = self.make_link(profile, s, stock_compute_s)
        clear_cache()
        splits = _names(a.splits)
        configs = {"baseline": None, **{split: self.iso_config(split) for split in splits}}

        # warm-up: every configuration; auto calibrates and plans here (collectively), with the
        # block's probe of the model's own layer; the prediction below reads that calibration
        bounds, plans, outs = {"baseline": None}, {}, {}
        for name, iso in configs.items():
            self.set_iso(iso)
            with self.over(link):
                for _ in range(max(a.timing_warmup, 1)):
                    outs[name] = fwd()
                if iso is not None:
                    plans[name], bounds[name] = self.gpt.decoder.iso_plan, self.ran()
        with self.over(link):
            cal = calibrate(self.shape, self.env, s, b, self.tp)
        # compute-only twins replay the exact boundaries (an auto plan is not re-planned)
        twins = {name: self.iso_config(None, bounds[name]) if bounds[name] else None for name in configs}
        times = {name: [] for name in configs}
        ctimes = {name: [] for name in configs}
        for _ in range(a.timing_repeats):
            for name in configs:
                for cfg, ctx, out in ((configs[name], self.over(link), times),
                                      (twins[name], self.no_comm(), ctimes)):
                    self.set_iso(cfg)
                    with ctx:
                        out[name] += self.timed(fwd, 1)
                    if cfg is not None and self.ran() != bounds[name]:
                        raise RuntimeError(f"{name}: ran {self.ran()}, planned {bounds[name]}")
        med = {n: cli.median(v) for n, v in times.items()}
        cmed = {n: cli.median(v) for n, v in ctimes.items()}
        base_ms = med["baseline"]
        ref = outs["baseline"].float()
        if link_model is not None:
            comm = lambda nbytes: 2 * L * sum(link_model.seconds(n) for n in nbytes) * 1e3
        else:
            comm = lambda nbytes: self.measure_comm(link, list(nbytes) * (2 * L))
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
            plan = plans[split]
            rec = dict(profile=profile if self.link_mode == "emulated" else self.link_mode,
                       seq_len=s, tp=self.tp, split=split, num_chunks=k, boundaries=bd,
                       plan_reason=plan.reason,
                       baseline_ms=base_ms, iso_ms=iso_ms, compute_ms=compute_ms, comm_ms=comm_ms,
                       ideal_ms=ideal_ms,
                       hidden_fraction=(base_ms - iso_ms) / gap if gap > 0.01 * base_ms else None,
                       time_reduction=1 - iso_ms / base_ms, peak_mem_ratio=None,
                       baseline_compute_ms=cmed["baseline"], baseline_comm_ms=base_comm_ms,
                       baseline_ideal_ms=max(cmed["baseline"], base_comm_ms),
                       realized_ratio=base_comm_ms / cmed["baseline"], link_compute_ms=stock_compute_s * 1e3,
                       baseline_times_ms=times["baseline"], iso_times_ms=times[split],
                       max_rel_err=err, batch=b, device=self.device, link=self.link_mode,
                       dtype=str(self.dtype).replace("torch.", ""), param_dtypes=self.param_dtypes,
                       reps=a.timing_repeats)
            rec.update(self.model_prediction(s, bd, link_model, cal, base_ms, iso_ms))
            add_overlap_fields(rec)
            if link_model is not None:
                ratio, lat = cm.profile_ratio(profile, s, b)
                rec.update(target_ratio=ratio, latency_fraction=lat, link_latency_us=link_model.latency_s * 1e6,
                           link_ms_per_mib=link_model.per_byte_s * 2 ** 20 * 1e3)
            if split == "auto":
                rec["auto"] = plan._asdict()
            records.append(rec)
            self.log(rec)
        return records

    def model_prediction(self, s, bounds, link_model, cal, base_ms, iso_ms):
        """The cost model on the calibrated machine, this exact link and the same boundaries."""
        if link_model is not None:
            clink = cm.LinkProfile.from_per_byte("emulated", link_model.latency_s, link_model.per_byte_s, self.tp)
        else:
            clink = cal.link()
        p = cm.predict(self.shape, cal.device(), clink, self.tp, s, self.args.micro_batch_size,
                       boundaries=bounds or [0, s], dtype_bytes=self.esize)
        return dict(calibration=cal._asdict(), model_baseline_ms=p.baseline_ms, model_iso_ms=p.iso_ms,
                    model_compute_ms=p.compute_ms, model_comm_ms=p.comm_ms, model_error=p.iso_ms / iso_ms - 1,
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
        from iso_megatron.emulated import EmulatedLink
        from iso_megatron.proxy import ProxyLink

        a = self.args
        link = (EmulatedLink(real=a.real, max_bytes=max(_ints(a.seq_lens)) * a.micro_batch_size * a.hidden_size
                             * self.esize) if self.link_mode == "emulated" else
                ProxyLink(self.device) if self.link_mode == "proxy" else None)
        cache = {}
        for s in _ints(a.seq_lens):
            fwd = self.inputs(s)
            plans = [None] + [tuple(r["boundaries"]) for r in records if r["seq_len"] == s and r["boundaries"]]
            for bd in dict.fromkeys(plans):
                self.set_iso(self.iso_config(None, list(bd)) if bd else None)
                with self.over(link):
                    fwd()
                    peak = self.peak(fwd)
                cache[(s, bd)] = self.max_over_ranks([peak])[0]
        for r in records:
            base = cache[(r["seq_len"], None)]
            iso = cache[(r["seq_len"], tuple(r["boundaries"]) if r["boundaries"] else None)]
            r.update(baseline_peak_mb=base / 2 ** 20, iso_peak_mb=iso / 2 ** 20,
                     peak_mem_ratio=iso / base if base > 0 else None)

    def run(self):
        a = self.args
        profiles = _names(a.profiles) if self.link_mode == "emulated" else [self.link_mode]
        records = []
        with torch.no_grad():
            for s in _ints(a.seq_lens):
                fwd = self.inputs(s)
                for profile in profiles:
                    # measured again right before each profile: the link's speed follows from it
                    records += self.run_profile(profile, s, fwd, self.compute_only(fwd))
            if not a.no_memory:
                self.memory_pass(records)
        if self.rank == 0 and not a.no_memory:
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
    args = parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print(summarize(json.load(f)))
        return
    from iso_megatron.runtime import init_process_group, shutdown

    try:  # every exit, success or error, tears the process groups down in order
        init_process_group(args.device)
        _main(args, dist.get_rank(), dist.get_world_size())
    finally:
        shutdown()


def _main(args, rank, world):
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    records = Bench(args, rank, world).run()
    if rank == 0:
        if args.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
            with open(args.output_json, "w") as f:
                json.dump(records, f, indent=1)
            print(f"[bench] wrote {len(records)} records to {args.output_json}", flush=True)
        if args.plot:
            if plot(records, args.plot):
                print(f"[bench] wrote {args.plot}", flush=True)


if __name__ == "__main__":
    main()
