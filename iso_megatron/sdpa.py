"""Causal attention on torch's fused SDPA kernels, for a whole prompt or a later chunk of one.

Framework-free (torch only): the Megatron adapter's core attention
(iso_megatron/megatron/attention.py, `SDPAAttention`) and the Hugging Face path
(patches/hf_autotp.py, `BottomRightCausal`) both run their chunks through here. A later chunk's
queries are the LAST sq of sk positions (causal aligned bottom-right); `chunk_path` says which
fused kernel runs it, and nothing of size [s, s] is built for it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant, causal_lower_right

_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_HAS_ENABLE_GQA = _TORCH >= (2, 5)  # F.scaled_dot_product_attention(enable_gqa=...) since 2.5


# ---- the attention forms (tensors in SDPA's layout: [b, heads, s, hn]) ------------------------

def repeat_kv(k, v, heads: int):
    """K/V with their ng heads repeated to `heads` (megatron's GQA layout: group-major)."""
    rep = heads // k.size(1)
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def grouped_sdpa(q, k, v, **kwargs):
    """F.scaled_dot_product_attention with grouped K/V (ng < np heads) served by the kernel
    itself where it can, else by repeating K/V (a copy of K/V's size, never of [s, s]).

    CUDA's flash kernel takes grouped heads; its memory-efficient kernel (fp32, or where flash
    cannot run) does not, and `enable_gqa` would then fall back to the math kernel, which
    materialises the scores. The CPU flash kernel takes grouped heads."""
    if k.size(1) != q.size(1):
        native = _HAS_ENABLE_GQA and (q.device.type == "cpu" or _cuda_flash_takes(q, k, v, kwargs))
        if native:
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, v, q.size(1))
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _cuda_flash_takes(q, k, v, kwargs) -> bool:
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    mask = kwargs.get("attn_mask")
    if isinstance(mask, CausalBias):  # a tensor subclass, but no tensor for flash: it handles it
        mask = None
    return can_use_flash_attention(SDPAParams(q, k, v, mask, kwargs.get("dropout_p", 0.0),
                                              kwargs.get("is_causal", False), True))


