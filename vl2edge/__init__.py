"""vl2edge: DeepSeek-VL2 on hardware people own.

The core (config, processor, weights, synthetic checkpoints) imports no torch; torch-backed names are
imported on first use.
"""

from .config import VL2Config
from .errors import CheckpointError, ConfigError, InputError, VL2Error
from .processor import Processor, ProcessorOutput

__version__ = "0.1.0"
__all__ = ["VL2Config", "Processor", "ProcessorOutput", "VL2Error", "ConfigError", "CheckpointError", "InputError"]
