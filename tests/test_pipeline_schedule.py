"""Pipeline stages as data (issue: chunked pipeline parallelism): the wavefront of (layer, chunk)
cells, the stage schedule with its receives and sends, the checks, the executor over a toy
two-stage pipeline against the unchunked reference, and the cost model's pipeline simulation
against the textbook pipeline-fill time."""

import itertools

import pytest
import torch

from iso_megatron import costmodel as cm
from iso_megatron.schedule import (IO, MERGED, Step, check_pipeline, check_schedule, run_prefill,
                                   stage_schedule, wavefront_cells)
from tests.test_schedule_planner import PoisonReducer, ToyOps, toy_reference

SHAPES = [(1, 1), (1, 3), (3, 1), (2, 2), (4, 3), (3, 5)]
PLACES = [(True, True), (True, False), (False, False), (False, True)]


@pytest.mark.parametrize("layers,chunks", SHAPES)
@pytest.mark.parametrize("width", [1, 2, 3, 8])
def test_wavefront_runs_each_cell_once_after_its_inputs(layers, chunks, width):
    groups = wavefront_cells(layers, chunks, width)
    order = [cell for g in groups for cell in g]
    assert sorted(order) == sorted(itertools.product(range(layers), range(chunks)))
    seen = set()
    for group in groups:
        assert len(group) <= width and [c for _, c in group] == sorted(c for _, c in group)
        for l, c in group:  # its input (l-1, c) and the earlier chunks' K/V (l, c-1) come first
            assert (l == 0 or (l - 1, c) in seen) and (c == 0 or (l, c - 1) in seen), (l, c)
        seen.update(group)


def test_wavefront_widths_span_chunk_after_chunk_to_the_full_diagonal():
    assert wavefront_cells(3, 2, 1) == [[(0, 0)], [(1, 0)], [(2, 0)], [(0, 1)], [(1, 1)], [(2, 1)]]
    assert wavefront_cells(3, 3, 3) == [[(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1), (0, 2)],
                                        [(2, 1), (1, 2)], [(2, 2)]]
    # width 2: two chunks in flight; chunk 0 leaves after 2 * 4 - 1 cells, not after 4 * 3 - 3
    groups = wavefront_cells(4, 3, 2)
    left = next(i for i, g in enumerate(groups) if (3, 0) in g)
    assert sum(len(g) for g in groups[:left + 1]) == 7


@pytest.mark.parametrize("layers,chunks", SHAPES)
@pytest.mark.parametrize("first,last", PLACES)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_stage_schedules_pass_the_checks(layers, chunks, first, last, parallel, width):
    steps = stage_schedule(layers, chunks, first, last, parallel, width)
    check_schedule(steps, first, last)
    parts = (MERGED,) if parallel else ("attn", "mlp")
    assert sum(s.op == "reduce" for s in steps) == layers * chunks * len(parts)
    assert [s.chunk for s in steps if s.op == "recv"] == ([] if first else list(range(chunks)))
    assert [s.chunk for s in steps if s.op == "send"] == ([] if last else list(range(chunks)))


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_stages_together_match_and_never_deadlock(stages, width):
    pipeline = [stage_schedule(3, 4, s == 0, s == stages - 1, False, width) for s in range(stages)]
    check_pipeline(pipeline)


def test_checks_reject_broken_stages():
    good = stage_schedule(2, 3, False, False)
    with pytest.raises(AssertionError):  # a chunk computed before it arrived
        check_schedule([s for s in good if not (s.op == "arrive" and s.chunk == 1)], False, False)
    with pytest.raises(AssertionError):  # receives out of chunk order
        i, j = good.index(Step("recv", 0, IO, 0)), good.index(Step("recv", 0, IO, 1))
        swapped = list(good)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        check_schedule(swapped, False, False)
    with pytest.raises(AssertionError):  # a send never waited for
        check_schedule([s for s in good if s.op != "sent"], False, False)
    with pytest.raises(AssertionError):  # a first stage does not receive
        check_schedule(good, True, False)
    sender, receiver = stage_schedule(2, 3, True, False), stage_schedule(2, 3, False, True)
    with pytest.raises(AssertionError):  # the next stage waits for a chunk never sent
        check_pipeline([[s for s in sender if not (s.op in ("send", "sent") and s.chunk == 2)], receiver])


class ToyPipe:
    """Point-to-point between two stages of one process: a send lands in `wire`; a received
    tensor holds NaN until its handle is waited for, so reading it early shows in the output."""

    def __init__(self, first, last, width, wire, bounds, width_h):
        self.first, self.last, self.width, self.wire = first, last, width, wire
        self.bounds, self.width_h = bounds, width_h
        self.pending = []

    def start_recv(self, chunk):
        n = self.bounds[chunk + 1] - self.bounds[chunk]
        buf = torch.full((n, self.width_h), float("nan"), dtype=torch.float64)
        pipe = self

        class Handle:
            def wait(self):
                buf.copy_(pipe.wire[chunk])
                pipe.pending.remove(self)
        handle = Handle()
        self.pending.append(handle)
        return handle, buf

    def start_send(self, chunk, hidden):
        self.wire[chunk] = hidden.clone()
        pipe = self

        class Handle:
            def wait(self):
                pipe.pending.remove(self)
        handle = Handle()
        self.pending.append(handle)
        return handle


