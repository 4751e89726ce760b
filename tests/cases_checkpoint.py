"""Rank-side cases for the checkpoint tests (run through tests.harness.run_ranks)."""

from __future__ import annotations

import os
import shutil
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from tests import ckpt_fixtures as fx


def build_iso(family: str, seed: int = 999, **cfg):
    """An ISO model (ISO layer spec) with weights unlike the saved ones until loaded."""
    from iso_megatron import get_gpt_layer_iso_spec
    from iso_megatron.megatron.models import build_gpt, model_config

    build = {k: cfg.pop(k) for k in ("share_embeddings_and_output_weights", "vocab_size",
                                     "max_sequence_length") if k in cfg}
    torch.manual_seed(seed)
    return build_gpt(model_config(family, **cfg), get_gpt_layer_iso_spec(), family=family,
                     **build).eval()


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _dir(root, *parts):
    return os.path.join(root, "-".join(map(str, parts)))


def matrix(root: str, families, formats, saved_tps, load_tps):
    """Save every (family, format, saved TP); load each at every load TP into an ISO model."""
    from iso_megatron import ISOConfig, apply_iso
    from iso_megatron.megatron.checkpoint import checkpoint_args, find_checkpoint, load_checkpoint

    refs = {}
    for saved in saved_tps:
        for family in families:
            for fmt in formats:
                if fmt == "legacy_v0" and family != "gpt":
                    continue  # checkpoint_version 0 predates grouped-query attention
                refs[(family, fmt, saved)] = fx.make_checkpoint(fmt, family, saved,
                                                                _dir(root, family, fmt, saved))
    out = []
    for tp in load_tps:
        fx.setup(tp)
        for (family, fmt, saved), ref in refs.items():
            d = _dir(root, family, fmt, saved)
            model = build_iso(family)
            before = rel_err(fx.forward(model, fx.PROMPT).float(), ref["logits"])
            info = load_checkpoint(model, d)
            apply_iso(model, ISOConfig(num_chunks=2, min_tokens=0))
            got = fx.reference(model)
            found = find_checkpoint(d)
            out.append(dict(family=family, fmt=fmt, saved=saved, load=tp, format=info.format,
                            info_tp=info.tp, iteration=info.iteration, tag=info.tag,
                            same_info=(found.format, found.tp) == (info.format, info.tp),
                            args=checkpoint_args(d), before=before,
                            err=rel_err(got["logits"], ref["logits"]),
                            tokens=got["tokens"], ref_tokens=ref["tokens"]))
    return out


def _truncate(path: str, keep: float = 0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _overwrite(path: str, offset: int = 0, length: int = None, byte: bytes = b"\xa5"):
    """Garbage over `length` bytes at `offset` (default: the whole file); the size is kept."""
    size = os.path.getsize(path)
    length = size - offset if length is None else length
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte * length)


def common_state_location(iteration_dir: str):
    """(file, offset, length) of a torch_dist checkpoint's common state (Megatron args,
    iteration): common.pt, whole, as megatron-core 0.16 writes it, or the `common_state` entry of
    a .distcp file, as 0.19 writes it (read from torch's own .metadata)."""
    path = os.path.join(iteration_dir, "common.pt")
    if os.path.exists(path):
        return "common.pt", 0, os.path.getsize(path)
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(iteration_dir).read_metadata()
    item = next(s for i, s in md.storage_data.items() if i.fqn.split("/")[0] == "common_state")
    return item.relative_path, item.offset, item.length


def _catch(fn):
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - the test asserts type and message
        return dict(type=type(e).__name__, message=str(e),
                    not_found=isinstance(e, FileNotFoundError), value_error=isinstance(e, ValueError))


