"""The single hook engine: attach, edit, capture, always remove, never silent.

A :class:`Hook` names a module by its dotted path and says what to do with the module's
primary tensor (its output, or its first input): edit it through a function, capture it,
or both. A ``call`` hook only observes the arguments of each call (for example to learn the
cache length during generation). :class:`AttachedHooks` is the context manager that
attaches a set of hooks (``vlm.attach(hooks)`` on a loaded model), removes exactly the
handles it created (transformers installs hooks of its own that must survive), and raises
:class:`HookNeverFiredError` when a hook did not fire.

The *primary tensor* of a module output is found from the output's runtime type, not
from a guess about the transformers version: a tensor is itself; a tuple or list has it
first; a ``ModelOutput`` has it as its first field. Inputs are the first positional
argument, or the ``hidden_states`` keyword when a module is called with keywords only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn
from transformers.utils import ModelOutput

from .errors import HookNeverFiredError, ModuleNotFoundInModelError, UnsupportedOutputError

EditFn = Callable[[torch.Tensor], "torch.Tensor | None"]
HookKind = Literal["output", "input", "call"]
CallFn = Callable[[tuple, dict], None]

__all__ = ["Hook", "AttachedHooks", "capture", "edit", "resolve_module", "primary_tensor", "replace_primary"]


@dataclass(eq=False)
class Hook:
    """What to do at one module.

    ``fn`` receives the primary tensor and returns a replacement (or ``None`` to keep it,
    for example after an in-place edit). With ``capture=True`` the tensor that flows on
    (after ``fn``) is recorded once per call in ``captured``, detached and cloned unless
    ``grad=True``. ``channels`` restricts both to a slice of the last dimension (one
    attention head of an output projection's input). ``allow_unused=True`` opts out of the
    never-fired check. ``fold=True`` is for modules whose batch axis holds each example's tiles
    in turn (a tiled vision tower): ``fn`` and captures see ``(examples, tiles x positions, width)``,
    one sequence per example, tile after tile; the number of examples is the batch size of the
    model call that runs (see :class:`Hooks`), or 1 when the module is called on its own.
    ``packed=True`` is for modules whose tensor has no batch axis (the positions of every batch row
    concatenated on axis 0, as in Qwen's vision tower): ``fn`` and the capture see a 2-D tensor as
    ``(1, positions, width)``. With ``kind="call"``, ``fn`` receives ``(args, kwargs)`` of every call
    and its return value is ignored: it observes, it never edits.
    """

    module: str
    fn: EditFn | None = None
    kind: HookKind = "output"
    capture: bool = False
    grad: bool = False
    allow_unused: bool = False
    name: str | None = None
    channels: slice | None = None
    fold: bool = False
    packed: bool = False
    # keywords an ``input`` hook reads the module's input under when it is called without positional arguments
    input_keywords: tuple[str, ...] = ("hidden_states",)
    calls: int = field(default=0, init=False)
    captured: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("output", "input", "call"):
            raise ValueError(f"Hook kind must be 'output', 'input' or 'call', got {self.kind!r}")
        if self.kind == "call" and (self.fn is None or self.capture or self.channels is not None):
            raise ValueError(f"call hook on {self.module!r} needs an observer fn and cannot capture or select channels")
        if self.fn is None and not self.capture:
            raise ValueError(f"Hook on {self.module!r} neither edits (fn) nor captures: it would do nothing")

    @property
    def label(self) -> str:
        return self.name or f"{self.module}:{self.kind}"

    @property
    def value(self) -> torch.Tensor:
        """The single captured tensor; errors if the hook fired zero or several times."""
        if len(self.captured) != 1:
            raise ValueError(
                f"hook {self.label} captured {len(self.captured)} tensors; use .captured for "
                "modules that run several times (for example during generate)"
            )
        return self.captured[0]

    def _process(self, full: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Run the edit and the capture on one call; returns the tensor that flows on.

        ``rows``: the examples in the batch of the model call (used by ``fold``); with ``fold`` the
        tensor that flows on derives from the folded view, so gradients taken at a capture reach it.
        """
        if self.packed and full.dim() == 2:
            view = full.unsqueeze(0)
            out = self._apply(view)
            # what flows on derives from the view when a gradient is kept, so that the gradient reaches the capture
            return full if out is view and not self.grad else out.squeeze(0)
        if not self.fold:
            return self._apply(full)
        rows = rows or 1
        if full.dim() < 2 or full.shape[0] % rows:
            raise UnsupportedOutputError(
                f"hook {self.label} folds each example's tiles into one sequence, but the tensor has shape "
                f"{tuple(full.shape)}, whose batch axis does not split into {rows} examples"
            )
        return self._apply(full.reshape(rows, -1, full.shape[-1])).reshape(full.shape)

    def _apply(self, full: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.channels is not None and full.shape[-1] < (self.channels.stop or 0):
            raise UnsupportedOutputError(
                f"hook {self.label} selects channels {self.channels.start}:{self.channels.stop} "
                f"but the tensor has only {full.shape[-1]}"
            )
        tensor = full if self.channels is None else full[..., self.channels]
        if self.fn is not None:
            new = self.fn(tensor)
            if new is not None:
                if not isinstance(new, torch.Tensor):
                    raise UnsupportedOutputError(
                        f"edit function of hook {self.label} returned {type(new).__name__}; "
                        "it must return a tensor or None"
                    )
                if new.shape != tensor.shape:
                    raise UnsupportedOutputError(
                        f"edit function of hook {self.label} changed the shape from "
                        f"{tuple(tensor.shape)} to {tuple(new.shape)}; edits must keep the shape"
                    )
                if new is not tensor:
                    if self.channels is None:
                        full = new
                    else:
                        full = full.clone()
                        full[..., self.channels] = new
                tensor = new
        if self.capture:
            self.captured.append(tensor if self.grad else tensor.detach().clone())
        return full


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The number of examples in a model call: the batch size of its token ids or input embeddings."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return None


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return ``model``'s submodule at dotted ``path`` ("" is the model itself), with a helpful error."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        near = [n for n in names if n.startswith(parent)][:12] if parent else names[:12]
        raise ModuleNotFoundInModelError(
            f"module {path!r} does not exist on {type(model).__name__}; modules near it: {near}"
        ) from None


def primary_tensor(value: Any, where: str = "module") -> torch.Tensor:
    """The tensor that carries a module's activation inside ``value`` (see module docstring)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, ModelOutput):
        first = value[0] if len(value) else None
        if isinstance(first, torch.Tensor):
            return first
    elif isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise UnsupportedOutputError(
        f"{where} produced {type(value).__name__}, which has no tensor in first place; "
        "hook a submodule that returns a tensor, a tuple starting with one, or a ModelOutput"
    )


def replace_primary(value: Any, new: torch.Tensor) -> Any:
    """``value`` with its primary tensor replaced by ``new``, keeping the container type."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, ModelOutput):
        value[next(iter(value.keys()))] = new
        return value
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise UnsupportedOutputError(f"cannot replace the tensor inside {type(value).__name__}")


def _output_hook(hook: Hook, where: str, rows: Callable[[], int | None]) -> Callable:
    def run(module: nn.Module, args: tuple, output: Any) -> Any:
        tensor = primary_tensor(output, where)
        new = hook._process(tensor, rows())
        return None if new is tensor else replace_primary(output, new)

    return run


def _input_hook(hook: Hook, where: str, rows: Callable[[], int | None]) -> Callable:
    def run(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            tensor = primary_tensor(args[0], where)
            new = hook._process(tensor, rows())
            return None if new is tensor else ((replace_primary(args[0], new), *args[1:]), kwargs)
        for key in hook.input_keywords:
            if isinstance(kwargs.get(key), torch.Tensor):
                tensor = kwargs[key]
                new = hook._process(tensor, rows())
                return None if new is tensor else (args, {**kwargs, key: new})
        raise UnsupportedOutputError(
            f"{where} was called without positional arguments and without a keyword among "
            f"{list(hook.input_keywords)} (keywords: {sorted(kwargs)}); hook its output or a submodule instead"
        )

    return run


_OURS: set[int] = set()  # ids of the torch hook handles vlm-interp has attached and not yet removed


def _ours_first(module: nn.Module) -> None:
    """Order ``module``'s hooks so that ours run first, in the order attached, before any others.

    transformers records hidden states through forward hooks of its own (installed at a model's
    first forward); an edit must run before them so that what they record is the edited value.
    torch keeps hooks in ordered dicts keyed by handle id, which this reorders in place.
    """
    for table in (module._forward_hooks, module._forward_pre_hooks):
        mine = [(k, v) for k, v in table.items() if k in _OURS]
        if not mine:
            continue
        others = [(k, v) for k, v in table.items() if k not in _OURS]
        table.clear()
        table.update(mine + others)


def _call_hook(hook: Hook) -> Callable:
    def run(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hook.calls += 1
        hook.fn(args, kwargs)

    return run


class AttachedHooks(contextlib.AbstractContextManager):
    """Attach ``hooks`` to ``model`` for the duration of a ``with`` block.

    On exit every handle this object created is removed (and only those), also when the
    body raised. If the body finished normally and a hook never fired (and does not allow
    it), :class:`HookNeverFiredError` lists all such hooks. When a hook folds tiles
    (``Hook.fold``), the context also observes the calls of ``model`` itself to know how many
    examples each call holds.
    """

    def __init__(self, model: nn.Module, hooks: Iterable[Hook]):
        self.model = model
        self.hooks: list[Hook] = list(hooks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: int | None = None

    def _observe_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._rows = _batch_rows(args, kwargs)

    def __enter__(self) -> "AttachedHooks":
        if self._handles:
            raise RuntimeError("this AttachedHooks context is already active; create a new one")
        modules = [resolve_module(self.model, h.module) for h in self.hooks]  # resolve all before attaching any
        rows = lambda: self._rows  # noqa: E731
        try:
            if any(h.fold for h in self.hooks):
                handle = self.model.register_forward_pre_hook(self._observe_rows, with_kwargs=True)
                self._handles.append(handle)
                _OURS.add(handle.id)
                _ours_first(self.model)
            for hook, module in zip(self.hooks, modules):
                where = f"module {hook.module!r} ({type(module).__name__})"
                if hook.kind == "output":
                    handle = module.register_forward_hook(_output_hook(hook, where, rows))
                elif hook.kind == "call":
                    handle = module.register_forward_pre_hook(_call_hook(hook), with_kwargs=True)
                else:
                    handle = module.register_forward_pre_hook(_input_hook(hook, where, rows), with_kwargs=True)
                self._handles.append(handle)
                _OURS.add(handle.id)
                _ours_first(module)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
            _OURS.discard(handle.id)
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()
        if exc_type is None:
            silent = [h for h in self.hooks if h.calls == 0 and not h.allow_unused]
            if silent:
                raise HookNeverFiredError(
                    "these hooks never fired, so the intervention or capture did nothing: "
                    + ", ".join(h.label for h in silent)
                    + ". Check that the forward pass reaches these modules (for example a Q-Former "
                    "layer without cross-attention, or a tower that this input does not use), "
                    "or pass allow_unused=True for a deliberate no-op."
                )
        return None

    def __getitem__(self, key: str) -> Hook:
        for h in self.hooks:
            if key in (h.name, h.module):
                return h
        raise KeyError(key)


@contextlib.contextmanager
def capture(
    model: nn.Module, modules: Iterable[str], kind: HookKind = "output", grad: bool = False
) -> Iterator[dict[str, Hook]]:
    """Capture the primary tensor of each named module; yields ``{path: Hook}``."""
    hooks = {m: Hook(m, kind=kind, capture=True, grad=grad) for m in modules}
    with AttachedHooks(model, hooks.values()):
        yield hooks


@contextlib.contextmanager
def edit(model: nn.Module, edits: dict[str, EditFn], kind: HookKind = "output") -> Iterator[dict[str, Hook]]:
    """Edit the primary tensor of each named module through its function; yields ``{path: Hook}``."""
    hooks = {m: Hook(m, fn=fn, kind=kind) for m, fn in edits.items()}
    with AttachedHooks(model, hooks.values()):
        yield hooks
