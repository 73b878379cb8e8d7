"""vl2edge: DeepSeek-VL2 on hardware people own.

The core (config, processor, weights, synthetic checkpoints, generation) imports no torch; the
PyTorch model is imported on first use of `VL2Model` or `load`.
"""

from .config import VL2Config
from .errors import CheckpointError, ConfigError, InputError, VL2Error
from .pipeline import Pipeline, Result, load
from .processor import Processor, ProcessorOutput

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "Pipeline",
    "Processor",
    "ProcessorOutput",
    "Result",
    "VL2Config",
    "VL2Error",
    "VL2Model",
    "load",
]


def __getattr__(name):
    if name == "VL2Model":
        from .model import VL2Model

        return VL2Model
    raise AttributeError(f"module 'vl2edge' has no attribute {name!r}")
