"""ISO core against stock megatron-core, on real tensor-parallel ranks (gloo, CPU).

Each module-scoped fixture starts the ranks once and runs a whole matrix of cases in them;
the tests then check every case. Tolerance: fp32, max relative error <= 1e-5.
"""

import pytest

from tests.harness import run_ranks
from tests.ranks import FP32_REL_TOL as TOL

pytestmark = pytest.mark.multiprocess
SEQ_LENS = [1, 2, 3, 7, 13, 31, 64, 521]  # short, odd, prime, and >= 512
BATCHES = [1, 2]
CHUNKS = [2, 3, 4]
SPLITS = ["even", "balanced"]
GROUPS = [(f, tp) for f in ("gpt", "llama") for tp in (1, 2, 4)]


@pytest.fixture(scope="module", params=GROUPS, ids=[f"{f}-tp{tp}" for f, tp in GROUPS])
def logits_group(request):
    family, tp = request.param
    results = run_ranks(tp, "tests.cases_core:logits_matrix", family, tp, SEQ_LENS, BATCHES,
                        CHUNKS, SPLITS, timeout=600)
    return family, tp, results


def test_logits_match_stock(logits_group):
    family, tp, results = logits_group
    cases = [c for rank in results for c in rank]
    assert len(cases) == tp * len(SEQ_LENS) * len(BATCHES) * len(CHUNKS) * len(SPLITS)
    bad = [c for c in cases if not c["err"] <= TOL]
    assert not bad, f"{family} tp{tp}: {len(bad)} cases over {TOL}: {bad[:5]}"
    for c in cases:  # ISO really ran (min(K, s) chunks) wherever it can: TP >= 2, s >= 2
        want = min(c["k"], c["seq"]) + 1 if tp > 1 and c["seq"] > 1 else None
        assert (None if c["bounds"] is None else len(c["bounds"])) == want, c
    worst = max(c["err"] for c in cases)
    print(f"\n{family} tp{tp}: largest logit relative error {worst:.3g} over {len(cases)} rank-cases")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_kv_cache_and_greedy_decode_match_stock(family):
    results = run_ranks(2, "tests.cases_core:kv_and_decode", family, 2, [5, 64, 517], [1, 2],
                        [2, 3], timeout=600)
    for rank, cases in enumerate(results):
        assert len(cases) == 12
        for c in cases:
            assert c["same_layers"], c
            assert len(c["bounds"]) == c["k"] + 1, c  # the prefill ran ISO
            assert c["kv_err"] <= TOL, c
            assert c["logit_err"] <= TOL, c
            assert c["tokens"] == c["ref_tokens"], c
            assert len(c["tokens"][0]) == 8


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_state_dicts_interchange(family):
    for rank in run_ranks(2, "tests.cases_core:state_dicts", family, 2, timeout=300):
        for path in ("spec", "apply_iso"):
            assert rank[path] == dict(same_keys=True, same_shapes=True, same_params=True,
                                      same_sharded_keys=True), (path, rank[path])


def _check_order(events, num_layers, num_chunks):
    """Each async all-reduce is issued right after its compute, before the next compute, and
    waited only after that next compute; each wait comes before the compute that needs it."""
    events = events[events.index(("decoder_begin",)) + 1:events.index(("decoder_end",))]
    seen = {}
    computes = []  # (index in events, layer, part, chunk)
    issue_of = {}  # reduce id -> (layer, part, chunk)
    for i, e in enumerate(events):
        if e[0] == "compute":
            _, layer, part, _len = e
            chunk = seen.get((layer, part), 0)
            seen[(layer, part)] = chunk + 1
            computes.append((i, layer, part, chunk))
        elif e[0] == "issue":
            last = computes[-1]
            assert last[0] == i - 1, f"reduce {e} not issued right after a compute"
            issue_of[e[1]] = (last[1:], i)
        assert e[0] != "sync", f"synchronous all-reduce during ISO prefill: {e}"
    assert len(issue_of) == 2 * num_layers * num_chunks
    wait_at = {e[1]: i for i, e in enumerate(events) if e[0] == "wait"}
    assert set(wait_at) == set(issue_of)
    compute_at = {c[1:]: c[0] for c in computes}
    for rid, ((layer, part, chunk), issued_at) in issue_of.items():
        following = [c for c in computes if c[0] > issued_at]
        if following:  # the last reduce of the prefill has nothing left to overlap
            assert following[0][0] < wait_at[rid], f"{(layer, part, chunk)} waited before any compute"
        consumer = (layer, "mlp", chunk) if part == "attn" else (layer + 1, "attn", chunk)
        if consumer in compute_at:
            assert wait_at[rid] < compute_at[consumer], f"{consumer} computed before its input's reduce"
        if part == "mlp" and chunk == num_chunks - 1 and layer < num_layers:
            # across the layer boundary: next layer's first attention runs while it is in flight
            assert issued_at < compute_at[(layer + 1, "attn", 0)] < wait_at[rid]


