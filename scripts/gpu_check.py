"""The prepared GPU check (issue 10, part 4): one run, one JSON verdict, under four minutes.

    bash scripts/gpu_check.sh --wheels .whl --out OUT      # on a GPU machine (installs the wheels)
    bash scripts/gpu_check.sh --dry-run --out OUT          # on CPU: every check's logic, small

Checks, in this order (each with its own try/except and time budget; a global deadline stops
starting new ones, which are then `not-run`):
  environment     imports, versions, the GPU count
  exactness       ISO vs stock on one process, the ISO schedule really run (TP 2 stood in,
                  `comm.stand_in_tp`; the reduce is the 1-rank group's own all-reduce): logits,
                  KV cache after prefill, greedy tokens and decode logits; fp32 and bf16, both
                  families, every attention backend present, several lengths, K 2 and 3
  host_syncs      host synchronisations inside one prefill: ISO <= stock, under the group's own
                  reducer and under the proxy link; CUDA's sync-debug mode (on CPU: a dispatch
                  mode that counts the ops which force one), with a positive control
  poison_reducer  a reducer that holds each partial sum at NaN until its handle's wait():
                  ISO's logits stay exact; a reducer that restores too late must be caught
  tp2_nccl        real TP 2 over NCCL (torchrun, this script's `--worker tp2`): required with
                  2+ GPUs only; the dry run runs it over gloo on CPU
  proxy_bench     launch/bench.py --link proxy (stock baseline in the same run), bf16, at
                  1k-8k tokens, with and without CUDA_DEVICE_MAX_CONNECTIONS=1

Required checks by GPU count: every check in a dry run (logic on CPU), with one GPU all but
tp2_nccl, with 2+ GPUs all but proxy_bench. Exit status: 0 every required check passed on a
GPU; 1 a required check failed or did not run; 2 bad arguments; 3 dry run whose logic all ran
and passed ("nothing checked on a GPU": a dry run never reports success).
`--mutant extra-sync,read-before-wait` plants the faults their checks must catch (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_DRY_RUN = 0, 1, 2, 3
CHECKS = ("environment", "exactness", "host_syncs", "poison_reducer", "tp2_nccl", "proxy_bench")
MUTANTS = ("extra-sync", "read-before-wait")
# ISO vs stock, same weights. fp32: only summation orders differ (tests/ranks.py FP32_REL_TOL,
# TF32 off). bf16: differently sized GEMMs and attention blocks round differently, a few ulp of
# bf16 (2^-8) relative to the largest logit: 7e-3 measured on CPU with the SDPA backend, and
# tests/test_core.py holds bf16 to the same 2e-2.
BF16_REL_TOL = 2e-2
WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# Sizes: (GPU, dry run). The exactness model is small (exactness does not depend on size); the
# bench model is four layers of a Llama-3-8B shape, so that compute and the host-staged copy
# are both of a real layer's size.
SIZES = {
    "gpu": dict(model=dict(num_layers=2, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                           ffn_hidden_size=1408), vocab=512, lengths=(256, 1000, 2048), ks=(2, 3), steps=4,
                sync_len=1024, poison_len=1000, tp2_lengths=(1000, 2048), tp2_ks=(2, 3),
                # auto beside the forced splits: where does the planner split on this GPU
                splits="even,balanced,auto",
                bench=["--seq-lens", "1024,2048,4096,8192", "--num-layers", "4", "--hidden-size", "4096",
                       "--ffn-hidden-size", "14336", "--num-attention-heads", "32", "--group-query-attention",
                       "--num-query-groups", "8", "--timing-repeats", "3", "--timing-warmup", "1",
                       "--compute-reps", "2"],
                # one GPU: every required check fits the 200 s global budget (25+50+20+15+90);
                # with 2+ GPUs tp2_nccl is required and the (then optional) bench gets what is left
                budgets=dict(environment=25, exactness=50, host_syncs=20, poison_reducer=15, tp2_nccl=60,
                             proxy_bench=90)),
    "cpu": dict(model=dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                           ffn_hidden_size=160), vocab=256, lengths=(40, 96), ks=(2, 3), steps=2,
                sync_len=96, poison_len=96, tp2_lengths=(64,), tp2_ks=(3,),
                # the dry run as it always ran: one repetition of a toy model, too noisy to plan on
                splits="even,balanced",
                bench=["--seq-lens", "64,128", "--num-layers", "2", "--hidden-size", "64",
                       "--ffn-hidden-size", "160", "--num-attention-heads", "8", "--group-query-attention",
                       "--num-query-groups", "4", "--timing-repeats", "1", "--timing-warmup", "1",
                       "--compute-reps", "1", "--threads", "1",
                       # the 2-layer toy model is bound by the per-chunk overhead (ISO computes
                       # 20-35% more than stock) and one repetition of it is noisy (a compute twin
                       # 10-20% off made ISO "beat" its bound in 2 of ~10 runs): the parity and
                       # bound checks run at the GPU sizes
                       "--compute-tolerance", "100", "--bound-noise-floor", "100"],
                budgets=dict(environment=30, exactness=40, host_syncs=20, poison_reducer=20, tp2_nccl=60,
                             proxy_bench=45)),
}


# ---------------------------------------------------------------- bookkeeping

class Deadline:
    """Seconds left until `at` (time.monotonic), capped by an outer deadline."""

    def __init__(self, seconds: float, outer: "Deadline | None" = None):
        self.at = time.monotonic() + seconds
        if outer is not None:
            self.at = min(self.at, outer.at)

    def left(self) -> float:
        return self.at - time.monotonic()


class OutOfTime(RuntimeError):
    pass


class Report:
    """The JSON summary, rewritten after every check (and by the watchdog), so that whatever
    stops the run, OUT/gpu_check.json says how far it got."""

    def __init__(self, out_dir: str, dry_run: bool, budget_s: float, mutants):
        self.path = os.path.join(out_dir, "gpu_check.json")
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.current = None  # the check running now (the watchdog fails it)
        self.data = dict(dry_run=dry_run, mutants=mutants, exit_code=None, verdict="running",
                         started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         budget_s=budget_s, elapsed_s=None, gpu_count=None, required=[], checks={})

    def check(self, name, required):
        self.data["checks"][name] = dict(name=name, required=required, status="not-run", reason=None,
                                         figures={}, seconds=None, budget_s=None)
        return self.data["checks"][name]

    def set(self, **kw):
        with self.lock:
            self.data.update(kw)

    def write(self):
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)

    def finish(self):
        checks = self.data["checks"].values()
        failed = [c["name"] for c in checks if c["required"] and c["status"] != "passed"]
        if failed:
            code, verdict = EXIT_FAILED, f"FAILED: {', '.join(failed)}"
        elif self.data["dry_run"]:
            code, verdict = EXIT_DRY_RUN, "dry run: every check's logic ran on CPU; nothing checked on a GPU"
        else:
            code, verdict = EXIT_PASSED, "passed: every required check passed on the GPU"
        self.set(exit_code=code, verdict=verdict)
        self.write()
        return code


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_check(report: Report, name: str, fn, budget_s: float, glob: Deadline, min_start_s: float = 5.0):
    """Run one check: its own time budget, its own try/except; `not-run` when too little time
    is left to start it. `fn(deadline, figures)` fills figures and returns (passed, reason)."""
    entry = report.data["checks"][name]
    if entry["status"] == "skipped":
        log(f"{name}: skipped ({entry['reason']})")
        return
    if glob.left() < min_start_s:
        entry.update(status="not-run", reason=f"global deadline: {glob.left():.0f} s left, not started")
        log(f"{name}: not run ({entry['reason']})")
        report.write()
        return
    deadline = Deadline(budget_s, glob)
    entry.update(status="running", budget_s=round(deadline.left(), 1))
    report.current = name
    report.write()
    log(f"{name}: start (budget {deadline.left():.0f} s)")
    t0 = time.monotonic()
    try:
        ok, reason = fn(deadline, entry["figures"])
        status = "passed" if ok else "failed"
    except Exception as e:  # a check that raises has failed; the others still run
        status, reason = "failed", f"{type(e).__name__}: {e}"
        traceback.print_exc()
        sys.stdout.flush()
    entry.update(status=status, reason=reason, seconds=round(time.monotonic() - t0, 1))
    report.current = None
    log(f"{name}: {status} in {entry['seconds']} s" + (f" ({reason})" if reason else ""))
    report.write()


_CHILDREN = set()  # process-group leaders started by run_logged and still running


def abort(report: Report, why: str):
    """Write the summary (the running check failed, the rest as they are), kill the children's
    process groups, exit non-zero: a hang or a kill never loses the JSON nor leaves the GPU busy."""
    name = report.current
    if name:
        report.data["checks"][name].update(status="failed", reason=f"{why} while it ran")
    log(f"{why}: writing the summary and exiting")
    faulthandler.dump_traceback(all_threads=True)
    for proc in list(_CHILDREN):
        stop(proc, grace_s=3)
    code = EXIT_FAILED
    for _ in range(3):  # the running check may be changing its figures while they are written
        try:
            code = report.finish()
            break
        except RuntimeError:
            time.sleep(0.1)
    sys.stdout.flush()
    os._exit(code if code != EXIT_PASSED else EXIT_FAILED)


def start_watchdog(report: Report, hard_s: float):
    """`abort` at `hard_s` after start, and on SIGTERM (gpu_check.sh's timeout)."""
    signal.signal(signal.SIGTERM, lambda *_: abort(report, "SIGTERM"))
    timer = threading.Timer(hard_s, lambda: abort(report, "watchdog: global deadline passed"))
    timer.daemon = True
    timer.start()
    return timer


def subprocess_env(extra=None):
    """This process's environment without its own process-group variables (the child makes its
    own world), with the repo and the installed wheels on the path."""
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    env.update(extra or {})
    return env


def stop(proc, grace_s=5.0):
    """End a child started in its own session: SIGTERM to its group first (torchrun then ends
    its workers, which run in sessions of their own), SIGKILL to the group after `grace_s`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_logged(cmd, log_path, timeout_s, env):
    """(return code, timed out) of `cmd`, its output in `log_path`; killed with its whole
    process group at `timeout_s`."""
    with open(log_path, "w") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _CHILDREN.add(proc)
        try:
            return proc.wait(timeout=max(timeout_s, 1)), False
        except subprocess.TimeoutExpired:
            stop(proc)
            return proc.returncode, True
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it left in its group
            _CHILDREN.discard(proc)


def tail(path, n=1500):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------- models and runs

def rel_err(a, b) -> float:
    from tests.ranks import rel_err as _rel

    return _rel(a.float(), b.float())


def fp32_tol() -> float:
    from tests.ranks import FP32_REL_TOL

    return FP32_REL_TOL


def setup_torch(device: str) -> dict:
    """Exact fp32 on CUDA: TF32 off for matmuls and cuDNN (it would round fp32 GEMM inputs to
    10 mantissa bits, ~1e-3 relative, differently for differently sized chunks). Returns the
    settings as read back (or the error of an API this torch does not take)."""
    import torch

    if device != "cuda":
        return {}
    out = {}
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    except Exception as e:  # torch >= 2.9 also has fp32_precision: the new spelling
        out["legacy_api_error"] = repr(e)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
    for name, read in (("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                       ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                       ("float32_matmul_precision", torch.get_float32_matmul_precision),
                       ("matmul_fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision),
                       ("bf16_reduced_precision_reduction",
                        lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)):
        try:
            out[name] = read()
        except Exception as e:
            out[name] = f"unreadable: {e!r}"
    return out


def init_world(device: str, tp: int):
    """torch.distributed and Megatron's parallel state. One process: a world of one over a
    private TCP store (the environment is left alone for child processes); under torchrun the
    launcher's world (`runtime.init_process_group`)."""
    import socket

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from iso_megatron import apply_cpu_shims
    from iso_megatron.runtime import init_process_group

    if "RANK" in os.environ:
        init_process_group(device)
    elif not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device == "cpu":
        apply_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)


