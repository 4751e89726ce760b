"""Rank-side cases for the performance tests (run through tests.harness.run_ranks).

perf_group (2 ranks): the emulated link on its own, stock and ISO models over it, the auto
split's calibration. proxy_group (1 rank): the one-device proxy link and the TP stand-in.
"""

from __future__ import annotations

import time
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from tests.cases_core import build_pair
from tests.ranks import rel_err, setup_megatron


def _link_cases():
    """Emulated link on its own: results, holds, queue order."""
    from iso_megatron.emulated import EmulatedLink, LinkModel

    rank = dist.get_rank()
    out = {}
    for real in ("shm", "lazy", "eager"):
        link = EmulatedLink(LinkModel(0.0, 0.0), real=real, record=True)
        reducer = link(None)
        x = torch.arange(1000, dtype=torch.float32) * (rank + 1)
        want = torch.arange(1000, dtype=torch.float32) * 3  # 1x + 2x
        h = reducer.start(x)
        h.wait()
        h.wait()  # idempotent
        out[f"sum_{real}"] = bool(torch.equal(x, want))
        out[f"host_{real}"] = [(t.nbytes, t.start_s >= 0, t.wait_s >= 0) for t in link.host_log]
    # shm ring: many transfers in flight, waited out of order, sizes up to the slot size
    link = EmulatedLink(LinkModel(0.0, 0.0), real="shm", max_bytes=4096 * 4)
    ts = [torch.full((1 + 397 * i % 4096,), float(i + 1)) * (rank + 1) for i in range(40)]
    ok = True
    for start in range(0, 40, 10):
        hs = [link(None).start(t) for t in ts[start:start + 10]]
        for h in reversed(hs):
            h.wait()
    for i, t in enumerate(ts):
        ok &= bool(torch.all(t == 3.0 * (i + 1)))
    big = torch.ones(8192) * (rank + 1)  # larger than a slot: gloo fallback
    link(None).start(big).wait()
    out["sum_shm_ring"] = ok and bool(torch.all(big == 3))

    # completion held to the modelled time, read off the clock: 40 ms latency + 8e-9 s/B of
    # 2^20 fp32 (4 MiB) (test_perf compares with the hand-computed 73.55 ms)
    link = EmulatedLink(LinkModel(0.040, 8e-9), record=True)
    x = torch.ones(1 << 20)
    dist.barrier()
    t0 = time.perf_counter()
    link(None).start(x).wait()
    out["held_s"] = time.perf_counter() - t0
    out["held_sum_ok"] = bool(torch.all(x == 2))

    # in-order queue: three transfers issued back to back, 30 ms each
    link = EmulatedLink(LinkModel(0.030, 0.0), real="eager", record=True)
    ts = [torch.full((64,), float(i)) for i in range(3)]
    dist.barrier()
    t0 = time.perf_counter()
    handles = [link(None).start(t) for t in ts]
    handles[2].wait()  # the last one: must cover all three
    t_last = time.perf_counter() - t0
    for h in handles:
        h.wait()
    out["queue_last_s"] = t_last
    out["queue_log"] = [tuple(tr) for tr in link.log]
    out["queue_sums"] = [float(t[0]) for t in ts]

    # a transfer issued after the link went idle starts at once (no stale queue)
    link = EmulatedLink(LinkModel(0.020, 0.0), record=True)
    link(None).start(torch.ones(4)).wait()
    time.sleep(0.03)
    dist.barrier()
    link(None).start(torch.ones(4)).wait()
    a, b = link.log
    out["idle_start_gap_s"] = b.started - b.issued

    # contention s = 0.5: a 40 ms transfer beside 30 ms of compute (a busy loop, as a compute
    # step between start() and wait()); and stock's start-then-wait, which overlaps nothing
    link = EmulatedLink(LinkModel(0.040, 0.0, contention=0.5))
    for name, busy_s in (("contention_overlapped_s", 0.030), ("contention_stock_s", 0.0)):
        dist.barrier()
        t0 = time.perf_counter()
        h = link(None).start(torch.ones(4))
        while time.perf_counter() - t0 < busy_s:
            pass
        h.wait()
        out[name] = time.perf_counter() - t0
    return out


def _inputs(s: int, seed: int = 7):
    from iso_megatron import causal_mask

    ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(s)[None], causal_mask(s)


