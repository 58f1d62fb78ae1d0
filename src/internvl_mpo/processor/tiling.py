"""Dynamic-resolution tiling: pick a grid of 448x448 tiles for an image, crop it, add a thumbnail.

Mirrors `dynamic_preprocess` / `find_closest_aspect_ratio` of the official code
(OpenGVLab/InternVL `internvl_chat/internvl/train/dataset.py`, repeated in the model card) and
reference section 5.1. PIL only, no torch. Quirks kept for parity:

- Candidate grids are a Python `set` sorted by area only, so the order inside one area is CPython's
  set iteration order. We build the set with the same insertion sequence as the official
  comprehension (n = min..max, i = 1..n, j = 1..n) and stable-sort it the same way, which gives the
  order listed in the reference (e.g. area 3 is (3, 1) before (1, 3)). transformers'
  `get_all_supported_aspect_ratios` orders equal areas differently; it only matters for exact
  float ties between two grids of the same area.
- The closest-ratio search replaces the best grid on an exact float tie only when the original
  image has more than half the pixels of the new grid (`W*H > 0.5 * size**2 * cols * rows`).
- Resizes use PIL's default filter (BICUBIC for RGB), small images are upscaled, tiles are cut in
  row-major order and the thumbnail (the whole original image at 448x448) is appended only when
  the grid has more than one tile.

Deliberate differences from the official function: the default is `use_thumbnail=True` (what every
official caller passes; the function's own default is False, and `max_num` defaults to 6 in
dataset.py, 12 in the model card), and `min_num > max_num` raises instead of silently giving one
tile (the official search then returns its initial (1, 1) from an empty candidate list).
"""

import numbers
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from internvl_mpo.config import check_tile_budget
from internvl_mpo.errors import InputError, SettingError

Grid = tuple[int, int]  # (cols, rows): width factor, height factor


@lru_cache(maxsize=64)
def candidate_grids(min_num: int = 1, max_num: int = 12) -> tuple[Grid, ...]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, in the official order."""
    if min_num < 1 or max_num < min_num:
        raise SettingError("tile counts need 1 <= ", "min_num", " <= ", "max_num", ", got ", "min_num", f"={min_num}, ",
                           "max_num", f"={max_num}")
    check_tile_budget(max_num)
    grids: set[Grid] = set()
    # The official set comprehension runs n over min_num..max_num and i, j over 1..n; the iteration
    # order of a set of small-int tuples depends on the order of first insertions (collisions), and
    # adding a tuple again changes nothing. So we insert each tuple once, where it first comes: every
    # tuple of the first n, then those with max(i, j) = n, in the comprehension's (i, j) order. That is
    # O(max_num log max_num) tuples instead of the comprehension's O(max_num^3) steps (minutes at 1000).
    def add(i: int, j: int) -> None:
        if min_num <= i * j <= max_num:
            grids.add((i, j))

    for i in range(1, min_num + 1):
        for j in range(-(-min_num // i), min(min_num, max_num // i) + 1):  # the j that `add` keeps, in order
            add(i, j)
    for n in range(min_num + 1, max_num + 1):
        for i in range(1, min(n - 1, max_num // n) + 1):
            add(i, n)
        for j in range(1, min(n, max_num // n) + 1):
            add(n, j)
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def find_closest_aspect_ratio(
    aspect_ratio: float, grids: tuple[Grid, ...], width: int, height: int, image_size: int
) -> Grid:
    """The grid whose cols/rows is closest to `aspect_ratio`, with the official area tie rule."""
    best_diff = float("inf")
    best: Grid = (1, 1)
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image come from: a cols x rows grid over the resized image."""

    cols: int
    rows: int
    image_size: int = 448
    use_thumbnail: bool = True

    @property
    def grid_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def has_thumbnail(self) -> bool:
        return self.use_thumbnail and self.grid_tiles != 1

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the model, thumbnail included."""
        return self.grid_tiles + int(self.has_thumbnail)

    @property
    def resized_size(self) -> tuple[int, int]:
        """(width, height) the whole image is resized to before cropping."""
        return self.cols * self.image_size, self.rows * self.image_size

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Crop boxes (left, top, right, bottom) in the resized image, row-major."""
        s = self.image_size
        return [
            (k % self.cols * s, k // self.cols * s, (k % self.cols + 1) * s, (k // self.cols + 1) * s)
            for k in range(self.grid_tiles)
        ]


def plan_tiles(
    width: int,
    height: int,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> TilePlan:
    """Choose the tile grid for an image of `width` x `height` pixels."""
    for name, value in (("min_num", min_num), ("max_num", max_num), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # True: 1x1-pixel tiles
            raise SettingError("", name, f" must be a whole number >= 1, got {value!r}")
    if width < 1 or height < 1:
        raise InputError(f"image has zero area ({width}x{height})")
    grids = candidate_grids(min_num, max_num)
    cols, rows = find_closest_aspect_ratio(width / height, grids, width, height, image_size)
    return TilePlan(cols, rows, image_size, use_thumbnail)


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split `image` into `image_size` square tiles (plus a thumbnail when there are several)."""
    plan = plan_tiles(image.width, image.height, min_num, max_num, image_size, use_thumbnail)
    resized = image.resize(plan.resized_size)  # PIL default filter, as the official code
    tiles = [resized.crop(box) for box in plan.boxes]
    if plan.has_thumbnail:
        tiles.append(image.resize((image_size, image_size)))
    return tiles
