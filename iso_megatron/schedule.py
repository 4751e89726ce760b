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

(`prefill_schedule(..., parts=(MERGED,))`); each reduce overlaps the next chunk's compute, the last chunk's
the next layer's first chunk. At K = 1 nothing overlaps but the reduces are halved.

A pipeline stage (`stage_schedule`, one per stage of a pipeline-parallel model) runs its layers
over the chunks as a wavefront of cells (layer l, chunk c): (l, c) needs (l - 1, c), its input,
and (l, c - 1), the earlier chunks' K/V at layer l. At most `width` chunks are in flight, each
group of cells holding one layer of each (`wavefront_cells`); inside a group the parts run as in
a layer above, so each reduce overlaps the next cell's compute. Width 1 is chunk after chunk (no
overlap), width K the full diagonal (chunk 0 leaves late); the default 2 keeps one cell to
overlap with while chunk c leaves after about (c + 2) / K of the stage's work. A stage that is not
the first posts a receive of every chunk's input at its start (`recv`) and waits for chunk c's
(`arrive`) right before its first compute; a stage that is not the last sends chunk c on
(`send`, asynchronous) as soon as it has passed the stage's last layer — after the one compute
that its last reduce overlaps — and waits for its sends at the end (`sent`). `check_schedule`
checks a stage's steps, `check_pipeline` that the stages' sends and receives match and that the
stages together cannot deadlock.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Protocol, Tuple

PARTS = ("attn", "mlp")
MERGED = "attn+mlp"  # a parallel-residual layer's one part: attention and MLP, one reduce
IO = "io"  # a pipeline stage's input (recv, arrive) or output (send, sent) of one chunk
IO_OPS = ("recv", "arrive", "send", "sent")


class Step(NamedTuple):
    op: str  # "compute" | "reduce" | "finish" | one of IO_OPS
    layer: int
    part: str  # "attn" | "mlp" | MERGED | IO
    chunk: int


def prefill_schedule(num_layers: int, num_chunks: int, parts: Tuple[str, ...] = PARTS) -> List[Step]:
    """The whole prefill's steps over `num_layers` layers, `num_chunks` sequence chunks, each
    layer's `parts` in order (`PARTS`; `(MERGED,)` for parallel-residual layers)."""
    if num_layers < 1 or num_chunks < 1:
        raise ValueError(f"need num_layers >= 1 and num_chunks >= 1, got {num_layers}, {num_chunks}")
    if not parts:
        raise ValueError("need at least one part per layer")
    steps: List[Step] = []
    for layer in range(num_layers):
        for i, part in enumerate(parts):
            before = (layer, parts[i - 1]) if i else (layer - 1, parts[-1])
            for c in range(num_chunks):
                if before[0] >= 0:  # chunk c's output of the part before is first read here
                    steps.append(Step("finish", before[0], before[1], c))
                steps += [Step("compute", layer, part, c), Step("reduce", layer, part, c)]
    # drain: the block's output needs every chunk of the last layer
    steps += [Step("finish", num_layers - 1, parts[-1], c) for c in range(num_chunks)]
    return steps


def schedule_for(num_layers: int, num_chunks: int, parallel_residual: bool = False) -> List[Step]:
    """The schedule the executor walks: one `MERGED` part per layer chunk for parallel-residual
    layers, attention then MLP otherwise."""
    return prefill_schedule(num_layers, num_chunks, (MERGED,) if parallel_residual else PARTS)


def wavefront_cells(num_layers: int, num_chunks: int, width: int) -> List[List[Tuple[int, int]]]:
    """Groups of cells (layer, chunk) in run order: each group takes the next layer of each of
    the (at most `width`) lowest chunks not yet through, where that layer's earlier chunk is
    already past it (its K/V exist); chunks ascending within a group."""
    if num_layers < 1 or num_chunks < 1 or width < 1:
        raise ValueError(f"need num_layers, num_chunks, width >= 1, got {num_layers}, {num_chunks}, {width}")
    next_layer = [0] * num_chunks
    groups = []
    while next_layer[-1] < num_layers:
        active = [c for c in range(num_chunks) if next_layer[c] < num_layers][:width]
        cells = [(next_layer[c], c) for c in active if c == 0 or next_layer[c - 1] > next_layer[c]]
        for _, c in cells:
            next_layer[c] += 1
        groups.append(cells)
    return groups


