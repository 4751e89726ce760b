"""The schedule as data and its executor, the planner and ISOConfig: pure functions, no ranks."""

import subprocess
import sys

import pytest
import torch

from iso_megatron import ISOConfig
from iso_megatron.planner import TILE_TOKENS, chunk_boundaries, plan_prefill
from iso_megatron.schedule import Step, check_schedule, prefill_schedule, run_prefill
from iso_megatron.shape import ModelShape, TokenCost

LLAMA_7B = ModelShape("llama-7b-like", 32, 4096, 32, 8, 11008, True)


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
    cost = TokenCost.from_shape(LLAMA_7B)
    for seq in (1024, 8192, 32768):
        b = chunk_boundaries(seq, 2, "balanced", cost, tile=1)  # the formula, not rounded to tiles
        work = [cost.linear * (e - s) + cost.attn_pair * (e * (e + 1) - s * (s + 1)) / 2
                for s, e in zip(b, b[1:])]
        assert b[1] > seq // 2  # chunk 0 gets more than half
        assert abs(work[0] - work[1]) / max(work) < 2e-3
    # longer prompts: attention matters more, chunk 0 grows
    fr = [chunk_boundaries(s, 2, "balanced", cost, tile=1)[1] / s for s in (1024, 8192, 32768)]
    assert fr[0] < fr[1] < fr[2]


def test_long_prompts_split_on_64_token_tiles():
    # every split kind, by hand: 1000 even -> 500 -> 512; 2000 at 0.3 -> 600 -> 576 (600 is 9.4
    # tiles); 3000 in thirds -> 1000, 2000 -> 1024 (15.6 tiles), 1984 (31.25); 4096 balanced (7B: chunk 0 larger) -> a multiple of 64 within half a tile of the
    # exact cut and still past the middle
    assert chunk_boundaries(1000, 2, "even") == [0, 512, 1000]
    assert chunk_boundaries(2000, 2, (0.3, 0.7)) == [0, 576, 2000]
    assert chunk_boundaries(3000, 3, "even") == [0, 1024, 1984, 3000]
    cost = TokenCost.from_shape(LLAMA_7B)
    exact = chunk_boundaries(4096, 2, "balanced", cost, tile=1)
    b = chunk_boundaries(4096, 2, "balanced", cost)
    assert b[1] % 64 == 0 and abs(b[1] - exact[1]) <= 32 and b[1] > 2048 and b[1] != exact[1]


def test_short_prompts_keep_their_exact_split():
    # chunks under 4 tiles (256 tokens): rounding would move a cut by up to 1/8 of the chunk or
    # more (160 even -> 64/96), so the split stays as asked
    assert chunk_boundaries(160, 2, "even") == [0, 80, 160]
    assert chunk_boundaries(500, 2, "even") == [0, 250, 500]
    assert chunk_boundaries(1000, 4, "even") == [0, 250, 500, 750, 1000]
    # 575 even: 288 would round up to 320 and leave 255 tokens to the last chunk
    assert chunk_boundaries(575, 2, "even") == [0, 288, 575]
    assert chunk_boundaries(576, 2, "even") == [0, 320, 576]
    with pytest.raises(ValueError, match="tile must be an int >= 1"):
        chunk_boundaries(1000, 2, "even", tile=0)


@pytest.mark.parametrize("split", ["even", "balanced", (0.1, 0.2, 0.3, 0.4), (0.97, 0.01, 0.02)])
def test_rounded_boundaries_stay_a_valid_split(split):
    cost = TokenCost.from_shape(LLAMA_7B)
    k = 2 if isinstance(split, str) else len(split)
    for seq in list(range(200, 5000, 37)) + [8192, 32768, 131072]:
        for kk in ((k, 3, 4) if isinstance(split, str) else (k,)):
            exact = chunk_boundaries(seq, kk, split, cost, tile=1)
            b = chunk_boundaries(seq, kk, split, cost)
            assert b[0] == 0 and b[-1] == seq and len(b) == len(exact)
            assert all(x < y for x, y in zip(b, b[1:]))
            if b != exact:  # rounded: every inner cut on a tile, moved by at most half a tile
                assert all(x % TILE_TOKENS == 0 and abs(x - e) <= 32 for x, e in zip(b[1:-1], exact[1:-1]))
                assert min(y - x for x, y in zip(b, b[1:])) >= 4 * TILE_TOKENS
            # chunks far from 4 tiles (>= 4 tiles + a whole tile of slack) are always rounded
            if min(y - x for x, y in zip(exact, exact[1:])) >= 5 * TILE_TOKENS:
                assert all(x % TILE_TOKENS == 0 for x in b[1:-1]), (seq, kk, exact, b)


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


# ---- the executor, against an unchunked reference ---------------------------------------------

