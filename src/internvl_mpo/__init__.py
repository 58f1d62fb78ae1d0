"""internvl-mpo: InternVL2.5-MPO in plain PyTorch."""

__version__ = "0.1.0"

from .config import LLMConfig, ModelConfig, VisionConfig

__all__ = ["InternVL", "ModelConfig", "VisionConfig", "LLMConfig"]


def __getattr__(name: str):
    # The model (and torch) load on first use, so the command line starts, and answers --help or
    # Ctrl-C, before torch is imported.
    if name == "InternVL":
        from .model import InternVL

        return InternVL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
