"""Cost model: pure functions, plain CPU, no distributed setup."""

import pytest

from iso_megatron import costmodel as cm
from iso_megatron.schedule import prefill_schedule

D4090, L4090 = cm.MACHINES["4090"]
DA800, LA800 = cm.MACHINES["a800"]
M30, M70 = cm.MODELS["30b"], cm.MODELS["70b"]
TINY = cm.ModelShape("tiny", 4, 1024, 16, 4, 2816, True)


def test_sequential_baseline_is_sum_of_parts_exactly():
    # dyadic costs: every float sum is exact, so "exactly" means ==
    costs = {("attn", 0): cm.PartCost(0.5, 0.25), ("mlp", 0): cm.PartCost(0.75, 0.125)}
    assert cm.simulate(prefill_schedule(7, 1), costs) == 7 * (0.5 + 0.25 + 0.75 + 0.125)


@pytest.mark.parametrize("model,tp,n", [(M30, 4, 4096), (M70, 8, 1024), (TINY, 2, 300)])
def test_model_baseline_is_sum_of_parts(model, tp, n):
    p = cm.predict(model, D4090, L4090, tp, n, num_chunks=1)
    c = cm.chunk_costs(model, D4090, L4090, tp, 0, n)
    total = model.num_layers * sum(x.compute_s + x.comm_s for x in c.values()) * 1e3
    assert p.baseline_ms == pytest.approx(total, rel=1e-12)
    assert p.iso_ms == pytest.approx(p.baseline_ms, rel=1e-12)  # one chunk: nothing overlaps
    assert p.compute_ms + p.comm_ms == pytest.approx(p.baseline_ms, rel=1e-12)


def test_overlap_hides_the_smaller_resource():
    # two chunks, attn C=1 M=1 each: the second chunk's compute hides the first's all-reduce
    costs = {(p, c): cm.PartCost(1.0, 1.0) for p in ("attn", "mlp") for c in (0, 1)}
    t = cm.simulate(prefill_schedule(1, 2), costs)
    assert t == 5.0  # 4 computes + the last all-reduce (drain); sequential would be 8


@pytest.mark.parametrize("model", [M30, M70])
@pytest.mark.parametrize("tp", [4, 8])
@pytest.mark.parametrize("n", [2048, 4096, 8192])
def test_iso_between_bound_and_baseline_on_4090(model, tp, n):
    for split in ("even", "balanced"):
        p = cm.predict(model, D4090, L4090, tp, n, split=split)
        assert p.iso_ms >= p.ideal_ms * (1 - 1e-12)
        assert p.ideal_ms == max(p.compute_ms, p.comm_ms)
        assert p.iso_ms < p.baseline_ms


def test_without_communication_iso_is_compute_plus_weight_rereads():
    free = cm.LinkProfile("free", 0.0, float("inf"))
    for n in (64, 512, 8192):
        p = cm.predict(M30, D4090, free, 4, n, num_chunks=2)
        assert p.iso_ms == pytest.approx(p.compute_ms, rel=1e-6)
        assert p.iso_ms >= p.baseline_ms * (1 - 1e-12)  # splitting never makes compute cheaper
    # long prompt: compute-bound GEMMs, the re-read weights cost (almost) nothing
    assert p.iso_ms / p.baseline_ms < 1.005
    # tiny prompt: memory-bound GEMMs read the weights twice, close to 2x
    p = cm.predict(M30, D4090, free, 4, 16, num_chunks=2)
    assert p.iso_ms / p.baseline_ms > 1.5
    # tp = 1: no all-reduce at all
    p = cm.predict(M30, D4090, L4090, 1, 4096)
    assert p.comm_ms == 0 and p.iso_ms == pytest.approx(p.compute_ms)


