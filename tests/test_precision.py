"""bf16 / fp16 as Megatron-LM runs them: megatron-core's own Float16Module around the model
(`iso_megatron.megatron.precision.float16_module`), through `apply_iso`, `generate`, checkpoint
loading, the launcher and the benchmark. On CPU: torch runs bf16 and fp16 matmuls there.

Tolerance, ISO vs stock in half precision. In fp32 the two differ only in summation order
(tests.ranks.FP32_REL_TOL). In bf16 (8 significant bits) every GEMM output, norm and residual
is rounded, and ISO may change where a rounding falls (a chunk's GEMM has fewer rows, so a kernel
may block its reduction differently; each chunk's all-reduce sums its own rows). ISO's result is
then another half-precision evaluation of the same fp32 function, as far from the fp32 result as
stock's is, e = rel_err(stock_half, fp32) measured on the same model and input; by the triangle
inequality the two half-precision results lie within 2e of each other: HALF_FACTOR = 2. Greedy
tokens must agree wherever the stock logits' top-2 margin exceeds twice the largest logit
difference that bound allows (2 x HALF_FACTOR x e x max|logit|): no rounding of that size can flip
them. `e` itself must be at least HALF_FLOOR of the dtype's eps: proof the model really computed in
half precision (an fp32 model is ~1e-7 from the reference).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import pytest
import torch

from tests.harness import run_ranks, run_torchrun
from tests.ranks import rel_err, setup_megatron

HALF_FACTOR = 2.0
HALF_FLOOR = 1 / 16  # of torch.finfo(dtype).eps: bf16 4.9e-4, fp16 6.1e-5 (measured e: 4e-3, 6e-4)
PROMPT_LEN = 131  # odd: the ISO chunks are unequal
DECODE_STEPS = 6
# the bf16 checkpoint matrix: torch_dist saved at TP 2 in fp32, both families, loaded with
# --bf16 at TP 2 and resharded to TP 1 (gpt: learned positions + LayerNorm + biases)
CKPT_FAMILIES, CKPT_FORMAT, CKPT_TP = ("gpt", "llama"), "torch_dist", 2
CKPT_MATRIX = [(family, load_tp) for family in CKPT_FAMILIES for load_tp in (2, 1)]


def margin_ok(stock_logits, bound_abs):
    """Positions [..., vocab] whose top-2 margin exceeds 2 x bound_abs (no flip possible)."""
    top2 = stock_logits.float().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > 2 * bound_abs


def greedy_agreement(tokens, stock_tokens, safe):
    """(whether `tokens` follow `stock_tokens` as far as they must, safe steps compared): each
    step's token must equal stock's while the sequences agree so far and that step's margin is
    safe; at a step with a small margin they may part, and nothing after it is comparable."""
    compared = 0
    for token, stock_token, ok in zip(tokens, stock_tokens, safe):
        if token != stock_token:
            return not ok, compared
        compared += bool(ok)
    return True, compared


# ---------------------------------------------------------------- rank side

def _models(family, dtype, state):
    """(stock, apply_iso-then-wrap, wrap-then-apply_iso) half-precision models holding `state`
    (an fp32 state dict), each as (wrapper, GPTModel)."""
    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.megatron.models import build_gpt, model_config
    from iso_megatron.megatron.precision import float16_module

    iso = ISOConfig(min_tokens=0, num_chunks=2, split="balanced")
    config = model_config(family, params_dtype=dtype)
    out = []
    for order in ("stock", "iso_then_wrap", "wrap_then_iso"):
        gpt = build_gpt(config, family=family).eval()
        gpt.load_state_dict(state)  # fp32 values rounded into the half-precision parameters
        if order == "iso_then_wrap":
            apply_iso(gpt, iso)
        wrapper = float16_module(gpt, config)
        if order == "wrap_then_iso":
            apply_iso(wrapper, iso)
        out.append((wrapper, gpt))
    return out


def _forward(model, ids):
    from iso_megatron import causal_mask

    s = ids.size(1)
    return model(ids, torch.arange(s)[None], causal_mask(s))


def _greedy_with_margins(wrapper, gpt, ids, steps):
    """Greedy tokens by `generate`, the logits each token was drawn from and the chunk bounds
    each forward ran (a forward hook on the wrapper: the prefill, then every decode step)."""
    from iso_megatron.megatron.generate import generate

    seen, bounds = [], []

    def hook(module, inputs, output):
        seen.append(output[0, -1].detach().clone())
        plan = getattr(gpt.decoder, "iso_plan", None)
        bounds.append(plan and plan.bounds)

    handle = wrapper.register_forward_hook(hook)
    try:
        gen = generate(wrapper, ids[0].tolist(), steps)
    finally:
        handle.remove()
    return gen, torch.stack(seen[:steps]), bounds


def half_case(family, tp, dtype):
    """ISO vs stock vs fp32 for one family at one TP size (TP 1: ISO plans as TP 2 over a group of
    one, `comm.stand_in_tp`, so its chunked path runs)."""
    from megatron.core.transformer.module import Float16Module

    from iso_megatron.comm import stand_in_tp
    from iso_megatron.megatron.models import build_gpt, model_config

    torch.manual_seed(1234)
    fp32 = build_gpt(model_config(family), family=family).eval()
    ids = torch.randint(0, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))
    models = _models(family, dtype, fp32.state_dict())
    rec = dict(family=family, tp=tp, dtype=str(dtype))
    with torch.no_grad(), (stand_in_tp(2) if tp == 1 else nullcontext()):
        ref = _forward(fp32, ids)
        logits = {}
        for (wrapper, gpt), name in zip(models, ("stock", "iso_then_wrap", "wrap_then_iso")):
            logits[name] = _forward(wrapper, ids)
            rec[f"{name}_bounds"] = getattr(gpt.decoder, "iso_plan", None) and gpt.decoder.iso_plan.bounds
            rec[f"{name}_is_float16module"] = type(wrapper) is Float16Module
            rec[f"{name}_param_dtypes"] = sorted({str(p.dtype) for p in wrapper.parameters()})
        rec["logits_dtype"] = str(logits["iso_then_wrap"].dtype)
        rec["named_dtypes"] = {n: str(p.dtype) for n, p in models[1][0].named_parameters()
                               if "position_embeddings" in n or "norm" in n}
        rec["e_half"] = rel_err(logits["stock"], ref)
        for name in ("iso_then_wrap", "wrap_then_iso"):
            rec[f"e_{name}"] = rel_err(logits[name], logits["stock"])
            rec[f"e_{name}_fp32"] = rel_err(logits[name], ref)
        bound = HALF_FACTOR * rec["e_half"] * logits["stock"].abs().max()
        safe = margin_ok(logits["stock"], bound)
        rec["safe_positions"] = int(safe.sum())
        rec["argmax_agree_where_safe"] = bool(
            (logits["iso_then_wrap"].argmax(-1) == logits["stock"].argmax(-1))[safe].all())
        # generate() through the wrapper: fp32 logits, the same greedy tokens where margins allow
        gen_stock, step_logits, _ = _greedy_with_margins(*models[0], ids, DECODE_STEPS)
        gen_iso, _, rec["generate_bounds"] = _greedy_with_margins(*models[1], ids, DECODE_STEPS)
        rec["gen_logits_dtype"] = str(gen_iso.prefill_logits.dtype)
        rec["e_gen_prefill"] = rel_err(gen_iso.prefill_logits, gen_stock.prefill_logits)
        step_bound = HALF_FACTOR * rec["e_half"] * step_logits.abs().amax(-1)
        rec["step_safe"] = margin_ok(step_logits, step_bound).tolist()
        rec["gen_tokens"] = (gen_iso.generated_token_ids, gen_stock.generated_token_ids)
    return rec


def _greedy_reference(model, prompt, steps):
    """Greedy tokens by full recompute, and each step's logits (for margins)."""
    from tests.ckpt_fixtures import forward

    ids, tokens, steps_logits = prompt.clone(), [], []
    logits = forward(model, ids).float()
    first = logits
    for _ in range(steps):
        last = logits[0, -1]
        steps_logits.append(last)
        tokens.append(int(last.argmax()))
        ids = torch.cat([ids, last.argmax().view(1, 1)], 1)
        logits = forward(model, ids).float()
    return dict(logits=first, tokens=tokens, step_logits=torch.stack(steps_logits))


