"""Checkpoint-compatibility regression matrix through `torchrun launch/infer.py`.

Stock megatron-core models are saved the way users have them (tests.ckpt_fixtures: Megatron
torch and torch_dist, TE key names, a real DeepSpeed engine, Megatron-DeepSpeed legacy names) at
TP 1 or 2, then loaded by the launcher with ISO at TP 1 or 2. Its greedy tokens must equal the
stock model's own, its prompt logits within fp32 tolerance. (tests/test_checkpoint.py runs the
loader's full format x TP x TP matrix in-process; this is the end-to-end path.)

Pipeline parallelism: checkpoints saved at PP 1 loaded into two stages, and a stock model saved at
TP 2 x PP 2 in both formats resharded along (2, 2) -> (1, 2) -> (2, 1) (tests/cases_ckpt_pp.py).
"""

import json

import pytest
import torch

from tests.ckpt_fixtures import PROMPT, STEPS
from tests.harness import run_ranks, run_torchrun

pytestmark = pytest.mark.multiprocess

# (format, family, saved TP, load TP)
MATRIX = [("torch", "llama", 1, 2), ("torch", "gpt", 2, 2), ("torch_dist", "gpt", 2, 1),
          ("torch_dist", "llama", 2, 2), ("te", "gpt", 1, 2), ("deepspeed", "llama", 2, 2),
          ("legacy", "gpt", 2, 1), ("legacy", "llama", 1, 2)]
