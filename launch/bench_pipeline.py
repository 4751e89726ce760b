"""Chunked pipeline prefill benchmark (issue 16): time to first token of one prompt through P
pipeline stages, stock PP against chunked PP, beside the same run's bound.

    torchrun --nproc-per-node 2 launch/bench.py --pipeline-model-parallel-size 2 \\
        --seq-lens 256,2048,4096 --pp-chunks 2,4,8,auto

(`launch/bench.py` hands a run with --pipeline-model-parallel-size > 1 to `main` here.) Ranks
are TP 1 x PP P: on this 2-core machine the only layout whose timings are honest (each stage one
process on one core); TP > 1 inside the stages adds ISO's overlap and is an exactness check here
(tests/test_pipeline_megatron.py). The stages exchange chunks over torch.distributed (gloo on
CPU, the launcher's path: `iso_megatron/megatron/pipeline.py`), measured, not emulated.

Per prompt length, interleaved rep by rep:
  stock     megatron-core PP inference: stage after stage, the whole prompt at once
  K=n       the prompt in n equal-time chunks (planner `balanced`: each chunk the same compute,
            attention growing with its prefix) flowing through the stages
  auto      the launcher's split="auto" (K up to --max-chunks): the first stage's block plans
            (`costmodel.best_pipeline_plan` on its calibration: equal-time chunks or a smaller
            first one, stock below a 2% predicted gain) and hands the plan to the other stages
TTFT = from a barrier to the last stage's logits, the maximum over ranks; medians of
--timing-repeats. Each row also has the compute-only twin of every stage (its own layers over
the same chunks with no transfers: the busiest stage's is reported) and the bound: the cost
model's `simulate_pipeline` of the row's schedule fed that measured compute of every stage
(per chunk in the shares `costmodel.chunk_costs` gives) and the measured link: all the work,
the pipeline's fill and drain, nothing overlapped that cannot be.
"""

from __future__ import annotations

