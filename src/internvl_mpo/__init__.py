"""internvl-mpo: InternVL2.5-MPO in plain PyTorch."""

__version__ = "0.1.0"

from .config import LLMConfig, ModelConfig, VisionConfig
from .model import InternVL

__all__ = ["InternVL", "ModelConfig", "VisionConfig", "LLMConfig"]
