"""No code runs from a checkpoint: every pickle the loader reads is read with torch's weights_only
unpickler and an allowlist (iso_megatron/megatron/checkpoint/unpickle.py).

Each route gets a checkpoint whose pickle creates a file when unpickled (`CreatesFile`: its
__reduce__ is `open(path, "w")`, the least an attacker would do): legacy `torch` shards, DeepSpeed
model states, torch_dist's common.pt (megatron-core 0.16's layout) and the `common_state` entry of
the .distcp files (0.19's; both layouts are read whichever megatron-core is installed), torch_dist's
`.metadata`, `--use-checkpoint-args`, and megatron-core's / torch DCP's own reads inside
dist_checkpointing. Each is refused with an error naming the type and the file and the file is
NOT created; with the opt-in (`trust_checkpoint=True`, `--trust-checkpoint`) it loads and the
file IS created, which proves the payload would have run. Real Megatron-LM args (the enums and
dtypes it stores) load without the opt-in.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pathlib
import pickle
import random
import shutil
import signal
import sys
import types
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore")

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ckpt")
# both torch_dist layouts: common.pt (0.16) and the `common_state` entry of the .distcp (0.19)
DIST_FIXTURES = {"common.pt": "mcore-0.16.1/gpt-tp2", "distcp": "mcore-0.19.2/gpt-tp2"}
ITER = "iter_0000010"


class CreatesFile:
    """Unpickling it creates `path` (what a malicious checkpoint does, and worse)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _args(**extra) -> argparse.Namespace:
    return argparse.Namespace(num_layers=1, hidden_size=16, num_attention_heads=4,
                              tensor_model_parallel_size=1, params_dtype=torch.float32, **extra)


def _save_torch_shard(root, state: dict) -> str:
    """Megatron-LM legacy `torch` layout: tracker + iter_0000010/mp_rank_00/model_optim_rng.pt."""
    path = os.path.join(root, ITER, "mp_rank_00", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"checkpoint_version": 3.0, "iteration": 10, "model": {"w": torch.ones(2)},
                **state}, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    return path


def _save_deepspeed(root, state: dict) -> str:
    """DeepSpeed engine layout: `latest` + global_step10/mp_rank_00_model_states.pt."""
    path = os.path.join(root, "global_step10", "mp_rank_00_model_states.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"module": {"w": torch.ones(2)}, "mp_world_size": 1, "ds_version": "0.0",
                **state}, path)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step10")
    return path


