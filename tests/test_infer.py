"""launch/infer.py: the embedded default end to end under torchrun, and its flag errors."""

import json

import pytest

from launch import infer
from tests.harness import run_torchrun
FIELDS = {"prompt_token_ids", "generated_token_ids", "generated_text", "prefill_ms",
          "decode_ms_per_token", "tp", "iso", "baseline_prefill_ms", "max_abs_logit_diff"}


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory):
    out = {}
    for tp in (1, 2):
        path = tmp_path_factory.mktemp("infer") / f"tp{tp}.json"
        rc, log = run_torchrun(tp, ["launch/infer.py", "--compare-baseline", "--timing-repeats", "1",
                                    "--num-tokens-to-generate", "8", "--output-json", str(path)],
                               timeout=300)
        assert rc == 0, log[-3000:]
        out[tp] = (json.loads(path.read_text()), log)
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp", [1, 2])
def test_embedded_default_writes_the_json_fields(embedded_runs, tp):
    rec, log = embedded_runs[tp]
    assert FIELDS <= set(rec), FIELDS - set(rec)
    assert rec["tp"] == tp
    assert rec["iso"] == {"enabled": True, "num_chunks": 2, "split": "balanced", "min_tokens": 512}
    assert len(rec["generated_token_ids"]) == 8
    assert len(rec["prompt_token_ids"]) > 512  # the default prompt is long enough for ISO
    assert rec["max_abs_logit_diff"] < 1e-4
    assert rec["prefill_ms"] > 0 and rec["baseline_prefill_ms"] > 0
    # ISO runs at TP 2 and steps aside at TP 1
    assert (rec["iso_chunk_bounds"] is not None) == (tp == 2)
    assert "prefill" in log and "stock prefill" in log  # rank 0 printed the summary


@pytest.mark.multiprocess
def test_embedded_default_is_the_same_model_at_every_tp(embedded_runs):
    # CPU initialisation builds the full matrices from the seed, then shards them: TP 1 and 2
    # hold the same model, so greedy tokens agree (ISO at TP 2, stock at TP 1)
    assert embedded_runs[1][0]["generated_token_ids"] == embedded_runs[2][0]["generated_token_ids"]


