"""Reading yes/no out of generated text the way POPE's evaluation does."""

from __future__ import annotations

import re

NEGATIONS = ("no", "not", "No")


def parse_yes_no(text: str) -> str:
    """POPE's rule: keep the first sentence, drop commas, and answer 'no' iff a word is 'no', 'No' or 'not'.

    Everything else, including an empty answer, counts as 'yes' (as in POPE); keep the raw
    text next to the parsed answer so such cases can be audited.
    """
    first = text.split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in NEGATIONS for w in words) else "yes"


def is_explicit(text: str) -> bool:
    """True when the first sentence says yes or no outright (so POPE's default did not decide)."""
    first = text.split(".", 1)[0].lower()
    return bool(re.search(r"\b(yes|no|not)\b", first))
