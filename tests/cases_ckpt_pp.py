"""Rank-side cases for checkpoints saved with pipeline parallelism (tests/test_infer_checkpoints.py).

`save_tp2_pp2` (4 ranks): a STOCK megatron-core GPT model (tied embeddings, 4 layers) built at
TP 2 x PP 2, saved as Megatron-LM saves it, in both formats:
  torch/       iter_0000010/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt: each stage's own
               state_dict_for_save_checkpoint() (layers numbered from 0 per stage; the last stage
               holds its copy of the tied word embeddings as output_layer.weight)
  torch_dist/  dist_checkpointing.save of the stages' sharded state dicts
with the args Megatron-LM stores (pipeline_model_parallel_size 2). The reference is that model's
own prompt logits and greedy tokens, by full recompute through its two stages (megatron's own
forward per stage; the hidden state sent between them with torch.distributed).

`resave_tp1_pp2` (2 ranks): the chain's middle link. A stock model built at TP 1 x PP 2 loads
each (2, 2) checkpoint through `load_checkpoint` and saves itself again at (1, 2):
  torch-tp1pp2/       legacy Megatron-LM names (language_model.encoder..., the tied copy as the
                      top-level `word_embeddings_for_head`, as legacy GPTModel saves it)
  torch_dist-tp1pp2/  dist_checkpointing
then two damaged copies of torch-tp1pp2 (stored layout not matching the files) are loaded, and an
uneven (1, 2) model (1 + 3 layers, megatron-core's num_layers_in_first_pipeline_stage) saves the
(2, 2) checkpoint it loaded as torch-uneven (decoder_first_pipeline_num_layers=1 in its args),
which the even stages then load back.
"""

from __future__ import annotations

import os
import shutil
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from tests.ckpt_fixtures import PROMPT, STEPS  # the prompt the launcher tests run

FAMILY = "gpt"       # tied embeddings: the last stage's copy is part of what is checked
NUM_LAYERS = 4
SEED = 1  # with INIT_STD: greedy tokens that change, clear top-2 margins
# megatron's default init (std 0.02) leaves a tied model echoing its last prompt token: wider
# weights make the greedy tokens change along the way
INIT_STD = 0.2


def _setup(tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    from iso_megatron import apply_cpu_shims

    apply_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _stock_stage(seed: int, first_stage_layers=None):
    """This rank's stage of the stock GPT model (local spec); tied embeddings are synced between
    the stages by megatron-core itself at build time (its `.cuda()` there made a no-op on CPU)."""
    from megatron.core import parallel_state as ps

    from iso_megatron.megatron.cpu import tensor_cuda_on_cpu
    from iso_megatron.megatron.models import build_gpt, model_config

    config = model_config(FAMILY, num_layers=NUM_LAYERS, pipeline_model_parallel_size=2,
                          pipeline_dtype=torch.float32, init_method_std=INIT_STD,
                          num_layers_in_first_pipeline_stage=first_stage_layers)
    torch.manual_seed(seed + ps.get_pipeline_model_parallel_rank())  # each stage its own layers
    with tensor_cuda_on_cpu():
        model = build_gpt(config, family=FAMILY, pre_process=ps.is_pipeline_first_stage(),
                          post_process=ps.is_pipeline_last_stage())
    return model.eval()


def _args(model, ckpt_format: str):
    from megatron.core import parallel_state as ps

    from tests import ckpt_fixtures as fx

    args = fx.megatron_args(model, FAMILY, ckpt_format)
    args.pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size()
    args.decoder_first_pipeline_num_layers = args.decoder_last_pipeline_num_layers = None
    return args


@torch.no_grad()
def _forward(model, ids):
    """One forward through the stages as megatron's inference runs them: each stage receives the
    whole hidden state, runs, sends it on; the last stage's logits (full vocabulary), else None."""
    from megatron.core import parallel_state as ps

    from iso_megatron import causal_mask

    s = ids.size(1)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, ids.size(0), model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(ids, torch.arange(s)[None].expand_as(ids), causal_mask(s), runtime_gather_output=True)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out.float()


def _reference(model) -> dict:
    """Prompt logits and STEPS greedy tokens by full recompute (every rank gets the tokens)."""
    from megatron.core import parallel_state as ps

    ids, tokens, logits = PROMPT.clone(), [], None
    for step in range(STEPS + 1):
        out = _forward(model, ids)
        if step == 0:
            logits = out
        if step == STEPS:
            break
        token = torch.zeros(1, 1, dtype=torch.long) if out is None else out[:, -1:].argmax(-1)
        dist.broadcast(token, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        tokens.append(int(token))
        ids = torch.cat([ids, token], 1)
    return dict(logits=logits, tokens=tokens)


def _save_torch(model, state: dict, save_dir: str, args) -> None:
    """Megatron-LM `--ckpt-format torch`: mp_rank_{tp:02d}_{pp:03d} at PP > 1 (get_checkpoint_name)."""
    from megatron.core import parallel_state as ps

    from tests import ckpt_fixtures as fx

    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}_{ps.get_pipeline_model_parallel_rank():03d}"
    path = os.path.join(save_dir, f"iter_{fx.ITERATION:07d}", name, "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": fx.ITERATION, "model": state,
                "rng_state": fx._rng_state(), "num_floating_point_operations_so_far": 0}, path)
    dist.barrier()
    fx._write_tracker(save_dir, str(fx.ITERATION))


