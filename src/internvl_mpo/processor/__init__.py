"""Image and video inputs: dynamic tiling, normalised pixel tensors, multi-image and video prompts."""

from internvl_mpo.processor.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_to_pixel_values,
    load_image,
    open_image,
)
from internvl_mpo.processor.multi import (
    OFFICIAL_EVAL_TILE_BUDGET,
    MultiImageInput,
    load_images,
    per_image_max_num,
    planned_tiles,
)
from internvl_mpo.processor.preview import (
    format_tiles_report,
    render_tiles,
    tiles_report,
)
from internvl_mpo.processor.tiling import (
    TilePlan,
    candidate_grids,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    plan_tiles,
)
from internvl_mpo.processor.video import VideoInput, get_index, load_video

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_EVAL_TILE_BUDGET",
    "MultiImageInput",
    "TilePlan",
    "VideoInput",
    "candidate_grids",
    "dynamic_preprocess",
    "find_closest_aspect_ratio",
    "format_tiles_report",
    "get_index",
    "image_to_pixel_values",
    "load_image",
    "load_images",
    "load_video",
    "open_image",
    "per_image_max_num",
    "plan_tiles",
    "planned_tiles",
    "render_tiles",
    "tiles_report",
]
