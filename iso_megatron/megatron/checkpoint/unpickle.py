"""Reading checkpoint pickles without running code from them.

Megatron and DeepSpeed checkpoint files are pickles, and unpickling can call anything the file
names. Every pickle the loader reads is read with torch's `weights_only` unpickler
(`torch.load(weights_only=True)`), allowing torch's own types (tensors, dtypes, torch.Size,
OrderedDict, ...) and exactly the types below; anything else is refused with an
`UnsafeCheckpointError` naming the type, the file and the opt-in:
- legacy `torch` shards (model_optim_rng.pt), DeepSpeed model states, torch_dist's common.pt:
  `torch_load_file`;
- the `common_state` entry of .distcp files (megatron-core 0.19): read as raw bytes
  (`KeepBytesPlanner`) and loaded by `torch_load`; torch's DefaultLoadPlanner would unpickle it
  with `torch.load(weights_only=False)`;
- torch_dist's `.metadata` (a plain pickle of torch.distributed.checkpoint's Metadata, which
  FileSystemReader.read_metadata reads with `pickle.load`): `MetadataUnpickler`, allowing
  torch.distributed.checkpoint's own metadata classes only;
- megatron-core's own reads inside dist_checkpointing.load / load_tensors_metadata (both of the
  above): `allowlisted_dcp_reads()` routes them through the same allowlists while it is active.

A class whose module is not installed (old Megatron's `megatron.model.enums`, loss scalers of
gone modules) cannot run anything: it is read as an inert stand-in (`Absent`), as before.

`trust_checkpoint=True` (launch/infer.py's `--trust-checkpoint`) unpickles fully, as Megatron-LM
does: only for checkpoints you trust, since that runs any code the file names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import importlib.machinery
import inspect
import io
import os
import pickle
import re
import sys
import types
import zipfile
from typing import Optional

import torch

from .find import CheckpointError, CheckpointNotFoundError, _brief

TRUST_HINT = ("load it only if you trust it: --trust-checkpoint (Python: trust_checkpoint=True) "
              "unpickles it fully, running any code it names")

# (module, qualified name) -> why it is allowed: the non-torch types Megatron / DeepSpeed
# checkpoints hold. Megatron's are megatron-core's own weights_only list
# (megatron/core/safe_globals.py SAFE_GLOBALS, 0.16 and 0.19), restated so that the allowlist is
# the same whichever megatron-core is installed and whatever else registered globals.
CHECKPOINT_GLOBALS = {
    ("argparse", "Namespace"): "Megatron-LM's stored `args`",
    ("megatron.core.enums", "ModelType"): "args.model_type (Megatron-LM's pretrain sets it)",
    ("megatron.core.transformer.enums", "AttnBackend"): "args.attention_backend",
    ("megatron.core.transformer.enums", "CudaGraphScope"): "args.cuda_graph_scope",
    ("megatron.core.transformer.enums", "CudaGraphModule"): "args.cuda_graph_modules (0.19)",
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"):
        "args.inference_cuda_graph_scope (0.19)",
    ("signal", "Signals"): "args.exit_signal",
    ("pathlib", "PosixPath"): "path-valued args",
    ("types", "SimpleNamespace"): "namespace-valued args",
    ("megatron.core.optimizer", "OptimizerConfig"): "optimizer state (megatron-core's list)",
    ("megatron.core.rerun_state_machine", "RerunMode"): "the `rerun_state_machine` entry",
    ("megatron.core.rerun_state_machine", "RerunState"): "the `rerun_state_machine` entry",
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"): "the `rerun_state_machine` entry",
    ("numpy._core.multiarray", "_reconstruct"): "rng_state: numpy's RNG state array (numpy 2)",
    ("numpy.core.multiarray", "_reconstruct"): "rng_state: numpy's RNG state array (numpy 1)",
    ("numpy", "ndarray"): "rng_state: numpy's RNG state array",
    ("numpy", "dtype"): "rng_state: numpy's RNG state array",
    ("numpy.dtypes", "UInt32DType"): "rng_state: numpy's RNG state array",
    ("torch._C", "Generator"): "rng_state: torch generators (megatron-core's list)",
    ("_io", "BytesIO"): "Transformer-Engine `_extra_state` (fp8 metadata) in torch shards",
    ("deepspeed.utils.tensor_fragment", "fragment_address"):
        "DeepSpeed BF16_Optimizer state (param_slice_mappings) when ZeRO is off",
}

# torch.distributed.checkpoint's `.metadata`: its own dataclasses and enums, from these modules
# (and their older homes), plus torch.Size, dtypes and torch.serialization._get_layout
DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",
                        "torch.distributed.checkpoint.planner",
                        "torch.distributed.checkpoint.filesystem",
                        "torch.distributed._shard.metadata",
                        "torch.distributed._shard.sharded_tensor.metadata")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint pickle names a type outside the allowlist: it was not unpickled."""


