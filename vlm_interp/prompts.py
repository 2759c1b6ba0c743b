"""Where a processed prompt's tokens come from (positions of a processed sequence mapped to spans of the prompt
text), and how a token reads on an axis."""

from __future__ import annotations

import difflib

from .errors import PromptError


def text_alignment(tokenizer, prompt: str, seq: list[int], skip_id: int | None) -> dict[int, tuple[int, int]]:
    """Map positions of ``seq`` (a processed sequence) to character spans of ``prompt``.

    The prompt is tokenized with offsets; positions holding ``skip_id`` (image tokens,
    which the processor expands) are skipped; the rest must match token for token. Where
    the processor expands the prompt's one image placeholder into a span that also holds
    other tokens (tile separators, row and column tags), the tokens before and after the
    placeholder must match the start and the end of ``seq``; the span between is the image's.
    Otherwise the processor inserted tokens elsewhere (:func:`inserted_alignment`).
    """
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
    plain = [(i, o) for i, o in pairs if i != skip_id]
    positions = [p for p, t in enumerate(seq) if t != skip_id]
    if [i for i, _ in plain] == [seq[p] for p in positions]:
        return {p: tuple(o) for p, (_, o) in zip(positions, plain)}
    marks = [k for k, (i, _) in enumerate(pairs) if i == skip_id]
    if skip_id is not None and len(marks) == 1:
        before, after = pairs[:marks[0]], pairs[marks[0] + 1:]
        head = [i for i, _ in before] == seq[:len(before)]
        tail = not after or [i for i, _ in after] == seq[len(seq) - len(after):]
        if head and tail and len(before) + len(after) < len(seq):
            spans = {p: tuple(o) for p, (_, o) in enumerate(before)}
            spans.update({len(seq) - len(after) + k: tuple(o) for k, (_, o) in enumerate(after)})
            return spans
    return inserted_alignment(prompt, plain, [(p, seq[p]) for p in positions])


def inserted_alignment(prompt: str, plain: list, seq: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Align a tokenized prompt with a processed sequence into which the processor inserted tokens.

    Processors that wrap the image (Gemma 3's start and end of image, PaliGemma's BOS after the
    image) or re-tokenize around it add tokens the prompt does not have. The two id lists are
    matched by their longest common subsequence; positions of ``seq`` without a partner come from
    the processor and get no span. Every prompt token that carries text (not only white space, which
    a processor may re-tokenize together with what it inserts) must find its partner.
    """
    matcher = difflib.SequenceMatcher(None, [i for i, _ in plain], [t for _, t in seq], autojunk=False)
    pairs = [(a + k, b + k) for a, b, n in matcher.get_matching_blocks() for k in range(n)]
    spans = {seq[b][0]: tuple(plain[a][1]) for a, b in pairs}
    matched = {a for a, _ in pairs}
    lost = [prompt[o[0]:o[1]] for k, (_, o) in enumerate(plain) if prompt[o[0]:o[1]].strip() and k not in matched]
    if lost:
        raise PromptError(
            "could not align the processed input ids with the tokenized prompt; the processor changed "
            f"the text in an unexpected way (prompt {prompt!r}; prompt text not found: {lost[:5]})"
        )
    return spans


def question_positions(spans: dict[int, tuple[int, int]], prompt: str, question: str) -> list[int]:
    """Positions of ``spans`` whose text overlaps the last occurrence of ``question`` in ``prompt``."""
    start = prompt.rfind(question)
    if start < 0:
        raise PromptError(f"question {question!r} not found in the formatted prompt {prompt!r}")
    end = start + len(question)
    return sorted(p for p, (a, b) in spans.items() if b > a and a < end and b > start)


def token_label(token: str) -> str:
    """A token as a reader should see it on an axis: byte-level BPE and SentencePiece space marks as spaces, then
    stripped; a token of white space only as a visible mark (a newline as '\\n')."""
    text = str(token).replace("\u0120", " ").replace("\u010a", "\n").replace("\u0109", "\t").replace("\u2581", " ")
    shown = text.strip()
    if shown:
        return shown
    return {"\n": "\\n", "\t": "\\t"}.get(text[:1], "\u2423")  # a newline, a tab, else the open-box space
