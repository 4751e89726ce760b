"""The families people serve with DeepSpeed AutoTP under the "iso" flag (gloo ranks, CPU):
GPT-NeoX/Pythia (parallel and sequential residual), GPT-J, Falcon (7B layout, new decoder
architecture, sequential), Phi.

References: the same seeded tiny model run by transformers in one process, and DeepSpeed AutoTP
without ISO. Parallel-residual layers reduce attention and MLP together: ONE async all-reduce per
layer per chunk (stock AutoTP: two synchronous ones per layer). One rank start per TP size.
"""

import pytest

from tests.cases_deepspeed_families import FAMILIES, LAYERS, NEW_TOKENS
from tests.harness import run_ranks
from tests.ranks import FP32_REL_TOL

pytestmark = pytest.mark.multiprocess

TOL = FP32_REL_TOL
SEQ_LENS = [1, 7, 257]  # one token (ISO steps aside), odd, >= 256
CHUNKS = [2, 3]
TP4_FAMILIES = ["pythia", "falcon-new"]  # the 4-rank smoke subset (4 processes on 2 cores)
TP4_SEQ_LENS = [1, 257]


@pytest.fixture(scope="module")
def tp2():
    (rank0, rank1) = run_ranks(2, "tests.cases_deepspeed_families:families_suite", 2, list(FAMILIES),
                               SEQ_LENS, CHUNKS, True, timeout=400)
    return [rank0, rank1]


@pytest.fixture(scope="module")
def tp4():
    return run_ranks(4, "tests.cases_deepspeed_families:tp4_suite", TP4_FAMILIES, TP4_SEQ_LENS, CHUNKS,
                     timeout=400)


@pytest.fixture(params=[2, 4], ids=["tp2", "tp4"])
def matrix(request):
    results = request.getfixturevalue(f"tp{request.param}")
    return request.param, [c for rank in results for c in rank["matrix"]]


def _reduces_per_layer_chunk(family):
    return 1 if FAMILIES[family][0] else 2


def test_logits_match_transformers_and_stock_deepspeed(matrix):
    tp, cases = matrix
    families = list(FAMILIES) if tp == 2 else TP4_FAMILIES
    seq_lens = SEQ_LENS if tp == 2 else TP4_SEQ_LENS
    assert len(cases) == tp * len(families) * len(seq_lens) * len(CHUNKS)
    worst = {}
    for c in cases:
        assert c["stock_err_ref"] <= TOL, c  # stock AutoTP is right for this family
        assert c["err_ref"] <= TOL, c
        assert c["err_ds"] <= TOL, c
        worst[c["family"]] = max(worst.get(c["family"], 0.0), c["err_ref"], c["err_ds"])
    print(f"\ntp{tp} largest logit rel. error (DS+ISO vs transformers / vs DS stock): "
          + ", ".join(f"{f} {e:.2g}" for f, e in worst.items()))


def test_greedy_tokens_and_kv_cache_match(matrix):
    tp, cases = matrix
    for c in cases:
        assert c["tokens"] == c["ref_tokens"] == c["stock_tokens"], c["family"]
        assert len(c["tokens"][0]) == c["seq"] + NEW_TOKENS
        assert c["kv_layers"] == (LAYERS, LAYERS)
        assert c["kv_err"] <= TOL, c


def test_iso_ran_with_one_reduce_per_layer_chunk_for_parallel_residual(matrix):
    """Async all-reduces in one prefill: layers x chunks for parallel residual, twice that for
    sequential; none in decode; DeepSpeed's synchronous one only for the lm_head meanwhile."""
    tp, cases = matrix
    counts = {}
    for c in cases:
        if c["seq"] < 2:
            assert c["bounds"] is None and c["fwd_async"] == 0, c
            assert c["fwd_sync"] == 2 * LAYERS + 1, c  # stock AutoTP: two per layer + lm_head
            continue
        k = len(c["bounds"]) - 1
        assert k == c["k"], c  # ISO split as asked
        expect = _reduces_per_layer_chunk(c["family"]) * LAYERS * k
        assert c["fwd_async"] == expect, c
        assert c["gen_async"] == expect, c  # generate: ISO prefill, stock decode
        assert c["fwd_sync"] == 1, c
        if c["seq"] >= 257:
            counts[(c["family"], k)] = c["fwd_async"]
    print(f"\ntp{tp} async all-reduces per {max(SEQ_LENS)}-token prefill ({LAYERS} layers; stock AutoTP "
          f"does {2 * LAYERS} synchronous): " + ", ".join(f"{f} K={k}: {n}" for (f, k), n in counts.items()))


