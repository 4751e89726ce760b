"""The DeepSpeed "iso" flag on real tensor-parallel ranks (gloo, CPU).

HF models: DeepSpeed AutoTP + ISO against transformers in one process (same seeded tiny model)
and against DeepSpeed without ISO; fp32, max relative error <= 1e-5; greedy tokens identical.
The ranks start without LOCAL_SIZE, as under torchrun (the patch must restore it).
Each module-scoped fixture starts its ranks once and runs all its cases there.
"""

import json

import pytest

from tests.harness import run_ranks, run_torchrun
from tests.ranks import FP32_REL_TOL

pytestmark = pytest.mark.multiprocess

TOL = FP32_REL_TOL
FAMILIES = ["llama", "mistral", "qwen2", "opt", "llama-eager", "opt-postln"]
SEQ_LENS = [1, 7, 257]  # one token (ISO steps aside), odd, >= 256
CHUNKS = [2, 3]
LAYERS = 2


def _suite(tp, extras):
    return run_ranks(tp, "tests.cases_deepspeed:hf_suite", tp, FAMILIES, SEQ_LENS, CHUNKS, extras,
                     timeout=300)


@pytest.fixture(scope="module")
def hf2():
    return _suite(2, True)


@pytest.fixture(scope="module")
def hf4():
    return _suite(4, False)


@pytest.fixture(params=[2, 4], ids=["tp2", "tp4"])
def hf(request):
    return request.param, request.getfixturevalue(f"hf{request.param}")


def _cases(results):
    return [c for rank in results for c in rank["matrix"]]


def test_logits_match_transformers_and_stock_deepspeed(hf):
    tp, results = hf
    cases = _cases(results)
    assert len(cases) == tp * len(FAMILIES) * len(SEQ_LENS) * len(CHUNKS)
    for c in cases:
        assert c["err_ref"] <= TOL, c
        assert c["err_ds"] <= TOL, c
        assert c["stock_err_ref"] <= TOL, c
    worst = {}
    for c in cases:
        worst[c["family"]] = max(worst.get(c["family"], 0.0), c["err_ref"], c["err_ds"])
    print(f"\ntp{tp} largest logit rel. error (DS+ISO vs transformers / vs DS stock): "
          + ", ".join(f"{f} {e:.2g}" for f, e in worst.items()))


def test_greedy_tokens_and_kv_cache_match(hf):
    tp, results = hf
    for c in _cases(results):
        assert c["tokens"] == c["ref_tokens"] == c["stock_tokens"], c["family"]
        assert len(c["tokens"][0]) == c["seq"] + 6
        assert c["kv_layers"] == (LAYERS, LAYERS)
        assert c["kv_err"] <= TOL, c


def test_iso_actually_ran(hf):
    """2 * layers * chunks async all-reduces per prefill, none in decode; DeepSpeed's own
    synchronous all-reduce only for the lm_head during an ISO prefill."""
    tp, results = hf
    for c in _cases(results):
        assert c["n_iso_linears"] == 2 * LAYERS
        assert c["fwd_async"] == c["expect_async"], c
        assert c["gen_async"] == c["expect_async"], c  # generate: prefill only, decode is stock
        assert c["fwd_sync"] == (1 if c["expect_async"] else 2 * LAYERS + 1), c
        if c["seq"] > 1:
            assert c["expect_async"] > 0


def test_bad_iso_values_rejected_on_every_rank(hf):
    from tests.cases_deepspeed import BAD_CONFIGS

    tp, results = hf
    assert len(results) == tp
    for rank in results:
        bad = rank["bad"]
        assert bad["alive"] == tp
        for name, (_, texts) in BAD_CONFIGS.items():
            msg = bad[name]
            assert msg is not None and msg.startswith("DeepSpeedInferenceConfig"), (name, msg)
            for text in texts:
                assert text in msg, (name, msg)
        assert bad["kernel_inject"] and "replace_with_kernel_inject" in bad["kernel_inject"]


def test_padded_batch_runs_iso(hf2):
    for rank in hf2:
        for fam, r in rank["padded"].items():
            assert r["async_ops"] == 2 * LAYERS * 2, (fam, r)
            assert r["err"] <= TOL, (fam, r)
            assert r["tokens"] == r["ref_tokens"], fam


