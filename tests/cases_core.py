"""Rank-side cases for the ISO core tests (run through tests.harness.run_ranks)."""

from __future__ import annotations

import os
import warnings

warnings.filterwarnings("ignore")

import torch

from tests.ranks import AllReduceSpy, rel_err, setup_megatron, value_errors


setup = setup_megatron


def build_pair(family: str, tp: int, **cfg):
    """A stock GPTModel and an ISO one (ISO layer spec + apply_iso) with identical weights."""
    from iso_megatron import apply_iso, get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    config = model_config(family, **cfg)
    torch.manual_seed(42)
    stock = build_gpt(config, family=family).eval()
    iso = build_gpt(config, get_gpt_layer_iso_spec(), family=family).eval()
    iso.load_state_dict(stock.state_dict(), strict=True)
    apply_iso(iso)
    return stock, iso


def logits_matrix(family: str, tp: int, seq_lens, batches, chunks, splits):
    from iso_megatron import ISOConfig, apply_iso, causal_mask

    setup(tp)
    stock, iso = build_pair(family, tp)
    out = []
    with torch.no_grad():
        for s in seq_lens:
            for b in batches:
                g = torch.Generator().manual_seed(s * 10 + b)
                ids = torch.randint(0, 256, (b, s), generator=g)
                pos = torch.arange(s)[None].expand(b, s)
                ref = stock(ids, pos, causal_mask(s))
                for k in chunks:
                    for split in splits:
                        apply_iso(iso, ISOConfig(num_chunks=k, split=split, min_tokens=0))
                        got = iso(ids, pos, causal_mask(s))
                        out.append(dict(seq=s, batch=b, k=k, split=split, err=rel_err(got, ref),
                                        bounds=iso.decoder.iso_plan.bounds))
    return out


def variants(family: str, tp: int):
    """bf16 weights, and a per-sample [b, 1, s, s] mask with left padding, against stock."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask

    setup(tp)
    out = {}
    with torch.no_grad():
        s, b = 67, 2
        ids = torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(3))
        pos = torch.arange(s)[None].expand(b, s)
        stock, iso = build_pair(family, tp)
        mask = causal_mask(s).repeat(b, 1, 1, 1)
        mask[1, :, :, :5] = True  # sample 1: 5 padding tokens on the left
        apply_iso(iso, ISOConfig(num_chunks=3, min_tokens=0))
        got, ref = iso(ids, pos, mask), stock(ids, pos, mask)
        # Padding queries see no key at all: stock's softmax then averages over every key of
        # the whole sequence (future ones too), a chunk over its own keys. Both are meaningless
        # and ignored by callers; every real position must agree.
        real = torch.ones(b, s, dtype=torch.bool)
        real[1, :5] = False
        out["per_sample_mask"] = dict(err=rel_err(got[real], ref[real]), bounds=iso.decoder.iso_plan.bounds)
        stock, iso = (m.bfloat16() for m in build_pair(family, tp))
        apply_iso(iso, ISOConfig(num_chunks=2, min_tokens=0))
        got, ref = iso(ids, pos, causal_mask(s)), stock(ids, pos, causal_mask(s))
        out["bf16"] = dict(err=rel_err(got.float(), ref.float()), dtype=str(got.dtype),
                           bounds=iso.decoder.iso_plan.bounds)
    return out


def greedy(model, ids, steps: int, max_len: int):
    """Static-context prefill + greedy decode: (tokens, KV cache after prefill, logits, chunks)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron import causal_mask

    b, s = ids.shape
    ctx = StaticInferenceContext(b, max_len)
    full = causal_mask(max_len)
    logits = model(ids, torch.arange(s)[None].expand(b, s), full[..., :s, :s], inference_context=ctx,
                   runtime_gather_output=True)
    prefill = logits
    plan = getattr(model.decoder, "iso_plan", None)  # chunks of this prefill (None: stock)
    bounds = None if plan is None else plan.bounds
    # positions >= s are unwritten (torch.empty) until decode writes them
    kv = {k: (v[0][:s].clone(), v[1][:s].clone()) for k, v in ctx.key_value_memory_dict.items()}
    tokens = []
    for i in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
        tokens.append(nxt)
        ctx.sequence_len_offset += s if i == 0 else 1
        ctx.enable_decode_mode()
        p = s + i
        logits = model(nxt, torch.full((b, 1), p), full[..., p:p + 1, :p + 1], inference_context=ctx,
                   runtime_gather_output=True)
    return torch.cat(tokens, 1), kv, prefill, bounds


