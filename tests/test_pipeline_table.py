"""launch/pipeline_table.py (docs/pipeline_predictions.md): it runs and covers every setting, its
numbers obey what pipelining and ISO can and cannot do, and its inputs match their sources."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from iso_megatron import costmodel as cm
from launch.pipeline_table import stage_layers_for

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"Llama-3-70B": 80, "Llama-3.1-405B": 126}  # name -> layers
PIPELINE_SIZES = (2, 4)
PROMPTS = ("8k", "16k", "32k", "64k", "128k")


@pytest.fixture(scope="module")
def table_rows():
    """{(model, pp, prompt): (stage layers, stock, chunked, chunked + ISO, bound)} from the
    script's own stdout (one run for every test here)."""
    run = subprocess.run([sys.executable, "launch/pipeline_table.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    section = run.stdout.split("## All rows", 1)[1].split("\n## ", 1)[0].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or cells[0] not in MODELS:
            continue
        pp = int(cells[1].rsplit("PP", 1)[1])
        key = (cells[0], pp, cells[3])
        assert key not in rows, f"duplicate row {key}"
        rows[key] = ([int(x) for x in cells[2].split("/")], *(float(x) for x in cells[4:8]))
    return rows


def test_table_has_every_setting(table_rows):
    expected = {(m, pp, n) for m in MODELS for pp in PIPELINE_SIZES for n in PROMPTS}
    assert set(table_rows) == expected
    for (model, pp, _), (layers, *_) in table_rows.items():
        assert len(layers) == pp and sum(layers) == MODELS[model]
        assert max(layers) - min(layers) <= 1  # 126 layers over 4 stages: 31/32/32/31


def test_chunking_and_iso_never_slower_and_pipelining_bounded(table_rows):
    for key, (_, stock, chunked, iso, bound) in table_rows.items():
        assert bound <= iso <= chunked <= stock, key
        # without ISO nothing overlaps the TP all-reduces: pipelining alone cannot beat 1/PP of
        # stock (each stage still does its share of the same work, chunking only adds to it)
        assert chunked >= stock / key[1], key
        assert chunked < stock, key  # at 8k and longer the plan does chunk


def test_uneven_layers_go_to_the_end_stages_or_refuse():
    assert stage_layers_for(126, 4) == [31, 32, 32, 31]
    assert stage_layers_for(80, 4) == [20, 20, 20, 20]
    with pytest.raises(ValueError, match="layers"):
        stage_layers_for(127, 2)


# meta-llama/Llama-3.1-405B config.json (the fields, written out here, not read from the preset)
LLAMA_405B_CONFIG = dict(num_hidden_layers=126, hidden_size=16384, num_attention_heads=128,
                         num_key_value_heads=8, intermediate_size=53248, vocab_size=128256,
                         tie_word_embeddings=False)  # no head_dim field: hidden / heads = 128


def _llama_params_with_norms(c):
    h = c["hidden_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    attn = h * h + 2 * h * kv + h * h                # q, k, v, o (no biases)
    mlp = 3 * h * c["intermediate_size"]             # gate, up, down
    layer = attn + mlp + 2 * h                       # two RMSNorms
    embed = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + embed + h  # final norm


def test_405b_preset_is_405b():
    preset = cm.MODELS["llama-3.1-405b"]
    count = _llama_params_with_norms(LLAMA_405B_CONFIG)
    assert abs(count / 405e9 - 1) < 0.02, count
    # the preset leaves out the norms (two per layer and a final one), nothing else
    norms = (2 * LLAMA_405B_CONFIG["num_hidden_layers"] + 1) * LLAMA_405B_CONFIG["hidden_size"]
    assert count - preset.params() == norms
    assert cm.ModelShape.from_hf_config(SimpleNamespace(**LLAMA_405B_CONFIG), gated=True,
                                        name=preset.name) == preset
    assert preset.head_dim == 128
    assert "Llama-3.1-405B" in cm.MODEL_SOURCES["llama-3.1-405b"]


def test_infiniband_link_moves_data_at_the_cited_rate():
    link = cm.P2P_LINKS["ib-ndr"]
    line_rate = 400e9 / 8  # NDR: 400 Gb/s per port, one port per GPU
    big = 4 * 2 ** 30
    achieved = big / link.seconds(big)
    # NCCL's maintainers: "For NDR @ 400Gbps you should see 46-48GB/s per NIC" (NVIDIA/nccl-tests#290)
    assert 46e9 * 0.999 <= achieved <= 48e9 and achieved < line_rate
    # a small transfer is all latency: tens of microseconds at most
    assert 1e-6 <= link.seconds(0) <= 50e-6
    # one 8k-token chunk of Llama-3.1-405B's hidden states (bf16): 268 MB in about 5.8 ms
    chunk = 8192 * 16384 * 2
    assert link.seconds(chunk) == pytest.approx(chunk / achieved, rel=0.01)
    assert link.source and "400" in link.source
