"""What a corrupted Example is and how it runs: layout checks, running with edits, stacking.

Some corruptions change model inputs (pixels, token ids) and live in ``Example.inputs``.
Others happen inside the model (noise on image embeddings); they are recorded as
:class:`~vlm_interp.edits.InputEdit` objects in ``Example.edits`` and attached as hooks by
:func:`~vlm_interp.edits.applied` whenever the example runs (see :mod:`vlm_interp.edits`, a core
module; both names, and :class:`~vlm_interp.errors.CorruptionError`, are re-exported here).
:func:`run` and :func:`score` run an example with its edits.

:func:`stack` joins several examples with identical layouts into one batch whose edits carry
per-row noise (an example without an edit contributes zero noise, so a clean row 0 works as in ROME).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..edits import InputEdit, applied
from ..errors import CorruptionError
from ..example import Example

__all__ = ["CorruptionError", "InputEdit", "applied", "run", "score", "layout_differences", "check_layout", "stack",
           "ID_KEYS"]

# Inputs that fix the token layout of an example; corrupt and clean must agree on them exactly.
ID_KEYS = ("input_ids", "attention_mask", "token_type_ids", "qformer_input_ids", "qformer_attention_mask",
           "image_sizes")


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
    if problems and clean.image_hw and corrupt.image_hw and clean.image_hw != corrupt.image_hw:
        (ha, wa), (hb, wb) = clean.image_hw, corrupt.image_hw
        counts = [len(ex.groups.get("lm", {}).get("image", [])) for ex in (clean, corrupt)]
        raise CorruptionError(
            f"the {what} has an image of {wb}x{hb} pixels and the clean example one of {wa}x{ha} (width x height): "
            "use the same image size for both, so that both map to the same tokens at the "
            f"same positions ({counts[0]} vs {counts[1]} image tokens in the LM); tracing patches position by "
            "position. Differences: " + "; ".join(problems)
        )
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
                               spec.exact_length, spec.label, spec.fold, spec.packed))
    return first.derive(inputs=_cat_inputs(examples), edits=edits,
                        meta={**first.meta, "stacked": [ex.meta.get("corruption") for ex in examples]})
