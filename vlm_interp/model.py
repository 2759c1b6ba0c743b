"""The VLM wrapper: a model, its processor and its adapter, with prepare, scoring and generate."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import compat, geometry, prompts
from .adapters import BoundAdapter, adapter_for
from .adapters.base import ImageLayout
from .adapters.decoders import DECODERS
from .edits import applied
from .errors import AnswerEncodingError, ImageTokenMismatchError, PromptError
from .example import Example
from .hooks import AttachedHooks, Hook


@dataclass
class AnswerScore:
    """Scores of one answer: first token and whole answer, probability and log-probability."""

    answer: str
    token_ids: list[int]
    first_logprob: float
    first_prob: float
    logprob: float
    prob: float


class VLM:
    """A vision-language model ready for interpretability work.

    Build it with :func:`vlm_interp.load` or :func:`vlm_interp.wrap`. ``template`` is the
    prompt around the question (``{question}``, plus the processor's image placeholder for
    families that need one); ``None`` uses the processor's chat template when it has one,
    else the family default. ``answer_prefix`` separates the prompt from the answer text
    when answers are scored by a decoder LM.
    """

    def __init__(self, model: nn.Module, processor: Any, adapter: BoundAdapter | None = None,
                 template: str | None = None, answer_prefix: str = " ", name: str | None = None):
        self.model = model
        self.processor = processor
        self.adapter = adapter or adapter_for(model)
        self.template = template
        self.answer_prefix = answer_prefix
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.family = self.adapter.adapter.family
        # factories (vlm, model inputs) -> transformers LogitsProcessor, applied by generate() at every step and
        # by first_token_logits(); contrastive decoders (VCD) add theirs here for the time they are active
        self.logits_processors: list = []

    def __repr__(self) -> str:
        return f"VLM({self.name!r}, family={self.family!r})"

    # ---- basic facts ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def decoder(self):
        """How this family's answers are produced and read (:mod:`vlm_interp.adapters.decoders`)."""
        return DECODERS[self.adapter.adapter.decoder]

    @property
    def device(self) -> torch.device:
        """Where inputs go: a placed model's first accelerator in its device map (accelerate's main device; CPU when it
        has none), else where its parameters are. A placed model is never moved (see :func:`vlm_interp.load`)."""
        placed = compat.device_map(self.model)
        if placed is None:
            return next(self.model.parameters()).device
        devices = [d for d in placed.values() if d not in ("cpu", "disk")]
        return torch.device(devices[0] if devices else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the model's weights (the first floating parameter's)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @property
    def image_token(self) -> str | None:
        """The text a prompt marks the image with (the adapter's ``placeholder_attr`` of the processor)."""
        tok = self.processor
        for name in self.adapter.adapter.placeholder_attr.split("."):
            tok = getattr(tok, name, None)
        return getattr(tok, "content", tok)

    @property
    def image_token_id(self) -> int | None:
        config = self.model.config
        return getattr(config, "image_token_id", None) if self.adapter.adapter.image_in_lm else None

    def hook(self, site, fn=None, **kw) -> Hook:
        """A :class:`~vlm_interp.hooks.Hook` at a site name such as ``lm.attn.1`` or ``lm.head.1.3``."""
        return self.adapter.hook(site, fn, **kw)

    def attach(self, hooks) -> AttachedHooks:
        """Context manager attaching ``hooks`` to this model (see :mod:`vlm_interp.hooks`)."""
        return AttachedHooks(self.model, hooks)

    # ---- prompts ----------------------------------------------------------------------
    def format_prompt(self, question: str, template: str | None = None) -> str:
        """The full prompt text for ``question``, checked against the family's placeholder rule."""
        template = template or self.template
        image_token = self.image_token or "<image>"
        needs_placeholder = self.adapter.adapter.image_placeholder
        if template is None and getattr(self.processor, "chat_template", None) and needs_placeholder:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        template = template or self.adapter.adapter.default_template
        if "{question}" not in template:
            raise PromptError(f"prompt template {template!r} has no '{{question}}' field")
        count = template.count(image_token)
        if needs_placeholder and count != 1:
            raise PromptError(
                f"prompt template {template!r} contains the image placeholder {image_token!r} {count} times; "
                f"{type(self.processor).__name__} replaces exactly one placeholder per image with the image "
                f"tokens, so the template needs it once (for example 'USER: {image_token}\\n{{question}} ASSISTANT:')"
            )
        if not needs_placeholder and count:
            raise PromptError(
                f"prompt template {template!r} contains {image_token!r}, but {type(self.processor).__name__} "
                "adds the image tokens itself; remove the placeholder"
            )
        if image_token in question:
            raise PromptError(f"the question contains the image placeholder {image_token!r}; pass plain text")
        return template.format(question=question)

    # ---- prepare ----------------------------------------------------------------------
    def prepare(self, image: Any, question: str, answer: str | None = None, *,
                template: str | None = None, region: Any = None) -> Example:
        """Process one image and question into an :class:`Example` with its token groups.

        ``region`` (a box ``(x0, y0, x1, y1)`` or a boolean mask in original-image pixels)
        adds the ``object`` group: the visual tokens whose patches overlap it.
        """
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image or a uint8 HxWx3 array, got {type(image).__name__}")
        image = image.convert("RGB")
        prompt = self.format_prompt(question, template)
        inputs = dict(self.processor(images=image, text=prompt, return_tensors="pt"))
        for key in self.adapter.adapter.drop_inputs:
            inputs.pop(key, None)
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        example = Example(inputs=inputs, prompt=prompt, question=question, image=image,
                          image_hw=(image.height, image.width))
        self._check_image_tokens(example)
        self._fill_groups(example)
        if answer is not None:
            example.answer = answer
            example.answer_ids = self.encode_answer(example, answer)
        if region is not None:
            self.add_object_group(example, region)
        return example

    def _check_image_tokens(self, example: Example) -> None:
        spec = self.adapter.adapter
        if spec.image_tokens is None:
            return
        ids = example.inputs["input_ids"][0]
        token = getattr(self.model.config, "image_token_id", None)
        found = int((ids == token).sum())
        expected = spec.image_tokens(self.model.config, example.inputs)
        if found != expected:
            proc = self.processor
            detail = {k: getattr(proc, k) for k in ("patch_size", "vision_feature_select_strategy",
                                                     "num_query_tokens", "num_additional_image_tokens",
                                                     "num_image_tokens", "image_seq_length")
                      if hasattr(proc, k)}
            raise ImageTokenMismatchError(
                f"the prompt holds {found} image tokens (id {token}) but the model turns this "
                f"image into {expected} visual features. The processor and the model config disagree "
                f"(processor settings: {detail}; image size {example.image_hw}); load both from the same "
                "checkpoint or fix the processor's settings."
            )

    def _fill_groups(self, ex: Example) -> None:
        layout = self.image_layout(ex)
        frame: list = []
        if layout is not None:
            for key, entries in {"vision": layout.vision, **layout.other}.items():
                ex.groups[key] = {"image": [p for p, b in enumerate(entries) if b not in (None, "cls")],
                                  "cls": [p for p, b in enumerate(entries) if b == "cls"]}
                ex.boxes[key] = {p: b for p, b in enumerate(entries) if b not in (None, "cls")}
        else:
            frame = self._vision_boxes(ex)
            ex.groups["vision"] = {"image": [p for p, b in enumerate(frame) if b is not None]}
            cls = [p for p, b in enumerate(frame) if b is None]
            if cls:
                ex.groups["vision"]["cls"] = cls
            ex.boxes["vision"] = {p: b for p, b in enumerate(frame) if b is not None}
        if not self.decoder.continues_prompt:  # the prompt is on an encoder tower; the answer decoder starts anew
            ids = ex.inputs["input_ids"][0].tolist()
            spans = prompts.text_alignment(self.tokenizer, ex.prompt, ids, None)
            ex.groups[self.decoder.prompt_tower] = {
                "question": prompts.question_positions(spans, ex.prompt, ex.question),
                "text": list(range(len(ids))),
                "last": [len(ids) - 1],
            }
            ex.groups["lm"], ex.tokens = self.decoder.start_groups(self.model, self.tokenizer)
            return
        ids = ex.inputs["input_ids"][0].tolist()
        image_id = self.image_token_id
        spans = prompts.text_alignment(self.tokenizer, ex.prompt, ids, image_id)
        image_pos = [p for p, t in enumerate(ids) if t == image_id]
        ex.groups["lm"] = {
            "image": image_pos,
            "question": prompts.question_positions(spans, ex.prompt, ex.question),
            "text": [p for p in range(len(ids)) if p not in set(image_pos)],
            "last": [len(ids) - 1],
        }
        if not self.adapter.adapter.image_in_lm:  # the image reaches the LM otherwise (Mllama's cross-attention)
            del ex.groups["lm"]["image"]
        ex.tokens = self.tokenizer.convert_ids_to_tokens(ids)
        ex.boxes["lm"] = self._lm_image_boxes(ex, image_pos, layout.lm if layout else None,
                                              [b for b in frame if b is not None])
        if "qformer" in self.adapter.n_layers:
            n_query = self.model.config.num_query_tokens
            groups = {"image": list(range(n_query))}
            if "qformer_input_ids" in ex.inputs:
                qids = ex.inputs["qformer_input_ids"][0].tolist()
                qspans = prompts.text_alignment(self.processor.qformer_tokenizer, ex.prompt, qids, None)
                groups["question"] = [n_query + p for p in prompts.question_positions(qspans, ex.prompt, ex.question)]
                groups["text"] = [n_query + p for p in range(len(qids))]
            ex.groups["qformer"] = groups

    def image_layout(self, ex: Example) -> ImageLayout | None:
        """Where ``ex``'s tiled image sits in each tower (``Adapter.image_layout``); ``None`` for untiled families."""
        spec = self.adapter.adapter
        if spec.image_layout is None or ex.image_hw is None:
            return None
        return spec.image_layout(self.model.config, self.processor.image_processor, ex.image_hw, ex.inputs)

    def _vision_boxes(self, ex: Example) -> list:
        """The box of every vision-tower position (None: no patch, a class token), from the adapter or the default:
        a class token where the tower has one, then the square grid of patches over the processor's frame."""
        spec = self.adapter.adapter
        if spec.vision_boxes is not None:
            return list(spec.vision_boxes(self.model.config, ex.inputs, ex.image_hw))
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        cls = [None] if spec.vision_cls else []
        return cls + geometry.frame_cells(self.processor.image_processor, ex.image_hw, (side, side),
                                          squash=spec.squashed_frame)

    def _lm_image_boxes(self, ex: Example, image_pos: list[int], boxes: list | None, frame: list) -> dict:
        """Boxes for the LM's image tokens, from the adapter's layout (Q-Former queries have none)."""
        layout = self.adapter.adapter.lm_image_boxes
        if boxes is None and layout is None:
            return {}
        if boxes is None:
            boxes = layout(self.model.config, ex.image_hw, frame, ex.inputs)
        if len(boxes) != len(image_pos):
            raise ImageTokenMismatchError(
                f"{len(image_pos)} image tokens but the {self.family} layout describes {len(boxes)}"
            )
        return {p: b for p, b in zip(image_pos, boxes) if b is not None}

    def add_object_group(self, ex: Example, region: Any, name: str = "object") -> list[int]:
        """Add the group of visual tokens overlapping ``region`` in every tower that has boxes."""
        mask = geometry.region_mask(region, ex.image_hw)
        if not mask.any():
            raise ValueError("the region selects no pixel of the image")
        for tower, boxes in ex.boxes.items():
            if boxes:
                ex.groups[tower][name] = geometry.overlapping(boxes, mask)
                if not ex.groups[tower][name]:
                    warnings.warn(f"the region lies outside what the {tower} tower sees (the image processor "
                                  f"crops it away); the {name!r} group of that tower is empty", stacklevel=2)
        return ex.groups.get("lm", {}).get(name, [])

    def add_fcct_groups(self, ex: Example, word: str) -> dict[str, list[int]]:
        """FCCT's seven LM token groups, which partition the LM sequence.

        The groups are ``early_visual``, ``object_visual`` and ``late_visual``: image tokens before,
        on and after the ``object`` group (which needs a region). Then ``early_text``,
        ``object_text`` and ``late_text``: non-image tokens before, on and after ``word`` in the
        question (its last occurrence), without the final token. Last comes ``last``.
        """
        if not ex.boxes.get("lm"):
            raise ValueError(f"FCCT groups need an LM whose input holds the image patches ({self.family} "
                             "models feed the LM Q-Former queries or use a separate answer decoder)")
        lm = ex.groups["lm"]
        if not lm.get("object"):
            raise ValueError("FCCT groups need the object's visual tokens: prepare(..., region=...) first")
        ids = ex.inputs["input_ids"][0].tolist()
        spans = prompts.text_alignment(self.tokenizer, ex.prompt, ids, self.image_token_id)
        q_start = ex.prompt.rfind(ex.question)
        at = ex.question.rfind(word)
        if not word or at < 0:
            raise ValueError(f"the word {word!r} does not occur in the question {ex.question!r}")
        start, end = q_start + at, q_start + at + len(word)
        word_pos = sorted(p for p, (a, b) in spans.items() if b > a and a < end and b > start)
        last = lm["last"][0]
        objects, image = set(lm["object"]), lm["image"]
        first_object = min(objects)
        text = [p for p in lm["text"] if p != last]
        groups = {
            "early_visual": [p for p in image if p < first_object and p not in objects],
            "object_visual": sorted(objects),
            "late_visual": [p for p in image if p > first_object and p not in objects],
            "early_text": [p for p in text if p < word_pos[0]],
            "object_text": word_pos,
            "late_text": [p for p in text if p > word_pos[-1]],
            "last": [last],
        }
        lm.update(groups)
        return groups

    # ---- answers ----------------------------------------------------------------------
    def encode_answer(self, ex: Example, answer: str) -> list[int]:
        """Token ids of ``answer`` as the model would produce them after this prompt."""
        if not answer or not answer.strip():
            raise AnswerEncodingError("the answer is empty; give the text the model should produce")
        tok = self.tokenizer
        ids = self.decoder.answer_ids(tok, ex.prompt, self.answer_prefix, answer, self.adapter.adapter.answer_alone)
        if not ids:
            raise AnswerEncodingError(f"answer {answer!r} encodes to no tokens")
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            pieces = tok.convert_ids_to_tokens(ids)
            raise AnswerEncodingError(
                f"answer {answer!r} contains text the tokenizer cannot encode (it maps to {tok.unk_token!r}: "
                f"{pieces}); use words in the model's vocabulary"
            )
        return ids

    def answer_inputs(self, ex: Example, answer_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs that also feed the answer (all but its last token) for whole-answer scoring."""
        inputs = dict(ex.inputs)
        extra = torch.tensor([(answer_ids or [])[:-1]], dtype=torch.long, device=self.device)
        for key in self.adapter.adapter.text_aligned_inputs:
            if key in inputs and extra.shape[1]:
                last = inputs[key][:, -1:]
                inputs[key] = torch.cat([inputs[key], last.expand(-1, extra.shape[1], *last.shape[2:])], dim=1)
        return self.decoder.with_answer(self.model, inputs, extra, self.adapter.adapter.answer_token_inputs)

    def answer_start(self, ex: Example) -> int:
        """Position of the logits that predict the first answer token."""
        return ex.groups["lm"]["last"][0]

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (batch, positions, vocab) of the tower that produces the answer."""
        return self.decoder.logits(self.model, inputs, self.adapter.adapter.logits_module)

    def score(self, ex: Example, answer: str | None = None) -> AnswerScore:
        """Probability and log-probability of ``answer`` (default: the example's answer)."""
        if answer is None:
            if ex.answer_ids is None:
                raise AnswerEncodingError("the example has no answer; pass answer= or prepare(..., answer=...)")
            answer, ids = ex.answer, ex.answer_ids
        else:
            ids = self.encode_answer(ex, answer)
        if self.logits_processors:
            raise AnswerEncodingError("whole-answer scores read the model's own logits, but a logits processor "
                                      "(such as VCD) is active; it applies to generate() and first_token_logits()")
        with torch.no_grad(), applied(self, ex):
            logits = self.logits(self.answer_inputs(ex, ids))
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        start = self.answer_start(ex)
        per_token = torch.stack([logp[start + i, t] for i, t in enumerate(ids)])
        first, total = float(per_token[0]), float(per_token.sum())
        return AnswerScore(answer, ids, first, float(np.exp(first)), total, float(np.exp(total)))

    def first_token_logits(self, ex: Example) -> torch.Tensor:
        """Logits over the vocabulary for the first answer token, shape (vocab,).

        Active logits processors (:attr:`logits_processors`) apply, as at generate's first step.
        """
        with torch.no_grad(), applied(self, ex):
            processors = self.logits_processor(ex.inputs)  # before the forward: PAI's attention edit reads the inputs
            scores = self.logits(ex.inputs)[0, self.answer_start(ex)].float()
            if processors is not None:
                scores = processors(ex.inputs["input_ids"], scores[None])[0]
            return scores

    def logits_processor(self, inputs: dict[str, torch.Tensor]):
        """The active logits processors for one (possibly batched) set of model inputs, or ``None``."""
        if not self.logits_processors:
            return None
        from transformers import LogitsProcessorList

        return LogitsProcessorList([make(self, inputs) for make in self.logits_processors])

    def logit_diff(self, ex: Example, answer: str, other: str) -> float:
        """First-token logit of ``answer`` minus that of ``other`` (for example yes vs no)."""
        a, b = self.encode_answer(ex, answer)[0], self.encode_answer(ex, other)[0]
        if a == b:
            raise AnswerEncodingError(f"answers {answer!r} and {other!r} share their first token; a logit "
                                      "difference of first tokens would be zero by construction")
        logits = self.first_token_logits(ex)
        return float(logits[a] - logits[b])

    # ---- generation -------------------------------------------------------------------
    def generate(self, ex: Example, max_new_tokens: int = 20, **kw: Any) -> str:
        """Greedy (by default) generation of the answer text for one example."""
        kw.setdefault("do_sample", False)
        problem = compat.uncached_generation_problem(self.model) if kw.get("use_cache") is False else ""
        if problem:
            warnings.warn(problem, compat.KnownIssueWarning, stacklevel=2)
        with torch.no_grad(), applied(self, ex):
            processors = self.logits_processor(ex.inputs)
            if processors is not None:
                processors.extend(kw.get("logits_processor") or [])
                kw["logits_processor"] = processors
            out = self.model.generate(**ex.inputs, max_new_tokens=max_new_tokens, **kw)
        out = self.decoder.generated(out, ex.inputs)
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