def attention_backends():
    """{name: None if usable, else why not}: megatron-core's local DotProductAttention and
    iso_megatron's SDPAAttention (models.build_gpt(attention="sdpa")), both always present."""
    return {"local": None, "sdpa": None}


def build_model(family, dtype, backend, size, device, max_len):
    """(model, how its precision was set): megatron's constructor (models.build_gpt), bf16 as
    Megatron-LM's --bf16 (precision.float16_module)."""
    import torch

    from iso_megatron.megatron.models import build_gpt, model_config

    cfg = dict(size["model"])
    if family == "gpt":
        cfg["num_query_groups"] = None
        cfg["ffn_hidden_size"] = 4 * cfg["hidden_size"]
    config = model_config(family, params_dtype=dtype, **cfg)
    torch.manual_seed(42)
    kwargs = {} if backend == "local" else {"attention": backend}
    model = build_gpt(config, family=family, vocab_size=size["vocab"], max_sequence_length=max_len, **kwargs)
    if device == "cuda":
        model = model.cuda()
    how = "fp32"
    if dtype != torch.float32:
        from iso_megatron.megatron.precision import float16_module

        model, how = float16_module(model, config), "precision.float16_module"
    return model.eval(), how


def gpt_of(model):
    """The GPTModel inside a Float16Module (or the model itself)."""
    return getattr(model, "module", model)


