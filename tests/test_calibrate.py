"""split="auto": one calibration per process and environment, every length planned from it
without communicating; a calibration that fails on one rank fails on all; the step overhead
and the per-token term are measured. No assertion on real speed (the probes are checked
against sleeps, which only add time)."""

import time

import pytest
import torch

from iso_megatron import calibrate as calib
from iso_megatron import comm
from iso_megatron.planner import Environment
from iso_megatron.shape import ModelShape
from tests.harness import run_ranks

SHAPE = ModelShape("tiny-llama", 4, 128, 8, 4, 352, True)
CPU = Environment(torch.device("cpu"), torch.float32, None)


class TorchCalls(torch.overrides.TorchFunctionMode):
    """Every torch function and tensor method called inside the block (a host sync needs one)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the ranks (OMP_NUM_THREADS=1): on two shared cores a second
    thread makes each tiny probe kernel wait for it (measured: 20 s instead of 0.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def measured(monkeypatch):
    """Counts the calibrations (`_measure` runs once per calibration), from a clean cache."""
    calib.clear_cache()
    real, count = calib._measure, []

    def counting(*args):
        count.append(args)
        return real(*args)

    monkeypatch.setattr(calib, "_measure", counting)
    yield count
    calib.clear_cache()


def test_one_calibration_plans_every_length(measured):
    first = calib.auto_plan(SHAPE, CPU, 300, 1, 2, 4)
    assert len(measured) == 1 and first.reason.startswith("auto:")
    plans = {}
    with TorchCalls() as torch_calls:
        for s in (700, 1500, 3000, 5000, 700):  # four more buckets, one of them again
            plans[s] = calib.auto_plan(SHAPE, CPU, s, 1, 2, 4)
    assert len(measured) == 1  # still the one calibration
    assert torch_calls.calls == []  # planned in plain Python: nothing on a device, no sync
    assert len({calib.bucket_of(s) for s in plans} | {calib.bucket_of(300)}) == 5
    cal = calib.calibrate(SHAPE, CPU, tp=2)
    assert cal.gemm_tflops > 0 and cal.mem_bw_gbs > 0 and cal.step_overhead_s >= 0
    assert cal.attn_pair_s == 0.0  # CPU: the unfused table instead
    assert [n for n, _ in cal.attn_score_table] == [float(r * k) for r, k in calib.ATTN_LADDER]
    # another link (here: another reducer in place) is another machine: calibrated once more
    with comm.use_reducer(lambda group: None):
        calib.auto_plan(SHAPE, CPU, 300, 1, 2, 4)
    assert len(measured) == 2


def test_a_failed_calibration_raises_and_is_not_cached(measured, monkeypatch):
    real = calib._measure_compute
    monkeypatch.setattr(calib, "_measure_compute", lambda *a: (_ for _ in ()).throw(ValueError("no GEMM here")))
    with pytest.raises(RuntimeError, match="calibration failed.*ValueError: no GEMM here"):
        calib.auto_plan(SHAPE, CPU, 1000, 1, 2, 4)
    monkeypatch.setattr(calib, "_measure_compute", real)
    assert calib.auto_plan(SHAPE, CPU, 1000, 1, 2, 4).reason.startswith("auto:")  # tried again
    assert len(measured) == 2


_MINIATURE_LAYER = calib._miniature_layer


def _slowed_layer(make_cost):
    """The probe's miniature layer with `make_cost(rows)` seconds of sleep added per call."""
    real = _MINIATURE_LAYER

    def layer_factory(device, dtype):
        layer = real(device, dtype)

        def slowed(x):
            time.sleep(make_cost(x.size(0)))
            return layer(x)
        return slowed
    return layer_factory


def test_step_overhead_probe_sees_a_fixed_cost_per_call(monkeypatch):
    # 2 ms per call of the miniature layer (two parts): 1 ms per part and chunk, at least
    monkeypatch.setattr(calib, "_miniature_layer", _slowed_layer(lambda rows: 2e-3))
    assert calib._measure_step_overhead(torch.device("cpu"), torch.float32) >= 0.95e-3
    # cost growing faster than the rows: the small chunks are cheaper, the overhead clamps at 0
    monkeypatch.setattr(calib, "_miniature_layer", _slowed_layer(lambda rows: (rows / 128) ** 2 * 4e-3))
    assert calib._measure_step_overhead(torch.device("cpu"), torch.float32) == 0.0


