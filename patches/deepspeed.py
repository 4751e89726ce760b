"""DeepSpeed inference glue: an "iso" key in the `deepspeed.init_inference` config.

    import iso_megatron.patches.deepspeed          # idempotent; import before DeepSpeed's comm starts
    engine = deepspeed.init_inference(model, config={
        "dtype": "fp32", "tensor_parallel": {"tp_size": 2},
        "iso": {"enabled": True, "num_chunks": 2, "split": "balanced", "min_tokens": 512}})

What importing this module does (nothing else):
1. `DeepSpeedInferenceConfig` gets an `iso` field (`DeepSpeedISOConfig`, a DeepSpeedConfigModel:
   unknown keys forbidden, values checked by the same rules as `ISOConfig`), so a bad value is a
   pydantic ValidationError from `init_inference` on every rank, like any DeepSpeed config error.
2. `InferenceEngine.__init__` applies ISO after DeepSpeed has built the engine when `iso` is given
   and enabled: Hugging Face models under AutoTP -> `iso_megatron.patches.hf_autotp.apply_iso_hf`; megatron-core
   models (DeepSpeed tp_size 1, TP from Megatron's parallel state) -> `iso_megatron.apply_iso`.
   Without `iso`, or with `"enabled": false`, the engine is built exactly as before.
3. DeepSpeed's shared-memory all-reduce on CPU (AutoTP's LinearAllreduce) needs LOCAL_SIZE == world
   size, which torchrun does not set: LOCAL_SIZE is taken from LOCAL_WORLD_SIZE; where the ranks
   are still not all local (or LOCAL_SIZE is unusable) the shm kernel is switched off in favour of
   torch.distributed.all_reduce instead of segfaulting.
4. That shm kernel sums over every rank of the WORLD whatever process group it is given (it takes
   no group): with a tensor-parallel group smaller than the world (e.g. `tensor_parallel.mpu`
   with two TP groups of 2 in a world of 4) every LinearAllreduce would add the other group's
   partial sums. `inference_all_reduce` on such a group goes to torch.distributed.all_reduce on
   that group instead (a warning says so once); on a group spanning the world nothing changes.

`init_inference_megatron(model, config)` wraps a megatron-core model (launch/infer.py --deepspeed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional, Union

logger = logging.getLogger(__name__)


# ---- 3. LOCAL_SIZE (before anything of DeepSpeed's comm is created) --------------------------

def _positive_int(value) -> Optional[int]:
    value = (value or "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def fix_local_size() -> None:
    """Set LOCAL_SIZE from LOCAL_WORLD_SIZE (torchrun) when it is missing or unusable."""
    if _positive_int(os.environ.get("LOCAL_SIZE")) is not None:
        return
    local = _positive_int(os.environ.get("LOCAL_WORLD_SIZE"))
    if local is not None:
        os.environ["LOCAL_SIZE"] = str(local)
    else:
        # an empty/garbled value makes DeepSpeed's C++ std::stoi throw: better unset
        os.environ.pop("LOCAL_SIZE", None)


fix_local_size()

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.comm import comm as _ds_comm  # noqa: E402
from deepspeed.comm.torch import TorchBackend  # noqa: E402
from deepspeed.inference.config import DeepSpeedInferenceConfig  # noqa: E402
from deepspeed.inference.engine import InferenceEngine  # noqa: E402
from deepspeed.runtime.config_utils import DeepSpeedConfigModel  # noqa: E402
from pydantic import StrictBool, StrictInt, model_validator  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from iso_megatron.config import ISOConfig  # noqa: E402


def guard_shm(backend) -> None:
    """Switch DeepSpeed's shm all-reduce off where its ranks are not all local (it would segfault)."""
    if backend is None or getattr(backend, "shm_comm_op", None) is None:
        return
    try:
        world = backend.get_world_size()
    except Exception:  # noqa: BLE001 - not initialised: nothing to guard yet
        return
    if _positive_int(os.environ.get("LOCAL_SIZE")) != world and getattr(backend, "shm_vector_kernel_level", 0):
        logger.warning("DeepSpeed shm all-reduce disabled: LOCAL_SIZE=%s != world size %s "
                       "(ranks not all on one host); using torch.distributed.all_reduce",
                       os.environ.get("LOCAL_SIZE"), world)
        backend.shm_vector_kernel_level = 0


