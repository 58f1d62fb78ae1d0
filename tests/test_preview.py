"""`tiles_report`: grid, tile count and token cost against the published tiling rule, and the PNG."""

import re

import numpy as np
import pytest
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.processor.preview import (
    PREVIEW_MAX_SIDE,
    format_tiles_report,
    tiles_report,
)


def save(tmp_path, width, height, name="img.png"):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def row_major_boxes(cols, rows, size=448):
    return [(c * size, r * size, (c + 1) * size, (r + 1) * size) for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize(
    "size,grid,tiles",
    # Expected grids from reference section 5.1; tokens = tiles * 256 + 2 (<img>, </img>).
    [((1920, 1080), (4, 2), 9), ((448, 448), (1, 1), 1), ((800, 600), (4, 3), 13), ((1, 10000), (1, 12), 13), ((1000, 500), (2, 1), 3)],
)
def test_report_numbers(tmp_path, size, grid, tiles):
    report = tiles_report(save(tmp_path, *size))
    assert report["grid"] == grid and (report["cols"], report["rows"]) == grid
    assert report["tiles"] == tiles
    assert report["grid_tiles"] == grid[0] * grid[1]
    assert report["thumbnail"] == (tiles > 1)
    assert report["tokens"] == tiles * 256 + 2
    assert report["image_tokens"] == tiles * 256
    assert report["resized"] == (grid[0] * 448, grid[1] * 448)
    assert report["boxes"] == row_major_boxes(*grid)
    assert (report["width"], report["height"]) == size
    assert report["output_png"] is None


def test_report_options(tmp_path):
    path = save(tmp_path, 1920, 1080)
    no_thumb = tiles_report(path, use_thumbnail=False)
    assert no_thumb["tiles"] == 8 and no_thumb["tokens"] == 8 * 256 + 2
    small = tiles_report(path, max_num=6, tokens_per_tile=64)
    assert small["grid"] == (2, 1) and small["tokens"] == 3 * 64 + 2
    assert tiles_report(save(tmp_path, 640, 480))["upscaled"] is True
    assert tiles_report(save(tmp_path, 4000, 3000, "big.png"))["upscaled"] is False
    tall = tiles_report(save(tmp_path, 460, 800, "tall.png"))  # 1x2 grid: width 460 -> 448, height 800 -> 896
    assert tall["resized"] == (448, 896) and tall["upscaled"] is True


def test_formatted_lines(tmp_path):
    text = format_tiles_report(tiles_report(save(tmp_path, 1920, 1080)))
    first = text.splitlines()[0]
    assert first == "1920x1080 -> 4x2 grid (1792x896), 8 tiles + 1 thumbnail = 9 tiles, 2306 tokens"
    assert "9 x 256 + 2 (<img></img>) = 2306" in text
    one = format_tiles_report(tiles_report(save(tmp_path, 448, 448, "square.png"))).splitlines()[0]
    assert one == "448x448 -> 1x1 grid (448x448), 1 tile, 258 tokens"


def red_columns(image, top, bottom):
    pixels = np.asarray(image)[top:bottom].astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    return set(np.nonzero(red.mean(axis=0) > 0.9)[0])


def test_png_shows_grid_and_thumbnail(tmp_path):
    out = tmp_path / "tiles.png"
    # A dark blue image, so only the drawn grid is red.
    path = tmp_path / "blue.png"
    Image.new("RGB", (1920, 1080), (20, 30, 120)).save(path)
    report = tiles_report(path, output_png=out)
    assert report["output_png"] == str(out)
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.mode == "RGB"
    scale = min(1.0, PREVIEW_MAX_SIDE / 1792)
    grid_w = round(1792 * scale)
    assert picture.width > grid_w + 100  # the thumbnail sits beside the grid
    pixels = np.asarray(picture).astype(int)
    red_rows = ((pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)).mean(axis=1)
    top = int(np.argmax(red_rows > 0.5))  # the top border of the grid (and of the thumbnail)
    tile = round(448 * scale)
    columns = red_columns(picture, top + 20, top + tile - 20)  # inside the first row of tiles
    left = 16
    for c in range(1, 4):  # interior vertical grid lines between the 4 columns of tiles
        x = left + round(c * 448 * scale)
        assert columns & set(range(x - 3, x + 3)), c
    # the thumbnail (dark blue) is framed in red to the right of the grid
    assert any(x > left + grid_w + 8 for x in columns)


def test_png_draws_a_small_grid_at_its_own_size(tmp_path):
    """Only grids larger than PREVIEW_MAX_SIDE are scaled down: one 448-pixel tile is drawn 448 pixels wide."""
    path, out = tmp_path / "blue.png", tmp_path / "one.png"
    Image.new("RGB", (448, 448), (20, 30, 120)).save(path)
    tiles_report(path, output_png=out)
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # the grid's frame alone
    rows, columns = np.nonzero(red.any(axis=1))[0], np.nonzero(red.any(axis=0))[0]
    assert (columns[-1] - columns[0] + 1, rows[-1] - rows[0] + 1) == (448, 448)


def test_png_for_an_extreme_aspect_ratio(tmp_path):
    out = tmp_path / "tall.png"
    report = tiles_report(save(tmp_path, 1, 10000), output_png=out)
    with Image.open(out) as picture:
        assert report["tiles"] == 13
        assert picture.height <= PREVIEW_MAX_SIDE + 200 and picture.width < 1000


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        tiles_report(tmp_path / "missing.png")


def test_png_output_path_errors_and_suffix(tmp_path):
    path = save(tmp_path, 600, 400)
    cases = [(tmp_path / "none" / "t.png", "folder .*none does not exist"),
             (tmp_path, "is a folder; give the path of a .png file"),
             (tmp_path / "t.jpg", r"t.jpg: only PNG pictures are written; give a path ending in .png")]
    for out, message in cases:
        with pytest.raises(InputError, match=message):
            tiles_report(path, output_png=out)
    assert not (tmp_path / "t.jpg").exists()
    report = tiles_report(path, output_png=tmp_path / "bare")
    assert report["output_png"] == str(tmp_path / "bare.png")
    assert (tmp_path / "bare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tiles_report(path, output_png=tmp_path / "UP.PNG")["output_png"] == str(tmp_path / "UP.PNG")


def test_cli_tiles_output_error_is_one_line(tmp_path, capsys):
    from internvl_mpo.cli import main

    assert main(["tiles", str(save(tmp_path, 600, 400)), "--output", str(tmp_path / "x" / "t.png")]) != 0
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err


def test_cli_tiles_on_a_full_disk_is_one_line(tmp_path, capsys):
    """The picture's save on a full disk (or a read-only folder) was a chained OSError traceback."""
    import resource

    from internvl_mpo.cli import main

    image = save(tmp_path, 600, 400)
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, before[1]))  # writes past 100 bytes fail (EFBIG)
    try:
        code = main(["tiles", str(image), "--output", str(tmp_path / "t.png")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        f"error: {tmp_path / 't.png'}: saving failed ([Errno 27] File too large); no picture was written; give "
        "--output a path where one can be")


def test_png_for_more_tiles_than_the_picture_can_show(tmp_path):
    # 1100 tiles in one column: each is under a pixel high at the preview's scale. The picture
    # drew a box per tile (Pillow refused the inverted box) after resizing to 448x492800 pixels.
    out = tmp_path / "thin.png"
    report = tiles_report(save(tmp_path, 1, 20000), max_num=1100, output_png=out)
    assert report["grid"] == (1, 1100) and report["tiles"] == 1101
    picture = Image.open(out)
    assert picture.height <= PREVIEW_MAX_SIDE + 200 and picture.width < 1000


def test_cli_tiles_errors_name_the_flags_and_python_the_parameters(tmp_path, capsys):
    """`tiles` said max_num where its user typed --max-num (and max_pixels for --max-pixels)."""
    from internvl_mpo.cli import main

    path = str(save(tmp_path, 600, 400))
    for flags, message in (
        (["--max-num", "0"], "--max-num must be a whole number >= 1, got 0"),
        (["--min-num", "0"], "--min-num must be a whole number >= 1, got 0"),
        (["--min-num", "3", "--max-num", "2"], "tile counts need 1 <= --min-num <= --max-num, got --min-num=3, "
                                               "--max-num=2"),
        (["--max-pixels", "1000"], f"{path}: 600x400 = 240000 pixels exceeds the limit of 1000 (possible "
                                   "decompression bomb; a larger --max-pixels allows it)"),
        (["--max-pixels", "-1"], "--max-pixels must be a whole number of pixels >= 1, got -1"),
    ):
        assert main(["tiles", path, "--output", str(tmp_path / "t.png"), *flags]) == 1
        assert capsys.readouterr().err == f"internvl-mpo tiles: error: {message}\n"
    for settings, message in ((dict(max_num=0), "max_num must be a whole number >= 1, got 0"),
                              (dict(min_num=3, max_num=2), "1 <= min_num <= max_num, got min_num=3, max_num=2"),
                              (dict(max_pixels=1000), "(possible decompression bomb; a larger max_pixels allows it)")):
        with pytest.raises(InputError, match=re.escape(message)):
            tiles_report(path, **settings)


def test_tiles_default_picture_keeps_the_image_extension(tmp_path, monkeypatch, capsys):
    """`tiles a.png` and `tiles a.gif` both wrote a.tiles.png, the second replacing the first's picture."""
    from internvl_mpo.cli_chat import tiles

    png, gif = save(tmp_path, 900, 448, "a.png"), tmp_path / "a.gif"
    Image.new("RGB", (448, 900), "red").save(gif)
    monkeypatch.chdir(tmp_path)
    assert tiles(str(png)) == 0 and tiles(str(gif)) == 0
    assert "preview: a.png.tiles.png" in capsys.readouterr().out
    with Image.open(tmp_path / "a.png.tiles.png") as wide, Image.open(tmp_path / "a.gif.tiles.png") as tall:
        assert wide.width > wide.height and tall.height > tall.width
    assert not (tmp_path / "a.tiles.png").exists()
