"""megatron-core version differences (iso_megatron/megatron/compat.py), each tested on the version
it concerns. CI runs the suite under 0.16.1 and 0.19.2 (scripts/test.sh), so every test here runs
where its difference exists and is skipped, saying so, where it does not."""

import importlib.metadata

import pytest
import torch

from tests.harness import run_ranks
from tests.ranks import FP32_REL_TOL, rel_err, setup_megatron

pytestmark = pytest.mark.multiprocess

MCORE = tuple(int(p) for p in importlib.metadata.version("megatron-core").split(".")[:2])
ONLY_019 = pytest.mark.skipif(MCORE < (0, 19), reason=f"a megatron-core 0.19 option; installed: "
                              f"{'.'.join(map(str, MCORE))} (CI runs this module under 0.19.2 too)")
SEQ = 40


def version_cases(tp: int):
    """Rank side: every difference on a llama-style model, ISO vs stock with identical weights."""
    from types import SimpleNamespace

    from iso_megatron import ISOConfig, apply_iso, causal_mask
    from iso_megatron.megatron.block import plan_forward
    from iso_megatron.megatron.generate import time_prefill
    from tests.cases_core import build_pair

    setup_megatron(tp)
    stock, iso = build_pair("llama", tp)
    apply_iso(iso, ISOConfig(min_tokens=0))
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3)).tolist()[0]
    out = {}

    # prefill logits for every position, also with megatron's process-wide InferenceMode on (0.19)
    try:
        from megatron.core.inference.utils import InferenceMode
        mode = InferenceMode.active
    except ImportError:  # 0.16: no such flag
        from contextlib import nullcontext as mode
    with mode():
        _, got = time_prefill(iso, ids)
        plan = iso.decoder.iso_plan
        _, ref = time_prefill(stock, ids)
    out["prefill_logits"] = dict(shape=tuple(got.shape), ref_shape=tuple(ref.shape),
                                 err=rel_err(got, ref), bounds=plan.bounds)
    if MCORE < (0, 19):
        return out

    x = torch.randn(SEQ, 1, stock.config.hidden_size, generator=torch.Generator().manual_seed(4))
    mask = causal_mask(SEQ)
    with torch.no_grad():
        want = stock.decoder(x, mask, extract_layer_indices={1})
        got = iso.decoder(x, mask, extract_layer_indices={1})
        out["extract_layer_indices"] = dict(
            types=(type(want).__name__, type(got).__name__), reason=iso.decoder.iso_plan.reason,
            err=max(rel_err(got[0], want[0]), *(rel_err(a, b) for a, b in zip(got[1], want[1]))),
            n=(len(got[1]), len(want[1])))
        iso.decoder(x, mask)  # control: the same call without the option runs ISO
        out["extract_control"] = iso.decoder.iso_plan.bounds

    stock_f, iso_f = build_pair("llama", tp, fused_residual_rmsnorm=True)
    apply_iso(iso_f, ISOConfig(min_tokens=0))
    with torch.no_grad():
        pos = torch.arange(SEQ)[None]
        t = torch.tensor([ids])
        out["fused_residual_rmsnorm"] = dict(
            equal=bool(torch.equal(iso_f(t, pos, mask), stock_f(t, pos, mask))),
            reason=iso_f.decoder.iso_plan.reason)

    # GTP needs its own rematerialisation process groups: the decision is checked on the config
    gtp = SimpleNamespace(**{**vars(stock.config), "gtp_weight_remat_size": 2})
    out["gtp"] = plan_forward(ISOConfig(min_tokens=0), gtp, False, x, {}, None).reason
    return out


@pytest.fixture(scope="module")
def cases():
    return run_ranks(2, version_cases, 2, timeout=300)


def test_prefill_logits_cover_every_position(cases):
    """0.19 would return the last position only once InferenceMode is on; ISO ran either way."""
    for rank in cases:
        c = rank["prefill_logits"]
        assert c["shape"] == c["ref_shape"] and c["shape"][0] == SEQ, c
        assert c["bounds"] is not None and c["err"] <= FP32_REL_TOL


@ONLY_019
def test_extract_layer_indices_returns_what_stock_returns(cases):
    for rank in cases:
        c = rank["extract_layer_indices"]
        assert c["types"] == ("tuple", "tuple") and c["n"] == (1, 1), c
        assert "extract_layer_indices" in c["reason"] and c["err"] == 0.0, c
        assert rank["extract_control"] is not None  # ISO runs when the option is absent


@ONLY_019
def test_fused_residual_rmsnorm_leaves_prefill_to_stock(cases):
    for rank in cases:
        c = rank["fused_residual_rmsnorm"]
        assert c["equal"] and "fused_residual_rmsnorm" in c["reason"], c


@ONLY_019
def test_gtp_weight_remat_steps_aside(cases):
    for rank in cases:
        assert "GTP" in rank["gtp"]
