"""internvl-mpo: InternVL2.5-MPO in plain PyTorch."""

__version__ = "0.1.0"
