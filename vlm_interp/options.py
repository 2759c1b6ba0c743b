"""Short option strings of the command line, ``kind:key=value,key=value``, parsed in one place.

Corruptions (``noise:scale=3sd,seed=1``) and interventions (``vhr:alpha=2,layers=1-3``) are
named by such strings. A :class:`SpecParser` knows what it parses (``"corruption"``), the
forms it accepts (shown in every error about the string's shape) and the error type to
raise, so each failure says what was wrong and how to write it instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SpecParser:
    """Parses the spec strings of one kind of thing; every problem raises ``error`` naming the fix."""

    what: str  # what a spec names, for messages: "corruption", "intervention"
    forms: str  # the accepted forms, shown when a spec is malformed
    error: type[Exception] = ValueError

    def split(self, spec: str, kinds: Sequence[str]) -> tuple[str, str]:
        """``kind:rest`` -> ``(kind, rest)``; an empty spec or an unknown kind is an error."""
        if not isinstance(spec, str) or not spec.strip():
            raise self.error(f"empty {self.what} spec; use one of: {self.forms}")
        kind, _, rest = spec.strip().partition(":")
        kind = kind.strip()
        if kind not in kinds:
            raise self.error(f"unknown {self.what} spec {spec!r}; use one of: {self.forms}")
        return kind, rest

    def pairs(self, text: str, item: str, form: str, sep: str = ",") -> list[tuple[str, str]]:
        """``A=B<sep>C=D`` -> ``[(A, B), (C, D)]``, stripped; ``item`` and ``form`` name them in errors."""
        out = []
        for part in filter(None, (s.strip() for s in text.split(sep))):
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise self.error(f"{item} {part!r} must look like {form}")
            out.append((key, value))
        return out

    def options(self, kind: str, text: str, allowed: Sequence[str]) -> dict[str, str]:
        """``key=value,key=value`` -> a dict; unknown, repeated or malformed options are errors."""
        out: dict[str, str] = {}
        for key, value in self.pairs(text, f"{kind} option", f"key=value; spec forms: {self.forms}"):
            if key not in allowed:
                raise self.error(f"unknown {kind} option {key!r}; {kind} takes {list(allowed)} (as key=value)")
            if key in out:
                raise self.error(f"{kind} option {key!r} is given twice; give it once")
            out[key] = value
        return out

    def integer(self, kind: str, key: str, value: str) -> int:
        """An option's value as an integer."""
        try:
            return int(value)
        except ValueError:
            raise self.error(f"{kind} option {key}={value!r} must be an integer") from None

    def number(self, kind: str, key: str, value: str) -> float:
        """An option's value as a number."""
        try:
            return float(value)
        except ValueError:
            raise self.error(f"{kind} option {key}={value!r} must be a number") from None

    def integers(self, kind: str, key: str, value: str) -> list[int]:
        """``1-3`` (a range, both ends included) or ``0+2+5`` as a list of integers."""
        if "-" in value:
            lo, hi = value.split("-", 1)
            return list(range(self.integer(kind, key, lo), self.integer(kind, key, hi) + 1))
        return [self.integer(kind, key, v) for v in value.split("+") if v]