@pytest.mark.parametrize("machine", ["4090", "a800", "h100"])
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_best_plan_never_slower_than_baseline(machine, tp):
    dev, link = cm.MACHINES[machine]
    for model in (TINY, M70):
        for n in (1, 7, 64, 256, 1024, 4096):
            plan = cm.best_plan(model, dev, link, tp, n, max_chunks=3)
            assert plan.predicted_ms <= plan.baseline_ms
            assert plan.boundaries[0] == 0 and plan.boundaries[-1] == n
            assert len(plan.boundaries) == plan.num_chunks + 1
            if plan.num_chunks == 1:
                assert plan.predicted_ms == plan.baseline_ms
            else:  # the plan's time is what predict() gives for its boundaries
                p = cm.predict(model, dev, link, tp, n, boundaries=plan.boundaries)
                assert p.iso_ms == pytest.approx(plan.predicted_ms)
            if tp == 1:
                assert plan.num_chunks == 1  # nothing to hide
            if n == 1:
                assert plan.num_chunks == 1


def test_best_plan_at_least_as_good_as_even_and_balanced():
    for n in (1024, 8192):
        plan = cm.best_plan(M30, D4090, L4090, 4, n)
        for split in ("even", "balanced"):
            assert plan.predicted_ms <= cm.predict(M30, D4090, L4090, 4, n, split=split).iso_ms * (1 + 1e-9)


def test_balanced_beats_even_for_long_prompts_where_attention_matters():
    # 32k tokens: causal attention is a large share of compute, the all-reduce (M/C ~ 0.7) close
    # to it: the even split leaves chunk 0's attention too light to hide the last all-reduce of
    # the previous layer. (Not a law of the model: near M/C ~ 1 even can win, see docs.)
    link = cm.LinkProfile("slow NVLink", 10.0, 30.0)
    even = cm.predict(M70, DA800, link, 4, 32768, split="even")
    balanced = cm.predict(M70, DA800, link, 4, 32768, split="balanced")
    assert balanced.iso_ms < 0.97 * even.iso_ms
    bounds = cm.chunk_boundaries(32768, 2, "balanced", cm.token_cost(M70))
    assert bounds[1] > 32768 // 2


def test_min_tokens_and_ratio():
    n = cm.min_tokens_for(M30, DA800, LA800, 4)
    assert n is not None and 64 <= n <= 16384
    plan = cm.best_plan(M30, DA800, LA800, 4, n)
    assert plan.predicted_ms <= 0.99 * plan.baseline_ms
    assert cm.min_tokens_for(M30, DA800, LA800, 1) is None
    # PCIe moves far slower than NVLink: higher M/C; more TP, higher M/C
    r4 = cm.ratio_profile(M30, D4090, L4090, 4, 4096)
    assert r4 > cm.ratio_profile(M30, DA800, LA800, 4, 4096)
    assert cm.ratio_profile(M30, D4090, L4090, 8, 4096) > r4
    assert cm.ratio_profile(M30, D4090, L4090, 1, 4096) == 0.0
    assert cm.ratio_profile(M30, D4090, L4090, 4, 4096, part="mlp") > 0
    with pytest.raises(ValueError, match="part"):
        cm.ratio_profile(M30, D4090, L4090, 4, 4096, part="moe")


def test_custom_profiles_and_megatron_config():
    link = cm.LinkProfile.from_measurement("m", nbytes=64e6, seconds=0.01, tp=4, latency_us=20)
    assert cm.allreduce_time(64e6, link, 4) == pytest.approx(0.01)
    dev = cm.DeviceProfile.from_measurement("d", gemm_flops=2e12, gemm_s=0.01, mem_bw_gbs=900)
    assert dev.matmul_tflops == pytest.approx(200)

    class Cfg:  # the TransformerConfig fields read, nothing else
        num_layers, hidden_size, num_attention_heads = 80, 8192, 64
        num_query_groups, ffn_hidden_size, gated_linear_unit = 8, 28672, True

    shape = cm.ModelShape.from_megatron_config(Cfg(), name="70b", vocab=32000)
    assert shape == cm.ModelShape("70b", 80, 8192, 64, 8, 28672, True, 32000)
    Cfg.num_query_groups, Cfg.ffn_hidden_size = None, None
    shape = cm.ModelShape.from_megatron_config(Cfg())
    assert shape.num_query_groups == 64 and shape.ffn_hidden == 4 * 8192
    assert 68e9 < M70.params() < 70e9  # Llama-2-70B, without norms