def set_iso(model, k=None, split="even"):
    from iso_megatron import ISOConfig, apply_iso

    apply_iso(model, ISOConfig(num_chunks=k, split=split, min_tokens=0) if k else ISOConfig(enabled=False))


def iso_bounds(model):
    plan = getattr(gpt_of(model).decoder, "iso_plan", None)
    return None if plan is None or plan.bounds is None else list(plan.bounds)


def prompt(s, vocab, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(1000 * s + seed)
    return torch.randint(0, vocab, (1, s), generator=g).to(device)


def greedy(model, ids, steps):
    """Prefill and greedy decode the way iso_megatron/megatron/generate.py does (its `prefill`
    and `sample`, megatron's static inference context), keeping what the check compares:
    prefill logits [s, V], the KV cache right after prefill, tokens, each step's logits."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron.megatron import generate as gen

    b, s = ids.shape
    max_len = s + steps
    visible = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=ids.device)  # decode rows
    ctx = StaticInferenceContext(b, max_len)
    with torch.no_grad():
        logits = gen.prefill(model, ids, ctx, gen.prefill_mask(model, s, ids.device))
        bounds = iso_bounds(model)
        kv = {n: (kv[0][:s].clone(), kv[1][:s].clone()) for n, kv in ctx.key_value_memory_dict.items()}
        ctx.sequence_len_offset = s
        ctx.enable_decode_mode()
        last, tokens, step_logits = logits[:, -1], [], []
        for i in range(steps):
            step_logits.append(last[0].float())
            token = gen.sample(last, 0.0, 0, 0.0, None)
            tokens.append(int(token[0]))
            if i == steps - 1:
                break
            p = s + i
            out = model(token[:, None], torch.full((b, 1), p, device=ids.device), visible[..., :p + 1],
                        inference_context=ctx, runtime_gather_output=True)
            ctx.sequence_len_offset += 1
            last = out[:, -1]
    return dict(logits=logits[0].float(), kv=kv, tokens=tokens, step_logits=step_logits, bounds=bounds)


def compare(ref, got, tol):
    """ISO (`got`) against stock (`ref`): logits, KV cache, and the greedy tokens wherever
    stock's top-2 margin exceeds twice the logits' absolute tolerance (beyond that a flip is
    rounding, and the sequences may part; comparison stops where they do)."""
    import math

    import torch

    logits = rel_err(got["logits"], ref["logits"])
    kv = _worst(rel_err(got["kv"][n][i], ref["kv"][n][i]) for n in ref["kv"] for i in (0, 1))
    abs_tol = tol * float(ref["logits"].abs().max())
    compared, decode, tokens_ok = 0, [0.0], True
    for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])):
        top2 = torch.topk(ref["step_logits"][i], 2).values
        margin = float(top2[0] - top2[1])
        if i > 0:  # this step's logits came from decode on the same prefix: the KV cache in use
            decode.append(rel_err(got["step_logits"][i], ref["step_logits"][i]))
        if margin > 2 * abs_tol:
            compared += 1
            if a != b:
                tokens_ok = False
                break
        elif a != b:
            break
    decode = _worst(decode)
    finite = all(math.isfinite(v) for v in (logits, kv, decode))
    ok = (finite and logits <= tol and kv <= tol and decode <= tol and tokens_ok
          and got["bounds"] is not None and len(got["bounds"]) >= 3)  # ISO really split
    return dict(logits_rel=logits, kv_rel=kv, decode_rel=decode, tokens_compared=compared,
                tokens_ok=tokens_ok, ok=ok)


def exactness_grid(cases, device, size, dtypes, backends, lengths, ks, steps, deadline, stand_in=True,
                   agree=bool):
    """Append every case's comparison of ISO with stock on the same model to `cases` (so that
    a run out of time keeps what it did). `stand_in`: one process, ISO planned as TP 2
    (comm.stand_in_tp) over the 1-rank group's own reducer; else the real TP group (torchrun),
    whose ranks must `agree` on stopping (any rank out of time: all stop, none waits alone in
    a collective)."""
    import torch

    from iso_megatron.comm import stand_in_tp

    total = 2 * len(dtypes) * len(backends) * len(lengths) * len(ks)
    for family in ("llama", "gpt"):
        for dtype in dtypes:
            tol = fp32_tol() if dtype == torch.float32 else BF16_REL_TOL
            for backend in backends:
                model, how = build_model(family, dtype, backend, size, device, max(lengths) + steps + 8)
                for s in lengths:
                    if agree(deadline.left() < 0):
                        raise OutOfTime(f"time budget exceeded after {len(cases)} of {total} cases")
                    ids = prompt(s, size["vocab"], device)
                    set_iso(model, None)
                    ref = greedy(model, ids, steps)
                    for k in ks:
                        split = "even" if k == 2 else "balanced"
                        set_iso(model, k, split)
                        with stand_in_tp(2) if stand_in else contextlib.nullcontext():
                            got = greedy(model, ids, steps)
                        r = compare(ref, got, tol)
                        cases.append(dict(family=family, dtype=str(dtype).replace("torch.", ""),
                                          attention=backend, precision=how, seq_len=s, k=k, split=split,
                                          bounds=got["bounds"], tol=tol, **r))
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()


def _worst(values) -> float:
    """The largest error, NaN if any is NaN (max() would drop it)."""
    values = list(values)
    return float("nan") if any(v != v for v in values) else max(values, default=0.0)


def summarize_cases(cases, figures):
    figures["cases"] = len(cases)
    for dt in sorted({c["dtype"] for c in cases}):
        sub = [c for c in cases if c["dtype"] == dt]
        for k in ("logits_rel", "kv_rel", "decode_rel"):
            figures[f"{dt}_max_{k}"] = _worst(c[k] for c in sub)
        figures[f"{dt}_tokens_compared"] = sum(c["tokens_compared"] for c in sub)
    by = {}
    for c in cases:
        by.setdefault(f"{c['family']}/{c['dtype']}/{c['attention']}", []).append(c)
    figures["by_setting"] = {key: dict(cases=len(sub), failed=sum(not c["ok"] for c in sub),
                                       tokens_compared=sum(c["tokens_compared"] for c in sub),
                                       **{k: _worst(c[k] for c in sub) for k in ("logits_rel", "kv_rel", "decode_rel")})
                             for key, sub in by.items()}
    figures["attention_backends"] = sorted({c["attention"] for c in cases})
    figures["precision"] = sorted({c["precision"] for c in cases})
    figures["failed_cases"] = [c for c in cases if not c["ok"]]
    figures["all_cases"] = cases
    bad = figures["failed_cases"]
    return not bad, (f"{len(bad)} of {len(cases)} cases out of tolerance or not split" if bad else None)


# ---------------------------------------------------------------- checks

def installed_names(site):
    """Top-level names the wheels put in `site` (gpu_check.sh's install folder), or None."""
    if not site or not os.path.isdir(site):
        return None
    return sorted(n for n in os.listdir(site) if not n.endswith((".dist-info", "__pycache__")))


def check_environment(ctx, deadline, figures):
    import importlib.metadata

    import torch

    import megatron.core  # noqa: F401  (the wheel, or the local install in a dry run)
    from iso_megatron.megatron import compat

    figures.update(python=platform.python_version(), torch=torch.__version__,
                   cuda=torch.version.cuda, megatron_core=importlib.metadata.version("megatron-core"),
                   megatron_core_path=os.path.dirname(megatron.core.__file__),
                   megatron_core_compat=list(compat.MEGATRON_CORE_VERSION),
                   wheels=os.environ.get("ISO_GPU_CHECK_WHEELS", "").split() or None,
                   wheels_installed=installed_names(os.environ.get("ISO_GPU_CHECK_SITE")),
                   gpu_count=ctx.gpu_count, device=ctx.device_name, tf32=setup_torch(ctx.device))
    try:
        import triton
        figures["triton"] = triton.__version__
    except ImportError:
        figures["triton"] = None
    backends = attention_backends()
    for name in backends:
        if ctx.attention and name not in ctx.attention and backends[name] is None:
            backends[name] = "not selected (--attention)"
    figures["attention_backends"] = backends
    ctx.backends = [name for name, why in backends.items() if why is None]
    if not ctx.backends:
        return False, f"no attention backend to check: {backends}"
    if not ctx.dry_run and ctx.gpu_count < 1:
        return False, "no CUDA GPU visible (run with --dry-run on CPU)"
    init_world(ctx.device, 1)
    return True, None


def chunk_attention_cases(device):
    """iso_megatron.sdpa.causal_attention for a later chunk (bottom-right causal) on every path
    this device takes (CUDA bf16, grouped K/V too where torch's cuDNN takes them: cuDNN blocks
    merged by their log-sum-exps, whose units and layout only a GPU can confirm; fp32:
    causal_lower_right) against fp32 SDPA with an explicit mask: (path, dtype, heads/groups, rel err, tolerance, ok) per case."""
    import torch
    import torch.nn.functional as F

    from iso_megatron.sdpa import causal_attention, chunk_path
    from tests.ranks import rel_err

    out = []
    g = torch.Generator().manual_seed(11)
    sq, sk, hn = 300, 1000, 64
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq).to(device)  # True = attend
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):
        for heads, groups in ((8, 8), (8, 2)):
            q = torch.randn(1, heads, sq, hn, generator=g).to(device, dtype)
            k, v = (torch.randn(1, groups, sk, hn, generator=g).to(device, dtype) for _ in range(2))
            rep = heads // groups
            want = F.scaled_dot_product_attention(
                q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1),
                attn_mask=allowed)
            got = causal_attention(q, k, v, hn ** -0.5)
            err = rel_err(got.float(), want)
            out.append(dict(path=chunk_path(q, k), dtype=str(dtype).replace("torch.", ""),
                            heads=heads, groups=groups, err=err, tol=tol, ok=bool(err <= tol)))
    return out


