"""Symmetric token replacement (STR, NOTICE): swap words of the question for same-length words.

``replace_tokens(vlm, ex, {"circle": "square"})`` re-prepares the example with the edited
question and the same image and prompt template, and checks that every tokenized input
(the LM's ``input_ids``, BLIP's question-encoder ids, InstructBLIP's ``qformer_input_ids``)
keeps its length and changes only at the replaced words. Anything else raises
:class:`~vlm_interp.corruptions.base.CorruptionError` naming the word, the token counts on
both sides and the reason; nothing is ever silently shifted.

Token counts are taken *in context* (with the leading space a BPE tokenizer folds into the
word), which is what :func:`str_candidates` uses to propose same-length replacements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .. import prompts
from ..example import Example
from .base import CorruptionError

Replacements = Mapping[str, str] | Sequence[tuple[str, str]]
DEFAULT_CONTEXT = "Is there a {} in the image?"


@dataclass(frozen=True)
class _Stream:
    """One tokenized input that must stay aligned: its key, tokenizer, tower and position offset."""

    key: str
    tokenizer: object
    tower: str
    offset: int = 0
    skip_id: int | None = None


def _streams(vlm, ex: Example) -> list[_Stream]:
    """Token sequences of this family that carry the question."""
    tower = vlm.decoder.prompt_tower
    out = [_Stream("input_ids", vlm.tokenizer, tower, 0, vlm.image_token_id)]
    if "qformer_input_ids" in ex.inputs:
        out.append(_Stream("qformer_input_ids", vlm.processor.qformer_tokenizer, "qformer",
                           len(ex.groups.get("qformer", {}).get("image", []))))
    return out


def _normalise(replacements: Replacements) -> list[tuple[str, str]]:
    pairs = list(replacements.items()) if isinstance(replacements, Mapping) else list(replacements)
    if not pairs:
        raise CorruptionError("no replacements given; pass {'old word': 'new word'} or [(old, new), ...]")
    out = []
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise CorruptionError(f"a replacement must be a pair of strings (old, new), got {item!r}")
        old, new = item
        if not old.strip() or not new.strip():
            raise CorruptionError(f"replacement {old!r} -> {new!r}: both sides must be non-empty words")
        if old.strip() != old or new.strip() != new:
            raise CorruptionError(f"replacement {old!r} -> {new!r}: remove leading/trailing spaces; spaces "
                                  "around words belong to the prompt")
        if old == new:
            raise CorruptionError(f"replacement {old!r} -> {new!r} changes nothing; a corruption must differ")
        out.append((old, new))
    return out


def _occurrences(text: str, word: str) -> list[tuple[int, int]]:
    """Character spans of ``word`` in ``text`` as a whole word (not inside a longer word)."""
    pattern = r"(?<!\w)" + re.escape(word) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text)]


def _extend_left(text: str, start: int) -> int:
    """Move ``start`` back over whitespace: BPE tokenizers fold the space into the word's token."""
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return start


def _span_tokens(tokenizer, text: str, span: tuple[int, int]) -> list[str]:
    """Tokens of ``text`` (tokenized whole) that overlap ``span`` extended over leading spaces."""
    start, end = _extend_left(text, span[0]), span[1]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [tokenizer.convert_ids_to_tokens(i) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
            if b > a and a < end and b > start]


def _aligned_positions(vlm, stream: _Stream, prompt: str, seq: list[int], spans: list[tuple[int, int]]) -> set[int]:
    """Positions of the processed sequence whose tokens overlap any of ``spans`` (prompt characters)."""
    mapping = prompts.text_alignment(stream.tokenizer, prompt, seq, stream.skip_id)
    wide = [(_extend_left(prompt, a), b) for a, b in spans]
    return {stream.offset + p for p, (a, b) in mapping.items()
            if b > a and any(a < e and b > s for s, e in wide)}