def test_parse_gpu_profile():
    dev, link, model, tp = cm.parse_gpu_profile("gpu:4090/30b/tp4")
    assert (dev, link, model, tp) == (D4090, L4090, M30, 4)
    assert cm.parse_gpu_profile("gpu:A800/70B/tp8")[2:] == (M70, 8)
    with pytest.raises(ValueError, match="gpu:<device>/<model>/tp<N>"):
        cm.parse_gpu_profile("4090/30b/tp4")
    with pytest.raises(ValueError, match="gpu:<device>/<model>/tp<N>"):
        cm.parse_gpu_profile("gpu:4090/30b/4")
    with pytest.raises(ValueError, match="unknown device 'v100'"):
        cm.parse_gpu_profile("gpu:v100/30b/tp4")
    with pytest.raises(ValueError, match="unknown model '13b'"):
        cm.parse_gpu_profile("gpu:4090/13b/tp4")
    with pytest.raises(ValueError, match="tp must be >= 1"):
        cm.parse_gpu_profile("gpu:4090/30b/tp0")


# ---------------------------------------------------------------- benchmark profiles

# One all-reduce of a whole 1024-token prompt of the 30B model (hidden 6656, bf16) over TP 4 on
# the 4090 link (40 us, busbw 11 GB/s), in NCCL-tests' busbw convention
# t = latency + bytes * 2(n-1)/n / busbw, by hand: 13,631,488 B -> 40 us + 1858.84 us.
AR_4090_1024_S = 40e-6 + 1024 * 6656 * 2 * 1.5 / 11e9
AR_4090_512_S = 40e-6 + 512 * 6656 * 2 * 1.5 / 11e9
# Compute of one layer per rank, 1024 tokens: qkv [6656 -> 3*6656/4], proj [6656/4 -> 6656],
# fc1 and fc2 [6656 <-> 17920/4] at 2 flops per multiply-add, plus the causal core (QK^T and PV
# over 1024*1025/2 pairs, 128 wide, 13 heads per rank). Every one is compute-bound here
# (>= 256 flop/B against 132.16 TFLOPS / 856.8 GB/s = 154), so C = flops / 132.16 TFLOPS (the
# RTX 4090's 165.2 dense bf16 TFLOPS x GEMM_EFFICIENCY 0.8) = 1637.1 us.
C_4090_1024_S = (2 * 1024 * 6656 * (3 * 6656 / 4 + 6656 / 4 + 2 * 17920 / 4)
                 + 4 * 128 * (1024 * 1025 / 2) * 13) / (165.2e12 * 0.8)
RATIO_4090_1024 = 2 * AR_4090_1024_S / C_4090_1024_S  # two all-reduces per layer: 2.320


def test_gpu_profile_against_hand_computed_times():
    assert AR_4090_1024_S == pytest.approx(1898.84e-6, rel=1e-5)
    assert C_4090_1024_S == pytest.approx(1637.12e-6, rel=1e-5)
    ratio, latency_share = cm.profile_ratio("gpu:4090/30b/tp4", 1024)
    assert ratio == pytest.approx(RATIO_4090_1024, rel=1e-9)  # docs/bench_results.md: M/C 2.32
    assert ratio == pytest.approx(2.3197, abs=1e-4)
    assert latency_share == pytest.approx(40e-6 / AR_4090_1024_S, rel=1e-9)  # 0.0211
    assert cm.profile_ratio("ratio:2", 1024) == (2.0, 0.0)