def test_step_overhead_on_the_adapters_probe(measured):
    # an adapter's probe of its real layer, k chunks: 2 ms of fixed cost per chunk (a layer, two
    # parts), the rest of its work the same for any k: 1 ms per part and chunk, at least
    calls = []

    def probe(k):
        calls.append(k)
        time.sleep(k * 2e-3)

    cal = calib.calibrate(SHAPE, CPU._replace(step_probe=probe), tp=2)
    assert cal.step_overhead_s >= 0.95e-3
    assert set(calls) == {1, calib.PROBE_CHUNKS}
    # the probe is the adapter's way in, not part of the environment's identity: a new probe
    # object every forward still finds the one calibration
    assert calib.calibrate(SHAPE, CPU._replace(step_probe=lambda k: None), tp=2) is cal
    assert len(measured) == 1


def test_step_overhead_on_a_probe_of_a_short_prompt(monkeypatch):
    # a prompt of 3 tokens: the probe runs 3 chunks when asked for 8, and says so; the fixed
    # cost is divided among the 2 extra chunks it ran (1 ms per part and chunk, at least)
    calls = []

    def probe(k):
        calls.append(k)
        time.sleep(min(k, 3) * 2e-3)
        return min(k, 3)
    assert calib._measure_step_overhead(torch.device("cpu"), torch.float32, probe) >= 0.95e-3
    assert set(calls) == {1, 3, calib.PROBE_CHUNKS}
    # a one-token probe cannot split: after its one call the miniature layer is measured
    calls.clear()
    miniature = []
    monkeypatch.setattr(calib, "_miniature_layer", lambda *a: miniature.append(1) or _MINIATURE_LAYER(*a))
    assert calib._measure_step_overhead(torch.device("cpu"), torch.float32,
                                        lambda k: calls.append(k) or 1) >= 0.0
    assert calls == [calib.PROBE_CHUNKS] and miniature == [1]


def test_attention_kind_is_measured_and_keyed(measured):
    # the model's attention, as the adapter says: fused (pairs of the causal kernel) or the
    # unfused rectangle table; CPU defaults to unfused. Each kind is its own calibration.
    unfused = calib.calibrate(SHAPE, CPU, tp=2)
    assert unfused.attn_pair_s == 0.0 and len(unfused.attn_score_table) == len(calib.ATTN_LADDER)
    fused = calib.calibrate(SHAPE, CPU._replace(attention="fused"), tp=2)
    assert fused.attn_score_table == () and fused.attn_pair_s > 0
    assert calib.calibrate(SHAPE, CPU._replace(attention="unfused"), tp=2) is unfused
    assert len(measured) == 2
    # a fused calibration plans: the cost model charges the causal pairs at the measured rate
    assert calib.auto_plan(SHAPE, CPU._replace(attention="fused"), 3000, 1, 2, 4).reason.startswith("auto:")
    with pytest.raises(ValueError, match="Environment.attention"):
        calib.calibrate(SHAPE, CPU._replace(attention="flash"), tp=2)


def _sleeping_probe(fixed_s: float, per_chunk_s: float, tokens=None):
    """An adapter's probe whose one-chunk run costs `fixed_s` + `per_chunk_s` and every extra
    chunk `per_chunk_s` more; `tokens`: the rows it says it runs (`probe.tokens`), if any."""
    calls = []

    def probe(k):
        calls.append(k)
        time.sleep(fixed_s + k * per_chunk_s)
    probe.calls = calls
    if tokens is not None:
        probe.tokens = tokens
    return probe


def test_token_term_is_measured_on_the_adapters_layer(measured, monkeypatch):
    # a probe of 10 tokens whose one chunk takes 30 ms beyond its 2 ms step per call: the term is
    # what the rooflines (a 10-token GEMM of the tiny shape: well under 4 ms even on a loaded
    # machine) and the two steps leave of it, per token and part: at least ~1.3 ms
    elementwise = []
    monkeypatch.setattr(calib, "_measure_elementwise", lambda *a: elementwise.append(a) or 0.0)
    probe = _sleeping_probe(30e-3, 2e-3, tokens=10)
    cal = calib.calibrate(SHAPE, CPU._replace(step_probe=probe, attention="fused"), tp=2)
    assert cal.step_overhead_s >= 0.95e-3
    assert cal.token_s >= (30e-3 - 4e-3) / (2 * 10), cal
    assert elementwise == []  # measured on the layer, not on the miniature
    assert cal.device().token_s == cal.token_s  # the cost model gets it
    # a probe that does not say its rows: the model-shaped miniature, nothing from the layer
    calib.clear_cache()
    cal = calib.calibrate(SHAPE, CPU._replace(step_probe=_sleeping_probe(30e-3, 2e-3)), tp=2)
    assert len(elementwise) == 1 and cal.token_s == 0.0  # (the miniature stubbed to 0 above)


