"""Corruptions for causal tracing: a clean and a corrupted run that differ in one controlled way.

Three families, each returning a corrupted :class:`~vlm_interp.Example` with the clean
example's token layout:

* noise (``noise.py``): seeded Gaussian noise on image embeddings, patches or pixels;
* semantic minimal pairs (``pairs.py``, ``edit.py``): a second image differing in one thing
  (shapes-world pairs, JSON-lines pair files, region edits by inpainting or classical fills),
  checked by ``checks.py``;
* symmetric token replacement (``tokens.py``): same-length word swaps in the question.

Noise inside the model lives in ``Example.edits``; run corrupted examples inside
:func:`applied` (or with :func:`run` / :func:`score`). :func:`from_spec` parses the
``--corrupt`` strings of the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..example import Example
from ..options import SpecParser
from .base import CorruptionError, InputEdit, applied, check_layout, layout_differences, run, score, stack
from .checks import (
    ClipRegionScore,
    NotMinimalPairWarning,
    PairReport,
    check_pair,
    clip_region_score,
    dilate,
    load_clip,
)
from .edit import FILLS, edit_image, example_region, fill_region, inpaint, load_inpainting, region_edit
from .noise import Place, embedding_std, noise, noise_samples, parse_scale
from .pairs import PairRecord, from_shapes_pair, load_pair, pairs_from_file, read_pairs, with_image
from .tokens import replace_tokens, str_candidates, token_count

SPEC_HELP = (
    "noise[:scale=3sd,tokens=image,place=embeddings|patches|pixels,seed=0]; "
    "pair:IMAGE_PATH or pair:PAIRS.jsonl[,line=N]; "
    "str:OLD=NEW[,OLD=NEW...]; "
    "edit[:fill=blur|mean|patch|inpaint,seed=0,model=PATH_OR_HUB_ID,prompt=TEXT,dilate=4]"
)
SPEC = SpecParser("corruption", SPEC_HELP, CorruptionError)
KINDS = ("noise", "pair", "str", "edit")


def _tokens(value: str) -> str | list[int]:
    """``image``/``object``/... or positions joined by '+' (``5+6+7``)."""
    if value.replace("+", "").isdigit():
        return SPEC.integers("noise", "tokens", value)
    return value


def _pair_spec(vlm, example: Example, rest: str) -> Example:
    path_text, _, line_text = rest.partition(",line=")
    path = Path(path_text.strip())
    if not path_text.strip():
        raise CorruptionError("pair spec needs a path: pair:IMAGE_PATH or pair:PAIRS.jsonl[,line=N]")
    if path.suffix.lower() in (".jsonl", ".json"):
        records = read_pairs(path)
        if line_text:
            line = SPEC.integer("pair", "line", line_text)
            chosen = [r for r in records if r.line == line]
            if not chosen:
                raise CorruptionError(f"{path} has no pair on line {line}; pair lines: {[r.line for r in records]}")
            record = chosen[0]
        elif len(records) == 1:
            record = records[0]
        else:
            raise CorruptionError(f"{path} holds {len(records)} pairs; choose one with pair:{path},line=N "
                                  f"(lines {[r.line for r in records]})")
        if record.question != example.question:
            raise CorruptionError(f"{record.where}: the pair's question {record.question!r} differs from the "
                                  f"example's {example.question!r}")
        from PIL import Image

        with Image.open(record.corrupt_image) as im:
            image = im.convert("RGB")
        region = record.region((image.height, image.width))
        corrupt = with_image(vlm, example, image, region=region, answer=record.corrupt_answer)
        corrupt.meta["corruption"] = {"kind": "pair", "source": record.where}
        return corrupt
    if line_text:
        raise CorruptionError(f"',line=' applies to a .jsonl pairs file, not to {path}")
    if not path.is_file():
        raise CorruptionError(f"pair image {path} not found")
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except OSError as err:
        raise CorruptionError(f"cannot read pair image {path}: {err}") from None
    corrupt = with_image(vlm, example, image)
    corrupt.meta["corruption"] = {"kind": "pair", "source": str(path)}
    return corrupt


def from_spec(vlm, example: Example, spec: str, **kw: Any) -> Example:
    """The corrupted example a command-line ``--corrupt`` string describes.

    Forms: ``noise`` or ``noise:scale=3sd,tokens=object,place=pixels,seed=1``;
    ``pair:PATH`` (a corrupt image, or a pairs file with ``,line=N``); ``str:circle=square``
    (several pairs separated by commas); ``edit:fill=blur`` (region edit of the example's
    object region; ``model=`` for inpainting). ``kw`` go to the underlying function and
    override spec options (for example ``std_examples=`` or ``pipeline=``).
    """
    kind, rest = SPEC.split(spec, KINDS)
    if kind == "noise":
        opts = SPEC.options("noise", rest, ("scale", "tokens", "place", "seed"))
        args: dict[str, Any] = {}
        if "scale" in opts:
            args["scale"] = opts["scale"]
        if "tokens" in opts:
            args["tokens"] = _tokens(opts["tokens"])
        if "place" in opts:
            args["place"] = opts["place"]
        if "seed" in opts:
            args["seed"] = SPEC.integer("noise", "seed", opts["seed"])
        return noise(vlm, example, **{**args, **kw})
    if kind == "pair":
        if kw:
            raise CorruptionError(f"pair specs take no extra arguments, got {sorted(kw)}")
        return _pair_spec(vlm, example, rest)
    if kind == "str":
        pairs = SPEC.pairs(rest, "str replacement", "OLD=NEW (for example str:circle=square)")
        if not pairs:
            raise CorruptionError("str spec needs at least one replacement: str:OLD=NEW[,OLD=NEW...]")
        if kw:
            raise CorruptionError(f"str specs take no extra arguments, got {sorted(kw)}")
        return replace_tokens(vlm, example, pairs)
    opts = SPEC.options("edit", rest, ("fill", "seed", "model", "prompt", "dilate"))
    args = {"fill": opts.get("fill", "blur")}
    if "seed" in opts:
        args["seed"] = SPEC.integer("edit", "seed", opts["seed"])
    if "dilate" in opts:
        args["dilate_px"] = SPEC.integer("edit", "dilate", opts["dilate"])
    if "prompt" in opts:
        args["prompt"] = opts["prompt"]
    if "model" in opts:
        args["pipeline"] = opts["model"]
    return region_edit(vlm, example, **{**args, **kw})


__all__ = [
    "CorruptionError", "InputEdit", "applied", "run", "score", "stack", "check_layout", "layout_differences",
    "noise", "noise_samples", "embedding_std", "parse_scale", "Place",
    "from_shapes_pair", "read_pairs", "load_pair", "pairs_from_file", "PairRecord", "with_image",
    "FILLS", "fill_region", "inpaint", "edit_image", "load_inpainting", "region_edit", "example_region",
    "check_pair", "PairReport", "NotMinimalPairWarning", "dilate", "clip_region_score", "ClipRegionScore", "load_clip",
    "replace_tokens", "str_candidates", "token_count", "from_spec", "SPEC_HELP",
]
