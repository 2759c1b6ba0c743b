"""Everything vlm-interp knows about transformers versions, in one module.

The rest of the package uses public names only. What changes between transformers releases
(the keyword a decoder layer takes its key/value cache under, how a cache exposes its
tensors, where the attention implementation is recorded, private helpers some families
need) is read here, by type and by feature rather than by version number where possible:

- the key/value cache is found among a call's keywords by its type (transformers' public
  :class:`~transformers.Cache`), never by keyword name: 5.24 renamed ``past_key_values`` to
  ``cache`` in every decoder layer and base model (the old name is a deprecated alias);
- a cache's per-layer keys and values are read from ``cache.layers[i].keys/.values`` (the
  layout since 5.0), and a fresh cache for replays is a plain :class:`~transformers.DynamicCache`;
- LLaVA-NeXT's any-resolution geometry (and InternVL's tile grid, Mllama's canvas fit) use module-level helpers of
  their files, wrapped here under names of ours so that a move or rename breaks one place, with a clear error;
- attention edits (knockout, weight capture, score edits) go through one attention function of ours,
  registered in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` and selected with
  ``set_attn_implementation`` while edits are active (:func:`attention_edits`); it wraps the sdpa or
  eager implementation each sub-model had and restores it afterwards.

``TESTED`` is the declared range: the suite runs at both ends in CI. A newer release than the
ceiling gets a warning once; the tracing fast path still guards itself with its self-check.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.masking_utils import AttentionMaskInterface

from .errors import HookNeverFiredError, VLMInterpError

# The oldest and the newest transformers releases the test suite runs on (pyproject.toml declares the same).
TESTED = ("5.13.0", "5.24.0")
VERSION = Version(transformers.__version__)


class CompatibilityError(VLMInterpError, RuntimeError):
    """This transformers release lacks something vlm-interp needs, or moved it."""


class UntestedTransformersWarning(UserWarning):
    """transformers is outside the range the test suite runs on."""


def check_version() -> str | None:
    """Warn (once per process) when transformers is outside the tested range; returns the message."""
    floor, ceiling = (Version(v) for v in TESTED)
    if VERSION < floor:
        message = (f"transformers {VERSION} is older than the oldest release vlm-interp is tested with ({floor}); "
                   f"install transformers>={floor}")
    elif VERSION.release[:2] > ceiling.release[:2]:
        message = (f"transformers {VERSION} is newer than the newest release vlm-interp is tested with "
                   f"({ceiling}); results are guarded by self-checks, but report any error you meet")
    else:
        return None
    warnings.warn(message, UntestedTransformersWarning, stacklevel=2)
    return message


# ---- key/value caches ------------------------------------------------------------------
def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers key/value cache object."""
    return isinstance(value, transformers.Cache)


