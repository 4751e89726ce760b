"""SDPAAttention (iso_megatron/megatron/attention.py): torch's fused SDPA kernels as the local
spec's core attention, stock and under ISO; the launcher's --attention-backend and RoPE-scaling
flags; Hugging Face's chunk attention without a mask (patches/hf_autotp.py).

References are independent of the code under test: megatron-core's own DotProductAttention
(which materialises the scores and applies masks with masked_fill), torch's SDPA with an
explicit boolean mask, stock megatron-core models. The megatron cases run on 2 real
tensor-parallel ranks (gloo, CPU), all in one start (`ranks` fixture).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_ranks
from tests.ranks import FP32_REL_TOL, rel_err, value_errors

TP = 2
SEQ = 67  # odd: uneven chunks
# bf16: inputs are rounded to bf16 for both sides and compared with fp32 DotProductAttention on
# the same rounded inputs. SDPA accumulates in fp32 and rounds its output once (2^-9 relative);
# the block merge adds one more rounding of each partial output. 2^-7 (4 output ulps) bounds
# that with margin; stock bf16 DotProductAttention (scores and probabilities rounded to bf16)
# is measured alongside and SDPA must not be worse than it.
BF16_REL_TOL = 2.0 ** -7


# ---- rank side ----------------------------------------------------------------------------

class OpLog:
    """Every aten op run while active (torch dispatch mode): name, shapes, the flash op's is_causal."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                causal = None
                if name == "_scaled_dot_product_flash_attention_for_cpu":
                    causal = bool(args[4] if len(args) > 4 else kwargs.get("is_causal", False))
                log.append(dict(op=name, causal=causal,
                                shapes=[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def names(self):
        return {o["op"] for o in self.ops}

    def flash(self, causal):
        return [o for o in self.ops if o["op"] == "_scaled_dot_product_flash_attention_for_cpu"
                and o["causal"] == causal]


def _qkv(sq, sk, b, heads, groups, hn, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, hn, generator=g)
    k, v = (torch.randn(sk, b, groups, hn, generator=g) for _ in range(2))
    return tuple(t.to(dtype) for t in (q, k, v))


def attention_units(tp: int):
    """SDPAAttention against megatron's DotProductAttention, module by module, on this rank."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from iso_megatron import causal_mask
    from iso_megatron.megatron.attention import SDPAAttention
    from iso_megatron.megatron.layers import ISODotProductAttention
    from iso_megatron.megatron.models import model_config

    out = []
    b, hn = 2, 16
    for heads, groups in ((8, 2), (8, 8)):  # GQA and MHA (per rank: heads/tp, groups/tp)
        cfg = model_config("llama", hidden_size=heads * hn, num_attention_heads=heads,
                           num_query_groups=groups)
        np_, ng = heads // tp, groups // tp
        ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
        ref_chunk = ISODotProductAttention(cfg, 1, AttnMaskType.causal, "self")
        new = SDPAAttention(cfg, 1, AttnMaskType.causal, "self")
        q, k, v = _qkv(SEQ, SEQ, b, np_, ng, hn, seed=heads + groups)
        full = causal_mask(SEQ)
        pad = full.repeat(b, 1, 1, 1)
        pad[1, :, :, :5] = True  # sample 1: 5 padding tokens on the left (rows 0-4 see no key)

        def case(name, got, want):
            out.append(dict(name=f"{name} heads={np_} groups={ng}", err=rel_err(got, want),
                            shape=tuple(got.shape), ref_shape=tuple(want.shape)))

        want = ref(q, k, v, full)
        case("full prompt, no mask", new(q, k, v, None), want)
        case("full prompt, causal mask", new(q, k, v, full), want)
        case("full prompt, padding mask", new(q, k, v, pad), ref(q, k, v, pad))
        for start in (0, 1, 37, 64, SEQ - 1):
            ref_chunk.chunk_causal = new.chunk_causal = True
            qc = q[start:]
            want = ref_chunk(qc, k, v, full[..., start:, :])
            case(f"chunk from {start}, no mask", new(qc, k, v, None), want)
            case(f"chunk from {start}, causal mask", new(qc, k, v, full[..., start:, :]), want)
            case(f"chunk from {start}, padding mask", new(qc, k, v, pad[..., start:, :]),
                 ref_chunk(qc, k, v, pad[..., start:, :]))
            ref_chunk.chunk_causal = new.chunk_causal = False
        # decode: one query, megatron's no_mask type at a KV-cache offset, with and without a mask row
        row = torch.zeros(1, 1, 1, SEQ, dtype=torch.bool)
        want = ref(q[-1:], k, v, row, attn_mask_type=AttnMaskType.no_mask)
        case("decode, mask row", new(q[-1:], k, v, row, attn_mask_type=AttnMaskType.no_mask), want)
        case("decode, no mask", new(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask), want)
        scaled_ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3)
        scaled = SDPAAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3)
        case("softmax_scale=0.3", scaled(q, k, v, None), scaled_ref(q, k, v, full))
    return out


def bf16_units(tp: int):
    """bf16 SDPAAttention and bf16 DotProductAttention, each against fp32 DotProductAttention on
    the same bf16-rounded inputs."""
    from megatron.core.transformer.enums import AttnMaskType

    from iso_megatron import causal_mask
    from iso_megatron.megatron.attention import SDPAAttention
    from iso_megatron.megatron.layers import ISODotProductAttention
    from iso_megatron.megatron.models import model_config

    heads, groups, hn, b = 8, 2, 16, 2
    shape = dict(hidden_size=heads * hn, num_attention_heads=heads, num_query_groups=groups)
    cfg32 = model_config("llama", **shape)
    cfg16 = model_config("llama", params_dtype=torch.bfloat16, **shape)
    q, k, v = _qkv(SEQ, SEQ, b, heads // tp, groups // tp, hn, seed=5, dtype=torch.bfloat16)
    full = causal_mask(SEQ)
    out = []
    for start in (0, 29):
        ref = ISODotProductAttention(cfg32, 1, AttnMaskType.causal, "self")
        stock = ISODotProductAttention(cfg16, 1, AttnMaskType.causal, "self")
        new = SDPAAttention(cfg16, 1, AttnMaskType.causal, "self")
        for m in (ref, stock, new):
            m.chunk_causal = start > 0
        mask = full[..., start:, :]
        want = ref(q[start:].float(), k.float(), v.float(), mask)
        got = new(q[start:], k, v, None)
        out.append(dict(start=start, dtype=str(got.dtype), err=rel_err(got.float(), want),
                        stock_err=rel_err(stock(q[start:], k, v, mask).float(), want)))
    return out


def bad_uses(tp: int):
    """What SDPAAttention refuses, with the ValueError's message (None: no error)."""
    import dataclasses

    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from iso_megatron.megatron.attention import SDPAAttention, sdpa_layer_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    cfg = model_config("llama")
    attn = SDPAAttention(cfg, 1, AttnMaskType.causal, "self")
    np_, ng, hn = 8 // tp, 4 // tp, 8
    q, k, v = _qkv(16, 16, 1, np_, ng, hn, seed=1)
    spec = sdpa_layer_spec()
    no_attention = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(
            spec.submodules.self_attention, submodules=dataclasses.replace(
                spec.submodules.self_attention.submodules, core_attention=torch.nn.Identity))))
    cases = {
        "attention_bias": lambda: attn(q, k, v, None, attention_bias=torch.zeros(1)),
        "packed_seq_params": lambda: attn(q, k, v, None, packed_seq_params=PackedSeqParams()),
        "float_mask": lambda: attn(q, k, v, torch.zeros(1, 1, 16, 16)),
        "mask_shape": lambda: attn(q, k, v, torch.zeros(1, 1, 16, 15, dtype=torch.bool)),
        "causal_uneven": lambda: attn(q[:4], k, v, None),
        "softmax_type": lambda: SDPAAttention(model_config("llama", softmax_type="off-by-one"), 1,
                                              AttnMaskType.causal, "self"),
        "window": lambda: SDPAAttention(model_config("llama", window_size=(8, 0)), 1,
                                        AttnMaskType.causal, "self"),
        "spec_without_dot_product_attention": lambda: sdpa_layer_spec(no_attention),
        "build_gpt_attention": lambda: build_gpt(cfg, attention="flash"),
    }
    return value_errors(cases)


def _models(family: str, config_overrides=None, **gpt_kwargs):
    """Stock local spec (DotProductAttention), stock SDPA, ISO SDPA: one set of weights."""
    from iso_megatron import apply_iso, get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    config = model_config(family, **(config_overrides or {}))
    torch.manual_seed(42)
    local = build_gpt(config, family=family, **gpt_kwargs).eval()
    sdpa = build_gpt(config, family=family, attention="sdpa", **gpt_kwargs).eval()
    iso = build_gpt(config, get_gpt_layer_iso_spec(), family=family, attention="sdpa", **gpt_kwargs).eval()
    for m in (sdpa, iso):
        m.load_state_dict(local.state_dict(), strict=True)
    apply_iso(iso)
    return local, sdpa, iso


def _attention_class(model):
    return type(model.decoder.layers[0].self_attention.core_attention).__name__


def model_cases(tp: int):
    """Whole models: stock local vs stock SDPA vs ISO with SDPA; the ops ISO's chunks ran."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask
    from tests.cases_core import greedy

    out = []
    for family in ("llama", "gpt"):
        local, sdpa, iso = _models(family)
        b = 2
        ids = torch.randint(0, 256, (b, SEQ), generator=torch.Generator().manual_seed(7))
        pos = torch.arange(SEQ)[None].expand(b, SEQ)
        pad = causal_mask(SEQ).repeat(b, 1, 1, 1)
        pad[1, :, :, :5] = True
        real = torch.ones(b, SEQ, dtype=torch.bool)
        real[1, :5] = False
        with torch.no_grad():
            ref = local(ids, pos, causal_mask(SEQ))
            rec = dict(family=family, classes=(_attention_class(local), _attention_class(sdpa),
                                               _attention_class(iso)),
                       stock_sdpa_err=rel_err(sdpa(ids, pos, None), ref),
                       stock_sdpa_mask_err=rel_err(sdpa(ids, pos, causal_mask(SEQ)), ref),
                       stock_sdpa_padding_err=rel_err(sdpa(ids, pos, pad), local(ids, pos, pad)),
                       iso=[])
            for k in (2, 3):
                apply_iso(iso, ISOConfig(num_chunks=k, min_tokens=0))
                with OpLog() as log:
                    got = iso(ids, pos, None)
                bounds = iso.decoder.iso_plan.bounds
                got_mask = iso(ids, pos, causal_mask(SEQ))
                mask_bounds = iso.decoder.iso_plan.bounds
                want_pad = local(ids, pos, pad)
                got_pad = iso(ids, pos, pad)
                pad_bounds = iso.decoder.iso_plan.bounds
                layers = len(iso.decoder.layers)
                rec["iso"].append(dict(
                    k=k, bounds=bounds, mask_bounds=mask_bounds, pad_bounds=pad_bounds,
                    err=rel_err(got, ref), mask_err=rel_err(got_mask, ref),
                    padding_err=rel_err(got_pad[real], want_pad[real]),
                    past_blocks=[o["shapes"][:2] for o in log.flash(causal=False)],
                    diagonal_blocks=len(log.flash(causal=True)), expect_blocks=layers * (k - 1),
                    expect_diagonal=layers * k,
                    score_ops=sorted(log.names() & {"_softmax", "softmax", "baddbmm", "bmm", "triu", "tril"})))
            apply_iso(iso, ISOConfig(num_chunks=3, min_tokens=0))
            tok, kv, logits, gb = greedy(iso, ids, 6, SEQ + 6)
            ref_tok, ref_kv, ref_logits, _ = greedy(local, ids, 6, SEQ + 6)
            rec["greedy"] = dict(
                bounds=gb, tokens=tok.tolist(), ref_tokens=ref_tok.tolist(),
                logit_err=rel_err(logits, ref_logits),
                kv_err=max(rel_err(kv[l][i], ref_kv[l][i]) for l in ref_kv for i in (0, 1)))
        out.append(rec)
    return out


def rope_cases(tp: int):
    """Llama-3.1 RoPE scaling (GPTModel rope_scaling): ISO with SDPA vs stock, and on vs off."""
    from iso_megatron import ISOConfig, apply_iso, causal_mask

    # Llama-3's base and a head size of 32: 7 of the 16 frequencies are ones the scaling changes
    rope = dict(rotary_base=500000,
                config_overrides=dict(hidden_size=128, num_attention_heads=4, num_query_groups=2))
    local, _, iso = _models("llama", rope_scaling=True, rope_scaling_factor=8.0, **rope)
    plain, _, _ = _models("llama", **rope)
    plain.load_state_dict(local.state_dict(), strict=True)
    with torch.no_grad():  # sharper attention (q, k x4): positions, hence RoPE, matter more
        for m in (local, iso, plain):
            for layer in m.decoder.layers:
                layer.self_attention.linear_qkv.weight.mul_(4.0)
    s = 256
    ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(11))
    pos = torch.arange(s)[None]
    out = dict(inv_freq_changed=not torch.equal(local.rotary_pos_emb.inv_freq,
                                                plain.rotary_pos_emb.inv_freq))
    with torch.no_grad():
        ref = local(ids, pos, causal_mask(s))
        apply_iso(iso, ISOConfig(num_chunks=3, min_tokens=0))
        got = iso(ids, pos, None)
        out.update(bounds=iso.decoder.iso_plan.bounds, err=rel_err(got, ref),
                   scaling_effect=rel_err(plain(ids, pos, causal_mask(s)), ref))
    return out


def state_dicts(tp: int):
    """State-dict and sharded-state-dict keys: local spec vs SDPA vs ISO SDPA."""
    local, sdpa, iso = _models("llama")
    keys = [sorted(m.state_dict().keys()) for m in (local, sdpa, iso)]
    loads_back = local.load_state_dict(iso.state_dict(), strict=True)  # and SDPA -> local spec
    sharded = []
    for m in (local, sdpa, iso):
        try:
            sharded.append(sorted(m.sharded_state_dict().keys()))
        except Exception as e:  # reported, so a failure names itself
            sharded.append(f"{type(e).__name__}: {e}")
    return dict(keys=keys, sharded=sharded, loads_back=(loads_back.missing_keys,
                                                        loads_back.unexpected_keys),
                core_attention_keys=[k for k in keys[1] if "core_attention" in k])


def rank_cases(tp: int):
    from tests.ranks import setup_megatron

    setup_megatron(tp)
    return dict(units=attention_units(tp), bf16=bf16_units(tp), bad=bad_uses(tp),
                models=model_cases(tp), rope=rope_cases(tp), state_dicts=state_dicts(tp))


def cuda_cases():
    """On CUDA (1 rank): SDPAAttention against DotProductAttention in fp32 and bf16, with the
    math kernel disallowed and lower-right masks forbidden to materialise, so every call ran a
    fused kernel; the CUDA kernels one chunk ran (profiler); the HF marker on CUDA."""
    from unittest import mock

    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import CausalBias

    from iso_megatron import causal_mask
    from iso_megatron.megatron.attention import SDPAAttention
    from iso_megatron.sdpa import BottomRightCausal, chunk_path
    from iso_megatron.megatron.layers import ISODotProductAttention
    from iso_megatron.megatron.models import model_config
    from tests.ranks import setup_megatron

    setup_megatron(1)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # attention forks the CUDA RNG tracker
    dev, s, b, hn = "cuda", 515, 2, 64
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    every = fused + [SDPBackend.MATH]
    full = causal_mask(s, device=dev)
    out = []

    def no_materialise(*args, **kwargs):
        raise AssertionError("causal_lower_right materialised its mask")

    with torch.no_grad(), sdpa_kernel(fused), mock.patch.object(CausalBias, "_materialize", no_materialise):
        for heads, groups in ((8, 2), (8, 8)):
            shape = dict(hidden_size=heads * hn, num_attention_heads=heads, num_query_groups=groups)
            cfg32 = model_config("llama", **shape)
            q, k, v = (t.to(dev) for t in _qkv(s, s, b, heads, groups, hn, seed=heads + groups,
                                               dtype=torch.bfloat16))
            for dtype in (torch.float32, torch.bfloat16):
                cfg = model_config("llama", params_dtype=dtype, **shape)
                ref = ISODotProductAttention(cfg32, 1, AttnMaskType.causal, "self")
                new = SDPAAttention(cfg, 1, AttnMaskType.causal, "self")
                for start in (0, 1, 37, 300):
                    ref.chunk_causal = new.chunk_causal = start > 0
                    with sdpa_kernel(every):  # the reference may use the math kernel
                        want = ref(q[start:].float(), k.float(), v.float(), full[..., start:, :])
                    got = new(q[start:].to(dtype), k.to(dtype), v.to(dtype), None)
                    path = chunk_path(*(t.to(dtype).permute(1, 2, 0, 3) for t in (q[start:], k)))
                    out.append(dict(heads=heads, groups=groups, dtype=str(dtype), start=start,
                                    path=path if start else "is_causal",
                                    err=rel_err(got.float(), want)))
        q = torch.randn(1, 8, 200, 64, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, 1000, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=BottomRightCausal(200, 1000))
            torch.cuda.synchronize()
        kernels = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    with sdpa_kernel(every):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                              attn_mask=_explicit_lower_right(200, 1000).to(dev))
    marker = dict(err=rel_err(got.float(), want), kernels=kernels)
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, units=out, marker=marker)


# ---- the megatron tests (2 ranks, one start) -------------------------------------------------

@pytest.fixture(scope="module")
def ranks():
    return run_ranks(TP, "tests.test_attention:rank_cases", TP, timeout=300)


@pytest.mark.multiprocess
def test_sdpa_attention_equals_dot_product_attention(ranks):
    for rank in ranks:
        names = [c["name"] for c in rank["units"]]
        assert any("chunk from 37, padding mask heads=4 groups=1" == n for n in names), names
        for c in rank["units"]:
            assert c["shape"] == c["ref_shape"], c
            assert c["err"] <= FP32_REL_TOL, c


@pytest.mark.multiprocess
def test_bf16_within_tolerance_and_not_worse_than_stock(ranks):
    for rank in ranks:
        for c in rank["bf16"]:
            assert c["dtype"] == "torch.bfloat16", c
            assert c["err"] <= BF16_REL_TOL, c
            assert c["err"] <= c["stock_err"], c


@pytest.mark.multiprocess
def test_unsupported_uses_raise_value_errors(ranks):
    words = {"attention_bias": "attention_bias", "packed_seq_params": "packed",
             "float_mask": "bool", "mask_shape": "does not broadcast", "causal_uneven": "explicit mask",
             "softmax_type": "softmax_type", "window": "sliding-window",
             "spec_without_dot_product_attention": "no DotProductAttention",
             "build_gpt_attention": "unknown attention"}
    for rank in ranks:
        for name, word in words.items():
            assert rank["bad"][name] is not None and word in rank["bad"][name], (name, rank["bad"][name])


@pytest.mark.multiprocess
def test_models_stock_and_iso_with_sdpa_equal_the_local_spec(ranks):
    for rank in ranks:
        for rec in rank["models"]:
            assert rec["classes"] == ("DotProductAttention", "SDPAAttention", "SDPAAttention"), rec
            for key in ("stock_sdpa_err", "stock_sdpa_mask_err", "stock_sdpa_padding_err"):
                assert rec[key] <= FP32_REL_TOL, (key, rec)
            for c in rec["iso"]:
                assert c["bounds"] is not None and len(c["bounds"]) == c["k"] + 1, c
                assert c["mask_bounds"] is not None and c["pad_bounds"] is not None, c
                for key in ("err", "mask_err", "padding_err"):
                    assert c[key] <= FP32_REL_TOL, (key, rec["family"], c)
            g = rec["greedy"]
            assert g["bounds"] is not None, g
            assert g["tokens"] == g["ref_tokens"], g
            assert g["logit_err"] <= FP32_REL_TOL and g["kv_err"] <= FP32_REL_TOL, g


@pytest.mark.multiprocess
def test_iso_chunks_run_the_cpu_flash_kernel_in_blocks(ranks):
    """Each later chunk: one unmasked past block over keys [0, start) and one causal diagonal
    block, on the CPU flash kernel; no score matmul, softmax or mask construction anywhere."""
    for rank in ranks:
        for rec in rank["models"]:
            for c in rec["iso"]:
                assert len(c["past_blocks"]) == c["expect_blocks"], c
                assert c["diagonal_blocks"] == c["expect_diagonal"], c
                b = c["bounds"]
                starts = sorted({kshape[2] for _, kshape in c["past_blocks"]})
                assert starts == list(b[1:-1]), (starts, b)  # past block = keys before the chunk
                assert c["score_ops"] == [], c


@pytest.mark.multiprocess
def test_rope_scaling_iso_exact_and_effective(ranks):
    for rank in ranks:
        r = rank["rope"]
        assert r["inv_freq_changed"], r
        assert r["bounds"] is not None, r
        assert r["err"] <= FP32_REL_TOL, r
        assert r["scaling_effect"] > 1e-3, r  # the scaled model is another function


@pytest.mark.multiprocess
def test_state_dict_keys_are_the_local_specs(ranks):
    for rank in ranks:
        sd = rank["state_dicts"]
        local, sdpa, iso = sd["keys"]
        assert local == sdpa == iso and local, sd["keys"]
        assert sd["core_attention_keys"] == [], sd
        assert sd["loads_back"] == ([], []), sd
        assert all(isinstance(s, list) for s in sd["sharded"]), sd["sharded"]
        assert sd["sharded"][0] == sd["sharded"][1] == sd["sharded"][2], sd["sharded"]


# ---- in-process tests: pure torch, the launcher's flags, Hugging Face's sdpa ---------------

def _explicit_lower_right(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # True = attend (SDPA's convention)


# (unmasked, causal) flash calls: one query sees every key: one unmasked call; a square block:
# one causal call; otherwise an unmasked past block and a causal diagonal block; 257-767 queries
# in slices of 256 (the CPU kernel's block sizes, iso_megatron/sdpa.py), 768 on in one piece
@pytest.mark.parametrize("sq,sk,calls", [(1, 9, (1, 0)), (5, 5, (0, 1)), (31, 100, (1, 1)),
                                         (64, 192, (1, 1)), (256, 256, (0, 1)),
                                         (300, 300, (1, 2)), (300, 1000, (2, 2)),
                                         (700, 900, (3, 3)), (768, 1000, (1, 1))])
@pytest.mark.parametrize("groups", [8, 2])
def test_causal_attention_by_blocks_matches_torch_with_a_mask(sq, sk, calls, groups):
    from iso_megatron.sdpa import causal_attention, causal_attention_by_blocks

    g = torch.Generator().manual_seed(sq * sk)
    q = torch.randn(2, 8, sq, 32, generator=g)
    k, v = (torch.randn(2, groups, sk, 32, generator=g) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(8 // groups, 1),
                                          v.repeat_interleave(8 // groups, 1),
                                          attn_mask=_explicit_lower_right(sq, sk), scale=0.2)
    with OpLog() as log:
        assert rel_err(causal_attention(q, k, v, 0.2), want) <= FP32_REL_TOL
    assert (len(log.flash(causal=False)), len(log.flash(causal=True))) == calls, log.ops
    assert not log.names() & {"_softmax", "bmm", "baddbmm", "tril", "triu"}, log.names()
    if sq < sk:
        assert rel_err(causal_attention_by_blocks(q, k, v, 0.2), want) <= FP32_REL_TOL


def test_lower_right_mask_is_built_once_per_shape_and_works_under_a_dispatch_mode():
    """The mask of the CUDA `lower_right` chunk path (torch's CausalBias) is built once per
    (queries, keys): torch builds one on an uninitialised [2, sq, sk] tensor, and cannot build
    one while a TorchDispatchMode is active (scripts/gpu_check.py's sync counter crashed on it
    on an H200: docs/gpu_results.md). The mask itself still means bottom-right causal."""
    from iso_megatron.sdpa import _lower_right, grouped_sdpa

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 5, 16, generator=g)
    k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                          attn_mask=_explicit_lower_right(5, 9))
    first = _lower_right(5, 9)
    with OpLog():
        mask = _lower_right(5, 9)
        got = grouped_sdpa(q, k, v, attn_mask=mask)
    assert mask is first
    assert rel_err(got, want) <= FP32_REL_TOL


def test_causal_attention_by_blocks_bf16():
    from iso_megatron.sdpa import causal_attention_by_blocks

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g).bfloat16() for n in (40, 120, 120))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          attn_mask=_explicit_lower_right(40, 120))
    got = causal_attention_by_blocks(q, k, v, 64 ** -0.5)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) <= BF16_REL_TOL


def test_bottom_right_marker_through_sdpa_and_huggingface():
    """The marker hf_autotp gives a later chunk: F.scaled_dot_product_attention and transformers'
    own sdpa attention function (GQA module) compute with it what an explicit mask gives."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from iso_megatron.sdpa import BottomRightCausal
    from iso_megatron.patches.hf_autotp import _chunk_mask

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 24, 16, generator=g)
    k, v = (torch.randn(2, 2, 60, 16, generator=g) for _ in range(2))
    explicit = _explicit_lower_right(24, 60)[None, None]
    marker = _chunk_mask(None, 36, 60)
    assert isinstance(marker, BottomRightCausal)
    assert _chunk_mask(None, 0, 36) is None  # chunk 0: sdpa's is_causal, as stock
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                          attn_mask=explicit, scale=0.25)
    got = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                         attn_mask=marker, scale=0.25)
    assert rel_err(got, want) <= FP32_REL_TOL
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    hf_want, _ = sdpa_attention_forward(module, q, k, v, explicit, scaling=0.25)
    with OpLog() as log:
        hf_got, _ = sdpa_attention_forward(module, q, k, v, marker, scaling=0.25)
    assert rel_err(hf_got, hf_want) <= FP32_REL_TOL
    assert len(log.flash(causal=False)) == 1 and not log.names() & {"tril", "triu", "_softmax"}
    mask = torch.zeros(2, 1, 60, 60, dtype=torch.bool)
    assert _chunk_mask(mask, 36, 60).shape == (2, 1, 24, 60)  # a caller's mask: sliced, as before
    with pytest.raises(ValueError, match="queries over"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=BottomRightCausal(23, 60), enable_gqa=True)


