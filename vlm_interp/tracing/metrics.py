"""What a patched run is measured by: the answer's probability, log-probability, or a logit difference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AnswerEncodingError

METRICS = ("prob", "logprob", "logit_diff")


@dataclass(frozen=True)
class Metric:
    """A scalar per batch row from the answer logits: ``kind`` of token ``answer`` (vs ``other``)."""

    kind: str
    answer: int
    other: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in METRICS:
            raise ValueError(f"unknown metric {self.kind!r}; metrics are {METRICS}")
        if (self.kind == "logit_diff") != (self.other is not None):
            raise ValueError("logit_diff needs the other answer's token; prob and logprob take none")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (rows, vocab) at the answer position -> (rows,) float."""
        logits = logits.float()
        if self.kind == "logit_diff":
            return logits[:, self.answer] - logits[:, self.other]
        logp = torch.log_softmax(logits, dim=-1)[:, self.answer]
        return logp if self.kind == "logprob" else logp.exp()


def make_metric(vlm, example, kind: str = "prob", answer: str | None = None, other: str | None = None) -> Metric:
    """A metric on the first token of ``answer`` (default: the example's answer)."""
    if answer is None:
        if example.answer is None:
            raise AnswerEncodingError("tracing needs an answer: prepare(..., answer=...) or pass answer=")
        answer = example.answer
    ids = vlm.encode_answer(example, answer)
    other_id = None
    if kind == "logit_diff":
        if other is None:
            raise ValueError("metric 'logit_diff' needs other= (for example 'no' against 'yes')")
        other_id = vlm.encode_answer(example, other)[0]
        if other_id == ids[0]:
            raise AnswerEncodingError(f"{answer!r} and {other!r} share their first token")
    return Metric(kind, ids[0], other_id)


def recovery_rate(patched, clean: float, corrupt: float):
    """RR = (m_patched - m_corrupt) / (m_clean - m_corrupt): 0 = nothing restored, 1 = all of it."""
    gap = clean - corrupt
    if gap == 0:
        raise ValueError("the clean and corrupted runs score the same; the corruption changed nothing to recover")
    return (patched - corrupt) / gap