def kv_and_decode(family: str, tp: int, seq_lens, batches, chunks):
    """ISO prefill into a static context: KV cache and 8 greedy tokens against stock's."""
    from iso_megatron import ISOConfig, apply_iso

    setup(tp)
    stock, iso = build_pair(family, tp)
    out = []
    with torch.no_grad():
        for s in seq_lens:
            for b in batches:
                ids = torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(s + b))
                ref_tok, ref_kv, ref_logits, _ = greedy(stock, ids, 8, s + 8)
                for k in chunks:
                    apply_iso(iso, ISOConfig(num_chunks=k, min_tokens=0))
                    tok, kv, logits, bounds = greedy(iso, ids, 8, s + 8)
                    kv_err = max(max(rel_err(kv[l][i], ref_kv[l][i]) for i in (0, 1)) for l in ref_kv)
                    out.append(dict(seq=s, batch=b, k=k, same_layers=sorted(kv) == sorted(ref_kv),
                                    bounds=bounds,
                                    kv_err=kv_err, logit_err=rel_err(logits, ref_logits),
                                    tokens=tok.tolist(), ref_tokens=ref_tok.tolist()))
    return out


def event_order(family: str, tp: int, seq_len: int, num_chunks: int):
    """Record compute (module hooks) and all-reduce issue/wait (torch.distributed) in order."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask

    setup(tp)
    _, iso = build_pair(family, tp)
    apply_iso(iso, ISOConfig(num_chunks=num_chunks, split="even", min_tokens=0))
    with AllReduceSpy() as spy, torch.no_grad():
        events = spy.events  # compute events join the spy's all-reduce events, in call order
        iso.decoder.register_forward_pre_hook(lambda m, a: events.append(("decoder_begin",)))
        iso.decoder.register_forward_hook(lambda m, a, o: events.append(("decoder_end",)))
        for layer in iso.decoder.layers:
            for part, mod in (("attn", layer.self_attention.linear_qkv), ("mlp", layer.mlp.linear_fc1)):
                mod.register_forward_pre_hook(
                    lambda m, a, n=layer.layer_number, p=part: events.append(("compute", n, p, a[0].size(0))))
        ids = torch.randint(0, 256, (1, seq_len))
        iso(ids, torch.arange(seq_len)[None], causal_mask(seq_len))
    return events


def bad_inputs(tp: int):
    """Every misuse ISO must reject with a ValueError naming the problem, on this rank."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from iso_megatron import ISOConfig, apply_iso, get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    setup(tp)

    class MyAttention(DotProductAttention):
        pass

    def custom_attention_spec():
        spec = get_gpt_layer_iso_spec()
        attn = spec.submodules.self_attention
        sub = dataclasses.replace(attn.submodules, core_attention=MyAttention)
        return dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, self_attention=dataclasses.replace(attn, submodules=sub)))

    cases = {
        "sequence_parallel": lambda: build_gpt(model_config("llama", sequence_parallel=True),
                                               get_gpt_layer_iso_spec()),
        "attention_backend": lambda: build_gpt(model_config("llama"), custom_attention_spec()),
        "heads": lambda: build_gpt(model_config("llama", num_attention_heads=6, num_query_groups=6,
                                                hidden_size=48), get_gpt_layer_iso_spec()),
        "query_groups": lambda: build_gpt(model_config("llama", num_attention_heads=12,
                                                       num_query_groups=3, hidden_size=96),
                                          get_gpt_layer_iso_spec()),
        # a config that does not state the TP size: ISO's own check, before megatron asserts
        "heads_config_unaware": lambda: build_gpt(model_config(
            "llama", num_attention_heads=6, num_query_groups=6, hidden_size=48,
            tensor_model_parallel_size=1), get_gpt_layer_iso_spec()),
        "num_chunks": lambda: ISOConfig(num_chunks=0),
        "fractions": lambda: ISOConfig(split=(0.5, 0.3)),
        "fraction_count": lambda: ISOConfig(num_chunks=3, split=(0.5, 0.5)),
        "split_name": lambda: ISOConfig(split="uneven"),
        "apply_iso_target": lambda: apply_iso(torch.nn.Linear(2, 2)),
    }
    messages = value_errors(cases)
    # every rank is alive and in step after all of that
    alive = torch.ones(1)
    dist.all_reduce(alive)
    messages["alive"] = int(alive.item())
    return messages