# ---------------------------------------------------------------------------------------------
# Resolving names without importing what a file names
# ---------------------------------------------------------------------------------------------

class Absent:
    """Inert stand-in for a pickled object whose class is not installed: keeps what the pickle
    gave it and runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<absent {type(self).__module__}.{type(self).__qualname__} {self.args!r}>"


_absent_classes: dict = {}


def _absent(module: str, qualname: str) -> type:
    key = f"{module}.{qualname}"
    if key not in _absent_classes:
        _absent_classes[key] = type(qualname.split(".")[-1], (Absent,),
                                    {"__module__": module, "__qualname__": qualname})
    return _absent_classes[key]


def _allowed_object(module: str, qualname: str):
    """The allowlisted object itself (its module is one of ours: importing it is safe), or an
    inert stand-in when this installation lacks it (e.g. an enum of another megatron-core)."""
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return _absent(module, qualname)


_MISSING = object()


def _is_absent(dotted: str) -> bool:
    """Whether `dotted` ("module.qualname", split point unknown) names nothing installed, found
    without importing or running anything: the longest imported module prefix lacks the rest,
    or the next module is on no path. Unsure (installed but not imported) counts as present."""
    parts = dotted.split(".")
    if parts[0] in sys.builtin_module_names and parts[0] not in sys.modules:
        return False
    if parts[0] not in sys.modules:
        return importlib.machinery.PathFinder.find_spec(parts[0]) is None
    obj, name = sys.modules[parts[0]], parts[0]
    for part in parts[1:]:
        name = f"{name}.{part}"
        if isinstance(obj, types.ModuleType) and name in sys.modules:
            obj = sys.modules[name]
            continue
        value = inspect.getattr_static(obj, part, _MISSING)
        if value is not _MISSING:
            obj = value
            continue
        path = inspect.getattr_static(obj, "__path__", None) \
            if isinstance(obj, types.ModuleType) else None
        return path is None or importlib.machinery.PathFinder.find_spec(name, path) is None
    return False


def _split(dotted: str):
    """(module, qualname) for a stand-in: the module is the longest prefix that is or was one."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in sys.modules:
            return ".".join(parts[:i]), ".".join(parts[i:])
    return ".".join(parts[:-1]) or "builtins", parts[-1]


def _resolved_allowlist() -> dict:
    """{"module.qualname": object} of CHECKPOINT_GLOBALS whose modules are already imported
    (the rest are resolved when a file names them: DeepSpeed is not imported for nothing)."""
    out = {}
    for (module, qualname) in CHECKPOINT_GLOBALS:
        if module in sys.modules:
            obj = out[f"{module}.{qualname}"] = _allowed_object(module, qualname)
            if not isinstance(obj, type) or not issubclass(obj, Absent):  # pickled by its home:
                home = f"{getattr(obj, '__module__', module)}.{getattr(obj, '__qualname__', '')}"
                out.setdefault(home, obj)  # e.g. megatron.core.optimizer.optimizer_config.*
    return out


