"""Sites: the names of places inside a VLM, such as ``lm.attn.12`` or ``qformer.xattn.3.head.7``.

Grammar (towers: vision, vision_global (Mllama's global encoder), qformer, text, lm)::

    TOWER.hidden.L | TOWER.attn.L | TOWER.mlp.L | TOWER.xattn.L   whole component at layer L
    TOWER.input.L                                                   the residual stream entering layer L
                                                                    (TOWER.input.0: the tower's input embeddings)
    TOWER.head.L.H                                                  self-attention head H at layer L
    TOWER.xattn.L.head.H                                            cross-attention head H at layer L

Layers may be negative (``lm.hidden.-1`` is the last layer); the adapter normalises them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SiteError

TOWERS = ("vision", "vision_global", "qformer", "text", "lm")
COMPONENTS = ("input", "hidden", "attn", "mlp", "xattn", "head", "xattn_head")
HEAD_COMPONENTS = {"head": "attn", "xattn_head": "xattn"}  # head component -> the attention it splits


@dataclass(frozen=True, order=True)
class Site:
    """One place in the model: tower, component, layer and (for head components) head."""

    tower: str
    component: str
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise SiteError(f"unknown tower {self.tower!r} in site; towers are {TOWERS}")
        if self.component not in COMPONENTS:
            raise SiteError(f"unknown component {self.component!r}; components are {COMPONENTS}")
        if (self.head is None) == (self.component in HEAD_COMPONENTS):
            raise SiteError(
                f"component {self.component!r} "
                + ("needs a head index" if self.head is None else "takes no head index")
            )

    @property
    def name(self) -> str:
        if self.component == "head":
            return f"{self.tower}.head.{self.layer}.{self.head}"
        if self.component == "xattn_head":
            return f"{self.tower}.xattn.{self.layer}.head.{self.head}"
        return f"{self.tower}.{self.component}.{self.layer}"

    def __str__(self) -> str:
        return self.name


def _int(text: str, what: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SiteError(f"site {name!r}: {what} must be an integer, got {text!r}") from None


def parse_site(name: "str | Site") -> Site:
    """Parse a site name (see module docstring); a :class:`Site` passes through."""
    if isinstance(name, Site):
        return name
    parts = name.strip().split(".")
    usage = "expected TOWER.COMPONENT.LAYER, TOWER.head.LAYER.HEAD or TOWER.xattn.LAYER.head.HEAD"
    if len(parts) < 3:
        raise SiteError(f"site {name!r} is too short: {usage}")
    tower, component = parts[0], parts[1]
    if tower not in TOWERS:
        raise SiteError(f"site {name!r}: unknown tower {tower!r}; towers are {TOWERS}")
    if component == "head" and len(parts) == 4:
        return Site(tower, "head", _int(parts[2], "layer", name), _int(parts[3], "head", name))
    if component == "xattn" and len(parts) == 5 and parts[3] == "head":
        return Site(tower, "xattn_head", _int(parts[2], "layer", name), _int(parts[4], "head", name))
    if component in ("input", "hidden", "attn", "mlp", "xattn") and len(parts) == 3:
        return Site(tower, component, _int(parts[2], "layer", name))
    raise SiteError(f"site {name!r} is malformed: {usage}")
