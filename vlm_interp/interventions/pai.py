"""PAI ("pay attention to image", Liu et al., ECCV 2024): excite the attention to image tokens, and contrast the
logits with a text-only run.

Two parts, as in the paper and its code:

1. **Attention.** In the LM's self-attention at layers ``start <= l < end`` (default 2 to the last), the
   pre-softmax scores (after the mask) from the generating query to the image tokens' keys become
   ``s + alpha * |s|``. "The generating query" is the prompt's last position and every generated one, so
   generation with and without the key/value cache amplify the same entries (PAI's code edits the last
   query row of each call, which is the same thing with the cache). Masked entries stay masked. The edit goes
   through vlm-interp's attention dispatcher (:func:`vlm_interp.compat.attention_edits`): eager attention
   with this edit in the chosen layers, the model's own implementation elsewhere.
2. **Logits.** At every step (and for first-token scores) the model also runs on the text alone: the same
   inputs with the image tokens removed and no image inputs, plus the tokens generated so far. The next-token
   logits become ``(1 + gamma) * logits - gamma * logits_text`` over the tokens whose probability is at least
   ``beta`` times the top token's (-inf elsewhere), the processor VCD uses (:func:`~.vcd.vcd_logits`). The
   paper writes the weight as ``gamma_paper * p - (gamma_paper - 1) * p_text``: our ``gamma`` is
   ``gamma_paper - 1``, so its ``gamma_paper = 1.1`` is ``gamma=0.1`` here, and ``gamma=0`` skips the
   text-only run. The paper's code contrasts log-probabilities; raw logits differ from them by one constant
   per row, which changes neither the cut nor the softmax.

Defaults are those of the official code's POPE and CHAIR commands: ``alpha=0.2``, ``gamma_paper=1.1``, layers
from 2 to the last, cut at 0.1. The text-only run re-runs the whole sequence at every step (no cache of its
own). Families whose answer model can only run with an image (InstructBLIP, BLIP-2) run their language model
alone for it. Image markers around the image tokens (Qwen's vision start and end) stay in the text-only run.

PAI applies where the LM reads the image as tokens of its own sequence and its self-attention goes through
transformers' attention interface. It refuses BLIP-VQA (a separate answer decoder reads the image through
cross-attention) and Mllama (cross-attention layers, no image tokens in the LM's sequence), naming why.

The image positions come from the inputs handed to :meth:`VLM.generate`, :meth:`VLM.first_token_logits` or
batched evaluation (through :attr:`VLM.logits_processors`); a batch row's own image tokens are found from its
``input_ids``, so left padding moves them with the row. Stacking as VCD: its text-only run happens inside every
other active intervention's hooks (the amplification itself is paused there: the text has no image), and VCD's
contrast run sees the amplification (tested). VHR (its own text-only LM passes) and IRI with ``gamma > 0`` (its
step tracker refuses the text-only run) do not stack with PAI: an error says so.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import LogitsProcessor

from .. import compat
from ..errors import HookNeverFiredError
from .steps import InterventionError, extra_run, require_decoder_lm
from .vcd import vcd_logits


@dataclass
class PAIState:
    """What PAI did: its settings, the layers it edits, and how many attention calls and steps it changed."""

    alpha: float
    gamma: float
    beta: float
    layers: list[int]
    boosted: int = 0  # attention calls whose scores were amplified
    steps: int = 0  # steps contrasted with the text-only run


class ImageAttention(compat.AttentionEdit):
    """The attention edit: ``s + alpha * |s|`` from the generating query positions to the image keys."""

    eager = True

    def __init__(self, modules, state: PAIState):
        super().__init__(modules)
        self.state = state
        self.image: torch.Tensor | None = None  # (rows, prompt length): which prompt positions are image tokens
        self.paused = False

    def use(self, inputs: dict, image_token_id: int) -> None:
        """Take the image positions from the model inputs of the forwards to come."""
        self.image = inputs["input_ids"] == image_token_id

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def scores(self, call: compat.AttentionCall, scores: torch.Tensor) -> torch.Tensor | None:
        if self.paused:
            return None
        if self.image is None:
            raise InterventionError("PAI finds the image tokens in the inputs handed to VLM.generate, "
                                    "first_token_logits or batched evaluation (VLM.logits_processor); this forward "
                                    "came another way")
        rows, prompt = self.image.shape
        if call.batch != rows:
            raise InterventionError(f"PAI was set up for {rows} row(s), but an attention call has {call.batch}: run "
                                    "the forward through VLM.generate, first_token_logits or batched evaluation")
        if call.k_len < prompt:
            raise InterventionError(f"an attention call of {type(call.module).__name__} sees {call.k_len} keys, fewer "
                                    f"than the {prompt}-token prompt PAI was set up for, so PAI cannot tell which keys "
                                    "are image tokens. Either another intervention ran its own pass of the LM on other "
                                    "inputs (VHR's text-only passes: they do not stack with PAI), or the layer's "
                                    "key/value cache keeps a sliding window (Gemma 2 and 3's local layers: use "
                                    "first-token answers, or generate with use_cache=False)")
        keys = torch.zeros(rows, call.k_len, dtype=torch.bool, device=scores.device)
        keys[:, :prompt] = self.image.to(scores.device)
        queries = (call.self_positions() >= prompt - 1).to(scores.device)
        visible = scores > torch.finfo(scores.dtype).min / 2  # masked entries stay masked
        chosen = queries[None, None, :, None] & keys[:, None, None, :] & visible
        self.state.boosted += 1
        return torch.where(chosen, scores + self.state.alpha * scores.abs(), scores)


def text_model(vlm):
    """The module that gives next-token logits from text alone: the model, or its language model where the
    model's forward requires an image (InstructBLIP, BLIP-2)."""
    needs = inspect.signature(vlm.model.forward).parameters.get("pixel_values")
    if needs is None or needs.default is not inspect.Parameter.empty:
        return vlm.model
    layers = vlm.adapter.adapter.towers["lm"].layers
    for path, module in sorted(vlm.model.named_modules(), key=lambda item: -len(item[0])):
        if path and layers.startswith(path + ".") and hasattr(module, "get_output_embeddings") \
                and module.get_output_embeddings() is not None:
            return module
    raise InterventionError(f"{vlm.family}: the model's forward needs an image and no language model with its own "
                            "output layer was found for PAI's text-only run")