@contextlib.contextmanager
def _only_these_globals(allowed: dict):
    """torch's weights_only unpickler allows torch's own types and exactly `allowed` (what
    megatron-core or others registered process-wide is set aside meanwhile, then restored)."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


# ---------------------------------------------------------------------------------------------
# torch.load
# ---------------------------------------------------------------------------------------------

_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|Trying to load unsupported GLOBAL) "
                             r"(\S+)")
_REFUSED_OTHER = ("Can only build", "Can only create new object", "Trying to call reduce")


def _weights_only_detail(error: BaseException) -> str:
    """The weights_only unpickler's own reason, without torch.load's advice around it."""
    text = str(error)
    return text.split("WeightsUnpickler error: ", 1)[-1].strip().split("\n")[0]


def _refused_name(error: BaseException) -> Optional[str]:
    m = _REFUSED_GLOBAL.search(str(error))
    if m is None:
        return None
    name = m.group(1)
    return name if "." in name else f"builtins.{name}"  # torch prints builtins.X as X


def refusal(where: str, name: str) -> str:
    return (f"{where}: its pickle names {name}, which is not among the types Megatron and "
            "DeepSpeed checkpoints hold (argparse.Namespace, Megatron's enums, torch dtypes, numpy RNG "
            "state, ...): refused without unpickling it, since unpickling it could run code from "
            f"the file; {TRUST_HINT}")


def torch_load(source, where: str, trust_checkpoint: bool = False, **kw):
    """torch.load of `source` (a path or a seekable file) on CPU. Safe by default: torch's types
    and CHECKPOINT_GLOBALS only (absent classes as stand-ins), else UnsafeCheckpointError naming
    the type and `where` (the file, said in words). `trust_checkpoint`: full unpickling."""
    if trust_checkpoint:
        return torch.load(source, map_location="cpu", weights_only=False, **kw)
    allowed = _resolved_allowlist()
    by_name = {f"{m}.{q}": (m, q) for m, q in CHECKPOINT_GLOBALS}
    while True:  # one retry per type first met in this file: an allowlisted or absent one
        try:
            with _only_these_globals(allowed):
                return torch.load(source, map_location="cpu", weights_only=True, **kw)
        except pickle.UnpicklingError as e:
            name = _refused_name(e)
            if name is not None and name not in allowed and name in by_name:
                allowed[name] = _allowed_object(*by_name[name])
            elif name is not None and name not in allowed and _is_absent(name):
                allowed[name] = _absent(*_split(name))
            elif name is not None:
                raise UnsafeCheckpointError(refusal(where, name)) from None
            elif any(s in str(e) for s in _REFUSED_OTHER):
                raise UnsafeCheckpointError(f"{where} was refused by the safe loader "
                                            f"({_weights_only_detail(e)}); {TRUST_HINT}") from None
            else:
                raise
        if hasattr(source, "seek"):
            source.seek(0)


class _LenientUnpickler(pickle.Unpickler):
    """Trusted files only: classes of modules that no longer exist (old loss scalers,
    `megatron.model` enums) become stand-ins so that the model weights load."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _absent(module, name)


_lenient_pickle = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load,
                                        __name__="pickle")


