"""Pixel shuffle (v2, ratio 0.5) and the `mlp1` projector from ViT features to LLM embeddings.

Mirrors `InternVLChatModel.pixel_shuffle` and `mlp1` in OpenGVLab/InternVL
`modeling_internvl_chat.py`. Quirks kept for parity:
- the reshape/transpose order of the official pixel shuffle, including the second transpose of v2
  (v1 yields a transposed grid and is refused by the config);
- the CLS token is dropped before the shuffle (done by the caller, `model.py`);
- the projector LayerNorm uses PyTorch's default eps 1e-5 while the ViT norms use 1e-6;
- `mlp1` is an `nn.Sequential` whose index 2 is the parameter-free GELU, so its keys are 0, 1 and 3.
"""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """(N, h, w, C) -> (N, h/2 * w/2, 4C).

    Output token (i, j) in row-major order holds the channels of the 2x2 block
    [x[2i, 2j] | x[2i, 2j+1] | x[2i+1, 2j] | x[2i+1, 2j+1]], the same memory order the official
    view/permute sequence produces.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)  # (N, i, row-in-block, j, col-in-block, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, i, j, row-in-block, col-in-block, C)
    return x.reshape(n, (h // 2) * (w // 2), 4 * c)


def make_projector(vit_hidden: int, llm_hidden: int, ratio: float = 0.5) -> nn.Sequential:
    """The official `mlp1`: LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)."""
    in_features = vit_hidden * int(1 / ratio) ** 2
    return nn.Sequential(
        nn.LayerNorm(in_features),
        nn.Linear(in_features, llm_hidden),
        nn.GELU(),
        nn.Linear(llm_hidden, llm_hidden),
    )