def _common_state_item(iteration_dir):
    with open(os.path.join(iteration_dir, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # our own fixture
    key = next(i for i in metadata.storage_data if i.fqn.split("/")[0] == "common_state")
    return metadata, key, metadata.storage_data[key]


def _torch_dist_with(root, layout: str, payload) -> str:
    """A copy of a committed torch_dist fixture whose common state (args, iteration) also holds
    `payload`: in common.pt, or appended to the .distcp file as its new `common_state` entry.
    Returns the file that holds it."""
    shutil.copytree(os.path.join(FIXTURES_DIR, DIST_FIXTURES[layout], "checkpoint"), root)
    it = os.path.join(root, ITER)
    if layout == "common.pt":
        path = os.path.join(it, "common.pt")
        common = torch.load(path, weights_only=False)
        common["payload"] = payload
        torch.save(common, path)
        return path
    metadata, key, item = _common_state_item(it)
    path = os.path.join(it, item.relative_path)
    with open(path, "rb") as f:
        f.seek(item.offset)
        state = torch.load(io.BytesIO(f.read(item.length)), weights_only=False)  # [common]
    state[0]["payload"] = payload
    buf = io.BytesIO()
    torch.save(state, buf)
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(buf.getvalue())
    metadata.storage_data[key] = dataclasses.replace(item, offset=offset,
                                                     length=len(buf.getvalue()))
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    return path


def _metadata_with(root, payload) -> str:
    """A copy of the 0.16 torch_dist fixture whose `.metadata` pickle also holds `payload`."""
    shutil.copytree(os.path.join(FIXTURES_DIR, DIST_FIXTURES["common.pt"], "checkpoint"), root)
    path = os.path.join(root, ITER, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data = {"payload": payload}
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    return path


PAYLOAD = "io.open"  # builtins.open, as pickle names it


def _assert_refused(error, path, type_name=PAYLOAD):
    from iso_megatron.megatron.checkpoint import UnsafeCheckpointError

    assert isinstance(error.value, UnsafeCheckpointError), repr(error.value)
    message = str(error.value)
    for needle in (type_name, path, "--trust-checkpoint", "trust_checkpoint=True"):
        assert needle in message, f"{needle!r} not in {message!r}"


# --- each route: refused, nothing created; with the opt-in it loads and the payload ran ----------

@pytest.mark.parametrize("save", [_save_torch_shard, _save_deepspeed], ids=["torch", "deepspeed"])
def test_shard_files_refuse_code_and_load_when_trusted(tmp_path, save):
    from iso_megatron.megatron.checkpoint import checkpoint_args, find_checkpoint, load_checkpoint

    marker = tmp_path / "marker"
    root = str(tmp_path / "ckpt")
    path = save(root, {"args": _args(), "payload": CreatesFile(marker)})
    with pytest.raises(ValueError) as e:
        find_checkpoint(root)
    _assert_refused(e, path)
    with pytest.raises(ValueError) as e:  # --use-checkpoint-args' route
        checkpoint_args(root)
    _assert_refused(e, path)
    with pytest.raises(ValueError) as e:  # no process group: this process is the only rank
        load_checkpoint(None, root)
    _assert_refused(e, path)
    assert not marker.exists()

    info = find_checkpoint(root, trust_checkpoint=True)
    assert marker.exists()  # the payload ran: it is what was refused above
    assert info.tp == 1 and info.args.num_layers == 1
    marker.unlink()
    assert checkpoint_args(root, trust_checkpoint=True)["num_attention_heads"] == 4
    assert marker.exists()


@pytest.mark.parametrize("layout", sorted(DIST_FIXTURES))
def test_torch_dist_common_state_refuses_code_and_loads_when_trusted(tmp_path, layout):
    from iso_megatron.megatron.checkpoint import checkpoint_args, find_checkpoint

    marker = tmp_path / "marker"
    root = str(tmp_path / "ckpt")
    path = _torch_dist_with(root, layout, CreatesFile(marker))
    for read in (find_checkpoint, checkpoint_args):
        with pytest.raises(ValueError) as e:
            read(root)
        _assert_refused(e, path)
        if layout == "distcp":
            assert "'common_state' entry" in str(e.value)
    assert not marker.exists()

    info = find_checkpoint(root, trust_checkpoint=True)
    assert marker.exists()
    assert info.format == "torch_dist" and info.tp == 2 and info.iteration == 10
    assert info.common_state == os.path.relpath(path, os.path.join(root, ITER))


def test_torch_dist_metadata_refuses_code_and_loads_when_trusted(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from iso_megatron.megatron.checkpoint.torch_dist import _dcp_metadata
    from iso_megatron.megatron.checkpoint.unpickle import allowlisted_dcp_reads

    marker = tmp_path / "marker"
    root = str(tmp_path / "ckpt")
    path = _metadata_with(root, CreatesFile(marker))
    it = os.path.join(root, ITER)
    with pytest.raises(ValueError) as e:
        _dcp_metadata(it)
    _assert_refused(e, path)
    with allowlisted_dcp_reads():  # how megatron-core's own reads go inside load_checkpoint
        with pytest.raises(ValueError) as e:
            FileSystemReader(it).read_metadata()
    _assert_refused(e, path)
    assert not marker.exists()

    assert _dcp_metadata(it, trust_checkpoint=True).planner_data["payload"] is not None
    assert marker.exists()


def test_dcp_bytes_entries_inside_megatron_are_allowlisted(tmp_path):
    """What megatron-core 0.19's load_common_state_dict (and any ShardedObject read) does: a DCP
    load of a bytes entry, which torch's DefaultLoadPlanner unpickles with weights_only=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from iso_megatron.megatron.checkpoint.unpickle import allowlisted_dcp_reads

    marker = tmp_path / "marker"
    root = str(tmp_path / "ckpt")
    path = _torch_dist_with(root, "distcp", CreatesFile(marker))
    it = os.path.join(root, ITER)
    key = _common_state_item(it)[1].fqn
    with allowlisted_dcp_reads():
        with pytest.raises(BaseException) as e:  # DCP wraps it: CheckpointException
            dcp.load({key: io.BytesIO()}, storage_reader=FileSystemReader(it), no_dist=True)
    assert PAYLOAD in str(e.value) and not marker.exists(), repr(e.value)

    state = {key: io.BytesIO()}
    with allowlisted_dcp_reads():  # a clean copy reads through the same route
        clean = str(tmp_path / "clean")
        _torch_dist_with(clean, "distcp", None)
        dcp.load(state, storage_reader=FileSystemReader(os.path.join(clean, ITER)), no_dist=True)
    assert state[key][0]["iteration"] == 10 and state[key][0]["args"].num_layers == 1

    dcp.load({key: io.BytesIO()}, storage_reader=FileSystemReader(it), no_dist=True)  # stock torch
    assert marker.exists(), f"{path}: the payload should run under torch's own full unpickling"


def test_launcher_refuses_and_takes_trust_checkpoint(tmp_path, capsys):
    """launch/infer.py --use-checkpoint-args: a usage error naming the type and the file (every
    rank parses alike); --trust-checkpoint reads it (and runs the payload)."""
    from launch import infer

    marker = tmp_path / "marker"
    root = str(tmp_path / "ckpt")
    path = _torch_dist_with(root, "common.pt", CreatesFile(marker))
    argv = ["--load", root, "--use-checkpoint-args", "--prompt-token-ids", "1,2,3"]
    with pytest.raises(SystemExit) as e:
        infer.prepare_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for needle in ("--use-checkpoint-args", PAYLOAD, path, "--trust-checkpoint"):
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not marker.exists()

    args, _ = infer.prepare_args(argv + ["--trust-checkpoint"])
    assert marker.exists() and args.trust_checkpoint
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (1, 16, 4)
    parser_help = _help_text(infer)
    assert "--trust-checkpoint" in parser_help and "arbitrary code execution" in parser_help


def _help_text(infer) -> str:
    p = argparse.ArgumentParser()
    infer.add_inference_args(p)
    return " ".join(p.format_help().split())


# --- the allowlist -------------------------------------------------------------------------------

def _megatron_lm_state() -> dict:
    """What Megatron-LM stores beside the weights, with the non-plain values it stores: its
    args' enums and dtypes (megatron/training/arguments.py, training.py's args.model_type), the
    rng state (numpy, torch), the rerun state machine's enums, Transformer-Engine extra state."""
    from megatron.core.enums import ModelType
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.rerun_state_machine import RerunDiagnostic, RerunMode, RerunState
    from megatron.core.transformer import enums

    extra = {}
    if hasattr(enums, "CudaGraphScope"):
        extra["cuda_graph_scope"] = [enums.CudaGraphScope.attn]
    if hasattr(enums, "InferenceCudaGraphScope"):
        extra["inference_cuda_graph_scope"] = enums.InferenceCudaGraphScope.none
    if hasattr(enums, "CudaGraphModule"):
        extra["cuda_graph_modules"] = [enums.CudaGraphModule.attn]
    args = _args(attention_backend=enums.AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
                 exit_signal=signal.SIGTERM, main_grads_dtype=torch.float32,
                 main_params_dtype=torch.float32, exp_avg_dtype=torch.bfloat16,
                 bf16=True, fp16=False, ckpt_format="torch", data_path=["a", "b"],
                 tensorboard_dir=None, save=pathlib.PosixPath("/ckpt"),
                 moe=types.SimpleNamespace(num_experts=None), **extra)
    args.params_dtype = torch.bfloat16
    rng = dict(random_rng_state=random.getstate(), np_rng_state=np.random.get_state(),
               torch_rng_state=torch.get_rng_state(), generator=torch.Generator().manual_seed(5),
               rng_tracker_states={})
    return {"args": args, "rng_state": [rng], "num_floating_point_operations_so_far": 0,
            "rerun_state_machine": {"mode": RerunMode.DISABLED,
                                    "state": RerunState.NOT_RUNNING_YET,
                                    "diagnostic": RerunDiagnostic.CORRECT_RESULT},
            "optimizer": {"config": OptimizerConfig(lr=1e-4)},
            "te_extra_state": io.BytesIO(b"te-fp8-meta")}


def _assert_same(a, b, where=""):
    if isinstance(a, argparse.Namespace):
        assert type(b) is argparse.Namespace and vars(a).keys() == vars(b).keys(), where
        for k in vars(a):
            _assert_same(getattr(a, k), getattr(b, k), f"{where}.{k}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        assert type(a) is type(b) and (a == b).all(), where
    elif isinstance(a, io.BytesIO):
        assert a.getvalue() == b.getvalue(), where
    elif isinstance(a, torch.Generator):
        assert type(b) is torch.Generator and torch.equal(a.get_state(), b.get_state()), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("save", [_save_torch_shard, _save_deepspeed], ids=["torch", "deepspeed"])
def test_megatron_lm_state_loads_without_the_opt_in(tmp_path, save):
    from iso_megatron.megatron.checkpoint.unpickle import torch_load_file

    state = _megatron_lm_state()
    if save is _save_deepspeed:  # BF16_Optimizer's state, in the model states when ZeRO is off
        from deepspeed.utils.tensor_fragment import fragment_address

        state["optimizer"]["param_slice_mappings"] = [{"w": fragment_address(numel=2, start=0)}]
    path = save(str(tmp_path), state)
    _assert_same(state, {k: v for k, v in torch_load_file(path).items() if k in state})
    # what the test adds up to: the enums are megatron-core's own, the dtypes torch's
    loaded = torch_load_file(path)["args"]
    assert loaded.attention_backend is state["args"].attention_backend
    assert loaded.params_dtype is torch.bfloat16


def test_real_megatron_lm_args_load_without_the_opt_in(tmp_path, monkeypatch):
    """The Namespace Megatron-LM's own parser and validate_args build (megatron.training ships
    with megatron-core 0.19's wheel here), saved as Megatron-LM saves it, read back equal."""
    import typing

    try:
        import megatron.training  # noqa: F401
    except ImportError as e:
        if "override" not in str(e):  # Python 3.11 lacks typing.override, which it imports
            pytest.skip(f"megatron.training (Megatron-LM's argument parser) is not installed: {e}")
    monkeypatch.setattr(typing, "override", getattr(typing, "override", lambda f: f), raising=False)
    for name in [m for m in sys.modules if m.startswith("megatron.training")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        from megatron.training.arguments import parse_args, validate_args
    except ImportError as e:
        pytest.skip(f"megatron.training (Megatron-LM's argument parser) is not installed: {e}")
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", [
        "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "128", "--micro-batch-size", "1", "--bf16", "--swiglu",
        "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--train-iters", "10",
        "--lr", "1e-4", "--save-interval", "5", "--eval-iters", "1", "--eval-interval", "5",
        "--ckpt-format", "torch", "--save", str(tmp_path / "s"), "--load", str(tmp_path / "s")])
    args = validate_args(parse_args(), {})
    non_plain = {k for k, v in vars(args).items()
                 if type(v) not in (int, float, str, bool, list, dict, type(None))}
    assert {"attention_backend", "params_dtype", "exit_signal"} <= non_plain  # enums, dtypes

    from iso_megatron.megatron.checkpoint import checkpoint_args
    from iso_megatron.megatron.checkpoint.unpickle import torch_load_file

    path = _save_torch_shard(str(tmp_path / "ckpt"), {"args": args})
    _assert_same(args, torch_load_file(path)["args"], "args")
    stored = checkpoint_args(str(tmp_path / "ckpt"))
    assert stored["num_query_groups"] == 2 and stored["bf16"] is True


def test_allowlist_is_exact_whatever_else_registered(tmp_path):
    """Types that megatron-core (or anyone) registered process-wide with torch are not allowed
    while a checkpoint is read, and stay registered after."""
    from iso_megatron.megatron.checkpoint import find_checkpoint

    root = str(tmp_path / "ckpt")
    path = _save_torch_shard(root, {"args": _args(), "extra": Registered()})
    torch.serialization.add_safe_globals([Registered])
    try:
        assert isinstance(torch.load(path, weights_only=True)["extra"], Registered)
        with pytest.raises(ValueError) as e:
            find_checkpoint(root)
        _assert_refused(e, path, f"{__name__}.Registered")
        assert Registered in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(
            [g for g in torch.serialization.get_safe_globals() if g is not Registered])


class Registered:
    """A harmless class someone registered with torch.serialization.add_safe_globals."""


def test_refusal_imports_nothing_the_file_names(tmp_path):
    """A file naming a function of an installed module that is not imported is refused without
    that module being imported (importing runs the module's code)."""
    import tabnanny

    from iso_megatron.megatron.checkpoint import find_checkpoint

    class Check:
        def __reduce__(self):
            return tabnanny.check, (str(tmp_path),)

    root = str(tmp_path / "ckpt")
    path = _save_torch_shard(root, {"args": _args(), "check": Check()})  # pickle imports it
    sys.modules.pop("tabnanny")
    with pytest.raises(ValueError) as e:
        find_checkpoint(root)
    _assert_refused(e, path, "tabnanny.check")
    assert "tabnanny" not in sys.modules


# --- every rank ---------------------------------------------------------------------------------

def rank_refusals(root: str) -> dict:
    """On each of 2 ranks at TP 2: load_checkpoint of a torch shard and of each torch_dist layout
    holding a payload: refused (the error and its message); then with trust_checkpoint, loaded:
    the torch_dist fixture's own logits."""
    import torch.distributed as dist

    from iso_megatron.megatron.checkpoint import load_checkpoint
    from tests import ckpt_fixtures as fx
    from tests.cases_checkpoint import _catch, build_iso
    from tests.ranks import rel_err

    dirs = {name: os.path.join(root, name) for name in ("torch", *DIST_FIXTURES)}
    if dist.get_rank() == 0:
        _save_torch_shard(dirs["torch"], {"args": _args(), "payload": CreatesFile(
            os.path.join(root, "marker-torch"))})
        for layout in DIST_FIXTURES:
            marker = os.path.join(root, f"marker-{layout}")
            _torch_dist_with(dirs[layout], layout, CreatesFile(marker))
    dist.barrier()
    fx.setup(2)
    out = {}
    for name, d in dirs.items():
        out[name] = _catch(lambda: load_checkpoint(build_iso("gpt"), d))
        out[f"{name}-created"] = os.path.exists(os.path.join(root, f"marker-{name}"))
    dist.barrier()
    for layout in DIST_FIXTURES:
        ref = torch.load(os.path.join(FIXTURES_DIR, DIST_FIXTURES[layout], "reference.pt"),
                         weights_only=True)
        model = build_iso(ref["family"], **ref["model"])
        load_checkpoint(model, dirs[layout], trust_checkpoint=True)
        logits = fx.forward(model, torch.tensor([ref["prompt"]])).float()
        out[f"{layout}-trusted-err"] = rel_err(logits, ref["logits"])
        out[f"{layout}-trusted-created"] = os.path.exists(os.path.join(root, f"marker-{layout}"))
    return out


@pytest.mark.multiprocess
def test_refused_on_every_rank_and_loaded_when_trusted(tmp_path):
    from tests.harness import run_ranks
    from tests.ranks import FP32_REL_TOL

    ranks = run_ranks(2, rank_refusals, str(tmp_path), timeout=300)
    for name in ("torch", *DIST_FIXTURES):
        got = [r[name] for r in ranks]
        assert all(g is not None for g in got), f"{name}: loaded: {got}"
        assert got[0]["message"] == got[1]["message"], got
        for g in got:
            assert g["type"] == "UnsafeCheckpointError" and g["value_error"], g
            assert PAYLOAD in g["message"] and "--trust-checkpoint" in g["message"], g
            assert os.path.join(str(tmp_path), name) in g["message"], g
        assert not any(r[f"{name}-created"] for r in ranks), name
    for layout in DIST_FIXTURES:
        for r in ranks:
            assert r[f"{layout}-trusted-created"], layout
            assert r[f"{layout}-trusted-err"] <= FP32_REL_TOL, (layout, r[f"{layout}-trusted-err"])
