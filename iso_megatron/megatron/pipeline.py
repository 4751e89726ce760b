"""Pipeline parallelism for one prompt: chunks flow from stage to stage while each stage runs
ISO over its own layers (schedule.stage_schedule), and stock PP inference to compare with.

`PipelineIO` is what a stage's ISOTransformerBlock is handed for one prefill (through
GPTModel's `extra_block_kwargs={"pipeline": io}`): the point-to-point transfers of chunk
hidden states, `torch.distributed.isend` / `irecv` on Megatron's pipeline group, one tag per
chunk, into slices of the stage's input buffer. Megatron's own p2p helpers wait for each
transfer (`P2PCommunicator`) or synchronise CUDA (`inference.communication_utils`); a chunk
must leave while the next one computes.

`pipeline_forward` is one forward of a pipeline-parallel GPTModel as megatron-core's inference
runs it (a stage receives the whole sequence's hidden states, runs, sends its output on), except
that a prefill given `chunked=True` leaves the transfers to the ISO block. Decode is stock.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

DEFAULT_WIDTH = 2  # chunks in flight in a stage (schedule.wavefront_cells)


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
        if not self.first and input_buffer is None:
            raise ValueError("PipelineIO: a stage after the first needs its input buffer [s, b, h]")

    def with_bounds(self, bounds) -> "PipelineIO":
        """The same stage's transfers for chunks `bounds` (the block's plan)."""
        return PipelineIO(self.buffer, bounds, self.width)

    def first_stage_plan(self, plan):
        """The first stage's `plan` (any picklable value), on every stage (a collective of the
        pipeline group)."""
        box = [plan]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_first_rank(), group=self.group)
        return box[0]

    # stock: the whole sequence at once
    def recv_whole(self) -> torch.Tensor:
        dist.recv(self.buffer, src=self.prev, group=self.group)
        return self.buffer

    def send_whole(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), dst=self.next, group=self.group)

    # ISO: chunk by chunk (schedule.run_prefill walks these)
    def start_recv(self, chunk: int):
        view = self.buffer[self.bounds[chunk]:self.bounds[chunk + 1]]
        return dist.irecv(view, src=self.prev, group=self.group, tag=chunk), view

    def start_send(self, chunk: int, hidden: torch.Tensor):
        return dist.isend(hidden.contiguous(), dst=self.next, group=self.group, tag=chunk)


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
        buffer = torch.empty(s, b, gpt.config.hidden_size, dtype=_pipeline_dtype(gpt), device=ids.device)
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


def _pipeline_dtype(gpt) -> torch.dtype:
    config = gpt.config
    return getattr(config, "pipeline_dtype", None) or config.params_dtype


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