def save_tp2_pp2(root: str):
    """4 ranks: the stock model at (2, 2) saved in both formats; its reference on the last stage."""
    from megatron.core import parallel_state as ps

    from tests import ckpt_fixtures as fx

    _setup(2, 2)
    model = _stock_stage(SEED)
    _save_torch(model, model.state_dict_for_save_checkpoint(), os.path.join(root, "torch-tp2pp2"),
                _args(model, "torch"))
    fx.save_torch_dist(model, FAMILY, os.path.join(root, "torch_dist-tp2pp2"),
                       args=_args(model, "torch_dist"))
    ref = _reference(model)
    return ref if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 else None


def _legacy_state(model) -> dict:
    """Legacy Megatron-LM GPTModel's state_dict_for_save_checkpoint: language_model.{embedding,
    encoder}, and on the last stage of a tied model the copy as `word_embeddings_for_head`."""
    from tests import ckpt_fixtures as fx

    state = fx.legacy_state(model)
    head = state["language_model"].pop("output_layer", None)
    if head is not None:
        state["word_embeddings_for_head"] = head
    return state


def _load_error(model, directory: str):
    from iso_megatron.megatron.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(model, directory)
    except CheckpointError as e:
        return dict(type=type(e).__name__, message=str(e))
    return None


def resave_tp1_pp2(root: str) -> dict:
    """2 ranks: load each (2, 2) checkpoint at (1, 2) with the loader, save it again at (1, 2);
    then the two damaged copies. Returns this rank's load errors of those."""
    from iso_megatron.megatron.checkpoint import load_checkpoint
    from tests import ckpt_fixtures as fx

    _setup(1, 2)
    for fmt in ("torch", "torch_dist"):
        model = _stock_stage(SEED + 100)  # other weights: the load must replace every one
        load_checkpoint(model, os.path.join(root, f"{fmt}-tp2pp2"))
        target = os.path.join(root, f"{fmt}-tp1pp2")
        if fmt == "torch":
            _save_torch(model, _legacy_state(model), target, _args(model, "torch"))
        else:
            fx.save_torch_dist(model, FAMILY, target, args=_args(model, "torch_dist"))

    bad = {"uneven": dict(decoder_first_pipeline_num_layers=1),  # files hold 2 + 2 layers
           "stages": dict(pipeline_model_parallel_size=4)}       # 2 stage directories
    iteration = f"iter_{fx.ITERATION:07d}"
    if dist.get_rank() == 0:
        for name, change in bad.items():
            target = os.path.join(root, f"torch-bad-{name}")
            shutil.copytree(os.path.join(root, "torch-tp1pp2"), target)
            for stage in ("mp_rank_00_000", "mp_rank_00_001"):
                path = os.path.join(target, iteration, stage, "model_optim_rng.pt")
                state = torch.load(path, weights_only=False)
                vars(state["args"]).update(change)
                torch.save(state, path)
    dist.barrier()
    model = _stock_stage(SEED)
    out = {name: _load_error(model, os.path.join(root, f"torch-bad-{name}")) for name in bad}

    uneven = _stock_stage(SEED + 200, first_stage_layers=1)
    load_checkpoint(uneven, os.path.join(root, "torch-tp2pp2"))
    args = _args(uneven, "torch")
    args.decoder_first_pipeline_num_layers = 1
    state = uneven.state_dict_for_save_checkpoint()
    out["uneven_saved_layers"] = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")})
    _save_torch(uneven, state, os.path.join(root, "torch-uneven"), args)
    direct, back = _stock_stage(SEED + 300), _stock_stage(SEED + 400)
    load_checkpoint(direct, os.path.join(root, "torch-tp2pp2"))
    load_checkpoint(back, os.path.join(root, "torch-uneven"))
    want = direct.state_dict()
    out["uneven_roundtrip_keys"] = sorted(k for k in want if torch.is_tensor(want[k]))
    out["uneven_roundtrip_diff"] = max(float((back.state_dict()[k] - want[k]).abs().max())
                                       for k in out["uneven_roundtrip_keys"])
    return out
