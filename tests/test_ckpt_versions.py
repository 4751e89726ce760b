"""torch_dist checkpoints written by each megatron-core version, loaded by the installed one.

tests/fixtures/ckpt/mcore-<version>/<family>-tp2/ holds a checkpoint that the stock model of that
megatron-core wrote at TP 2 (scripts/make_ckpt_fixtures.py) and reference.pt, that model's own
prompt logits and greedy tokens. The versions differ in where the common state (Megatron args,
iteration) lives: 0.16 writes common.pt, 0.19 writes it into the .distcp files (the
`common_state` entry of rank 0's file, no common.pt) and drops `common_backend` from
metadata.json. Every fixture is loaded here under whichever megatron-core runs the suite, at TP 1
and TP 2, into an ISO model built with other weights, through
`iso_megatron.megatron.checkpoint.load_checkpoint`: logits within fp32 tolerance of the writer's,
greedy tokens identical; `find_checkpoint` / `checkpoint_args` report what the fixture is; damaged
copies of each layout fail with a message naming the damaged file; the launcher's
`--use-checkpoint-args` takes the model from each. CI runs the suite in both environments, so
each version's checkpoints are loaded by both versions.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil

import pytest
import torch

from tests.cases_checkpoint import _overwrite, _truncate, common_state_location
from tests.harness import run_ranks, run_torchrun
from tests.ranks import FP32_REL_TOL, rel_err

pytestmark = pytest.mark.multiprocess

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ckpt")
FIXTURES = sorted(os.path.relpath(os.path.dirname(p), FIXTURES_DIR)
                  for p in glob.glob(os.path.join(FIXTURES_DIR, "mcore-*", "*", "reference.pt")))
# the file each writing version keeps the common state (args, iteration) in
COMMON_STATE = {"0.16.1": "common.pt", "0.19.2": "__0_0.distcp"}
LOAD_TPS = [1, 2]
ITER = "iter_0000010"
MAX_BYTES = 512 * 1024  # all fixtures together: keep them tiny


def _reference(name: str) -> dict:
    return torch.load(os.path.join(FIXTURES_DIR, name, "reference.pt"), weights_only=True)


def _checkpoint(name: str) -> str:
    return os.path.join(FIXTURES_DIR, name, "checkpoint")


# --- damaged copies: (how, what the message must name) ------------------------------------------

def _damage(case: str, iteration_dir: str, version: str):
    holder = os.path.join(iteration_dir, COMMON_STATE[version])
    if case == "trunc_common":
        _truncate(holder)
    elif case == "corrupt_common":  # 0.19: its bytes only, every tensor entry still reads
        rel, offset, length = common_state_location(iteration_dir)
        assert rel == COMMON_STATE[version], (rel, version)
        _overwrite(os.path.join(iteration_dir, rel), offset, length)
    elif case == "trunc_data":
        _truncate(os.path.join(iteration_dir, "__1_0.distcp"))
    elif case == "corrupt_data":
        _overwrite(os.path.join(iteration_dir, "__1_0.distcp"), byte=b"\0")
    elif case == "corrupt_metadata":
        _overwrite(os.path.join(iteration_dir, ".metadata"))
    elif case == "lost_common":
        os.remove(holder)
    else:
        raise ValueError(case)


DAMAGE = ["trunc_common", "corrupt_common", "trunc_data", "corrupt_data", "corrupt_metadata",
          "lost_common"]


def _expected(case: str, iteration_dir: str, version: str):
    """(not found?, needles) of the error for `case` in the layout `version` writes."""
    holder = os.path.join(iteration_dir, COMMON_STATE[version])
    data = os.path.join(iteration_dir, "__1_0.distcp")
    distcp_layout = COMMON_STATE[version] != "common.pt"
    return {
        "trunc_common": (False, [holder, "common state", "truncated"]),
        "corrupt_common": (False, [holder, "common state", "corrupt"]),
        "trunc_data": (False, [data, "truncated"]),
        "corrupt_data": (False, [data, "corrupt"]),
        "corrupt_metadata": (False, [os.path.join(iteration_dir, ".metadata"), "corrupt"]),
        "lost_common": (True, [holder, "common state", "missing"]) if distcp_layout else
                       (False, [iteration_dir, "no common state", "common.pt", "'common_state'"]),
    }[case]


# --- rank side (tests.harness.run_ranks) ----------------------------------------------------------

def _iso_model(ref: dict, seed: int = 999):
    from tests.cases_checkpoint import build_iso

    return build_iso(ref["family"], seed, **ref["model"])


def rank_cases(names: list, root: str) -> dict:
    """Every fixture loaded at each TP in LOAD_TPS; then each damaged copy at TP 2."""
    import torch.distributed as dist

    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.megatron.checkpoint import checkpoint_args, find_checkpoint, load_checkpoint
    from tests import ckpt_fixtures as fx
    from tests.cases_checkpoint import _catch

    loads = []
    for tp in LOAD_TPS:
        fx.setup(tp)
        for name in names:
            ref, ckpt = _reference(name), _checkpoint(name)
            prompt = torch.tensor([ref["prompt"]])
            model = _iso_model(ref)
            before = rel_err(fx.forward(model, prompt).float(), ref["logits"])
            info = load_checkpoint(model, ckpt)
            apply_iso(model, ISOConfig(num_chunks=2, min_tokens=0))
            got = fx.reference(model, len(ref["tokens"]), prompt=prompt)
            found = find_checkpoint(ckpt)
            loads.append(dict(
                name=name, load=tp, before=before, err=rel_err(got["logits"], ref["logits"]),
                tokens=got["tokens"], ref_tokens=ref["tokens"],
                info=[(i.format, i.tp, i.iteration, i.tag, i.checkpoint_version, i.common_state,
                       os.path.basename(i.directory)) for i in (info, found)],
                args=checkpoint_args(ckpt, tensor_model_parallel_size=tp)))

    if dist.get_rank() == 0:
        for name in names:
            version = _reference(name)["megatron_core"]
            for case in DAMAGE:
                target = os.path.join(root, name.replace("/", "-"), case)
                shutil.copytree(_checkpoint(name), target)
                _damage(case, os.path.join(target, ITER), version)
    dist.barrier()
    fx.setup(2)
    damaged = {}
    for name in names:
        ref = _reference(name)
        for case in DAMAGE:
            target = os.path.join(root, name.replace("/", "-"), case)
            damaged[(name, case)] = _catch(lambda: load_checkpoint(_iso_model(ref), target))
            damaged[(name, case, "dir")] = os.path.join(target, ITER)
    alive = torch.ones(1)
    dist.all_reduce(alive)  # every rank got here, in step, after all of that
    return dict(loads=loads, damaged=damaged, alive=int(alive.item()))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_versions"))
    return run_ranks(2, rank_cases, FIXTURES, root, timeout=300)


# --- the committed fixtures -----------------------------------------------------------------------

def test_fixtures_of_both_versions_are_committed_and_tiny():
    versions = {name.split("/")[0] for name in FIXTURES}
    assert versions >= {f"mcore-{v}" for v in COMMON_STATE}, FIXTURES
    for version in versions:
        assert {n.split("/")[1] for n in FIXTURES if n.startswith(version + "/")} >= \
            {"gpt-tp2", "llama-tp2"}, FIXTURES
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIXTURES_DIR) for f in fs)
    assert total <= MAX_BYTES, f"fixtures take {total} bytes: keep them tiny"


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_what_its_version_writes(name):
    ref = _reference(name)
    version = ref["megatron_core"]
    assert name.startswith(f"mcore-{version}/") and name.endswith(f"{ref['family']}-tp2")
    assert version in COMMON_STATE, f"a fixture of megatron-core {version}: add it to COMMON_STATE"
    files = sorted(os.listdir(os.path.join(_checkpoint(name), ITER)))
    assert files == ref["files"]
    assert ("common.pt" in files) == (COMMON_STATE[version] == "common.pt"), files
    with open(os.path.join(_checkpoint(name), ITER, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["sharded_backend"] == "torch_dist"
    assert ("common_backend" in meta) == (COMMON_STATE[version] == "common.pt"), meta
    assert ref["saved_tp"] == 2 and len(ref["tokens"]) == 8
    assert list(ref["logits"].shape) == [1, len(ref["prompt"]), ref["model"]["vocab_size"]]
    assert ref["logits"].dtype == torch.float32


# --- loading them here ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_loads_at_tp1_and_tp2_like_the_model_that_wrote_it(ranks, name):
    cases = [c for rank in ranks for c in rank["loads"] if c["name"] == name]
    assert sorted(c["load"] for c in cases) == sorted(LOAD_TPS * 2)  # 2 ranks
    for c in cases:
        where = f"{name} (saved TP 2) loaded at TP {c['load']} under megatron-core " \
                f"{importlib.metadata.version('megatron-core')}"
        assert c["before"] > 1e-2, f"{where}: the ISO model matched before loading"
        assert c["err"] <= FP32_REL_TOL, f"{where}: logits rel err {c['err']:.3g}"
        assert c["tokens"] == c["ref_tokens"], where
        assert len(c["tokens"]) == 8


@pytest.mark.parametrize("name", FIXTURES)
def test_detected_as_what_it_is(ranks, name):
    version = _reference(name)["megatron_core"]
    for c in (c for rank in ranks for c in rank["loads"] if c["name"] == name):
        for info in c["info"]:  # load_checkpoint's and find_checkpoint's
            assert info == ("torch_dist", 2, 10, ITER, 3.0, COMMON_STATE[version], ITER), info


@pytest.mark.parametrize("name", FIXTURES)
def test_checkpoint_args(ranks, name):
    ref = _reference(name)
    m, llama = ref["model"], ref["family"] == "llama"
    for c in (c for rank in ranks for c in rank["loads"] if c["name"] == name):
        a = c["args"]
        assert a["num_layers"] == m["num_layers"] and a["hidden_size"] == m["hidden_size"]
        assert a["ffn_hidden_size"] == m["ffn_hidden_size"]
        assert a["num_attention_heads"] == m["num_attention_heads"]
        assert a["kv_channels"] == m["hidden_size"] // m["num_attention_heads"]
        assert a["group_query_attention"] == llama
        assert not llama or a["num_query_groups"] == m["num_query_groups"]
        assert a["normalization"] == ("RMSNorm" if llama else "LayerNorm")
        assert a["swiglu"] == llama and a["add_bias_linear"] == (not llama)
        assert a["position_embedding_type"] == ("rope" if llama else "learned_absolute")
        assert a["untie_embeddings_and_output_weights"] == llama
        assert a["padded_vocab_size"] == m["vocab_size"]
        assert a["max_position_embeddings"] == m["max_sequence_length"]
        assert a["tensor_model_parallel_size"] == 2 and a["ckpt_format"] == "torch_dist"


@pytest.mark.parametrize("case", DAMAGE)
@pytest.mark.parametrize("name", FIXTURES)
def test_damaged_copies_fail_clearly_on_every_rank(ranks, name, case):
    version = _reference(name)["megatron_core"]
    iteration_dir = ranks[0]["damaged"][(name, case, "dir")]
    not_found, needles = _expected(case, iteration_dir, version)
    got = [rank["damaged"][(name, case)] for rank in ranks]
    assert all(g is not None for g in got), f"{name} {case}: loaded without an error"
    assert got[0]["message"] == got[1]["message"], f"{name} {case}: ranks disagree: {got}"
    for g in got:
        assert g["type"] in ("CheckpointError", "CheckpointNotFoundError"), g
        assert g["value_error"] and g["not_found"] == not_found, g
        for needle in needles:
            assert needle in g["message"], f"{name} {case}: {needle!r} not in {g['message']!r}"


def test_all_ranks_survive_every_damaged_copy(ranks):
    assert [rank["alive"] for rank in ranks] == [2, 2]


# --- the launcher: --use-checkpoint-args ------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_launcher_use_checkpoint_args(tmp_path, name):
    """launch/infer.py builds the model from the args stored in the fixture (common.pt or the
    .distcp), loads it with ISO and reproduces the writer's tokens and logits."""
    ref = _reference(name)
    load_tp = 1 if ref["family"] == "gpt" else 2  # resharded 2 -> 1, and kept at 2
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    rc, log = run_torchrun(load_tp, [
        "launch/infer.py", "--load", _checkpoint(name), "--use-checkpoint-args",
        "--prompt-token-ids", ",".join(map(str, ref["prompt"])),
        "--num-tokens-to-generate", str(len(ref["tokens"])), "--iso-min-tokens", "0",
        "--output-json", str(out_json), "--save-logits", str(out_logits)], timeout=300)
    assert rc == 0, log[-4000:]
    rec = json.loads(out_json.read_text())
    assert rec["tp"] == load_tp
    assert (rec["iso_chunk_bounds"] is not None) == (load_tp > 1)
    assert rec["generated_token_ids"] == ref["tokens"]
    logits = torch.load(out_logits)[0]
    err = rel_err(logits.float(), ref["logits"][0])
    assert err <= FP32_REL_TOL, err