def check_exactness(ctx, deadline, figures):
    import torch

    size = ctx.size
    figures["chunk_attention"] = units = chunk_attention_cases(ctx.device)
    cases = []
    try:
        exactness_grid(cases, ctx.device, size, (torch.float32, torch.bfloat16), ctx.backends, size["lengths"],
                       size["ks"], size["steps"], deadline)
    except OutOfTime as e:
        summarize_cases(cases, figures)
        return False, str(e)
    ok, why = summarize_cases(cases, figures)
    bad = [u for u in units if not u["ok"]]
    if bad:
        return False, "; ".join(f"chunk attention {u['path']} {u['dtype']} {u['heads']}/{u['groups']}: "
                                f"err {u['err']:.2e} > {u['tol']:.0e}" for u in bad) + (f"; {why}" if why else "")
    return ok, why


SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "_unique2", "unique_consecutive",
            "masked_select", "repeat_interleave", "allclose")


def dispatch_sync_counter(device):
    """A TorchDispatchMode counting the aten ops that force a host synchronisation on CUDA
    (a value read back: item / tolist / bool(), nonzero, data-dependent output sizes) and
    blocking device-to-host copies. Works on CPU too: the dry run's detector, where every
    tensor is a host one; on CUDA only ops on CUDA tensors count."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name.split("::")[-1]
            if name in SYNC_OPS and (device == "cpu" or any(
                    isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)):
                self.ops[name] += 1
            elif name in ("copy_", "_to_copy") and not _non_blocking(name, args, kwargs):
                src = args[1] if name == "copy_" else args[0]
                dst_dev = args[0].device if name == "copy_" else kwargs.get("device")
                if (isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst_dev is not None
                        and torch.device(dst_dev).type == "cpu"):
                    self.ops["device_to_host_copy"] += 1
            return func(*args, **kwargs)

    return SyncCounter()


def _non_blocking(name, args, kwargs) -> bool:
    # copy_(self, src, non_blocking) takes it positionally; _to_copy as a keyword
    if name == "copy_" and len(args) > 2:
        return bool(args[2])
    return bool(kwargs.get("non_blocking", False))


def count_syncs(fn, device):
    """{detector: count} of host synchronisations while `fn` runs: CUDA's sync-debug warnings
    (CUDA only) and the dispatch-mode counter; plus which ops the counter saw."""
    import torch

    out = {}
    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["sync_debug"] = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.synchronize()
    counter = dispatch_sync_counter(device)
    with counter:
        fn()
    out["dispatch"] = sum(counter.ops.values())
    out["dispatch_ops"] = dict(counter.ops)
    return out


class SyncingReducer:
    """Mutant `extra-sync`: reads a value back at every reduce (ISO would then add syncs)."""

    def __init__(self, inner):
        self.inner = inner

    def start(self, tensor):
        tensor.sum().item()
        return self.inner.start(tensor)


def check_host_syncs(ctx, deadline, figures):
    """Syncs in one prefill, for every attention backend present: ISO <= stock for every
    detector, under the group's own reducer and under the proxy link; the positive control
    (one .item() inside the counted region) must raise every detector's count."""
    figures["detectors"] = ["sync_debug", "dispatch"] if ctx.device == "cuda" else ["dispatch"]
    why = []
    for backend in ctx.backends:
        if deadline.left() < 0:
            raise OutOfTime(f"time budget exceeded before attention {backend}")
        why += _host_syncs_of(ctx, backend, figures)
    return not why, "; ".join(why) or None