def stage_schedule(num_layers: int, num_chunks: int, first: bool = True, last: bool = True,
                   parallel_residual: bool = False, width: int = 2) -> List[Step]:
    """One pipeline stage's prefill steps (see the module's docstring): the wavefront of
    `wavefront_cells`, with the chunks' input received unless `first` and their output sent
    on unless `last`."""
    parts = (MERGED,) if parallel_residual else PARTS
    final = parts[-1]
    steps: List[Step] = [] if first else [Step("recv", 0, IO, c) for c in range(num_chunks)]
    leaving: List[int] = []  # chunks whose last reduce is in flight: sent after the next compute

    def send_leaving():
        for c in leaving:
            steps.append(Step("finish", num_layers - 1, final, c))
            if not last:
                steps.append(Step("send", num_layers - 1, IO, c))
        leaving.clear()

    for cells in wavefront_cells(num_layers, num_chunks, width):
        for i, part in enumerate(parts):
            for layer, c in cells:
                if i > 0:
                    steps.append(Step("finish", layer, parts[i - 1], c))
                elif layer > 0:
                    steps.append(Step("finish", layer - 1, final, c))
                elif not first:
                    steps.append(Step("arrive", 0, IO, c))
                steps += [Step("compute", layer, part, c), Step("reduce", layer, part, c)]
                send_leaving()  # their last reduce has overlapped this compute
                if layer == num_layers - 1 and part == final:
                    leaving.append(c)
    send_leaving()  # drain
    if not last:
        steps += [Step("sent", num_layers - 1, IO, c) for c in range(num_chunks)]
    return steps


def check_schedule(steps: List[Step], first: bool = True, last: bool = True) -> None:
    """Assert the invariants the executor relies on (used by tests and the cost model): every
    step's inputs are ready, every compute is reduced and finished exactly once; for a pipeline
    stage (`first` / `last` False) every chunk's input is received and waited for once, in
    chunk order, before its first compute, and its output sent once, in chunk order, right after
    it passed the last layer, and every send waited for."""
    done = set()
    num_layers = 1 + max((s.layer for s in steps), default=0)
    for s in steps:
        key = (s.layer, s.part, s.chunk)
        assert s.part in PARTS + (MERGED, IO), s
        assert (s.op,) + key not in done, s  # each step once
        if s.op == "compute":
            if s.part in ("attn", MERGED):
                # needs its own input (previous layer's last part finished, or the chunk received)
                # and earlier chunks' K/V
                final = MERGED if s.part == MERGED else "mlp"
                if s.layer > 0:
                    assert ("finish", s.layer - 1, final, s.chunk) in done, s
                elif not first:
                    assert ("arrive", 0, IO, s.chunk) in done, s
                assert all(("compute", s.layer, s.part, c) in done for c in range(s.chunk)), s
            else:
                assert ("finish", s.layer, "attn", s.chunk) in done, s
        elif s.op == "reduce":
            assert ("compute",) + key in done, s
        elif s.op == "finish":
            assert ("reduce",) + key in done, s
        elif s.op in IO_OPS:
            assert s.part == IO, s
            if s.op in ("recv", "arrive"):
                assert not first and s.layer == 0, s
                assert all((s.op, 0, IO, c) in done for c in range(s.chunk)), s  # chunk order
                assert s.op == "recv" or ("recv", 0, IO, s.chunk) in done, s
            else:
                assert not last and s.layer == num_layers - 1, s
                assert all((s.op, s.layer, IO, c) in done for c in range(s.chunk)), s
                if s.op == "send":
                    assert any(("finish", s.layer, p, s.chunk) in done for p in (MERGED, "mlp")), s
                else:
                    assert ("send", s.layer, IO, s.chunk) in done, s
        else:
            raise AssertionError(f"unknown op {s.op!r}")
        done.add((s.op,) + key)
    computed = {d[1:] for d in done if d[0] == "compute"}
    assert computed == {d[1:] for d in done if d[0] == "finish"}, "a compute is never finished"
    chunks = {d[3] for d in done if d[0] == "compute"}
    for op, needed in (("recv", not first), ("arrive", not first), ("send", not last), ("sent", not last)):
        assert {d[3] for d in done if d[0] == op} == (chunks if needed else set()), (op, "each chunk once")
    for i, s in enumerate(steps):  # a chunk leaves right after its last finish
        if s.op == "send":
            assert steps[i - 1].op == "finish" and steps[i - 1].chunk == s.chunk, s


