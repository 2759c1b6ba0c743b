"""vlm-interp: causal interpretability for vision-language models.

Trace where a VLM keeps and moves information about an object, intervene at inference time,
and compare hallucination across models and interventions.
"""

from . import corruptions, hooks, interventions, tracing
from .adapters import supported
from .errors import VLMInterpError
from .example import Example
from .hooks import Hook, Hooks
from .loading import load, wrap
from .model import VLM, AnswerScore
from .sites import Site, parse_site

__version__ = "0.1.0"

__all__ = [
    "corruptions", "tracing", "interventions", "load", "wrap", "VLM", "Example", "AnswerScore", "Hook", "Hooks", "hooks", "Site", "parse_site",
    "supported", "VLMInterpError", "__version__",
]
