"""vl2edge: DeepSeek-VL2 on hardware people own.

The core (config, processor, weights, synthetic checkpoints, generation, the ONNX backend) imports
no torch; the PyTorch model (`vl2edge.models`) is imported on first use of `VL2Model`, `load_model`
or `load` on a torch checkpoint.
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
    "load_model",
]


def __getattr__(name):
    if name == "VL2Model":
        from .models.model import VL2Model

        return VL2Model
    if name == "load_model":
        from .models.loading import load_model

        return load_model
    raise AttributeError(f"module 'vl2edge' has no attribute {name!r}")
