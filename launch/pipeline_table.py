"""Print docs/pipeline_predictions.md: cost-model predictions of chunked pipeline parallelism (with
and without ISO inside the stages) for Llama-3-70B and Llama-3.1-405B on H100 nodes.

    python launch/pipeline_table.py > docs/pipeline_predictions.md
"""

import inspect
import math
import sys
import time

from iso_megatron import costmodel as cm
from iso_megatron.planner import chunk_boundaries

MODEL_KEYS = ("llama-3-70b", "llama-3.1-405b")
PIPELINE_SIZES = (2, 4)
PROMPTS = (8192, 16384, 32768, 65536, 131072)
TP = 8                       # one 8-GPU node per pipeline stage: TP over NVLink, PP over InfiniBand
GPU = "h100"
P2P = "ib-ndr"
DTYPE_BYTES = 2              # bf16
GPU_MEMORY_GB = 80           # H100 SXM5 80GB (NVIDIA H100 datasheet), taken as 80e9 bytes
RESERVED_GB = 5              # CUDA context, NCCL buffers, allocator slack: an assumption, not measured
LONGER_K = 64                # a chunk count past the planner's default range, for the note on K

# SGLang's own figures (LMSYS blog, 2026-01-15): DeepSeek-V3.1 on H20 nodes, measured.
SGLANG_URL = "https://www.lmsys.org/blog/2026-01-15-chunked-pipeline"
SGLANG_DOCS_URL = "https://docs.sglang.io/advanced_features/pipeline_parallelism.html"
SGLANG_TTFT_CUT = 67.9       # "up to a 67.9% reduction in TTFT", PP4 x TP8
SGLANG_THROUGHPUT = 3.31     # prefill throughput of PP4 x TP8 over TP8 (one node), chunked prefill 12K
SGLANG_SCALING = 82.8        # strong scaling efficiency (3.31 / 4)


def planner_default(name):
    """A default argument of costmodel.best_pipeline_plan, so the text follows the planner."""
    return inspect.signature(cm.best_pipeline_plan).parameters[name].default


