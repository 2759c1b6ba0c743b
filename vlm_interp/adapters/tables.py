"""Shared component tables: the module layout of the layer kinds the families are built from."""

from __future__ import annotations

from ..errors import UnknownArchitectureError
from .base import Attention, NoisePlace, Padding, Replay, Slot, Tower

# Decoder-only language models, keyed by the text config's model_type.
LLAMA_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the input embeddings)
    "hidden": ("", "output"),
    "attn": ("self_attn", "output"),
    "mlp": ("mlp", "output"),
    "head": ("self_attn.o_proj", "input"),
}
OPT_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the input embeddings)
    "hidden": ("", "output"),
    "attn": ("self_attn", "output"),
    "mlp": ("fc2", "output"),
    "head": ("self_attn.out_proj", "input"),
}
# Gemma 2 and 3 norm each sublayer's output before the residual add (post_attention_layernorm,
# post_feedforward_layernorm): ``attn`` and ``mlp`` are those norms' outputs, the tensors added to the residual stream.
GEMMA2_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the input embeddings)
    "hidden": ("", "output"),
    "attn": ("post_attention_layernorm", "output"),
    "mlp": ("post_feedforward_layernorm", "output"),
    "head": ("self_attn.o_proj", "input"),
}
LLAMA_TAIL = ("norm",)
OPT_TAIL = ("decoder.final_layer_norm?", "decoder.project_out?")
# model_type -> (layers path below the LM's base model, layer table, modules after the last layer below it)
LM_LAYERS = {
    "llama": ("layers", LLAMA_LAYER, LLAMA_TAIL),
    "mistral": ("layers", LLAMA_LAYER, LLAMA_TAIL),
    "qwen2": ("layers", LLAMA_LAYER, LLAMA_TAIL),
    "gemma": ("layers", LLAMA_LAYER, LLAMA_TAIL),  # PaliGemma 1: Llama's layout (post_attention_layernorm feeds the MLP)
    "gemma2": ("layers", GEMMA2_LAYER, LLAMA_TAIL),
    "gemma3_text": ("layers", GEMMA2_LAYER, LLAMA_TAIL),
    "opt": ("decoder.layers", OPT_LAYER, OPT_TAIL),
}

# What a decoder layer of these LMs is called with, besides its input and its key/value cache.
DECODER_REPLAY: dict[str, Replay] = {
    "attention_mask": Replay("mask"),
    "position_ids": Replay("sequence", seq_axis=-1, batch_axis=0),  # (batch, positions)
    "cache_position": Replay("sequence", seq_axis=-1, batch_axis=None),  # (positions,)
    "position_embeddings": Replay("pair", seq_axis=-2, batch_axis=0),  # rotary (cos, sin), each (batch, positions, dim)
    "use_cache": Replay("constant"),
    "output_attentions": Replay("constant"),
}

# Batched evaluation of a decoder LM's prompts: left padding keeps each row's last prompt token at the end.
TOKEN_FILL = ("tokenizer.pad_token_id", "tokenizer.eos_token_id")
DECODER_PADDING: dict[str, Padding] = {
    "input_ids": Padding("left", TOKEN_FILL, tower="lm"),
    "attention_mask": Padding("left", 0),
}
# Attention modules of the layer kinds (see Attention): where knockout, weight capture and score edits act.
SELF_ATTN = {"attn": Attention("self_attn")}  # LLaMA, OPT, CLIP, BLIP-2's ViT: through the AttentionInterface
QFORMER_ATTENTION = {"attn": Attention("attention.attention"),
                     "xattn": Attention("crossattention.attention", keys="vision")}
BLIP_INLINE = ("BLIP's attention modules compute attention inline, not through transformers' AttentionInterface, "
               "so attention edits and weight capture cannot reach them")
BLIP_VISION_ATTENTION = {"attn": Attention("self_attn", interface=False, why=BLIP_INLINE)}


def blip_text_attention(keys: str, note: str = "") -> dict[str, Attention]:
    """BLIP's BERT-style layers: self-attention and cross-attention over ``keys``' output, both inline."""
    why = (note + "; " if note else "") + BLIP_INLINE
    return {"attn": Attention("attention.self", interface=False, why=why),
            "xattn": Attention("crossattention.self", keys=keys, interface=False, why=why)}


