"""Print docs/paper_settings.md: cost-model predictions at the ISO paper's settings.

    python launch/costmodel_table.py > docs/paper_settings.md
"""

from iso_megatron import costmodel as cm

PAPER = {"4090": "about -35%", "a800": "about -15%"}  # ISO paper (arXiv 2409.11155), 30B/70B
MEMORY_GB = {"4090": 24, "a800": 80}
PROMPTS = (1024, 2048, 4096, 8192)


def pct(ms, base):
    return f"{100 * (ms / base - 1):+.1f}%"


def main():
    out = print
    out("# ISO at the paper's settings: cost-model predictions\n")
    out("These are **predictions of `iso_megatron.costmodel`**, not measurements. The model simulates "
        "the executor's own schedule (`iso_megatron.schedule.prefill_schedule`) on two resources, the "
        "compute stream and the link, per tensor-parallel rank, bf16, batch 1. Every GEMM is a roofline "
        "(max of flops / matmul rate and bytes / memory bandwidth, weights read once per chunk); "
        "causal attention counts only the (query, key) pairs of the chunk; an all-reduce costs "
        "`latency + bytes * 2(n-1)/n / busbw`. It assumes compute and communication do not slow each other "
        "down (real NCCL kernels take SMs and memory bandwidth), and leaves out norms, activations, "
        "embedding and output layer, so the ISO columns are optimistic bounds.\n")
    out(f"Achievable rates = datasheet x {cm.GEMM_EFFICIENCY} (GEMM) and x {cm.MEM_EFFICIENCY} (memory); "
        "link numbers are already achievable all-reduce bus bandwidths.\n")
    out("| profile | matmul TFLOPS | memory GB/s | link | latency us | busbw GB/s | sources |")
    out("|---|---|---|---|---|---|---|")
    for key, (dev, link) in cm.MACHINES.items():
        out(f"| {key} | {dev.matmul_tflops:.0f} | {dev.mem_bw_gbs:.0f} | {link.name} | {link.latency_us:g} "
            f"| {link.bus_bw_gbs:g} | {dev.source}; {link.source} |")
    out("\nModels: " + "; ".join(
        f"`{k}` = {m.name}: {m.num_layers} layers, hidden {m.hidden}, {m.num_heads} heads, "
        f"{m.num_query_groups} KV groups, FFN {m.ffn_hidden}{' gated' if m.gated else ''}"
        for k, m in cm.MODELS.items()) + ".\n")
    out("Columns: M/C = all-reduce / compute time of the unsplit prompt; *even* and *balanced* = two "
        "chunks (`planner.chunk_boundaries`); *auto* = `costmodel.best_plan` (K <= 4 chunks, first boundary "
        "searched, the rest balanced; K = 1 means no split); plan = chunk boundaries in tokens. "
        "Percentages are against the baseline (stock Megatron, every all-reduce waited at once). "
        "The paper column is the reduction the ISO paper (arXiv 2409.11155) reports for that GPU "
        "(30B and 70B models), not for that exact row. Rows marked * do not fit: the weights alone "
        "exceed the GPU's memory at that TP (the prediction is still shown).\n")
    out("Regenerate: `python launch/costmodel_table.py > docs/paper_settings.md`\n")

    out("| model | GPU | TP | prompt | M/C | baseline ms | ISO even ms | ISO balanced ms | ISO auto ms | auto plan | paper |")
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    for mkey, model in cm.MODELS.items():
        for gpu in ("4090", "a800"):
            dev, link = cm.MACHINES[gpu]
            for tp in (4, 8):
                fits = model.params() * 2 / tp / 1e9 <= MEMORY_GB[gpu]
                for n in PROMPTS:
                    even = cm.predict(model, dev, link, tp, n, split="even")
                    bal = cm.predict(model, dev, link, tp, n, split="balanced")
                    plan = cm.best_plan(model, dev, link, tp, n)
                    base = even.baseline_ms
                    out(f"| {mkey}{'' if fits else '*'} | {gpu} | {tp} | {n} "
                        f"| {cm.ratio_profile(model, dev, link, tp, n):.2f} | {base:.1f} "
                        f"| {even.iso_ms:.1f} ({pct(even.iso_ms, base)}) | {bal.iso_ms:.1f} ({pct(bal.iso_ms, base)}) "
                        f"| {plan.predicted_ms:.1f} ({pct(plan.predicted_ms, base)}) "
                        f"| {plan.boundaries} | {PAPER[gpu]} |")

    out("\n## Shortest prompt worth splitting\n")
    out("`costmodel.min_tokens_for`: the shortest prompt (grid 64, 128, ..., 16384) from which on the best "
        "plan is predicted at least 1% faster than the baseline. The model leaves out per-chunk overheads "
        "(kernel launches, stream syncs), so real thresholds are higher.\n")
    out("| model | GPU | TP 2 | TP 4 | TP 8 |")
    out("|---|---|---|---|---|")
    for mkey, model in cm.MODELS.items():
        for gpu in cm.MACHINES:
            dev, link = cm.MACHINES[gpu]
            cells = [cm.min_tokens_for(model, dev, link, tp) for tp in (2, 4, 8)]
            out(f"| {mkey} | {gpu} | " + " | ".join("never" if c is None else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
