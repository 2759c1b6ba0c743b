"""How a family's answer is produced and read: a decoder LM continuing the prompt, or BLIP's separate answer decoder.

An :class:`Adapter` names its decoder kind (``Adapter.decoder``); :data:`DECODERS` maps the kind to
the strategy the model wrapper calls for answer tokens, whole-answer inputs, logits and
generated text, so that no code outside the adapters branches on the kind for these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AnswerEncodingError
from ..hooks import AttachedHooks, Hook


class CausalDecoder:
    """A decoder LM: the answer continues the prompt in the same sequence; logits are the model's own."""

    kind = "causal"
    prompt_tower = "lm"  # the tower whose input_ids hold the prompt
    continues_prompt = True  # answers (and generation steps) extend the prompt's own sequence
    not_a_continuation = ""

    def answer_ids(self, tokenizer: Any, prompt: str, prefix: str, answer: str, alone: bool = False) -> list[int]:
        """The answer's token ids as they follow the prompt (an error where the tokenizer merges across the seam).

        ``alone`` (``Adapter.answer_alone``): the processor ends the prompt with its own separator and
        the answer is tokenized on its own, without ``prefix``.
        """
        if alone:
            return tokenizer(answer, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + prefix + answer, add_special_tokens=False)["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:
            raise AnswerEncodingError(
                f"answer {answer!r} does not tokenize separately from the prompt: the tokenizer merges "
                "the prompt's last token with the answer. Change answer_prefix or the template."
            )
        return full[len(prompt_ids):]

    def with_answer(self, model: nn.Module, inputs: dict, extra: torch.Tensor, fill: dict[str, int] | None = None
                    ) -> dict:
        """``inputs`` that also feed ``extra`` answer tokens (1, n) after the prompt.

        ``fill``: other per-token inputs the answer tokens extend, with their value there
        (``Adapter.answer_token_inputs``); the attention mask is always extended with ones.
        """
        if extra.shape[1]:
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            for key, value in {"attention_mask": 1, **(fill or {})}.items():
                if key in inputs:
                    inputs[key] = torch.cat([inputs[key], torch.full_like(extra, value, dtype=inputs[key].dtype)], dim=1)
        return inputs

    def teacher_forced(self, model: nn.Module, prompt: list[int],
                       answer: list[int]) -> tuple[dict[str, list[int]], list[int]]:
        """Token-id rows that feed ``answer`` for a training loss: here the prompt then the answer in one sequence;
        and the labels of that sequence (-100 on the prompt: no loss there)."""
        return {"input_ids": prompt + answer}, [-100] * len(prompt) + answer

    def logits(self, model: nn.Module, inputs: dict, logits_module: str | None) -> torch.Tensor:
        return model(**inputs).logits

    def generated(self, out: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The new tokens of ``generate``'s output (decoder LMs return the prompt too)."""
        return out[:, inputs["input_ids"].shape[1]:]


class BlipDecoder:
    """BLIP's answer decoder: it starts its own sequence from its start token; logits come from ``logits_module``."""

    kind = "blip"
    prompt_tower = "text"
    continues_prompt = False
    not_a_continuation = "answers with a separate BLIP answer decoder that starts its own sequence"

    def start_groups(self, model: nn.Module, tokenizer: Any) -> tuple[dict[str, list[int]], list[str]]:
        """The answer decoder's token groups and tokens before any answer: its start token, which predicts the answer."""
        return {"last": [0], "text": [0]}, [tokenizer.convert_ids_to_tokens(model.decoder_start_token_id)]

    def answer_ids(self, tokenizer: Any, prompt: str, prefix: str, answer: str, alone: bool = False) -> list[int]:
        return tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]

    def _start(self, model: nn.Module, rows: int, device) -> torch.Tensor:
        return torch.full((rows, 1), model.decoder_start_token_id, dtype=torch.long, device=device)

    def with_answer(self, model: nn.Module, inputs: dict, extra: torch.Tensor, fill: dict[str, int] | None = None
                    ) -> dict:
        inputs["decoder_input_ids"] = torch.cat([self._start(model, 1, extra.device), extra], dim=1)
        return inputs

    def teacher_forced(self, model: nn.Module, prompt: list[int],
                       answer: list[int]) -> tuple[dict[str, list[int]], list[int]]:
        """The prompt for the question encoder and, for the answer decoder, its start token then ``answer``; the labels
        are that decoder sequence (a loss compares the logits at each position with the next label)."""
        answer_row = [model.decoder_start_token_id] + answer
        return {"input_ids": prompt, "decoder_input_ids": answer_row}, answer_row

    def logits(self, model: nn.Module, inputs: dict, logits_module: str | None) -> torch.Tensor:
        if "decoder_input_ids" not in inputs:
            ids = inputs["input_ids"]
            inputs = {**inputs, "decoder_input_ids": self._start(model, ids.shape[0], ids.device)}
        grab = Hook(logits_module, capture=True, grad=True, name="answer logits")
        with AttachedHooks(model, [grab]):
            model(**inputs)
        return grab.value

    def generated(self, out: torch.Tensor, inputs: dict) -> torch.Tensor:
        return out


DECODERS = {"causal": CausalDecoder(), "blip": BlipDecoder()}
