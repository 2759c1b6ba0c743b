"""What a corrupted Example is and how it runs: the error type, input edits, layout checks.

Some corruptions change model inputs (pixels, token ids) and live in ``Example.inputs``.
Others happen inside the model (noise on image embeddings); they are recorded as
:class:`InputEdit` objects in ``Example.edits`` and attached as hooks by :func:`applied`
whenever the example runs. The tracing engine should run every corrupted example inside
``applied(vlm, example)`` (or use :func:`run`/:func:`score`); a hook that never fires is an
error, so an edit is never silently lost.

Batching: an edit's noise has shape ``(rows, k, hidden)``. When the hooked tensor has
``N`` rows and ``N`` is a multiple of ``rows``, the noise is repeated over the batch (the
same corruption in every row, e.g. one row per restored site). :func:`stack` joins several
examples with identical layouts into one batch whose edits carry per-row noise (an example
without an edit contributes zero noise, so a clean row 0 works as in ROME).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from ..errors import VLMInterpError
from ..example import Example
from ..hooks import Hook, Hooks

# Inputs that fix the token layout of an example; corrupt and clean must agree on them exactly.
ID_KEYS = ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "image_sizes")


class CorruptionError(VLMInterpError, ValueError):
    """A corruption cannot be built as asked (it would shift tokens, is a no-op, or is malformed)."""


@dataclass(frozen=True, eq=False)
class InputEdit:
    """Noise added to a module's primary tensor at ``index`` along dimension 1.

    ``noise`` has shape ``(rows, len(index), hidden)``; ``length`` is the size of dimension 1
    the edit expects. With ``exact_length`` the size must match (image-feature tensors);
    otherwise longer inputs are fine (prompt plus answer tokens) and shorter calls after the
    first application pass through unchanged (the single-token steps of cached generation).
    """

    module: str
    kind: Literal["output", "input"]
    index: tuple[int, ...]
    noise: torch.Tensor
    length: int
    exact_length: bool = True
    label: str = "noise"

    def hook(self) -> Hook:
        """A fresh :class:`~vlm_interp.hooks.Hook` that adds the noise (state is per hook)."""
        fired = [False]
        index = list(self.index)

        def add(t: torch.Tensor) -> torch.Tensor | None:
            if t.dim() < 3 or t.shape[-1] != self.noise.shape[-1]:
                raise CorruptionError(
                    f"{self.label} at {self.module!r} expects (batch, positions, {self.noise.shape[-1]}) "
                    f"but the tensor there has shape {tuple(t.shape)}; the example was corrupted for a "
                    "different model"
                )
            n = t.shape[1]
            if (self.exact_length and n != self.length) or (not self.exact_length and n < self.length):
                if fired[0] and not self.exact_length:
                    return None  # a cached generation step after the prompt was processed
                raise CorruptionError(
                    f"{self.label} at {self.module!r} was built for {self.length} positions but the tensor "
                    f"there has {n}; run the corrupted example with its own inputs (same prompt and image)"
                )
            rows, batch = self.noise.shape[0], t.shape[0]
            if batch % rows:
                raise CorruptionError(
                    f"{self.label} at {self.module!r} holds noise for {rows} rows, but the batch has {batch} "
                    "rows; batch whole examples (stack or repeat them), not parts of one"
                )
            noise = self.noise.to(device=t.device, dtype=t.dtype)
            if batch != rows:
                noise = noise.repeat(batch // rows, 1, 1)
            t = t.clone()
            t[:, index] = t[:, index] + noise
            fired[0] = True
            return t

        return Hook(self.module, fn=add, kind=self.kind, name=f"{self.label} at {self.module}")


_ACTIVE: set[tuple[int, int]] = set()  # (model, example) pairs whose edits are attached right now


@contextlib.contextmanager
def applied(vlm, example: Example) -> Iterator[Hooks | None]:
    """Attach ``example.edits`` as hooks while the body runs; removed on exit, error if one never fired.

    Nesting for the same model and example attaches the edits once (never twice).
    """
    key = (id(vlm.model), id(example))
    if not example.edits or key in _ACTIVE:
        yield None
        return
    _ACTIVE.add(key)
    try:
        with Hooks(vlm.model, [edit.hook() for edit in example.edits]) as hooks:
            yield hooks
    finally:
        _ACTIVE.discard(key)


def run(vlm, example: Example, inputs: dict[str, torch.Tensor] | None = None, grad: bool = False) -> torch.Tensor:
    """Logits of ``example`` (or of ``inputs`` built from it) with its edits applied."""
    with applied(vlm, example), torch.set_grad_enabled(grad):
        return vlm.logits(example.inputs if inputs is None else inputs)


def score(vlm, example: Example, answer: str | None = None):
    """:meth:`VLM.score` of ``example`` with its edits applied."""
    with applied(vlm, example):
        return vlm.score(example, answer)


def layout_differences(clean: Example, corrupt: Example, same_ids: bool = False) -> list[str]:
    """Ways in which two examples' token layouts differ (empty when they match).

    The layout is the shape of every token input, the token groups and the image size;
    token ids may differ (STR). ``same_ids=True`` also requires identical ids, as image
    pairs and region edits (same prompt) must have.
    """
    problems = []
    for key in ID_KEYS:
        a, b = clean.inputs.get(key), corrupt.inputs.get(key)
        if (a is None) != (b is None):
            problems.append(f"only one example has {key!r}")
        elif a is not None and (a.shape != b.shape or (same_ids and not torch.equal(a.cpu(), b.cpu()))):
            if a.shape != b.shape:
                problems.append(f"{key} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
            else:
                where = (a != b).nonzero()[:, -1].tolist()
                problems.append(f"{key} differs at positions {where[:10]}")
    pa, pb = clean.inputs.get("pixel_values"), corrupt.inputs.get("pixel_values")
    if (pa is None) != (pb is None) or (pa is not None and pa.shape != pb.shape):
        problems.append(f"pixel_values shapes differ: {None if pa is None else tuple(pa.shape)} vs "
                        f"{None if pb is None else tuple(pb.shape)}")
    for tower in sorted(set(clean.groups) | set(corrupt.groups)):
        ga, gb = clean.groups.get(tower, {}), corrupt.groups.get(tower, {})
        for name in sorted(set(ga) & set(gb)):
            if ga[name] != gb[name]:
                problems.append(f"token group {tower}.{name} differs: {ga[name][:8]}... vs {gb[name][:8]}...")
    if clean.image_hw and corrupt.image_hw and clean.image_hw != corrupt.image_hw:
        problems.append(f"image sizes differ: {clean.image_hw} vs {corrupt.image_hw} (height, width)")
    return problems


def check_layout(clean: Example, corrupt: Example, what: str = "corruption", same_ids: bool = False) -> None:
    """Raise :class:`CorruptionError` unless ``corrupt`` has the clean example's token layout (see
    :func:`layout_differences`); tracing needs this so that positions correspond."""
    problems = layout_differences(clean, corrupt, same_ids)
    if problems:
        raise CorruptionError(
            f"the {what} does not keep the clean example's token layout: " + "; ".join(problems)
            + ". Tracing patches position by position, so both runs need the same tokens at the same "
            "places: use images of the same size and prompts whose tokens line up."
        )


def _cat_inputs(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    keys = set(examples[0].inputs)
    for ex in examples[1:]:
        if set(ex.inputs) != keys:
            raise CorruptionError(f"cannot stack examples with different inputs: {sorted(keys)} vs {sorted(ex.inputs)}")
    return {k: torch.cat([ex.inputs[k] for ex in examples], dim=0) if torch.is_tensor(examples[0].inputs[k])
            else examples[0].inputs[k] for k in keys}


def stack(examples: Sequence[Example]) -> Example:
    """One batch from examples with identical layouts; edits become per-row noise.

    Rows of an example that lacks an edit get zero noise there, so ``stack([clean, bad1,
    bad2])`` runs the clean row and two noise samples in one forward pass.
    """
    if not examples:
        raise CorruptionError("stack needs at least one example")
    first = examples[0]
    for ex in examples[1:]:
        problems = layout_differences(first, ex)
        if problems:
            raise CorruptionError("cannot stack examples with different layouts: " + "; ".join(problems))
    specs: dict[tuple, InputEdit] = {}
    for ex in examples:
        for e in ex.edits:
            key = (e.module, e.kind, e.index)
            if key in specs and (specs[key].length, specs[key].exact_length, specs[key].noise.shape) != (
                    e.length, e.exact_length, e.noise.shape):
                raise CorruptionError(f"examples carry incompatible edits at {e.module!r}; stack examples "
                                      "corrupted the same way")
            specs.setdefault(key, e)
    edits = []
    for key, spec in specs.items():
        parts = []
        for ex in examples:
            mine = [e for e in ex.edits if (e.module, e.kind, e.index) == key]
            if len(mine) > 1:
                raise CorruptionError(f"an example carries {len(mine)} edits at the same place {key[0]!r}")
            parts.append(mine[0].noise if mine else torch.zeros_like(spec.noise))
        edits.append(InputEdit(spec.module, spec.kind, spec.index, torch.cat(parts), spec.length,
                               spec.exact_length, spec.label))
    return first.derive(inputs=_cat_inputs(examples), edits=edits,
                        meta={**first.meta, "stacked": [ex.meta.get("corruption") for ex in examples]})