def stage_layers_for(num_layers, pp):
    """Layers per stage: even where they divide; else the first and last stages (which also hold
    the embedding and the output layer) take the fewer layers, as megatron-core's
    --decoder-first/last-pipeline-num-layers would be set."""
    if num_layers % pp == 0:
        return cm.stage_layers(num_layers, pp)
    each = math.ceil(num_layers / pp)
    ends = num_layers - each * (pp - 2)
    if pp < 3 or ends % 2:
        raise ValueError(f"no layout for {num_layers} layers over {pp} stages with equal first and last stages")
    return cm.stage_layers(num_layers, pp, first=ends // 2, last=ends // 2)


def cut(ms, base_ms):
    """Percent of the baseline saved (positive = faster)."""
    return 100 * (1 - ms / base_ms)


def tokens(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def describe_chunks(model, seq_len, bounds):
    """'first 384, then equal-time 576 -> 448' (chunk sizes in tokens): equal-time chunks shrink
    as the prefix their attention reads grows."""
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(sizes) == 1:
        return "one chunk (stock)"
    balanced = chunk_boundaries(seq_len, len(sizes), "balanced", cm.token_cost(model))
    if list(bounds) == list(balanced):
        return f"equal-time {sizes[0]:,} -> {sizes[-1]:,}"
    rest = sizes[1:]
    tail = f"{rest[0]:,}" if len(rest) == 1 else f"{rest[0]:,} -> {rest[-1]:,}"
    return f"first {sizes[0]:,}, then equal-time {tail}"


def predict_rows():
    """[(model key, pp, prompt, plan, PipelinePrediction)] for every setting."""
    dev, link = cm.MACHINES[GPU]
    p2p = cm.P2P_LINKS[P2P]
    rows = []
    for key in MODEL_KEYS:
        model = cm.MODELS[key]
        for pp in PIPELINE_SIZES:
            layers = stage_layers_for(model.num_layers, pp)
            for n in PROMPTS:
                plan = cm.best_pipeline_plan(model, dev, link, p2p, TP, layers, n, dtype_bytes=DTYPE_BYTES)
                pred = cm.predict_pipeline(model, dev, link, p2p, TP, layers, n, plan.boundaries,
                                           dtype_bytes=DTYPE_BYTES)
                rows.append((key, pp, n, plan, pred))
    return rows


def span(values):
    lo, hi = min(values), max(values)
    return f"{lo:.1f}%" if round(lo, 1) == round(hi, 1) else f"{lo:.1f} to {hi:.1f}%"


def summary(out, rows):
    out("## Summary\n")
    out(f"Predicted time to first token (prefill through every stage, batch 1, bf16) at TP {TP} x PP 2 and "
        f"TP {TP} x PP 4, prompts {tokens(PROMPTS[0])}-{tokens(PROMPTS[-1])}. *cut* = TTFT saved against stock "
        "PP (the whole prompt through the stages one after another, each stage's TP all-reduces waited at "
        "once). Pipelining alone can save at most 1 - 1/PP of it (50% at PP 2, 75% at PP 4); ISO also hides "
        "the stages' TP all-reduces, so *chunked + ISO* can pass that.\n")
    out("| model | layout | GPUs | cut, chunked PP | cut, chunked PP + ISO | ISO's own cut (over chunked) | + ISO above the bound |")
    out("|---|---|---|---|---|---|---|")
    for key in MODEL_KEYS:
        for pp in PIPELINE_SIZES:
            sel = [r for r in rows if r[0] == key and r[1] == pp]
            out(f"| {cm.MODELS[key].name} | TP {TP} x PP {pp} | {TP * pp} "
                f"| {span([cut(p.chunked_ms, p.stock_ms) for *_, p in sel])} "
                f"| {span([cut(p.iso_ms, p.stock_ms) for *_, p in sel])} "
                f"| {span([cut(p.iso_ms, p.chunked_ms) for *_, p in sel])} "
                f"| {span([100 * (p.iso_ms / p.bound_ms - 1) for *_, p in sel])} |")
    out("")
    pp4 = [p for key, pp, n, _, p in rows if pp == 4]
    out("### Beside SGLang's reported figure\n")
    out(f"SGLang reports, for its chunked pipeline parallelism with dynamic chunking, \"up to a "
        f"{SGLANG_TTFT_CUT}% reduction in TTFT\" at PP 4 x TP 8, with {SGLANG_THROUGHPUT}x the prefill throughput "
        f"of TP 8 on one node (chunked prefill size 12K) and {SGLANG_SCALING}% strong scaling efficiency "
        f"({SGLANG_THROUGHPUT} / 4), for DeepSeek-V3.1 on H20 nodes ({SGLANG_URL}; the method, a quadratic "
        f"fit of a chunk's runtime against its prefix, in {SGLANG_DOCS_URL}). Theirs is **measured**, on a "
        "different model (a mixture-of-experts model with MLA attention) and a different GPU; ours is **predicted** "
        "by the cost model for dense Llama models on H100. The excerpt of the blog we could read does not state the "
        "TTFT baseline; its throughput figure is against TP 8 on one node, and for a single prompt a TP 8 node "
        "takes about as long as stock PP 4 x TP 8 (the same per-layer work, in sequence, plus the stage "
        "transfers), so the two baselines are close.\n")
    out("| | model | GPUs | layout | TTFT cut | kind |")
    out("|---|---|---|---|---|---|")
    out(f"| SGLang (LMSYS blog) | DeepSeek-V3.1 | H20 | PP 4 x TP 8 | up to {SGLANG_TTFT_CUT}% | measured |")
    out(f"| this model, chunked PP | Llama-3-70B and Llama-3.1-405B | H100 + IB NDR | PP 4 x TP 8 "
        f"| {span([cut(p.chunked_ms, p.stock_ms) for p in pp4])} | predicted |")
    out(f"| this model, chunked PP + ISO | Llama-3-70B and Llama-3.1-405B | H100 + IB NDR | PP 4 x TP 8 "
        f"| {span([cut(p.iso_ms, p.stock_ms) for p in pp4])} | predicted |")
    out("")
    out(f"SGLang's {SGLANG_TTFT_CUT}% is {100 * SGLANG_TTFT_CUT / 75:.0f}% of the 75% that pipelining alone "
        "allows at PP 4; the predicted chunked-PP cuts above (no ISO) are that same kind of saving, from a model "
        "with no per-chunk overheads beyond the planner's margin, so they are an upper estimate of it.\n")


def hardware(out):
    dev, link = cm.MACHINES[GPU]
    p2p = cm.P2P_LINKS[P2P]
    out("## Hardware\n")
    out("| part | figure | source |")
    out("|---|---|---|")
    out(f"| GPU ({dev.name}) | {dev.matmul_tflops:.0f} TFLOPS dense bf16 GEMM, {dev.mem_bw_gbs:.0f} GB/s "
        f"(datasheet x {cm.GEMM_EFFICIENCY} and x {cm.MEM_EFFICIENCY}) | {dev.source} |")
    out(f"| TP link, inside a node ({link.name}) | all-reduce busbw {link.bus_bw_gbs:g} GB/s, latency "
        f"{link.latency_us:g} us | {link.source} |")
    out(f"| contention s | {dev.contention:.3f}: compute runs at (1 - s) of its speed while a TP all-reduce "
        f"is in flight (only ISO overlaps them) | {dev.contention_source} |")
    out(f"| PP link, across nodes ({p2p.name}) | {p2p.bw_gbs:g} GB/s per direction per GPU, latency "
        f"{p2p.latency_us:g} us | {p2p.source} |")
    out("")


def table(out, rows):
    out("## All rows\n")
    out("Times in ms. *chunked PP* runs the plan's chunks with each stage's TP all-reduces waited at once; "
        "*+ ISO* the same chunks with ISO inside the stages (so the two differ by ISO alone); *bound* the same "
        "chunks with every TP all-reduce hidden (perfect overlap; the stage transfers still count). The plan "
        f"is `costmodel.best_pipeline_plan` with its defaults: K over {{{', '.join(map(str, planner_default('chunk_counts')))}}}, "
        "equal-time chunks or a smaller first chunk and the rest equal-time, fastest with ISO, each extra chunk "
        f"required to save another {100 * planner_default('chunk_margin'):g}% of stock's time (for the per-chunk "
        "costs the model leaves out). Chunks: their sizes in tokens, first -> last.\n")
    out("| model | layout | stage layers | prompt | stock PP | chunked PP | chunked PP + ISO | bound "
        "| cut, chunked | cut, + ISO | K | chunks (tokens) |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, pp, n, plan, p in rows:
        model = cm.MODELS[key]
        layers = stage_layers_for(model.num_layers, pp)
        out(f"| {model.name} | TP {TP} x PP {pp} | {'/'.join(map(str, layers))} | {tokens(n)} "
            f"| {p.stock_ms:.0f} | {p.chunked_ms:.0f} | {p.iso_ms:.0f} | {p.bound_ms:.0f} "
            f"| {cut(p.chunked_ms, p.stock_ms):.1f}% | {cut(p.iso_ms, p.stock_ms):.1f}% "
            f"| {plan.num_chunks} | {describe_chunks(model, n, plan.boundaries)} |")
    out("")


def more_chunks(out, rows):
    """How much the raw cost model would still gain from more chunks than the planner takes."""
    dev, link = cm.MACHINES[GPU]
    p2p = cm.P2P_LINKS[P2P]
    n, pp = PROMPTS[-1], 4
    out("### More chunks\n")
    out(f"The datasheet profile has no per-chunk cost beyond re-reading the weights (no launches, no lower "
        f"GEMM efficiency for small chunks), so without the planner's per-chunk margin it would keep adding "
        f"chunks. At {tokens(n)}, PP {pp}, K = {LONGER_K} (the planner's candidates at that K, no margin):\n")
    out(f"| model | K planned | + ISO ms | + ISO ms at K = {LONGER_K} | raw extra cut |")
    out("|---|---|---|---|---|")
    for key in MODEL_KEYS:
        model = cm.MODELS[key]
        layers = stage_layers_for(model.num_layers, pp)
        plan = next(r[3] for r in rows if r[0] == key and r[1] == pp and r[2] == n)
        wide = cm.best_pipeline_plan(model, dev, link, p2p, TP, layers, n, chunk_counts=(LONGER_K,),
                                     dtype_bytes=DTYPE_BYTES, min_gain=0.0,
                                     chunk_margin=0.0)
        out(f"| {model.name} | {plan.num_chunks} | {plan.predicted_ms:.0f} | {wide.predicted_ms:.0f} "
            f"| {cut(wide.predicted_ms, plan.predicted_ms):.1f}% |")
    out("")
    smallest = min(b - a for r in rows if r[2] == n for a, b in zip(r[3].boundaries, r[3].boundaries[1:]))
    out(f"The table keeps the planner's choice (at {tokens(n)} no chunk under {smallest:,} tokens), closer to "
        "the chunk sizes the GEMM efficiency figure describes; SGLang's chunked prefill size is 12K.\n")


def memory(out):
    out("## Does it fit? (rough check)\n")
    out(f"Per GPU of the busiest stage, bf16, {GPU_MEMORY_GB} GB H100: weights (the stage's layers / TP, plus the "
        "embedding or output matrix / TP on the first or last stage), the KV cache of the whole prompt for the "
        "stage's layers (K and V, 8 KV groups over TP 8: one group per GPU), and the largest single activation "
        "of stock PP, the gated MLP's first GEMM output for the whole prompt (chunked PP holds only a chunk's). "
        f"{RESERVED_GB} GB is set aside for the CUDA context, NCCL buffers and allocator slack (assumed). Norms, "
        "the attention kernel's workspace and fragmentation are not counted: **a rough check, not a measurement**.\n")
    out("| model | layout | GPUs | weights GB | KV cache at 128k GB | stock's MLP activation at 128k GB | left of 80 GB |")
    out("|---|---|---|---|---|---|---|")
    n = PROMPTS[-1]
    for key in MODEL_KEYS:
        m = cm.MODELS[key]
        for pp in PIPELINE_SIZES:
            layers = stage_layers_for(m.num_layers, pp)
            ends = m.vocab * m.hidden  # embedding on the first stage, output layer on the last
            stage_params = max(layers[0] * m.layer_params() + ends, layers[-1] * m.layer_params() + ends,
                               *(k * m.layer_params() for k in layers[1:-1]))
            weights = stage_params * DTYPE_BYTES / TP / 1e9
            kv = max(layers) * n * 2 * m.kv_hidden * DTYPE_BYTES / TP / 1e9
            act = n * (2 if m.gated else 1) * m.ffn_hidden * DTYPE_BYTES / TP / 1e9
            left = GPU_MEMORY_GB - RESERVED_GB - weights - kv - act
            out(f"| {m.name} | TP {TP} x PP {pp} | {TP * pp} | {weights:.1f} | {kv:.1f} | {act:.1f} "
                f"| {left:.1f} ({'fits' if left > 0 else '**does not fit**'}) |")
    out("")
    m = cm.MODELS["llama-3.1-405b"]
    out(f"Llama-3.1-405B holds {m.params() / 1e9:.0f}B weights ({m.params() * DTYPE_BYTES / 1e9:.0f} GB in bf16): "
        f"more than one 8-GPU node's {8 * GPU_MEMORY_GB} GB, so PP 2 (16 GPUs) is the smallest bf16 layout here.\n")


def assumptions(out):
    dev, _ = cm.MACHINES[GPU]
    out("## What the model leaves out\n")
    out("- **Embedding and output layer**: not timed (the output layer runs once, for the last token only, "
        "on the last stage; the same in every column).\n"
        "- **Host and per-chunk overheads**: kernel launches, Python, stream syncs, the scheduler "
        f"(`step_overhead_s` = {dev.step_overhead_s:g} and `token_s` = {dev.token_s:g} for the H100 profile), "
        "and norms, RoPE and activations (no roofline term). Each extra chunk costs only a re-read of the "
        "stage's weights (the planner's per-chunk margin stands in for the rest when it picks K), so the "
        "chunked columns lean optimistic, more so at high K.\n"
        f"- **GEMM efficiency**: one figure ({cm.GEMM_EFFICIENCY} of the datasheet rate) for every GEMM shape; "
        "small chunks run below it on real GPUs.\n"
        f"- **Contention**: s = {dev.contention:.3f} (NCCL's all-reduce holds 16 of 132 SMs) slows ISO's compute "
        "while a TP all-reduce is in flight; the all-reduce's DRAM traffic and the stage transfers' own SM and "
        "memory use are not modelled (the transfers are assumed to run beside compute for free, as GPUDirect "
        "RDMA sends do apart from NCCL's kernels).\n"
        "- **The stage link**: each TP rank sends its chunk's full hidden states to its peer in the next stage "
        "over its own NIC (megatron-core without sequence parallelism; one ConnectX-7 per GPU on DGX H100), "
        "no contention between rails, no switch hops beyond the latency figure.\n"
        "- **Prefill only**: time to first token of one prompt, batch 1; no decode, no other requests.\n")


def main():
    start = time.time()
    rows = predict_rows()
    out = print
    out("# Chunked pipeline parallelism on H100 nodes: cost-model predictions\n")
    out("These are **predictions of `iso_megatron.costmodel`**, not measurements. `predict_pipeline` simulates "
        "each stage's own schedule (`schedule.stage_schedule`) on the compute stream, the TP link and the "
        "stage link: the chunks flow stage to stage over InfiniBand while each stage runs its layers over "
        "TP 8 inside its node. Per GEMM a roofline, causal attention over the chunk's pairs with its prefix, "
        "a TP all-reduce as latency + bytes x 2(n-1)/n / busbw, a stage transfer as latency + bytes / bw. "
        "The chunked PP and ISO columns use the chunks `costmodel.best_pipeline_plan` picks.\n")
    out("Regenerate: `python launch/pipeline_table.py > docs/pipeline_predictions.md`\n")
    summary(out, rows)
    hardware(out)
    table(out, rows)
    more_chunks(out, rows)
    memory(out)
    assumptions(out)
    out(f"Model presets: {', '.join(f'`{k}` ({cm.MODEL_SOURCES[k]})' for k in MODEL_KEYS)}.\n")
    print(f"(generated in {time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
