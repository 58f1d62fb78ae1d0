"""The demo model's config: InternVL2.5-4B-MPO's config.json with every width and depth cut down.

Only sizes change, so the demo runs the code path of the real checkpoints: InternViT with LayerNorm
and qkv bias at 448x448 tiles with 14-pixel patches (256 image tokens per tile), pixel shuffle 0.5,
the two-layer projector, a Qwen2 decoder with grouped kv heads and untied embeddings, the
internvl2_5 template, dynamic tiling with a thumbnail. `max_dynamic_patch` is 2: a square picture
(all demo images) is one tile, a wide or tall one two tiles plus the thumbnail.
"""

from __future__ import annotations

import dataclasses

from internvl_mpo.config import ModelConfig, family_config

DEMO_NAME = "internvl-mpo-demo"


def demo_config(vocab_size: int) -> ModelConfig:
    """The 4B config with the demo's sizes and `vocab_size` (the demo tokenizer's length)."""
    base = family_config("4B")
    vision = dataclasses.replace(
        base.vision,
        hidden_size=96,
        intermediate_size=4 * 96,
        num_hidden_layers=3,
        num_attention_heads=4,
        drop_path_rate=0.0,
        extra={**base.vision.extra, "torch_dtype": "float32", "use_flash_attn": False},
    )
    llm = dataclasses.replace(
        base.llm,
        hidden_size=128,
        intermediate_size=3 * 128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=None,
        extra={**base.llm.extra, "_name_or_path": DEMO_NAME, "torch_dtype": "float32", "use_bfloat16": False},
    )
    return base.replace(
        vision=vision, llm=llm, max_dynamic_patch=2,
        extra={**base.extra, "_name_or_path": DEMO_NAME, "torch_dtype": "float32"},
    )