# keyword names a cache has been passed under, newest first; only used when the value is None (see find_cache)
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def find_cache(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(keyword, cache) of the one key/value cache among a call's keywords; ``(None, None)`` when there is none.

    A keyword holding ``None`` under a known cache name counts as "no cache, under that name",
    so that a replay hands its fresh cache to the keyword the model itself used.
    """
    found = [(k, v) for k, v in kwargs.items() if is_cache(v)]
    if len(found) > 1:
        raise CompatibilityError(f"a call received {len(found)} key/value caches ({[k for k, _ in found]}); "
                                 "vlm-interp expects at most one")
    if found:
        return found[0]
    for name in CACHE_KEYWORDS:
        if name in kwargs:
            return name, None
    return None, None


def new_cache() -> Any:
    """An empty dynamic key/value cache whose layers are created as they are filled."""
    return transformers.DynamicCache()


def full_cache_inputs(model: Any) -> dict[str, Any]:
    """A fresh cache that keeps every position of every layer, under the keyword ``model``'s forward takes it by.

    A cache the model builds from its config keeps only a sliding window of positions in the
    local-attention layers (Gemma 2 and 3); a plain :func:`new_cache` keeps them all. The keyword
    is read from the forward's signature (``cache`` from 5.24, ``past_key_values`` before);
    ``{}`` when the forward takes none of the known names.
    """
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return next(({name: new_cache()} for name in CACHE_KEYWORDS if name in names), {})


def cache_entries(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of ``cache``, each (batch, kv_heads, positions, head_dim)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CompatibilityError(f"{type(cache).__name__} has no per-layer list (.layers); cannot read its keys "
                                 f"and values with transformers {VERSION}")
    out = []
    for j, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (torch.is_tensor(keys) and torch.is_tensor(values)):
            raise CompatibilityError(f"layer {j} of the {type(cache).__name__} holds no key and value tensors")
        out.append((keys, values))
    return out


def cache_length(cache: Any) -> int:
    """Positions already in ``cache`` (0 for ``None``)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise CompatibilityError(f"cannot read the length of a {type(cache).__name__} key/value cache; "
                                 "use a transformers Cache object (the default in generate)")
    return int(cache.get_seq_length())


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a (text) config was loaded with: 'sdpa', 'eager', ...

    transformers keeps it in a private attribute; this is the one place that reads it.
    """
    return getattr(config, "_attn_implementation", None)


# ---- layer inputs ---------------------------------------------------------------------
# The keywords a layer may receive its input under when called without positional arguments: transformers 5.13
# calls Mllama's vision encoder layers with hidden_state=, later releases with hidden_states=.
LAYER_INPUT_KEYWORDS = ("hidden_states", "hidden_state")
# ---- what a model class does, by release ---------------------------------------------------
# The release from which a class applies its text config's final_logit_softcapping to the logits it returns (before:
# it returns them uncapped). PaliGemma 2's Gemma 2 configs set a cap of 30; PaliGemma from 5.23.0 applies it.
FINAL_SOFTCAP_SINCE = {"PaliGemmaForConditionalGeneration": "5.23.0"}
# The release from which generate(use_cache=False) gives a class's generated tokens the token type of text after the
# prompt; before it they repeat the prompt's last type (PaliGemma: 0, so each joins the bidirectional prefix, and
# generation with and without the cache differ).
UNCACHED_TOKEN_TYPES_SINCE = {"PaliGemmaForConditionalGeneration": "5.18.0"}


class KnownIssueWarning(UserWarning):
    """This transformers release computes something differently from the release vlm-interp is checked against."""


def applies_final_softcap(model_class: str) -> bool:
    """Whether ``model_class`` (a class name) caps its final logits with the text config's final_logit_softcapping
    in this transformers release; classes not listed apply whatever their adapter states."""
    since = FINAL_SOFTCAP_SINCE.get(model_class)
    return since is None or VERSION >= Version(since)


def uncached_generation_problem(model: Any) -> str:
    """Why ``model.generate(use_cache=False)`` is not what the cached generation computes in this release ("" if it
    is)."""
    name = type(model).__name__
    since = UNCACHED_TOKEN_TYPES_SINCE.get(name)
    if since is None or VERSION >= Version(since):
        return ""
    return (f"transformers {VERSION} gives {name}'s generated tokens the prompt's token type when generating without "
            f"the key/value cache (fixed in {since}): they join the bidirectional prefix, so the tokens differ from "
            "generation with the cache; generate with the cache or use a newer transformers")


# ---- private helpers of modeling files --------------------------------------------------
def _llava_next_helper(name: str):
    from transformers.models.llava_next import modeling_llava_next

    helper = getattr(modeling_llava_next, name, None)
    if helper is None:
        raise CompatibilityError(f"transformers {VERSION} has no llava_next.modeling_llava_next.{name}; "
                                 f"LLaVA-NeXT image geometry needs it (tested with {TESTED[0]}..{TESTED[1]})")
    return helper


def anyres_grid_shape(image_size: tuple[int, int], grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """(tiles high, tiles wide) LLaVA-NeXT picks for an image of (height, width)."""
    return tuple(_llava_next_helper("get_anyres_image_grid_shape")(image_size, grid_pinpoints, patch_size))


def unpad_image(features: torch.Tensor, original_size: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT's removal of the padding rows or columns from a (channels, height, width) feature map."""
    return _llava_next_helper("unpad_image")(features, original_size)


def tile_canvas(image_hw: tuple[int, int], tile_hw: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of tiles the GOT-OCR2 image processor (InternVL's) cuts an image of (height, width) into."""
    from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as module

    helper = getattr(module, "get_optimal_tiled_canvas", None)
    if helper is None:
        raise CompatibilityError(f"transformers {VERSION} has no got_ocr2.image_processing_pil_got_ocr2."
                                 f"get_optimal_tiled_canvas; InternVL image geometry needs it "
                                 f"(tested with {TESTED[0]}..{TESTED[1]})")
    cols, rows = helper(tuple(image_hw), tuple(tile_hw), min_tiles, max_tiles)
    return int(cols), int(rows)


def fit_to_canvas(image_hw: tuple[int, int], canvas_hw: tuple[int, int], tile: int) -> tuple[int, int]:
    """(height, width) the Mllama image processor resizes an image of (height, width) to inside its tile canvas."""
    from transformers.models.mllama import image_processing_pil_mllama as module

    helper = getattr(module, "get_image_size_fit_to_canvas", None)
    if helper is None:
        raise CompatibilityError(f"transformers {VERSION} has no mllama.image_processing_pil_mllama."
                                 f"get_image_size_fit_to_canvas; Mllama image geometry needs it "
                                 f"(tested with {TESTED[0]}..{TESTED[1]})")
    height, width = helper(int(image_hw[0]), int(image_hw[1]), int(canvas_hw[0]), int(canvas_hw[1]), int(tile))
    return int(height), int(width)
# ---- models placed by accelerate ---------------------------------------------------------
def device_map(model: Any) -> dict | None:
    """The module-to-device map of a model that accelerate placed (``from_pretrained(device_map=...)``), else None."""
    found = getattr(model, "hf_device_map", None)
    return dict(found) if found else None


def accepts_keyword(module: Any, name: str) -> bool:
    """Whether ``module.forward`` names ``name`` among its parameters (a catch-all ``**kwargs`` does not count)."""
    return name in inspect.signature(module.forward).parameters


# ---- attention dispatch -------------------------------------------------------------------
# One attention implementation of vlm-interp's, registered in transformers' AttentionInterface and
# AttentionMaskInterface under DISPATCH and selected with the documented ``set_attn_implementation`` while
# attention edits are active. It wraps the implementation each sub-model had (sdpa or eager) and lets
# several edits stack: knockout (cut edges), attention-weight capture and score edits (which run eager attention).
DISPATCH = "vlm_interp"
BASES = ("sdpa", "eager")  # implementations the dispatcher can wrap
# keywords an attention call may carry that eager attention does not need (any other one with a value is an error)
_EAGER_IGNORES = {"position_ids", "use_cache", "output_attentions", "output_hidden_states", "cache_position",
                  "is_causal", "dropout", "scaling",
                  # the attention mask already holds a sliding window (transformers' own eager and sdpa read only
                  # the mask; the keyword serves flash attention)
                  "sliding_window",
                  # keywords of the model's forward that reach the attention call unread (Qwen2's LM)
                  "logits_to_keep"}


@dataclass
class AttentionCall:
    """One call of an attention module through the dispatcher: batch rows, query heads, queries and keys."""

    module: nn.Module
    batch: int
    heads: int
    q_len: int
    k_len: int

    def self_positions(self) -> torch.Tensor:
        """Self-attention's query positions among the keys: the last ``q_len`` (a cache holds the earlier ones)."""
        return torch.arange(self.k_len - self.q_len, self.k_len)


class AttentionEdit:
    """An edit the dispatcher applies to calls of ``modules``; subclasses override what they change.

    ``block`` returns a boolean tensor broadcastable to (batch, heads, queries, keys) marking the
    edges to cut (a query cut off from every key it could see reads nothing: its output is zero).
    ``scores`` edits the pre-softmax scores and ``observe`` sees the weights; both need
    ``eager = True`` (the call then runs eager attention, whatever the model's implementation).
    """

    eager = False

    def __init__(self, modules: "list[nn.Module]"):
        self.modules = list(modules)
        self._ids = {id(m) for m in self.modules}

    def targets(self, module: nn.Module) -> bool:
        return id(module) in self._ids

    def block(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def scores(self, call: AttentionCall, scores: torch.Tensor) -> torch.Tensor | None:
        return None

    def observe(self, call: AttentionCall, weights: torch.Tensor) -> None:
        return None


@dataclass(eq=False)
class _Dispatch:
    model: nn.Module
    saved: dict[str, Any]  # the implementation of the model and its sub-configs before, for set_attn_implementation
    before: dict[int, tuple[Any, str]]  # id(config) -> (config, implementation before)
    base: dict[int, str | None]  # id(module) -> implementation it wraps (None: its sub-model did not switch)
    edits: list[AttentionEdit] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)


_BY_MODEL: dict[int, _Dispatch] = {}
_BY_MODULE: dict[int, _Dispatch] = {}
_BY_CONFIG: dict[int, str] = {}
_REGISTERED: list[bool] = []


def _register() -> None:
    if not _REGISTERED:
        transformers.AttentionInterface.register(DISPATCH, _dispatch)
        AttentionMaskInterface.register(DISPATCH, _mask)
        _REGISTERED.append(True)


def _mask(**kwargs: Any) -> Any:
    """The mask of the wrapped implementation, always materialised (the dispatcher edits it)."""
    base = _BY_CONFIG.get(id(kwargs.get("config")))
    if base is None:
        raise CompatibilityError(f"an attention mask was requested under {DISPATCH!r} for a config vlm-interp did "
                                 "not switch; attention edits must be applied with vlm_interp's context managers")
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return AttentionMaskInterface()[base](**kwargs)


def _allowed(module: nn.Module, base: str, mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
             is_causal: bool | None) -> tuple[torch.Tensor, bool]:
    """(edges the model's own mask lets through as a boolean (B|1, 1|H, Q, K) tensor, whether a None mask is causal).

    A missing mask means full attention, except under sdpa for a causal module and several queries, where
    sdpa's ``is_causal`` applies (aligned to the first keys, as sdpa does).
    """
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = base == "sdpa" and q_len > 1 and bool(flag)
        full = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        return (full.tril() if causal else full)[None, None], causal
    if mask.dtype == torch.bool:
        return mask, False
    return mask > torch.finfo(mask.dtype).min / 2, False


def _eager(module, query, key, value, mask, edits, call, dropout: float = 0.0, scaling: float | None = None,
           softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (scores, Gemma 2's soft cap where given, mask, softmax in float32, weights times values), with
    score edits and observers."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _EAGER_IGNORES)
    if unknown:
        raise CompatibilityError(f"{type(module).__name__} passes {unknown} to its attention function; vlm-interp's "
                                 "eager attention (weight capture, score edits) cannot honour them")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` consecutive query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:  # attention-logit soft capping (Gemma 2), before the mask as the model's eager does
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    for edit in edits:
        new = edit.scores(call, scores)
        scores = scores if new is None else new
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    for edit in edits:
        edit.observe(call, weights)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _run_base(base: str, module, query, key, value, mask, **kwargs):
    if base == "eager":
        return _eager(module, query, key, value, mask, [], None, **kwargs)
    return transformers.AttentionInterface()[base](module, query, key, value, mask, **kwargs)


def _dispatch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: Any):
    """The attention function registered under :data:`DISPATCH`: the wrapped implementation plus the active edits."""
    state = _BY_MODULE.get(id(module))
    if state is None or state.base.get(id(module)) is None:
        raise CompatibilityError(f"{type(module).__name__} runs under {DISPATCH!r} outside vlm-interp's attention "
                                 "edits; use vlm_interp's context managers, which restore the implementation")
    state.calls[id(module)] = state.calls.get(id(module), 0) + 1
    base = state.base[id(module)]
    edits = [e for e in state.edits if e.targets(module)]
    if not edits:
        return _run_base(base, module, query, key, value, attention_mask, **kwargs)
    call = AttentionCall(module, query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    allowed, causal = _allowed(module, base, attention_mask, query, key, kwargs.get("is_causal"))
    cut = None
    for edit in edits:
        edges = edit.block(call)
        if edges is not None:
            cut = edges if cut is None else cut | edges
    mask = attention_mask
    if cut is not None:  # a head axis only where some edit cuts per head
        cut = cut.to(allowed.device)
        heads = torch.broadcast_shapes(allowed.shape, cut.shape)[1]
        shape = (call.batch, heads, call.q_len, call.k_len)
        allowed, cut = allowed.expand(shape), cut.expand(shape)
        if mask is None or mask.dtype == torch.bool:
            mask = allowed & ~cut
        else:
            mask = mask.expand(shape).masked_fill(cut, torch.finfo(mask.dtype).min)
    elif causal and any(e.eager for e in edits):
        mask = allowed
    if any(e.eager for e in edits):
        out, weights = _eager(module, query, key, value, mask, edits, call, **kwargs)
    else:
        out, weights = _run_base(base, module, query, key, value, mask, **kwargs)
    if cut is not None:
        dead = allowed.any(-1) & ~(allowed & ~cut).any(-1)  # (B, H, Q): queries the edits cut off from every key
        if dead.any():
            out = out.masked_fill(dead.transpose(1, 2)[..., None], 0.0)
            weights = None if weights is None else weights.masked_fill(dead[..., None], 0.0)
    return out, weights


def _install(model: nn.Module) -> _Dispatch:
    _register()
    subs = {path: m for path, m in model.named_modules() if isinstance(m, transformers.PreTrainedModel)}
    before = {id(m.config): (m.config, attn_implementation(m.config)) for m in subs.values()}
    for path, m in subs.items():
        impl = attn_implementation(m.config)
        if impl not in BASES:
            raise CompatibilityError(f"attention edits wrap sdpa or eager attention, but {path or 'the model'} "
                                     f"({type(m).__name__}) runs {impl!r}; load it with attn_implementation='sdpa'")
    config = model.config
    saved = {"": attn_implementation(config)}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            saved[key] = attn_implementation(sub)
    model.set_attn_implementation(DISPATCH)
    owners = sorted(subs, key=len, reverse=True)  # deepest sub-model first
    base: dict[int, str | None] = {}
    for path, module in model.named_modules():
        owner = next(o for o in owners if o == "" or path == o or path.startswith(o + "."))
        cfg = subs[owner].config
        base[id(module)] = before[id(cfg)][1] if attn_implementation(cfg) == DISPATCH else None
    state = _Dispatch(model, saved, before, base)
    _BY_MODEL[id(model)] = state
    for cid, (_, impl) in before.items():
        _BY_CONFIG[cid] = impl
    for mid in base:
        _BY_MODULE[mid] = state
    return state


def _uninstall(state: _Dispatch) -> None:
    model = state.model
    for mid in state.base:
        _BY_MODULE.pop(mid, None)
    for cid in state.before:
        _BY_CONFIG.pop(cid, None)
    _BY_MODEL.pop(id(model), None)
    model.set_attn_implementation(state.saved)
    wrong = [type(c).__name__ for c, impl in state.before.values() if attn_implementation(c) != impl]
    if wrong:
        raise CompatibilityError(f"could not restore the attention implementation of {wrong} after attention edits "
                                 f"with transformers {VERSION}")


@contextlib.contextmanager
def attention_edits(model: nn.Module, edits: "list[AttentionEdit]") -> Iterator[None]:
    """Apply ``edits`` to ``model``'s attention while the body runs; they stack with edits already active.

    The first active edit switches the model to the dispatcher (``set_attn_implementation``); the
    last one out restores each sub-model's implementation. An edit whose modules do not route through
    the interface is refused up front; one whose modules never ran in the body is an error.
    """
    state = _BY_MODEL.get(id(model))
    fresh = state is None
    if fresh:
        state = _install(model)
    try:
        for edit in edits:
            stuck = [type(m).__name__ for m in edit.modules if state.base.get(id(m)) is None]
            if stuck:
                raise CompatibilityError(f"{sorted(set(stuck))} do not compute attention through transformers' "
                                         f"AttentionInterface with transformers {VERSION}; attention edits cannot "
                                         "reach them")
        start = {id(m): state.calls.get(id(m), 0) for e in edits for m in e.modules}
        state.edits.extend(edits)
        try:
            yield
        finally:
            for edit in edits:
                state.edits.remove(edit)
        silent = sorted({type(m).__name__ for e in edits for m in e.modules
                         if state.calls.get(id(m), 0) == start[id(m)]})
        if silent:
            raise HookNeverFiredError(f"attention edits on {silent} never ran: the forward pass did not reach those "
                                      "attention modules (a tower this input does not use?)")
    finally:
        if fresh:
            _uninstall(state)
