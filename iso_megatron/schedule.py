"""The ISO prefill schedule, as data, and the executor that walks it.

One list of steps drives both the executor (`run_prefill`, used by the Megatron adapter and the
Hugging Face / DeepSpeed adapter alike) and the cost model (`costmodel.simulate`). A step is one of:

  compute(layer, part, chunk)  run the part ("attn" or "mlp") of one chunk up to the local
                               partial sum of its row-parallel linear (reduce deferred)
  reduce(layer, part, chunk)   start that partial sum's tensor-parallel all-reduce (async)
  finish(layer, part, chunk)   wait for that all-reduce, then add bias and residual: the
                               chunk's hidden state is now ready for the next part

Per layer, with chunks 0..K-1 (the paper's two-chunk table, generalised):

  attn(0) attn(1) ... attn(K-1) | mlp(0) mlp(1) ... mlp(K-1)

each compute is followed at once by its reduce, and each finish is placed as late as possible:
right before the first compute that reads it. So every all-reduce is in flight while the next
chunk computes, and the last chunk's MLP all-reduce of layer L overlaps the first chunk's
attention of layer L+1. The causal dependency (chunk i attends to the keys/values of 0..i) is
met because chunk i's attention always comes after chunk 0..i-1's at the same layer.

Parallel residual (GPT-NeoX/Pythia, GPT-J, Falcon, Phi: attention and MLP read the same layer
input and both land on the same residual) has one part per layer, `MERGED`: its compute runs the
chunk's attention and MLP and adds their two partial sums locally, so ONE all-reduce per layer
chunk carries both (stock AutoTP reduces each separately: two per layer). Per layer:

  layer(0) layer(1) ... layer(K-1)

(`parallel_prefill_schedule`); each reduce overlaps the next chunk's compute, the last chunk's
the next layer's first chunk. At K = 1 nothing overlaps but the reduces are halved.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Protocol, Tuple

PARTS = ("attn", "mlp")
MERGED = "attn+mlp"  # a parallel-residual layer's one part: attention and MLP, one reduce


class Step(NamedTuple):
    op: str  # "compute" | "reduce" | "finish"
    layer: int
    part: str  # "attn" | "mlp" | MERGED
    chunk: int


def prefill_schedule(num_layers: int, num_chunks: int) -> List[Step]:
    """The whole prefill's steps over `num_layers` layers, `num_chunks` sequence chunks."""
    if num_layers < 1 or num_chunks < 1:
        raise ValueError(f"need num_layers >= 1 and num_chunks >= 1, got {num_layers}, {num_chunks}")
    steps: List[Step] = []
    for layer in range(num_layers):
        for c in range(num_chunks):
            if layer > 0:  # chunk c's output of the previous layer is first read here
                steps.append(Step("finish", layer - 1, "mlp", c))
            steps += [Step("compute", layer, "attn", c), Step("reduce", layer, "attn", c)]
        for c in range(num_chunks):
            steps += [
                Step("finish", layer, "attn", c),
                Step("compute", layer, "mlp", c),
                Step("reduce", layer, "mlp", c),
            ]
    # drain: the block's output needs every chunk of the last layer
    steps += [Step("finish", num_layers - 1, "mlp", c) for c in range(num_chunks)]
    return steps


def parallel_prefill_schedule(num_layers: int, num_chunks: int) -> List[Step]:
    """The prefill's steps for parallel-residual layers: one `MERGED` part per layer chunk."""
    if num_layers < 1 or num_chunks < 1:
        raise ValueError(f"need num_layers >= 1 and num_chunks >= 1, got {num_layers}, {num_chunks}")
    steps: List[Step] = []
    for layer in range(num_layers):
        for c in range(num_chunks):
            if layer > 0:  # chunk c's output of the previous layer is first read here
                steps.append(Step("finish", layer - 1, MERGED, c))
            steps += [Step("compute", layer, MERGED, c), Step("reduce", layer, MERGED, c)]
    steps += [Step("finish", num_layers - 1, MERGED, c) for c in range(num_chunks)]
    return steps


def schedule_for(num_layers: int, num_chunks: int, parallel_residual: bool = False) -> List[Step]:
    """The schedule the executor walks: `parallel_prefill_schedule` for parallel-residual
    layers, else `prefill_schedule`."""
    make = parallel_prefill_schedule if parallel_residual else prefill_schedule
    return make(num_layers, num_chunks)


