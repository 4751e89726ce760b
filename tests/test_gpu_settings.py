"""Megatron's GPU inference settings under ISO (issue 10, part 3), on CPU where they can run.

flash_decode changes how the KV cache is written (keys rotated by RoPE before they are stored,
for its decode kernel) and how decode runs (flash-attn's kvcache kernel, CUDA only). ISO runs
the prefill with it on and leaves decode to it: prefill logits AND the KV cache must equal stock
megatron's with the same flag, and a decode step must plan the stock path. fused_single_qkv_rope
is megatron's fused QKV+RoPE, which megatron applies only to forwards without an inference
context (it asserts otherwise), so ISO, whose chunks attend through a KV cache, steps aside.
"""

from types import SimpleNamespace

import pytest
import torch

from tests.harness import run_ranks
from tests.ranks import FP32_REL_TOL, rel_err, setup_megatron

pytestmark = pytest.mark.multiprocess
SEQ = 50


def _prefill(model, ids, max_len):
    """Logits of every position and the filled KV cache, as the launcher's prefill makes them."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron import causal_mask
    from iso_megatron.megatron import compat

    try:  # 0.19 takes the flash_decode path only with its process-wide InferenceMode on
        from megatron.core.inference.utils import InferenceMode
        mode = InferenceMode.active
    except ImportError:  # 0.16: no such flag
        from contextlib import nullcontext as mode
    ctx = StaticInferenceContext(1, max_len)
    compat.full_prefill_logits(ctx)
    pos = torch.arange(ids.size(1))[None]
    with torch.no_grad(), mode():
        logits = model(ids, pos, causal_mask(ids.size(1)), inference_context=ctx,
                       runtime_gather_output=True)
    kv = {n: tuple(t[:ids.size(1)].clone() for t in pair)
          for n, pair in ctx.key_value_memory_dict.items()}
    return logits, kv, ctx


def flash_decode_cases(tp: int):
    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.megatron.block import plan_forward
    from iso_megatron.megatron.layers import ISOSelfAttention
    from tests.cases_core import build_pair

    setup_megatron(tp)
    stock, iso = build_pair("llama", tp, flash_decode=True)
    plain, _ = build_pair("llama", tp)  # same seed, same weights, flash_decode off
    apply_iso(iso, ISOConfig(num_chunks=3, min_tokens=0))
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(5))
    out = {}
    want, want_kv, _ = _prefill(stock, ids, SEQ + 4)
    got, got_kv, ctx = _prefill(iso, ids, SEQ + 4)
    _, plain_kv, _ = _prefill(plain, ids, SEQ + 4)
    out["bounds"], out["reason"] = iso.decoder.iso_plan.bounds, iso.decoder.iso_plan.reason
    out["logits_err"] = rel_err(got, want)
    out["kv_err"] = max(rel_err(g, w) for n in want_kv for g, w in zip(got_kv[n], want_kv[n]))
    # the flag really changed the cache: flash_decode stores rotated keys, the plain path does not
    out["keys_differ_from_plain"] = rel_err(want_kv[1][0], plain_kv[1][0])
    # a forward without an inference context: megatron's attention would read ISO's private
    # cache as flash-decode's (RoPE in cos/sin form, which the model did not compute): stock runs
    with torch.no_grad():
        from iso_megatron import causal_mask

        pos = torch.arange(SEQ)[None]
        out["no_ctx_err"] = rel_err(iso(ids, pos, causal_mask(SEQ)), stock(ids, pos, causal_mask(SEQ)))
        out["no_ctx_reason"] = iso.decoder.iso_plan.reason
    # decode is left to flash_decode: a one-token step at offset > 0 plans the stock path
    ctx.sequence_len_offset = SEQ
    ctx.enable_decode_mode()
    step = torch.zeros(1, 1, iso.config.hidden_size)
    out["decode_reason"] = plan_forward(ISOConfig(min_tokens=0), iso.config, False, step,
                                        {"inference_context": ctx}, None).reason
    # decode itself is untouched: at a decode step (offset > 0, one token, no ISO chunk) the
    # subclass's method returns exactly what megatron's SelfAttention method returns
    import copy

    from megatron.core.transformer.attention import SelfAttention

    attn = iso.decoder.layers[0].self_attention
    cos, sin = iso.rotary_pos_emb.get_cos_sin(SEQ + 4)
    heads, groups = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    hn = attn.hidden_size_per_attention_head
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 1, heads, hn, generator=g)
    k, v = (torch.randn(1, 1, groups, hn, generator=g) for _ in range(2))
    sub = attn._adjust_key_value_for_inference(copy.deepcopy(ctx), q, k, v, None, cos, sin)
    base = SelfAttention._adjust_key_value_for_inference(attn, copy.deepcopy(ctx), q, k, v, None, cos, sin)
    out["decode_step_same"] = all(
        (a is None and b is None) or (torch.is_tensor(a) and torch.equal(a, b)) or a == b
        for a, b in zip(sub, base))
    out["decode_step_isosubclass"] = type(attn).__name__
    # control: without ISOSelfAttention's chunk RoPE the later chunks get the wrong positions
    real = ISOSelfAttention.chunk_causal
    ISOSelfAttention.chunk_causal = property(lambda self: False, lambda self, v: None)
    try:
        broken, _, _ = _prefill(iso, ids, SEQ + 4)
    finally:
        ISOSelfAttention.chunk_causal = real
    out["control_err"] = rel_err(broken, want)
    out["control_bounds"] = iso.decoder.iso_plan.bounds
    return out


@pytest.fixture(scope="module")
def cases():
    return run_ranks(2, flash_decode_cases, 2, timeout=300)


def test_flash_decode_prefill_runs_iso_and_equals_stock(cases):
    for rank in cases:
        assert rank["bounds"] is not None and len(rank["bounds"]) == 4, rank  # 3 chunks ran
        assert rank["logits_err"] <= FP32_REL_TOL, rank
        assert rank["kv_err"] <= FP32_REL_TOL, rank
        assert rank["keys_differ_from_plain"] > 1e-2, rank  # flash_decode's cache layout


def test_flash_decode_without_a_kv_cache_steps_aside(cases):
    for rank in cases:
        assert rank["no_ctx_reason"] == "flash_decode without an inference context", rank
        assert rank["no_ctx_err"] == 0.0, rank


def test_flash_decode_leaves_decode_to_megatron(cases):
    for rank in cases:
        assert "decode" in rank["decode_reason"], rank
        assert rank["decode_step_isosubclass"] == "ISOSelfAttention"
        assert rank["decode_step_same"], rank  # the decode branch is megatron's, bit for bit


def test_flash_decode_check_catches_wrong_chunk_positions(cases):
    """The comparison above is sensitive: later chunks rotated as megatron's decode would
    (one position) are far from stock."""
    for rank in cases:
        assert rank["control_bounds"] is not None and rank["control_err"] > 1e-3, rank


def test_fused_single_qkv_rope_steps_aside_with_the_reason():
    from iso_megatron import ISOConfig
    from iso_megatron.megatron.block import plan_forward
    from iso_megatron.megatron.models import model_config

    config = SimpleNamespace(**{**vars(model_config("llama")), "fused_single_qkv_rope": True})
    plan = plan_forward(ISOConfig(min_tokens=0), config, False, torch.zeros(64, 1, 64), {}, None)
    assert plan.bounds is None and "fused_single_qkv_rope" in plan.reason
