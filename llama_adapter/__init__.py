"""LLaMA-Adapter V2: a parameter-efficient visual instruction model.

>>> import llama_adapter
>>> pipe = llama_adapter.load()                       # the shipped demo model, offline
>>> pipe.generate("What shape is this?", image="assets/examples/circle.png")
>>> tiny = llama_adapter.load("tiny")                 # random weights, for tests and quick tries

Models are built in :mod:`llama_adapter.build`; :mod:`llama_adapter.pipeline` serves them.
"""

from .build import load
from .config import AdapterConfig, LlamaConfig
from .engine import Engine, EngineConfig
from .errors import CheckpointError, EngineBusy, InputError, LlamaAdapterError
from .explain import Trace, explain
from .generate import Sampling
from .model import LlamaAdapter, count_parameters, parameter_groups, set_trainable, trainable_parameters
from .pipeline import ChatSession, Pipeline
from .prompts import format_alpaca

__all__ = [
    "AdapterConfig",
    "ChatSession",
    "CheckpointError",
    "Engine",
    "EngineBusy",
    "EngineConfig",
    "InputError",
    "LlamaAdapter",
    "LlamaAdapterError",
    "LlamaConfig",
    "Pipeline",
    "Sampling",
    "Trace",
    "count_parameters",
    "explain",
    "format_alpaca",
    "load",
    "parameter_groups",
    "set_trainable",
    "trainable_parameters",
]
