"""Multi-node, for real: two torchrun agents joined by torchrun's c10d rendezvous (`--nnodes 2
--rdzv-backend c10d`, as on two machines; here both on this one), two workers each. Megatron's
rank order puts a tensor-parallel group on consecutive ranks, i.e. inside one agent's node, and
the pipeline across the nodes: TP 2 inside, PP 2 across. The same command runs across real
nodes (NCCL there; README "Run a Megatron checkpoint").

Reference: the stock megatron-core model that saved the checkpoint (TP 2, no pipeline), its own
greedy tokens and prompt logits.
"""

import json

import pytest
import torch

from tests.ckpt_fixtures import PROMPT, STEPS
from tests.harness import run_ranks, run_torchrun_agents

pytestmark = pytest.mark.multiprocess


def test_two_nodes_tp_inside_pp_across_reproduce_stock_generation(tmp_path):
    directory = str(tmp_path / "torch_dist-llama-tp2")
    ref = run_ranks(2, "tests.cases_infer:save_all", [("torch_dist", "llama", directory)], 2, timeout=300)[0][0]
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.pt"
    results = run_torchrun_agents(2, [
        "launch/infer.py", "--load", directory, "--use-checkpoint-args",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--prompt-token-ids", ",".join(map(str, PROMPT[0].tolist())),
        "--num-tokens-to-generate", str(STEPS), "--iso-min-tokens", "0",
        "--output-json", str(out_json), "--save-logits", str(out_logits)],
        timeout=300, nproc_per_node=2, rendezvous="c10d", wait_for=(0, 1))
    logs = "\n".join(f"--- agent {n}: rc {rc}, {t} s\n{log[-2500:]}" for n, (rc, log, t) in enumerate(results))
    assert all(rc == 0 for rc, _, _ in results), logs
    rec = json.loads(out_json.read_text())  # written by global rank 0 (first stage, TP rank 0)
    assert rec["tp"] == 2
    assert rec["iso_chunk_bounds"] is not None, rec  # ISO's chunks flowed through the stages
    assert rec["generated_token_ids"] == ref["tokens"]
    logits, want = torch.load(out_logits)[0], ref["logits"][0]
    err = float((logits - want).abs().max() / want.abs().max())
    print(f"\nTP 2 x PP 2 on two c10d agents: chunks {rec['iso_chunk_bounds']}, logits rel. err {err:.2e}, "
          f"tokens {rec['generated_token_ids']}")
    assert err <= 1e-5, err