def test_token_term_without_the_adapters_layer_is_the_elementwise_work(measured):
    # no probe: the elementwise miniature at the model's widths, real kernels: some time per token
    cal = calib.calibrate(SHAPE, CPU, tp=2)
    assert cal.token_s > 0
    assert calib.Calibration._fields[-2:] == ("token_s", "host_async")  # appended: positional users unchanged
    old = calib.Calibration(*cal[:7])  # a caller that knows the seven older fields
    assert old.token_s == 0.0 and old.device().token_s == 0.0
    assert not cal.host_async and not cal.device().host_async  # CPU: the host waits for each kernel


def test_fused_pair_rate_separates_the_per_query_cost(monkeypatch):
    # CPU: a kernel costing 4 ns per causal pair and 1 us per query (per head) at every length
    # (what the flash kernel's whole diagonal blocks do): the fit finds both, where the time at
    # one length divided by its pairs would not (5.95 ns at 1024, 4.49 at 4096)
    pair, query = 4e-9, 1e-6
    cost = lambda heads, s, *a, **k: pair * s * (s + 1) / 2 + query * s
    monkeypatch.setattr(calib, "_causal_seconds_per_head", cost)
    got_pair, got_query = calib._measure_attention_pairs(SHAPE, 2, torch.device("cpu"), torch.float32)
    assert got_pair == pytest.approx(pair, rel=1e-9) and got_query == pytest.approx(query, rel=1e-9)
    # load on one of the two prompts only (3x its time): a fit no kernel could have (a negative
    # cost, or more per query than half a row of pairs); the longer prompt's rate alone instead
    s1, s2 = calib.ATTN_PAIR_TOKENS_CPU
    for slowed in (s1, s2):
        monkeypatch.setattr(calib, "_causal_seconds_per_head",
                            lambda heads, s, *a, **k: cost(heads, s) * (3 if s == slowed else 1))
        got_pair, got_query = calib._measure_attention_pairs(SHAPE, 2, torch.device("cpu"), torch.float32)
        assert got_query == 0.0 and got_pair == pytest.approx(cost(1, s2) * (3 if slowed == s2 else 1)
                                                             / (s2 * (s2 + 1) / 2)), slowed
    # the real kernel: a positive rate per pair
    monkeypatch.undo()
    assert calib._measure_attention_pairs(SHAPE, 2, torch.device("cpu"), torch.float32)[0] > 0


# ---------------------------------------------------------------- two ranks

class CollectiveLog:
    """Every torch.distributed.all_reduce while active: (op, async_op)."""

    def __enter__(self):
        import torch.distributed as dist

        self.dist, self.real, self.calls = dist, dist.all_reduce, []

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append(("max" if op == dist.ReduceOp.MAX else "sum", async_op))
            return self.real(tensor, op=op, group=group, async_op=async_op)
        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce = self.real


def _planning_cases(env, rank):
    """Calibrate once, with rank 1 measuring a 30% slower GEMM: one MAX all-reduce, the same
    figures and plans on both ranks; later lengths plan without any collective or torch call."""
    real, real_token = calib._measure_compute, calib._measure_token_cost
    calib._measure_compute = lambda *a: (lambda t, b: (t / (1 + 0.3 * rank), b))(*real(*a))
    # ... and rank 1 twice the per-token term it measured
    calib._measure_token_cost = lambda *a: real_token(*a) * (1 + rank)
    measures, real_measure = [], calib._measure
    calib._measure = lambda *a: measures.append(1) or real_measure(*a)
    try:
        calib.clear_cache()
        with CollectiveLog() as first:
            plans = [calib.auto_plan(SHAPE, env, 300, 1, 2, 4)]
        with CollectiveLog() as later, TorchCalls() as torch_calls:
            plans += [calib.auto_plan(SHAPE, env, s, 1, 2, 4) for s in (700, 1500, 3000)]
    finally:
        calib._measure_compute, calib._measure, calib._measure_token_cost = real, real_measure, real_token
    return dict(first=first.calls, later=later.calls, torch_calls=torch_calls.calls, measures=len(measures),
                cal=tuple(calib.calibrate(SHAPE, env, tp=2)), plans=[tuple(p) for p in plans])


