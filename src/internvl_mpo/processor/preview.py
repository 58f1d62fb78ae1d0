"""What dynamic tiling does to one image: grid, tile count, token cost, and an optional PNG picture.

Backs the `internvl-mpo tiles` command. The token cost is `tiles * tokens_per_tile + 2`: 256 image
tokens per tile (thumbnail included) plus `<img>` and `</img>` (reference sections 5 and 13.10).
The picture shows the resized image with the tile grid and tile numbers drawn over it (only the
grid's frame where tiles would be under 16 pixels) and the thumbnail beside it (PIL ImageDraw only).
"""

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from internvl_mpo.errors import InputError
from internvl_mpo.processor.image import ImageSource, open_image, source_name
from internvl_mpo.processor.tiling import TilePlan, plan_tiles
from internvl_mpo.run_folder import no_folder, writing

PREVIEW_MAX_SIDE = 1024  # longest side of the drawn grid, in pixels
_MIN_DRAWN_TILE = 16  # px: smaller tiles get no box or number (they would merge into a smear), only the grid's frame
_MARGIN = 16
_CAPTION_HEIGHT = 40
_GRID_COLOUR = (255, 40, 40)
_BACKGROUND = (32, 32, 32)
_TEXT_COLOUR = (255, 255, 255)


def png_output(path: str | os.PathLike) -> Path:
    """The PNG file a picture goes to: `.png` appended to a name without a suffix; InputError for another
    suffix (only PNG is written), a folder, or a parent folder that does not exist (or is a file)."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give the path of a .png file")
    if target.suffix == "":
        target = target.with_name(target.name + ".png")
    elif target.suffix.lower() != ".png":
        raise InputError(f"{target}: only PNG pictures are written; give a path ending in .png")
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give the path of a .png file")
    if not target.parent.is_dir():
        raise InputError(f"{target}: {no_folder(target)}")
    return target


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either is missing (a new picture), or a name no file can have
        return False


def tiles_report(
    image_path: ImageSource,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    output_png: str | os.PathLike | None = None,
    tokens_per_tile: int = 256,
    max_pixels: int | None = None,
) -> dict:
    """The tiling of one image as a dict (see `format_tiles_report`); draws it to `output_png` if given
    (see `png_output`: `.png` is appended to a name without a suffix)."""
    target = png_output(output_png) if output_png is not None else None
    if target is not None and isinstance(image_path, (str, os.PathLike)) and _same_file(target, image_path):
        raise InputError(f"{target}: is the image shown; the picture would replace it: write it to another path")
    image = open_image(image_path, max_pixels)
    plan = plan_tiles(image.width, image.height, min_num, max_num, image_size, use_thumbnail)
    resized_w, resized_h = plan.resized_size
    report = {
        "image": source_name(image_path),
        "width": image.width,
        "height": image.height,
        "aspect_ratio": image.width / image.height,
        "grid": (plan.cols, plan.rows),
        "cols": plan.cols,
        "rows": plan.rows,
        "resized": (resized_w, resized_h),
        "upscaled": resized_w > image.width or resized_h > image.height,
        "grid_tiles": plan.grid_tiles,
        "thumbnail": plan.has_thumbnail,
        "tiles": plan.num_tiles,
        "tokens_per_tile": tokens_per_tile,
        "image_tokens": plan.num_tiles * tokens_per_tile,
        "tokens": plan.num_tiles * tokens_per_tile + 2,
        "boxes": plan.boxes,
        "settings": {"min_num": min_num, "max_num": max_num, "image_size": image_size, "use_thumbnail": use_thumbnail},
        "output_png": None,
    }
    if target is not None:
        picture = render_tiles(image, plan, caption=format_tiles_report(report).splitlines()[0])
        with writing(target, "no picture was written; give --output a path where one can be"):  # a full disk
            picture.save(target, format="PNG")
        report["output_png"] = os.fspath(target)
    return report


def format_tiles_report(report: dict) -> str:
    """Human-readable lines for a `tiles_report` dict."""
    count = f"{report['tiles']} tile" + ("s" if report["tiles"] > 1 else "")
    if report["thumbnail"]:
        count = f"{report['grid_tiles']} tiles + 1 thumbnail = {count}"
    lines = [
        (
            f"{report['width']}x{report['height']} -> {report['cols']}x{report['rows']} grid "
            f"({report['resized'][0]}x{report['resized'][1]}), {count}, {report['tokens']} tokens"
        ),
        f"image: {report['image']}",
        (
            f"aspect ratio {report['aspect_ratio']:.4f}, grid ratio {report['cols'] / report['rows']:.4f}"
            + (" (image is upscaled)" if report["upscaled"] else "")
        ),
        f"tokens: {report['tiles']} x {report['tokens_per_tile']} + 2 (<img></img>) = {report['tokens']}",
    ]
    if report["output_png"]:
        lines.append(f"preview: {report['output_png']}")
    return "\n".join(lines)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_tiles(image: Image.Image, plan: TilePlan, caption: str = "") -> Image.Image:
    """Picture of the resized image with its tile grid, and the thumbnail (if any) beside it."""
    resized_w, resized_h = plan.resized_size
    scale = min(1.0, PREVIEW_MAX_SIDE / max(resized_w, resized_h))
    grid_w, grid_h = max(1, round(resized_w * scale)), max(1, round(resized_h * scale))
    tile = plan.image_size * scale
    thumb_side = max(128, round(tile)) if plan.has_thumbnail else 0

    width = _MARGIN * 3 + grid_w + thumb_side
    height = _CAPTION_HEIGHT + _MARGIN * 2 + max(grid_h, thumb_side + 20)
    caption_font = _font(14)
    width = max(width, round(caption_font.getlength(caption)) + 2 * _MARGIN)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, 12), caption, fill=_TEXT_COLOUR, font=caption_font)

    left, top = _MARGIN, _CAPTION_HEIGHT + _MARGIN
    # One resize to the drawn size: going through plan.resized_size held a billion pixels at a few thousand tiles.
    canvas.paste(image.resize((grid_w, grid_h)), (left, top))
    if tile < _MIN_DRAWN_TILE:
        draw.rectangle([left, top, left + grid_w - 1, top + grid_h - 1], outline=_GRID_COLOUR, width=2)
    else:
        label_font = _font(max(10, min(32, round(tile / 5))))
        for k, (x0, y0, x1, y1) in enumerate(plan.boxes):
            box = [left + x0 * scale, top + y0 * scale, left + x1 * scale - 1, top + y1 * scale - 1]
            draw.rectangle(box, outline=_GRID_COLOUR, width=2)
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.text(centre, str(k + 1), fill=_TEXT_COLOUR, font=label_font, anchor="mm", stroke_width=2,
                      stroke_fill=(0, 0, 0))

    if plan.has_thumbnail:
        tx = left + grid_w + _MARGIN
        canvas.paste(image.resize((plan.image_size, plan.image_size)).resize((thumb_side, thumb_side)), (tx, top))
        draw.rectangle([tx, top, tx + thumb_side - 1, top + thumb_side - 1], outline=_GRID_COLOUR, width=2)
        draw.text((tx, top + thumb_side + 4), f"thumbnail (tile {plan.num_tiles})", fill=_TEXT_COLOUR, font=_font(12))
    return canvas
