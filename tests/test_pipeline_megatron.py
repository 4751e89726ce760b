"""Chunked pipeline parallelism with ISO inside every stage, on megatron-core pipeline stages
(pre_process / post_process, Megatron's parallel state, gloo ranks on CPU): exact against stock
megatron-core PP inference on the same weights — prefill logits, every stage's KV cache, greedy
tokens — with the chunks really flowing (ISO's async reduces counted per stage)."""

import pytest

from tests.harness import run_ranks
from tests.ranks import FP32_REL_TOL

pytestmark = pytest.mark.multiprocess

LAYERS = 4  # 2 per stage


@pytest.fixture(scope="module")
def tp1_pp2():
    return [c for rank in run_ranks(2, "tests.cases_pipeline:pipeline_exactness", "llama", 1, 2, LAYERS,
                                    [1, 7, 300], [1, 2], [2, 3], ["balanced", "even"], timeout=400)
            for c in rank]


@pytest.fixture(scope="module")
def tp2_pp2():  # the 4-rank smoke case (4 processes on 2 cores)
    return [c for rank in run_ranks(4, "tests.cases_pipeline:pipeline_exactness", "llama", 2, 2, LAYERS,
                                    [300], [1], [2], ["balanced"], timeout=400)
            for c in rank]


def test_chunked_pipeline_prefill_equals_stock_pipeline(tp1_pp2):
    assert len(tp1_pp2) == 2 * 3 * 2 * 2 * 2
    for c in tp1_pp2:
        assert c["layers"] == c["ref_layers"] == ([1, 2] if c["stage"] == 0 else [3, 4]), c
        assert c["kv_err"] <= FP32_REL_TOL, c
        assert c["tokens"] == c["ref_tokens"], c
        if c["stage"] == 1:  # the last stage holds the logits
            assert c["err"] is not None and c["err"] <= FP32_REL_TOL, c


def test_every_stage_ran_iso_on_its_chunks(tp1_pp2):
    """One async reduce per layer part per chunk in each stage's prefill (2 layers x 2 parts x K);
    the 1-token prompt cannot be cut: stock (synchronous reduces only; TP 1 here has none)."""
    for c in tp1_pp2:
        expect = 0 if c["seq"] < c["k"] else 2 * 2 * c["k"]
        assert c["async_reduces"] == expect, c


def test_tp2_pp2_is_exact_with_iso_in_both_stages(tp2_pp2):
    assert len(tp2_pp2) == 4
    for c in tp2_pp2:
        assert c["kv_err"] <= FP32_REL_TOL and c["tokens"] == c["ref_tokens"], c
        assert c["async_reduces"] == 2 * 2 * c["k"], c  # ISO's TP reduces, per stage
        if c["stage"] == 1:
            assert c["err"] <= FP32_REL_TOL, c


SLOW_LINK_S = 0.1  # an emulated stage link: 100 ms per transfer, whatever its size


def test_auto_split_planned_on_the_first_stage_is_every_stages_and_exact():
    """split="auto" in a pipeline (TP 1 x PP 2): the first stage plans from its calibration and
    the stage link measured between the stages (`costmodel.best_pipeline_plan`), every stage
    runs that plan; a long prompt is cut (two stages working at once is predicted to pay), and
    the generation equals stock PP's. Over an emulated stage link of 100 ms per transfer the
    probe measures that latency and the same prompt is cut in fewer chunks (each chunk pays it);
    the values still travel for real: exact."""
    ranks = run_ranks(2, "tests.cases_pipeline:pipeline_auto", "llama", 2, LAYERS, [16, 1024], 8, SLOW_LINK_S,
                      timeout=400)
    by_run = {}
    for c in (c for rank in ranks for c in rank):
        by_run.setdefault((c["seq"], c["slow_link"]), []).append(c)
        assert c["tokens"] == c["ref_tokens"], c
        if c["stage"] == 1:
            assert c["err"] <= FP32_REL_TOL, c
    assert sorted(by_run) == [(16, False), (1024, False), (1024, True)]
    for cases in by_run.values():
        assert len({str(c["bounds"]) for c in cases}) == 1, cases  # one plan on both stages
        assert len({(c["link_latency_s"], c["link_gbs"]) for c in cases}) == 1, cases  # one link on both
    long = by_run[(1024, False)][0]
    assert long["bounds"] is not None and len(long["bounds"]) >= 3, long  # auto cut the prompt
    assert "through 2 stages" in long["reason"] and "stage link measured between stages" in long["reason"], long
    assert long["link_latency_s"] < SLOW_LINK_S / 10, long  # gloo on one host
    slow = by_run[(1024, True)][0]
    # the probe's round trips hold to the emulated latency (the fastest of 5, so load adds little)
    assert 0.95 * SLOW_LINK_S <= slow["link_latency_s"] <= 1.3 * SLOW_LINK_S, slow
    # planned with that link (its latency in the plan's reason), and each chunk pays the
    # latency: fewer chunks than over gloo (or stock)
    assert f"stage link measured between stages: {slow['link_latency_s'] * 1e6:.0f} us" in slow["reason"], slow
    assert slow["bounds"] is None or len(slow["bounds"]) < len(long["bounds"]), (slow, long)


def test_auto_split_failing_on_the_first_stage_fails_every_stage():
    errors = run_ranks(2, "tests.cases_pipeline:pipeline_auto_failure", 2, LAYERS, timeout=300)
    for e in errors:
        assert e is not None and "failed on the first pipeline stage: RuntimeError: injected calibration fault" in e, errors