def _model_cases():
    """Stock and ISO megatron models over the emulated link: outputs equal stock's; the link
    carries exactly the all-reduces the schedule says; the baseline's reduces are held too."""
    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate

    stock, iso = build_pair("llama", 2, num_layers=3)
    s = 96
    ids, pos, mask = _inputs(s)
    out = {}
    with torch.no_grad():
        ref = stock(ids, pos, mask)
        model = LinkModel(0.004, 0.0)
        link = EmulatedLink(model, record=True)
        with emulate(link):
            t0 = time.perf_counter()
            got_stock = stock(ids, pos, mask)
            out["stock_s"] = time.perf_counter() - t0
        # 3 layers x 2 row-parallel reduces + the vocab-parallel embedding's reduce
        out["stock_transfers"] = len(link.log)
        out["stock_err"] = rel_err(got_stock, ref)
        for k, split in ((2, "even"), (3, "balanced")):
            apply_iso(iso, ISOConfig(num_chunks=k, split=split, min_tokens=0))
            link = EmulatedLink(model, record=True)
            with emulate(link):
                got = iso(ids, pos, mask)
            out[f"iso{k}_err"] = rel_err(got, ref)
            out[f"iso{k}_bounds"] = iso.decoder.iso_plan.bounds
            out[f"iso{k}_transfers"] = len(link.log)
            out[f"iso{k}_ordered"] = all(b.started >= a.done - 1e-9 for a, b in zip(link.log, link.log[1:]))
    out.update(_auto_model_case())
    return out


def _auto_model_case():
    """split="auto" on a real model must split where splitting clearly pays, and match stock.

    Why the decision is robust (not near MIN_GAIN = 2%): the model (hidden 256, 512 tokens)
    computes ~5 ms per layer part (measured GEMM rate and attention table, this 2-core CPU, one
    thread per rank), so megatron's ~0.4 ms of Python per part (what the calibration's probe of
    the model's own layer measures) is small beside it, and splitting does not multiply the
    compute; the link holds each part's all-reduce (512 KiB) for ~5 ms: M ~ C, where the overlap
    gains most (ideally min(C, M) / (C + M) = 50%). Predicted on this machine, idle and with two
    CPU hogs: 41-54% faster than stock; with any two of the calibrated figures (GEMM rate,
    attention, link latency, link bandwidth, step overhead) 3x off either way at once, still
    >= 17% (a load burst during calibration only makes figures slower, and the link's holds
    are floors). The 96-token tiny model above is the opposite case: ~0.4 ms of Python per
    part for ~0.05 ms of compute, where a split gains a few percent at best, so whether auto
    splits it depends on the machine's load (it was this test's flake)."""
    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron import calibrate as calib
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate

    stock, iso = build_pair("llama", 2, num_layers=2, hidden_size=256, ffn_hidden_size=704)
    ids, pos, mask = _inputs(512, seed=11)
    with torch.no_grad():
        ref = stock(ids, pos, mask)
        calib.clear_cache()
        apply_iso(iso, ISOConfig(num_chunks=4, split="auto", min_tokens=0))
        with emulate(EmulatedLink(LinkModel(0.0, 1e-8))):  # 512 KiB x 10 ns/B: ~5.2 ms
            got = iso(ids, pos, mask)
    return dict(auto_err=rel_err(got, ref), auto_plan=tuple(iso.decoder.iso_plan))


# The links the calibration cases plan over, and why each decision asserted on them is robust
# (test_perf.test_auto_split_identical_on_every_rank; shape: hidden 128, 4 heads per rank):
LINKS = {
    # latency-bound: every all-reduce holds >= 5 ms whatever its size. A 64-token layer part
    # computes in well under 1 ms (even 3x slowed by load), so overlap can hide less than that
    # while K chunks pay K-1 more latencies per part: two chunks are predicted >= 1.8x slower
    # than stock with the compute figures 3x off either way, and no split was predicted to
    # gain with any two calibrated figures 3x off at once. Stock, far from MIN_GAIN.
    "latency": (0.005, 0.0),
    # bandwidth-bound, ~20 ns/B: at 1500-3000 tokens a part's all-reduce (0.7-1.5 MiB) holds
    # 15-30 ms against a part's compute of tens of ms (unfused attention): M ~ C. Predicted
    # 42-60% faster split; still >= 24% with any two calibrated figures 3x off at once. Split.
    "bandwidth": (0.0, 2e-8),
}


