"""Rank side of the exactness fuzz (tests/test_fuzz.py): a batch of drawn examples, each ISO
against stock megatron-core on the same weights, one model pair per drawn shape."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")

import torch

from tests.cases_core import build_pair, greedy
from tests.ranks import rel_err, setup_megatron


def _inputs(ex):
    s, b = ex["seq_len"], ex["batch"]
    g = torch.Generator().manual_seed(ex["seed"])
    ids = torch.randint(0, 256, (b, s), generator=g)
    return ids, torch.arange(s)[None].expand(b, s)


def _padding_mask(ex):
    """[b, 1, s, s], True = masked: causal, and sample i's first pads[i] positions hidden from
    every query (left padding, as generate() gives a batch of shorter prompts)."""
    from iso_megatron import causal_mask

    s = ex["seq_len"]
    mask = causal_mask(s).repeat(ex["batch"], 1, 1, 1)
    for i, pad in enumerate(ex["pads"]):
        mask[i, :, :, :pad] = True
    return mask


def _real_positions(ex):
    real = torch.ones(ex["batch"], ex["seq_len"], dtype=torch.bool)
    for i, pad in enumerate(ex["pads"]):
        real[i, :pad] = False  # a padding query sees no key: its output is meaningless in both
    return real


def run_examples(tp: int, examples):
    from iso_megatron import ISOConfig, apply_iso

    setup_megatron(tp)
    pairs, out = {}, []
    with torch.no_grad():
        for ex in examples:
            shape = (ex["family"], ex["layers"], ex["heads"], ex["groups"])
            if shape not in pairs:
                pairs[shape] = build_pair(ex["family"], tp, num_layers=ex["layers"], hidden_size=16 * ex["heads"],
                                          num_attention_heads=ex["heads"], num_query_groups=ex["groups"])
            stock, iso = pairs[shape]
            split = ex["split"] if isinstance(ex["split"], str) else tuple(ex["split"])
            apply_iso(iso, ISOConfig(num_chunks=ex["chunks"], split=split, min_tokens=0))
            ids, pos = _inputs(ex)
            rec = dict(example=ex)
            if ex["context"]:  # static inference context: KV cache and 2 greedy tokens too
                ref_tok, ref_kv, ref_logits, _ = greedy(stock, ids, 2, ex["seq_len"] + 2)
                tok, kv, logits, bounds = greedy(iso, ids, 2, ex["seq_len"] + 2)
                rec.update(err=rel_err(logits, ref_logits), bounds=bounds,
                           kv_err=max(max(rel_err(kv[l][i], ref_kv[l][i]) for i in (0, 1)) for l in ref_kv),
                           same_layers=sorted(kv) == sorted(ref_kv),
                           tokens=tok.tolist(), ref_tokens=ref_tok.tolist())
            else:
                mask = _padding_mask(ex)
                ref, got = stock(ids, pos, mask), iso(ids, pos, mask)
                real = _real_positions(ex)
                rec.update(err=rel_err(got[real], ref[real]), bounds=iso.decoder.iso_plan.bounds)
            out.append(rec)
    return out