# ---- 4. DeepSpeed's shm all-reduce ignores the group ------------------------------------------

def _smaller_than_world(group) -> bool:
    if group is None or not torch.distributed.is_initialized():
        return False
    size = torch.distributed.get_world_size(group)  # -1 on a rank outside the group
    return 1 < size < torch.distributed.get_world_size()


_warned_group = []


def _inference_all_reduce(self, tensor, op, group=None):
    """DeepSpeed's `inference_all_reduce`, except that a group smaller than the world never
    reaches the shm kernel (which would sum over the whole world)."""
    if getattr(self, "shm_vector_kernel_level", 0) and _smaller_than_world(group):
        if not _warned_group:
            _warned_group.append(True)
            logger.warning("DeepSpeed's shm all-reduce ignores the process group: the tensor-parallel "
                           "group (%d of %d ranks) is reduced with torch.distributed.all_reduce instead",
                           torch.distributed.get_world_size(group), torch.distributed.get_world_size())
        return torch.distributed.all_reduce(tensor=tensor, op=self._reduce_op(op), group=group)
    return _stock_inference_all_reduce(self, tensor, op, group)


# ---- 1. the "iso" config field -------------------------------------------------------------

class DeepSpeedISOConfig(DeepSpeedConfigModel):
    """The `"iso"` section of a DeepSpeed inference config: iso_megatron.ISOConfig's fields,
    defaults and rules (a key left out takes ISOConfig's default)."""

    enabled: StrictBool = True
    """ Turn intra-sequence overlap of the tensor-parallel all-reduces in prefill on/off. """

    num_chunks: Optional[StrictInt] = None
    """ Chunks the prompt is split into (>= 1; default 2, or the number of explicit fractions). """

    split: Union[str, List[float]] = ISOConfig.split
    """ "even", "balanced" (equal compute per chunk), "auto", or a list of fractions summing to 1. """

    min_tokens: Optional[StrictInt] = None
    """ Prompts with fewer tokens run the stock path (default 512; with "auto" the cost model's). """

    def __init__(self, strict: bool = True, **data):
        # DeepSpeedConfigModel drops every key whose value is "auto" (its placeholder for values
        # filled in later) unless strict: here "auto" is a value of "split", so keep it.
        super().__init__(strict=strict, **data)

    @model_validator(mode="after")
    def _iso_rules(self):
        self.to_iso_config()  # ValueError -> pydantic ValidationError at "iso"
        return self

    def to_iso_config(self) -> ISOConfig:
        return ISOConfig(num_chunks=self.num_chunks, split=self.split, min_tokens=self.min_tokens,
                         enabled=self.enabled)


_FIELD = FieldInfo(annotation=Optional[DeepSpeedISOConfig], default=None, exclude=True,
                   description="Intra-sequence overlap (iso_megatron); absent = off")


def _install_config_field() -> None:
    cls = DeepSpeedInferenceConfig
    if "iso" in cls.model_fields:
        return
    cls.model_fields["iso"] = _FIELD
    cls.model_rebuild(force=True)
    if not isinstance(cls(iso={}).iso, DeepSpeedISOConfig):  # pragma: no cover - other pydantic
        raise RuntimeError("iso_megatron: could not add the 'iso' field to DeepSpeedInferenceConfig")


# ---- 2. the engine ------------------------------------------------------------------------

def _megatron_blocks(module):
    if "megatron.core" not in sys.modules:
        return []
    from megatron.core.transformer.transformer_block import TransformerBlock

    return [m for m in module.modules() if isinstance(m, TransformerBlock)]


def _check_before_build(model, config) -> None:
    if config.replace_with_kernel_inject:
        raise ValueError("iso: not supported with replace_with_kernel_inject=True (DeepSpeed's fused "
                         "kernels own the all-reduce); use AutoTP: kernel_inject false, "
                         "tensor_parallel.tp_size > 1")
    if config.injection_policy:
        raise ValueError("iso: not supported with a user injection_policy; use AutoTP")
    if isinstance(model, torch.nn.Module) and _megatron_blocks(model) and config.tensor_parallel.tp_size > 1:
        raise ValueError("iso: a megatron-core model takes its tensor parallelism from Megatron's parallel "
                         "state; give DeepSpeed tensor_parallel.tp_size 1 (or use "
                         "iso_megatron.patches.deepspeed.init_inference_megatron)")