class StageOps:
    """ToyOps' layers [offset, offset + n) as a stage's local layers 0..n-1."""

    def __init__(self, toy, offset):
        self.toy, self.offset = toy, offset

    def attention(self, layer, chunk, hidden):
        return self.toy.attention(layer + self.offset, chunk, hidden)

    def mlp(self, layer, chunk, hidden):
        return self.toy.mlp(layer + self.offset, chunk, hidden)

    def finish(self, layer, part, partial, bias, residual):
        return self.toy.finish(layer + self.offset, part, partial, bias, residual)


@pytest.mark.parametrize("bounds", [[0, 7], [0, 3, 7], [0, 1, 2, 5, 7]])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_two_stage_executor_matches_the_unchunked_reference(bounds, width):
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    toy = ToyOps(4, 6, bounds)
    wire, k = {}, len(bounds) - 1
    first = ToyPipe(True, False, width, wire, bounds, 6)
    second = ToyPipe(False, True, width, wire, bounds, 6)
    reducers = PoisonReducer(), PoisonReducer()
    run_prefill(StageOps(toy, 0), 2, [x[a:b] for a, b in zip(bounds, bounds[1:])], reducers[0], pipe=first)
    out = run_prefill(StageOps(toy, 2), 2, [None] * k, reducers[1], pipe=second)
    torch.testing.assert_close(torch.cat(out), toy_reference(toy, x), rtol=1e-12, atol=1e-12)
    assert sorted(wire) == list(range(k))  # every chunk crossed
    assert not (first.pending or second.pending or reducers[0].pending or reducers[1].pending)
    # the first stage's attention computes ran in wavefront order
    cells = [(l, c) for g in wavefront_cells(2, k, width) for l, c in g]
    assert [(l, c) for part, l, c in toy.order[:len(toy.order) // 2] if part == "attn"] == cells


def test_stage_executor_waits_for_everything_it_started_when_a_step_raises():
    bounds = [0, 3, 5, 7]
    toy = ToyOps(2, 6, bounds)
    real = toy.mlp

    def failing(layer, chunk, hidden):
        if (layer, chunk) == (1, 1):
            raise RuntimeError("injected")
        return real(layer, chunk, hidden)
    toy.mlp = failing
    x = torch.randn(7, 6, dtype=torch.float64)
    pipe, reducer = ToyPipe(True, False, 2, {}, bounds, 6), PoisonReducer()
    with pytest.raises(RuntimeError, match="injected"):
        run_prefill(StageOps(toy, 0), 2, [x[a:b] for a, b in zip(bounds, bounds[1:])], reducer, pipe=pipe)
    assert not reducer.pending and not pipe.pending
    assert 0 in pipe.wire  # chunk 0 had left before the failure


def _uniform_costs(chunks, compute_s, comm_s=0.0):
    return {(part, c): cm.PartCost(compute_s, comm_s) for part in ("attn", "mlp") for c in range(chunks)}


@pytest.mark.parametrize("stages,chunks,layers", [(2, 1, 3), (2, 4, 3), (3, 3, 2), (4, 8, 2)])
@pytest.mark.parametrize("send_s", [0.0, 0.25])
def test_pipeline_time_is_the_pipeline_fill_formula_without_tp_communication(stages, chunks, layers, send_s):
    """Width 1, equal chunks of x seconds per stage, transfers of t. A chunk leaves a stage one
    part's compute p after its last part (its last reduce overlaps that compute), the last chunk
    at once; so chunk 0 reaches stage s at s (x + p + t) and, arrivals keeping pace with the
    work, the last stage ends at K x + (P - 1)(x + p + t), p = 0 when K = 1 (textbook fill)."""
    part = 1.0
    pipeline = [stage_schedule(layers, chunks, s == 0, s == stages - 1, False, width=1) for s in range(stages)]
    costs = [_uniform_costs(chunks, part)] * stages
    x, p = 2 * layers * part, (part if chunks > 1 else 0.0)
    got = cm.simulate_pipeline(pipeline, costs, {c: send_s for c in range(chunks)})
    assert got == pytest.approx(chunks * x + (stages - 1) * (x + p + send_s))


def test_pipeline_simulation_overlaps_the_tp_reduces_inside_each_stage():
    """TP reduces as long as the computes: width 2 hides them behind the other chunk's compute
    and beats width 1 (no overlap); both beat unchunked stock PP, which is every stage's
    compute plus reduce, one stage after the other."""
    layers, chunks, stages = 4, 4, 2

    def ttft(width, k=chunks):
        pipeline = [stage_schedule(layers, k, s == 0, s == stages - 1, False, width) for s in range(stages)]
        per_chunk = chunks // k  # the same prompt: k chunks of chunks/k units each
        return cm.simulate_pipeline(pipeline, [_uniform_costs(k, float(per_chunk), float(per_chunk))] * stages,
                                    {c: 0.0 for c in range(k)})

    stock = ttft(1, k=1)
    assert stock == pytest.approx(stages * layers * 2 * chunks * 2.0)
    assert ttft(2) < ttft(1) < stock


def test_planner_cuts_chunks_at_tp1_only_for_a_pipeline():
    from iso_megatron import ISOConfig
    from iso_megatron.planner import plan_prefill
    from iso_megatron.shape import ModelShape

    shape = ModelShape("tiny", 4, 64, 8, 4, 160, True)
    iso = ISOConfig(num_chunks=3, min_tokens=0)
    assert plan_prefill(iso, shape, 300, 1, tp=1).bounds is None  # nothing to overlap, nothing to pipeline
    bounds = plan_prefill(iso, shape, 300, 1, tp=1, pipeline_stages=2).bounds
    assert bounds is not None and len(bounds) == 4 and bounds[0] == 0 and bounds[-1] == 300