def _failure_cases(env, rank):
    """A calibration that raises on one rank (then on both) raises on both, with the message."""
    out = {}
    real = calib._measure_compute
    for name, failing in (("rank1", (1,)), ("both", (0, 1))):
        calib.clear_cache()

        def compute(*a):
            if rank in failing:
                raise ValueError(f"injected on rank {rank}")
            return real(*a)
        calib._measure_compute = compute
        try:
            calib.auto_plan(SHAPE, env, 1000, 1, 2, 4)
            out[name] = "no error"
        except RuntimeError as e:
            out[name] = str(e)
        finally:
            calib._measure_compute = real
    real_elementwise = calib._measure_elementwise
    calib.clear_cache()

    def elementwise(*a):
        if rank == 1:
            raise ValueError("token probe injected on rank 1")
        return real_elementwise(*a)
    calib._measure_elementwise = elementwise
    try:
        calib.auto_plan(SHAPE, env, 1000, 1, 2, 4)
        out["token"] = "no error"
    except RuntimeError as e:
        out["token"] = str(e)
    finally:
        calib._measure_elementwise = real_elementwise
    out["after"] = tuple(calib.auto_plan(SHAPE, env, 1000, 1, 2, 4))  # not cached: measured again
    return out


def _model_cases():
    """A megatron model at TP 2: an even split of a long prompt lands on a tile and matches
    stock; auto over an emulated link splits, on tiles, matching stock, calibrating once, with
    the model's own layer as the step probe (no collective in it) and its attention kind."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask
    from iso_megatron.emulated import EmulatedLink, LinkModel, emulate
    from tests.cases_core import build_pair
    from tests.ranks import rel_err

    stock, iso = build_pair("llama", 2, num_layers=2)
    # one link (a new one would be a new machine), ~20 ns/B: a part's all-reduce at 600-2000
    # tokens (150-500 KiB) holds 3-10 ms, about a part's compute (unfused attention of 4 heads):
    # M ~ C, where a split gains most. Predicted 38-55% faster; still >= 13% with any two
    # calibrated figures 3x off at once, so "auto did split" does not hang on the load.
    link = EmulatedLink(LinkModel(0.0, 2e-8))
    out = {}
    measures, real_measure = [], calib._measure
    probe_collectives, real_step = [], calib._measure_probe

    def logged_step(device, dtype, step_probe=None):
        with CollectiveLog() as log:
            result = real_step(device, dtype, step_probe)
        probe_collectives.extend(log.calls)
        return result
    def logged_measure(shape, env, tp):  # what the adapter gave the calibration
        measures.append((env.step_probe is not None, env.attention))
        return real_measure(shape, env, tp)
    calib._measure, calib._measure_probe = logged_measure, logged_step
    try:
        with torch.no_grad():
            for s in (600, 1100, 2000):
                ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(s))
                pos, mask = torch.arange(s)[None], causal_mask(s)
                ref = stock(ids, pos, mask)
                apply_iso(iso, ISOConfig(num_chunks=2, split="even", min_tokens=0))
                got = iso(ids, pos, mask)
                out[f"even{s}"] = dict(bounds=iso.decoder.iso_plan.bounds, err=rel_err(got, ref))
                apply_iso(iso, ISOConfig(num_chunks=4, split="auto", min_tokens=0))
                if s == 600:
                    calib.clear_cache()
                with emulate(link):
                    got = iso(ids, pos, mask)
                out[f"auto{s}"] = dict(plan=tuple(iso.decoder.iso_plan), err=rel_err(got, ref))
        out["sdpa"] = _sdpa_auto_case(stock, link, rel_err)
    finally:
        calib._measure, calib._measure_probe = real_measure, real_step
    out["measures"] = measures
    out["probe_collectives"] = probe_collectives
    out["probe"] = _probe_case(iso)
    return out


def _sdpa_auto_case(stock, link, rel_err):
    """auto on the same weights with SDPAAttention: the calibration times the fused kernel."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask, get_gpt_layer_iso_spec
    from iso_megatron.emulated import emulate
    from iso_megatron.megatron.models import build_gpt

    iso = build_gpt(stock.config, get_gpt_layer_iso_spec(), family="llama", attention="sdpa").eval()
    iso.load_state_dict(stock.state_dict(), strict=True)
    apply_iso(iso, ISOConfig(num_chunks=4, split="auto", min_tokens=0))
    s = 1100
    ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(s))
    pos, mask = torch.arange(s)[None], causal_mask(s)
    with torch.no_grad(), emulate(link):
        got = iso(ids, pos, mask)
    cal = next(c for c in calib._calibrations.values() if c.attn_pair_s > 0)
    return dict(plan=tuple(iso.decoder.iso_plan), err=rel_err(got, stock(ids, pos, mask)),
                table=cal.attn_score_table, pair_s=cal.attn_pair_s)


