"""Tile-grid choice and tile crops against an independent implementation of the published algorithm
(model card `dynamic_preprocess`, reference section 5.1) and against transformers' GOT-OCR2 tiler."""

import numpy as np
import pytest
from PIL import Image

from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.processor.tiling import (
    TilePlan,
    candidate_grids,
    dynamic_preprocess,
    plan_tiles,
)

# Awkward sizes: extremes, off-by-one around a tile, exact ratio ties, common photo/screen sizes.
SIZES = [
    (1, 1), (1, 10000), (10000, 1), (1, 2), (2, 1), (3, 1), (447, 449), (449, 447), (448, 448),
    (300, 300), (2000, 2000), (4000, 4000), (1920, 1080), (1280, 720), (1080, 1920), (800, 600),
    (640, 480), (600, 800), (1000, 500), (500, 1000), (1500, 900), (900, 1500), (896, 448),
    (448, 896), (1344, 448), (5000, 1000), (1000, 5000), (672, 448), (2048, 1536), (37, 1000),
    (1000, 37), (4032, 3024), (3024, 4032), (1200, 1000), (100, 1200), (13, 7), (7, 13),
]
MAX_NUMS = [1, 6, 12]


def reference_grids(min_num, max_num):
    """The official candidate list: a set comprehension sorted by area (written independently)."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def reference_grid(width, height, min_num=1, max_num=12, image_size=448):
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in reference_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def reference_tiles(image, grid, image_size=448, use_thumbnail=True):
    cols, rows = grid
    resized = image.resize((cols * image_size, rows * image_size))
    tiles = []
    for r in range(rows):
        for c in range(cols):
            tiles.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def parse_grids(text):
    return [tuple(int(v) for v in g.strip("()").split(",")) for g in text.split()]


def test_candidate_order_is_the_one_listed_in_the_reference():
    listed_12 = parse_grids(
        "(1,1) (1,2) (2,1) (3,1) (1,3) (2,2) (4,1) (1,4) (5,1) (1,5) (1,6) (6,1) (3,2) (2,3) (7,1) (1,7) "
        "(4,2) (2,4) (1,8) (8,1) (1,9) (3,3) (9,1) (2,5) (5,2) (10,1) (1,10) (11,1) (1,11) (12,1) (3,4) "
        "(4,3) (1,12) (6,2) (2,6)"
    )
    listed_6 = parse_grids("(1,1) (1,2) (2,1) (3,1) (1,3) (4,1) (1,4) (2,2) (1,5) (5,1) (6,1) (2,3) (1,6) (3,2)")
    assert list(candidate_grids(1, 12)) == listed_12
    assert list(candidate_grids(1, 6)) == listed_6
    assert len(listed_12) == 35


@pytest.mark.parametrize("min_num,max_num", [(1, 1), (1, 2), (1, 6), (1, 12), (1, 24), (1, 40), (2, 12), (4, 9), (5, 5)])
def test_candidate_order_matches_a_python_set(min_num, max_num):
    assert list(candidate_grids(min_num, max_num)) == reference_grids(min_num, max_num)


def test_candidate_order_matches_the_set_comprehension_for_every_small_setting_and_large_ones():
    """Each tuple is inserted once where the comprehension first adds it (the set's iteration order
    depends on that); every setting up to 60 and a few far above, where the comprehension takes seconds."""
    for max_num in range(1, 61):
        for min_num in range(1, max_num + 1):
            assert list(candidate_grids.__wrapped__(min_num, max_num)) == reference_grids(min_num, max_num)
    for min_num, max_num in [(1, 150), (3, 180), (11, 200)]:
        assert list(candidate_grids.__wrapped__(min_num, max_num)) == reference_grids(min_num, max_num)
    assert len(candidate_grids.__wrapped__(1, 5000)) == sum(5000 // i for i in range(1, 5001))  # i*j <= 5000


def test_a_tile_count_past_any_context_is_refused_not_planned():
    """max_num 10**9 listed every grid up to it (the process filled the memory and was killed); a large
    min_num looped over min_num**2 pairs (minutes at 30000, now only the pairs it keeps). Refused, or planned."""
    for max_num in (10_001, 10**9):
        with pytest.raises(SettingError, match=f"max_num must be at most 10000 tiles .*got {max_num}$"):
            plan_tiles(640, 480, max_num=max_num)
    assert len(candidate_grids.__wrapped__(10_000, 10_000)) == sum(1 for i in range(1, 10_001) if 10_000 % i == 0)


@pytest.mark.parametrize("max_num", MAX_NUMS)
def test_grid_choice_matches_reference_on_awkward_sizes(max_num):
    for width, height in SIZES:
        plan = plan_tiles(width, height, max_num=max_num)
        assert (plan.cols, plan.rows) == reference_grid(width, height, max_num=max_num), (width, height)


def test_grid_choice_matches_reference_on_a_dense_sweep():
    for width in range(1, 3000, 97):
        for height in range(1, 3000, 89):
            for max_num in (6, 12):
                plan = plan_tiles(width, height, max_num=max_num)
                assert (plan.cols, plan.rows) == reference_grid(width, height, max_num=max_num), (width, height)


@pytest.mark.parametrize(
    "size,grid,tiles",
    [
        ((448, 448), (1, 1), 1), ((800, 600), (4, 3), 13), ((640, 480), (4, 3), 13), ((1920, 1080), (4, 2), 9),
        ((1280, 720), (4, 2), 9), ((1000, 500), (2, 1), 3), ((2000, 2000), (3, 3), 10), ((300, 300), (1, 1), 1),
        ((1, 10000), (1, 12), 13), ((10000, 1), (12, 1), 13),
    ],
)
def test_reference_examples(size, grid, tiles):
    plan = plan_tiles(*size)
    assert (plan.cols, plan.rows) == grid
    assert plan.num_tiles == tiles


def test_area_tie_rule_picks_the_larger_grid_only_for_big_images():
    # 1920x1080 ties (2,1) and (4,2) exactly; it has more than half the pixels of 4x2 tiles.
    assert reference_grid(1920, 1080) == (4, 2) == (plan_tiles(1920, 1080).cols, plan_tiles(1920, 1080).rows)
    # Same ratio, too small for the 4x2 grid: stays at (2,1).
    assert (plan_tiles(640, 360).cols, plan_tiles(640, 360).rows) == (2, 1) == reference_grid(640, 360)
    # Squares: (1,1), (2,2) or (3,3) depending on size.
    assert [(plan_tiles(s, s).cols) for s in (300, 448, 700, 1000, 2000)] == [reference_grid(s, s)[0] for s in (300, 448, 700, 1000, 2000)]


def test_tile_plan_boxes_are_row_major():
    plan = TilePlan(cols=3, rows=2, image_size=10)
    assert plan.boxes == [(0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 30, 10), (0, 10, 10, 20), (10, 10, 20, 20), (20, 10, 30, 20)]
    assert plan.resized_size == (30, 20)
    assert plan.num_tiles == 7 and plan.has_thumbnail
    assert TilePlan(1, 1).num_tiles == 1 and not TilePlan(1, 1).has_thumbnail
    assert TilePlan(2, 1, use_thumbnail=False).num_tiles == 2


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(1920, 1080), (447, 449), (1, 10000), (10000, 1), (13, 7), (448, 448)])
@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_dynamic_preprocess_tiles_match_reference(size, use_thumbnail):
    image = noise_image(*size)
    ours = dynamic_preprocess(image, max_num=12, use_thumbnail=use_thumbnail)
    expected = reference_tiles(image, reference_grid(*size), use_thumbnail=use_thumbnail)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert a.size == (448, 448)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_tile_settings_and_zero_area_raise():
    with pytest.raises(InputError, match="^tile counts need 1 <= min_num <= max_num, got min_num=5, max_num=4$"):
        plan_tiles(100, 100, min_num=5, max_num=4)
    with pytest.raises(InputError, match="^min_num must be a whole number >= 1, got 0$"):
        plan_tiles(100, 100, min_num=0)
    with pytest.raises(InputError, match=r"^image has zero area \(0x100\)$"):
        plan_tiles(0, 100)


@pytest.mark.parametrize("setting,value", [("max_num", 2.5), ("max_num", "12"), ("max_num", None), ("min_num", 1.0),
                                           ("image_size", 0), ("image_size", -3), ("image_size", 2.5),
                                           ("image_size", True), ("max_num", True)])
def test_settings_that_are_not_whole_numbers_are_named(setting, value):
    """Used to escape as TypeError from range(), or as a Pillow/torch error about sizes; a bool was read
    as 1 (`image_size=True` made 1x1-pixel tiles)."""
    with pytest.raises(InputError, match=f"{setting} must be a whole number >= 1, got {value!r}"):
        plan_tiles(100, 100, **{setting: value})
    assert plan_tiles(900, 450, max_num=np.int64(6), image_size=np.int32(32)).num_tiles == 3


def test_grid_choice_agrees_with_transformers_got_ocr2():
    """transformers' InternVL/GOT-OCR2 tiler sorts equal areas differently but picks the same grids."""
    got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    for width, height in SIZES:
        for max_num in MAX_NUMS:
            theirs = got_ocr2.get_optimal_tiled_canvas((height, width), (448, 448), 1, max_num)
            plan = plan_tiles(width, height, max_num=max_num)
            assert (plan.cols, plan.rows) == tuple(theirs), (width, height, max_num)