def test_auto_split_under_deepspeed_asks_the_cost_model(hf2):
    """README: split="auto" runs stock wherever no split is predicted faster, else splits."""
    for rank in hf2:
        auto = rank["auto"]
        assert auto["iso"]["split"] == "auto" and auto["iso"]["min_tokens"] == 0  # cost model's threshold
        short, long = auto["short"], auto["long"]
        assert short["bounds"] is None and short["reason"].startswith("auto:"), short
        assert short["async_ops"] == 0 and short["err"] <= TOL
        assert long["bounds"] is not None and long["bounds"][-1] == 512, long
        assert long["reason"].startswith("auto:") and "predicted" in long["reason"]
        assert long["async_ops"] == 2 * LAYERS * (len(long["bounds"]) - 1)  # ISO ran, every chunk
        assert long["err"] <= TOL


def test_steps_aside_where_iso_cannot_help(hf2):
    for rank in hf2:
        a = rank["aside"]
        for name in ("short_prompt", "one_chunk", "output_hidden_states", "training", "autograd",
                     "sliding_window"):
            assert a[name] == dict(equal=True, async_ops=0), (name, a[name])
        assert a["iso_control"] == dict(close=True, async_ops=2 * LAYERS * 2)
        assert a["decode"] == dict(async_ops=0, sync_ops=2 * LAYERS + 1)
        assert a["tp1"] == dict(equal=True, async_ops=0, iso=False)


def test_no_iso_key_or_disabled_is_stock_deepspeed(hf2):
    for rank in hf2:
        f = rank["flag"]
        assert not f["plain_iso"] and not f["off_iso"] and f["on_iso"]
        assert f["plain_classes"] == f["reverted_classes"]
        assert f["plain_equal_off"]  # bitwise
        assert f["same_keys"] and f["same_shapes"]
        assert not f["dump_has_iso"] and f["plain_config_iso"] is None
        assert f["local_size"] == "2"  # restored from LOCAL_WORLD_SIZE


def test_megatron_model_through_deepspeed():
    results = run_ranks(2, "tests.cases_deepspeed:megatron_suite", 2, [1, 7, 257], [2, 3], timeout=300)
    for rank in results:
        assert len(rank["cases"]) == 2 * 3 * 2
        for c in rank["cases"]:
            assert c["err"] <= TOL, c
            assert c["async_ops"] == c["expect"], c
        for fam in ("llama", "gpt"):
            assert rank[f"{fam}_block"] == "ISOTransformerBlock"
            assert rank[f"{fam}_plain_block"] == "TransformerBlock"
            assert rank[f"{fam}_ds_tp"] == 1
        e = rank["errors"]
        assert "Megatron's tensor-parallel size is 2" in e["tp_mismatch"]
        assert "tp_size 1" in e["autotp_on_mcore"]
        assert "no megatron-core TransformerBlock" in e["not_mcore"]


def test_hf_launcher_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_SIZE", raising=False)  # as a user's shell: torchrun does not set it
    out = tmp_path / "res.json"
    rc, log = run_torchrun(2, ["launch/infer_hf_deepspeed.py", "--family", "opt", "--num-layers", "2",
                               "--hidden-size", "128", "--ffn-hidden-size", "256", "--vocab-size", "256",
                               "--seq-len", "300", "--timing-warmup", "0", "--timing-repeats", "1",
                               "--num-tokens-to-generate", "4", "--output-json", str(out)], timeout=240)
    assert rc == 0, log[-4000:]
    res = json.loads(out.read_text())
    assert res["tp"] == 2 and res["iso"]["num_chunks"] == 2
    (bounds,) = res["iso_chunk_bounds"]  # what the timed prefill ran: 2 balanced chunks, the
    assert len(bounds) == 3 and bounds[0] == 0 and bounds[-1] == 300 and 150 < bounds[1] < 300  # first larger
    assert res["max_rel_logit_diff"] <= TOL
    assert res["tokens_identical"] and len(res["tokens_iso"][0]) == 4
    assert "tokens identical: True" in log
