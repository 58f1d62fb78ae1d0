"""load_video against the model card's own reader: decord's VideoReader, `len(vr)`, `get_avg_fps()`
and `vr[i].asnumpy()` (reference section 6.1), on clips made here with PyAV. Runs where decord is
installed (the test extra installs it on x86-64 Linux, the only platform with a wheel)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from test_video import damaged_clip, reference_tile, set_mp4_rotation, trimmed_clip, write_h264

from internvl_mpo.errors import InputError
from internvl_mpo.processor.video import load_video

av = pytest.importorskip("av")
decord = pytest.importorskip("decord")


def card_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """The model card's `get_index`, as written there."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


def card_load_video(path, bound=None, num_segments=32):
    """The model card's `load_video` with max_num=1 (one tile per frame, no thumbnail)."""
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    frame_indices = card_get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    frames = [Image.fromarray(vr[frame_index].asnumpy()).convert("RGB") for frame_index in frame_indices]
    return frame_indices, torch.stack([reference_tile(frame) for frame in frames])


def colour_frame(k, width, height):
    """Gradients, a moving checker and saturated bars: a wrong colour matrix, range or chroma
    position shows up in at least one of them."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(x * 255 // (width - 1) + 7 * k) % 256, y * 255 // (height - 1), (8 * k + (x // 8 + y // 8) % 2 * 60) % 256],
        axis=-1,
    ).astype(np.uint8)
    for band, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (235, 235, 16)]):
        pixels[band * height // 4 : (band + 1) * height // 4, : width // 4] = colour
    return pixels


def write_clip(path, codec, width, height, frames, pix_fmt="yuv420p", rate=25, colorspace=None, **options):
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # av's UnknownCodecError
        pytest.skip(f"no {codec} encoder in this PyAV build")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt, stream.options = width, height, pix_fmt, options
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(colour_frame(k, width, height), "rgb24").reformat(format=pix_fmt)
            if colorspace is not None:
                frame.colorspace = colorspace
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


CLIPS = {
    "mpeg4.mp4": lambda p: write_clip(p, "mpeg4", 320, 240, 30),
    "mpeg4-321x242.avi": lambda p: write_clip(p, "mpeg4", 321, 242, 47, rate=10),
    "h264-bframes.mp4": lambda p: write_clip(p, "libx264", 426, 240, 100, bf="2"),
    # a keyframe every 10 frames: load_video decodes from the one before each sampled frame, as decord does
    "h264-gop10.mkv": lambda p: write_clip(p, "libx264", 256, 144, 90, bf="3", g="10"),
    "h264-bt709.mp4": lambda p: write_clip(p, "libx264", 640, 360, 40, rate=Fraction(30000, 1001), colorspace=1),
    "h264-full-range.mp4": lambda p: write_clip(p, "libx264", 320, 240, 20, pix_fmt="yuvj420p"),
    "h264-444.mp4": lambda p: write_clip(p, "libx264", 320, 240, 20, pix_fmt="yuv444p"),
    "h264-no-count.mkv": lambda p: write_clip(p, "libx264", 256, 144, 33),
    "mjpeg-full-range.avi": lambda p: write_clip(p, "mjpeg", 160, 120, 20, pix_fmt="yuvj420p"),
    "vp9.webm": lambda p: write_clip(p, "libvpx-vp9", 200, 150, 25),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return tmp_path_factory.mktemp("decord"), {}


def clip(clips, name):
    folder, made = clips
    if name not in made:
        made[name] = CLIPS[name](folder / name)
    return made[name]


@pytest.mark.parametrize("name", sorted(CLIPS))
@pytest.mark.parametrize("num_segments,bound", [(8, None), (32, (0.3, 0.9))])
def test_same_frames_and_pixels_as_the_model_card(clips, name, num_segments, bound):
    path = clip(clips, name)
    indices, pixel_values = card_load_video(path, bound, num_segments)
    result = load_video(path, num_segments=num_segments, bound=bound)
    assert result.frame_indices == indices
    assert torch.equal(result.pixel_values, pixel_values)


@pytest.mark.parametrize(
    "name,make",
    [
        ("mpeg4-height-241.mp4", lambda p: write_clip(p, "mpeg4", 320, 241, 12)),
        ("h264-10bit.mp4", lambda p: write_clip(p, "libx264", 320, 240, 12, pix_fmt="yuv420p10le")),
    ],
)
def test_odd_height_and_10_bit_clips_differ_by_a_few_levels(tmp_path, name, make):
    """These take swscale's general path, which FFmpeg 8 (PyAV >= 16) computes differently from
    FFmpeg 4.1 (decord's wheel); with PyAV <= 15 the pixels are equal. Measured on these frames:
    about 2 levels (of 255) per channel on average, up to ~140 at a sharp colour edge."""
    path = make(tmp_path / name)
    indices, pixel_values = card_load_video(path, num_segments=8)
    result = load_video(path, num_segments=8)
    assert result.frame_indices == indices
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    levels = (result.pixel_values - pixel_values).abs() * std * 255
    assert levels.mean() < 3


def test_truncated_avi_samples_the_frames_decord_counts(tmp_path):
    """The avi header still says 30 frames: decord counts the packets left, we the frames that decode."""
    path = write_clip(tmp_path / "cut.avi", "mpeg4", 64, 48, 30, rate=10)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])
    assert len(decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)) < 30
    indices, pixel_values = card_load_video(path, num_segments=8)
    result = load_video(path, num_segments=8)
    assert result.frame_indices == indices
    assert torch.equal(result.pixel_values, pixel_values)


@pytest.mark.parametrize("matrix", [(0, 1, -1, 0), (0, -1, 1, 0), (-1, 0, 0, -1)])
def test_rotated_clip_turns_as_decord_turns_it(clips, tmp_path, matrix):
    path = tmp_path / "turned.mp4"
    path.write_bytes(clip(clips, "mpeg4.mp4").read_bytes())
    set_mp4_rotation(path, matrix)
    indices, pixel_values = card_load_video(path, num_segments=8)
    result = load_video(path, num_segments=8)
    assert result.frame_indices == indices
    assert torch.equal(result.pixel_values, pixel_values)


@pytest.mark.parametrize("bound", [None, (2.0, 4.9)])
def test_damaged_packet_fails_where_decord_fails_and_gives_its_frames_elsewhere(tmp_path, bound):
    """Frame 48's packet is damaged: a read that decodes through it raises in both, one that skips it
    gives decord's frames (decord numbers frames by the container's packets, as our seeking does). Frames
    just before the damage are left out: decord's decoding thread reads ahead and sometimes raises there."""
    _, path = damaged_clip(tmp_path)
    if bound is None:
        with pytest.raises(decord.DECORDError):
            card_load_video(path, num_segments=4)
        with pytest.raises(InputError, match="damaged video"):
            load_video(path, num_segments=4)
        return
    indices, pixel_values = card_load_video(path, bound, num_segments=4)
    result = load_video(path, num_segments=4, bound=bound)
    assert result.frame_indices == indices
    assert torch.equal(result.pixel_values, pixel_values)


def test_clip_starting_at_40_s_is_read_as_decord_reads_it(tmp_path):
    """An mp4 whose first frame shows at 40 s (its edit list starts with 40 s of nothing)."""
    path = write_h264(tmp_path / "late.mp4", 150, [1200 + k for k in range(150)])
    for num_segments, bound in [(8, None), (4, (0.5, 3.0))]:  # a bound counts from the first frame, in both
        indices, pixel_values = card_load_video(path, bound, num_segments)
        result = load_video(path, num_segments=num_segments, bound=bound)
        assert result.frame_indices == indices
        assert torch.equal(result.pixel_values, pixel_values)


def test_trimmed_clip_counts_the_frames_shown_where_decord_counts_the_trimmed_ones_too(tmp_path):
    """An edit list that trims the first 10 of 150 frames (8 of them dropped from the index by FFmpeg, 2
    kept as references and marked to be discarded): players and an in-order decode show 140 frames, decord
    counts 142 and its frames 0 and 1 are trimmed ones, so its indices and frames differ from ours."""
    path = trimmed_clip(tmp_path / "trimmed.mp4")
    assert len(decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)) == 142
    result = load_video(path, num_segments=8)
    assert result.frame_indices == card_get_index(None, 30, 139, num_segments=8)
