"""Open an image and turn it into normalised 448x448 tiles: `pixel_values` (N, 3, 448, 448) float32.

Mirrors the model card's `load_image` (reference section 5.2): `Image.open(f).convert('RGB')`,
`dynamic_preprocess(..., use_thumbnail=True)`, then per tile torchvision's
Resize((448, 448), BICUBIC) (a no-op on tiles that are already 448x448), ToTensor (uint8 -> float32,
divided by 255) and Normalize with the ImageNet mean/std ((x - mean) / std in float32).

Our result is bit-identical to that recipe but computed differently, for speed:
- an image that is already RGB is not copied by a `convert('RGB')`, and an image that already has
  the resized size is not resized (PIL would return a copy);
- all grid tiles are converted at once from the resized image with one strided copy and three
  in-place float32 ops (the same ops, in the same order, as ToTensor + Normalize);
- the thumbnail (a second resize of the original image) is computed on a worker thread while the
  main thread resizes the grid; Pillow releases the GIL while resampling.
The resizes themselves are whole-image PIL resizes exactly as in the official code: Pillow 13
chooses the order of its horizontal and vertical passes from the sizes involved, so resizing
strips separately would not give the same pixels.

No EXIF orientation is applied (the official code does not apply it either).
"""

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from internvl_mpo.errors import InputError
from internvl_mpo.processor.tiling import TilePlan, plan_tiles

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
_THUMBNAIL_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="internvl-thumb")

# Pillow errors that mean "this file is not a readable image" (truncated data, bad headers, bad
# chunks); anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def source_name(src: ImageSource) -> str:
    """How an image source is named in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<PIL image>"
    return str(getattr(src, "name", "") or "<file object>")


def _limit(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _open_pil(src: ImageSource, name: str) -> Image.Image:
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    try:
        # Pillow warns above MAX_IMAGE_PIXELS; we enforce our own limit after opening instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not an image file") from None
    except Image.DecompressionBombError as e:
        raise InputError(
            f"{name}: refused as a possible decompression bomb ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "to open images this large"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image Pillow can read") from None
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: cannot read image header: {e}") from None


def open_image(src: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Open `src` (path, bytes, binary file object or PIL image) as a fully decoded RGB image.

    The pixels are those of the official `Image.open(src).convert('RGB')` for every mode Pillow
    can convert (palette, RGBA, LA, CMYK, I;16, I, F, grayscale, ...). Raises InputError naming the
    source for a missing file, data that is not an image, a truncated file, a zero-area image, a
    mode with no RGB conversion, or more than `max_pixels` pixels (default: Pillow's
    `Image.MAX_IMAGE_PIXELS`, about 89.5 M). Pillow itself refuses images above twice its own
    limit even when `max_pixels` is larger.
    """
    name = source_name(src)
    if isinstance(src, Image.Image):
        return _checked_rgb(src, name, max_pixels)
    image = _open_pil(src, name)
    try:
        return _checked_rgb(image, name, max_pixels)
    except InputError:
        if not hasattr(src, "read"):
            image.close()  # a file Pillow opened itself; the caller's file objects stay open
        raise


def _checked_rgb(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{name}: image has zero area ({width}x{height})")
    limit = _limit(max_pixels)
    if limit is not None and width * height > limit:
        raise InputError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; pass a larger max_pixels to allow it)"
        )
    try:
        image.load()
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: cannot decode image (truncated or corrupt): {e}") from None
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"{name}: cannot convert image mode {image.mode!r} to RGB: {e}") from None


def _to_tensor_(out: torch.Tensor, pixels: torch.Tensor) -> None:
    """Write uint8 `pixels` (..., 3, H, W) into float32 `out` as ToTensor + Normalize would."""
    out.copy_(pixels)
    out.div_(255).sub_(_MEAN).div_(_STD)


def _fill_thumbnail(image: Image.Image, image_size: int, out: torch.Tensor) -> None:
    thumb = torch.from_numpy(np.array(image.resize((image_size, image_size))))  # (H, W, C) uint8
    _to_tensor_(out, thumb.permute(2, 0, 1))


def tiles_to_tensor(image: Image.Image, plan: TilePlan) -> torch.Tensor:
    """Normalised tiles of an RGB `image` laid out by `plan`: (N, 3, S, S) float32."""
    s = plan.image_size
    pixel_values = torch.empty((plan.num_tiles, 3, s, s), dtype=torch.float32)  # (N, C, H, W)
    thumbnail = None
    if plan.has_thumbnail:
        thumbnail = _THUMBNAIL_POOL.submit(_fill_thumbnail, image, s, pixel_values[-1])
    resized = image if image.size == plan.resized_size else image.resize(plan.resized_size)
    grid = torch.from_numpy(np.array(resized))  # (rows*S, cols*S, C) uint8
    tiles = grid.view(plan.rows, s, plan.cols, s, 3).permute(0, 2, 4, 1, 3)  # (rows, cols, C, S, S)
    _to_tensor_(pixel_values[: plan.grid_tiles].view(plan.rows, plan.cols, 3, s, s), tiles)
    if thumbnail is not None:
        thumbnail.result()
    return pixel_values


def image_to_pixel_values(
    image: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Tile and normalise an already opened PIL image (converted to RGB first if needed)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    plan = plan_tiles(image.width, image.height, min_num, max_num, image_size, use_thumbnail)
    return tiles_to_tensor(image, plan)


def load_image(
    image: ImageSource,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """`pixel_values` (N_tiles, 3, image_size, image_size) float32 for one image, as the model card."""
    rgb = open_image(image, max_pixels=max_pixels)
    plan = plan_tiles(rgb.width, rgb.height, min_num, max_num, image_size, use_thumbnail)
    return tiles_to_tensor(rgb, plan)