def _prepare(argv, world=1, monkeypatch=None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return infer.prepare_args(argv)


@pytest.mark.parametrize("argv,world,message", [
    (["--tensor-model-parallel-size", "3"], 2, "--tensor-model-parallel-size (3) must equal the number of processes (2)"),
    (["--num-attention-heads", "6", "--hidden-size", "96"], 4, "--num-attention-heads (6) must be divisible by --tensor-model-parallel-size (4)"),
    (["--num-attention-heads", "12", "--num-query-groups", "3", "--hidden-size", "96"], 4,
     "--num-query-groups (3) must be a multiple or divisor of --tensor-model-parallel-size (4)"),
    (["--bf16", "--fp16"], 1, "mutually exclusive"),
    (["--iso-chunks", "0"], 1, "num_chunks must be >= 1"),
    (["--iso-split", "0.5,0.6"], 1, "sum to 1"),
    (["--iso-split", "fast"], 1, "--iso-split: expected even, balanced, auto"),
    (["--use-checkpoint-args"], 1, "--use-checkpoint-args needs --load"),
    (["--load", "/nonexistent/ckpt"], 1, "--load /nonexistent/ckpt: no such directory"),
    (["--prompts", "a", "--prompt-token-ids", "1,2"], 1, "only one of --prompts"),
    (["--prompt-token-ids", "1,x"], 1, "comma-separated integers"),
    (["--prompt-token-ids", "1,99999"], 1, "prompt token id 99999 outside the vocabulary"),
    (["--prompt-token-ids", "1,-2"], 1, "prompt token id -2 outside the vocabulary [0, 512)"),
    (["--prompt-token-ids", "1.5,2"], 1, "comma-separated integers"),
    (["--prompt-token-ids", ","], 1, "--prompt-token-ids is empty"),
    (["--prompts", ""], 1, "a prompt tokenizes to no tokens"),
    (["--num-tokens-to-generate", "-1"], 1, "--num-tokens-to-generate must be >= 1"),
    (["--seq-length", "16", "--prompt-token-ids", ",".join(["7"] * 17)], 1,
     "prompt (17 tokens) + --num-tokens-to-generate (16) exceed --max-position-embeddings (16)"),
    (["--max-position-embeddings", "64", "--prompt-token-ids", ",".join(["7"] * 60)], 1,
     "prompt (60 tokens) + --num-tokens-to-generate (16) exceed --max-position-embeddings (64)"),
    (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size (2) must equal the number of processes (3)"),
    (["--num-tokens-to-generate", "5000"], 1, "exceed --max-position-embeddings"),
    (["--no-such-flag"], 1, "unrecognized arguments: --no-such-flag"),
    (["--deepspeed-config", "x.json"], 1, "--deepspeed-config needs --deepspeed"),
    (["--deepspeed", "--deepspeed-config", "BAD_JSON"], 1, "Expecting property name"),
    (["--load", "A_FILE"], 1, "a file, not a checkpoint directory"),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 2,
     "--tensor-model-parallel-size (2) x --pipeline-model-parallel-size (2) must equal the number of processes (2)"),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"], 2,
     "virtual pipeline stages"),
    (["--pipeline-model-parallel-size", "2", "--deepspeed"], 2, "with --deepspeed is not supported"),
    (["--pipeline-model-parallel-size", "3", "--num-layers", "4"], 3, "--num-layers (4) does not split over 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--decoder-first-pipeline-num-layers", "4"],
     2, "the other stages need an equal number of layers, at least one each"),
    (["--decoder-last-pipeline-num-layers", "1"], 1, "need --pipeline-model-parallel-size > 1"),
])
def test_flag_errors_are_megatron_style(argv, world, message, monkeypatch, capsys, tmp_path):
    bad_json, a_file = tmp_path / "ds.json", tmp_path / "model_optim_rng.pt"
    bad_json.write_text("{bad")
    a_file.write_bytes(b"")
    argv = [{"BAD_JSON": str(bad_json), "A_FILE": str(a_file)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        _prepare(argv, world, monkeypatch)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.multiprocess
def test_flag_error_exits_every_rank(tmp_path):
    # torchrun stops the other rank once one fails; returning at all (no timeout) is the point
    rc, log = run_torchrun(2, ["launch/infer.py", "--num-query-groups", "3"], timeout=120)
    assert rc != 0
    assert "--num-query-groups (3) must be a multiple or divisor of --tensor-model-parallel-size (2)" in log


@pytest.mark.multiprocess
def test_deepspeed_path_with_iso_key(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"dtype": "fp32", "iso": {"enabled": True, "num_chunks": 3,
                                                        "split": "even", "min_tokens": 0}}))
    out = tmp_path / "out.json"
    rc, log = run_torchrun(2, ["launch/infer.py", "--deepspeed", "--deepspeed-config", str(ds),
                               "--num-tokens-to-generate", "4", "--compare-baseline",
                               "--timing-repeats", "1", "--output-json", str(out)], timeout=300)
    assert rc == 0, log[-3000:]
    rec = json.loads(out.read_text())
    assert rec["iso"] == {"enabled": True, "num_chunks": 3, "split": "even", "min_tokens": 0}
    assert len(rec["iso_chunk_bounds"]) == 4  # 3 chunks ran inside DeepSpeed's engine
    assert rec["max_abs_logit_diff"] < 1e-4


def test_output_files_are_written_atomically(tmp_path):
    """A writer that fails half-way leaves the previous file whole and no temporary behind;
    one that succeeds replaces it (what --output-json, --save-logits and the bench's JSON use)."""
    import json

    import torch

    from iso_megatron import cli

    path = tmp_path / "out.json"
    cli.write_json(str(path), {"good": 1})

    def half_then_crash(f):
        f.write('{"half": ')
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        cli.write_atomically(str(path), half_then_crash)
    assert json.loads(path.read_text()) == {"good": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    cli.write_json(str(path), {"new": [1, 2]})
    assert json.loads(path.read_text()) == {"new": [1, 2]}
    logits = tmp_path / "sub" / "logits.pt"  # a missing folder is made, as before
    cli.write_atomically(str(logits), lambda f: torch.save([torch.arange(3)], f), binary=True)
    assert torch.equal(torch.load(logits)[0], torch.arange(3))
