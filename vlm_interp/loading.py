"""Loading: ``load`` a checkpoint (local folder, hub id, ``SCHEME:NAME``) or ``wrap`` objects in memory.

``SCHEME:NAME`` names a checkpoint held by a registered source: :func:`register_source` maps a
scheme to a function from a name to a local folder. The package root registers ``zoo`` (the shipped
model organisms), so this module never imports the zoo above it.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from . import compat
from .adapters import REGISTRY, adapter_for, supported
from .errors import LoadError, UnknownArchitectureError
from .model import VLM


def wrap(model: nn.Module, processor: Any, *, template: str | None = None, answer_prefix: str = " ",
         name: str | None = None) -> VLM:
    """Wrap a model and processor already in memory; the adapter is chosen from the model class.

    Warns (once) when the installed transformers is outside the tested range (:mod:`vlm_interp.compat`).
    """
    compat.check_version()
    model.eval()
    return VLM(model, processor, adapter_for(model), template=template, answer_prefix=answer_prefix, name=name)


SOURCES: dict[str, tuple[Callable[[str], Any], str]] = {}


def register_source(scheme: str, resolve: Callable[[str], Any], description: str = "") -> None:
    """Make ``load("SCHEME:NAME")`` load the local folder ``resolve(NAME)`` returns."""
    if not scheme.isidentifier() or scheme == "tiny":
        raise ValueError(f"source scheme {scheme!r} must be an identifier other than 'tiny'")
    SOURCES[scheme] = (resolve, description)


def _source_path(path_or_id: str) -> str:
    """The folder behind ``SCHEME:NAME`` for a registered scheme; anything else is returned unchanged."""
    scheme, sep, name = path_or_id.partition(":")
    if not sep or scheme not in SOURCES:
        return path_or_id
    resolve, _ = SOURCES[scheme]
    return str(resolve(name))


# Where the files come from: every from_pretrained call (config, model, processor) takes these.
HUB_KEYWORDS = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code", "force_download",
                "proxies", "subfolder")
# Only the model's from_pretrained takes these (besides the placement options load names itself).
MODEL_KEYWORDS = ("attn_implementation", "low_cpu_mem_usage", "variant", "use_safetensors", "offload_buffers",
                  "offload_state_dict", "key_mapping", "tp_plan", "weights_only")
# Only the processor's from_pretrained takes these.
PROCESSOR_KEYWORDS = ("use_fast",)


def _route(kwargs: dict[str, Any], model_kwargs: dict | None, processor_kwargs: dict | None) -> tuple[dict, dict, dict]:
    """(config, model, processor) keywords: hub keywords go to all three, the others to the call that takes them."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_KEYWORDS}
    model = {k: v for k, v in kwargs.items() if k in MODEL_KEYWORDS}
    processor = {k: v for k, v in kwargs.items() if k in PROCESSOR_KEYWORDS}
    unknown = sorted(set(kwargs) - set(hub) - set(model) - set(processor))
    if unknown:
        raise LoadError(f"load() does not know where the keyword(s) {unknown} go. Hub keywords (every call): "
                        f"{list(HUB_KEYWORDS)}; model keywords: {list(MODEL_KEYWORDS)}; processor keywords: "
                        f"{list(PROCESSOR_KEYWORDS)}. Pass anything else as model_kwargs={{...}} or "
                        "processor_kwargs={...}")
    return hub, {**hub, **model, **(model_kwargs or {})}, {**hub, **processor, **(processor_kwargs or {})}


def _placement(device: Any, device_map: Any, max_memory: Any, offload_folder: Any, quantized: bool) -> dict:
    """The placement keywords of the model's from_pretrained; errors for options that contradict each other."""
    if device is not None and device_map is not None:
        raise LoadError(f"device={device!r} and device_map={device_map!r} both place the model; give one "
                        "(device_map={'': DEVICE} puts everything on one device through accelerate)")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise LoadError("max_memory and offload_folder shape a device map; pass device_map='auto' with them")
    out = {k: v for k, v in (("device_map", device_map), ("max_memory", max_memory),
                             ("offload_folder", offload_folder)) if v is not None}
    if quantized and device_map is None:  # quantized weights are placed when they load, never moved afterwards
        out["device_map"] = {"": device if device is not None else "cuda:0"}
    return out


def _check_quantization(name: str, quantization_config: Any, config: Any) -> bool:
    """Whether the model loads quantized; a clear error for bitsandbytes where it cannot run."""
    settings = quantization_config if quantization_config is not None else getattr(config, "quantization_config", None)
    if settings is None:
        return False
    method = settings.get("quant_method") if isinstance(settings, dict) else getattr(settings, "quant_method", None)
    method = str(getattr(method, "value", method) or "")
    if method == "bitsandbytes":
        import importlib.util

        import torch

        missing = [what for what, ok in (("the bitsandbytes package", importlib.util.find_spec("bitsandbytes")),
                                         ("a CUDA GPU", torch.cuda.is_available())) if not ok]
        if missing:
            raise LoadError(f"{name}: 4-bit/8-bit bitsandbytes quantization needs {' and '.join(missing)}, which "
                            "this machine lacks; load in bf16 (dtype='bfloat16') or install bitsandbytes on a "
                            "machine with a CUDA GPU")
    return True


def parse_dtype(dtype: Any) -> Any:
    """A torch dtype from ``torch.bfloat16`` or a name (``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float32"``...);
    ``None`` and ``"auto"`` pass through."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise LoadError(f"unknown dtype {dtype!r}; use one of {sorted(names)}, 'auto' or a torch dtype")
    return names[dtype]


def load(path_or_id: str, *, template: str | None = None, answer_prefix: str = " ", dtype: Any = None,
         device: Any = None, device_map: Any = None, max_memory: dict | None = None, offload_folder: Any = None,
         quantization_config: Any = None, model_kwargs: dict | None = None, processor_kwargs: dict | None = None,
         **kwargs: Any) -> VLM:
    """Load model and processor with ``from_pretrained`` and wrap them.

    ``path_or_id`` is a local folder, a hub id, ``SCHEME:NAME`` for a registered source (``zoo:NAME``
    for a shipped model organism), or ``tiny:FAMILY`` for a tiny randomly initialised model (for trying things out).
    The architecture is checked before any weights are read.

    Placement: ``device`` (default CPU) moves the whole model there; ``device_map`` (``"auto"``,
    ``"balanced"``, or a map from module to device, ``"cpu"`` or ``"disk"``) lets accelerate place and
    offload it, bounded by ``max_memory`` (``{0: "70GiB", "cpu": "100GiB"}``) and spilling to
    ``offload_folder``; a model placed so is never moved afterwards. ``dtype`` (``torch.bfloat16``,
    ``"bf16"``, ``"fp16"``, ``"auto"``...) is the weights' type. ``quantization_config`` (for example
    transformers' ``BitsAndBytesConfig(load_in_4bit=True)``) loads quantized weights; bitsandbytes needs
    its package and a CUDA GPU, and fails with a clear error elsewhere.

    Other keywords go only to the calls that take them: hub keywords (:data:`HUB_KEYWORDS`, such as
    ``revision`` or ``local_files_only``) to all three, :data:`MODEL_KEYWORDS` (``attn_implementation``...)
    to the model, :data:`PROCESSOR_KEYWORDS` to the processor; ``model_kwargs`` and ``processor_kwargs``
    pass anything else to one of them. An unknown keyword is an error, not a silent extra config field.
    """
    import transformers

    name = path_or_id
    dtype = parse_dtype(dtype)
    if path_or_id.startswith("tiny:"):
        from .tiny import tiny

        if device_map is not None or quantization_config is not None or kwargs or model_kwargs or processor_kwargs:
            raise LoadError(f"{name} is built in memory, not read with from_pretrained: it takes dtype and device "
                            "only (save it with save_pretrained to try device maps or quantization)")
        model, processor = tiny(path_or_id[5:])
        if dtype not in (None, "auto"):
            model = model.to(dtype)
        return wrap(model.to(device or "cpu"), processor, template=template, answer_prefix=answer_prefix,
                    name=name)
    path_or_id = _source_path(path_or_id)
    hub, model_kw, processor_kw = _route(kwargs, model_kwargs, processor_kwargs)
    config = transformers.AutoConfig.from_pretrained(path_or_id, **hub)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in REGISTRY:
        raise UnknownArchitectureError(
            f"{name}: architecture {arch!r} has no adapter. Supported: {', '.join(supported())}. "
            "See vlm_interp/adapters/__init__.py for how to add one."
        )
    quantized = _check_quantization(name, quantization_config, config)
    placement = _placement(device, device_map, max_memory, offload_folder, quantized)
    if dtype is not None:
        model_kw["dtype"] = dtype
    if quantization_config is not None:
        model_kw["quantization_config"] = quantization_config
    model = getattr(transformers, arch).from_pretrained(path_or_id, **model_kw, **placement)
    if "device_map" not in placement and compat.device_map(model) is None:
        model = model.to(device or "cpu")  # a model that accelerate placed (or quantized) is never moved
    processor = transformers.AutoProcessor.from_pretrained(path_or_id, **processor_kw)
    return wrap(model, processor, template=template, answer_prefix=answer_prefix, name=name)