def steps_aside(family: str, tp: int):
    """Where ISO cannot help it runs the stock path: identical output, no async reduce."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask

    setup(tp)
    stock, iso = build_pair(family, tp)
    out = {}
    s = 40
    ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(s)[None]

    def run(name, cfg=None, check=lambda got, ref: bool(torch.equal(got, ref))):
        if cfg is not None:
            apply_iso(iso, cfg)
        with AllReduceSpy() as spy:
            got = iso(ids, pos, causal_mask(s))
        out[name] = dict(equal=check(got, ref), async_reduces=spy.async_ops,
                         plan=getattr(iso.decoder, "iso_plan", None))

    with torch.no_grad():
        ref = stock(ids, pos, causal_mask(s))
        run("short_prompt", ISOConfig(min_tokens=s + 1))
        run("disabled", ISOConfig(enabled=False))
        run("one_chunk", ISOConfig(num_chunks=1, min_tokens=0))
        apply_iso(iso, ISOConfig(min_tokens=0))
        iso.train()
        run("training")
        iso.eval()
        run("iso_control", check=lambda got, ref: rel_err(got, ref) < 1e-5)
    apply_iso(iso, ISOConfig(enabled=False))
    out["stock_classes"] = sorted({type(m).__name__ for m in iso.modules()}) == \
        sorted({type(m).__name__ for m in stock.modules()})
    return out


def state_dicts(family: str, tp: int):
    """ISO and stock models: same keys and shapes; each loads the other's state dict strictly."""
    from iso_megatron import apply_iso, get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    setup(tp)
    config = model_config(family)
    stock = build_gpt(config, family=family)
    by_spec = build_gpt(config, get_gpt_layer_iso_spec(), family=family)
    applied = apply_iso(build_gpt(config, family=family))
    result = {}
    for name, m in (("spec", by_spec), ("apply_iso", applied)):
        a, b = m.state_dict(), stock.state_dict()
        result[name] = dict(
            same_keys=list(a) == list(b),
            same_shapes=all(a[k].shape == b[k].shape for k in b if torch.is_tensor(b[k])),
            same_params=[n for n, _ in m.named_parameters()] == [n for n, _ in stock.named_parameters()],
            same_sharded_keys=sorted(m.sharded_state_dict().keys()) == sorted(stock.sharded_state_dict().keys()))
        m.load_state_dict(stock.state_dict(), strict=True)
        stock.load_state_dict(m.state_dict(), strict=True)
    return result


def spec_only_path(family: str, tp: int, seq_len: int):
    """A model built from the ISO spec without apply_iso: each layer runs the schedule alone."""
    from iso_megatron import ISOConfig, causal_mask, get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    setup(tp)
    config = model_config(family)
    torch.manual_seed(42)
    stock = build_gpt(config, family=family).eval()
    iso = build_gpt(config, get_gpt_layer_iso_spec(iso_config=ISOConfig(min_tokens=0)), family=family).eval()
    iso.load_state_dict(stock.state_dict())
    ids = torch.randint(0, 256, (2, seq_len))
    pos = torch.arange(seq_len)[None].expand(2, seq_len)
    with torch.no_grad(), AllReduceSpy() as spy:
        err = rel_err(iso(ids, pos, causal_mask(seq_len)), stock(ids, pos, causal_mask(seq_len)))
    return dict(err=err, async_reduces=spy.async_ops, block=type(iso.decoder).__name__,
                layer_plans=[layer.iso_plan for layer in iso.decoder.layers])
