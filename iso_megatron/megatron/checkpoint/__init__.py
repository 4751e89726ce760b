"""Checkpoints as users have them, loaded into a megatron-core GPTModel (stock or ISO) at the
current tensor-parallel (TP) size, whatever TP they were saved at.

    info = find_checkpoint(load_dir)           # local: which format, which iteration, saved TP, args
    shape = checkpoint_args(load_dir, tp)      # local: Megatron-LM model args stored in it (or None)
    info = load_checkpoint(model, load_dir)    # collective over the world: every rank calls it

Each takes `trust_checkpoint=False` (launch/infer.py: --trust-checkpoint), see "Pickles" below.

Formats:
- Megatron `torch_dist` (dist_checkpointing dir: metadata.json, .metadata, *.distcp; the common
  state with 'args' in common.pt as megatron-core 0.16 writes it, or inside the .distcp files as
  its `common_state` entry, with no common.pt, as megatron-core 0.19 writes it; either layout
  loads under either version): `dist_checkpointing.load(model.sharded_state_dict(), dir)`;
  megatron reshards.
- Megatron legacy `torch`: `iter_{:07d}|release/mp_rank_{tp:02d}/model_optim_rng.pt` (PP 1) or
  `mp_rank_{tp:02d}_{pp:03d}/` (saved at PP > 1: each stage's layers numbered from 0, placed by
  megatron-core's get_transformer_layer_offset over the stored args) with 'model', 'args',
  'checkpoint_version', 'iteration'; each rank reads the saved stages holding its layers and the
  TP shards that overlap its own slice, and merges/splits every TP-parallel tensor along its
  partition dimension: any saved (TP, PP) into any other.
- DeepSpeed engine `save_checkpoint()`: `latest` names the tag, `{tag}/mp_rank_{:02d}_model_states.pt`
  with the model under 'module' (Megatron-DeepSpeed also stores 'args' there); resharded as `torch`
  (saved at PP 1; loads into pipeline stages too).
Key names: Transformer-Engine spec names and Megatron-DeepSpeed / legacy Megatron-LM names map to
whatever names the built model uses.

Modules:
  find         locating a checkpoint (formats, tracker files, shard files), CheckpointInfo, the
               errors
  unpickle     every pickle read: torch.load(weights_only=True) with the allowlist
               CHECKPOINT_GLOBALS, torch_dist's .metadata and .distcp bytes entries likewise
  keys         key names: canonical names, TE / legacy / DeepSpeed renames, ignored keys
  stored_args  the Megatron-LM args stored with a checkpoint: checkpoint_args, the TP check
               (Megatron's rule, config.tp_divisibility_error), heads/groups against the model
  reshard      merging/splitting `torch` / DeepSpeed TP shards (and the layouts assumed)
  torch_dist   the common state in either layout (read_common_state); the dist_checkpointing
               request, checked against the saved metadata and files
  load         load_checkpoint and the agreement of errors across ranks

Errors are `CheckpointError` (a ValueError) or `CheckpointNotFoundError` (also a FileNotFoundError).
`load_checkpoint` raises on EVERY rank when any rank fails: after each local step the ranks all-reduce
a failure flag (gloo) and, on failure, all raise the failing rank's message.

Pickles: checkpoint files are pickles, and unpickling can run any code a file names. Every one is
read with torch's weights_only unpickler allowing torch's own types and exactly the types Megatron
and DeepSpeed checkpoints hold (unpickle.CHECKPOINT_GLOBALS: argparse.Namespace, Megatron's enums,
numpy RNG state, ...); anything else raises `UnsafeCheckpointError` (a CheckpointError) naming the
type and the file. `trust_checkpoint=True` unpickles fully, as Megatron-LM does: only for
checkpoints you trust.
"""

from .find import CheckpointError, CheckpointInfo, CheckpointNotFoundError, find_checkpoint
from .keys import canonical_name, is_ignored_key
from .load import load_checkpoint
from .stored_args import check_tp, checkpoint_args
from .unpickle import CHECKPOINT_GLOBALS, UnsafeCheckpointError

__all__ = ["load_checkpoint", "checkpoint_args", "find_checkpoint", "CheckpointError",
           "CheckpointNotFoundError", "CheckpointInfo", "canonical_name", "is_ignored_key",
           "check_tp", "UnsafeCheckpointError", "CHECKPOINT_GLOBALS"]