def checkpoint_case(family, directory):
    """An fp32 checkpoint saved the way Megatron-LM saves it, and two references for loading it
    in bf16: fp32 itself and stock megatron-core in bf16 (Megatron-LM's get_model: params_dtype
    bf16, then megatron-core's Float16Module, used here directly)."""
    from megatron.core.transformer.module import Float16Module

    from tests.ckpt_fixtures import PROMPT, STEPS, build_stock, forward, make_checkpoint

    ref32 = make_checkpoint(CKPT_FORMAT, family, CKPT_TP, directory)
    fp32 = build_stock(family)  # the same seed: the model just saved
    half = build_stock(family, params_dtype=torch.bfloat16)
    half.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        ref16 = _greedy_reference(Float16Module(half.config, half).eval(), PROMPT, STEPS)
        rebuilt = torch.equal(forward(fp32, PROMPT).float(), ref32["logits"])
    return dict(rebuilt_is_saved=rebuilt, ref32=ref32["logits"][0], ref32_tokens=ref32["tokens"],
                ref16=ref16["logits"][0], ref16_tokens=ref16["tokens"],
                ref16_step_logits=ref16["step_logits"])


def bench_case():
    """launch/bench.py's model in bf16 (gpt family: learned positions, which fail unwrapped) and
    in fp32, the same seed: ISO vs stock through the bench's own forward, over real gloo TP 2."""
    from megatron.core import parallel_state

    from launch.bench import Bench, parse_args

    tiny = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "160", "--family", "gpt",
            "--link", "real", "--seq-lens", "96", "--iso-chunks", "2"]
    out = {}
    for name, flags in (("bf16", ["--bf16"]), ("fp32", [])):
        parallel_state.destroy_model_parallel()
        bench = Bench(parse_args(tiny + flags), torch.distributed.get_rank(), 2)
        fwd = bench.inputs(96)
        with torch.no_grad(), bench.over(None):
            bench.set_iso(None)
            out[f"{name}_stock"] = fwd()
            bench.set_iso(bench.iso_config("even"))
            out[f"{name}_iso"] = fwd()
            out[f"{name}_bounds"] = bench.ran()
        out[f"{name}_wrapper"] = type(bench.model).__name__
        out[f"{name}_param_dtypes"] = bench.param_dtypes
    return dict(wrapper=out["bf16_wrapper"], param_dtypes=out["bf16_param_dtypes"],
                fp32_param_dtypes=out["fp32_param_dtypes"], bounds=out["bf16_bounds"],
                logits_dtype=str(out["bf16_iso"].dtype),
                e_half=rel_err(out["bf16_stock"], out["fp32_stock"]),
                e_iso=rel_err(out["bf16_iso"], out["bf16_stock"]))