def check_pipeline(stages: List[List[Step]]) -> None:
    """Assert that consecutive stages' sends and receives match (the same chunks, in the same
    order) and that the stages, run together, cannot deadlock: stepping every stage as far as it
    can, an `arrive` of chunk c only once the stage before has sent c, ends every stage."""
    for a, b in zip(stages, stages[1:]):
        sends = [s.chunk for s in a if s.op == "send"]
        assert sends == [s.chunk for s in b if s.op == "recv"] == [s.chunk for s in b if s.op == "arrive"], \
            "a stage's sends and the next stage's receives differ"
    pos, sent = [0] * len(stages), [set() for _ in stages]
    progress = True
    while progress:
        progress = False
        for i, steps in enumerate(stages):
            while pos[i] < len(steps):
                s = steps[pos[i]]
                if s.op == "arrive" and s.chunk not in sent[i - 1]:
                    break
                if s.op == "send":
                    sent[i].add(s.chunk)
                pos[i] += 1
                progress = True
    assert all(p == len(steps) for p, steps in zip(pos, stages)), f"deadlock: stages stop at steps {pos}"


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


class PipeLink(Protocol):
    """What a pipeline stage supplies to `run_prefill`: where it sits, and its point-to-point
    transfers of one chunk's hidden state (asynchronous; the handles' `wait()` completes them)."""

    first: bool
    last: bool
    width: int  # chunks in flight at once (wavefront_cells)

    def start_recv(self, chunk: int) -> Tuple[Any, Any]:
        """(handle, the tensor the chunk's input arrives in)."""
        ...

    def start_send(self, chunk: int, hidden: Any) -> Any: ...


def run_prefill(ops: ChunkOps, num_layers: int, chunks: List[Any], reducer: Reducer,
                parallel_residual: bool = False, pipe: Optional[PipeLink] = None) -> List[Any]:
    """Walk `schedule_for(num_layers, len(chunks), parallel_residual)` over the chunks' hidden
    states (parallel_residual: `ops.attention_mlp` computes each layer chunk, one reduce); for a
    pipeline stage (`pipe`) `stage_schedule`, whose chunks' inputs arrive through `pipe` (the
    entries of `chunks` are then placeholders) and whose outputs leave through it.

    Returns the output hidden states, chunk by chunk. If a step raises, every transfer already
    started (reduce, send, receive) is waited for before the exception leaves: no collective is
    left in flight; the first exception is the one that leaves.
    """
    chunks = list(chunks)
    if pipe is None:
        steps = schedule_for(num_layers, len(chunks), parallel_residual)
    else:
        steps = stage_schedule(num_layers, len(chunks), pipe.first, pipe.last, parallel_residual, pipe.width)
    in_flight = {}  # (layer, part, chunk) -> [partial sum, bias, residual, reduce handle]
    receiving, sending = {}, {}  # chunk -> (handle, tensor) / handle

    def started():
        return ([e[3] for e in in_flight.values() if e[3] is not None]
                + [h for h, _ in receiving.values()] + list(sending.values()))

    try:
        for step in steps:
            key, c = (step.layer, step.part, step.chunk), step.chunk
            if step.op == "compute":
                out, bias = _compute_of(ops, step.part)(step.layer, c, chunks[c])
                in_flight[key] = [out, bias, chunks[c], None]
            elif step.op == "reduce":
                in_flight[key][3] = reducer.start(in_flight[key][0])
            elif step.op == "finish":
                out, bias, residual, handle = in_flight.pop(key)
                handle.wait()
                chunks[c] = ops.finish(step.layer, step.part, out, bias, residual)
            elif step.op == "recv":
                receiving[c] = pipe.start_recv(c)
            elif step.op == "arrive":
                handle, chunks[c] = receiving.pop(c)
                handle.wait()
            elif step.op == "send":
                sending[c] = pipe.start_send(c, chunks[c])
            else:  # sent
                sending.pop(c).wait()
    except BaseException:
        for handle in started():  # the step's exception is the one that leaves
            try:
                handle.wait()
            except Exception:
                pass
        raise
    for handle in started():  # none: every schedule waits for what it starts
        handle.wait()
    return chunks
