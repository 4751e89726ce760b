"""Cost-model validation on this machine: predicted vs measured COMPUTE, stock and ISO, no link.

    python3 scripts/validate_costmodel.py                                   # TP 1, one thread
    torchrun --standalone --nproc-per-node 2 scripts/validate_costmodel.py  # TP 2, one thread per rank
    python3 scripts/validate_costmodel.py --seq-lens 256,1024 --output-json /tmp/validation.json
    python3 scripts/validate_costmodel.py --summarize /tmp/validation.json    # its tables again

Not run by CI (minutes of CPU). The model is launch/bench.py's default (`DEFAULT_MODEL`: Llama
style, 8 layers, hidden 512, FFN 1408 SwiGLU, 8 heads in 4 query groups) with SDPAAttention
(torch's fused causal kernel, stock and ISO alike), fp32, batch 1.

1. Calibration: `iso_megatron.calibrate.calibrate` as split="auto" runs it, on the model's own
   layer (megatron's `block.step_probe`, as the ISO block passes it) and attention kind.
   `--calibrations N` calibrates N times (the cache cleared in between): the table uses the
   first, as a process does, and shows the spread of the error over all N.
2. Compute, no link: the decoder's prefill with communication skipped (at TP 1 there is none;
   at TP 2 every all-reduce, stock's and ISO's, goes over `emulated.no_comm_link()`, as the
   bench's compute-only runs). Stock: each layer's forward timed (forward hooks), and the whole
   decoder. ISO (even splits, `--chunks`; at TP 1 planned as TP 2 through `comm.stand_in_tp`,
   the chunks then run on one rank with all heads): every compute step (attention, MLP, and the
   residual add after each reduce) timed and summed per chunk, and the whole decoder. Stock and
   every split alternate within each repetition; medians over repetitions (max over ranks).
   Predicted: `costmodel.chunk_costs` of each chunk from the calibration (attn + mlp compute,
   per layer), the same for [0, s) for stock; "no token term" is the same with token_s = 0.
3. Link-dominated cases, separately: the emulated link's hold against `costmodel.allreduce_time`
   for the same latency and per-byte figures (consistent by construction: this only checks the
   plumbing), and one ISO prefill per split over a link whose all-reduces take `--link-ratio` x
   the measured compute, against `costmodel.simulate` of the same schedule with the calibrated
   compute and that link.
glibc's allocator is fixed first (`--malloc fixed`, `iso_megatron.cli.fixed_malloc`): with its default, stock's
larger tensors fault their pages in afresh at every prefill (docs/costmodel_validation.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from iso_megatron import cli  # noqa: E402

PROBE_TOKENS = 128  # megatron.block.step_probe's default rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="256,512,1024,2048,4096,8192")
    p.add_argument("--chunks", default="2,3", help="K of the even ISO splits, comma-separated")
    p.add_argument("--reps", type=int, default=5, help="repetitions below 4096 tokens")
    p.add_argument("--long-reps", type=int, default=3, help="repetitions at 4096 tokens and more")
    p.add_argument("--calibrations", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--link-seq-len", type=int, default=2048, help="prompt of the link-dominated prefill (0: skip)")
    p.add_argument("--link-ratio", type=float, default=2.0, help="M / C of the link-dominated prefill")
    p.add_argument("--token-source", choices=("layer", "miniature"), default="layer",
                   help="layer (default): the step probe names its rows, so calibrate measures the per-token "
                        "term on megatron's layer; miniature: it does not (calibrate's model-shaped miniature)")
    p.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                   help="fixed (default): glibc keeps freed memory and never maps a tensor of its own "
                        "(`cli.fixed_malloc`); default: glibc's own dynamic mmap threshold")
    p.add_argument("--output-json", default=None)
    p.add_argument("--summarize", metavar="JSON", default=None,
                   help="print a validation JSON as the markdown tables and exit (nothing is run)")
    a = p.parse_args(argv)
    if a.summarize:
        return a
    try:
        a.seq_lens = [int(s) for s in a.seq_lens.split(",") if s.strip()]
        a.chunks = [int(k) for k in a.chunks.split(",") if k.strip()]
    except ValueError as e:
        p.error(f"--seq-lens / --chunks want comma-separated integers: {e}")
    if not a.seq_lens or min(a.seq_lens) < 2 or not a.chunks or min(a.chunks) < 2:
        p.error("--seq-lens want lengths >= 2 and --chunks K >= 2")
    if min(a.reps, a.long_reps, a.calibrations, a.threads) < 1:
        p.error("--reps, --long-reps, --calibrations and --threads must be >= 1")
    return a


# ---------------------------------------------------------------- the model

class Setup:
    def __init__(self, args):
        from megatron.core import parallel_state

        from iso_megatron import apply_cpu_shims
        from iso_megatron.megatron.models import build_gpt, model_config
        from iso_megatron.shape import ModelShape
        from launch.bench import DEFAULT_MODEL

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        apply_cpu_shims()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.world)
        torch.manual_seed(1234)
        m = DEFAULT_MODEL
        self.config = model_config("llama", num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                                   num_attention_heads=m["num_attention_heads"],
                                   num_query_groups=m["num_query_groups"], ffn_hidden_size=m["ffn_hidden_size"])
        self.gpt = build_gpt(self.config, family="llama", vocab_size=m["vocab_size"],
                             max_sequence_length=max(args.seq_lens + [args.link_seq_len]) + 8,
                             attention="sdpa").eval()
        self.shape = ModelShape.from_megatron_config(self.config, name="bench default")
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tp = self.world
        self.layers = list(self.gpt.decoder.layers)
        self.L = len(self.layers)

    def inputs(self, s):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(s, 1, self.config.hidden_size, generator=g) * 0.5
        return x, self.gpt.rotary_pos_emb(s)

    def set_iso(self, k):
        from iso_megatron import ISOConfig, apply_iso

        apply_iso(self.gpt, ISOConfig(num_chunks=k, split="even", min_tokens=0) if k else ISOConfig(enabled=False))

    def plan_tp(self):
        """ISO at TP 1 plans as TP 2 (one rank runs the chunks with every head)."""
        from contextlib import nullcontext

        from iso_megatron.comm import stand_in_tp

        return stand_in_tp(2) if self.tp == 1 else nullcontext()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def max_over_ranks(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


# ---------------------------------------------------------------- calibration

def make_probe(setup, x, rope, name_rows=True):
    """megatron's step probe as the ISO block builds it, with the rows it runs named
    (`probe.tokens`, `probe.batch`: what calibrate's per-token term needs from the adapter)
    unless `name_rows` is False."""
    from iso_megatron.megatron.block import step_probe

    probe = step_probe(setup.layers, x, {"rotary_pos_emb": rope, "attention_mask": None}, PROBE_TOKENS)
    if name_rows:
        probe.tokens, probe.batch = min(PROBE_TOKENS, x.size(0)), x.size(1)
    else:
        for attr in ("tokens", "batch"):  # in case megatron's probe names them itself
            probe.__dict__.pop(attr, None)
    return probe


def calibrations(setup, n, x, rope, name_rows=True):
    from iso_megatron import calibrate as calib
    from iso_megatron.emulated import emulate, no_comm_link
    from iso_megatron.megatron.block import attention_kind
    from iso_megatron.planner import Environment

    out = []
    for _ in range(n):
        calib.clear_cache()
        env = Environment(torch.device("cpu"), torch.float32, setup.group, make_probe(setup, x, rope, name_rows),
                          attention_kind(setup.layers))
        t0 = time.perf_counter()
        with torch.no_grad(), emulate(no_comm_link()):
            cal = calib.calibrate(setup.shape, env, tp=setup.tp)
        out.append((cal, time.perf_counter() - t0))
    calib.clear_cache()
    return out


# ---------------------------------------------------------------- timed compute

class TimedOps:
    """The ISO block's chunk steps, each timed: seconds per chunk (attention, MLP, and the
    residual add after each reduce, summed over layers)."""

    def __init__(self, ops, num_chunks):
        self.ops, self.per_chunk, self.chunk_of = ops, [0.0] * num_chunks, {}

    def _timed(self, c, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.per_chunk[c] += time.perf_counter() - t0
        return out

    def attention(self, i, c, hidden):
        self.chunk_of[id(hidden)] = c  # the residual its finish gets
        return self._timed(c, self.ops.attention, i, c, hidden)

    def mlp(self, i, c, hidden):
        self.chunk_of[id(hidden)] = c
        return self._timed(c, self.ops.mlp, i, c, hidden)

    def finish(self, i, part, out, bias, residual):
        return self._timed(self.chunk_of[id(residual)], self.ops.finish, i, part, out, bias, residual)


class Instruments:
    """Forward hooks around each stock layer; the ISO executor's steps through `TimedOps`."""

    def __init__(self, setup):
        from iso_megatron.megatron import block

        self.block, self.real_run = block, block.run_prefill
        self.layer_s, self.iso = 0.0, None
        self._t0 = None
        self.handles = []
        for layer in setup.layers:
            self.handles.append(layer.register_forward_pre_hook(self._pre))
            self.handles.append(layer.register_forward_hook(self._post))

        def run_prefill(ops, num_layers, chunks, reducer, **kwargs):
            self.iso = TimedOps(ops, len(chunks))
            return self.real_run(self.iso, num_layers, chunks, reducer, **kwargs)
        block.run_prefill = run_prefill

    def _pre(self, *a):
        self._t0 = time.perf_counter()

    def _post(self, *a):
        self.layer_s += time.perf_counter() - self._t0

    def reset(self):
        self.layer_s, self.iso = 0.0, None

    def close(self):
        self.block.run_prefill = self.real_run
        for h in self.handles:
            h.remove()


