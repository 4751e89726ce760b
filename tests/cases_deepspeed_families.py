"""Rank-side cases for the parallel-residual and other served families under DeepSpeed AutoTP + ISO
(run through tests.harness.run_ranks; the pytest side is tests/test_deepspeed_families.py).

Every rank builds the same seeded tiny model from the family's own transformers config class;
the references are that model run by transformers in the rank's process (no TP) and DeepSpeed
AutoTP without ISO. LOCAL_SIZE is removed first, as under torchrun.
"""

from __future__ import annotations

import copy
import os
import warnings

warnings.filterwarnings("ignore")

import torch

from tests.ranks import AllReduceSpy, rel_err

NEW_TOKENS = 4
VOCAB = 256
LAYERS = 2

# family -> (parallel residual?, what it is)
FAMILIES = {
    "pythia": (True, "GPT-NeoX, use_parallel_residual=True (Pythia, GPT-NeoX-20B)"),
    "neox-sequential": (False, "GPT-NeoX, use_parallel_residual=False"),
    "gptj": (True, "GPT-J"),
    "falcon-mha": (True, "Falcon 7B layout (parallel_attn), multi_query=False"),
    "falcon-new": (True, "Falcon new_decoder_architecture (40B/180B layout), 4 KV heads"),
    "falcon-sequential": (False, "Falcon, parallel_attn=False"),
    "phi": (True, "Phi (phi-1/1.5/2)"),
}


def setup():
    os.environ.pop("LOCAL_SIZE", None)  # torchrun does not set it
    import iso_megatron.patches.deepspeed  # noqa: F401

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(1234)


