"""Checkpoint-compatibility regression matrix through `torchrun launch/infer.py`.

Stock megatron-core models are saved the way users have them (tests.ckpt_fixtures: Megatron
torch and torch_dist, TE key names, a real DeepSpeed engine, Megatron-DeepSpeed legacy names) at
TP 1 or 2, then loaded by the launcher with ISO at TP 1 or 2. Its greedy tokens must equal the
stock model's own, its prompt logits within fp32 tolerance. (tests/test_checkpoint.py runs the
loader's full format x TP x TP matrix in-process; this is the end-to-end path.)
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


# (format, family, saved TP) loaded at TP 1 x PP 2: dist_checkpointing reshards to the stages;
# gpt: tied embeddings, which megatron syncs between the first and last stage at build time
PIPELINE = [("torch_dist", "llama", 2), ("torch_dist", "gpt", 2)]


@pytest.mark.parametrize("fmt,family,saved_tp", PIPELINE, ids=[f"{f}-{fam}-tp{s}" for f, fam, s in PIPELINE])
def test_launcher_pipeline_stages_reproduce_stock_generation(checkpoints, tmp_path, fmt, family, saved_tp):
    """--pipeline-model-parallel-size 2: the prompt's chunks flow through the two stages (ISO's
    chunked pipeline prefill at TP 1), the greedy tokens and logits are the stock model's."""
    directory, ref = checkpoints[(fmt, family, saved_tp)]
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    rc, log = run_torchrun(2, [
        "launch/infer.py", "--load", directory, "--use-checkpoint-args",
        "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "1",
        "--prompt-token-ids", ",".join(map(str, PROMPT[0].tolist())),
        "--num-tokens-to-generate", str(STEPS), "--iso-min-tokens", "0",
        "--output-json", str(out_json), "--save-logits", str(out_logits)], timeout=300)
    assert rc == 0, log[-4000:]
    rec = json.loads(out_json.read_text())
    assert rec["iso_chunk_bounds"] is not None  # chunked even at TP 1: there is a pipeline
    assert rec["generated_token_ids"] == ref["tokens"]
    logits = torch.load(out_logits)[0]
    want = ref["logits"][0]
    err = float((logits - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err


def test_launcher_refuses_what_pipeline_stages_cannot_load_yet(checkpoints):
    directory, _ = checkpoints[("torch", "llama", 1)]
    rc, log = run_torchrun(2, ["launch/infer.py", "--load", directory, "--use-checkpoint-args",
                               "--pipeline-model-parallel-size", "2", "--prompt-token-ids", "1,2,3"],
                           timeout=180)
    assert rc != 0 and "only torch_dist checkpoints reshard to pipeline stages" in log, log[-3000:]