def measure_length(setup, inst, s, chunks, reps):
    """{run: {"wall": [ms per layer], "parts": [[ms per layer of each chunk]]}} for stock and
    each even split, interleaved rep by rep; plus each split's boundaries."""
    from iso_megatron.emulated import emulate, no_comm_link

    x, rope = setup.inputs(s)
    fwd = lambda: setup.gpt.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    runs = [("stock", None)] + [(f"even-{k}", k) for k in chunks]
    out = {name: {"wall": [], "parts": []} for name, _ in runs}
    bounds = {}
    with torch.no_grad(), emulate(no_comm_link()), setup.plan_tp():
        for name, k in runs:  # warm-up, and the boundaries each split runs
            setup.set_iso(k)
            fwd()
            if k:
                bounds[name] = list(setup.gpt.decoder.iso_plan.bounds)
                if len(bounds[name]) != k + 1:
                    raise RuntimeError(f"{name} at {s} tokens ran {bounds[name]}")
        for _ in range(reps):
            for name, k in runs:
                setup.set_iso(k)
                inst.reset()
                setup.barrier()
                t0 = time.perf_counter()
                fwd()
                wall = time.perf_counter() - t0
                setup.barrier()
                parts = [inst.layer_s] if k is None else inst.iso.per_chunk
                if k and setup.gpt.decoder.iso_plan.bounds is None:
                    raise RuntimeError(f"{name}: ISO did not run")
                vals = setup.max_over_ranks([wall] + list(parts))
                out[name]["wall"].append(vals[0] / setup.L * 1e3)
                out[name]["parts"].append([v / setup.L * 1e3 for v in vals[1:]])
    setup.set_iso(None)
    return out, bounds