def build_hf(family: str, **overrides):
    """A tiny random-weight causal LM of `family`, built from its config class (seeded)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=LAYERS, num_attention_heads=8,
                  max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("pythia", "neox-sequential"):
        cfg = tf.GPTNeoXConfig(**common, intermediate_size=256, use_parallel_residual=family == "pythia",
                               **overrides)  # partial rotary 0.25 by default
        cls = tf.GPTNeoXForCausalLM
    elif family == "gptj":
        cfg = tf.GPTJConfig(vocab_size=VOCAB, n_embd=128, n_layer=LAYERS, n_head=8, rotary_dim=8, n_inner=256,
                            n_positions=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
        cls = tf.GPTJForCausalLM
    elif family.startswith("falcon"):
        layout = {
            "falcon-7b": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False),
            "falcon-mha": dict(multi_query=False, parallel_attn=True, new_decoder_architecture=False, bias=True),
            "falcon-new": dict(new_decoder_architecture=True, num_kv_heads=4),
            "falcon-sequential": dict(multi_query=False, parallel_attn=False, new_decoder_architecture=False,
                                      bias=True),
        }[family]
        cfg = tf.FalconConfig(**common, ffn_hidden_size=256, **{**layout, **overrides})
        cls = tf.FalconForCausalLM
    elif family == "phi":
        cfg = tf.PhiConfig(**common, intermediate_size=256, **overrides)  # partial rotary 0.5
        cls = tf.PhiForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(42)
    model = cls(cfg).eval()
    with torch.no_grad():  # std 0.02 -> 0.1: attention far from uniform, so a mask error shows
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    model.generation_config.pad_token_id = 0
    return model


def engine_for(model, tp: int, iso=None, dtype=torch.float32):
    import deepspeed

    config = {"dtype": dtype, "tensor_parallel": {"tp_size": tp}}
    if iso is not None:
        config["iso"] = iso
    return deepspeed.init_inference(copy.deepcopy(model), config=config)


def _ids(seq: int, batch: int = 1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq * 7 + batch))


def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def _cache_kv(out):
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _plan(engine):
    from iso_megatron.patches.hf_autotp import iso_stacks

    plan = iso_stacks(engine)[0].iso_plan
    return dict(bounds=plan.bounds, reason=plan.reason)


def family_matrix(family: str, tp: int, seq_lens, chunks):
    """Logits, KV cache, greedy tokens, all-reduce counts: DS+ISO vs transformers and DS stock."""
    from iso_megatron import ISOConfig
    from iso_megatron.patches.hf_autotp import apply_iso_hf

    model = build_hf(family)
    engine = engine_for(model, tp, iso={"num_chunks": chunks[0], "min_tokens": 0})
    out = []
    with torch.no_grad():
        for s in seq_lens:
            ids = _ids(s)
            ref = model(ids).logits
            ref_tokens = _generate(model, ids)
            apply_iso_hf(engine, ISOConfig(enabled=False))
            ds_stock = engine(ids).logits
            stock_kv = _cache_kv(engine(ids, use_cache=True))
            stock_tokens = _generate(engine, ids)
            for k in chunks:
                apply_iso_hf(engine, ISOConfig(num_chunks=k, split="balanced", min_tokens=0))
                with AllReduceSpy() as fwd:
                    got = engine(ids).logits
                plan = _plan(engine)
                iso_kv = _cache_kv(engine(ids, use_cache=True))
                with AllReduceSpy() as gen:
                    tokens = _generate(engine, ids)
                out.append(dict(
                    family=family, tp=tp, seq=s, k=k, bounds=plan["bounds"], reason=plan["reason"],
                    err_ref=rel_err(got, ref), err_ds=rel_err(got, ds_stock), stock_err_ref=rel_err(ds_stock, ref),
                    kv_err=max(rel_err(a, b) for (ka, va), (kb, vb) in zip(iso_kv, stock_kv)
                               for a, b in ((ka, kb), (va, vb))),
                    kv_layers=(len(iso_kv), len(stock_kv)),
                    tokens=tokens.tolist(), ref_tokens=ref_tokens.tolist(), stock_tokens=stock_tokens.tolist(),
                    fwd_async=fwd.async_ops, fwd_sync=fwd.sync_ops, gen_async=gen.async_ops))
    return out


PAD = (0, 9, 3, 17)  # left padding of the batch's rows


def padded_batches(family: str, tp: int, seq: int = 40):
    """generate()'s inputs: left-padded rows of different lengths and an attention_mask, batch
    1..4 (batch 1 padded too). ISO on the real positions vs stock DS and transformers."""
    model = build_hf(family)
    engine = engine_for(model, tp, iso={"num_chunks": 2, "min_tokens": 0})
    stock = engine_for(model, tp)
    res = {}
    with torch.no_grad():
        for batch in (1, 2, 3, 4):
            ids = _ids(seq, batch)
            mask = torch.ones_like(ids)
            for row, pad in enumerate(PAD[:batch] if batch > 1 else (5,)):
                mask[row, :pad] = 0
                ids[row, :pad] = 0
            ref = model(ids, attention_mask=mask).logits
            ds = stock(ids, attention_mask=mask).logits
            with AllReduceSpy() as spy:
                got = engine(ids, attention_mask=mask).logits
            plan = _plan(engine)
            real = mask.bool()
            res[batch] = dict(
                err_ref=rel_err(got[real], ref[real]), err_ds=rel_err(got[real], ds[real]),
                async_ops=spy.async_ops, **plan,
                tokens=_generate(engine, ids, attention_mask=mask).tolist(),
                ref_tokens=_generate(model, ids, attention_mask=mask).tolist(),
                stock_tokens=_generate(stock, ids, attention_mask=mask).tolist())
    return res


def half_precision(family: str, tp: int, dtype, seq: int = 257):
    """DeepSpeed's "dtype": ISO vs stock DeepSpeed in the same dtype, and both vs transformers in
    fp32 (the size of the dtype's own rounding). None where DeepSpeed rejects the dtype here."""
    model = build_hf(family)
    ids = _ids(seq)
    try:
        stock = engine_for(model, tp, dtype=dtype)
    except ValueError as e:  # DeepSpeed: "Data type ... is not supported by cpu accelerator"
        return dict(rejected=str(e))
    engine = engine_for(model, tp, iso={"num_chunks": 2, "min_tokens": 0}, dtype=dtype)
    with torch.no_grad():
        ref = model(ids).logits
        ds = stock(ids).logits
        with AllReduceSpy() as spy:
            got = engine(ids).logits
    return dict(rejected=None, dtype=str(got.dtype), async_ops=spy.async_ops, **_plan(engine),
                err_ds=rel_err(got.float(), ds.float()), iso_err_ref=rel_err(got.float(), ref),
                stock_err_ref=rel_err(ds.float(), ref))


def refusals(tp: int):
    """Where stock AutoTP itself is wrong ISO refuses, with a clear error; kernel injection and
    injection_policy keep theirs."""
    from iso_megatron.patches.hf_autotp import apply_iso_hf

    res = {}
    falcon7b = build_hf("falcon-7b")
    try:  # what stock DeepSpeed does with it: the forward fails
        with torch.no_grad():
            engine_for(falcon7b, tp)(_ids(9))
        res["falcon7b_stock"] = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        res["falcon7b_stock"] = f"{type(e).__name__}: {e}"
    for name, make in {
        "falcon7b_iso": lambda: engine_for(falcon7b, tp, iso={"num_chunks": 2}),
        "falcon_alibi": lambda: apply_iso_hf(engine_for(build_hf("falcon-mha", alibi=True), tp)),
        "kernel_inject": lambda: _engine_extra(build_hf("pythia"), tp, replace_with_kernel_inject=True),
        "injection_policy": lambda: _engine_extra(build_hf("gptj"), tp, injection_policy=_gptj_policy()),
    }.items():
        try:
            make()
            res[name] = None
        except ValueError as e:
            res[name] = str(e)
    return res


def _gptj_policy():
    from transformers.models.gptj.modeling_gptj import GPTJBlock

    return {GPTJBlock: ("attn.out_proj", "mlp.fc_out")}


def _engine_extra(model, tp, **extra):
    import deepspeed

    return deepspeed.init_inference(copy.deepcopy(model), config={
        "dtype": torch.float32, "tensor_parallel": {"tp_size": tp}, "iso": {"num_chunks": 2}, **extra})


def families_suite(tp: int, families, seq_lens, chunks, extras: bool):
    """All family cases of one TP size in one start of the ranks."""
    setup()
    res = {"matrix": [c for fam in families for c in family_matrix(fam, tp, seq_lens, chunks)]}
    if extras:
        res["padded"] = {fam: padded_batches(fam, tp) for fam in families}
        res["bf16"] = {fam: half_precision(fam, tp, torch.bfloat16) for fam in families}
        res["fp16"] = {fam: half_precision(fam, tp, torch.float16) for fam in families[:1]}
        res["refusals"] = refusals(tp)
    return res


# ---- a TP group smaller than the world ---------------------------------------------------------

def sub_group(tp: int, family: str = "pythia"):
    """A world larger than the TP group: ranks 0..tp-1 run a TP-`tp` engine, the others only
    join the world's collectives of its creation. DeepSpeed's shm all-reduce (initialised for the
    whole world, no group argument) must not carry the TP group's reduces."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm
    from deepspeed.inference.engine import InferenceEngine

    import iso_megatron.patches.deepspeed as patch

    deepspeed.init_distributed()
    shm_level = getattr(ds_comm.cdb, "shm_vector_kernel_level", 0)
    InferenceEngine.inference_mp_group = None  # DeepSpeed caches the first engine's group
    if dist.get_rank() >= tp:
        # what the engine's creation does on the world: new_group([0..tp-1]), the RNG broadcast
        dist.new_group(list(range(tp)))
        dist.broadcast(torch.get_rng_state(), 0)
        dist.barrier()
        return dict(member=False, shm_level=shm_level)
    model = build_hf(family)
    ids = _ids(257)
    engine = engine_for(model, tp, iso={"num_chunks": 2, "min_tokens": 0})
    group = engine.module.gpt_neox.layers[0].attention.dense.mp_group
    with torch.no_grad():
        ref = model(ids).logits
        with AllReduceSpy() as spy:
            got = engine(ids).logits
        bounds = _plan(engine)["bounds"]
        tokens = _generate(engine, ids)
        ref_tokens = _generate(model, ids)
    res = dict(member=True, shm_level=shm_level, group_size=dist.get_world_size(group),
               world=dist.get_world_size(), err_ref=rel_err(got, ref), async_ops=spy.async_ops,
               sync_ops=spy.sync_ops, routed=bool(patch._warned_group), bounds=bounds,
               tokens=tokens.tolist(), ref_tokens=ref_tokens.tolist())
    InferenceEngine.inference_mp_group = None
    dist.barrier()
    return res


def tp4_suite(families, seq_lens, chunks):
    """The 4-rank start: a TP group of 2 in a world of 4, then the TP-4 smoke matrix."""
    setup()
    from deepspeed.inference.engine import InferenceEngine

    sub = sub_group(2)
    InferenceEngine.inference_mp_group = None
    return dict(sub=sub, matrix=[c for fam in families for c in family_matrix(fam, 4, seq_lens, chunks)])