def precision_group(ckpt_dir):
    """Every in-process case, one start of two ranks."""
    recs = []
    for tp in (1, 2):
        setup_megatron(tp)
        for family in ("gpt", "llama"):
            recs.append(half_case(family, tp, torch.bfloat16))
    recs.append(half_case("llama", 2, torch.float16))
    return dict(cases=recs, bench=bench_case(),
                checkpoints={family: checkpoint_case(family, os.path.join(ckpt_dir, family))
                             for family in CKPT_FAMILIES})


# ---------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def group(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fp32ckpt")
    out = run_ranks(2, precision_group, str(ckpt), timeout=400)
    return dict(out[0], ckpt_dir=str(ckpt))


def _case(group, family, tp, dtype=torch.bfloat16):
    return next(r for r in group["cases"] if (r["family"], r["tp"], r["dtype"]) == (family, tp, str(dtype)))


HALF_CASES = [("gpt", 1, torch.bfloat16), ("llama", 1, torch.bfloat16), ("gpt", 2, torch.bfloat16),
              ("llama", 2, torch.bfloat16), ("llama", 2, torch.float16)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("family,tp,dtype", HALF_CASES,
                         ids=[f"{f}-tp{t}-{str(d)[6:]}" for f, t, d in HALF_CASES])
def test_iso_matches_stock_in_half_precision(group, family, tp, dtype):
    r = _case(group, family, tp, dtype)
    assert r["e_half"] >= HALF_FLOOR * torch.finfo(dtype).eps, r["e_half"]  # half precision ran
    for order in ("iso_then_wrap", "wrap_then_iso"):
        assert r[f"{order}_bounds"] is not None, order  # ISO split the prompt
        assert r[f"e_{order}"] <= HALF_FACTOR * r["e_half"], (order, r[f"e_{order}"], r["e_half"])
    assert r["stock_bounds"] is None
    assert r["safe_positions"] >= PROMPT_LEN // 2  # the token check below is not vacuous
    assert r["argmax_agree_where_safe"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("family,tp,dtype", HALF_CASES,
                         ids=[f"{f}-tp{t}-{str(d)[6:]}" for f, t, d in HALF_CASES])
def test_float16module_casts_everything_and_returns_fp32(group, family, tp, dtype):
    r = _case(group, family, tp, dtype)
    for order in ("stock", "iso_then_wrap", "wrap_then_iso"):
        assert r[f"{order}_is_float16module"], order  # megatron-core's own class
        assert r[f"{order}_param_dtypes"] == [str(dtype)], (order, r[f"{order}_param_dtypes"])
    # what megatron-core builds in fp32 whatever params_dtype says is half precision inside too
    names = r["named_dtypes"]
    assert any("layernorm" in n for n in names) and all(d == str(dtype) for d in names.values()), names
    if family == "gpt":
        assert "module.embedding.position_embeddings.weight" in names
    assert r["logits_dtype"] == r["gen_logits_dtype"] == "torch.float32"


@pytest.mark.multiprocess
@pytest.mark.parametrize("family,tp", [("gpt", 1), ("llama", 1), ("gpt", 2), ("llama", 2)])
def test_generate_through_the_wrapper(group, family, tp):
    r = _case(group, family, tp)
    prefill_bounds, *decode_bounds = r["generate_bounds"]
    assert prefill_bounds is not None  # generate's prefill ran ISO through the wrapper ...
    assert decode_bounds and all(b is None for b in decode_bounds)  # ... and decode stock
    assert r["e_gen_prefill"] <= HALF_FACTOR * r["e_half"]
    iso, stock = r["gen_tokens"]
    assert len(iso) == len(stock) == DECODE_STEPS
    agree, compared = greedy_agreement(iso, stock, r["step_safe"])
    assert agree, (iso, stock, r["step_safe"])
    assert compared >= 1, "no step had a margin above the tolerance"


@pytest.mark.multiprocess
def test_benchmark_runs_megatrons_bf16_model(group):
    b = group["bench"]
    assert b["wrapper"] == "Float16Module" and b["param_dtypes"] == ["bfloat16"]
    assert b["fp32_param_dtypes"] == ["float32"]
    assert b["bounds"] == [0, 48, 96] and b["logits_dtype"] == "torch.float32"
    assert b["e_half"] >= HALF_FLOOR * torch.finfo(torch.bfloat16).eps
    assert b["e_iso"] <= HALF_FACTOR * b["e_half"]


# ---------------------------------------------------------------- the launcher, end to end

@pytest.mark.multiprocess
def test_launcher_bf16_learned_positions_stock(tmp_path):
    # the command that failed with "expected m1 and m2 to have the same dtype" (the learned
    # position table stayed fp32 next to bf16 linears)
    out = tmp_path / "out.json"
    rc, log = run_torchrun(2, ["launch/infer.py", "--bf16", "--no-iso", "--position-embedding-type",
                               "learned_absolute", "--num-tokens-to-generate", "4",
                               "--output-json", str(out)], timeout=300)
    assert rc == 0, log[-3000:]
    rec = json.loads(out.read_text())
    assert rec["precision"] == "bf16" and rec["iso_chunk_bounds"] is None
    assert len(rec["generated_token_ids"]) == 4
    assert "precision=bf16" in log


@pytest.mark.multiprocess
@pytest.mark.parametrize("family,load_tp", CKPT_MATRIX, ids=[f"{f}-tp{CKPT_TP}to{t}" for f, t in CKPT_MATRIX])
def test_launcher_loads_an_fp32_checkpoint_in_bf16(group, tmp_path, family, load_tp):
    from tests.ckpt_fixtures import PROMPT, STEPS

    ref = group["checkpoints"][family]
    assert ref["rebuilt_is_saved"]  # the bf16 reference holds the weights that were saved
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    rc, log = run_torchrun(load_tp, [
        "launch/infer.py", "--load", os.path.join(group["ckpt_dir"], family), "--use-checkpoint-args",
        "--bf16",
        "--prompt-token-ids", ",".join(map(str, PROMPT[0].tolist())),
        "--num-tokens-to-generate", str(STEPS), "--iso-min-tokens", "0", "--compare-baseline",
        "--timing-repeats", "1", "--output-json", str(out_json), "--save-logits", str(out_logits)],
        timeout=300)
    assert rc == 0, log[-4000:]
    rec = json.loads(out_json.read_text())
    assert rec["precision"] == "bf16"  # --bf16 wins over the checkpoint's stored bf16=False
    assert (rec["iso_chunk_bounds"] is not None) == (load_tp > 1)  # ISO ran wherever it can
    e_half = rel_err(ref["ref16"], ref["ref32"])
    assert e_half >= HALF_FLOOR * torch.finfo(torch.bfloat16).eps
    iso = torch.load(out_logits)[0]
    assert rel_err(iso, ref["ref16"]) <= HALF_FACTOR * e_half  # vs Megatron-LM's stock bf16
    assert rec["max_rel_logit_diff"] <= HALF_FACTOR * e_half  # vs the launcher's own stock
    bound = HALF_FACTOR * e_half * ref["ref16_step_logits"].abs().amax(-1)
    safe = margin_ok(ref["ref16_step_logits"], bound).tolist()
    agree, compared = greedy_agreement(rec["generated_token_ids"], ref["ref16_tokens"], safe)
    assert agree, (rec["generated_token_ids"], ref["ref16_tokens"], safe)
    assert compared >= 1


# ---------------------------------------------------------------- no ranks

def test_float16_module_is_megatrons_and_checks_the_config():
    from megatron.core.transformer.module import Float16Module

    from iso_megatron.megatron.models import model_config
    from iso_megatron.megatron.precision import float16_module

    fp32 = torch.nn.Linear(4, 4)
    assert float16_module(fp32, model_config("gpt")) is fp32  # fp32: no wrapper
    cfg = model_config("gpt", params_dtype=torch.bfloat16)
    wrapped = float16_module(torch.nn.Linear(4, 4).eval(), cfg)
    assert type(wrapped) is Float16Module and wrapped.module.weight.dtype == torch.bfloat16
    assert not wrapped.training  # the model's eval mode, not a new module's train mode
    assert float16_module(wrapped, cfg) is wrapped  # idempotent
    with pytest.raises(ValueError, match="already wrapped for bf16"):
        float16_module(wrapped, model_config("gpt", params_dtype=torch.float16))
    bad = [(dict(bf16=True), "config.bf16 is set but config.params_dtype is torch.float32"),
           (dict(params_dtype=torch.float16, fp16=False), "config.fp16 is not set"),
           (dict(params_dtype=torch.bfloat16, fp16=True, bf16=False), "config.fp16 is set but")]
    both = model_config("gpt", params_dtype=torch.bfloat16)
    both.fp16 = True  # TransformerConfig refuses both at construction; a config changed after
    for config, message in [(model_config("gpt", **o), m) for o, m in bad] + [(both, "mutually exclusive")]:
        with pytest.raises(ValueError, match=message):
            float16_module(torch.nn.Linear(4, 4), config)


def test_deepspeed_dtype_must_match_the_precision_flags(tmp_path, monkeypatch, capsys):
    from launch import infer

    monkeypatch.setenv("WORLD_SIZE", "1")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"dtype": "fp32"}))
    with pytest.raises(SystemExit) as e:
        infer.prepare_args(["--bf16", "--deepspeed", "--deepspeed-config", str(ds)])
    assert e.value.code == 2
    assert "\"dtype\" is 'fp32' but the model runs bf16" in capsys.readouterr().err
    ds.write_text(json.dumps({"dtype": "bfloat16"}))
    args, _ = infer.prepare_args(["--bf16", "--deepspeed", "--deepspeed-config", str(ds)])
    assert args.bf16 and not args.fp16
