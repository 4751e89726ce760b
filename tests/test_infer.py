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
    (["--prompt-token-ids", "1,99999"], 1, "outside the vocabulary"),
    (["--num-tokens-to-generate", "5000"], 1, "exceed --max-position-embeddings"),
    (["--no-such-flag"], 1, "unrecognized arguments: --no-such-flag"),
    (["--deepspeed-config", "x.json"], 1, "--deepspeed-config needs --deepspeed"),
])
def test_flag_errors_are_megatron_style(argv, world, message, monkeypatch, capsys):
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
