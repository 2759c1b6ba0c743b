"""vlm-interp: causal interpretability for vision-language models.

Trace where a VLM keeps and moves information about an object, intervene at inference time,
and compare hallucination across models and interventions.
"""

from . import corruptions, hooks, interventions, tracing
from .adapters import supported
from .errors import VLMInterpError
from .example import Example
from .hooks import AttachedHooks, Hook
from . import loading as _loading
from .hallucination import sets as _sets
from .loading import load, wrap
from .model import VLM, AnswerScore
from .sites import Site, parse_site
from .corruptions import noise
from .tracing import Trace, trace
from .tracing.plot import plot_trace

__version__ = "0.1.0"


# The package root is a facade above every layer. The zoo (organisms, shapes world, studies) sits on top
# of the library and is never imported by it; the root connects the two lazily: ``load("zoo:NAME")``
# through a registered source, the built-in question sets through a registered writer, and ``vi.zoo``
# on first use.
def _organism_folder(name: str):
    from .zoo import organism_path

    return organism_path(name)


def _zoo_question_set(folder, n_images):
    from .zoo.questions import pope_folder

    return pope_folder(folder, n_images)


def _zoo_amber_set(folder, n_images):
    from .zoo.amber import amber_folder

    return amber_folder(folder, n_images)


def _zoo_mme_set(folder, n_images):
    from .zoo.mme import mme_folder

    return mme_folder(folder, n_images)


_loading.register_source("zoo", _organism_folder, "the shipped model organisms")
_sets.register_question_set("zoo", _zoo_question_set)
_sets.register_question_set("zoo-amber", _zoo_amber_set)
_sets.register_question_set("zoo-mme", _zoo_mme_set)


def __getattr__(name: str):
    if name == "zoo":
        import importlib

        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "corruptions", "tracing", "interventions", "load", "wrap", "VLM", "Example", "AnswerScore", "Hook", "AttachedHooks", "hooks", "Site", "parse_site",
    "supported", "VLMInterpError", "__version__", "noise", "trace", "Trace", "plot_trace",
]