def _host_syncs_of(ctx, backend, figures):
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext

    from iso_megatron.comm import TorchDistReducer, stand_in_tp, use_reducer
    from iso_megatron.megatron import generate as gen
    from iso_megatron.proxy import ProxyLink, stand_in

    size, dev = ctx.size, ctx.device
    s = size["sync_len"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, _ = build_model("llama", dtype, backend, size, dev, s + 8)
    ids, mask = prompt(s, size["vocab"], dev), gen.prefill_mask(model, s, dev)
    probe = torch.ones(1, device=dev)

    def prefill():
        gen.prefill(model, ids, StaticInferenceContext(1, s), mask)

    def with_item():
        prefill()
        probe.sum().item()  # the positive control: one deliberate host sync

    # (context around stock and ISO, reducer factory ISO uses inside it)
    links = {"group_reducer": lambda: (contextlib.nullcontext(), TorchDistReducer),
             "proxy_link": lambda: (lambda link: (stand_in(link, tp=2), link))(ProxyLink(dev))}
    why = []
    for name, make in links.items():
        outer, inner = make()
        res = {}
        with torch.no_grad(), outer:
            set_iso(model, None)
            prefill()  # warm-up: lazy allocations (workspaces, pinned buffers) outside the count
            res["stock"] = count_syncs(prefill, dev)
            set_iso(model, 2)
            mutant = "extra-sync" in ctx.mutants
            iso_ctx = use_reducer(lambda g: SyncingReducer(inner(g))) if mutant else contextlib.nullcontext()
            with stand_in_tp(2), iso_ctx:
                prefill()
                res["iso"] = count_syncs(prefill, dev)
                res["iso_bounds"] = iso_bounds(model)
                res["control"] = count_syncs(with_item, dev)
        key = f"{backend}/{name}"
        figures[key] = res
        for det in figures["detectors"]:
            if res["iso"][det] > res["stock"][det]:
                why.append(f"{key}/{det}: ISO {res['iso'][det]} > stock {res['stock'][det]}")
            if res["control"][det] < res["iso"][det] + 1:
                why.append(f"{key}/{det}: positive control not detected")
        if res["iso_bounds"] is None:
            why.append(f"{key}: ISO did not split")
    return why


class PoisonReducer:
    """On start(t): keep t's value, set t to NaN; the value comes back only in the handle's
    wait() (on CUDA: copied on a side stream after an event, the caller's stream then waits for
    it). A read of t before wait() shows as NaN downstream. `late`: wait() does nothing and
    the values come back only in `restore_all()` (the positive control: reads before restore)."""

    def __init__(self, device, late=False):
        import torch

        self.device, self.late = device, late
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.pending, self.starts = [], 0

    def __call__(self, group):
        return self

    def start(self, tensor):
        saved = tensor.clone()
        tensor.fill_(float("nan"))
        self.starts += 1
        handle = _PoisonHandle(self, tensor, saved)
        self.pending.append(handle)
        return handle

    def restore(self, handle):
        import torch

        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                handle.tensor.copy_(handle.saved)
                handle.tensor.record_stream(self.stream)
                handle.saved.record_stream(self.stream)
                done = torch.cuda.Event()
                done.record()
            torch.cuda.current_stream().wait_event(done)
        else:
            handle.tensor.copy_(handle.saved)
        self.pending.remove(handle)

    def restore_all(self):
        for handle in list(self.pending):
            self.restore(handle)


class _PoisonHandle:
    def __init__(self, reducer, tensor, saved):
        self.reducer, self.tensor, self.saved = reducer, tensor, saved

    def wait(self):
        if not self.reducer.late and self in self.reducer.pending:
            self.reducer.restore(self)
        return True


def check_poison(ctx, deadline, figures):
    """ISO prefill with every reduce poisoned until waited for: logits equal stock's (fp32),
    no NaN, every handle waited; the late-restoring control must show NaN."""
    import torch

    from iso_megatron.comm import stand_in_tp, use_reducer
    from iso_megatron.megatron.cpu import causal_mask
    from iso_megatron.megatron import generate as gen
    from megatron.core.inference.contexts import StaticInferenceContext

    size, dev = ctx.size, ctx.device
    s = size["poison_len"]
    ok, why = True, []
    for family, k in (("llama", 3), ("gpt", 2)):
        if deadline.left() < 0:
            raise OutOfTime(f"time budget exceeded before {family}")
        model, _ = build_model(family, torch.float32, "local", size, dev, s + 8)
        ids, mask = prompt(s, size["vocab"], dev), causal_mask(s, device=dev)
        run = lambda: gen.prefill(model, ids, StaticInferenceContext(1, s), mask)[0].float()
        with torch.no_grad():
            set_iso(model, None)
            ref = run()
            set_iso(model, k, "balanced")
            res = {}
            for name, late in (("poisoned", "read-before-wait" in ctx.mutants), ("control_late_restore", True)):
                reducer = PoisonReducer(dev, late=late)
                with stand_in_tp(2), use_reducer(reducer):
                    got = run()
                    bounds = iso_bounds(model)
                left = len(reducer.pending)
                reducer.restore_all()
                if dev == "cuda":
                    torch.cuda.synchronize()
                nan = bool(torch.isnan(got).any())
                res[name] = dict(nan=nan, rel=None if nan else rel_err(got, ref), starts=reducer.starts,
                                 unwaited=left, bounds=bounds)
        figures[family] = res
        p, c = res["poisoned"], res["control_late_restore"]
        want_starts = 2 * size["model"]["num_layers"] * k
        if p["nan"] or p["rel"] > fp32_tol() or p["unwaited"] or p["starts"] != want_starts or not p["bounds"]:
            ok = False
            why.append(f"{family}: poisoned ISO prefill {p} (want no NaN, rel <= {fp32_tol()}, "
                       f"{want_starts} reduces all waited, a split)")
        if not (c["nan"] or (c["rel"] or 0) > fp32_tol()):
            ok = False
            why.append(f"{family}: positive control (reads before restore) not detected")
    return ok, "; ".join(why) or None


def check_tp2(ctx, deadline, figures):
    """torchrun 2 ranks running this script's `--worker tp2`: the exactness grid at real TP 2."""
    out = os.path.join(ctx.out, "tp2")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "scripts", "gpu_check.py"), "--worker", "tp2", "--out", out,
           "--attention", ",".join(ctx.backends),
           "--budget-s", str(max(10, int(deadline.left() - 15)))]
    if ctx.dry_run:
        cmd.append("--dry-run")
    extra = {"OMP_NUM_THREADS": "1"} if ctx.dry_run else {}
    rc, timed_out = run_logged(cmd, os.path.join(ctx.out, "tp2_nccl.log"), deadline.left(), subprocess_env(extra))
    figures.update(returncode=rc, timed_out=timed_out, log="tp2_nccl.log")
    path = os.path.join(out, "result.json")
    if timed_out or rc != 0 or not os.path.exists(path):
        return False, (f"torchrun {'timed out' if timed_out else f'exit {rc}'}; log tail: "
                       + tail(os.path.join(ctx.out, "tp2_nccl.log"), 800))
    with open(path) as f:
        result = json.load(f)
    figures["backend"] = result["backend"]
    ok, reason = summarize_cases(result["cases"], figures)
    if result.get("error"):
        return False, result["error"]
    return ok, reason