def text_only_inputs(vlm, inputs: dict) -> dict:
    """``inputs`` without the image: the image tokens removed from every text-aligned input, image inputs dropped."""
    ids = inputs["input_ids"]
    keep = ids != vlm.image_token_id
    counts = keep.sum(1)
    if (counts != counts[0]).any():
        raise InterventionError(f"the batch rows hold different numbers of image tokens ({ids.shape[1] - counts}); "
                                "PAI's text-only run needs equal ones: answer one example at a time")
    adapter = vlm.adapter.adapter
    text = {"input_ids", "attention_mask", *adapter.text_aligned_inputs, *adapter.answer_token_inputs}
    return {k: v[keep].view(v.shape[0], int(counts[0]), *v.shape[2:]) for k, v in inputs.items()
            if k in text and torch.is_tensor(v) and v.shape[:2] == ids.shape}


class TextContrast(LogitsProcessor):
    """The text-only contrast for one set of model inputs (one per generate call or first-token score)."""

    def __init__(self, vlm, inputs: dict, edit: ImageAttention, model):
        self.vlm, self.edit, self.model, self.state = vlm, edit, model, edit.state
        self.text = text_only_inputs(vlm, inputs)
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        generated = input_ids[:, self.start:]
        if (generated == self.vlm.image_token_id).any():
            raise InterventionError("the model generated its image token; PAI's text-only run re-feeds the generated "
                                    "tokens and cannot feed that one (suppress it: "
                                    "generate(..., suppress_tokens=[id]))")
        inputs = self.vlm.decoder.with_answer(self.model, dict(self.text), generated,
                                              self.vlm.adapter.adapter.answer_token_inputs)
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()) and compat.accepts_keyword(self.model, "position_ids"):
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding, as generate counts
        with torch.no_grad(), extra_run("PAI's text-only run"), self.edit.pause():
            contrast = self.model(**inputs).logits[:, -1].to(scores.dtype)
        if contrast.shape != scores.shape:
            raise InterventionError(f"PAI's text-only logits have shape {tuple(contrast.shape)} but the step's "
                                    f"have {tuple(scores.shape)}; beam search is not supported")
        self.state.steps += 1
        return vcd_logits(scores, contrast, self.state.gamma, self.state.beta)


