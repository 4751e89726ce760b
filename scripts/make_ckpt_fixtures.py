"""Regenerate the committed torch_dist checkpoint fixtures of the installed megatron-core.

    python3 scripts/make_ckpt_fixtures.py                        # megatron-core 0.16.1
    .venv-mcore-0.19/bin/python scripts/make_ckpt_fixtures.py    # megatron-core 0.19.2
    (or: torchrun --nproc-per-node 2 scripts/make_ckpt_fixtures.py)

Run plainly, it starts itself on 2 CPU ranks (torchrun, gloo) with the same Python. The stock
megatron-core model (local spec) of each family is built at tensor-parallel size 2 with a fixed
seed and saved the way Megatron-LM saves `--ckpt-format torch_dist` (tests.ckpt_fixtures), into

    tests/fixtures/ckpt/mcore-<megatron-core version>/<family>-tp2/checkpoint/   the checkpoint
    tests/fixtures/ckpt/mcore-<megatron-core version>/<family>-tp2/reference.pt  what it computed

replacing what was there. reference.pt holds plain tensors, lists, numbers and strings only
(`torch.load(path, weights_only=True)`): the writing model's prompt logits (fp32, full vocabulary)
and greedy tokens, the prompt, the model's shape and the versions that wrote it.
tests/test_ckpt_versions.py loads every fixture under whichever megatron-core runs the suite, so
with both environments each version's checkpoints are loaded by both versions.

The models are the smallest that still exercise TP resharding (under 100 KiB a fixture, most
of it torch.save's per-tensor overhead): one layer (torch_dist's `decoder.layers.*` stack), heads
and (llama) query groups, FFN and a 128-token vocabulary split over 2 ranks, learned positions
(gpt) or RoPE (llama), tied (gpt) or untied (llama) output layer.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import warnings

warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "tests", "fixtures", "ckpt")
SAVED_TP = 2
VOCAB = 128      # padded vocabulary: 64 rows per TP rank
MAX_POS = 32     # learned position embeddings (gpt): prompt + generated tokens fit
PROMPT_LEN = 12
STEPS = 8
FAMILIES = {  # model_config arguments: heads (and llama's groups) split over TP 2
    "gpt": dict(num_layers=1, hidden_size=16, num_attention_heads=4, ffn_hidden_size=64),
    "llama": dict(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=32),
}
SEEDS = {"gpt": 3, "llama": 8}  # greedy tokens that change along the way, clear top-2 margins
MIN_MARGIN = 1e-3  # greedy top-1 over top-2 logit gap, relative to the largest logit


def prompt():
    import torch

    return torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


def _greedy_margin(model, ids) -> float:
    """Smallest top-1/top-2 gap (relative) over the greedy steps: ties would make tokens flaky."""
    import torch

    from tests import ckpt_fixtures as fx

    margins = []
    with torch.no_grad():
        for _ in range(STEPS):
            last = fx.forward(model, ids)[:, -1].float()
            top = last.topk(2, dim=-1).values[0]
            margins.append(float((top[0] - top[1]) / last.abs().max()))
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    return min(margins)


def save_fixtures(out: str = OUT) -> list:
    """Rank side (every rank calls it): save each family, rank 0 writes reference.pt."""
    import torch
    import torch.distributed as dist

    from tests import ckpt_fixtures as fx

    version = importlib.metadata.version("megatron-core")
    root = os.path.join(out, f"mcore-{version}")
    fx.setup(SAVED_TP)
    written = []
    for family, shape in FAMILIES.items():
        target = os.path.join(root, f"{family}-tp{SAVED_TP}")
        ckpt = os.path.join(target, "checkpoint")
        if dist.get_rank() == 0:
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(ckpt)
        dist.barrier()
        model = fx.build_stock(family, SEEDS[family], vocab_size=VOCAB, max_sequence_length=MAX_POS,
                               **shape)
        args = fx.megatron_args(model, family, "torch_dist", vocab=VOCAB,
                                max_position_embeddings=MAX_POS)
        fx.save_torch_dist(model, family, ckpt, args=args)
        ids = prompt()
        ref = fx.reference(model, STEPS, prompt=ids)
        margin = _greedy_margin(model, ids.clone())
        if margin < MIN_MARGIN:
            raise SystemExit(f"{family}: greedy top-2 margin {margin:.2g} < {MIN_MARGIN}: the "
                             "tokens would hang on rounding; pick another seed (SEEDS)")
        iteration_dir = os.path.join(ckpt, f"iter_{fx.ITERATION:07d}")
        names = sorted(os.listdir(iteration_dir))
        if dist.get_rank() == 0:
            torch.save({
                "megatron_core": version, "torch": torch.__version__.split("+")[0],
                "family": family, "saved_tp": SAVED_TP, "iteration": fx.ITERATION,
                "seed": SEEDS[family],
                "model": dict(shape, vocab_size=VOCAB, max_sequence_length=MAX_POS),
                "files": names, "prompt": ids[0].tolist(), "logits": ref["logits"].contiguous(),
                "tokens": list(ref["tokens"]), "greedy_margin": margin,
            }, os.path.join(target, "reference.pt"))
            written.append((target, names, ref["tokens"], margin))
        dist.barrier()
    return written


def main(argv) -> int:
    """[--out DIR]: write under DIR instead of tests/fixtures/ckpt (to compare, say)."""
    out = os.path.abspath(argv[argv.index("--out") + 1]) if "--out" in argv else OUT
    if "RANK" not in os.environ:  # plain run: start 2 ranks with this Python
        from tests.harness import run_torchrun

        rc, log = run_torchrun(SAVED_TP, [os.path.abspath(__file__), "--out", out], timeout=600)
        print(log[-6000:] if rc else "\n".join(l for l in log.splitlines() if l.startswith("wrote")))
        return rc
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for target, names, tokens, margin in save_fixtures(out):
        print(f"wrote {os.path.relpath(target, ROOT)}: {' '.join(names)}; greedy tokens {tokens}, "
              f"margin {margin:.3g}", flush=True)
    from iso_megatron.runtime import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    from iso_megatron.runtime import run_main

    run_main(lambda: main(sys.argv[1:]))
