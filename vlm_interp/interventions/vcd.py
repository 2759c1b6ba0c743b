"""Visual contrastive decoding (VCD): contrast the logits with those of a run on a distorted image.

At every generation step (and for first-token scores) the model also runs on the same prompt and the
tokens generated so far, with the image's pixel values distorted by the forward diffusion process
(1000 steps, betas = sigmoid(linspace(-6, 6)) scaled to [1e-5, 5e-3], noise at step ``noise_step``,
500 by default, seeded). The next-token logits become

    (1 + alpha) * logits - alpha * logits_distorted,

restricted to the plausible tokens, those whose probability under the clean run is at least ``beta``
times the most likely token's (the adaptive plausibility constraint); every other token gets -inf.
With ``alpha = 0`` the most likely token is unchanged, so greedy decoding is plain greedy decoding.

It is a transformers :class:`~transformers.LogitsProcessor` handed to the model's own ``generate`` (no
copied generation loop), and :meth:`VLM.first_token_logits` applies it too, so POPE-style first-token
answers see it. The processor works on batched inputs: each row's noise depends on the seed only, not
on the row, so a batch gives the same tokens as one example at a time.

Stacking: the contrast run happens inside the hooks of every other active intervention, so it sees
head modulation (``scale:``, ``heads:``) exactly as the clean run does. VHR and IRI track generation
steps and take a contrast run for a new prompt; combined with VCD they raise an error instead.
The contrast run re-runs the whole sequence at every step (no key/value cache of its own): one more
full forward per generated token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import LogitsProcessor

from .steps import InterventionError, extra_run

DIFFUSION_STEPS = 1000


def diffusion_noise(pixels: torch.Tensor, noise_step: int, seed: int = 0) -> torch.Tensor:
    """``pixels`` after ``noise_step`` steps of VCD's forward diffusion; each batch row gets the same draw."""
    if not 0 <= noise_step < DIFFUSION_STEPS:
        raise InterventionError(f"VCD noise_step {noise_step} must lie in 0..{DIFFUSION_STEPS - 1}")
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    keep = torch.cumprod(1 - betas, 0)[noise_step]
    rows = []
    for row in pixels:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32)
        rows.append(float(keep.sqrt()) * row.float() + float((1 - keep).sqrt()) * noise)
    return torch.stack(rows).to(pixels.device, pixels.dtype)


@dataclass
class VCDState:
    """What VCD did: its settings and how many steps it contrasted."""

    alpha: float
    beta: float
    noise_step: int
    seed: int
    steps: int = 0


class VCDProcessor(LogitsProcessor):
    """The contrast for one set of model inputs (``vlm.logits_processors`` builds one per generate call)."""

    def __init__(self, vlm, inputs: dict, state: VCDState):
        if "pixel_values" not in inputs:
            raise InterventionError("VCD distorts the image, but these model inputs have no pixel_values")
        self.vlm, self.state = vlm, state
        self.distorted = {**inputs, "pixel_values": diffusion_noise(inputs["pixel_values"], state.noise_step,
                                                                    state.seed)}
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        generated = input_ids[:, self.start:]
        if self.vlm.image_token_id is not None and (generated == self.vlm.image_token_id).any():
            raise InterventionError("the model generated its image token; VCD's contrast run re-feeds the generated "
                                    "tokens and cannot feed that one (suppress it: generate(..., suppress_tokens=[id]))")
        inputs = self.vlm.decoder.with_answer(self.vlm.model, dict(self.distorted), generated)
        with torch.no_grad(), extra_run("VCD's contrast run"):
            contrast = self.vlm.logits(inputs)[:, -1].to(scores.dtype)
        if contrast.shape != scores.shape:
            raise InterventionError(f"VCD's contrast logits have shape {tuple(contrast.shape)} but the step's "
                                    f"have {tuple(scores.shape)}; beam search is not supported")
        self.state.steps += 1
        return vcd_logits(scores, contrast, self.state.alpha, self.state.beta)


def vcd_logits(logits: torch.Tensor, contrast: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``(1 + alpha) * logits - alpha * contrast`` where ``p(token) >= beta * max p``, -inf elsewhere."""
    cutoff = torch.log(torch.tensor(beta, dtype=logits.dtype)) + logits.max(-1, keepdim=True).values
    out = (1 + alpha) * logits - alpha * contrast
    return out.masked_fill(logits < cutoff, float("-inf"))


@contextlib.contextmanager
def vcd(vlm, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0) -> Iterator[VCDState]:
    """Visual contrastive decoding during ``generate`` and first-token scores (see the module docstring).

    An error on exit when no step was contrasted (nothing was generated or scored inside).
    """
    if alpha < 0:
        raise InterventionError(f"VCD alpha {alpha} must be >= 0")
    if not 0 < beta <= 1:
        raise InterventionError(f"VCD beta {beta} must lie in (0, 1]")
    diffusion_noise(torch.zeros(1, 1), noise_step)  # checks noise_step
    state = VCDState(float(alpha), float(beta), int(noise_step), int(seed))

    def make(model_vlm, inputs: dict) -> VCDProcessor:
        return VCDProcessor(model_vlm, inputs, state)

    vlm.logits_processors.append(make)
    failed = False
    try:
        yield state
    except BaseException:
        failed = True
        raise
    finally:
        vlm.logits_processors.remove(make)
        if not failed and state.steps == 0:
            raise InterventionError("VCD never contrasted a step: nothing was generated or scored inside it")