def _parse(argv):
    from iso_megatron.megatron import args as margs

    return margs.parse_args(lambda p: None, argv, margs.EMBEDDED_DEFAULT)[0]


def _core_attention(spec):
    return spec.submodules.self_attention.submodules.core_attention


@pytest.mark.parametrize("backend,cls", [("auto", "SDPAAttention"), ("flash", "SDPAAttention"),
                                         ("fused", "SDPAAttention"),
                                         ("unfused", "DotProductAttention"),
                                         ("local", "DotProductAttention")])
def test_attention_backend_flag_picks_the_core_attention(backend, cls):
    from megatron.core.transformer.enums import AttnBackend

    from iso_megatron.megatron import args as margs

    args = _parse(["--attention-backend", backend])
    assert _core_attention(margs.layer_spec(args)).__name__ == cls
    margs.complete_args(args, 1)
    args.tensor_model_parallel_size = 1
    args.padded_vocab_size = 256
    assert margs.transformer_config(args).attention_backend == AttnBackend[backend]


def test_attention_backend_default_and_checks():
    from iso_megatron.megatron import args as margs

    args = _parse([])
    assert args.attention_backend == "auto"  # Megatron-LM's default
    assert _core_attention(margs.layer_spec(args)).__name__ == "SDPAAttention"
    with pytest.raises(SystemExit):
        _parse(["--attention-backend", "sdpa"])  # not Megatron-LM's vocabulary
    args = _parse(["--attention-backend", "local", "--transformer-impl", "transformer_engine"])
    args.tensor_model_parallel_size = 1
    errors = margs.check_args(args, 1)
    assert any("--attention-backend local is only supported with --transformer-impl local" in e
               for e in errors), errors
    with pytest.raises(ValueError, match="--attention-backend local"):
        margs.layer_spec(args)