# Noise places shared by several families (see vlm_interp/corruptions/noise.py).
CLIP_PATCHES = NoisePlace("model.vision_tower.embeddings", "output", "vision", "position", "vision_config.hidden_size",
                          "CLIP patch + position embeddings (CLS first)")
SIGLIP_PATCHES = NoisePlace("model.vision_tower.embeddings", "output", "vision", "position", "vision_config.hidden_size",
                            "SigLIP patch + position embeddings (no CLS)")
BLIP_PATCHES = NoisePlace("vision_model.embeddings", "output", "vision", "position", "vision_config.hidden_size",
                          "ViT patch + position embeddings (CLS first)")
QFORMER_QUERIES = NoisePlace("language_projection", "output", "lm", "group", "text_config.hidden_size",
                             "projected Q-Former queries, scattered in order into the LM's image-token positions")

# Vision encoders.
CLIP_VISION_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the input embeddings)
    "hidden": ("", "output"),
    "attn": ("self_attn", "output"),
    "mlp": ("mlp", "output"),
    "head": ("self_attn.out_proj", "input"),
}
SIGLIP_VISION_LAYER = CLIP_VISION_LAYER  # SigLIP's encoder layers have CLIP's layout


def siglip_vision_tower(prefix: str = "model.vision_tower") -> Tower:
    """A SigLIP vision encoder (LLaVA-OneVision, Gemma 3, PaliGemma): patches only, no class token."""
    return Tower(f"{prefix}.encoder.layers", SIGLIP_VISION_LAYER, "vision_config.num_attention_heads",
                 description="SigLIP vision encoder", residual_sum=True, attention=SELF_ATTN)


BLIP_VISION_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the input embeddings)
    "hidden": ("", "output"),
    "attn": ("self_attn", "output"),
    "mlp": ("mlp", "output"),
    "head": ("self_attn.projection", "input"),
}

# BERT-style layers with cross-attention (BLIP's question encoder and answer decoder).
# Attention and MLP outputs are taken before the residual add and LayerNorm (the dense output).
BERT_XATTN_LAYER: dict[str, Slot] = {
    "input": ("", "input"),  # the residual stream entering the layer (layer 0: the input embeddings)
    "hidden": ("", "output"),
    "attn": ("attention.output.dense", "output"),
    "xattn": ("crossattention.output.dense", "output"),
    "mlp": ("output.dense", "output"),
    "head": ("attention.output.dense", "input"),
    "xattn_head": ("crossattention.output.dense", "input"),
}
# Q-Former layers: the learned queries go through their own feed-forward (``output_query``).
QFORMER_LAYER: dict[str, Slot] = {**BERT_XATTN_LAYER, "mlp": ("output_query.dense", "output")}


def lm_tower(config, base_path: str, lm_head: str, heads_prefix: str = "text_config",
             softcap: str | None = None) -> Tower:
    """The ``lm`` tower for a decoder LM whose base model (with ``layers``) sits at ``base_path``.

    ``lm_head`` is the path of the output projection to the vocabulary; with the base model's
    final norm it forms the tower's ``tail``. ``softcap``: the config attribute of a final-logit
    soft cap the model applies after it (see :attr:`Tower.softcap`).
    """
    text = getattr(config, heads_prefix)
    kind = getattr(text, "model_type", None)
    if kind not in LM_LAYERS:
        raise UnknownArchitectureError(
            f"language model type {kind!r} has no layer table; supported: {sorted(LM_LAYERS)}. "
            "Add its layout to LM_LAYERS in vlm_interp/adapters/tables.py."
        )
    layers, table, tail = LM_LAYERS[kind]
    kv = f"{heads_prefix}.num_key_value_heads" if hasattr(text, "num_key_value_heads") else None
    return Tower(
        layers=f"{base_path}.{layers}",
        components=table,
        heads=f"{heads_prefix}.num_attention_heads",
        kv_heads=kv,
        description=f"{kind} decoder",
        tail=tuple(f"{base_path}.{t}" for t in tail) + (lm_head,),
        replay=DECODER_REPLAY,
        softcap=softcap,
        residual_sum=True,
        attention=SELF_ATTN,
    )