class ToyOps:
    """A toy causal 'transformer' on [s, h] tensors: attention of a token = mean of the keys so
    far (x @ wk), MLP = tanh(x @ w1); each part's partial sum is `half` of the full value, and the
    reducer sums two identical ranks. Records the order in which chunk parts run."""

    def __init__(self, layers, hidden, bounds, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.wk = [torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5 for _ in range(layers)]
        self.w1 = [torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5 for _ in range(layers)]
        self.bounds, self.keys, self.order = bounds, {}, []

    def attention(self, layer, chunk, hidden):
        self.order.append(("attn", layer, chunk))
        keys = torch.cat([self.keys.get((layer, c)) for c in range(chunk)] + [hidden @ self.wk[layer]])
        self.keys[(layer, chunk)] = hidden @ self.wk[layer]
        start = self.bounds[chunk]
        counts = torch.arange(start + 1, start + hidden.size(0) + 1, dtype=hidden.dtype)[:, None]
        out = torch.cumsum(keys, 0)[start:] / counts
        return out / 2, None  # this rank's half of the partial sum

    def mlp(self, layer, chunk, hidden):
        self.order.append(("mlp", layer, chunk))
        return torch.tanh(hidden @ self.w1[layer]) / 2, torch.ones(hidden.size(1), dtype=hidden.dtype)

    def finish(self, layer, part, partial, bias, residual):
        return residual + partial + (0 if bias is None else bias)


def toy_reference(ops, x):
    for layer in range(len(ops.wk)):
        keys = x @ ops.wk[layer]
        x = x + torch.cumsum(keys, 0) / torch.arange(1, x.size(0) + 1, dtype=x.dtype)[:, None]
        x = x + torch.tanh(x @ ops.w1[layer]) + 1
    return x


class PoisonReducer:
    """'All-reduce' of two identical ranks. The tensor holds NaN from start() until wait(), so
    any read of a partial sum before its reduce is waited for shows in the output."""

    def __init__(self):
        self.pending = []

    def start(self, tensor):
        value = tensor.clone()
        tensor.fill_(float("nan"))
        reducer = self

        class Handle:
            def wait(self):
                tensor.copy_(2 * value)
                reducer.pending.remove(self)
        handle = Handle()
        self.pending.append(handle)
        return handle


@pytest.mark.parametrize("bounds", [[0, 7], [0, 3, 7], [0, 1, 2, 5, 7]])
def test_executor_matches_the_unchunked_reference(bounds):
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ops = ToyOps(3, 6, bounds)
    reducer = PoisonReducer()
    chunks = [x[a:b] for a, b in zip(bounds, bounds[1:])]
    out = torch.cat(run_prefill(ops, 3, chunks, reducer))
    torch.testing.assert_close(out, toy_reference(ops, x), rtol=1e-12, atol=1e-12)
    assert not reducer.pending  # every reduce waited for
    k = len(bounds) - 1  # layer-major: attn(0..K-1) then mlp(0..K-1), layer by layer
    assert ops.order == [(part, l, c) for l in range(3) for part in ("attn", "mlp") for c in range(k)]


def test_executor_leaves_no_reduce_in_flight_when_a_step_raises():
    bounds = [0, 3, 7]
    ops = ToyOps(2, 6, bounds)
    real_mlp = ops.mlp

    def failing_mlp(layer, chunk, hidden):
        if (layer, chunk) == (1, 1):
            raise RuntimeError("injected")
        return real_mlp(layer, chunk, hidden)

    ops.mlp = failing_mlp
    reducer = PoisonReducer()
    x = torch.randn(7, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="injected"):
        run_prefill(ops, 2, [x[:3], x[3:]], reducer)
    assert not reducer.pending


# ---- the planner ------------------------------------------------------------------------------

@pytest.mark.parametrize("iso,tp,seq,reason", [
    (None, 2, 1024, "ISO disabled"),
    (ISOConfig(enabled=False), 2, 1024, "ISO disabled"),
    (ISOConfig(num_chunks=1), 2, 1024, "num_chunks=1"),
    (ISOConfig(), 1, 1024, "tensor-parallel size 1"),
    (ISOConfig(), 2, 511, "shorter than min_tokens=512"),
    (ISOConfig(min_tokens=0), 2, 1, "shorter than min_tokens=0"),
])
def test_plan_steps_aside_with_a_reason(iso, tp, seq, reason):
    plan = plan_prefill(iso, LLAMA_7B, seq, 1, tp)
    assert plan.bounds is None and plan.num_chunks == 1 and reason in plan.reason


def test_plan_splits_as_configured():
    plan = plan_prefill(ISOConfig(num_chunks=3, split="even"), LLAMA_7B, 1536, 1, 4)
    assert plan.bounds == (0, 512, 1024, 1536) and plan.num_chunks == 3
    plan = plan_prefill(ISOConfig(split=(0.25, 0.75), min_tokens=0), LLAMA_7B, 8, 1, 2)
    assert plan.bounds == (0, 2, 8)
    # the Megatron and HF adapters both plan here: long prompts on 64-token tiles
    plan = plan_prefill(ISOConfig(split="even"), LLAMA_7B, 1000, 1, 2)
    assert plan.bounds == (0, 512, 1000)
    with pytest.raises(ValueError, match="needs the device"):
        plan_prefill(ISOConfig(split="auto"), LLAMA_7B, 1024, 1, 2)


def test_model_shape_reads_kv_channels_from_both_frameworks():
    """kv_channels (Megatron) / head_dim (HF) wider than hidden / heads: one formula honours it."""
    from types import SimpleNamespace

    mc = SimpleNamespace(hidden_size=512, num_attention_heads=8, num_layers=2, num_query_groups=2,
                         ffn_hidden_size=1024, gated_linear_unit=True, kv_channels=128)
    hf = SimpleNamespace(hidden_size=512, num_attention_heads=8, num_hidden_layers=2, num_key_value_heads=2,
                         intermediate_size=1024, head_dim=128, vocab_size=0)
    a, b = ModelShape.from_megatron_config(mc), ModelShape.from_hf_config(hf, gated=True)
    assert (a.q_hidden, a.kv_hidden) == (b.q_hidden, b.kv_hidden) == (1024, 256)
    assert TokenCost.from_shape(a) == TokenCost.from_shape(b)


def test_core_imports_no_framework():
    code = ("import sys, iso_megatron.schedule, iso_megatron.planner, iso_megatron.calibrate, "
            "iso_megatron.costmodel, iso_megatron.comm, iso_megatron.cli, iso_megatron.config, "
            "iso_megatron.sdpa; "
            "print(sorted(m for m in ('megatron.core', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- parallel residual: one reduce per layer chunk -------------------------------------------

@pytest.mark.parametrize("layers,chunks", [(1, 1), (1, 2), (3, 2), (2, 4), (5, 3)])
def test_parallel_schedule_is_complete_with_one_reduce_per_layer_chunk(layers, chunks):
    from iso_megatron.schedule import MERGED, prefill_schedule

    steps = prefill_schedule(layers, chunks, (MERGED,))
    check_schedule(steps)
    for op in ("compute", "reduce", "finish"):
        assert sorted(s[1:] for s in steps if s.op == op) == sorted(
            (l, MERGED, c) for l in range(layers) for c in range(chunks))
    reduces = sum(s.op == "reduce" for s in steps)
    assert 2 * reduces == sum(s.op == "reduce" for s in prefill_schedule(layers, chunks))


def test_parallel_schedule_overlaps_each_reduce_with_the_next_compute():
    from iso_megatron.schedule import MERGED, prefill_schedule

    steps = prefill_schedule(2, 2, (MERGED,))
    # chunk 1's reduce of layer 0 is waited only after layer 1's chunk 0 computed
    assert steps.index(Step("finish", 0, MERGED, 1)) > steps.index(Step("compute", 1, MERGED, 0))
    assert steps.index(Step("finish", 0, MERGED, 0)) > steps.index(Step("compute", 0, MERGED, 1))


def test_check_schedule_rejects_broken_parallel_orders():
    from iso_megatron.schedule import MERGED, prefill_schedule

    steps = prefill_schedule(2, 2, (MERGED,))
    i = steps.index(Step("finish", 0, MERGED, 0))
    with pytest.raises(AssertionError):  # layer 1 chunk 0 computed before its input is reduced
        check_schedule(steps[:i] + steps[i + 1:i + 2] + [steps[i]] + steps[i + 2:])
    with pytest.raises(AssertionError):  # a reduce never waited for
        check_schedule(steps[:-1])
    with pytest.raises(AssertionError):  # chunk 1 attends before chunk 0 wrote its K/V
        a, b = steps.index(Step("compute", 0, MERGED, 0)), steps.index(Step("compute", 0, MERGED, 1))
        swapped = list(steps)
        swapped[a], swapped[b] = swapped[b], swapped[a]
        check_schedule(swapped)


class ParallelToyOps(ToyOps):
    """ToyOps as a parallel-residual layer: attention and MLP both read the layer input."""

    def attention_mlp(self, layer, chunk, hidden):
        attn, _ = self.attention(layer, chunk, hidden)
        mlp, bias = self.mlp(layer, chunk, hidden)
        return attn + mlp, bias


def parallel_toy_reference(ops, x):
    for layer in range(len(ops.wk)):
        keys = x @ ops.wk[layer]
        attn = torch.cumsum(keys, 0) / torch.arange(1, x.size(0) + 1, dtype=x.dtype)[:, None]
        x = x + attn + torch.tanh(x @ ops.w1[layer]) + 1
    return x


@pytest.mark.parametrize("bounds", [[0, 7], [0, 3, 7], [0, 1, 2, 5, 7]])
def test_parallel_executor_matches_the_unchunked_reference(bounds):
    from iso_megatron.schedule import MERGED

    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ops = ParallelToyOps(3, 6, bounds)
    finished = []
    real_finish = ops.finish
    ops.finish = lambda layer, part, *a: finished.append(part) or real_finish(layer, part, *a)
    reducer = PoisonReducer()
    chunks = [x[a:b] for a, b in zip(bounds, bounds[1:])]
    out = torch.cat(run_prefill(ops, 3, chunks, reducer, parallel_residual=True))
    torch.testing.assert_close(out, parallel_toy_reference(ops, x), rtol=1e-12, atol=1e-12)
    assert not reducer.pending
    k = len(bounds) - 1
    assert finished == [MERGED] * 3 * k  # one reduce per layer chunk
