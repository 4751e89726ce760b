"""Pipeline parallelism for one prompt: chunks flow from stage to stage while each stage runs
ISO over its own layers (schedule.stage_schedule), and stock PP inference to compare with.

`PipelineIO` is what a stage's ISOTransformerBlock is handed for one prefill (through
GPTModel's `extra_block_kwargs={"pipeline": io}`): the point-to-point transfers of chunk
hidden states, isend / irecv on Megatron's pipeline group (`comm.make_p2p`: torch.distributed,
or a benchmark's emulated link), one tag per chunk, into slices of the stage's input buffer.
Megatron's own p2p helpers wait for each transfer (`P2PCommunicator`) or synchronise CUDA
(`inference.communication_utils`); a chunk must leave while the next one computes.
`PipelineIO.measure_link` times the link between stages for split="auto" to plan with.

`pipeline_forward` is one forward of a pipeline-parallel GPTModel as megatron-core's inference
runs it (a stage receives the whole sequence's hidden states, runs, sends its output on), except
that a prefill given `chunked=True` leaves the transfers to the ISO block. Decode is stock.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .. import comm
from .. import costmodel as cm

DEFAULT_WIDTH = 2  # chunks in flight in a stage (schedule.wavefront_cells)
LINK_ROWS = (16, 2048)  # rows x hidden of the stage-link probe's two transfers
LINK_REPEATS = 5        # round trips per size; the fastest counts (load only adds time)

_stage_links: Dict[tuple, cm.P2PLink] = {}


def pipeline_size() -> int:
    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


class PipelineIO:
    """One prefill's transfers between this stage and its neighbours (schedule.PipeLink)."""

    def __init__(self, input_buffer: Optional[torch.Tensor], bounds, width: int = DEFAULT_WIDTH):
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.group = ps.get_pipeline_model_parallel_group()
        self.prev = ps.get_pipeline_model_parallel_prev_rank()
        self.next = ps.get_pipeline_model_parallel_next_rank()
        self.buffer, self.bounds, self.width = input_buffer, tuple(bounds), width
        self.stages = ps.get_pipeline_model_parallel_world_size()
        self.p2p = comm.make_p2p(self.group)
        if not self.first and input_buffer is None:
            raise ValueError("PipelineIO: a stage after the first needs its input buffer [s, b, h]")

    def with_bounds(self, bounds) -> "PipelineIO":
        """The same stage's transfers for chunks `bounds` (the block's plan)."""
        return PipelineIO(self.buffer, bounds, self.width)

    @staticmethod
    def dtype(config) -> torch.dtype:
        """The dtype of the hidden states passed between stages."""
        return getattr(config, "pipeline_dtype", None) or config.params_dtype

    def first_stage_plan(self, plan):
        """The first stage's `plan` (any picklable value), on every stage (a collective of the
        pipeline group)."""
        box = [plan]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_first_rank(), group=self.group)
        return box[0]

    def measure_link(self, hidden: int, dtype: torch.dtype, device: torch.device) -> cm.P2PLink:
        """The link between neighbouring stages (split="auto" plans with it): round trips of two
        sizes of [rows, hidden] between each stage and the next, through this prefill's transport
        (an emulated link measures as itself), the slowest pair's latency and bandwidth, the
        same on every rank of the model-parallel group (a collective of that group). Measured
        once per transport, pipeline group, hidden size, dtype and device, then cached."""
        key = (comm.p2p_key(), self.group, hidden, dtype, device)
        if key not in _stage_links:
            _stage_links[key] = self._probe(hidden, dtype, device)
        return _stage_links[key]

    def _probe(self, hidden, dtype, device) -> cm.P2PLink:
        rank = ps.get_pipeline_model_parallel_rank()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        group = ps.get_model_parallel_group()
        # the buffers first, agreed across the model-parallel group: a rank that cannot allocate
        # them must not leave its peers waiting in a transfer
        flag = torch.zeros(1, dtype=torch.float64, device=device)
        try:
            buffers = [torch.zeros(rows, hidden, dtype=dtype, device=device) for rows in LINK_ROWS]
        except Exception as e:  # reported below, on every rank alike
            buffers, flag[0] = str(e), 1.0
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() > 0:
            raise RuntimeError(f"measuring the link between pipeline stages failed on some rank"
                               + (f": {buffers}" if isinstance(buffers, str) else ""))
        seconds = [0.0, 0.0]
        for phase in (0, 1):  # pairs (0, 1), (2, 3), ... then (1, 2), (3, 4), ...: one pair per stage
            for i, t in enumerate(buffers):
                if rank % 2 == phase and not self.last:  # times round trips to the next stage
                    best = float("inf")
                    for rep in range(LINK_REPEATS + 1):  # the first: warm-up
                        sync()
                        t0 = time.perf_counter()
                        self.p2p.isend(t, self.next).wait()
                        self.p2p.irecv(t[:1], self.next).wait()  # the reply: the transfer has landed
                        sync()
                        if rep:
                            best = min(best, time.perf_counter() - t0)
                    seconds[i] = max(seconds[i], best)
                elif (rank - 1) % 2 == phase and not self.first:
                    for _ in range(LINK_REPEATS + 1):
                        self.p2p.irecv(t, self.prev).wait()
                        self.p2p.isend(t[:1], self.prev).wait()
        # round trip of n rows + a 1-row reply = 2 latencies + (n + 1) rows' bytes
        row = hidden * dtype.itemsize
        small, large = seconds
        per_byte = max((large - small) / ((LINK_ROWS[1] - LINK_ROWS[0]) * row), 1e-15)
        latency = max((small - (LINK_ROWS[0] + 1) * row * per_byte) / 2, 0.0)
        figures = torch.tensor([latency, per_byte], dtype=torch.float64, device=device)
        dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)
        latency, per_byte = figures.tolist()
        return cm.P2PLink("measured between stages", latency * 1e6, 1 / per_byte / 1e9,
                          f"{LINK_REPEATS} round trips of {LINK_ROWS} x {hidden} rows, {dtype}")

    # stock: the whole sequence at once
    def recv_whole(self) -> torch.Tensor:
        self.p2p.irecv(self.buffer, self.prev).wait()
        return self.buffer

    def send_whole(self, hidden: torch.Tensor) -> None:
        self.p2p.isend(hidden.contiguous(), self.next).wait()

    # ISO: chunk by chunk (schedule.run_prefill walks these)
    def start_recv(self, chunk: int):
        view = self.buffer[self.bounds[chunk]:self.bounds[chunk + 1]]
        return self.p2p.irecv(view, self.prev, tag=chunk), view

    def start_send(self, chunk: int, hidden: torch.Tensor):
        return self.p2p.isend(hidden.contiguous(), self.next, tag=chunk)


