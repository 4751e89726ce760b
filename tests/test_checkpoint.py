"""Checkpoints as users have them, loaded into ISO models at another TP size (real gloo ranks).

A stock megatron-core model (local spec, families "gpt" and "llama") is saved at TP 1 and 2 in
every format of tests/ckpt_fixtures.py (Megatron torch / torch_dist, TE key names, a real
DeepSpeed engine, Megatron-DeepSpeed legacy names), then loaded at TP 1 and 2 into an ISO model
built with other weights: prompt logits within fp32 tolerance and 8 greedy tokens identical to
the stock model's own. Every damaged or mismatched input raises a clear error on every rank.
"""

import pytest
import torch

from tests.harness import run_ranks

TOL = 1e-5
FAMILIES = ["gpt", "llama"]
FORMATS = ["torch", "torch_dist", "te", "te_dist", "deepspeed", "legacy", "legacy_v0"]
TPS = [1, 2]
EXPECTED_FORMAT = {"torch": "torch", "te": "torch", "legacy": "torch", "legacy_v0": "torch",
                   "torch_dist": "torch_dist", "te_dist": "torch_dist", "deepspeed": "deepspeed"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_matrix"))
    results = run_ranks(2, "tests.cases_checkpoint:matrix", root, FAMILIES, FORMATS, TPS, TPS,
                        timeout=300)
    return [case for rank in results for case in rank]


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", FORMATS)
def test_loads_at_every_tp_like_the_stock_model(matrix, fmt):
    cases = [c for c in matrix if c["fmt"] == fmt]
    families = ["gpt"] if fmt == "legacy_v0" else FAMILIES
    assert len(cases) == 2 * len(families) * len(TPS) * len(TPS)  # 2 ranks
    assert {(c["family"], c["saved"], c["load"]) for c in cases} == \
        {(f, s, t) for f in families for s in TPS for t in TPS}
    for c in cases:
        where = f"{c['family']} {fmt} saved TP{c['saved']} -> loaded TP{c['load']}"
        assert c["before"] > 1e-2, f"{where}: the ISO model matched before loading"
        assert c["err"] <= TOL, f"{where}: logits rel err {c['err']:.3g}"
        assert c["tokens"] == c["ref_tokens"], where
        assert len(c["tokens"]) == 8


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_info_and_args(matrix, fmt):
    for c in (c for c in matrix if c["fmt"] == fmt):
        assert c["format"] == EXPECTED_FORMAT[fmt] and c["same_info"], c
        assert c["info_tp"] == c["saved"], c
        if fmt.startswith("legacy"):
            assert (c["tag"], c["iteration"]) == ("release", None)
        else:
            assert c["iteration"] == 10, c
        if fmt == "deepspeed":
            assert c["args"] is None  # a plain DeepSpeed engine stores no Megatron args
            continue
        a = c["args"]
        llama = c["family"] == "llama"
        assert a["num_layers"] == 2 and a["hidden_size"] == 64 and a["ffn_hidden_size"] == 160
        assert a["num_attention_heads"] == 8 and a["kv_channels"] == 8
        assert a["group_query_attention"] == llama and (not llama or a["num_query_groups"] == 4)
        assert a["normalization"] == ("RMSNorm" if llama else "LayerNorm")
        assert a["swiglu"] == llama and a["add_bias_linear"] == (not llama)
        assert a["position_embedding_type"] == ("rope" if llama else "learned_absolute")
        assert a["untie_embeddings_and_output_weights"] == llama
        assert a["padded_vocab_size"] == 256 and a["tensor_model_parallel_size"] == c["saved"]


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_errors"))
    return run_ranks(2, "tests.cases_checkpoint:errors", root, timeout=240)


NOT_FOUND, ERROR = "not_found", "error"
ERROR_CASES = {
    "missing_dir": (NOT_FOUND, ["no-such-dir", "does not exist"]),
    "empty_dir": (NOT_FOUND, ["no checkpoint found", "latest_checkpointed_iteration.txt",
                              "'latest'", "metadata.json", "model_optim_rng.pt"]),
    "bad_tracker": (ERROR, ["latest_checkpointed_iteration.txt", "'garbage'"]),
    "tracker_nowhere": (NOT_FOUND, ["iter_0000020", "does not exist"]),
    "pipeline": (ERROR, ["pipeline", "mp_rank_XX_YYY"]),
    "format_mismatch": (ERROR, ["--ckpt-format torch_dist", "holds a torch checkpoint"]),
    "shape_torch": (ERROR, ["decoder.layers.0.mlp.linear_fc1.weight", "(320, 64)", "(384, 64)"]),
    "shape_dist": (ERROR, ["decoder.layers.mlp.linear_fc1.weight", "(2, 320, 64)", "(2, 384, 64)"]),
    "missing_key": (ERROR, ["missing keys", "decoder.layers.1.mlp.linear_fc2.weight"]),
    "unexpected_torch": (ERROR, ["unexpected keys", "output_layer.weight", "untie"]),
    "unexpected_dist": (ERROR, ["unexpected keys", "output_layer.weight", "untie"]),
    "missing_dist": (ERROR, ["missing keys", "output_layer.weight"]),
    "heads_mismatch": (ERROR, ["num_attention_heads=8 (model: 16)", "num_query_groups=4 (model: 8)"]),
    "truncated_rank1": (ERROR, ["mp_rank_01/model_optim_rng.pt", "truncated", "rank 1]"]),
    "truncated_distcp": (ERROR, ["__1_0.distcp", "truncated"]),
    # the common state's file (common.pt with megatron-core 0.16, a .distcp with 0.19) is named too
    "truncated_common": (ERROR, ["common state", "truncated"]),
    "corrupt_common": (ERROR, ["common state", "corrupt"]),
    "corrupt_distcp": (ERROR, ["__1_0.distcp", "corrupt", "cannot be read"]),
    "tp_indivisible": (ERROR, ["num_attention_heads=3", "tensor-model-parallel size 2"]),
    "tp_indivisible_args": (ERROR, ["num_attention_heads=3", "tensor-model-parallel size 2"]),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_clear_and_raised_on_every_rank(errors, case):
    kind, needles = ERROR_CASES[case]
    if case.endswith("_common"):
        assert errors[0]["common_state_file"] == errors[1]["common_state_file"]
        needles = needles + [errors[0]["common_state_file"]]
    got = [rank[case] for rank in errors]
    assert all(g is not None for g in got), f"{case}: loaded without an error: {got}"
    assert got[0]["message"] == got[1]["message"], f"{case}: ranks disagree: {got}"
    for g in got:
        assert g["type"] in ("CheckpointError", "CheckpointNotFoundError"), g
        assert g["value_error"] and g["not_found"] == (kind == NOT_FOUND), g
        for needle in needles:
            assert needle in g["message"], f"{case}: {needle!r} not in {g['message']!r}"


@pytest.mark.multiprocess
def test_all_ranks_survive_every_error(errors):
    assert [rank["alive"] for rank in errors] == [2, 2]
    assert [rank["control"] for rank in errors] == [None, None]


# --- pure functions, no ranks --------------------------------------------------------------

def test_key_names_map_to_megatron_core():
    from iso_megatron.megatron.checkpoint import canonical_name, is_ignored_key

    pairs = {
        "module.language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
        "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
        "language_model.encoder.layers.3.input_layernorm.weight": "decoder.layers.3.input_layernorm.weight",
        "language_model.encoder.layers.0.self_attention.query_key_value.bias":
            "decoder.layers.0.self_attention.linear_qkv.bias",
        "language_model.encoder.layers.1.attention.dense.weight": "decoder.layers.1.self_attention.linear_proj.weight",
        "language_model.encoder.layers.1.post_attention_layernorm.bias": "decoder.layers.1.pre_mlp_layernorm.bias",
        "language_model.encoder.layers.2.mlp.dense_h_to_4h.weight": "decoder.layers.2.mlp.linear_fc1.weight",
        "language_model.encoder.layers.2.mlp.dense_4h_to_h.weight": "decoder.layers.2.mlp.linear_fc2.weight",
        "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
        "language_model.encoder.final_norm.weight": "decoder.final_layernorm.weight",
        "language_model.output_layer.weight": "output_layer.weight",
        "decoder.layers.5.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.5.input_layernorm.weight",
        "decoder.layers.5.self_attention.linear_qkv.layer_norm_bias": "decoder.layers.5.input_layernorm.bias",
        "decoder.layers.5.mlp.linear_fc1.layer_norm_weight": "decoder.layers.5.pre_mlp_layernorm.weight",
        "decoder.layers.5.self_attention.linear_qkv.weight": "decoder.layers.5.self_attention.linear_qkv.weight",
    }
    for old, new in pairs.items():
        assert canonical_name(old) == new, old
    for key in ("decoder.layers.0.self_attention.core_attention._extra_state",
                "language_model.rotary_pos_emb.inv_freq", "output_layer._extra_state"):
        assert is_ignored_key(key)


@pytest.mark.parametrize("saved,tp", [(1, 2), (2, 1), (2, 4), (4, 2), (2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("stride", [1, 2])
def test_reshard_equals_chunking_the_full_tensor(saved, tp, stride):
    from iso_megatron.megatron.checkpoint.reshard import _needed_ranks, _reshard

    full = torch.arange(2 * 12 * 5).reshape(2 * 12, 5)  # two stride blocks of 12 rows

    def shard(n, r):  # megatron's strided split: rank r holds its slice of every block
        return torch.cat([b.chunk(n, 0)[r] for b in full.chunk(stride, 0)], 0)

    for r in range(tp):
        pieces = {q: shard(saved, q) for q in _needed_ranks(saved, tp, r)}
        assert torch.equal(_reshard(pieces, saved, tp, r, 0, stride), shard(tp, r)), (r, pieces.keys())


def test_find_checkpoint_without_process_group(tmp_path):
    from iso_megatron.megatron.checkpoint import CheckpointNotFoundError, checkpoint_args, find_checkpoint

    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "iter_0000005").mkdir()
    with pytest.raises(FileNotFoundError, match="found iter_0000005 but no tracker file"):
        checkpoint_args(str(tmp_path))


def test_old_pickles_with_vanished_classes_still_load(tmp_path):
    """Old Megatron files pickle classes whose modules are gone (loss scalers, megatron.model)."""
    import sys
    import types

    from iso_megatron.megatron.checkpoint.find import _torch_load

    mod = types.ModuleType("gone_megatron_module")

    class LossScaler:
        def __init__(self):
            self.scale = 4.0

    LossScaler.__module__, LossScaler.__qualname__ = mod.__name__, "LossScaler"
    mod.LossScaler = LossScaler
    sys.modules[mod.__name__] = mod
    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {"scaler": LossScaler()}}, path)
    del sys.modules[mod.__name__]
    state = _torch_load(path)
    assert torch.equal(state["model"]["w"], torch.ones(2))
