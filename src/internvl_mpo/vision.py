"""InternViT, the vision encoder of InternVL.

Mirrors `modeling_intern_vit.py` of OpenGVLab/InternVL (`InternVisionEmbeddings`, `InternAttention`,
`InternMLP`, `InternVisionEncoderLayer`, `InternVisionModel`). Attribute names equal the official
weight keys (`embeddings.patch_embedding`, `encoder.layers.N.attn.qkv`, `ls1`, ...). Quirks kept
for parity:
- the position table is resized with bicubic interpolation in fp32 and cast back; at the native tile
  size the resize is an identity, so it is skipped there (a test proves the skip bit-exact);
- norm outputs are cast back to the residual dtype before attention / MLP;
- qk-normalisation (InternViT-6B) is an RMSNorm over all heads at once, not per head;
- `ls1` / `ls2` are the official names of the layer-scale vectors;
- there is no final norm: the output is the residual stream after the last layer.
Difference: floating-point `pixel_values` are cast to the weights' dtype and integer ones refused (the
official embeddings hand any dtype to the patch convolution, which fails unless it matches the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .errors import InputError



def layers_run(select_layer: int, n_layers: int) -> int:
    """How many of `n_layers` encoder layers run for `select_layer` (the official hidden-state tuple's index: 0 the
    embeddings output, k layer k's, -1 the last layer's); the layers after them get no gradient."""
    return select_layer % (n_layers + 1)

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (InternRMSNorm / Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's own op: the same values, bit for bit, in one call instead of six (tested), which
            # matters between the large matrix products of a decode step
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if norm_type == "layer_norm" else RMSNorm(dim, eps=eps)


class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode or at rate 0."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def randn_unless_meta(*shape: int) -> torch.Tensor:
    """torch.randn, but left empty on the meta device, where a checkpoint's model is built and there is
    nothing to draw: randn there imports torch's symbolic-shapes machinery (sympy), about 0.6 s."""
    tensor = torch.empty(*shape)
    return tensor if tensor.is_meta else tensor.normal_()


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.grid = config.grid_size
        # Drawn at construction, as the official module does, so a model built without init_weights() holds numbers.
        self.class_embedding = nn.Parameter(randn_unless_meta(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(randn_unless_meta(1, self.grid**2 + 1, config.hidden_size))

    def position_table(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1 + height*width, C): CLS position, then the grid resized to (height, width)."""
        table = self.position_embedding
        if (height, width) == (self.grid, self.grid):
            return table.to(dtype)
        grid = table[:, 1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, -1, height * width).permute(0, 2, 1).to(dtype)
        return torch.cat([table[:, :1].to(dtype), grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not pixel_values.is_floating_point():  # raw pixels, not normalised tiles: cast, they would encode garbage
            raise InputError(f"pixel_values must be floating point tiles normalised as load_image makes them, got "
                             f"{pixel_values.dtype}")
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (N, C, h, w)
        n, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (N, P, C), row-major over the grid
        # `* 1.0` gives the parameter a gradient of its own layout: through expand + cat alone a single
        # tile would hand it a strided slice of x's gradient, which DDP warns about at every step.
        cls = self.class_embedding.to(dtype).expand(n, 1, -1) * 1.0
        x = torch.cat([cls, patches], dim=1)  # (N, 1 + P, C)
        return x + self.position_table(height, width, dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        # Fused projection, output rows laid out as [Q all heads | K all heads | V all heads].
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_normalization = config.qk_normalization
        if config.qk_normalization:
            self.q_norm = RMSNorm(dim, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(dim, eps=config.layer_norm_eps)
        self.dropout = config.attention_dropout
        self.proj_dropout = config.dropout  # the official proj_drop, after the output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)  # 3 x (N, P, C)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(n, p, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, P, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(n, p, c))
        return F.dropout(out, self.proj_dropout) if self.training and self.proj_dropout else out


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig, drop_path: float):
        super().__init__()
        self.norm1 = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        # ls1 / ls2: the official names of the per-channel layer-scale vectors.
        self.ls1 = nn.Parameter(torch.full((config.hidden_size,), config.initializer_factor))
        self.ls2 = nn.Parameter(torch.full((config.hidden_size,), config.initializer_factor))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x).to(x.dtype)) * self.ls1)
        return x + self.drop_path(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / (n - 1) for i in range(n)] if n > 1 else [0.0]
        self.layers = nn.ModuleList(VisionLayer(config, rate) for rate in rates)


class InternVisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """(N, 3, S, S) tiles -> (N, 1 + P, C) hidden states after layer `select_layer`.

        Layer indices follow the official hidden-state tuple: 0 is the embeddings output, k the output
        of layer k, -1 the last layer. Layers after the selected one are not run.
        """
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[: layers_run(select_layer, len(self.encoder.layers))]:
            x = layer(x)
        return x

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (never needed when loading a checkpoint)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=std)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=std)
        for layer in self.encoder.layers:
            nn.init.constant_(layer.ls1, self.config.initializer_factor)
            nn.init.constant_(layer.ls2, self.config.initializer_factor)