def _decoder(model):
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(model, "decoder")


def _gpt(model):
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(model, "decoder", return_model_obj=True)


def pipeline_forward(model, ids: torch.Tensor, pos: torch.Tensor, mask, ctx, chunked: bool):
    """One forward of this rank's stage: logits [b, s, vocab] on the last stage, else None.

    A stage after the first gets its input from the one before; a stage before the last sends
    its output on. `chunked` (a prefill of a model with an ISO block): the block itself moves the
    hidden states, chunk by chunk, or whole where its plan is stock."""
    gpt, decoder = _gpt(model), _decoder(model)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    b, s = ids.shape
    buffer = None
    if not first:
        buffer = torch.empty(s, b, gpt.config.hidden_size, dtype=PipelineIO.dtype(gpt.config),
                             device=ids.device)
    io = PipelineIO(buffer, (0, s))
    extra = None
    if chunked and hasattr(decoder, "iso_config"):
        extra = {"pipeline": io}
    elif not first:
        io.recv_whole()
    if not first:
        gpt.set_input_tensor(buffer)
    out = model(ids, pos, mask, inference_context=ctx, runtime_gather_output=True, extra_block_kwargs=extra)
    if extra is None and not last:
        io.send_whole(out)
    return out if last else None


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (e.g. the sampled token) from the last stage to every stage of this pipeline."""
    if pipeline_size() > 1:
        dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return tensor


def logits_on_every_stage(model, logits: Optional[torch.Tensor], batch_seq) -> torch.Tensor:
    """The last stage's logits [b, s, vocab] (fp32) on every stage of this pipeline (the
    launcher's rank 0, on the first stage, reports them)."""
    if pipeline_size() == 1:
        return logits
    b, s = batch_seq
    if logits is None:
        logits = torch.empty(b, s, _gpt(model).vocab_size, dtype=torch.float32,
                             device=torch.device("cuda", torch.cuda.current_device())
                             if torch.cuda.is_available() else torch.device("cpu"))
    return broadcast_from_last_stage(logits.float().contiguous())
