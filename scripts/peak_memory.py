"""Peak memory of one prefill, stock vs ISO, on CPU (issue 10: long prompts in bounded memory).

Each (attention, length, mode) runs in its own fresh process: build a small Llama-style model,
reset the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`), record the resident set
size, run one prefill (the launcher's: StaticInferenceContext, logits of every position), and
report the growth of the peak RSS (`VmHWM` of /proc/self/status) over the RSS just before the
prefill. That is what the prefill added at its worst moment: activations, scores, masks, KV
cache, logits (torch's CPU allocator returns large blocks to the system, so RSS follows them). ISO runs on one process with the TP stand-in
(`comm.stand_in_tp(2)`, all-reduces over a one-rank gloo group), so the chunked schedule is
what is measured.

    python3 scripts/peak_memory.py                      # the table in docs/peak_memory.md
    python3 scripts/peak_memory.py --lengths 4096 --attention sdpa

Not run by CI: the 32k runs take minutes and gigabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak_rss() -> None:
    """The peak mark restarts from the current RSS (Linux >= 4.0), so what an earlier phase
    (model build, imports) peaked at hides nothing of the prefill's growth."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one_run(attention: str, seq_len: int, iso: bool, chunks: int) -> dict:
    """In this process: one prefill; returns the peak growth in MiB and what ran."""
    import torch

    sys.path.insert(0, ROOT)
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.comm import stand_in_tp
    from iso_megatron.megatron import compat
    from iso_megatron.megatron.cpu import causal_mask
    from iso_megatron.megatron.models import build_gpt, model_config
    from iso_megatron.runtime import init_process_group, shutdown
    from tests.ranks import setup_megatron

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_process_group("cpu")
    try:
        setup_megatron(1)
        config = model_config("llama", num_layers=2, hidden_size=256, num_attention_heads=8,
                              num_query_groups=4, ffn_hidden_size=704)
        kwargs = {} if attention == "local" else {"attention": attention}
        model = build_gpt(config, vocab_size=256, max_sequence_length=seq_len, **kwargs).eval()
        apply_iso(model, ISOConfig(enabled=iso, num_chunks=chunks, split="even", min_tokens=0))
        ids = torch.randint(0, 256, (1, seq_len))
        pos = torch.arange(seq_len)[None]
        # the local DotProductAttention needs the explicit mask on CPU (megatron's default one is
        # made on CUDA); the SDPA attention needs none
        mask = causal_mask(seq_len) if attention == "local" else None
        ctx = StaticInferenceContext(1, seq_len)
        compat.full_prefill_logits(ctx)
        reset_peak_rss()
        before = rss_mib()
        with torch.inference_mode(), stand_in_tp(2):
            logits = model(ids, pos, mask, inference_context=ctx, runtime_gather_output=True)
        peak = peak_rss_mib()
        bounds = getattr(model.decoder, "iso_plan", None) and model.decoder.iso_plan.bounds
        assert (bounds is not None) == iso, bounds  # measured what was asked
        return dict(attention=attention, seq_len=seq_len, iso=iso,
                    bounds=list(bounds) if bounds else None,
                    rss_before_mib=round(before, 1), peak_growth_mib=round(peak - before, 1),
                    logits_mib=round(logits.numel() * logits.element_size() / 2**20, 1))
    finally:
        shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attention", default="sdpa,local", help="comma-separated: sdpa, local")
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--local-max", type=int, default=4096,
                   help="longest prompt for the local attention (its [s, s] scores exceed RAM beyond)")
    p.add_argument("--iso-chunks", type=int, default=2)
    p.add_argument("--output-json", default=None)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: attention,seq_len,iso
    a = p.parse_args()
    if a.one:
        attention, seq_len, iso = a.one.split(",")
        print(json.dumps(one_run(attention, int(seq_len), iso == "1", a.iso_chunks)))
        return
    rows = []
    for attention in a.attention.split(","):
        for seq_len in map(int, a.lengths.split(",")):
            if attention == "local" and seq_len > a.local_max:
                continue
            pair = {}
            for iso in (0, 1):
                run = subprocess.run([sys.executable, __file__, "--one", f"{attention},{seq_len},{iso}",
                                      "--iso-chunks", str(a.iso_chunks)],
                                     capture_output=True, text=True, cwd=ROOT)
                if run.returncode:
                    sys.exit(f"{attention} {seq_len} iso={iso} failed:\n{run.stderr[-3000:]}")
                pair[iso] = json.loads(run.stdout.strip().splitlines()[-1])
                rows.append(pair[iso])
            ratio = pair[1]["peak_growth_mib"] / pair[0]["peak_growth_mib"]
            print(f"{attention:5s} {seq_len:6d} tokens  stock {pair[0]['peak_growth_mib']:9.1f} MiB  "
                  f"ISO (K={a.iso_chunks}) {pair[1]['peak_growth_mib']:9.1f} MiB  ISO/stock {ratio:.3f}",
                  flush=True)
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