@pytest.mark.parametrize("num_chunks", [2, 3])
def test_overlap_order_is_structural(num_chunks):
    for events in run_ranks(2, "tests.cases_core:event_order", "llama", 2, 37, num_chunks, timeout=300):
        _check_order(events, num_layers=2, num_chunks=num_chunks)


def test_order_checker_rejects_a_sequential_trace():
    # the checker above must fail on stock-like ordering (reduce waited before the next compute)
    seq = [("decoder_begin",)]
    rid = 0
    for layer in (1, 2):
        for part in ("attn", "mlp"):
            for chunk in (0, 1):
                seq += [("compute", layer, part, 4), ("issue", rid), ("wait", rid)]
                rid += 1
    seq.append(("decoder_end",))
    with pytest.raises(AssertionError):
        _check_order(seq, 2, 2)


@pytest.mark.parametrize("tp", [2, 4])
def test_bad_inputs_raise_clear_errors_on_every_rank(tp):
    expected = {
        "sequence_parallel": "sequence_parallel",
        "attention_backend": "unsupported attention backend MyAttention",
        # megatron's TransformerConfig or ISO's own check, whichever sees it first
        "heads": "num_attention_heads (6)",
        "query_groups": "num_query_groups (3)",
        "heads_config_unaware": "num_attention_heads (6) is not divisible by the tensor-parallel size (4)",
        "num_chunks": "num_chunks must be >= 1",
        "fractions": "must sum to 1",
        "fraction_count": "2 fractions but num_chunks is 3",
        "split_name": "split must be 'even', 'balanced'",
        "apply_iso_target": "no megatron-core TransformerBlock",
    }
    if tp == 2:  # 6 heads divide evenly at TP 2
        expected.pop("heads")
        expected.pop("heads_config_unaware")
    results = run_ranks(tp, "tests.cases_core:bad_inputs", tp, timeout=300)
    assert len(results) == tp
    for rank in results:
        assert rank["alive"] == tp
        for name, text in expected.items():
            assert rank[name] is not None and text in rank[name], (name, rank[name])


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_steps_aside_where_iso_cannot_help(family):
    for rank in run_ranks(2, "tests.cases_core:steps_aside", family, 2, timeout=300):
        # the block records why it stepped aside (a stock block records nothing)
        why = {"short_prompt": "shorter than min_tokens", "one_chunk": "num_chunks=1",
               "training": "training", "disabled": None}
        for name, reason in why.items():
            case = rank[name]
            assert case["equal"] and case["async_reduces"] == 0, (name, case)
            if reason is None:
                assert case["plan"] is None, case
            else:
                assert case["plan"].bounds is None and reason in case["plan"].reason, (name, case)
        control = rank["iso_control"]
        assert control["equal"] and control["async_reduces"] == 8 and len(control["plan"].bounds) == 3
        assert rank["stock_classes"]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_bf16_and_per_sample_masks(family):
    for rank in run_ranks(2, "tests.cases_core:variants", family, 2, timeout=300):
        assert rank["per_sample_mask"]["err"] <= TOL and len(rank["per_sample_mask"]["bounds"]) == 4
        assert rank["bf16"]["dtype"] == "torch.bfloat16" and len(rank["bf16"]["bounds"]) == 3
        assert rank["bf16"]["err"] <= 2e-2, rank["bf16"]  # bf16 rounding of differently sized GEMMs


def test_spec_built_model_without_apply_iso():
    for rank in run_ranks(2, "tests.cases_core:spec_only_path", "llama", 2, 29, timeout=300):
        assert rank["block"] == "TransformerBlock"
        assert rank["err"] <= TOL
        assert rank["async_reduces"] == 2 * 2 * 2  # layers x parts x chunks
        assert all(p.bounds is not None and p.bounds[-1] == 29 for p in rank["layer_plans"])


def _have_te():
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except (ImportError, RuntimeError):
        return False
    return HAVE_TE


@pytest.mark.skipif(not _have_te(), reason="Transformer Engine needs CUDA; not installed on CPU machines")
def test_transformer_engine_spec_is_accepted():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TERowParallelLinear
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from iso_megatron import get_gpt_layer_iso_spec

    spec = get_gpt_layer_iso_spec(get_gpt_layer_with_transformer_engine_spec())
    attn = spec.submodules.self_attention.submodules
    assert issubclass(attn.linear_proj, TERowParallelLinear) and attn.linear_proj is not TERowParallelLinear
    assert issubclass(attn.core_attention, TEDotProductAttention)
    assert spec.submodules.mlp.submodules.linear_fc2 is not TERowParallelLinear