def check_schedule(steps: List[Step]) -> None:
    """Assert the invariants the executor relies on (used by tests and the cost model): every
    step's inputs are ready, and every compute is reduced and finished exactly once."""
    done = set()
    for s in steps:
        key = (s.layer, s.part, s.chunk)
        assert s.part in PARTS + (MERGED,), s
        assert (s.op,) + key not in done, s  # each step once
        if s.op == "compute":
            if s.part in ("attn", MERGED):
                # needs its own input (previous layer's last part finished) and earlier chunks' K/V
                last = MERGED if s.part == MERGED else "mlp"
                assert s.layer == 0 or ("finish", s.layer - 1, last, s.chunk) in done, s
                assert all(("compute", s.layer, s.part, c) in done for c in range(s.chunk)), s
            else:
                assert ("finish", s.layer, "attn", s.chunk) in done, s
        elif s.op == "reduce":
            assert ("compute",) + key in done, s
        elif s.op == "finish":
            assert ("reduce",) + key in done, s
        else:
            raise AssertionError(f"unknown op {s.op!r}")
        done.add((s.op,) + key)
    computed = {d[1:] for d in done if d[0] == "compute"}
    assert computed == {d[1:] for d in done if d[0] == "finish"}, "a compute is never finished"


# ---- the executor ---------------------------------------------------------------------------

class ChunkOps(Protocol):
    """What a framework adapter supplies: one layer part of one chunk, up to its partial sum.

    attention / mlp return (partial sum, bias): the row-parallel linear's reduce is deferred and
    its bias is not yet added. finish adds the (reduced) partial sum and bias onto the residual
    exactly as the stock layer does, and returns the chunk's new hidden state.
    """

    def attention(self, layer: int, chunk: int, hidden: Any) -> Tuple[Any, Optional[Any]]: ...

    def mlp(self, layer: int, chunk: int, hidden: Any) -> Tuple[Any, Optional[Any]]: ...

    def attention_mlp(self, layer: int, chunk: int, hidden: Any) -> Tuple[Any, Optional[Any]]:
        """Parallel residual only (`run_prefill(..., parallel_residual=True)`): attention and MLP
        of the same input, their partial sums added locally; finish then gets part MERGED."""
        ...

    def finish(self, layer: int, part: str, partial: Any, bias: Optional[Any], residual: Any) -> Any: ...


class Reducer(Protocol):
    """`start(tensor)` begins an in-place sum over the TP group; the handle's `wait()` makes
    the caller's later work see it (iso_megatron.comm)."""

    def start(self, tensor: Any) -> Any: ...


def _compute_of(ops: ChunkOps, part: str):
    if part == MERGED:
        return ops.attention_mlp
    return ops.attention if part == "attn" else ops.mlp


def run_prefill(ops: ChunkOps, num_layers: int, chunks: List[Any], reducer: Reducer,
                parallel_residual: bool = False) -> List[Any]:
    """Walk `schedule_for(num_layers, len(chunks), parallel_residual)` over the chunks' hidden
    states (parallel_residual: `ops.attention_mlp` computes each layer chunk, one reduce).

    Returns the output hidden states, chunk by chunk. If a step raises, every reduce already
    started is waited for before the exception leaves: no collective is left in flight.
    """
    chunks = list(chunks)
    in_flight = {}  # (layer, part, chunk) -> [partial sum, bias, residual, reduce handle]
    try:
        for step in schedule_for(num_layers, len(chunks), parallel_residual):
            key, c = (step.layer, step.part, step.chunk), step.chunk
            if step.op == "compute":
                out, bias = _compute_of(ops, step.part)(step.layer, c, chunks[c])
                in_flight[key] = [out, bias, chunks[c], None]
            elif step.op == "reduce":
                in_flight[key][3] = reducer.start(in_flight[key][0])
            else:  # finish
                out, bias, residual, handle = in_flight.pop(key)
                handle.wait()
                chunks[c] = ops.finish(step.layer, step.part, out, bias, residual)
    finally:
        for entry in in_flight.values():
            if entry[3] is not None:
                entry[3].wait()
    return chunks
