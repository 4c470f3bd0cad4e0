"""Errors a user can act on. Each message says what is wrong and what to do."""


class LlamaAdapterError(Exception):
    """Base class of this library's errors."""


class InputError(LlamaAdapterError, ValueError):
    """A bad image, prompt or sampling parameter."""


class CheckpointError(LlamaAdapterError):
    """Weights that are missing, unreadable, of an unknown format, or that do not fit the model."""


class GenerationError(LlamaAdapterError):
    """The model failed part-way through an answer (out of memory, a device error, …)."""


class EngineBusy(LlamaAdapterError):
    """Too many requests are already waiting for the model; try again in a moment."""