def apply_to_engine(engine, iso_config: ISOConfig):
    """Apply (or, with enabled=False, remove) ISO on a built InferenceEngine's model."""
    module = engine.module
    if _megatron_blocks(module):
        from iso_megatron import apply_iso

        apply_iso(module, iso_config)
    else:
        from iso_megatron.patches.hf_autotp import apply_iso_hf

        apply_iso_hf(module, iso_config)
    engine.iso_config = iso_config
    return engine


# the stock methods, also when this module is reloaded after install()
_stock_engine_init = getattr(InferenceEngine.__init__, "_iso_stock", InferenceEngine.__init__)
_stock_backend_init = getattr(TorchBackend.__init__, "_iso_stock", TorchBackend.__init__)
_stock_inference_all_reduce = getattr(TorchBackend.inference_all_reduce, "_iso_stock",
                                      TorchBackend.inference_all_reduce)


def _engine_init(self, model, config):
    section = getattr(config, "iso", None)
    iso = section.to_iso_config() if section is not None else None
    if iso is not None and iso.enabled:
        _check_before_build(model, config)
    _stock_engine_init(self, model, config)
    if iso is not None and iso.enabled:
        apply_to_engine(self, iso)


def _backend_init(self, *args, **kwargs):
    fix_local_size()
    _stock_backend_init(self, *args, **kwargs)
    guard_shm(self)


def install() -> None:
    """Idempotent: the config field, the engine hook, the comm guards."""
    _install_config_field()
    if not hasattr(InferenceEngine.__init__, "_iso_stock"):
        _engine_init._iso_stock = _stock_engine_init
        InferenceEngine.__init__ = _engine_init
    if not hasattr(TorchBackend.__init__, "_iso_stock"):
        _backend_init._iso_stock = _stock_backend_init
        TorchBackend.__init__ = _backend_init
    if not hasattr(TorchBackend.inference_all_reduce, "_iso_stock"):
        _inference_all_reduce._iso_stock = _stock_inference_all_reduce
        TorchBackend.inference_all_reduce = _inference_all_reduce
    guard_shm(getattr(_ds_comm, "cdb", None))  # a backend created before this import


install()


# ---- megatron-core models through DeepSpeed ---------------------------------------------------

def init_inference_megatron(model, config=None, **kwargs):
    """`deepspeed.init_inference` for a megatron-core model (GPTModel or any module holding
    TransformerBlocks) built/loaded with Megatron, TP from Megatron's parallel state.

    `config` is a DeepSpeed inference config dict or a path to its JSON file. DeepSpeed's own
    tensor parallelism stays at 1 (AutoTP cannot parse megatron linears); a `tensor_parallel.tp_size`
    other than 1 must equal Megatron's TP size. `dtype` defaults to the model's parameter dtype
    (DeepSpeed's default would cast to fp16). The `"iso"` section becomes
    `iso_megatron.apply_iso(model, ISOConfig(...))`. Returns the DeepSpeed InferenceEngine.
    """
    from iso_megatron.megatron import compat

    if config is None:
        config = {}
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"'config' must be a dict or a JSON file path, got {type(config).__name__}")
    config = {**config, **kwargs}
    if not isinstance(model, torch.nn.Module) or not _megatron_blocks(model):
        raise ValueError(f"init_inference_megatron: no megatron-core TransformerBlock in {type(model).__name__}")
    tp_key = "tensor_parallel" if "tensor_parallel" in config else ("tp" if "tp" in config else "tensor_parallel")
    tp_section = dict(config.get(tp_key) or {})
    megatron_tp = compat.tp_world_size()
    asked = tp_section.get("tp_size", 1)
    if asked not in (1, megatron_tp):
        raise ValueError(f"init_inference_megatron: tensor_parallel.tp_size={asked} but Megatron's "
                         f"tensor-parallel size is {megatron_tp}; TP comes from Megatron's parallel state")
    tp_section["tp_size"] = 1
    config[tp_key] = tp_section
    if config.get("replace_with_kernel_inject") or config.get("kernel_inject"):
        raise ValueError("init_inference_megatron: kernel injection does not apply to megatron-core models")
    if "dtype" not in config:
        param = next(model.parameters(), None)
        config["dtype"] = param.dtype if param is not None else torch.float32
    return deepspeed.init_inference(model, config=config)