# ---------------------------------------------------------------- predictions

def predicted_ms(setup, device, start, end):
    """The cost model's compute of chunk [start, end), one layer (attn + mlp), in ms."""
    from iso_megatron import costmodel as cm

    costs = cm.chunk_costs(setup.shape, device, cm.LinkProfile("none", 0.0, 1.0), setup.tp, start, end, 1, 4)
    return sum(c.compute_s for c in costs.values()) * 1e3


def rows_for(setup, cals, s, meas, bounds):
    """Table rows of one prompt length: stock per layer, each split per chunk and in total."""
    rows = []
    devices = [c.device() for c, _ in cals]
    no_token = dataclasses.replace(devices[0], token_s=0.0)

    def row(run, chunk, a, b, measured):
        preds = [predicted_ms(setup, d, a, b) for d in devices]
        errs = [p / measured - 1 for p in preds]
        rows.append(dict(seq_len=s, run=run, chunk=chunk, tokens=b - a, measured_ms=measured,
                         predicted_ms=preds[0], error=errs[0], error_min=min(errs), error_max=max(errs),
                         no_token_error=predicted_ms(setup, no_token, a, b) / measured - 1))

    med = lambda runs: statistics.median(runs)
    stock = meas["stock"]
    row("stock", "per layer (hooks)", 0, s, med([p[0] for p in stock["parts"]]))
    row("stock", "decoder / layers", 0, s, med(stock["wall"]))
    for name, bd in bounds.items():
        parts = meas[name]["parts"]
        for c, (a, b) in enumerate(zip(bd, bd[1:])):
            row(name, f"chunk {c} [{a}, {b})", a, b, med([p[c] for p in parts]))
        # the whole split: the sum of its chunks' predictions against the decoder's time
        preds = [sum(predicted_ms(setup, d, a, b) for a, b in zip(bd, bd[1:])) for d in devices]
        measured = med(meas[name]["wall"])
        errs = [p / measured - 1 for p in preds]
        no_tok = sum(predicted_ms(setup, no_token, a, b) for a, b in zip(bd, bd[1:]))
        rows.append(dict(seq_len=s, run=name, chunk="decoder / layers", tokens=s, measured_ms=measured,
                         predicted_ms=preds[0], error=errs[0], error_min=min(errs), error_max=max(errs),
                         no_token_error=no_tok / measured - 1))
    return rows


