"""The adapter: a table from sites to module paths, plus the few facts a family needs.

An :class:`Adapter` is data. :class:`BoundAdapter` is an adapter checked against one model
instance (every path resolves), which turns a :class:`~vlm_interp.sites.Site` into a
:class:`~vlm_interp.hooks.Hook`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Callable, Literal

import torch
from torch import nn

from .. import compat
from ..errors import AdapterValidationError, ModuleNotFoundInModelError, SiteError
from ..hooks import EditFn, Hook, HookKind, primary_tensor, resolve_module
from ..sites import HEAD_COMPONENTS, Site, parse_site

Slot = tuple[str, HookKind]  # (path relative to the layer, "" for the layer itself; hook kind)


@dataclass(frozen=True)
class NoisePlace:
    """Where noise corruptions add their noise in one family: module path and hook kind, the tower whose positions
    index it.

    ``index="group"``: dimension 1 of the tensor enumerates the tower's ``image`` group in
    order (projector rows); ``index="position"``: it is the tower's sequence position.
    ``hidden`` is the config attribute holding the width there. ``fold``: the module's batch axis
    holds each example's tiles in turn, seen as one sequence per example (``Hook.fold``).
    """

    module: str
    kind: HookKind
    tower: str
    index: Literal["group", "position"]
    hidden: str
    why: str = ""
    fold: bool = False


@dataclass(frozen=True)
class Replay:
    """How the fast tracing path replays one keyword a decoder layer was called with.

    ``kind``: ``"sequence"`` (a tensor with a positions axis, cut to the run's positions),
    ``"pair"`` (a tuple of such tensors, as rotary ``(cos, sin)``), ``"mask"`` (an attention
    mask (batch, heads, queries, keys), ``None``, or a dict of them per layer type; queries
    and keys are cut), or ``"constant"`` (a value that holds for any positions, such as a flag).
    ``seq_axis`` and ``batch_axis`` say where positions and batch rows are (``None``: no batch axis).
    """

    kind: Literal["sequence", "pair", "mask", "constant"]
    seq_axis: int = -1
    batch_axis: int | None = 0


@dataclass(frozen=True)
class Padding:
    """How batched evaluation joins one processor output over examples whose lengths differ.

    ``side``: where the fill goes; a decoder LM's prompt is padded on the left, so that every
    row's last prompt token ends the sequence and generation continues from it. ``fill``: a
    number, or processor attribute paths tried in order (``"tokenizer.pad_token_id"``), the first
    that is set. ``axis``: the axis whose length differs. ``tower``: the tower whose positions
    left padding shifts (the engine adds the fill's length to that tower's token groups).
    """

    side: Literal["left", "right"]
    fill: float | tuple[str, ...] = 0
    axis: int = 1
    tower: str | None = None


@dataclass(frozen=True)
class Attention:
    """The module that computes one attention component of a layer, and how attention edits reach it.

    ``module`` is its path relative to the layer. ``keys`` names the tower whose positions its
    keys are (cross-attention reads another tower's output; ``None``: the tower's own sequence).
    ``interface``: it computes attention through transformers' ``AttentionInterface``, so
    knockout, weight capture and score edits reach it through vlm-interp's dispatcher
    (:mod:`vlm_interp.compat`); otherwise ``why`` says what stops them.
    """

    module: str
    keys: str | None = None
    interface: bool = True
    why: str = ""


@dataclass(frozen=True)
class Tower:
    """One stack of layers: where it lives, what each component is, how many heads it has.

    ``components`` maps a component name to a slot. Head components (``head``,
    ``xattn_head``) name the *input* of the attention output projection, whose last
    dimension is the concatenation of the heads.
    """

    layers: str
    components: dict[str, Slot]
    heads: str  # dotted config attribute holding the number of query heads
    kv_heads: str | None = None  # dotted config attribute for key/value heads (grouped-query attention)
    description: str = ""
    # Modules that turn the last layer's output into logits, in order, as paths from the model root
    # (final norm, LM head). A trailing "?" marks a module a config may leave out (OPT's project_out).
    # Only answer-producing decoder towers have it; the fast tracing path runs layers then these.
    tail: tuple[str, ...] = ()
    # The keywords its layers may be called with that the fast tracing path can replay for a suffix of
    # positions (the key/value cache is found by type, not listed). Any other keyword with a value
    # makes the fast path decline. Families with other position encodings extend it (M-RoPE ids).
    replay: dict[str, Replay] = field(default_factory=dict)
    # How the tower's tensors hold one example: "repeat" (one batch entry per example, or several views whose same
    # position counts as one position, as LLaVA-NeXT's crops); "tiles" (each example's tiles in turn along the batch
    # axis, as Idefics3's and InternVL's vision towers run them): then its sites show an example's tiles as one
    # sequence, tile after tile; "packed" ((positions, width) with the positions of every image of a batch concatenated
    # on axis 0 and no batch axis, as Qwen's vision tower, whose attention keeps the images apart with cu_seqlens, so
    # rows of a batch never mix): hooks show such a tensor as (1, positions, width), batched runs as rows of equal
    # length.
    batch_layout: Literal["repeat", "tiles", "packed"] = "repeat"
    # Layers after whose output the model adds features to the residual stream outside the layer modules (Qwen3-VL's
    # DeepStack adds vision features at image positions): there TOWER.hidden.L (the layer's output) and
    # TOWER.input.L+1 (what the next layer reads) differ. The fast tracing path replays the recorded additions.
    added_after: tuple[int, ...] = ()
    # Where a component's output is scaled before the residual add and no module outputs the scaled tensor
    # (InternViT's layer scale, Mllama's tanh gates): component -> (parameter path relative to the layer,
    # "scale" (multiplied) or "tanh" (multiplied by its tanh)). The component is hooked before that scale, so
    # restoring it restores the scaled tensor too; the residual stream gains scale x component.
    residual_scale: dict[str, tuple[str, Literal["scale", "tanh"]]] = field(default_factory=dict)
    # Dotted config attribute of the final-logit soft cap the model applies after the tail (Gemma 2's and PaliGemma
    # 2's ``final_logit_softcapping``): logits become cap * tanh(logits / cap). ``None``, or an attribute that holds
    # ``None``: the tail's output is the logits. With it, the tail reproduces the model's logits exactly.
    softcap: str | None = None
    # Whether every layer's input plus its ``attn`` (or ``xattn``) and ``mlp`` outputs, each times its
    # ``residual_scale`` where it has one, is its output (pre-norm blocks, where these sites are the tensors added to
    # the residual stream); False for post-norm layers (BERT), where a LayerNorm follows each add.
    residual_sum: bool = False
    # The attention modules of a layer, by the component they produce ("attn", "xattn"); see Attention.
    attention: dict[str, Attention] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.batch_layout == "packed"


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's pieces sit, for families whose processor tiles or reshapes the image.

    ``vision``: one entry per position of the vision tower's sequence (an example's tiles in turn):
    the box (original-image pixels) its patch covers, ``"cls"`` for a class token, ``None`` for
    padding. ``lm``: one box (or ``None``) per LM image token, in order. ``pixels``: for each
    vision position with a box, its patch as (tile, row, column) in the tiles of ``pixel_values``.
    ``other``: entries like ``vision`` for more towers or token sequences, by name (Mllama: its
    global vision encoder, and ``cross``, the vision tokens the LM's cross-attention layers read).
    """

    vision: list
    lm: list
    pixels: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    other: dict[str, list] = field(default_factory=dict)


Blocks = list[tuple[int, int]]  # (first, last) positions, inclusive


def runs(flags: list[bool]) -> Blocks:
    """(first, last) of every run of consecutive true flags."""
    out: Blocks = []
    for p, flag in enumerate(flags):
        if flag and out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        elif flag:
            out.append((p, p))
    return out


@dataclass(frozen=True)
class Adapter:
    """Everything vlm-interp needs to know about one model family."""

    family: str
    model_classes: tuple[str, ...]
    towers: dict[str, Tower]
    decoder: Literal["causal", "blip"]  # how answers are scored
    default_template: str  # prompt template with {question}; contains the image placeholder if needed
    image_in_lm: bool  # image (or query) tokens are placeholder positions in the LM input_ids
    image_tokens: Callable[[Any, dict], int] | None = None  # expected image-token count
    # the box each vision-tower position covers (None: no patch, as a CLS token), from (config, processor outputs,
    # image (height, width)); None: a CLS token, then the square grid of vision_config.image_size // patch_size
    # patches over the processor's frame (CLIP, BLIP). Families whose patch count follows the image size give it.
    vision_boxes: Callable[[Any, dict, tuple[int, int]], list] | None = None
    # processors that flatten the patches into rows of pixel_values: the row holding each vision position's pixels, from
    # (config, processor outputs); None: pixel_values is an image cut into patch_size squares in row-major order
    pixel_rows: Callable[[Any, dict], list[int]] | None = None
    image_placeholder: bool = False  # the prompt holds one image placeholder, which the processor expands
    squashed_frame: bool = False  # the image processor resizes the whole image to its square frame (no crop)
    # the box each LM image token covers (None: no patch, e.g. CLS or a row's newline), from (config, image (height,
    # width), the vision tower's patch boxes in its position order, processor outputs); None where the LM's image
    # tokens cover no region
    lm_image_boxes: Callable[[Any, tuple[int, int], list, dict], list] | None = None
    logits_module: str | None = None  # module whose output carries the answer logits (BLIP)
    # the tower whose image tokens are the image's patches one for one, in row-major order (input-attribution
    # baselines report patch maps on it); None where no tower's are (LLaVA-NeXT's come from several tiled views)
    patch_map_tower: str | None = None
    vision_root: str = ""  # the vision tower's root module (what training freezes or trains as "the vision tower")
    # the projector that maps each vision-tower token, one for one, into the LM's width: the paths of its layers in
    # order (LLaVA's two-layer MLP: linear_1, then its activation, then linear_2). Empty where the LM reads the image
    # through something else (a Q-Former's queries, cross-attention), so no layer holds a per-patch activation
    patch_projector: tuple[str, ...] = ()
    # where noise corruptions go: "embeddings" (the image's representation where the answer tower reads it) and
    # "patches" (the vision tower's patch embeddings); "pixels" needs no module
    noise_places: dict[str, NoisePlace] = field(default_factory=dict)
    # the layout of a tiled image in every tower, from (config, image processor, image (height, width), processed
    # inputs); None: the vision tower sees one square grid of patches after a CLS token, and lm_image_boxes gives the LM
    image_layout: Callable[[Any, Any, tuple[int, int], dict], ImageLayout] | None = None
    # processed inputs besides input_ids and attention_mask whose dimension 1 runs along the text (Mllama's
    # cross_attention_mask): answer tokens appended to the prompt repeat their last position, as generation does
    text_aligned_inputs: tuple[str, ...] = ()
    # the vision tower's sequence starts with a class token before its patches (CLIP, ViT); SigLIP towers have none
    vision_cls: bool = True
    # the processor attribute (dotted) holding the text a prompt marks the image with (Gemma 3: its tokenizer's
    # start-of-image token, which the processor expands; the LM's image tokens are another token)
    placeholder_attr: str = "image_token"
    # processor outputs the model must not be given (PaliGemma's training labels)
    drop_inputs: tuple[str, ...] = ()
    # per-token inputs that tokens fed after the prompt (a scored answer) extend, with the value they take there
    # (PaliGemma: token_type_ids 1, the causal suffix; Gemma 3: 0, text)
    answer_token_inputs: dict[str, int] = field(default_factory=dict)
    # answers are tokenized on their own, not as a continuation of the prompt's text: the processor ends the prompt
    # with a separator of its own (PaliGemma's newline) and tokenizes a suffix separately
    answer_alone: bool = False
    # the answer tower's bidirectional attention: from (config, model inputs), the blocks of positions (first, last)
    # whose tokens attend to each other both ways (Gemma 3's image tokens, PaliGemma's whole prompt). None: causal
    # everywhere. A patch inside a block changes the block's earlier positions; the fast tracing path reads this.
    attention_blocks: Callable[[Any, dict], Blocks] | None = None
    # how batched evaluation pads each processor output (vlm_interp/batching.py); an input not listed must have the
    # same shape in every example of a batch, so examples are grouped by it
    padding: dict[str, Padding] = field(default_factory=dict)
    notes: str = ""


def _has_parameter(module: nn.Module, path: str) -> bool:
    try:
        module.get_parameter(path)
    except AttributeError:
        return False
    return True


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final-logit soft capping as Gemma-family models compute it: cap * tanh(logits / cap) (``None``: unchanged)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _config_get(config: Any, dotted: str) -> Any:
    return reduce(getattr, dotted.split("."), config)


@dataclass
class BoundAdapter:
    """An adapter validated on one model: layer counts, head counts, hooks for sites."""

    adapter: Adapter
    model: nn.Module
    n_layers: dict[str, int] = field(init=False)
    n_heads: dict[str, int] = field(init=False)
    n_kv_heads: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.n_layers, self.n_heads, self.n_kv_heads = {}, {}, {}
        problems: list[str] = []
        for name, tower in self.adapter.towers.items():
            try:
                layers = resolve_module(self.model, tower.layers)
            except ModuleNotFoundInModelError as err:
                problems.append(f"{name}.layers: {err}")
                continue
            self.n_layers[name] = len(layers)
            try:
                self.n_heads[name] = int(_config_get(self.model.config, tower.heads))
                kv = _config_get(self.model.config, tower.kv_heads) if tower.kv_heads else None
                self.n_kv_heads[name] = int(kv) if kv is not None else self.n_heads[name]
            except AttributeError as err:
                problems.append(f"{name}: head count not in config ({err})")
            for path in tower.tail:
                if not path.endswith("?"):
                    try:
                        resolve_module(self.model, path)
                    except ModuleNotFoundInModelError as err:
                        problems.append(f"{name}.tail: {err}")
            late = [j for j in tower.added_after if not 0 <= j < len(layers)]
            if late:
                problems.append(f"{name}.added_after: layers {late} do not exist")
            for component in tower.components:
                if not self.layers_with(name, component):
                    problems.append(f"{name}.{component}: no layer has {tower.components[component][0]!r}")
            for component, (param, _) in tower.residual_scale.items():
                if not any(_has_parameter(layer, param) for layer in layers):
                    problems.append(f"{name}.residual_scale.{component}: no layer has a parameter {param!r}")
            for component, attention in tower.attention.items():
                for layer in self.layers_with(name, component) if component in tower.components else [None]:
                    try:
                        if layer is None:
                            raise ModuleNotFoundInModelError(f"{component!r} is not a component of the tower")
                        resolve_module(self.model, f"{tower.layers}.{layer}.{attention.module}")
                    except ModuleNotFoundInModelError as err:
                        problems.append(f"{name}.attention[{component!r}]: {err}")
                        break
        extra = {"vision_root": self.adapter.vision_root} if self.adapter.vision_root else {}
        extra.update({f"patch_projector[{i}]": path for i, path in enumerate(self.adapter.patch_projector)})
        extra.update({f"noise_places.{k}": p.module for k, p in self.adapter.noise_places.items()})
        for what, path in extra.items():
            try:
                resolve_module(self.model, path)
            except ModuleNotFoundInModelError as err:
                problems.append(f"{what}: {err}")
        if problems:
            raise AdapterValidationError(
                f"adapter {self.adapter.family!r} does not fit {type(self.model).__name__}: " + "; ".join(problems)
            )

    # ---- structure -------------------------------------------------------------------
    def towers(self) -> list[str]:
        return list(self.adapter.towers)

    def components(self, tower: str) -> list[str]:
        return list(self._tower(tower).components)

    def _tower(self, tower: str) -> Tower:
        if tower not in self.adapter.towers:
            raise SiteError(
                f"{self.adapter.family} models have no {tower!r} tower; towers: {list(self.adapter.towers)}"
            )
        return self.adapter.towers[tower]

    def packed(self, tower: str) -> bool:
        """Whether ``tower``'s tensors are packed (no batch axis; see :class:`Tower`). A token sequence that is no
        tower (Mllama's ``cross``, the vision tokens its cross-attention reads) is not."""
        return tower in self.adapter.towers and self._tower(tower).packed

    def module_path(self, tower: str, component: str, layer: int) -> str:
        """Dotted path of the module holding ``component`` at ``layer`` (may not exist on every layer)."""
        spec = self._tower(tower)
        if component not in spec.components:
            raise SiteError(
                f"the {tower} tower of {self.adapter.family} has no component {component!r}; "
                f"it has {list(spec.components)}"
            )
        rel = spec.components[component][0]
        return f"{spec.layers}.{layer}" + (f".{rel}" if rel else "")

    def hook_point(self, tower: str, component: str, layer: int) -> tuple[str, HookKind]:
        """Module path and hook kind (output or input) of ``component`` at ``layer``."""
        return self.module_path(tower, component, layer), self._tower(tower).components[component][1]

    def layers_with(self, tower: str, component: str) -> list[int]:
        """Layers of ``tower`` on which ``component`` exists (Q-Former cross-attention skips layers)."""
        out = []
        for layer in range(self.n_layers[tower]):
            try:
                self.model.get_submodule(self.module_path(tower, component, layer))
            except AttributeError:
                continue
            out.append(layer)
        return out

    def head_dim(self, site: Site) -> int:
        module = resolve_module(self.model, self.module_path(site.tower, site.component, site.layer))
        width = getattr(module, "in_features", None)
        if width is None:
            raise SiteError(f"head site {site} sits on {type(module).__name__}, which has no in_features")
        heads = self.n_heads[site.tower]
        if width % heads:
            raise SiteError(f"{site}: width {width} is not divisible by {heads} heads")
        return width // heads

    def sites(self, tower: str, component: str) -> list[Site]:
        """All sites of one component kind in one tower (every layer, every head)."""
        layers = self.layers_with(tower, component)
        if component in HEAD_COMPONENTS:
            return [Site(tower, component, l, h) for l in layers for h in range(self.n_heads[tower])]
        return [Site(tower, component, l) for l in layers]

    def logit_softcap(self, tower: str) -> float | None:
        """The final-logit soft cap ``tower``'s logits get after its tail (``Tower.softcap``), or ``None``."""
        path = self._tower(tower).softcap
        try:
            cap = None if path is None else _config_get(self.model.config, path)
        except AttributeError:  # a config without the option (PaliGemma 1's Gemma): the model applies no cap
            return None
        return None if cap is None else float(cap)

    def tail_logits(self, tower: str, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from ``tower``'s last layer output: its tail modules, then its soft cap (as the model computes them)."""
        for module in self.tail_modules(tower):
            hidden = primary_tensor(module(hidden), type(module).__name__)
        return soft_cap(hidden, self.logit_softcap(tower))

    def attention(self, tower: str, component: str) -> Attention:
        """The attention module spec of ``component`` (``attn``, ``xattn``) in ``tower``, with an error naming what
        exists."""
        spec = self._tower(tower)
        if component not in spec.attention:
            raise SiteError(f"the {tower} tower of {self.adapter.family} has no attention component {component!r}; "
                            f"it has {sorted(spec.attention) or 'none'}")
        return spec.attention[component]

    def attention_path(self, tower: str, component: str, layer: int) -> str:
        """Dotted path of the module computing ``component`` attention at ``layer``."""
        return f"{self._tower(tower).layers}.{layer}.{self.attention(tower, component).module}"

    def tail_modules(self, tower: str) -> list[nn.Module]:
        """The modules after ``tower``'s last layer that produce logits, in order (optional ones if present)."""
        out = []
        for path in self._tower(tower).tail:
            optional = path.endswith("?")
            try:
                module = self.model.get_submodule(path.rstrip("?"))
            except AttributeError:
                if optional:
                    continue
                raise SiteError(f"tail module {path!r} of the {tower} tower is missing") from None
            out.append(module)
        return out

    # ---- sites -----------------------------------------------------------------------
    def resolve(self, site: "str | Site") -> Site:
        """Parse and check a site against this model; negative layers count from the end."""
        site = parse_site(site)
        n = self.n_layers.get(site.tower)
        self._tower(site.tower)
        layer = site.layer + n if site.layer < 0 else site.layer
        if not 0 <= layer < n:
            raise SiteError(f"site {site}: layer out of range; the {site.tower} tower has layers 0..{n - 1}")
        if site.head is not None and not 0 <= site.head < self.n_heads[site.tower]:
            raise SiteError(
                f"site {site}: head out of range; the {site.tower} tower has heads 0..{self.n_heads[site.tower] - 1}"
            )
        resolved = Site(site.tower, site.component, layer, site.head)
        path = self.module_path(resolved.tower, resolved.component, layer)
        try:
            self.model.get_submodule(path)
        except AttributeError:
            raise SiteError(
                f"site {resolved} does not exist: layer {layer} of the {site.tower} tower has no "
                f"{site.component} (layers that have it: {self.layers_with(site.tower, site.component)})"
            ) from None
        return resolved

    def hook(
        self,
        site: "str | Site",
        fn: EditFn | None = None,
        *,
        capture: bool = False,
        grad: bool = False,
        allow_unused: bool = False,
    ) -> Hook:
        """A hook at ``site``; for head sites ``fn`` and captures see only that head's channels."""
        site = self.resolve(site)
        rel, kind = self._tower(site.tower).components[site.component]
        channels = None
        if site.head is not None:
            d = self.head_dim(site)
            channels = slice(site.head * d, (site.head + 1) * d)
        return Hook(
            self.module_path(site.tower, site.component, site.layer),
            fn=fn,
            kind=kind,
            capture=capture,
            grad=grad,
            allow_unused=allow_unused,
            name=site.name,
            channels=channels,
            fold=self.folds(site.tower),
            packed=self._tower(site.tower).packed,
            input_keywords=compat.LAYER_INPUT_KEYWORDS,
        )

    def folds(self, tower: str) -> bool:
        """Whether ``tower``'s hooks fold each example's tiles into one sequence (``Tower.batch_layout``)."""
        return self._tower(tower).batch_layout == "tiles"

    def describe(self) -> str:
        """A short human-readable summary of towers, layers and heads."""
        lines = [f"{self.adapter.family} ({type(self.model).__name__})"]
        for name, tower in self.adapter.towers.items():
            comps = ", ".join(
                f"{c}[{len(self.layers_with(name, c))}]" for c in tower.components
            )
            lines.append(
                f"  {name:8s} {self.n_layers[name]} layers, {self.n_heads[name]} heads"
                + (f" ({self.n_kv_heads[name]} kv)" if self.n_kv_heads[name] != self.n_heads[name] else "")
                + f": {comps}"
                + ("; packed positions, no batch axis" if tower.packed else "")
                + (f"; features added to the residual stream after layers {list(tower.added_after)} (so "
                   "hidden.L and input.L+1 differ there)" if tower.added_after else "")
            )
        return "\n".join(lines)