def test_padded_batches_equal_stock_on_every_real_position(tp2):
    """Left padding + attention_mask, batch 1-4: ISO ran (it is not stepping aside here) and
    equals stock DeepSpeed and transformers on every real position; generate() tokens equal."""
    for rank in tp2:
        for fam, batches in rank["padded"].items():
            assert sorted(batches) == [1, 2, 3, 4]
            for batch, r in batches.items():
                assert r["bounds"] is not None, (fam, batch, r["reason"])
                assert r["async_ops"] == _reduces_per_layer_chunk(fam) * LAYERS * 2, (fam, batch)
                assert r["err_ref"] <= TOL and r["err_ds"] <= TOL, (fam, batch, r)
                assert r["tokens"] == r["ref_tokens"] == r["stock_tokens"], (fam, batch)


# bf16 has an 8-bit significand (unit roundoff u = 2**-8). ISO and stock DeepSpeed compute the
# same products and differ only in the order of sums: the chunked GEMMs, and for parallel residual
# the attention and MLP partial sums added before (not after) the all-reduce; each reordered sum
# rounds differently by a few u. So ISO must be as close to the fp32 truth (transformers) as stock
# bf16 is, with a factor 2 and 4 u of slack for two independent rounding paths, and within 8 u
# (relative to the largest logit) of stock itself: 2 layers, each with two rounded residual adds.
BF16_U = 2.0 ** -8


def test_bf16_iso_matches_stock_deepspeed(tp2):
    worst = {}
    for rank in tp2:
        for fam, r in rank["bf16"].items():
            assert r["rejected"] is None, r
            assert r["dtype"] == "torch.bfloat16"
            assert r["bounds"] is not None, r["reason"]
            assert r["async_ops"] == _reduces_per_layer_chunk(fam) * LAYERS * 2
            assert r["err_ds"] <= 8 * BF16_U, (fam, r)
            assert r["iso_err_ref"] <= 2 * r["stock_err_ref"] + 4 * BF16_U, (fam, r)
            worst[fam] = max(worst.get(fam, 0.0), r["err_ds"])
    print("\nbf16 largest logit rel. error, DS+ISO vs DS stock: "
          + ", ".join(f"{f} {e:.2g}" for f, e in worst.items()))


def test_fp16_iso_matches_stock_deepspeed(tp2):
    for rank in tp2:
        for fam, r in rank["fp16"].items():
            if r["rejected"]:
                assert "not supported" in r["rejected"]
                pytest.skip(f"DeepSpeed's CPU accelerator rejects fp16 on this CPU (no avx512_fp16 / "
                            f"amx_fp16): {r['rejected']}")
            fp16_u = 2.0 ** -11
            assert r["bounds"] is not None, r["reason"]
            assert r["err_ds"] <= 8 * fp16_u, (fam, r)
            assert r["iso_err_ref"] <= 2 * r["stock_err_ref"] + 4 * fp16_u, (fam, r)


def test_refused_where_stock_deepspeed_is_wrong_and_for_injection(tp2):
    for rank in tp2:
        r = rank["refusals"]
        assert r["falcon7b_stock"] is not None  # stock AutoTP cannot run Falcon-7B's multi-query QKV
        assert "multi-query" in r["falcon7b_iso"] and "Falcon-7B" in r["falcon7b_iso"], r
        assert "ALiBi" in r["falcon_alibi"], r
        assert "replace_with_kernel_inject" in r["kernel_inject"], r
        assert "injection_policy" in r["injection_policy"], r


def test_tp_group_smaller_than_world_is_reduced_on_its_group(tp4):
    """World 4, TP 2 on ranks 0-1: DeepSpeed's shm all-reduce would sum over all 4 ranks; the
    patch routes those reduces to the TP group, and ISO's own reduces use the group."""
    members = [r["sub"] for r in tp4 if r["sub"]["member"]]
    assert len(members) == 2
    for r in members:
        assert r["group_size"] == 2 and r["world"] == 4
        assert r["bounds"] is not None
        assert r["async_ops"] == LAYERS * 2  # pythia: one reduce per layer chunk
        assert r["err_ref"] <= TOL, r
        assert r["tokens"] == r["ref_tokens"]
        assert r["routed"] == (r["shm_level"] >= 1), r  # where the shm kernel is live, it was bypassed
