"""Performance tooling: emulated link, automatic split, benchmark. No assertion on real speed:
times are only checked against the link's own modelled holds (lower bounds, loose upper ones)."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from iso_megatron import costmodel as cm
from iso_megatron.emulated import LinkModel, link_for_profile, parse_profile, profile_ratio
from tests.harness import ROOT, run_ranks

SLACK = 0.25  # s: upper tolerance of a hold on a busy 2-core machine


# ---------------------------------------------------------------- pure functions

def test_link_model_reproduces_the_ratio():
    m = LinkModel.for_ratio(2.0, compute_s=0.5, num_reduces=8, nbytes=1 << 20, latency_fraction=0.25)
    assert 8 * m.seconds(1 << 20) == pytest.approx(1.0)
    assert m.latency_s == pytest.approx(0.25 * 0.125)
    assert m.seconds(0) == 0.0
    with pytest.raises(ValueError):
        LinkModel.for_ratio(1.0, 1.0, 2, 100, latency_fraction=1.0)


def test_profiles():
    assert parse_profile("ratio:0.5") == ("ratio", 0.5)
    assert profile_ratio("ratio:2", 1024) == (2.0, 0.0)
    dev, link, model, tp = cm.parse_gpu_profile("gpu:4090/30b/tp4")
    r, lat = profile_ratio("gpu:4090/30b/tp4", 1024)
    assert r == pytest.approx(cm.ratio_profile(model, dev, link, tp, 1024))
    assert 0 < lat < 0.05
    m = link_for_profile("gpu:a800/30b/tp4", 2048, 1, 0.3, 8, 512, 4)
    r, _ = profile_ratio("gpu:a800/30b/tp4", 2048)
    assert 16 * m.seconds(2048 * 512 * 4) == pytest.approx(r * 0.3)
    for bad in ("ratio:x", "gpu:4090/30b", "foo", "ratio:-1"):
        with pytest.raises(ValueError):
            parse_profile(bad)


class _Cfg:
    num_layers, hidden_size, num_attention_heads, num_query_groups = 8, 512, 8, 4
    ffn_hidden_size, gated_linear_unit, kv_channels = 1408, True, 64

    import torch as _t
    params_dtype = _t.float32


@pytest.mark.parametrize("latency_us,busbw", [(0, 1e6), (50, 5.0), (20, 0.5), (2000, 0.05), (0, 0.02)])
@pytest.mark.parametrize("score_s", [0.0, 4e-9])
def test_auto_plan_never_predicted_slower_and_deterministic(latency_us, busbw, score_s):
    from iso_megatron import autosplit

    table = ((1024.0 ** 2 / 4, score_s), (1024.0 ** 2, 1.5 * score_s)) if score_s else ()
    cal = autosplit.Calibration(0.1, 20.0, table, latency_us, busbw, 4e-4)
    shape = cm.ModelShape.from_megatron_config(_Cfg)
    for s in (32, 200, 512, 1024, 1500, 2048, 4096):
        autosplit.clear_cache()
        p1 = autosplit.plan_for(_Cfg, s, 1, 2, 4, calibration=cal)
        autosplit.clear_cache()
        assert autosplit.plan_for(_Cfg, s, 1, 2, 4, calibration=cal) == p1  # deterministic
        if p1.fractions is None:
            continue
        assert p1.predicted_ms <= p1.baseline_ms * (1 - autosplit.MIN_GAIN)
        from iso_megatron.split import chunk_boundaries

        b = chunk_boundaries(s, len(p1.fractions), list(p1.fractions))
        p = cm.predict(shape, cal.device(), cal.link(), 2, s, boundaries=b, dtype_bytes=4)
        assert p.iso_ms <= p.baseline_ms
        # and at least as good as an even split, as predicted
        even = cm.predict(shape, cal.device(), cal.link(), 2, p1.bucket, split="even", dtype_bytes=4)
        assert p1.predicted_ms <= even.iso_ms * (1 + 1e-9)


def test_attention_score_table_interpolates_and_clamps():
    table = ((100.0, 1e-9), (10000.0, 3e-9))
    assert cm.score_seconds(table, 10.0) == 1e-9
    assert cm.score_seconds(table, 1e6) == 3e-9
    assert cm.score_seconds(table, 1000.0) == pytest.approx(2e-9)
    dev = cm.DeviceProfile("cpu", 0.1, 20.0, attn_score_table=table)
    shape = cm.ModelShape("t", 1, 64, 4, 4, 128, False)
    c = cm.chunk_costs(shape, dev, cm.LINKS["4090"], 2, 0, 50)["attn"].compute_s
    gemms = (cm.gemm_time(50, 64, 64 * 3 / 2, dev, 2) + cm.gemm_time(50, 32, 64, dev, 2))
    assert c - gemms == pytest.approx(cm.score_seconds(table, 2500) * 2 * 50 * 50)


def test_bucket():
    from iso_megatron.autosplit import bucket_of

    assert bucket_of(10) == 10
    assert bucket_of(1024) == 1024 and bucket_of(2048) == 2048
    assert 1024 < bucket_of(1025) <= 1120
    assert all(bucket_of(s) >= s for s in range(1, 5000, 7))


# ---------------------------------------------------------------- two real ranks

@pytest.fixture(scope="module")
def perf():
    return run_ranks(2, "tests.cases_perf:perf_group", timeout=240)


def test_emulated_link_results_are_real_sums(perf):
    for rank in perf:
        link = rank["link"]
        assert link["sum_shm"] and link["sum_lazy"] and link["sum_eager"] and link["held_sum_ok"]
        assert link["sum_shm_ring"]
        assert link["queue_sums"] == [0.0, 2.0, 4.0]  # each rank contributed i


def test_emulated_link_holds_completion_to_the_model(perf):
    for rank in perf:
        link = rank["link"]
        assert link["held_s"] >= link["held_model_s"] - 1e-4
        assert link["held_s"] <= link["held_model_s"] + SLACK
        assert link["idle_start_gap_s"] < 5e-3  # an idle link takes a transfer at once


def test_emulated_link_queues_in_order(perf):
    for rank in perf:
        log = rank["link"]["queue_log"]
        assert len(log) == 3
        for prev, cur in zip(log, log[1:]):
            issued, started, done, _ = cur
            assert started == pytest.approx(max(issued, prev[2]), abs=1e-9)
            assert done == pytest.approx(started + 0.030, abs=1e-9)
        assert rank["link"]["queue_last_s"] >= 0.090 - 1e-4  # the third waits for the first two


def test_models_over_emulated_link_match_stock(perf):
    for rank in perf:
        m = rank["model"]
        assert m["stock_err"] == 0.0  # the same stock code, the same real all-reduces
        assert m["stock_transfers"] == 3 * 2 + 1  # row-parallel reduces + the embedding's
        assert m["stock_s"] >= 7 * 0.004 - 1e-4  # every synchronous reduce paid its hold
        for k in (2, 3):
            assert m[f"iso{k}_err"] <= 1e-5
            assert m[f"iso{k}_transfers"] == 3 * 2 * k + 1
            assert m[f"iso{k}_ordered"]
        assert m["auto_err"] <= 1e-5


def test_auto_split_identical_on_every_rank(perf):
    a, b = (rank["autosplit"] for rank in perf)
    assert a["cals"] == b["cals"]  # the MAX-combined calibration: bit-identical
    assert a["plans"] == b["plans"]
    assert perf[0]["model"]["auto_last"] == perf[1]["model"]["auto_last"]
    plans = a["plans"]
    assert plans[0][1] is None  # 64 tokens on a fast link: stock
    # a slow link with long prompts: a split is chosen
    assert any(bounds is not None for s, bounds, _ in plans if s >= 1500)


# ---------------------------------------------------------------- the benchmark, end to end

def _run(cmd, timeout):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                             PYTHONPATH=ROOT))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out.decode(errors='replace')[-3000:]}")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "160", "--reps", "2",
        "--compute-reps", "1", "--seq-lens", "96,160"]


def _check_records(path, n, splits):
    from launch.bench import FIELDS

    with open(path) as f:
        records = json.load(f)
    assert len(records) == n
    for r in records:
        missing = [k for k in FIELDS if k not in r]
        assert not missing, missing
        assert r["split"] in splits and r["num_chunks"] >= 1
        assert r["max_rel_err"] <= 1e-5
        assert r["ideal_ms"] == max(r["compute_ms"], r["comm_ms"])
        assert r["time_reduction"] == pytest.approx(1 - r["iso_ms"] / r["baseline_ms"])
    return records


def test_bench_end_to_end_two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        png = os.path.join(tmp, "bench.png")
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "launch/bench.py", "--profiles", "ratio:1,gpu:4090/30b/tp4", "--splits", "even,auto",
              "--output-json", out, "--plot", png] + TINY, timeout=150)
        records = _check_records(out, 2 * 2 * 2, {"even", "auto"})
        assert {r["profile"] for r in records} == {"ratio:1", "gpu:4090/30b/tp4"}
        assert all(r["tp"] == 2 and r["link"] == "emulated" for r in records)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        assert os.path.getsize(png) > 0


def test_bench_gpu_proxy_path_runs_on_cpu():
    """The single-GPU path (partial sums copied device->host->device off the compute stream)
    with the CPU standing in for the GPU: keeps `--device cuda`'s code from rotting."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "proxy.json")
        _run([sys.executable, "launch/bench.py", "--link", "proxy", "--splits", "balanced",
              "--output-json", out] + TINY, timeout=120)
        records = _check_records(out, 2, {"balanced"})
        assert all(r["link"] == "proxy" and r["num_chunks"] == 2 for r in records)