import statistics
import time

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

    def stage_compute(self, s, bounds):
        """ms of this stage's layers over `bounds` alone: no transfers (a later stage runs on a
        stand-in input), the chunks as the pipeline runs them (TP 1 plans as TP 2 would, and
        its reduces are over a group of one)."""
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
        times = cli.time_ms(run, self.args.timing_repeats, 1)
        if (None if bounds is None else list(bounds)) != self.ran():
            raise RuntimeError(f"compute twin ran {self.ran()}, asked {bounds}")
        return min(times)

    # -- the link between stages
    def p2p_link(self) -> cm.P2PLink:
        """Latency and bandwidth of one chunk's transfer between stages 0 and 1 (fitted on two
        sizes, the fastest of a few each)."""
        h, sizes, secs = self.args.hidden_size, (16, 2048), []
        for rows in sizes:
            t = torch.zeros(rows, 1, h)
            best = float("inf")
            for _ in range(5):
                dist.barrier()
                t0 = time.perf_counter()
                if self.rank == 0:
                    dist.send(t, 1)
                    dist.recv(t[:1], 1)  # the reply: the transfer has landed
                elif self.rank == 1:
                    dist.recv(t, 0)
                    dist.send(t[:1], 0)
                best = min(best, time.perf_counter() - t0)
            secs.append(best)
        t = torch.tensor(secs, dtype=torch.float64)
        dist.broadcast(t, 0)
        small, large = t.tolist()
        per_byte = max((large - small) / ((sizes[1] - sizes[0]) * h * 4), 1e-15)
        latency = max(small - sizes[0] * h * 4 * per_byte, 0.0)
        return cm.P2PLink("measured (gloo)", latency * 1e6, 1 / per_byte / 1e9)

    def agree(self, bounds):
        box = [bounds]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def bound_ms(self, s, bounds, stage_ms, link):
        """`simulate_pipeline` of the chunked stages fed each stage's measured compute (shared out
        over the chunks and parts as `costmodel.chunk_costs` divides it) and the measured link."""
        from iso_megatron.schedule import stage_schedule

        device, tp_link = cm.DEVICES["h100"], cm.LINKS["h100"]  # shares only: any profile
        shares = cm.step_costs(self.shape, device, tp_link, 1, bounds, 1, 4)
        total = sum(c.compute_s for c in shares.values())
        k = len(bounds) - 1
        steps, costs = [], []
        for i, (n, ms) in enumerate(zip(self.layers, stage_ms)):
            steps.append(stage_schedule(n, k, i == 0, i == len(self.layers) - 1))
            costs.append({key: cm.PartCost(ms / 1e3 / n * c.compute_s / total, 0.0) for key, c in shares.items()})
        send = {c: link.seconds((e - b) * self.args.hidden_size * 4) for c, (b, e) in enumerate(zip(bounds, bounds[1:]))}
        return cm.simulate_pipeline(steps, costs, send) * 1e3

    def timed(self, fn):
        t = cli.time_ms(fn, 1, 0, sync=dist.barrier)
        box = torch.tensor(t, dtype=torch.float64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)  # TTFT: when the last stage is done
        return box.tolist()

    def run(self):
        a = self.args
        link = self.p2p_link()
        records = []
        for s in self.seq_lens():
            fwd = self.forward(s)
            configs = {"stock": None}
            for p in _plans(a.pp_chunks):
                if p == "auto":
                    configs["auto"] = "auto"
                else:
                    bounds = cm.chunk_boundaries(s, p, "balanced", cm.token_cost(self.shape))
                    if len(bounds) - 1 == p:
                        configs[f"K={p}"] = bounds
            with torch.no_grad():
                for name, bounds in configs.items():  # warm-up; auto calibrates and plans here
                    self.set_split(bounds)
                    fwd()
                    if bounds == "auto":
                        auto = self.ran()  # what auto runs for this prompt (every rep: checked)
                asked = {name: auto if b == "auto" else b for name, b in configs.items()}
                times = {name: [] for name in configs}
                for _ in range(a.timing_repeats):
                    for name, bounds in configs.items():
                        self.set_split(bounds)
                        times[name] += self.timed(fwd)
                        ran = self.ran()
                        want = asked[name]
                        if ran != (None if want is None else list(want)):
                            raise RuntimeError(f"{name}: ran {ran}, asked {want}")
                stage_stock = self.gather(self.stage_compute(s, None))
                stock_ms = statistics.median(times["stock"])
                for name, bounds in asked.items():
                    ttft = statistics.median(times[name])
                    rec = dict(seq_len=s, stages=self.stages, plan=name, chunks=None if bounds is None else len(bounds) - 1,
                               boundaries=bounds, ttft_ms=ttft, stock_ms=stock_ms, ratio=ttft / stock_ms,
                               spread=cli.spread(times[name]), link_latency_us=link.latency_us, link_gbs=link.bw_gbs)
                    if bounds is None:
                        rec.update(stage_compute_ms=stage_stock, bound_ms=None, bound_saving_share=None)
                    else:
                        stage_ms = self.gather(self.stage_compute(s, bounds))
                        bound = self.bound_ms(s, bounds, stage_ms, link)
                        saving = stock_ms - bound
                        rec.update(stage_compute_ms=stage_ms, bound_ms=bound, over_bound=ttft / bound - 1,
                                   bound_saving_share=(stock_ms - ttft) / saving if saving > 0 else None)
                    records.append(rec)
                    if self.rank == 0:
                        print(_line(rec), flush=True)
        return records

    def gather(self, value: float):
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def _line(r) -> str:
    b = "-" if r["bound_ms"] is None else f"{r['bound_ms']:8.1f}"
    share = "-" if r.get("bound_saving_share") is None else f"{r['bound_saving_share']:.2f}"
    busiest = max(r["stage_compute_ms"])
    return (f"[bench-pp] s={r['seq_len']:6d} {r['plan']:6s} K={r['chunks'] or 1:<3d} TTFT {r['ttft_ms']:8.1f} ms "
            f"(stock {r['stock_ms']:8.1f}, x{r['ratio']:.3f}, spread {r['spread']:.3f}) bound {b} "
            f"saving/bound's {share} busiest stage compute {busiest:.1f} bounds {r['boundaries']}")


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