def _calibrate_cases():
    """Calibration with rank-dependent measurements still yields one plan on every rank."""
    from megatron.core import parallel_state

    from iso_megatron import calibrate as calib
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate
    from iso_megatron.megatron.models import model_config
    from iso_megatron.planner import Environment
    from iso_megatron.shape import ModelShape

    rank = dist.get_rank()
    shape = ModelShape.from_megatron_config(model_config(
        "llama", num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=4,
        ffn_hidden_size=352))
    env = Environment(torch.device("cpu"), torch.float32, parallel_state.get_tensor_model_parallel_group())
    real_compute = calib._measure_compute
    # make the ranks disagree on purpose: rank 1 measures a 30% slower GEMM (restored below)
    calib._measure_compute = lambda *a: (lambda t, b: (t / (1 + 0.3 * rank), b))(*real_compute(*a))
    out = {"plans": [], "cals": []}
    try:
        for name, (latency_s, per_byte_s) in LINKS.items():
            calib.clear_cache()
            with emulate(EmulatedLink(LinkModel(latency_s, per_byte_s))):
                for s in (64, 700, 1500, 3000):
                    plan = calib.auto_plan(shape, env, s, 1, 2, 4)
                    cal = calib.calibrate(shape, env, s, 1, 2)
                    out["plans"].append((name, s, plan.bounds, plan.reason))
                    out["cals"].append(tuple(cal))
    finally:
        calib._measure_compute = real_compute
    return out


def perf_group():
    setup_megatron(2)
    return dict(link=_link_cases(), model=_model_cases(), calibrate=_calibrate_cases())


# ---------------------------------------------------------------- one rank: the proxy link

def _backends_restored():
    """What a `with` block of a backend must leave behind: megatron's own reduce, the default
    reducer, the group's own TP size, no proxy worker thread."""
    import threading

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    from iso_megatron import comm

    return dict(stock_reduce=mappings._reduce is _STOCK_REDUCE, reducer=comm.reducer_key() is comm.TorchDistReducer,
                tp=comm.tp_size(parallel_state.get_tensor_model_parallel_group()),
                threads=sorted(t.name for t in threading.enumerate() if t.name.startswith("iso-proxy-link")))


_STOCK_REDUCE = None


def proxy_group():
    """World size 1. The proxy link with the TP stand-in: ISO plans as TP 2 in one process and,
    the proxy's "all-reduce" being an identity copy, must give stock's logits exactly; outside
    the `with` everything is back (TP 1: ISO steps aside)."""
    global _STOCK_REDUCE
    from megatron.core.tensor_parallel import mappings

    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.emulated import EmulatedLink, emulate
    from iso_megatron.proxy import ProxyLink, stand_in

    setup_megatron(1)
    _STOCK_REDUCE = mappings._reduce
    out = {"before": _backends_restored()}

    class CountingProxy(ProxyLink):
        transfers = 0

        def start(self, tensor):
            self.transfers += 1
            return super().start(tensor)

    stock, iso = build_pair("llama", 1, num_layers=2)
    s = 200
    ids, pos, mask = _inputs(s)
    with torch.no_grad():
        ref = stock(ids, pos, mask)
        link = CountingProxy("cpu")
        with stand_in(link, tp=2):
            out["inside"] = _backends_restored()
            got_stock = stock(ids, pos, mask)
            out["stock_transfers"], link.transfers = link.transfers, 0
            apply_iso(iso, ISOConfig(num_chunks=2, split="even", min_tokens=0))
            got = iso(ids, pos, mask)
            out["iso_transfers"] = link.transfers
            out["iso_plan"] = tuple(iso.decoder.iso_plan)
        out["after"] = _backends_restored()
        out["stock_err"] = rel_err(got_stock, ref)
        out["iso_equal"] = bool(torch.equal(got, ref))
        out["iso_err"] = rel_err(got, ref)
        # outside the block: TP 1 again, ISO steps aside
        got = iso(ids, pos, mask)
        out["outside_plan"] = tuple(iso.decoder.iso_plan)
        out["outside_equal"] = bool(torch.equal(got, ref))
        # an error inside either backend's block still puts everything back
        for name, ctx in (("proxy", lambda: stand_in(ProxyLink("cpu"))), ("emulated", lambda: emulate(EmulatedLink()))):
            try:
                with ctx():
                    raise KeyError(name)
            except KeyError:
                pass
            out[f"after_error_{name}"] = _backends_restored()
        # the CPU proxy has no worker outside `stand_in`: using it there is an error, not a hang
        try:
            ProxyLink("cpu").start(torch.ones(4))
            out["outside_start"] = "no error"
        except RuntimeError as e:
            out["outside_start"] = str(e)
    return out