def test_link_for_profile_reproduces_the_gpu_link():
    # the bench's default model (8 layers, hidden 512, fp32) computing its unsplit 1024-token
    # prefill in 0.3 s: its 16 all-reduces of 2 MiB must take M/C x 0.3 s, and a half-prompt
    # all-reduce must cost what it costs on the 4090 link relative to a whole one (969.4 / 1898.8 us)
    full = 1024 * 512 * 4
    m = cm.link_for_profile("gpu:4090/30b/tp4", 1024, 1, 0.3, 8, 512, 4)
    assert 16 * m.seconds(full) == pytest.approx(RATIO_4090_1024 * 0.3, rel=1e-9)
    assert m.seconds(full // 2) / m.seconds(full) == pytest.approx(AR_4090_512_S / AR_4090_1024_S, rel=1e-9)
    assert m.seconds(full // 2) / m.seconds(full) == pytest.approx(0.51053, abs=1e-5)
    # ratio:0.5, no latency: 16 x 2 MiB take 0.15 s, time proportional to bytes
    m = cm.link_for_profile("ratio:0.5", 1024, 1, 0.3, 8, 512, 4)
    assert 16 * m.seconds(full) == pytest.approx(0.15)
    assert m.latency_s == 0.0 and m.seconds(full // 2) == pytest.approx(m.seconds(full) / 2)


def test_link_profile_of_an_emulated_link():
    # 1 ms + 1 ns/B: a 1 MB all-reduce takes 2 ms, whatever the TP size's busbw factor
    for tp in (2, 4):
        link = cm.LinkProfile.from_per_byte("emulated", 1e-3, 1e-9, tp)
        assert cm.allreduce_time(1e6, link, tp) == pytest.approx(2e-3, rel=1e-12)
    free = cm.LinkProfile.from_per_byte("free", 0.0, 0.0, 2)
    assert cm.allreduce_time(1e6, free, 2) == 0.0


def test_parse_profile():
    assert cm.parse_profile("ratio:0.5") == ("ratio", 0.5)
    assert cm.parse_profile(" gpu:a800/70b/tp8 ") == ("gpu", "gpu:a800/70b/tp8")
    for bad in ("ratio:x", "gpu:4090/30b", "foo", "ratio:-1", "gpu:v100/30b/tp4"):
        with pytest.raises(ValueError):
            cm.parse_profile(bad)


def test_measured_fused_attention_cost_per_pair():
    # 1 layer, 4 heads of 16 over TP 2 (2 heads per rank), chunk [100, 300): 300*301/2 - 100*101/2
    # = 40,100 causal pairs; at 1 us per pair and head the core costs 2 x 40,100 us = 80.2 ms,
    # in place of its roofline (under a microsecond here: 5.1 MFLOP at 10 TFLOPS, 64 kB at 100 GB/s)
    shape = cm.ModelShape("t", 1, 64, 4, 4, 128, False)
    slow = cm.DeviceProfile("d", 10.0, 100.0, attn_pair_s=1e-6)
    fast = cm.DeviceProfile("d", 10.0, 100.0)
    a = cm.chunk_costs(shape, slow, L4090, 2, 100, 300)["attn"].compute_s
    b = cm.chunk_costs(shape, fast, L4090, 2, 100, 300)["attn"].compute_s
    assert 0 < b < 1e-5
    assert a - b == pytest.approx(80.2e-3, rel=1e-4)
    # below the roofline a measurement changes nothing
    tiny = cm.DeviceProfile("d", 10.0, 100.0, attn_pair_s=1e-18)
    assert cm.chunk_costs(shape, tiny, L4090, 2, 100, 300)["attn"].compute_s == b


def test_searched_plans_of_long_prompts_lie_on_tiles():
    link = cm.LinkProfile("slow NVLink", 10.0, 30.0)
    for n in (4096, 8000, 32768):
        plan = cm.best_plan(M70, DA800, link, 4, n, max_chunks=4)
        assert plan.num_chunks > 1  # M/C ~ 0.7: a split pays
        assert all(b % 64 == 0 for b in plan.boundaries[1:-1]), plan.boundaries
        assert plan.boundaries[-1] == n