def worker_tp2(args):
    """One rank of the TP 2 check (under torchrun): the exactness grid over the real group."""
    import torch
    import torch.distributed as dist

    device = "cpu" if args.dry_run else "cuda"
    # a rank that hangs (e.g. in a collective) ends itself after its budget: torchrun's
    # workers live in sessions of their own, out of reach of a kill of torchrun's group
    timer = threading.Timer(args.budget_s + 15, lambda: os._exit(EXIT_FAILED))
    timer.daemon = True
    timer.start()
    setup_torch(device)
    size = SIZES["cpu" if args.dry_run else "gpu"]
    init_world(device, 2)
    try:
        backends = [n for n, why in attention_backends().items() if why is None
                    and (not args.attention or n in args.attention.split(","))]
        cases, error = [], None

        def any_rank(flag: bool) -> bool:
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())

        try:
            exactness_grid(cases, device, size, (torch.float32, torch.bfloat16), backends, size["tp2_lengths"],
                           size["tp2_ks"], size["steps"], Deadline(args.budget_s), stand_in=False,
                           agree=any_rank)
        except OutOfTime as e:
            error = str(e)
        for case in cases:
            case["rank"] = dist.get_rank()
        per_rank = [None] * dist.get_world_size()  # each rank compares its own KV-cache shard
        dist.all_gather_object(per_rank, dict(cases=cases, error=error))
        if dist.get_rank() == 0:
            errors = sorted({r["error"] for r in per_rank if r["error"]})
            with open(os.path.join(args.out, "result.json"), "w") as f:
                json.dump(dict(backend=dist.get_backend(), cases=[c for r in per_rank for c in r["cases"]],
                               error="; ".join(errors) or None), f, indent=1, default=str)
    finally:
        from iso_megatron.runtime import shutdown

        shutdown()
    return 0


