"""Rank-side cases for the pipeline-parallel prefill (tests/test_pipeline_megatron.py)."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")

import torch

from tests.ranks import AllReduceSpy, rel_err


def _setup(tp: int, pp: int):
    from megatron.core import parallel_state

    from iso_megatron import apply_cpu_shims

    apply_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _stage_pair(family: str, pp: int, num_layers: int):
    """This rank's stage of a stock GPTModel and of an ISO one, identical weights."""
    from megatron.core import parallel_state as ps

    from iso_megatron import apply_iso, get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    config = model_config(family, num_layers=num_layers, pipeline_model_parallel_size=pp,
                          pipeline_dtype=torch.float32)
    where = dict(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                 share_embeddings_and_output_weights=False)
    torch.manual_seed(42 + ps.get_pipeline_model_parallel_rank())
    stock = build_gpt(config, family=family, **where).eval()
    iso = build_gpt(config, get_gpt_layer_iso_spec(), family=family, **where).eval()
    iso.load_state_dict(stock.state_dict(), strict=True)
    apply_iso(iso)
    return stock, iso


def _generate(model, ids, steps: int, chunked: bool):
    """Greedy prefill + decode through the pipeline: (prefill logits or None, tokens, KV cache)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron import causal_mask
    from iso_megatron.megatron.pipeline import broadcast_from_last_stage, pipeline_forward

    b, s = ids.shape
    ctx = StaticInferenceContext(b, s + steps)
    pos = torch.arange(s)[None].expand(b, s)
    logits = pipeline_forward(model, ids, pos, causal_mask(s), ctx, chunked=chunked)
    prefill_logits = None if logits is None else logits.clone()
    tokens = []
    last = logits
    ctx.sequence_len_offset = s
    ctx.enable_decode_mode()
    for i in range(steps):
        token = torch.zeros(b, dtype=torch.long) if last is None else last[:, -1].argmax(-1)
        token = broadcast_from_last_stage(token)
        tokens.append(token.tolist())
        if i == steps - 1:
            break
        visible = torch.zeros(1, 1, 1, s + i + 1, dtype=torch.bool)  # a decode row sees every key
        last = pipeline_forward(model, token[:, None], torch.full((b, 1), s + i), visible, ctx, chunked=False)
        ctx.sequence_len_offset += 1
    # the positions written (the static cache's last row is allocated, never written)
    kv = {n: tuple(t[:s + steps - 1].clone() for t in kvs) for n, kvs in ctx.key_value_memory_dict.items()}
    return prefill_logits, tokens, kv


def pipeline_exactness(family: str, tp: int, pp: int, num_layers: int, seq_lens, batches, chunks, splits,
                       steps: int = 3):
    """ISO chunked PP against stock megatron-core PP inference on the same weights."""
    from megatron.core import parallel_state as ps

    from iso_megatron import ISOConfig, apply_iso

    _setup(tp, pp)
    stock, iso = _stage_pair(family, pp, num_layers)
    out = []
    with torch.no_grad():
        for s in seq_lens:
            for b in batches:
                ids = torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(s * 10 + b))
                ref_logits, ref_tokens, ref_kv = _generate(stock, ids, steps, chunked=False)
                for k in chunks:
                    for split in splits:
                        apply_iso(iso, ISOConfig(num_chunks=k, split=split, min_tokens=0))
                        with AllReduceSpy() as spy:
                            logits, tokens, kv = _generate(iso, ids, steps, chunked=True)
                        plan = iso.decoder.iso_plan  # the latest forward: a decode step (stock)
                        out.append(dict(
                            seq=s, batch=b, k=k, split=split, stage=ps.get_pipeline_model_parallel_rank(),
                            layers=sorted(kv), ref_layers=sorted(ref_kv),
                            err=None if logits is None else rel_err(logits, ref_logits),
                            kv_err=max((rel_err(kv[n][j], ref_kv[n][j]) for n in ref_kv for j in (0, 1)),
                                       default=0.0),
                            tokens=tokens, ref_tokens=ref_tokens,
                            async_reduces=sum(e[0] == "issue" for e in spy.events),
                            last_plan=plan.reason))
    return out


def pipeline_auto(family: str, pp: int, num_layers: int, seq_lens, max_chunks: int, slow_link_s: float = 0.0):
    """split="auto" through a TP 1 x PP pipeline: each prompt's plan as every stage ran it (the
    first stage plans, the others take its plan), the stage link it planned with (measured
    between the stages), and the generation against stock PP. `slow_link_s` > 0: the longest
    prompt once more over an emulated stage link of that latency per transfer (a new link:
    measured anew)."""
    from contextlib import nullcontext

    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron import ISOConfig, apply_iso, causal_mask
    from iso_megatron.comm import use_p2p
    from iso_megatron.emulated import EmulatedP2P, LinkModel
    from iso_megatron.megatron.pipeline import PipelineIO, pipeline_forward

    _setup(1, pp)
    stock, iso = _stage_pair(family, pp, num_layers)
    apply_iso(iso, ISOConfig(num_chunks=max_chunks, split="auto", min_tokens=0))
    runs = [(s, None) for s in seq_lens]
    if slow_link_s > 0:
        runs.append((max(seq_lens), EmulatedP2P(LinkModel(latency_s=slow_link_s))))
    out = []
    with torch.no_grad():
        for s, link in runs:
            with use_p2p(link) if link is not None else nullcontext():
                ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(s))
                pipeline_forward(iso, ids, torch.arange(s)[None], causal_mask(s), StaticInferenceContext(1, s),
                                 chunked=True)
                plan = iso.decoder.iso_plan
                ref_logits, ref_tokens, _ = _generate(stock, ids, 2, chunked=False)
                logits, tokens, _ = _generate(iso, ids, 2, chunked=True)
                hidden = iso.config.hidden_size  # the link the plan used (cached: no new probe)
                measured = PipelineIO(torch.empty(0), (0, 1)).measure_link(hidden, iso.config.params_dtype,
                                                                         torch.device("cpu"))
            out.append(dict(seq=s, stage=ps.get_pipeline_model_parallel_rank(), slow_link=link is not None,
                            bounds=None if plan.bounds is None else list(plan.bounds), reason=plan.reason,
                            link_latency_s=measured.latency_us * 1e-6, link_gbs=measured.bw_gbs,
                            err=None if logits is None else rel_err(logits, ref_logits),
                            tokens=tokens, ref_tokens=ref_tokens))
    return out


def pipeline_auto_failure(pp: int, num_layers: int):
    """split="auto" whose planning fails on the first stage (calibration raises there): every
    stage's prefill raises, naming it, instead of the later stages waiting for a plan."""
    from unittest import mock

    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron import ISOConfig, apply_iso, calibrate, causal_mask
    from iso_megatron.megatron.pipeline import pipeline_forward

    _setup(1, pp)
    _, iso = _stage_pair("llama", pp, num_layers)
    apply_iso(iso, ISOConfig(num_chunks=4, split="auto", min_tokens=0))
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(calibrate, "calibrate", side_effect=RuntimeError("injected calibration fault")), \
            torch.no_grad():
        try:
            pipeline_forward(iso, ids, torch.arange(512)[None], causal_mask(512), StaticInferenceContext(1, 512),
                             chunked=True)
        except RuntimeError as e:
            return str(e)
    return None
