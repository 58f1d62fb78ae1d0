"""Several images in one prompt: tiles, per-image tile counts and the `<image>` placeholder prefix.

Mirrors the model card's multi-image examples and VLMEvalKit's InternVL wrapper (reference
section 6.2):
- Separate images: each image is tiled on its own; the prefix is "Image-1: <image>\\nImage-2:
  <image>\\n..." and `num_patches_list` has one entry per image, in placeholder order. A single
  image gets the card's plain "<image>\\n".
- Combined images: one "<image>\\n" placeholder for all tiles, `num_patches_list = [total]`.
- Tile budget (VLMEvalKit `total_max_num`, 64 in the official evaluation): every image's max_num
  becomes `max(1, min(max_num, budget // n_images))`. Like the official rule it does not count
  thumbnails, so the total can exceed the budget by one tile per image (5 images x (12 + 1) = 65).
- `planned_tiles` gives the tile counts `load_images` will make from the images' headers alone, so
  a caller can refuse images too large for its context before tiling them.
"""

import numbers
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.processor.image import ImageSource, load_image, read_size, source_name
from internvl_mpo.processor.tiling import plan_tiles

OFFICIAL_EVAL_TILE_BUDGET = 64


@dataclass
class MultiImageInput:
    pixel_values: torch.Tensor  # (N, 3, S, S) float32, images in order
    num_patches_list: list[int]  # tiles per <image> placeholder
    prefix: str


def per_image_max_num(max_num: int | Sequence[int], n_images: int, total_budget: int | None = None) -> list[int]:
    """Each image's max tile count after applying the optional total budget."""
    maxes = list(max_num) if isinstance(max_num, Sequence) and not isinstance(max_num, str) else [max_num] * n_images
    if len(maxes) != n_images:
        raise InputError(f"got {len(maxes)} max_num values for {n_images} images")
    if not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in maxes):
        raise InputError(f"max_num must be a whole number of tiles >= 1 (or one per image), got {max_num!r}")
    if total_budget is None:
        return maxes
    if isinstance(total_budget, bool) or not isinstance(total_budget, numbers.Integral) or total_budget < 1:
        raise InputError(f"total tile budget must be a whole number >= 1, got {total_budget!r}")
    cap = max(1, total_budget // n_images)
    return [max(1, min(m, cap)) for m in maxes]


def images_prefix(n_images: int) -> str:
    if n_images == 1:
        return "<image>\n"
    return "".join(f"Image-{k + 1}: <image>\n" for k in range(n_images))


def refuse_unordered(images) -> None:
    """Images come as a list or tuple: a generator is read once (`planned_tiles` would use it up before
    `load_images` reads it), and a set has no order for Image-1, Image-2."""
    if not isinstance(images, Sequence):
        raise InputError(f"images must be a list of images, got a {type(images).__name__}; pass list(images)")


def _image_max_nums(
    images: Sequence[ImageSource], max_num: int | Sequence[int], total_budget: int | None
) -> list[int]:
    if isinstance(images, (str, bytes, bytearray, os.PathLike, Image.Image)) or hasattr(images, "read"):
        raise InputError(f"images must be a list of images, got one {type(images).__name__} "
                         f"({source_name(images)[:100]}); pass [image], or use load_image for one image")
    refuse_unordered(images)
    if not images:
        raise InputError("no images given")
    return per_image_max_num(max_num, len(images), total_budget)


def _rereadable(src: ImageSource) -> bool:
    """Whether the image can be read twice, its header now and its pixels later: not a file object that
    cannot seek (a pipe, an HTTP response), nor a path naming a pipe (`<(curl ...)`, /dev/fd/N, a named pipe),
    whose header read would use up the data the pixels need."""
    if isinstance(src, (str, os.PathLike)):
        try:
            mode = os.stat(src).st_mode
        except (OSError, ValueError):  # missing, or a name no file can have: read_size says so
            return True
        return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))
    if not hasattr(src, "read") or isinstance(src, Image.Image):
        return True
    try:
        return bool(src.seekable())
    except (AttributeError, OSError, ValueError):  # no seekable(), or a closed file: refused when it is read
        return False


def planned_tiles(
    images: Sequence[ImageSource],
    max_num: int | Sequence[int] = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    total_budget: int | None = None,
    max_pixels: int | None = None,
) -> list[int]:
    """The tile count (thumbnail included) `load_images` gives each image, planned from the headers with
    nothing decoded, to refuse images too large for a context before a tile is made. A file object that
    cannot seek counts as one tile, fewer than or as many as it gets: its data can be read only once."""
    maxes = _image_max_nums(images, max_num, total_budget)
    return [
        plan_tiles(*read_size(img, max_pixels), min(min_num, m), m, image_size, use_thumbnail).num_tiles
        if _rereadable(img) else 1
        for img, m in zip(images, maxes)
    ]


def load_images(
    images: Sequence[ImageSource],
    max_num: int | Sequence[int] = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    total_budget: int | None = None,
    combined: bool = False,
    max_pixels: int | None = None,
) -> MultiImageInput:
    """Tile every image (each with its own max_num) and build the prompt prefix. `total_budget` is the
    total tile budget (`total_max_num` in `InternVLChat`'s methods and VLMEvalKit): each image's
    max_num shrinks to max(1, total_budget // len(images))."""
    maxes = _image_max_nums(images, max_num, total_budget)
    tiles = [
        load_image(img, max_num=m, min_num=min(min_num, m), image_size=image_size,
                   use_thumbnail=use_thumbnail, max_pixels=max_pixels)
        for img, m in zip(images, maxes)
    ]
    counts = [t.shape[0] for t in tiles]
    pixel_values = torch.cat(tiles)
    if combined:
        return MultiImageInput(pixel_values, [sum(counts)], "<image>\n")
    return MultiImageInput(pixel_values, counts, images_prefix(len(images)))