class _Positions(LogitsProcessor):
    """With ``gamma=0``: no contrast, only the image positions handed to the attention edit."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores


def check_applies(vlm) -> None:
    """An error naming why PAI cannot apply to ``vlm``'s family (no image tokens in its LM, attention unreachable)."""
    require_decoder_lm(vlm, "PAI")
    if not vlm.adapter.adapter.image_in_lm or vlm.image_token_id is None:
        raise InterventionError(f"PAI amplifies attention to the image tokens in the language model's sequence, but "
                                f"{vlm.family}'s language model has none (it reads the image through cross-attention "
                                "layers), so PAI does not apply to it")
    spec = vlm.adapter.attention("lm", "attn")
    if not spec.interface or spec.keys is not None:
        raise InterventionError(f"{vlm.family}: PAI edits the LM's self-attention scores through transformers' "
                                f"attention interface, which cannot reach them: {spec.why or 'it is cross-attention'}")


@contextlib.contextmanager
def pai(vlm, alpha: float = 0.2, gamma: float = 0.1, start: int = 2, end: int | None = None,
        beta: float = 0.1) -> Iterator[PAIState]:
    """PAI during ``generate`` and first-token scores (see the module docstring); ``gamma`` is the paper's minus 1.

    An error on exit when no attention call was amplified (nothing was generated or scored inside).
    """
    if alpha < 0:
        raise InterventionError(f"PAI alpha {alpha} must be >= 0")
    if gamma < 0:
        raise InterventionError(f"PAI gamma {gamma} must be >= 0 (it is the paper's gamma minus 1; 0: no contrast)")
    if not 0 < beta <= 1:
        raise InterventionError(f"PAI beta {beta} must lie in (0, 1]")
    check_applies(vlm)
    have = vlm.adapter.layers_with("lm", "attn")
    end = len(have) if end is None else end
    layers = [layer for layer in have if start <= layer < end]
    if start < 0 or not layers:
        raise InterventionError(f"PAI edits LM layers from start={start} to end={end} (exclusive), which hold no "
                                f"attention: the {vlm.family} LM has layers 0..{len(have) - 1}; choose start and end "
                                "inside them (the paper's start 2 assumes a deeper LM)")
    state = PAIState(float(alpha), float(gamma), float(beta), layers)
    modules = [vlm.model.get_submodule(vlm.adapter.attention_path("lm", "attn", layer)) for layer in layers]
    edit = ImageAttention(modules, state)
    model = text_model(vlm) if gamma > 0 else None

    def make(model_vlm, inputs: dict) -> LogitsProcessor:
        edit.use(inputs, model_vlm.image_token_id)
        return TextContrast(model_vlm, inputs, edit, model) if model is not None else _Positions()

    failed = False
    vlm.logits_processors.append(make)
    try:
        with compat.attention_edits(vlm.model, [edit]):
            yield state
    except HookNeverFiredError as err:
        failed = True
        raise InterventionError("PAI never amplified an attention call: nothing was generated or scored inside") \
            from err
    except BaseException:
        failed = True
        raise
    finally:
        vlm.logits_processors.remove(make)
        if not failed and state.boosted == 0:
            raise InterventionError("PAI never amplified an attention call: nothing was generated or scored inside")