def errors(root: str):
    """Every wrong or damaged input: the exception each rank raised (None = loaded)."""
    from iso_megatron.megatron.checkpoint import checkpoint_args, load_checkpoint

    rank = dist.get_rank()
    dirs = {name: _dir(root, name) for name in
            ("llama_torch", "llama_dist", "gpt_dist", "heads3", "empty", "bad_tracker", "nowhere",
             "missing_key", "trunc_torch", "trunc_dist", "trunc_common", "corrupt_common",
             "corrupt_dist", "pipeline")}
    fx.make_checkpoint("torch", "llama", 2, dirs["llama_torch"])
    fx.make_checkpoint("torch_dist", "llama", 2, dirs["llama_dist"])
    fx.make_checkpoint("torch_dist", "gpt", 2, dirs["gpt_dist"])
    fx.make_checkpoint("torch", "gpt", 1, dirs["heads3"], num_attention_heads=3, hidden_size=48)
    if rank == 0:
        for name in ("empty", "bad_tracker", "nowhere", "pipeline"):
            os.makedirs(dirs[name])
        with open(os.path.join(dirs["bad_tracker"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("garbage\n")
        with open(os.path.join(dirs["nowhere"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("20")
        os.makedirs(os.path.join(dirs["pipeline"], "mp_rank_00_000"))
        for name, src in (("missing_key", "llama_torch"), ("trunc_torch", "llama_torch"),
                          ("trunc_dist", "llama_dist"), ("trunc_common", "llama_dist"),
                          ("corrupt_common", "llama_dist"), ("corrupt_dist", "llama_dist")):
            shutil.copytree(dirs[src], dirs[name])
        for tp_rank in (0, 1):  # a key dropped from every shard
            path = os.path.join(dirs["missing_key"], "iter_0000010", f"mp_rank_{tp_rank:02d}",
                                "model_optim_rng.pt")
            state = torch.load(path, weights_only=False)
            del state["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
            torch.save(state, path)
        # only TP rank 1's shard is damaged: rank 0 alone would load fine
        _truncate(os.path.join(dirs["trunc_torch"], "iter_0000010", "mp_rank_01", "model_optim_rng.pt"))
        _truncate(os.path.join(dirs["trunc_dist"], "iter_0000010", "__1_0.distcp"))
        # the common state (args, iteration): common.pt (megatron-core 0.16), or inside a .distcp
        # file (0.19): truncated, or overwritten with garbage (its bytes only)
        holder, offset, length = common_state_location(os.path.join(dirs["llama_dist"], "iter_0000010"))
        _truncate(os.path.join(dirs["trunc_common"], "iter_0000010", holder))
        _overwrite(os.path.join(dirs["corrupt_common"], "iter_0000010", holder), offset, length)
        _overwrite(os.path.join(dirs["corrupt_dist"], "iter_0000010", "__1_0.distcp"), byte=b"\0")
    dist.barrier()
    holder = common_state_location(os.path.join(dirs["llama_dist"], "iter_0000010"))[0]

    fx.setup(2)
    llama = lambda **cfg: build_iso("llama", **cfg)  # noqa: E731
    cases = {
        "missing_dir": lambda: load_checkpoint(llama(), os.path.join(root, "no-such-dir")),
        "empty_dir": lambda: load_checkpoint(llama(), dirs["empty"]),
        "bad_tracker": lambda: load_checkpoint(llama(), dirs["bad_tracker"]),
        "tracker_nowhere": lambda: load_checkpoint(llama(), dirs["nowhere"]),
        "pipeline": lambda: load_checkpoint(llama(), dirs["pipeline"]),
        "format_mismatch": lambda: load_checkpoint(llama(), dirs["llama_torch"], ckpt_format="torch_dist"),
        "shape_torch": lambda: load_checkpoint(llama(ffn_hidden_size=192), dirs["llama_torch"]),
        "shape_dist": lambda: load_checkpoint(llama(ffn_hidden_size=192), dirs["llama_dist"]),
        "missing_key": lambda: load_checkpoint(llama(), dirs["missing_key"]),
        "unexpected_torch": lambda: load_checkpoint(
            build_iso("llama", share_embeddings_and_output_weights=True), dirs["llama_torch"]),
        "unexpected_dist": lambda: load_checkpoint(
            build_iso("llama", share_embeddings_and_output_weights=True), dirs["llama_dist"]),
        "missing_dist": lambda: load_checkpoint(
            build_iso("gpt", share_embeddings_and_output_weights=False), dirs["gpt_dist"]),
        # same tensor shapes, other heads: only the stored args can tell
        "heads_mismatch": lambda: load_checkpoint(
            llama(num_attention_heads=16, num_query_groups=8, kv_channels=4), dirs["llama_torch"]),
        "truncated_rank1": lambda: load_checkpoint(llama(), dirs["trunc_torch"]),
        "truncated_distcp": lambda: load_checkpoint(llama(), dirs["trunc_dist"]),
        "truncated_common": lambda: load_checkpoint(llama(), dirs["trunc_common"]),
        "corrupt_common": lambda: load_checkpoint(llama(), dirs["corrupt_common"]),
        "corrupt_distcp": lambda: load_checkpoint(llama(), dirs["corrupt_dist"]),
        "tp_indivisible": lambda: load_checkpoint(llama(), dirs["heads3"]),
        "tp_indivisible_args": lambda: checkpoint_args(dirs["heads3"], tensor_model_parallel_size=2),
        "control": lambda: load_checkpoint(llama(), dirs["llama_torch"]),
    }
    out = {name: _catch(fn) for name, fn in cases.items()}
    alive = torch.ones(1)
    dist.all_reduce(alive)  # every rank is here and in step after all of that
    out["alive"] = int(alive.item())
    out["common_state_file"] = os.path.join("iter_0000010", holder)  # where this version put it
    return out