def causal_attention(q, k, v, scale: float, dropout_p: float = 0.0):
    """Causal attention of sq queries that are the LAST sq of sk positions (bottom-right)."""
    sq, sk = q.size(2), k.size(2)
    if not 0 < sq <= sk:
        raise ValueError(f"causal_attention: need 0 < queries <= keys, got {sq} queries over {sk} keys")
    if sq == 1:  # the last position sees every key
        return grouped_sdpa(q, k, v, dropout_p=dropout_p, scale=scale)
    if q.device.type == "cpu" and not dropout_p and _CPU_SLICE < sq < _CPU_WIDE_Q_BLOCKS:
        return _cpu_causal_by_slices(q, k, v, scale)
    if sq == sk:
        return grouped_sdpa(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    path = chunk_path(q, k, dropout_p)
    if path == "cpu_flash_blocks":
        return causal_attention_by_blocks(q, k, v, scale, _cpu_flash_with_lse)
    if path == "cudnn_blocks":
        return causal_attention_by_blocks(q, k, v, scale, _cudnn_with_lse)
    return grouped_sdpa(q, k, v, attn_mask=_lower_right(sq, sk), dropout_p=dropout_p, scale=scale)


# torch's CausalBias is a tensor subclass built on an uninitialised [2, sq, sk] float tensor (the
# legacy constructor: 268 MB of host memory at 4096 x 8192 queries x keys), and it cannot be built
# while a TorchDispatchMode is active (scripts/gpu_check.py's sync counter). Every layer of one
# prefill asks for the same few shapes: one mask per shape, built once.
@lru_cache(maxsize=8)
def _lower_right(sq: int, sk: int) -> CausalBias:
    return causal_lower_right(sq, sk)


# torch's CPU flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) takes 256-query
# blocks from 768 queries on and 64 below, against 512-key blocks: a causal square of 257-767
# queries is computed almost whole (a 512 one entirely), twice its causal half. In slices of 256
# queries only each slice's 256 x 256 diagonal is: 2048 tokens in K = 4 chunks of 512 go from
# 1.06-1.08x the unchunked kernel to 1.02 (docs/gpu_readiness.md). From 768 on the kernel skips
# well itself and slices only add calls.
_CPU_WIDE_Q_BLOCKS = 768
_CPU_SLICE = 256


def _cpu_causal_by_slices(q, k, v, scale: float):
    """Bottom-right causal attention on CPU, the queries in slices of `_CPU_SLICE`, each slice
    the last queries of the keys up to its end (its own past block + diagonal block)."""
    sq, sk = q.size(2), k.size(2)
    out = torch.empty_like(q)
    for start in range(0, sq, _CPU_SLICE):
        stop = min(sq, start + _CPU_SLICE)
        end = sk - sq + stop
        qs, ks, vs = q[:, :, start:stop], k[:, :, :end], v[:, :, :end]
        if end == stop - start:
            out[:, :, start:stop] = _cpu_flash_with_lse(qs, ks, vs, True, scale)[0]
        else:
            out[:, :, start:stop] = causal_attention_by_blocks(qs, ks, vs, scale, _cpu_flash_with_lse)
    return out


def chunk_path(q, k, dropout_p: float = 0.0) -> str:
    """How `causal_attention` runs sq < sk queries, each path a fused kernel without a mask:
      cpu_flash_blocks  CPU: its flash kernel computes every block under `causal_lower_right`,
                        but skips them under `is_causal`: past block + diagonal block, merged
                        (257-767 queries: in slices of 256, each its past + diagonal block)
      cudnn_blocks      CUDA where torch's cuDNN attention takes both blocks (bf16/fp16; grouped
                        K/V as they are where it takes them): the kernel SDPA picks for a whole
                        causal prompt there, and it has no bottom-right form. On an H200
                        (torch 2.11) stock's grouped prompt ran on cuDNN, and a later chunk on
                        flash instead took 1.6x the time of its share (docs/gpu_results.md)
      lower_right       torch's `causal_lower_right` (flash / memory-efficient kernels)
    """
    if q.device.type == "cpu":
        if dropout_p:
            raise ValueError("SDPAAttention: attention dropout in a chunked (ISO) prefill on CPU")
        return "cpu_flash_blocks"
    if q.device.type == "cuda" and not dropout_p and _cudnn_takes_blocks(q, k):
        return "cudnn_blocks"
    return "lower_right"


def causal_attention_by_blocks(q, k, v, scale: float, attend=None):
    """Bottom-right causal attention without a mask: the past block (keys before the first
    query, all visible) and the diagonal block (causal, square), each by `attend(q, k, v,
    is_causal, scale) -> (out, log-sum-exp)` (default: the CPU flash kernel), merged by their
    log-sum-exps. Each block runs the kernel in the form it is fast in."""
    attend = attend or _cpu_flash_with_lse
    past = k.size(2) - q.size(2)
    out_past, lse_past = attend(q, k[:, :, :past], v[:, :, :past], False, scale)
    out_diag, lse_diag = attend(q, k[:, :, past:], v[:, :, past:], True, scale)
    # softmax over both blocks = each block's softmax weighted by its share of the total mass,
    # merged in fp32 (a bf16 merge would round the weight to bf16)
    merge = torch.promote_types(q.dtype, torch.float32)
    w_past = torch.sigmoid(lse_past - lse_diag).unsqueeze(-1).to(merge)  # [b, np, sq, 1]
    return out_diag.to(merge).lerp_(out_past.to(merge), w_past).to(q.dtype)


def _cpu_flash_with_lse(q, k, v, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                                      scale=scale)


def _cudnn_with_lse(q, k, v, is_causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, is_causal, False, scale=scale)[:2]
    return out, lse.reshape(out.shape[:3])


def _cudnn_takes_blocks(q, k) -> bool:
    """Whether torch's cuDNN attention is enabled and takes both blocks of this chunk."""
    if not (_HAS_ENABLE_GQA and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    grouped = k.size(1) != q.size(1)  # grouped K/V where torch's cuDNN attention takes them
    past = k.size(2) - q.size(2)
    return all(can_use_cudnn_attention(SDPAParams(q, kk, kk, None, 0.0, causal, grouped))
               for kk, causal in ((k[:, :, :past], False), (k[:, :, past:], True)))


class BottomRightCausal(CausalBias):
    """An `attn_mask` for F.scaled_dot_product_attention meaning "causal, the queries being the
    last sq of the sk positions", computed by `causal_attention` (nothing materialised).

    For callers that hand a mask object to SDPA themselves (Hugging Face's sdpa attention under
    ISO, patches/hf_autotp.py); `chunk_path` says which kernel runs it.
    """

    def __init__(self, seq_len_q: int, seq_len_kv: int) -> None:
        if not 0 < seq_len_q <= seq_len_kv:
            raise ValueError(f"BottomRightCausal: need 0 < seq_len_q <= seq_len_kv, got "
                             f"{seq_len_q} queries over {seq_len_kv} keys")
        super().__init__(CausalVariant.LOWER_RIGHT, seq_len_q, seq_len_kv)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _sdpa_bottom_right(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def _sdpa_bottom_right(query, key, value, attn_mask, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
    if is_causal:
        raise ValueError("BottomRightCausal is the causal mask: pass is_causal=False with it")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.size(-2), key.size(-2)):
        raise ValueError(f"BottomRightCausal for {attn_mask.seq_len_q} queries over "
                         f"{attn_mask.seq_len_kv} keys, given {query.size(-2)} over {key.size(-2)}")
    scale = query.size(-1) ** -0.5 if scale is None else scale
    return causal_attention(query, key, value, scale, dropout_p)


def masked_attention(q, k, v, masked, scale: float, dropout_p: float = 0.0):
    """Attention under an explicit boolean mask (True = masked, Megatron's convention; any shape
    that broadcasts to [b, np, sq, sk]). Correct, not fused: SDPA gets the mask materialised.

    A row with every key masked: Megatron's masked_fill(-10000) gives every key the same score,
    so the row is the mean of all values; a zero query unmasked over all keys gives the same."""
    empty_rows = masked.all(-1, keepdim=True)
    allowed = ~masked | empty_rows
    q = q.masked_fill(empty_rows, 0)
    return grouped_sdpa(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)


def bottom_right_causal_mask(sq: int, sk: int, device):
    """[sq, sk] bool, True = masked: keys after each query's position (queries = last sq)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
