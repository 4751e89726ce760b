"""The schedule as data, the split policies and ISOConfig: pure functions, no ranks."""

import pytest

from iso_megatron import ISOConfig
from iso_megatron.schedule import Step, check_schedule, prefill_schedule
from iso_megatron.split import TokenCost, chunk_boundaries


@pytest.mark.parametrize("layers,chunks", [(1, 1), (1, 2), (3, 2), (2, 4), (5, 3)])
def test_schedule_is_complete_and_respects_dependencies(layers, chunks):
    steps = prefill_schedule(layers, chunks)
    check_schedule(steps)
    for op in ("compute", "reduce", "finish"):
        assert sorted(s[1:] for s in steps if s.op == op) == sorted(
            (l, p, c) for l in range(layers) for p in ("attn", "mlp") for c in range(chunks))


def test_schedule_matches_the_papers_two_chunk_table():
    computes = [(s.part, s.chunk) for s in prefill_schedule(2, 2) if s.op == "compute"]
    assert computes == [("attn", 0), ("attn", 1), ("mlp", 0), ("mlp", 1)] * 2
    steps = prefill_schedule(2, 2)
    # the last chunk's MLP reduce of layer 0 is waited only after layer 1's attn(0)
    assert steps.index(Step("finish", 0, "mlp", 1)) > steps.index(Step("compute", 1, "attn", 0))


def test_check_schedule_rejects_a_broken_order():
    steps = prefill_schedule(1, 2)
    i = steps.index(Step("finish", 0, "attn", 0))
    broken = steps[:i] + steps[i + 1:i + 2] + [steps[i]] + steps[i + 2:]  # mlp(0) before its input
    with pytest.raises(AssertionError):
        check_schedule(broken)


@pytest.mark.parametrize("seq", [1, 2, 3, 5, 17, 512, 4099])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("split", ["even", "balanced"])
def test_boundaries_are_whole_increasing_and_never_empty(seq, k, split):
    b = chunk_boundaries(seq, k, split, TokenCost(1000.0, 4.0))
    assert b[0] == 0 and b[-1] == seq
    assert all(isinstance(x, int) for x in b)
    assert all(b[i] < b[i + 1] for i in range(len(b) - 1))
    assert len(b) - 1 == min(k, seq)


def test_even_split():
    assert chunk_boundaries(10, 2, "even") == [0, 5, 10]
    assert chunk_boundaries(9, 3, "even") == [0, 3, 6, 9]


def test_balanced_split_equalises_compute():
    cost = TokenCost.from_dims(hidden=4096, ffn_hidden=11008, kv_hidden=1024, gated=True)
    for seq in (1024, 8192, 32768):
        b = chunk_boundaries(seq, 2, "balanced", cost)
        work = [cost.linear * (e - s) + cost.attn_pair * (e * (e + 1) - s * (s + 1)) / 2
                for s, e in zip(b, b[1:])]
        assert b[1] > seq // 2  # chunk 0 gets more than half
        assert abs(work[0] - work[1]) / max(work) < 2e-3
    # longer prompts: attention matters more, chunk 0 grows
    fr = [chunk_boundaries(s, 2, "balanced", cost)[1] / s for s in (1024, 8192, 32768)]
    assert fr[0] < fr[1] < fr[2]


def test_explicit_fractions():
    assert chunk_boundaries(100, 3, (0.5, 0.3, 0.2)) == [0, 50, 80, 100]
    assert chunk_boundaries(3, 3, (0.9, 0.05, 0.05)) == [0, 1, 2, 3]  # never empty


def test_config_defaults_and_validation():
    c = ISOConfig()
    assert (c.num_chunks, c.split, c.enabled) == (2, "balanced", True)
    assert ISOConfig(split=[0.6, 0.2, 0.2]).num_chunks == 3
    for bad, text in [(dict(num_chunks=0), "num_chunks must be >= 1"),
                      (dict(num_chunks=2.5), "num_chunks must be an int"),
                      (dict(split=(0.7, 0.7)), "sum to 1"),
                      (dict(split=(1.2, -0.2)), "> 0"),
                      (dict(split="fast"), "split must be"),
                      (dict(split=("a", "b")), "numbers"),
                      (dict(min_tokens=-1), "min_tokens"),
                      (dict(enabled="yes"), "enabled must be a bool")]:
        with pytest.raises(ValueError, match=text):
            ISOConfig(**bad)
