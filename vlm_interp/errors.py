"""Exception types: every failure names what was wrong and how to fix it."""


class VLMInterpError(Exception):
    """Base class of all errors raised on purpose by vlm-interp."""


class HookNeverFiredError(VLMInterpError):
    """A hook was attached but the module it sits on never ran inside the context."""


class ModuleNotFoundInModelError(VLMInterpError, LookupError):
    """A module path does not resolve on the model."""


class UnsupportedOutputError(VLMInterpError, TypeError):
    """A hooked module returned or received something the hook engine cannot edit."""


class SiteError(VLMInterpError, ValueError):
    """A site name is malformed or names something this model does not have."""


class UnknownArchitectureError(VLMInterpError, ValueError):
    """No adapter exists for this model class."""


class AdapterValidationError(VLMInterpError):
    """An adapter's module paths do not resolve on the model it was attached to."""


class PromptError(VLMInterpError, ValueError):
    """The prompt template and the processor disagree (missing or extra image placeholder)."""


class ImageTokenMismatchError(VLMInterpError, ValueError):
    """The number of image tokens in the prompt differs from what the vision tower produces."""


class AnswerEncodingError(VLMInterpError, ValueError):
    """An answer cannot be encoded by the tokenizer (empty, unknown tokens, misaligned)."""


class CorruptionError(VLMInterpError, ValueError):
    """A corruption cannot be built or applied as requested (it would shift tokens, is a no-op, is malformed, or an
    in-model edit does not fit the tensor it meets)."""


class ResumeError(VLMInterpError, ValueError):
    """A folder a run would resume from holds results made with other settings than the run's own."""


class LoadError(VLMInterpError, ValueError):
    """A checkpoint cannot be loaded as requested: options that contradict each other, an unknown option, or a
    quantization this machine cannot run."""