def check_bench(ctx, deadline, figures):
    """launch/bench.py --link proxy, twice (CUDA_DEVICE_MAX_CONNECTIONS unset and =1), each in
    its own process (the variable is read when CUDA starts); its JSON parsed per length."""
    runs = [("default", None), ("max_connections_1", "1")]
    if ctx.dry_run:  # the variable is CUDA's alone; the same code runs in the first variant
        runs = runs[:1]
        figures["max_connections_1"] = dict(skipped="dry run: CUDA_DEVICE_MAX_CONNECTIONS only matters on CUDA")
    device = "cpu" if ctx.dry_run else "cuda"
    base = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--device", device, "--link", "proxy",
            "--bf16", "--splits", ctx.size["splits"]] + ctx.size["bench"]
    ok, why = True, []
    for i, (name, conns) in enumerate(runs):
        left = deadline.left()
        if left < 10:
            ok = False
            why.append(f"{name}: not run (time budget)")
            continue
        out = os.path.join(ctx.out, f"bench_{name}.json")
        env = {k: v for k, v in subprocess_env().items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
        if conns:
            env["CUDA_DEVICE_MAX_CONNECTIONS"] = conns
        rc, timed_out = run_logged(base + ["--output-json", out], os.path.join(ctx.out, f"bench_{name}.log"),
                                   left / (len(runs) - i), env)
        res = figures[name] = dict(returncode=rc, timed_out=timed_out, log=f"bench_{name}.log",
                                   CUDA_DEVICE_MAX_CONNECTIONS=conns)
        if rc not in (0, 2) or timed_out or not os.path.exists(out):
            ok = False
            why.append(f"{name}: bench {'timed out' if timed_out else f'exit {rc}'}: "
                       + tail(os.path.join(ctx.out, f"bench_{name}.log"), 600))
            continue
        with open(out) as f:
            records = json.load(f)
        if rc == 2:  # finished, and its own checks flagged records (kept below, with the figures)
            ok = False
            why.append(f"{name}: bench problems: " + "; ".join(
                f"s={r['seq_len']} {r['split']}: {p}" for r in records for p in r["problems"])[:600])
        res["rows"] = [dict(seq_len=r["seq_len"], split=r["split"], k=r["num_chunks"], bounds=r["boundaries"],
                            stock_ms=r["baseline_ms"], iso_ms=r["iso_ms"], bound_ms=r["bound_ms"],
                            ratio=r["iso_ms"] / r["baseline_ms"], stock_compute_ms=r["stock_compute_ms"],
                            iso_compute_ms=r["iso_compute_ms"], comm_ms=r["iso_comm_ms"],
                            hidden_fraction=r["hidden_fraction"], spread=r["spread"], problems=r["problems"],
                            max_rel_err=r["max_rel_err"], peak_mem_ratio=r.get("peak_mem_ratio"),
                            dtype=r.get("dtype"), param_dtypes=r.get("param_dtypes"),
                            # the cost model's compute against the measured (issue 11: the host rule)
                            model_compute_error=r.get("model_compute_error"),
                            model_stock_compute_error=r.get("model_stock_compute_error"),
                            calibration=r.get("calibration"))
                       for r in records]
        lens = {int(x) for x in ctx.size["bench"][ctx.size["bench"].index("--seq-lens") + 1].split(",")}
        missing = lens - {r["seq_len"] for r in res["rows"]}
        # forced splits must split; auto may run stock where it predicts no gain
        unsplit = [r["seq_len"] for r in res["rows"] if not r["bounds"] and r["split"] != "auto"]
        if missing or unsplit:
            ok = False
            why.append(f"{name}: lengths missing {sorted(missing)}, ISO not split at {unsplit}")
        nonfinite = [r["seq_len"] for r in res["rows"] if not r["max_rel_err"] == r["max_rel_err"]]
        if nonfinite:
            ok = False
            why.append(f"{name}: NaN outputs at {nonfinite}")
    return ok, "; ".join(why) or None


# ---------------------------------------------------------------- main

class Context:
    pass


def required_checks(dry_run: bool, gpu_count: int):
    """Which checks must pass, and why the others are skipped."""
    if dry_run:
        return set(CHECKS), {}
    if gpu_count >= 2:
        return set(CHECKS) - {"proxy_bench"}, {}
    return set(CHECKS) - {"tp2_nccl"}, {"tp2_nccl": "one GPU: real TP 2 needs two"}


def _note(check) -> str:
    """One line of figures per check for the printed table (the JSON has them all)."""
    f, name = check["figures"], check["name"]
    if check["status"] != "passed":
        return (check["reason"] or "")[:300]
    if name == "environment":
        return (f"torch {f['torch']}, CUDA {f['cuda']}, megatron-core {f['megatron_core']}, "
                f"{f['gpu_count']} GPU(s) {f['device'] or ''}")
    if name in ("exactness", "tp2_nccl"):
        return (f"{f['cases']} cases, attention {'+'.join(f['attention_backends'])}; max rel: fp32 logits "
                f"{f['float32_max_logits_rel']:.1e} kv {f['float32_max_kv_rel']:.1e} decode "
                f"{f['float32_max_decode_rel']:.1e}; bf16 logits {f['bfloat16_max_logits_rel']:.1e} kv "
                f"{f['bfloat16_max_kv_rel']:.1e}; bf16 tokens compared {f['bfloat16_tokens_compared']}")
    if name == "host_syncs":
        return "; ".join(f"{link}: " + ", ".join(f"{d} stock {v['stock'][d]} ISO {v['iso'][d]} control "
                                                 f"{v['control'][d]}" for d in f["detectors"])
                         for link, v in f.items() if isinstance(v, dict))
    if name == "poison_reducer":
        return "; ".join(f"{fam}: rel {v['poisoned']['rel']:.1e}, {v['poisoned']['starts']} reduces waited, "
                         f"control NaN {v['control_late_restore']['nan']}" for fam, v in f.items())
    if name == "proxy_bench":
        return "; ".join(f"{variant}: " + (f"{len(v['rows'])} rows" if "rows" in v else v.get("skipped", ""))
                         for variant, v in f.items())
    return ""


def print_table(report: Report):
    rows = [("check", "required", "status", "seconds", "figures")]
    for c in report.data["checks"].values():
        rows.append((c["name"], "yes" if c["required"] else "no", c["status"],
                     "-" if c["seconds"] is None else str(c["seconds"]), _note(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4], flush=True)
    bench = report.data["checks"].get("proxy_bench", {}).get("figures", {})
    lines = [(variant, r) for variant, v in bench.items() for r in v.get("rows", [])]
    if lines:
        print("proxy bench (ms; bound = the same-run bound: ISO's schedule under perfect overlap):", flush=True)
        print(f"  {'variant':<18} {'tokens':>6} {'split':>8} K {'stock':>8} {'ISO':>8} {'bound':>8} "
              f"{'ISO/stock':>9} {'mem ratio':>9}", flush=True)
        for variant, r in lines:
            mem = "-" if r["peak_mem_ratio"] is None else f"{r['peak_mem_ratio']:.2f}"
            print(f"  {variant:<18} {r['seq_len']:>6} {r['split']:>8} {r['k']} {r['stock_ms']:>8.2f} "
                  f"{r['iso_ms']:>8.2f} {r['bound_ms']:>8.2f} {r['ratio']:>9.3f} {mem:>9}", flush=True)
    print(f"verdict: {report.data['verdict']} (exit {report.data['exit_code']}, "
          f"{report.data['elapsed_s']} s)", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and the logs")
    p.add_argument("--dry-run", action="store_true", help="run every check's logic on CPU, small; never a pass")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="global deadline in seconds: no check starts after it, and 20 s later the "
                        "watchdog writes the summary and exits (default 200)")
    p.add_argument("--only", default=None,
                   help="comma-separated checks to run besides environment (the rest: not-run)")
    p.add_argument("--attention", default="",
                   help="comma-separated attention backends to check (local, sdpa; default: every one "
                        "present)")
    p.add_argument("--mutant", default="", help=f"comma-separated faults to plant ({', '.join(MUTANTS)}): "
                                                "the checks concerned must fail")
    p.add_argument("--worker", choices=("tp2",), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    bad = only - set(CHECKS)
    if bad:
        p.error(f"--only: unknown checks {sorted(bad)}; choose from {', '.join(CHECKS)}")
    args.only = only | {"environment"}
    args.mutants = [m for m in args.mutant.split(",") if m]
    bad = set(args.mutants) - set(MUTANTS)
    if bad:
        p.error(f"--mutant: unknown {sorted(bad)}; choose from {', '.join(MUTANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    warnings.filterwarnings("ignore")
    if args.worker == "tp2":
        return worker_tp2(args)
    import torch

    ctx = Context()
    ctx.out, ctx.dry_run, ctx.mutants, ctx.backends = args.out, args.dry_run, args.mutants, ["local"]
    ctx.attention = [a for a in args.attention.split(",") if a]
    ctx.gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ctx.device = "cpu" if args.dry_run else "cuda"
    ctx.device_name = torch.cuda.get_device_name(0) if ctx.gpu_count else None
    ctx.size = SIZES["cpu" if args.dry_run else "gpu"]
    report = Report(args.out, args.dry_run, args.budget_s, args.mutants)
    required, skipped = required_checks(args.dry_run, ctx.gpu_count)
    report.set(gpu_count=ctx.gpu_count, device=ctx.device_name, required=sorted(required, key=CHECKS.index),
               mode="dry-run (CPU)" if args.dry_run else f"{ctx.gpu_count} GPU(s)")
    for name in CHECKS:
        entry = report.check(name, name in required)
        if name in skipped:
            entry.update(status="skipped", reason=skipped[name])
        elif name not in args.only:
            entry.update(status="not-run", reason="not selected (--only)")
    report.write()
    glob = Deadline(args.budget_s)
    start_watchdog(report, args.budget_s + 20)
    fns = dict(environment=check_environment, exactness=check_exactness, host_syncs=check_host_syncs,
               poison_reducer=check_poison, tp2_nccl=check_tp2, proxy_bench=check_bench)
    for name in CHECKS:
        if name not in args.only:
            continue
        if name != "environment" and report.data["checks"]["environment"]["status"] != "passed":
            report.data["checks"][name].update(status="not-run", reason="environment check failed")
            continue
        run_check(report, name, lambda d, f, fn=fns[name]: fn(ctx, d, f), ctx.size["budgets"][name], glob)
        if name == "environment":
            report.set(attention_backends=ctx.backends,
                       **{k: report.data["checks"][name]["figures"].get(k)
                          for k in ("torch", "cuda", "megatron_core", "python", "tf32")})
    code = report.finish()
    print_table(report)
    log(f"summary: {report.path}")
    return code


if __name__ == "__main__":
    code = EXIT_FAILED
    try:
        code = main()
    except SystemExit as e:  # argparse: usage errors
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
    except BaseException:
        traceback.print_exc()
    finally:
        if "torch.distributed" in sys.modules:  # process groups down in order (iso_megatron.runtime)
            with contextlib.suppress(Exception):
                from iso_megatron.runtime import shutdown

                shutdown()
    sys.stdout.flush()
    os._exit(code)  # megatron's and gloo's threads must not hold the exit