# ---------------------------------------------------------------- the link, separately

def link_plumbing(setup, sizes_bytes, latency_s=50e-6, per_byte_s=1 / 2e9):
    """The emulated link's hold vs `costmodel.allreduce_time` for the same figures, one transfer
    at a time and two queued back to back."""
    from iso_megatron import costmodel as cm
    from iso_megatron.emulated import EmulatedLink, LinkModel

    link = EmulatedLink(LinkModel(latency_s, per_byte_s), real="none")
    tp = max(setup.tp, 2)  # the busbw convention's TP; the per-byte figure is what the link holds
    profile = cm.LinkProfile.from_per_byte("emulated", latency_s, per_byte_s, tp)
    rows = []
    for nbytes in sizes_bytes:
        t = torch.zeros(nbytes // 4)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            link.start(t, setup.group).wait()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first, second = link.start(t, setup.group), link.start(t, setup.group)
        first.wait(), second.wait()
        queued = time.perf_counter() - t0
        model = cm.allreduce_time(nbytes, profile, tp)
        rows.append(dict(nbytes=nbytes, model_ms=model * 1e3, measured_ms=statistics.median(times) * 1e3,
                         queued_model_ms=2 * model * 1e3, queued_ms=queued * 1e3))
    return rows


def link_dominated(setup, cal, s, chunks, ratio, reps):
    """ISO over an emulated link whose all-reduces of the unsplit prompt take `ratio` x its
    measured stock compute: measured prefill vs `costmodel.simulate` of the same schedule, the
    calibrated compute and that link."""
    from iso_megatron import costmodel as cm
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate, no_comm_link

    x, rope = setup.inputs(s)
    fwd = lambda: setup.gpt.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    nbytes = s * setup.config.hidden_size * 4
    with torch.no_grad():
        setup.set_iso(None)
        with emulate(no_comm_link()):
            fwd()
            stock_s = min(setup.max_over_ranks([_seconds(fwd) for _ in range(2)]))
        model = LinkModel.for_ratio(ratio, stock_s, 2 * setup.L, nbytes)
        profile = cm.LinkProfile.from_per_byte("emulated", model.latency_s, model.per_byte_s, max(setup.tp, 2))
        rows = []
        for k in chunks:
            setup.set_iso(k)
            times = []
            with setup.plan_tp():
                for _ in range(reps + 1):
                    link = EmulatedLink(model, real="none" if setup.tp == 1 else "shm", max_bytes=nbytes)
                    with emulate(link):
                        setup.barrier()
                        times.append(_seconds(fwd))
                        setup.barrier()
            bounds = list(setup.gpt.decoder.iso_plan.bounds)
            measured = statistics.median(setup.max_over_ranks(times[1:])) * 1e3
            costs = cm.step_costs(setup.shape, cal.device(), profile, setup.tp, bounds, 1, 4)
            # at TP 1 the chunks' compute is the one rank's; their all-reduces the link's (TP 2)
            costs = {key: c._replace(comm_s=cm.allreduce_time((bounds[key[1] + 1] - bounds[key[1]])
                                                             * setup.config.hidden_size * 4, profile,
                                                             max(setup.tp, 2)))
                     for key, c in costs.items()}
            from iso_megatron.schedule import prefill_schedule

            predicted = cm.simulate(prefill_schedule(setup.L, k), costs) * 1e3
            comm = 2 * setup.L * sum(model.seconds((b - a) * setup.config.hidden_size * 4)
                                     for a, b in zip(bounds, bounds[1:])) * 1e3
            rows.append(dict(seq_len=s, run=f"even-{k}", bounds=bounds, ratio=ratio, comm_ms=comm,
                             measured_ms=measured, predicted_ms=predicted, error=predicted / measured - 1))
        setup.set_iso(None)
    return rows


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- output

def markdown(result) -> str:
    cals = result["calibrations"]
    c0 = cals[0]
    lines = [f"TP {result['tp']}, {result['threads']} thread(s) per rank, malloc {result.get('malloc', 'default')}, "
             f"per-token term from the {result.get('token_source', 'layer')}, fp32, batch 1, "
             f"{result['layers']} layers; medians of {result['reps']} repetitions "
             f"({result['long_reps']} from 4096 tokens); {len(cals)} calibration(s).", "",
             "| calibration | GEMM TFLOP/s | pair ns | step us | token us | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for i, c in enumerate(cals):
        lines.append(f"| {i} | {c['gemm_tflops']:.4f} | {c['attn_pair_s'] * 1e9:.2f} | "
                     f"{c['step_overhead_s'] * 1e6:.0f} | {c['token_s'] * 1e6:.2f} | {c['seconds']:.1f} |")
    lines += ["", "Summary, per layer (ms): the whole decoder / layers; chunks: the error range of the chunks.", "",
              "| prompt | stock measured | predicted | error | " +
              " | ".join(f"{r} measured | error | chunks | vs stock" for r in _runs(result)) + " |",
              "|---:|---:|---:|---:|" + "---:|---:|---|---:|" * len(_runs(result))]
    for s in dict.fromkeys(r["seq_len"] for r in result["compute"]):
        rs = [r for r in result["compute"] if r["seq_len"] == s]
        stock = next(r for r in rs if r["run"] == "stock" and r["chunk"] == "decoder / layers")
        cells = [f"{s}", f"{stock['measured_ms']:.1f}", f"{stock['predicted_ms']:.1f}", f"{stock['error']:+.1%}"]
        for run in _runs(result):
            total = next(r for r in rs if r["run"] == run and r["chunk"] == "decoder / layers")
            chunks = [r["error"] for r in rs if r["run"] == run and r["chunk"].startswith("chunk")]
            cells += [f"{total['measured_ms']:.1f}", f"{total['error']:+.1%}",
                      f"{min(chunks):+.1%} .. {max(chunks):+.1%}",
                      f"{total['measured_ms'] / stock['measured_ms'] - 1:+.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Compute per layer (ms), no link:", "",
              "| prompt | run | what | measured | predicted | error | over calibrations | without token term |",
              "|---:|---|---|---:|---:|---:|---|---:|"]
    for r in result["compute"]:
        lines.append(f"| {r['seq_len']} | {r['run']} | {r['chunk']} | {r['measured_ms']:.2f} | "
                     f"{r['predicted_ms']:.2f} | {r['error']:+.1%} | {r['error_min']:+.1%} .. "
                     f"{r['error_max']:+.1%} | {r['no_token_error']:+.1%} |")
    worst = max(abs(r["error"]) for r in result["compute"])
    lines += ["", f"Largest compute error: {worst:.1%} (target 15%)."]
    if result.get("link_plumbing"):
        lines += ["", "Link plumbing (consistent by construction):", "",
                  "| bytes | model ms | held ms | two queued: model | held |", "|---:|---:|---:|---:|---:|"]
        for r in result["link_plumbing"]:
            lines.append(f"| {r['nbytes']} | {r['model_ms']:.3f} | {r['measured_ms']:.3f} | "
                         f"{r['queued_model_ms']:.3f} | {r['queued_ms']:.3f} |")
    if result.get("link_dominated"):
        lines += ["", "Link-dominated ISO prefill (whole decoder, ms):", "",
                  "| prompt | run | M/C | M | measured | predicted | error |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in result["link_dominated"]:
            lines.append(f"| {r['seq_len']} | {r['run']} | {r['ratio']} | {r['comm_ms']:.1f} | "
                         f"{r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {r['error']:+.1%} |")
    return "\n".join(lines)


def _runs(result):
    return [r for r in dict.fromkeys(r["run"] for r in result["compute"]) if r != "stock"]


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print(markdown(json.load(f)))
        return
    from iso_megatron.runtime import distributed

    malloc = "fixed" if args.malloc == "fixed" and cli.fixed_malloc() else "default"
    torch.set_num_threads(args.threads)
    with distributed("cpu"):
        setup = Setup(args)
        log = (lambda *a: print(*a, flush=True)) if setup.rank == 0 else (lambda *a: None)
        started = time.perf_counter()
        x, rope = setup.inputs(max(PROBE_TOKENS, min(args.seq_lens)))
        cals = calibrations(setup, args.calibrations, x, rope, args.token_source == "layer")
        for cal, sec in cals:
            log(f"[validate] calibration {sec:.1f} s: {cal}")
        inst = Instruments(setup)
        compute = []
        try:
            for s in args.seq_lens:
                reps = args.reps if s < 4096 else args.long_reps
                meas, bounds = measure_length(setup, inst, s, args.chunks, reps)
                rows = rows_for(setup, cals, s, meas, bounds)
                for r in rows:
                    log(f"[validate] s={s:5d} {r['run']:>8} {r['chunk']:>22} measured {r['measured_ms']:8.2f} "
                        f"predicted {r['predicted_ms']:8.2f} error {r['error']:+.3f} "
                        f"(no token term {r['no_token_error']:+.3f})  [{time.perf_counter() - started:.0f} s]")
                compute += rows
        finally:
            inst.close()
        plumbing = link_plumbing(setup, [256 * 512 * 4, 1024 * 512 * 4, 4096 * 512 * 4])
        dominated = (link_dominated(setup, cals[0][0], args.link_seq_len, args.chunks, args.link_ratio, args.reps)
                     if args.link_seq_len else [])
        result = dict(tp=setup.tp, threads=args.threads, malloc=malloc, token_source=args.token_source,
                      layers=setup.L, reps=args.reps, long_reps=args.long_reps,
                      model=dataclasses.asdict(setup.shape),
                      calibrations=[dict(c._asdict(), seconds=sec) for c, sec in cals],
                      compute=compute, link_plumbing=plumbing, link_dominated=dominated,
                      seconds=time.perf_counter() - started)
        if setup.rank == 0:
            print(markdown(result), flush=True)
            if args.output_json:
                cli.write_json(args.output_json, result)
                print(f"[validate] wrote {args.output_json}", flush=True)


if __name__ == "__main__":
    from iso_megatron.runtime import run_main

    run_main(main)