def torch_load_file(path: str, trust_checkpoint: bool = False) -> dict:
    """torch.load of a Megatron/DeepSpeed checkpoint file (a dict: model, args, ...), memory-mapped
    where possible; refused as in `torch_load` unless `trust_checkpoint`."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint file {path} is missing")
    kw = dict(mmap=True) if zipfile.is_zipfile(path) else {}  # legacy (non-zip) files: no mmap
    where = f"checkpoint file {path}"
    try:
        state = torch_load(path, where, trust_checkpoint, **kw)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated zip, legacy non-zip file, bad pickle
        if trust_checkpoint:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False,
                                   pickle_module=_lenient_pickle)
            except Exception:  # noqa: BLE001 - the first error says more
                state = None
        else:
            state = None
        if state is None:
            detail = (_weights_only_detail(e) if isinstance(e, pickle.UnpicklingError)
                      else _brief(e))
            raise CheckpointError(f"cannot read {where} (truncated or corrupt?): {detail}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(state).__name__}, not a dict")
    return state


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint: .metadata and bytes entries
# ---------------------------------------------------------------------------------------------

def _dcp_metadata_globals() -> dict:
    out = {"torch.Size": torch.Size, "torch.serialization._get_layout":
           torch.serialization._get_layout}
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            out[f"torch.{name}"] = value
    for module in DCP_METADATA_MODULES:
        try:  # torch's own modules
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name, value in vars(mod).items():
            if isinstance(value, type) and value.__module__ == module and (
                    dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                out[f"{module}.{name}"] = value
    return out


class MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's `.metadata` (a plain pickle): its own metadata classes,
    torch.Size and dtypes only; anything else raises UnsafeCheckpointError."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where, self.allowed = where, _dcp_metadata_globals()

    def find_class(self, module, name):
        value = self.allowed.get(f"{module}.{name}")
        if value is None:
            raise UnsafeCheckpointError(refusal(self.where, f"{module}.{name}"))
        return value

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in {self.where}")


def _read_metadata_allowlisted(reader, *args, **kwargs):
    """FileSystemReader.read_metadata, with MetadataUnpickler for its `pickle.load`."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = reader._get_metadata_path(kwargs.get("rank"))
    with reader.fs.create_stream(path, "rb") as f:
        metadata = MetadataUnpickler(f, f"torch_dist metadata file {path}").load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


def read_dcp_metadata(directory: str, trust_checkpoint: bool = False):
    """torch.distributed.checkpoint's Metadata of the torch_dist checkpoint in `directory`."""
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(directory)
    if trust_checkpoint:
        return reader.read_metadata()
    return _read_metadata_allowlisted(reader)


def dcp_reader(directory: str, trust_checkpoint: bool = False):
    """A FileSystemReader of `directory` whose `.metadata` read is allowlisted (unless trusted)."""
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(directory)
    if not trust_checkpoint:
        reader.read_metadata = types.MethodType(_read_metadata_allowlisted, reader)
    return reader


def _set_bytes_entry(planner, read_item, obj) -> None:
    """Where DefaultLoadPlanner.load_bytes puts what it read: into the caller's state dict."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[fqn], obj)
    else:
        planner.state_dict[fqn] = obj


def keep_bytes_planner():
    """A DefaultLoadPlanner that keeps bytes entries as the raw bytes (io.BytesIO) instead of
    unpickling them with `torch.load(weights_only=False)`: `torch_load` reads them after."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class KeepBytesPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            _set_bytes_entry(self, read_item, io.BytesIO(value.read()))

    return KeepBytesPlanner()


def _load_bytes_allowlisted(planner, read_item, value):
    """DefaultLoadPlanner.load_bytes with `torch_load` (allowlisted) for its torch.load."""
    fqn = read_item.dest_index.fqn
    _set_bytes_entry(planner, read_item,
                     torch_load(value, f"the '{fqn}' entry of the torch_dist checkpoint"))


@contextlib.contextmanager
def allowlisted_dcp_reads(trust_checkpoint: bool = False):
    """While active, torch.distributed.checkpoint reads `.metadata` with MetadataUnpickler and
    unpickles bytes entries with `torch_load`: megatron-core's own reads inside
    dist_checkpointing.load / load_tensors_metadata, which take no reader or planner from us.
    Nothing changes when `trust_checkpoint`."""
    if trust_checkpoint:
        yield
        return
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    saved = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    FileSystemReader.read_metadata = _read_metadata_allowlisted
    DefaultLoadPlanner.load_bytes = _load_bytes_allowlisted
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved
