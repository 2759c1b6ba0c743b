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
from .errors import UnknownArchitectureError
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


def load(path_or_id: str, *, template: str | None = None, answer_prefix: str = " ", dtype: Any = None,
         device: str = "cpu", **kwargs: Any) -> VLM:
    """Load model and processor with ``from_pretrained`` and wrap them.

    ``path_or_id`` is a local folder, a hub id, ``SCHEME:NAME`` for a registered source (``zoo:NAME``
    for a shipped model organism), or ``tiny:FAMILY`` for a tiny randomly initialised model (for trying things out).
    The architecture is checked before any weights are read. Extra keyword arguments go to
    both ``from_pretrained`` calls (for example ``revision`` or ``local_files_only``).
    """
    import transformers

    name = path_or_id
    if path_or_id.startswith("tiny:"):
        from .tiny import tiny

        return wrap(*tiny(path_or_id[5:]), template=template, answer_prefix=answer_prefix, name=name)
    path_or_id = _source_path(path_or_id)
    config = transformers.AutoConfig.from_pretrained(path_or_id, **kwargs)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in REGISTRY:
        raise UnknownArchitectureError(
            f"{name}: architecture {arch!r} has no adapter. Supported: {', '.join(supported())}. "
            "See vlm_interp/adapters/__init__.py for how to add one."
        )
    model_cls = getattr(transformers, arch)
    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = model_cls.from_pretrained(path_or_id, **model_kwargs).to(device)
    processor = transformers.AutoProcessor.from_pretrained(path_or_id, **kwargs)
    return wrap(model, processor, template=template, answer_prefix=answer_prefix, name=name)
