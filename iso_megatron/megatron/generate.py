"""Prefill + decode of a megatron-core GPTModel with megatron's static inference context.

Prefill is one forward over the prompt (ISO when the model has it and the prompt qualifies),
decode is token by token on the stock path. Sampling is identical on every TP rank: logits are
gathered, and every rank draws from the same seeded generator. `model` may be wrapped
(megatron-core's Float16Module for bf16/fp16, whose logits come out fp32; DeepSpeed's engine):
only its forward and its parameters' device are used. Logits are sampled and returned in fp32.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from ..cli import median, time_ms
from . import compat
from .cpu import causal_mask
from .pipeline import broadcast_from_last_stage, logits_on_every_stage, pipeline_forward, pipeline_size


@dataclass
class Generation:
    prompt_token_ids: List[int]
    generated_token_ids: List[int]
    prefill_ms: float
    decode_ms_per_token: float
    prefill_logits: torch.Tensor = field(repr=False)  # [s, vocab] float32, every prompt position


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_mask(model, seq_len: int, device) -> Optional[torch.Tensor]:
    """The causal mask of a prompt, or None where every core attention of `model` makes the
    causal form itself (`needs_causal_mask = False`: the SDPA attention, TE under ISO): a
    [s, s] mask is 1 GiB at 32k tokens, and a fused kernel given one cannot skip blocks."""
    if all(not getattr(m, "needs_causal_mask", True) for m in _core_attentions(model)):
        return None
    return causal_mask(seq_len, device=device)


def _core_attentions(model):
    found = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return found or [None]  # no megatron attention found: give the mask, as before


def prefill(model, ids: torch.Tensor, ctx: StaticInferenceContext, mask: Optional[torch.Tensor]):
    """Logits [b, s, vocab] for every prompt position (fp32; on every pipeline stage); fills
    ctx's KV cache (a pipeline stage: its layers')."""
    b, s = ids.shape
    compat.full_prefill_logits(ctx)
    pos = torch.arange(s, device=ids.device)[None].expand(b, s)
    mask = None if mask is None else mask[..., :s, :s]
    if pipeline_size() > 1:  # chunks flow through the stages (ISO blocks), the logits come back
        logits = pipeline_forward(model, ids, pos, mask, ctx, chunked=True)
        return logits_on_every_stage(model, logits, (b, s))
    return model(ids, pos, mask, inference_context=ctx, runtime_gather_output=True)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token [b] from logits [b, vocab]: greedy when temperature == 0 or top_k == 1."""
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prompt_ids: List[int], num_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 0.0, seed: int = 1234, eos_id: Optional[int] = None,
             max_sequence_length: Optional[int] = None, device=None, progress=None,
             phase: Callable[[str], ContextManager] = lambda name: nullcontext()) -> Generation:
    """Prefill, then decode token by token. `phase(name)` wraps each ("prefill", "decode"): a
    launcher's fault watch (iso_megatron.faults) names the phase a lost rank was lost in."""
    device = device or next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    s = ids.size(1)
    max_len = s + num_tokens
    if max_sequence_length is not None and max_len > max_sequence_length:
        raise ValueError(f"prompt ({s} tokens) + {num_tokens} generated tokens exceed the model's "
                         f"max_position_embeddings ({max_sequence_length})")
    generator = torch.Generator().manual_seed(seed)
    ctx = StaticInferenceContext(1, max_len)
    mask = prefill_mask(model, s, device)  # built before the clock, as time_prefill's
    with phase("prefill"):
        _sync(device)
        t0 = time.perf_counter()
        logits = prefill(model, ids, ctx, mask)
        _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    prefill_logits = logits[0].float()
    with phase("decode"):
        out: List[int] = []
        forwards = 0  # the first token comes from the prefill's logits
        t0 = time.perf_counter()
        last = logits[:, -1].float()  # already fp32 through Float16Module; a bare half model's are not
        ctx.sequence_len_offset = s
        ctx.enable_decode_mode()
        # a decode row sees every key: no mask where the attention needs none (it would take a
        # masked, unfused path), else an all-visible row (no [P, P] mask kept for decode)
        visible = None if mask is None else torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=device)
        for i in range(num_tokens):
            # pipeline: the last stage samples, every stage gets its token (a no-op without)
            token = broadcast_from_last_stage(sample(last, temperature, top_k, top_p, generator)
                                              if last is not None else torch.zeros(1, dtype=torch.long, device=device))
            out.append(int(token[0]))
            if progress is not None:
                progress.update(1)
            if (eos_id is not None and out[-1] == eos_id) or i == num_tokens - 1:
                break
            p = s + i
            args = (token[:, None], torch.full((1, 1), p, device=device),
                    None if visible is None else visible[..., :p + 1])
            if pipeline_size() > 1:  # stock PP decode: whole transfers, logits on the last stage
                logits = pipeline_forward(model, *args, ctx, chunked=False)
            else:
                logits = model(*args, inference_context=ctx, runtime_gather_output=True)
            forwards += 1
            ctx.sequence_len_offset += 1
            last = None if logits is None else logits[:, -1].float()
        _sync(device)
    decode_ms = (time.perf_counter() - t0) * 1e3 / max(forwards, 1)
    return Generation(list(prompt_ids), out, prefill_ms, decode_ms, prefill_logits)


@torch.no_grad()
def time_prefill(model, prompt_ids: List[int], device=None, repeats: int = 1):
    """(median ms, logits [s, vocab]) of `repeats` prefills, each into a fresh static context."""
    device = device or next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    s = ids.size(1)
    mask = prefill_mask(model, s, device)
    out = {}

    def run():
        out["logits"] = prefill(model, ids, StaticInferenceContext(1, s), mask)

    times = time_ms(run, repeats, sync=lambda: _sync(device))
    return median(times), out["logits"][0].float()