FAMILY_FLAGS = {  # DeepSpeed engine checkpoints store no Megatron args: give the shape
    "llama": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
              "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "160",
              "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
              "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
              "--max-position-embeddings", "4096", "--padded-vocab-size", "256"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    refs = {}
    for saved_tp in (1, 2):
        specs = [(f, fam, str(root / f"{f}-{fam}-tp{t}")) for f, fam, t, _ in MATRIX if t == saved_tp]
        specs = list(dict.fromkeys(specs))
        out = run_ranks(saved_tp, "tests.cases_infer:save_all", specs, saved_tp, timeout=300)[0]
        for (f, fam, d), ref in zip(specs, out):
            refs[(f, fam, saved_tp)] = (d, ref)
    return refs


@pytest.mark.parametrize("fmt,family,saved_tp,load_tp", MATRIX,
                         ids=[f"{f}-{fam}-tp{s}to{l}" for f, fam, s, l in MATRIX])
def test_launcher_reproduces_stock_generation(checkpoints, tmp_path, fmt, family, saved_tp, load_tp):
    directory, ref = checkpoints[(fmt, family, saved_tp)]
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    model_flags = (FAMILY_FLAGS[family] + ["--ckpt-format", "deepspeed"] if fmt == "deepspeed"
                   else ["--use-checkpoint-args"])
    rc, log = run_torchrun(load_tp, [
        "launch/infer.py", "--load", directory, *model_flags,
        "--prompt-token-ids", ",".join(map(str, PROMPT[0].tolist())),
        "--num-tokens-to-generate", str(STEPS), "--iso-min-tokens", "0",
        "--output-json", str(out_json), "--save-logits", str(out_logits)], timeout=300)
    assert rc == 0, log[-4000:]
    rec = json.loads(out_json.read_text())
    assert rec["tp"] == load_tp
    assert (rec["iso_chunk_bounds"] is not None) == (load_tp > 1)  # ISO ran wherever it can
    assert rec["generated_token_ids"] == ref["tokens"]
    logits = torch.load(out_logits)[0]
    want = ref["logits"][0]
    err = float((logits - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err


def test_launcher_names_a_shape_mismatch(checkpoints):
    directory, _ = checkpoints[("deepspeed", "llama", 2)]
    flags = list(FAMILY_FLAGS["llama"])
    flags[flags.index("--ffn-hidden-size") + 1] = "128"  # the checkpoint has 160
    rc, log = run_torchrun(2, ["launch/infer.py", "--load", directory, "--ckpt-format", "deepspeed",
                               *flags, "--prompt-token-ids", "1,2,3"], timeout=180)
    assert rc != 0
    assert "linear_fc1.weight" in log and "160" in log and "128" in log, log[-3000:]


def test_launcher_reports_no_checkpoint(tmp_path):
    rc, log = run_torchrun(2, ["launch/infer.py", "--load", str(tmp_path), "--use-checkpoint-args",
                               "--prompt-token-ids", "1,2,3"], timeout=180)
    assert rc != 0
    assert "no checkpoint" in log.lower(), log[-3000:]


# (format, family, saved TP) saved at PP 1, loaded at TP 1 x PP 2: torch_dist through
# dist_checkpointing; torch / DeepSpeed shards merged, then sliced for each stage (gpt: tied
# embeddings, which megatron syncs between the first and last stage at build time)
PIPELINE = [("torch_dist", "llama", 2), ("torch_dist", "gpt", 2), ("torch", "llama", 1),
            ("deepspeed", "llama", 2)]


def _launch(tmp_path, directory, model_flags, tp, pp):
    """launch/infer.py at TP x PP on tp * pp processes: (its JSON record, its prompt logits)."""
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    rc, log = run_torchrun(tp * pp, [
        "launch/infer.py", "--load", directory, *model_flags,
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--prompt-token-ids", ",".join(map(str, PROMPT[0].tolist())),
        "--num-tokens-to-generate", str(STEPS), "--iso-min-tokens", "0",
        "--output-json", str(out_json), "--save-logits", str(out_logits)], timeout=300)
    assert rc == 0, log[-4000:]
    return json.loads(out_json.read_text()), torch.load(out_logits)[0]


@pytest.mark.parametrize("fmt,family,saved_tp", PIPELINE, ids=[f"{f}-{fam}-tp{s}" for f, fam, s in PIPELINE])
def test_launcher_pipeline_stages_reproduce_stock_generation(checkpoints, tmp_path, fmt, family, saved_tp):
    """--pipeline-model-parallel-size 2: the prompt's chunks flow through the two stages (ISO's
    chunked pipeline prefill at TP 1), the greedy tokens and logits are the stock model's."""
    directory, ref = checkpoints[(fmt, family, saved_tp)]
    flags = (FAMILY_FLAGS[family] + ["--ckpt-format", "deepspeed"] if fmt == "deepspeed"
             else ["--use-checkpoint-args"])
    rec, logits = _launch(tmp_path, directory, flags, 1, 2)
    assert rec["iso_chunk_bounds"] is not None  # chunked even at TP 1: there is a pipeline
    assert rec["generated_token_ids"] == ref["tokens"]
    want = ref["logits"][0]
    err = float((logits - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err


# --- checkpoints saved with pipeline parallelism: the resharding chain (2,2) -> (1,2) -> (2,1) ---

@pytest.fixture(scope="module")
def pp_chain(tmp_path_factory):
    """A stock GPT model (tied embeddings, 4 layers) saved at TP 2 x PP 2 in both formats (one
    4-rank start), its reference; then at (1, 2), loaded by the loader and saved again (legacy
    Megatron-LM names for `torch`), two damaged copies loaded, and an uneven (1 + 3 layers)
    re-save read back into even stages (tests/cases_ckpt_pp.py)."""
    root = str(tmp_path_factory.mktemp("pp_ckpts"))
    saved = run_ranks(4, "tests.cases_ckpt_pp:save_tp2_pp2", root, timeout=400)
    ref = next(r for r in saved if r is not None)
    bad = run_ranks(2, "tests.cases_ckpt_pp:resave_tp1_pp2", root, timeout=300)
    return root, ref, bad


# (format, saved at, load TP, load PP): (2, 2) -> (1, 2), then its (1, 2) re-save -> (2, 1)
CHAIN = [("torch", "tp2pp2", 1, 2), ("torch", "tp1pp2", 2, 1),
         ("torch_dist", "tp2pp2", 1, 2), ("torch_dist", "tp1pp2", 2, 1)]


@pytest.mark.parametrize("fmt,saved,tp,pp", CHAIN, ids=[f"{f}-{s}-to-tp{t}pp{p}" for f, s, t, p in CHAIN])
def test_pipeline_checkpoints_reshard_along_the_chain(pp_chain, tmp_path, fmt, saved, tp, pp):
    """Checkpoints saved at PP 2 (each stage's layers numbered from 0, the tied embeddings'
    copy on the last stage) load at another (TP, PP) with ISO and reproduce the stock model."""
    root, ref, _ = pp_chain
    rec, logits = _launch(tmp_path, f"{root}/{fmt}-{saved}", ["--use-checkpoint-args"], tp, pp)
    assert rec["tp"] == tp
    assert rec["iso_chunk_bounds"] is not None, rec  # ISO cut the prompt (TP 2, or a pipeline)
    assert rec["generated_token_ids"] == ref["tokens"]
    want = ref["logits"][0]
    err = float((logits - want).abs().max() / want.abs().max())
    print(f"\n{fmt} saved {saved} -> TP {tp} x PP {pp}: logits rel. err {err:.2e}, chunks "
          f"{rec['iso_chunk_bounds']}, tokens {rec['generated_token_ids']}")
    assert err <= 1e-5, err


BAD_LAYOUT = {"uneven": ["mp_rank_00_000", "decoder_first_pipeline_num_layers=1", "holds layers 0..1",
                         "gives that stage 1 layer", "does not match the files"],
              "stages": ["pipeline_model_parallel_size=4", "2 pipeline stages", "does not match the files"]}


@pytest.mark.parametrize("case", list(BAD_LAYOUT))
def test_pipeline_checkpoint_whose_stored_layout_does_not_match_its_files(pp_chain, case):
    _, _, bad = pp_chain
    got = [rank[case] for rank in bad]
    assert all(g is not None and g["type"] == "CheckpointError" for g in got), got
    assert got[0]["message"] == got[1]["message"], got  # every rank raises the same
    for needle in BAD_LAYOUT[case]:
        assert needle in got[0]["message"], (needle, got[0]["message"])


def test_uneven_pipeline_checkpoint_loads_into_even_stages(pp_chain):
    """A checkpoint saved by megatron-core stages of 1 + 3 layers (its stored
    decoder_first_pipeline_num_layers=1) loads into 2 + 2 stages: the same weights as the (2, 2)
    checkpoint it came from, loaded directly."""
    _, _, bad = pp_chain
    assert [rank["uneven_saved_layers"] for rank in bad] == [[0], [0, 1, 2]]  # megatron's own split
    for rank in bad:
        assert any(".layers." in k for k in rank["uneven_roundtrip_keys"])
        assert rank["uneven_roundtrip_diff"] == 0.0, rank["uneven_roundtrip_diff"]


def test_use_mp_args_from_checkpoint_args_takes_the_stored_sizes(pp_chain, monkeypatch, capsys):
    """--use-checkpoint-args reshards to the sizes given; with Megatron-LM's
    --use-mp-args-from-checkpoint-args the stored TP and PP win and must fit the processes
    (checked before any process group: every rank says the same)."""
    from launch import infer

    root, _, _ = pp_chain
    base = ["--use-checkpoint-args", "--prompt-token-ids", "1,2,3"]
    for saved, world, sizes in (("torch-tp1pp2", 2, (1, 2)), ("torch_dist-tp2pp2", 4, (2, 2))):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args, _ = infer.prepare_args(["--load", f"{root}/{saved}", *base, "--use-mp-args-from-checkpoint-args",
                                      "--tensor-model-parallel-size", "7"])  # the stored size wins
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == sizes
    monkeypatch.setenv("WORLD_SIZE", "2")
    args, _ = infer.prepare_args(["--load", f"{root}/torch_dist-tp2pp2", *base])  # resharded: TP 2
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    with pytest.raises(SystemExit) as e:
        infer.prepare_args(["--load", f"{root}/torch_dist-tp2pp2", *base, "--use-mp-args-from-checkpoint-args"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "tensor-model-parallel size 2 x pipeline-model-parallel size 2 = 4 processes, but 2 run" in err, err