def _template_of(ex: Example) -> tuple[str, int]:
    """The prompt template that produced ``ex.prompt`` and where the question starts in the prompt."""
    start = ex.prompt.rfind(ex.question)
    if start < 0:
        raise CorruptionError(f"the question {ex.question!r} does not occur in the prompt {ex.prompt!r}; "
                              "re-prepare the example with vlm.prepare")

    def esc(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    return esc(ex.prompt[:start]) + "{question}" + esc(ex.prompt[start + len(ex.question):]), start


def _unknown(tokenizer, text: str) -> bool:
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is not None and unk in tokenizer(text, add_special_tokens=False)["input_ids"]


def replace_tokens(vlm, ex: Example, replacements: Replacements) -> Example:
    """STR corruption: ``ex`` with words of its question replaced by words of the same token length.

    Every whole-word occurrence of each old word in the question is replaced. The result
    has the same image, template, answer and token groups; ``meta["corruption"]`` lists the
    changed positions per tower.
    """
    pairs = _normalise(replacements)
    if ex.image is None:
        raise CorruptionError("the example has no image to re-prepare with; build it with vlm.prepare")
    image_token = vlm.image_token
    edits: list[tuple[int, int, str, str]] = []  # (start, end, old, new) in question characters
    for old, new in pairs:
        if image_token and (image_token in old or image_token in new):
            raise CorruptionError(f"replacement {old!r} -> {new!r} touches the image placeholder {image_token!r}; "
                                  "STR replaces question words, never image tokens")
        spans = _occurrences(ex.question, old)
        if not spans:
            raise CorruptionError(f"word {old!r} does not occur (as a whole word) in the question "
                                  f"{ex.question!r}; STR replaces words of the question only")
        for s, e in spans:
            for s2, e2, o2, _ in edits:
                if s < e2 and s2 < e:
                    raise CorruptionError(f"replacements {o2!r} and {old!r} overlap in the question {ex.question!r}")
            edits.append((s, e, old, new))
    edits.sort()
    question, shift, new_spans, old_spans = ex.question, 0, [], []
    for s, e, old, new in edits:
        question = question[:s + shift] + new + question[e + shift:]
        old_spans.append((s, e))
        new_spans.append((s + shift, s + shift + len(new)))
        shift += len(new) - len(old)
    template, qstart = _template_of(ex)
    streams = _streams(vlm, ex)
    old_prompt = ex.prompt
    new_prompt = old_prompt[:qstart] + question + old_prompt[qstart + len(ex.question):]
    for old, new in pairs:
        for stream in streams:
            if _unknown(stream.tokenizer, new) and not _unknown(stream.tokenizer, old):
                raise CorruptionError(f"replacement word {new!r} is not in the vocabulary of the {stream.tower} "
                                      f"tokenizer (it encodes to the unknown token); choose a word it knows")
    try:
        corrupt = vlm.prepare(ex.image, question, answer=ex.answer, template=template)
    except ValueError as err:  # prompt or answer errors of prepare, with the word that caused them
        raise CorruptionError(f"the question with replacements {pairs} cannot be prepared: {err}") from err
    if corrupt.prompt != new_prompt:
        raise CorruptionError(f"re-preparing gave the prompt {corrupt.prompt!r}, expected {new_prompt!r}; the "
                              "template could not be reproduced from the example")
    changed: dict[str, list[int]] = {}
    for stream in streams:
        changed[stream.tower] = _check_stream(vlm, ex, corrupt, stream, edits, old_spans, new_spans, qstart)
    moved = [f"{t}.{g}" for t, groups in corrupt.groups.items() for g, pos in groups.items()
             if g in ex.groups.get(t, {}) and ex.groups[t][g] != pos]
    if moved:
        raise CorruptionError(f"replacements {pairs} move the token groups {moved}; STR must keep every group in place")
    if not any(changed.values()):
        raise CorruptionError(f"replacements {pairs} change no token id (the tokenizer maps both sides to the "
                              "same tokens, e.g. the unknown token); the corruption would be a no-op")
    inputs = dict(ex.inputs)
    for stream in streams:
        inputs[stream.key] = corrupt.inputs[stream.key]
    record = {"kind": "str", "replacements": pairs, "question": question, "positions": changed}
    return ex.derive(inputs=inputs, prompt=corrupt.prompt, question=question, answer_ids=corrupt.answer_ids,
                     tokens=corrupt.tokens, meta={**ex.meta, "corruption": record})


def _check_stream(vlm, clean: Example, corrupt: Example, stream: _Stream, edits, old_spans, new_spans,
                  qstart: int) -> list[int]:
    """Raise unless ``stream`` keeps its length and changes only at replaced words; return changed positions."""
    a = clean.inputs[stream.key][0].tolist()
    b = corrupt.inputs[stream.key][0].tolist()
    tok = stream.tokenizer
    if len(a) != len(b):
        details = []
        for (s, e, old, new), (ns, ne) in zip(edits, new_spans):
            before = _span_tokens(tok, clean.prompt, (qstart + s, qstart + e))
            after = _span_tokens(tok, corrupt.prompt, (qstart + ns, qstart + ne))
            if len(before) != len(after):
                details.append(f"{old!r} is {len(before)} token{'s' * (len(before) != 1)} {before} but {new!r} is "
                               f"{len(after)} token{'s' * (len(after) != 1)} {after}")
        what = "; ".join(details) or "the words keep their counts but their neighbours tokenize differently"
        raise CorruptionError(
            f"STR would change the length of {stream.key} ({stream.tower} tower) from {len(a)} to {len(b)} tokens: "
            f"{what}. Every later position would shift, so tracing could not compare positions; choose "
            "replacements with the same token count in context (see str_candidates)."
        )
    diff = sorted(stream.offset + i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    allowed = _aligned_positions(vlm, stream, clean.prompt, a, [(qstart + s, qstart + e) for s, e in old_spans])
    allowed &= _aligned_positions(vlm, stream, corrupt.prompt, b, [(qstart + s, qstart + e) for s, e in new_spans])
    image = set(clean.groups.get(stream.tower, {}).get("image", []))
    touched = [p for p in diff if p in image]
    if touched:
        raise CorruptionError(f"STR changed image-token positions {touched} of the {stream.tower} tower; "
                              "replacements must touch question words only")
    outside = [p for p in diff if p not in allowed]
    if outside:
        raise CorruptionError(
            f"STR changed {stream.key} at positions {outside} outside the replaced words (the replacement "
            "changes how neighbouring text tokenizes); pick replacements that tokenize independently"
        )
    return diff


def _count_in(tokenizer, prefix: str, word: str, suffix: str) -> int:
    return len(_span_tokens(tokenizer, prefix + word + suffix, (len(prefix), len(prefix) + len(word))))


def token_count(tokenizer, word: str, context: str = DEFAULT_CONTEXT) -> int:
    """Number of tokens ``word`` takes where ``{}`` stands in ``context``, leading space included."""
    if "{}" not in context:
        raise CorruptionError(f"context {context!r} must contain '{{}}' where the word goes")
    prefix, suffix = context.split("{}", 1)
    return _count_in(tokenizer, prefix, word, suffix)


def str_candidates(vlm, word: str, candidates: Iterable[str], context: str | Example | None = None) -> list[str]:
    """Candidates with the same token count as ``word`` in context, for every tokenizer of the model.

    ``candidates`` is the pool (for the shapes world: ``vi.zoo.SHAPES`` or ``vi.zoo.COLORS``);
    ``context`` is a string where ``{}`` marks the word's place, or an Example whose question
    contains ``word`` (default: ``"Is there a {} in the image?"``). Words a tokenizer cannot
    encode (unknown token) are dropped.
    """
    if isinstance(candidates, str):
        raise CorruptionError(f"candidates={candidates!r} is one string; give a list of words")
    pool = list(candidates)
    if isinstance(context, Example):
        spans = _occurrences(context.question, word)
        if not spans:
            raise CorruptionError(f"word {word!r} does not occur in the example's question {context.question!r}")
        (s, e), q = spans[0], context.question
        prefix, suffix = q[:s], q[e:]
    else:
        context = DEFAULT_CONTEXT if context is None else context
        if "{}" not in context:
            raise CorruptionError(f"context {context!r} must contain '{{}}' where the word goes")
        prefix, suffix = context.split("{}", 1)
    tokenizers = [vlm.tokenizer] + ([vlm.processor.qformer_tokenizer]
                                    if getattr(vlm.processor, "qformer_tokenizer", None) is not None else [])
    target = [_count_in(t, prefix, word, suffix) for t in tokenizers]
    out = []
    for cand in dict.fromkeys(pool):
        if not isinstance(cand, str) or cand == word or not cand.strip() or any(_unknown(t, cand) for t in tokenizers):
            continue
        if [_count_in(t, prefix, cand, suffix) for t in tokenizers] == target:
            out.append(cand)
    return out


__all__ = ["replace_tokens", "str_candidates", "token_count", "DEFAULT_CONTEXT"]