def _probe_case(iso):
    """megatron's step probe on its own: k chunks of layer 0, no collective, the caller's
    inference context and hidden states untouched, autograd as it was."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron.megatron.block import step_probe

    layers = list(iso.decoder.layers)
    hidden = torch.randn(300, 1, iso.config.hidden_size)
    before = hidden.clone()
    ctx = StaticInferenceContext(1, 300)
    args = {"inference_context": ctx, "rotary_pos_emb": iso.rotary_pos_emb(300), "attention_mask": None}
    with CollectiveLog() as log:
        ran = [step_probe(layers, hidden, args)(k) for k in (1, 8)]
        short = step_probe(layers, hidden[:5], args)(8)  # a 5-token prompt: 5 chunks
    return dict(ran=ran, short=short, collectives=log.calls, caller_kv=len(ctx.key_value_memory_dict),
                hidden_kept=bool(torch.equal(hidden, before)), grad=torch.is_grad_enabled(),
                token=_layer_token_case(layers, hidden, args))


def _layer_token_case(layers, hidden, args):
    """The per-token term on megatron's own layer: a probe that names its rows (128 tokens of
    batch 1) is timed as one chunk and the rooflines of those rows are taken off it; the
    model-shaped miniature is not run."""
    from megatron.core import parallel_state

    from iso_megatron.megatron.block import step_probe
    from iso_megatron.shape import ModelShape

    probe = step_probe(layers, hidden, {**args, "inference_context": None})
    probe.tokens, probe.batch = 128, 1
    rooflines, real_roofline = [], calib._roofline_s
    elementwise, real_elementwise = [], calib._measure_elementwise
    calib._roofline_s = lambda shape, tp, tokens, batch, *a: rooflines.append((tokens, batch)) or \
        real_roofline(shape, tp, tokens, batch, *a)
    calib._measure_elementwise = lambda *a: elementwise.append(1) or real_elementwise(*a)
    try:
        calib.clear_cache()
        env = Environment(torch.device("cpu"), torch.float32, parallel_state.get_tensor_model_parallel_group(),
                          probe, "fused")
        cal = calib.calibrate(ModelShape.from_megatron_config(layers[0].config), env)
    finally:
        calib._roofline_s, calib._measure_elementwise = real_roofline, real_elementwise
        calib.clear_cache()
    return dict(token_s=cal.token_s, rooflines=rooflines, elementwise=len(elementwise), cal=tuple(cal))


def calibration_group():
    import torch.distributed as dist

    from megatron.core import parallel_state

    from tests.ranks import setup_megatron

    setup_megatron(2)
    rank = dist.get_rank()
    env = Environment(torch.device("cpu"), torch.float32, parallel_state.get_tensor_model_parallel_group())
    return dict(planning=_planning_cases(env, rank), failure=_failure_cases(env, rank), model=_model_cases())


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, calibration_group, timeout=300)


@pytest.mark.multiprocess
def test_calibration_is_one_collective_agreement_then_none(ranks):
    for r in ranks:
        p = r["planning"]
        assert p["measures"] == 1
        # the link probe's transfers (sums), then exactly one combining MAX all-reduce
        assert p["first"].count(("max", False)) == 1 and p["first"][-1] == ("max", False)
        assert all(op == "sum" for op, _ in p["first"][:-1]) and len(p["first"]) >= 3
        assert p["later"] == [] and p["torch_calls"] == []
    a, b = (r["planning"] for r in ranks)
    assert a["cal"] == b["cal"]  # bit-identical although rank 1 measured a slower GEMM
    assert calib.Calibration(*a["cal"]).token_s > 0  # ... and twice the per-token term (the slowest rank's is taken)
    assert a["plans"] == b["plans"]
    assert any(bounds is not None for bounds, *_ in a["plans"])  # not only the stock path


@pytest.mark.multiprocess
def test_calibration_failing_on_one_rank_fails_on_all(ranks):
    for r in ranks:  # both ranks raised (none hung: run_ranks has a deadline), with the message
        f = r["failure"]
        assert "calibration failed on 1 rank(s)" in f["rank1"], f
        assert "rank 1: ValueError: injected on rank 1" in f["rank1"], f
        assert "rank 0: ValueError: injected on rank 0" in f["both"], f
        assert "rank 1: ValueError: injected on rank 1" in f["both"], f
        # the per-token measurement failing on rank 1 only: rank 0 raises too, with its message
        assert "calibration failed on 1 rank(s) (rank 1: ValueError: token probe injected on rank 1)" \
            in f["token"], f
    assert ranks[0]["failure"]["after"] == ranks[1]["failure"]["after"]
    assert ranks[0]["failure"]["after"][1].startswith("auto:")


@pytest.mark.multiprocess
def test_planned_splits_on_tiles_match_stock(ranks):
    from tests.ranks import FP32_REL_TOL

    for r in ranks:
        m = r["model"]
        assert m["even600"]["bounds"] == (0, 320, 600)  # 300 rounded to 5 tiles
        assert m["even1100"]["bounds"] == (0, 576, 1100)  # 550 rounded to 9 tiles
        assert m["even2000"]["bounds"] == (0, 1024, 2000)  # 1000 rounded to 16 tiles
        for s in (600, 1100, 2000):
            assert m[f"even{s}"]["err"] <= FP32_REL_TOL
            bounds = m[f"auto{s}"]["plan"][0]
            assert bounds is not None and bounds[-1] == s, m[f"auto{s}"]  # auto did split
            on_tiles = all(b % 64 == 0 for b in bounds[1:-1])
            shortest = min(e - b for b, e in zip(bounds, bounds[1:]))
            assert on_tiles or shortest < 256, bounds  # rounded wherever every chunk has 4 tiles
            assert m[f"auto{s}"]["err"] <= FP32_REL_TOL
        assert all(b % 64 == 0 for b in m["auto2000"]["plan"][0][1:-1]), m["auto2000"]
        # three lengths, three buckets, one calibration, on the model's own layer (no
        # collective in the probe) and attention; then one more for the SDPA model's attention
        assert m["measures"] == [(True, "unfused"), (True, "fused")], m["measures"]
        assert m["probe_collectives"] == []
        sdpa = m["sdpa"]
        assert sdpa["table"] == () and sdpa["pair_s"] > 0  # the fused kernel was timed
        assert sdpa["plan"][1].startswith("auto:") and sdpa["err"] <= FP32_REL_TOL, sdpa
    for s in (600, 1100, 2000):
        assert ranks[0]["model"][f"auto{s}"]["plan"] == ranks[1]["model"][f"auto{s}"]["plan"]
    assert ranks[0]["model"]["sdpa"]["plan"] == ranks[1]["model"]["sdpa"]["plan"]


@pytest.mark.multiprocess
def test_megatron_step_probe_runs_one_layer_privately(ranks):
    for r in ranks:
        p = r["model"]["probe"]
        assert p["ran"] == [1, 8] and p["short"] == 5
        assert p["collectives"] == []  # its reduces start nothing: no rank waits on another
        assert p["caller_kv"] == 0  # K/V in a private cache, never the caller's
        assert p["hidden_kept"] and p["grad"]  # the forward's input intact; autograd as it was
        token = p["token"]
        assert token["rooflines"] == [(128, 1)] and token["elementwise"] == 0, token
        assert token["token_s"] >= 0
    assert ranks[0]["model"]["probe"]["token"]["cal"] == ranks[1]["model"]["probe"]["token"]["cal"]
