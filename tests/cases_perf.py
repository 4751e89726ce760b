"""Rank-side cases for the performance tests (run through tests.harness.run_ranks)."""

from __future__ import annotations

import time
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from tests.cases_core import build_pair, rel_err, setup


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

    # completion held to the modelled time: 40 ms latency + 8e-9 s/B * 4 MB = 72 ms
    model = LinkModel(0.040, 8e-9)
    link = EmulatedLink(model, record=True)
    x = torch.ones(1 << 20)
    dist.barrier()
    t0 = time.perf_counter()
    link(None).start(x).wait()
    out["held_s"] = time.perf_counter() - t0
    out["held_model_s"] = model.seconds(x.numel() * 4)
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
    return out


def _model_cases():
    """Stock and ISO megatron models over the emulated link: outputs equal stock's; the link
    carries exactly the all-reduces the schedule says; the baseline's reduces are held too."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate

    stock, iso = build_pair("llama", 2, num_layers=3)
    s = 96
    ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(s)[None]
    mask = causal_mask(s)
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
            out[f"iso{k}_transfers"] = len(link.log)
            out[f"iso{k}_ordered"] = all(b.started >= a.done - 1e-9 for a, b in zip(link.log, link.log[1:]))
        # auto under the emulated link: a plan (or stock), identical on both ranks, same logits
        from iso_megatron import autosplit

        autosplit.clear_cache()
        apply_iso(iso, ISOConfig(num_chunks=4, split="auto", min_tokens=0))
        link = EmulatedLink(LinkModel(0.0, 2e-8))
        with emulate(link):
            got = iso(ids, pos, mask)
        out["auto_err"] = rel_err(got, ref)
        out["auto_last"] = autosplit.last
    return out


def _autosplit_cases():
    """Calibration with rank-dependent measurements still yields one plan on every rank."""
    from iso_megatron import autosplit
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate
    from iso_megatron.models import model_config
    from iso_megatron.split import TokenCost

    rank = dist.get_rank()
    config = model_config("llama", num_layers=4, hidden_size=128, num_attention_heads=8,
                          num_query_groups=4, ffn_hidden_size=352)
    cost = TokenCost.from_dims(128, 352, 64, True)
    real_compute = autosplit._measure_compute
    # make the ranks disagree on purpose: rank 1 measures a 30% slower GEMM
    autosplit._measure_compute = lambda *a: (lambda t, b: (t / (1 + 0.3 * rank), b))(*real_compute(*a))
    out = {"plans": [], "cals": []}
    try:
        for ratio_link in (LinkModel(0.0, 1e-9), LinkModel(0.0, 2e-8), LinkModel(0.002, 2e-7)):
            autosplit.clear_cache()
            link = EmulatedLink(ratio_link)
            with emulate(link):
                for s in (64, 700, 1500, 3000):
                    bounds = autosplit.auto_boundaries(config, s, 1, 2, 4, cost)
                    cal = autosplit.calibrate(config, s, 1, 2)
                    out["plans"].append((s, bounds, autosplit.last["why"]))
                    out["cals"].append(tuple(cal))
    finally:
        autosplit._measure_compute = real_compute
    return out


def perf_group():
    setup(2)
    return dict(link=_link_cases(), model=_model_cases(), autosplit=_autosplit_cases())
