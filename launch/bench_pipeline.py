"""Chunked pipeline prefill benchmark (issue 16): time to first token of one prompt through P
pipeline stages, stock PP against chunked PP (with and without ISO inside the stages), beside
the same run's bound.

    torchrun --nproc-per-node 2 launch/bench.py --pipeline-model-parallel-size 2 \
        --seq-lens 256,2048,4096 --pp-chunks 2,4,8,auto \\
        [--pp-tp-ratio 0.5 --pp-link ratio:0.05]

(`launch/bench.py` hands a run with --pipeline-model-parallel-size > 1 to `main` here.) Ranks
are TP 1 x PP P: on this 2-core machine the only layout whose timings are honest (each stage one
process on one core); real TP > 1 inside the stages is an exactness check here
(tests/test_pipeline_megatron.py). The links:
  stage link   --pp-link gloo (default): the chunks travel over torch.distributed (gloo, the
               launcher's path: `iso_megatron/megatron/pipeline.py`), measured, not emulated;
               --pp-link ratio:R: the same transfers held to an emulated link
               (`emulated.EmulatedP2P`) on which the whole prompt's hidden states take R x the
               busiest stage's stock compute (Llama-3-70B at TP 8 x PP 4 on H100 nodes over
               InfiniBand NDR: R ~ 0.04-0.06 at 8k tokens, by the cost model)
  TP link      --pp-tp-ratio R > 0: each stage stands in for a TP 2 group (`emulated.emulate`
               with stand_in_tp=2: ISO plans as TP 2, stock's all-reduces and ISO's take the
               emulated link's time over the group of one) whose all-reduces take R x the
               stage's stock compute in all; the stage's compute stays the whole model's
               (one process), so R is the ratio to read. 0 (default): no TP link.

Per prompt length, interleaved rep by rep:
  stock     megatron-core PP inference: stage after stage, the whole prompt at once
  K=n sync  (with a TP link) the prompt in n equal-time chunks flowing through the stages,
            each all-reduce waited for as it starts: chunked PP without ISO's overlap
  K=n       the same chunks with ISO's overlap inside each stage (planner `balanced`: each
            chunk the same compute, attention growing with its prefix)
  auto      the launcher's split="auto" (K up to --max-chunks): the first stage's block plans
            (`costmodel.best_pipeline_plan` on its calibration and the stage link measured
            between the stages: equal-time chunks or a smaller first one, stock below a 2%
            predicted gain) and hands the plan to the other stages
TTFT = from a barrier to the last stage's logits, the maximum over ranks; medians of
--timing-repeats. Each row also has the compute-only twin of every stage (its own layers over
the same chunks with no transfers, the stages in turn: the busiest stage's is reported) and the
bound (beside it the same bound fed twins run by all stages at once: on this machine two busy
cores slow each other, as they do while the pipeline is full; the truth lies between): the cost model's `simulate_pipeline` of the row's schedule fed that measured compute of
every stage (per chunk in the shares `costmodel.chunk_costs` gives), the TP link's time per
all-reduce (overlapped as ISO's schedule allows, or waited at once for "sync") and the stage
link's per transfer: all the work, the pipeline's fill and drain, nothing overlapped that cannot be.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist

from iso_megatron import cli
from iso_megatron import costmodel as cm


def _plans(text: str):
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "auto":
            out.append("auto")
        else:
            k = int(part)
            if k < 2:
                raise SystemExit(f"--pp-chunks: chunk counts must be >= 2 (stock runs anyway), got {k}")
            out.append(k)
    return out


class PipelineBench:
    def __init__(self, args):
        from megatron.core import parallel_state as ps

        from iso_megatron import apply_cpu_shims, apply_iso, get_gpt_layer_iso_spec
        from iso_megatron.megatron.cpu import tensor_cuda_on_cpu
        from iso_megatron.megatron.models import build_gpt, model_config
        from iso_megatron.shape import ModelShape

        self.args = a = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stages = a.pipeline_model_parallel_size
        if args.device != "cpu":
            raise SystemExit("--pipeline-model-parallel-size: the pipeline benchmark runs on CPU (gloo)")
        if self.world != self.stages:
            raise SystemExit(f"--pipeline-model-parallel-size {self.stages}: the pipeline benchmark runs "
                             f"TP 1 x PP {self.stages}: start {self.stages} processes, not {self.world}")
        if a.num_layers % self.stages:
            raise SystemExit(f"--num-layers {a.num_layers} does not split over {self.stages} stages")
        apply_cpu_shims()
        torch.set_num_threads(1)
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=self.stages)
        groups = a.num_query_groups if a.group_query_attention else a.num_attention_heads
        self.config = model_config(a.family, num_layers=a.num_layers, hidden_size=a.hidden_size,
                                   num_attention_heads=a.num_attention_heads, num_query_groups=groups,
                                   ffn_hidden_size=a.ffn_hidden_size, pipeline_model_parallel_size=self.stages,
                                   pipeline_dtype=torch.float32)
        torch.manual_seed(a.seed + ps.get_pipeline_model_parallel_rank())
        with tensor_cuda_on_cpu(True):
            self.model = build_gpt(self.config, get_gpt_layer_iso_spec(), family=a.family,
                                   vocab_size=a.vocab_size, max_sequence_length=max(self.seq_lens()) + 8,
                                   attention="sdpa", pre_process=ps.is_pipeline_first_stage(),
                                   post_process=ps.is_pipeline_last_stage(),
                                   share_embeddings_and_output_weights=False).eval()
        apply_iso(self.model)
        self.decoder = self.model.decoder
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.shape = ModelShape.from_megatron_config(self.config)
        self.layers = cm.stage_layers(a.num_layers, self.stages)

    def seq_lens(self):
        return [int(x) for x in self.args.seq_lens.split(",")]

    # -- one forward of this rank's stage
    def set_split(self, bounds):
        """ISO's chunks for the next forwards (None: stock; "auto": the launcher's split="auto",
        planned by the first stage's block)."""
        from iso_megatron import ISOConfig, apply_iso

        if bounds is None:
            apply_iso(self.model, ISOConfig(enabled=False))
        elif bounds == "auto":
            apply_iso(self.model, ISOConfig(num_chunks=self.args.max_chunks, split="auto", min_tokens=0))
        else:
            s = bounds[-1]
            apply_iso(self.model, ISOConfig(num_chunks=len(bounds) - 1, min_tokens=0,
                                            split=tuple((e - b) / s for b, e in zip(bounds, bounds[1:]))))

    def ran(self):
        """The chunk bounds the latest forward ran (None: stock; ISO off makes the block stock's)."""
        plan = getattr(self.decoder, "iso_plan", None)
        return None if plan is None or plan.bounds is None else list(plan.bounds)

    def forward(self, s):
        from megatron.core.inference.contexts import StaticInferenceContext

        from iso_megatron.megatron.generate import prefill_mask
        from iso_megatron.megatron.pipeline import pipeline_forward

        ids = torch.randint(0, self.args.vocab_size, (1, s), generator=torch.Generator().manual_seed(s))
        pos = torch.arange(s)[None]
        mask = prefill_mask(self.model, s, "cpu")
        return lambda: pipeline_forward(self.model, ids, pos, mask, StaticInferenceContext(1, s), chunked=True)

    def stage_compute(self, s, bounds, alone=True):
        """ms of this stage's layers over `bounds` alone: no transfers (a later stage runs on a
        stand-in input), the chunks as the pipeline runs them (TP 1 plans as TP 2 would, and
        its reduces are over a group of one); the stages measured in turn, the others idle
        (`alone=False`: all at once, as in a full pipeline's steady state on this machine)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        from iso_megatron.comm import stand_in_tp
        from iso_megatron.emulated import emulate, no_comm_link

        x = torch.randn(s, 1, self.args.hidden_size, generator=torch.Generator().manual_seed(s))
        pos = torch.arange(s)[None]
        ids = torch.zeros(1, s, dtype=torch.long)
        self.set_split(bounds)

        def run():
            with emulate(no_comm_link()), stand_in_tp(2):
                if not self.first:
                    self.model.set_input_tensor(x)
                return self.model(ids, pos, None, decoder_input=x if self.first else None,
                                  inference_context=StaticInferenceContext(1, s), runtime_gather_output=True)
        # alone: one stage at a time. Two ranks computing at once on this machine's two cores
        # slow each other (shared cache and memory), while a pipeline's stages overlap only in
        # part: fed twins measured all at once, the "bound" came out 4-5% above the time the
        # chunked pipeline then took
        best = None
        for turn in range(self.world if alone else 1):
            dist.barrier()
            if turn == self.rank or not alone:
                best = min(cli.time_ms(run, self.args.timing_repeats, 1))
        dist.barrier()
        if (None if bounds is None else list(bounds)) != self.ran():
            raise RuntimeError(f"compute twin ran {self.ran()}, asked {bounds}")
        return best

    # -- the links: the stages' (gloo, or emulated at a ratio) and, standing in, a TP group's
    def links(self, s, stage_stock_ms):
        """(TP link model or None, stage link model or None) for a prompt of `s` tokens, from the
        stages' measured stock compute: --pp-tp-ratio R makes each stage's reduces take R x its
        own stock compute in all (2 per layer, the whole prompt's bytes each; the first stage
        also reduces its vocab-parallel embedding's output once, as megatron does), --pp-link ratio:R
        makes the whole prompt's hidden states take R x the busiest stage's stock compute to
        cross from one stage to the next."""
        from iso_megatron.emulated import LinkModel

        a, nbytes = self.args, s * self.args.hidden_size * 4
        tp = None
        if a.pp_tp_ratio > 0:
            mine = stage_stock_ms[self.rank] / 1e3
            tp = LinkModel.for_ratio(a.pp_tp_ratio, mine, 2 * self.layers[self.rank], nbytes)
        p2p = None
        if a.pp_link_ratio is not None:
            p2p = LinkModel.for_ratio(a.pp_link_ratio, max(stage_stock_ms) / 1e3, 1, nbytes)
        return tp, p2p

    @staticmethod
    def link_objects(tp_model, p2p_model):
        """The emulated links of one prompt length, made once: split="auto" calibrates per link
        object (a new one per run would recalibrate inside the timed runs)."""
        from iso_megatron.emulated import EmulatedLink, EmulatedP2P, WaitedReducer

        tp = None
        if tp_model is not None:
            link = EmulatedLink(tp_model, real="none")  # a group of one: the sum is the tensor itself
            tp = (link, WaitedReducer(link))
        return tp, EmulatedP2P(p2p_model) if p2p_model is not None else None

    @staticmethod
    def over(tp, p2p, overlap=True):
        """The `with` of one timed run: the TP link (this stage standing in for TP 2; stock's
        reduces over it too; `overlap=False`: each of ISO's reduces waited for at once) and the
        stage link, as `link_objects` made them."""
        from iso_megatron.comm import use_p2p, use_reducer
        from iso_megatron.emulated import emulate

        stack = ExitStack()
        if tp is not None:
            link, waited = tp
            stack.enter_context(emulate(link, stand_in_tp=2))
            if not overlap:
                stack.enter_context(use_reducer(waited))
        if p2p is not None:
            stack.enter_context(use_p2p(p2p))
        return stack

    def stage_link(self, p2p):
        """The stage link measured (round trips between the stages: `PipelineIO.measure_link`,
        what split="auto" plans with), emulated or not."""
        from iso_megatron.comm import use_p2p
        from iso_megatron.megatron.pipeline import PipelineIO

        with use_p2p(p2p) if p2p is not None else nullcontext():
            return PipelineIO(torch.empty(0), (0, 1)).measure_link(self.args.hidden_size, torch.float32,
                                                                    torch.device("cpu"))

    def bound_ms(self, bounds, stage_ms, send_seconds, tp, overlap):
        """`simulate_pipeline` of the chunked stages fed each stage's measured compute (shared out
        over the chunks and parts as `costmodel.chunk_costs` divides it), the TP link's time per
        reduce (waited at once without overlap) and the stage link's per transfer."""
        from iso_megatron.schedule import stage_schedule

        device, tp_link = cm.DEVICES["h100"], cm.LINKS["h100"]  # shares only: any profile
        shares = cm.step_costs(self.shape, device, tp_link, 1, bounds, 1, 4)
        total = sum(c.compute_s for c in shares.values())
        k, h = len(bounds) - 1, self.args.hidden_size
        rows = {c: e - b for c, (b, e) in enumerate(zip(bounds, bounds[1:]))}
        steps, costs = [], []
        for i, (n, ms) in enumerate(zip(self.layers, stage_ms)):
            steps.append(stage_schedule(n, k, i == 0, i == len(self.layers) - 1))
            stage = {}
            for (part, c), cost in shares.items():
                compute = ms / 1e3 / n * cost.compute_s / total
                comm = tp[i].seconds(rows[c] * h * 4) if tp is not None else 0.0
                stage[(part, c)] = cm.PartCost(compute, comm) if overlap else cm.PartCost(compute + comm, 0.0)
            costs.append(stage)
        send = {c: send_seconds(n * h * 4) for c, n in rows.items()}
        # megatron's vocab-parallel embedding all-reduces the whole prompt before the first
        # stage's layers (at any TP size: over the stand-in link too), before any chunk starts
        embedding = tp[0].seconds(bounds[-1] * h * 4) if tp is not None else 0.0
        return (embedding + cm.simulate_pipeline(steps, costs, send)) * 1e3

    def timed(self, fn):
        t = cli.time_ms(fn, 1, 0, sync=dist.barrier)
        box = torch.tensor(t, dtype=torch.float64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)  # TTFT: when the last stage is done
        return box.tolist()

    def configs(self, s):
        """name -> (chunk bounds or None or "auto", ISO's overlap): stock, each K (equal-time
        chunks; with a TP link also without the overlap: "K=n sync") and auto."""
        out = {"stock": (None, True)}
        for p in _plans(self.args.pp_chunks):
            if p == "auto":
                out["auto"] = ("auto", True)
                continue
            bounds = cm.chunk_boundaries(s, p, "balanced", cm.token_cost(self.shape))
            if len(bounds) - 1 == p:
                if self.args.pp_tp_ratio > 0:
                    out[f"K={p} sync"] = (bounds, False)
                out[f"K={p}"] = (bounds, True)
        return out

    def run(self):
        a = self.args
        records = []
        for s in self.seq_lens():
            fwd = self.forward(s)
            configs = self.configs(s)
            with torch.no_grad():
                stage_stock = self.gather(self.stage_compute(s, None))
                tp_model, p2p_model = self.links(s, stage_stock)
                tp = self.gather(tp_model) if tp_model is not None else None  # each stage's own
                tp_link, p2p = self.link_objects(tp_model, p2p_model)
                link = self.stage_link(p2p)
                send_seconds = p2p_model.seconds if p2p_model is not None else link.seconds
                for name, (bounds, overlap) in configs.items():  # warm-up; auto calibrates and plans here
                    self.set_split(bounds)
                    with self.over(tp_link, p2p, overlap):
                        fwd()
                    if bounds == "auto":
                        auto = self.ran()  # what auto runs for this prompt (every rep: checked)
                asked = {name: auto if b == "auto" else b for name, (b, _) in configs.items()}
                times = {name: [] for name in configs}
                for _ in range(a.timing_repeats):
                    for name, (bounds, overlap) in configs.items():
                        self.set_split(bounds)
                        with self.over(tp_link, p2p, overlap):
                            times[name] += self.timed(fwd)
                        ran = self.ran()
                        want = asked[name]
                        if ran != (None if want is None else list(want)):
                            raise RuntimeError(f"{name}: ran {ran}, asked {want}")
                stock_ms = statistics.median(times["stock"])
                twins = {}
                for name, bounds in asked.items():
                    overlap = configs[name][1]
                    ttft = statistics.median(times[name])
                    rec = dict(seq_len=s, stages=self.stages, plan=name, chunks=None if bounds is None else len(bounds) - 1,
                               boundaries=bounds, overlap=overlap, ttft_ms=ttft, stock_ms=stock_ms, ratio=ttft / stock_ms,
                               spread=cli.spread(times[name]), link_latency_us=link.latency_us, link_gbs=link.bw_gbs,
                               pp_link=a.pp_link, tp_ratio=a.pp_tp_ratio)
                    if bounds is None:
                        rec.update(stage_compute_ms=stage_stock, bound_ms=None, bound_saving_share=None)
                    else:
                        key = tuple(bounds)
                        if key not in twins:  # one pair of compute twins per chunking (sync and ISO share it)
                            twins[key] = (self.gather(self.stage_compute(s, bounds)),
                                          self.gather(self.stage_compute(s, bounds, alone=False)))
                        stage_ms, together_ms = twins[key]
                        bound = self.bound_ms(bounds, stage_ms, send_seconds, tp, overlap)
                        saving = stock_ms - bound
                        rec.update(stage_compute_ms=stage_ms, bound_ms=bound, over_bound=ttft / bound - 1,
                                   bound_saving_share=(stock_ms - ttft) / saving if saving > 0 else None,
                                   # the same fed the stages' compute measured all at once: the two
                                   # cores slowing each other, as they do while the pipeline is full
                                   stage_compute_together_ms=together_ms,
                                   bound_together_ms=self.bound_ms(bounds, together_ms, send_seconds, tp, overlap))
                    records.append(rec)
                    if self.rank == 0:
                        print(_line(rec), flush=True)
        return records

    def gather(self, value):
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def _line(r) -> str:
    b = "-" if r["bound_ms"] is None else f"{r['bound_ms']:8.1f}"
    share = "-" if r.get("bound_saving_share") is None else f"{r['bound_saving_share']:.2f}"
    busiest = max(r["stage_compute_ms"])
    return (f"[bench-pp] s={r['seq_len']:6d} {r['plan']:9s} K={r['chunks'] or 1:<3d} TTFT {r['ttft_ms']:8.1f} ms "
            f"(stock {r['stock_ms']:8.1f}, x{r['ratio']:.3f}, spread {r['spread']:.3f}) bound {b} "
            f"saving/bound's {share} busiest stage compute {busiest:.1f} bounds {r['boundaries']}")


def summarize(records) -> str:
    """Markdown table of a pipeline bench JSON, and the issue's targets read off it."""
    first = records[0]
    tp_ratio = first.get("tp_ratio", 0.0)
    link = (f"stage link {first.get('pp_link', 'gloo')} (measured {first['link_latency_us']:.0f} us + "
            f"{first['link_gbs']:.3g} GB/s)" + (f", each stage standing in for TP 2 at M/C {tp_ratio}" if tp_ratio else ", TP 1"))
    rows = [f"TP 1 x PP {first['stages']}, {link}; medians of the repetitions, ms.", "",
            "| tokens | plan | K | TTFT | / stock | spread | busiest stage compute | bound | over bound | "
            "share of bound's saving | bound, stages together (over) | boundaries |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    for r in records:
        t = r.get("bound_together_ms")
        together = "-" if t is None else f"{t:.1f} ({r['ttft_ms'] / t - 1:+.1%})"
        rows.append(f"| {r['seq_len']} | {r['plan']} | {r['chunks'] or 1} | {r['ttft_ms']:.1f} | {r['ratio']:.3f} | "
                    f"{r['spread']:.1%} | {max(r['stage_compute_ms']):.1f} | {f(r['bound_ms'], '.1f')} | "
                    f"{f(r.get('over_bound'), '+.1%')} | {f(r['bound_saving_share'], '.2f')} | {together} | "
                    f"{r['boundaries'] or '-'} |")
    rows.append("")
    for s in sorted({r["seq_len"] for r in records}):
        auto = [r for r in records if r["seq_len"] == s and r["plan"] == "auto"]
        if not auto:
            continue
        a = auto[0]
        stock = next(r for r in records if r["seq_len"] == s and r["plan"] == "stock")
        slack = max(0.02, a["spread"], stock["spread"])
        if a["chunks"] is None:
            verdict = "steps aside" + ("" if a["ratio"] <= 1 + slack else f" but {a['ratio'] - 1:+.1%} (> {slack:.1%})")
        else:
            verdict = (f"K={a['chunks']}: {a['ratio']:.3f} of stock PP, {a['over_bound']:+.1%} over the bound, "
                       f"{f(a['bound_saving_share'], '.2f')} of its saving")
        rows.append(f"- {s} tokens, auto: {verdict}")
    return "\n".join(rows)


def main(args):
    from iso_megatron.faults import distributed_timeout, watch_job
    from iso_megatron.runtime import init_process_group, shutdown

    watch = None
    try:
        init_process_group("cpu", distributed_timeout(args.distributed_timeout_minutes))
        watch = watch_job()
        with watch.phase("the pipeline benchmark"):
            records = PipelineBench(args).run()
            if dist.get_rank() == 0 and args.output_json:
                cli.write_json(args.output_json, records)
                print(f"[bench-pp] wrote {len(records)} records to {args.output_json}", flush=True)
    finally:
        shutdown(watch)
