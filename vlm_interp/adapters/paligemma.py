"""PaliGemma and PaliGemma 2: a SigLIP tower, a linear projector, a Gemma (1) or Gemma 2 LM as a prefix LM.

Facts this adapter gives the rest of the package:

- A prefix LM: with ``token_type_ids`` (the processor returns them; 0 for the prompt) the image
  and the prompt attend to each other both ways; tokens after them (a scored answer, generated
  text, type 1) attend causally (:func:`attention_blocks`). A patch anywhere in the prompt changes
  every prompt position, so the fast tracing path reuses no keys and values (it still starts at
  the patched layer).
- The LM's ``position_ids`` start at 1; the model passes them explicitly, and the fast path
  replays what the layers received.
- The processor returns training ``labels`` (all ignored without a suffix): dropped.
- The processor writes the image tokens, then BOS, then the prompt, then a newline: the prompt
  holds one ``<image>`` placeholder at its start, and an answer (the processor's suffix) is
  tokenized on its own after that newline.
- PaliGemma 2's Gemma 2 layers norm each sublayer's output before the residual add
  (:data:`~.tables.GEMMA2_LAYER`); PaliGemma 1's Gemma layers have Llama's layout. From transformers
  5.23 the model caps its final logits when the text config has ``final_logit_softcapping`` (Gemma 2),
  and the tail does too (:func:`vlm_interp.compat.applies_final_softcap`). Before 5.18, generation
  without the cache gave generated tokens the prefix's type; :meth:`VLM.generate` warns there.
- Text embeddings are scaled by sqrt(width) inside ``embed_tokens``; the image features are
  scattered in after that, unscaled. Noise on ``embeddings`` goes on the projector's output.
"""

from __future__ import annotations

from .. import compat
from .base import Adapter, Blocks, NoisePlace
from .tables import SIGLIP_PATCHES, lm_tower, siglip_vision_tower

MODEL_CLASSES = ("PaliGemmaForConditionalGeneration",)


def image_tokens(config, inputs) -> int:
    """One LM image token per SigLIP patch."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side * side


def lm_image_boxes(config, image_hw: tuple[int, int], frame: list, inputs: dict | None = None) -> list:
    """The patches one for one, row-major (SigLIP has no class token)."""
    return list(frame)


def attention_blocks(config, inputs) -> Blocks:
    """The prefix (``token_type_ids`` 0: the image and the prompt) attends to itself both ways; without
    ``token_type_ids`` the model is causal everywhere."""
    types = inputs.get("token_type_ids")
    if types is None:
        return []
    prefix = [p for p, t in enumerate(types[0].tolist()) if t == 0]
    return [(prefix[0], prefix[-1])] if prefix else []


def build(config) -> Adapter:
    return Adapter(
        family="paligemma",
        model_classes=MODEL_CLASSES,
        towers={"vision": siglip_vision_tower(),
                "lm": lm_tower(config, "model.language_model", "lm_head",
                               softcap="text_config.final_logit_softcapping" if compat.applies_final_softcap(
                                   MODEL_CLASSES[0]) else None)},
        decoder="causal",
        default_template="<image>answer en {question}",
        image_in_lm=True,
        image_tokens=image_tokens,
        image_placeholder=True,
        lm_image_boxes=lm_image_boxes,
        patch_map_tower="lm",
        vision_root="model.vision_tower",
        noise_places={
            "embeddings": NoisePlace("model.multi_modal_projector", "output", "lm", "group", "text_config.hidden_size",
                                     "the projected image features, scattered in order into the LM's image-token "
                                     "positions after the text embeddings' sqrt(width) scale (which they do not get)"),
            "patches": SIGLIP_PATCHES,
        },
        vision_cls=False,
        drop_inputs=("labels",),
        answer_token_inputs={"token_type_ids": 1},
        answer_alone=True,
        attention_blocks=attention_blocks,
    )
