"""Tokenizer loading and the internvl2_5 conversation template."""

from internvl_mpo.chat.template import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    NUM_IMAGE_TOKEN,
    TEMPLATES,
    PairIds,
    Template,
    add_image_prefix,
    build_pair_ids,
    build_prompt_ids,
    build_training_ids,
    encode_with_images,
    expand_image_tokens,
    get_template,
    render_prompt,
)
from internvl_mpo.chat.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "NUM_IMAGE_TOKEN",
    "TEMPLATES",
    "PairIds",
    "StreamDecoder",
    "Template",
    "Tokenizer",
    "add_image_prefix",
    "build_pair_ids",
    "build_prompt_ids",
    "build_training_ids",
    "encode_with_images",
    "expand_image_tokens",
    "get_template",
    "load_tokenizer",
    "render_prompt",
]