def test_rope_scaling_flags_reach_gpt_model_kwargs():
    from iso_megatron.megatron import args as margs

    args = _parse([])
    margs.complete_args(args, 1)
    kwargs = margs.gpt_model_kwargs(args)
    assert "rope_scaling" not in kwargs and kwargs["position_embedding_type"] == "rope"
    args = _parse(["--use-rope-scaling"])
    assert args.rope_scaling_factor == 8.0  # Megatron-LM's default
    args = _parse(["--use-rope-scaling", "--rope-scaling-factor", "16"])
    margs.complete_args(args, 1)
    kwargs = margs.gpt_model_kwargs(args)
    assert kwargs["rope_scaling"] is True and kwargs["rope_scaling_factor"] == 16.0
    assert kwargs["vocab_size"] == args.padded_vocab_size
    assert kwargs["share_embeddings_and_output_weights"] is False  # the embedded model is untied
    args = _parse(["--use-rope-scaling", "--position-embedding-type", "learned_absolute"])
    args.tensor_model_parallel_size = 1
    assert any("--use-rope-scaling needs --position-embedding-type rope" in e
               for e in margs.check_args(args, 1))


@pytest.mark.multiprocess
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: run on a GPU machine")
def test_cuda_fused_kernels_exact():
    res = run_ranks(1, "tests.test_attention:cuda_cases", timeout=300)[0]
    print(f"\n{res['device']} torch {res['torch']}: marker kernels {res['marker']['kernels']}")
    for c in res["units"]:
        print(c)
        assert c["err"] <= (FP32_REL_TOL if c["dtype"] == "torch.float32" else BF16_REL_TOL), c
    assert res["marker"]["err"] <= BF16_REL_TOL, res["marker"]
    assert not any("softmax" in k.lower() for k in res["marker"]["kernels"]), res["marker"]
