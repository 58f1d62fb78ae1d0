"""Video frame sampling against an independent NumPy implementation of the model card's `get_index`,
and frame tensors against the image recipe applied to independently decoded frames."""

import contextlib
import io
import itertools
import os
import re
import struct
import threading
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.processor import video
from internvl_mpo.processor.video import get_index, load_video

av = pytest.importorskip("av")

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
FPS = 10
NUM_FRAMES = 30


def reference_index(bound, fps, max_frame, num_segments, first_idx=0):
    """The card's rule, vectorised: numpy rounds half to even, int() truncates."""
    start, end = (bound[0], bound[1]) if bound else (-100000, 100000)
    start_idx = max(first_idx, int(np.round(start * fps)))
    end_idx = min(int(np.round(end * fps)), max_frame)
    seg = float(end_idx - start_idx) / num_segments
    return [int(v) for v in (start_idx + seg / 2 + np.round(seg * np.arange(num_segments)))]


def reference_tile(frame, size=448):
    """One tile per frame (max_num=1): resize to size x size, ToTensor, Normalize."""
    pixels = np.asarray(frame.convert("RGB").resize((size, size)), np.uint8).transpose(2, 0, 1)
    return torch.from_numpy((pixels.astype(np.float32) / np.float32(255) - MEAN) / STD)


def frame_image(k, width=64, height=48):
    """Frame k: grey level 8k with a coloured bar, so frames are told apart after lossy coding."""
    pixels = np.full((height, width, 3), 8 * k, np.uint8)
    pixels[:, : 4 + k, 0] = 255
    return Image.fromarray(pixels)


def available_encoder():
    for name in ("mpeg4", "libx264", "mjpeg"):
        try:
            av.codec.Codec(name, "w")
            return name
        except ValueError:  # av's UnknownCodecError
            continue
    pytest.skip("no video encoder in this PyAV build")


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    codec = available_encoder()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for k in range(NUM_FRAMES):
            for packet in stream.encode(av.VideoFrame.from_image(frame_image(k))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_frames(path):
    with av.open(str(path)) as container:
        return [f.to_image() for f in container.decode(container.streams.video[0])]


@pytest.mark.parametrize("max_frame", [0, 1, 7, 29, 30, 99, 1000])
@pytest.mark.parametrize("num_segments", [1, 3, 4, 8, 32])
@pytest.mark.parametrize("bound", [None, (0.0, 1.0), (0.55, 2.45), (1.25, 50.0), (-3.0, 0.35)])
def test_get_index_matches_reference(max_frame, num_segments, bound):
    fps = 29.97 if max_frame > 100 else 10.0
    try:
        ours = get_index(bound, fps, max_frame, num_segments=num_segments)
    except InputError:
        start_idx = max(0, int(np.round(bound[0] * fps)))
        assert min(int(np.round(bound[1] * fps)), max_frame) < start_idx  # only empty ranges raise
        return
    assert ours == reference_index(bound, fps, max_frame, num_segments)
    assert all(0 <= i <= max_frame for i in ours)


def test_get_index_rounds_half_to_even():
    # 30 frames, 8 segments: seg = 29/8 = 3.625; k = 4 gives 14.5, which rounds to 14 (not 15),
    # so the frame is int(1.8125 + 14) = 15.
    assert get_index(None, 10.0, 29, num_segments=8) == [1, 5, 8, 12, 15, 19, 23, 26]


def test_a_frame_count_no_model_takes_is_refused_before_decoding(video_path, monkeypatch):
    """load_video(path, num_segments=10**6) called alone decoded and tiled a million frames (2.4 TB of tiles):
    chat refuses frames whose image tokens fill the model's context, and so does load_video now, at InternVL2.5's
    32768 positions, before it opens the video."""
    def no_decoding(*args):
        raise AssertionError("the video was read")

    monkeypatch.setattr(video, "_read_video", no_decoding)
    monkeypatch.setattr(video, "_stream_frame_tiles", no_decoding)
    too_many = (r"^num_segments must be at most 127, got {}: more frames of 256 image tokens \(a 448-pixel tile\) "
                r"fill the 32768-token context of an InternVL2.5 model$")
    for count in (10**6, 128):
        for read in (load_video, video.planned_frame_tiles):
            with pytest.raises(InputError, match=too_many.format(count)):
                read(video_path, num_segments=count)
        with pytest.raises(InputError, match=too_many.format(count)):
            load_video([b"never opened"], num_segments=count)
    with pytest.raises(InputError, match=r"^num_segments must be at most 32767, got 32768: .* of 1 image token \(a "):
        load_video([b"never opened"], num_segments=32768, image_size=32)
    frame = Image.new("RGB", (8, 8))
    assert len(load_video([frame], num_segments=127, image_size=112).frame_indices) == 127  # 16 tokens a frame


def test_the_frame_cap_follows_the_context_length_given(video_path, monkeypatch):
    """The cap was InternVL2.5's 32768 positions whatever the caller's context: a model (or a training run) with a
    longer one was refused frames it holds, and one with a shorter one was not refused before decoding."""
    def no_decoding(*args):
        raise AssertionError("the video was read")

    assert video.planned_frame_tiles(video_path, num_segments=128, context_length=65536) == [1] * 128
    monkeypatch.setattr(video, "_read_video", no_decoding)
    monkeypatch.setattr(video, "_stream_frame_tiles", no_decoding)
    for context, most in ((65536, 255), (4096, 15)):
        too_many = (rf"^num_segments must be at most {most}, got {most + 1}: more frames of 256 image tokens \(a "
                    rf"448-pixel tile\) fill the {context}-token context$")
        for read in (load_video, video.planned_frame_tiles):
            with pytest.raises(InputError, match=too_many):
                read(video_path, num_segments=most + 1, context_length=context)
    for bad in (0, -1, 2.5, "4096", True):
        with pytest.raises(InputError) as error:
            load_video(video_path, context_length=bad)
        assert str(error.value) == f"context_length must be a whole number >= 1, got {bad!r}"


def test_video_file(video_path):
    result = load_video(video_path, num_segments=8)
    expected_indices = reference_index(None, FPS, NUM_FRAMES - 1, 8)
    assert result.frame_indices == expected_indices
    assert result.num_patches_list == [1] * 8
    assert result.pixel_values.shape == (8, 3, 448, 448)
    assert result.prefix == "".join(f"Frame{k}: <image>\n" for k in range(1, 9))
    frames = decoded_frames(video_path)
    assert len(frames) == NUM_FRAMES
    for tile, index in zip(result.pixel_values, expected_indices):
        assert torch.equal(tile, reference_tile(frames[index]))
        grey = float((tile[1, :, 300:] * STD[1, 0, 0] + MEAN[1, 0, 0]).mean() * 255)
        assert abs(grey - 8 * index) < 4  # it really is frame `index`


def test_a_video_whose_tags_are_not_utf8_is_read(video_path, tmp_path):
    """A Latin-1 title (old tools write them) or handler name: read as decord reads such files, not PyAV's
    UnicodeDecodeError, which no interface caught (a traceback, a server 500, a generate run stopped)."""
    data = video_path.read_bytes()
    with av.open(str(video_path), "r") as container:
        handler = container.streams.video[0].metadata.get("handler_name", "")
    assert handler and handler.encode() in data, "the clip names its stream handler"
    path = tmp_path / "latin1.mp4"
    path.write_bytes(data.replace(handler.encode(), ("\u00e9" + handler[1:]).encode("latin-1")))
    result = load_video(path, num_segments=8)
    assert result.frame_indices == reference_index(None, FPS, NUM_FRAMES - 1, 8)
    assert torch.equal(result.pixel_values, load_video(video_path, num_segments=8).pixel_values)


def test_video_file_frames_over_max_pixels_are_refused(video_path):
    """max_pixels (the commands' --max-pixels) holds for a video file's frames as for images and frame folders;
    a video file's frames were not checked."""
    with pytest.raises(InputError, match=r"64x48 = 3072 pixels exceeds the limit of 3071"):
        load_video(video_path, num_segments=2, max_pixels=3071)
    assert load_video(video_path, num_segments=2, max_pixels=3072).num_patches_list == [1, 1]


def test_video_frames_that_grow_past_the_header_size_are_refused_over_max_pixels(tmp_path):
    """A raw H.264 stream of 64x48 frames, then a new sequence header and 640x480 ones: the check read only
    the size the stream starts with, so max_pixels=3072 let the 640x480 frames through."""
    try:
        av.codec.Codec("libx264", "w")
    except ValueError:  # av's UnknownCodecError
        pytest.skip("needs the libx264 encoder")

    def raw_h264(width, height):
        data = io.BytesIO()
        with av.open(data, "w", format="h264") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for k in range(10):
                for packet in stream.encode(av.VideoFrame.from_image(frame_image(k, width, height))):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return data.getvalue()

    path = tmp_path / "grows.h264"
    path.write_bytes(raw_h264(64, 48) + raw_h264(640, 480))
    with pytest.raises(InputError, match=r"grows.h264: 640x480 = 307200 pixels exceeds the limit of 3072"):
        load_video(path, num_segments=4, max_pixels=3072)
    small = load_video(path, num_segments=2, max_pixels=3072, bound=(0.0, 0.5))  # raw H.264: FFmpeg's 25 fps
    assert small.frame_indices == [3, 9]  # both among the first ten, 64x48


def test_video_file_with_bound(video_path):
    result = load_video(video_path, num_segments=4, bound=(1.0, 2.0))
    assert result.frame_indices == reference_index((1.0, 2.0), FPS, NUM_FRAMES - 1, 4)
    assert all(10 <= i <= 20 for i in result.frame_indices)


def test_frame_list_and_folder(tmp_path):
    frames = [frame_image(k) for k in range(12)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in reversed(range(12)):  # written out of order; names sort into frame order
        frames[k].save(folder / f"frame_{k:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    expected_indices = reference_index(None, 1.0, 11, 5)
    expected = torch.stack([reference_tile(frames[i]) for i in expected_indices])
    for source in (frames, sorted(folder.glob("*.png")), folder, str(folder)):
        result = load_video(source, num_segments=5)
        assert result.frame_indices == expected_indices
        assert result.num_patches_list == [1] * 5
        assert torch.equal(result.pixel_values, expected)


def test_frame_folder_with_bound_needs_fps(tmp_path):
    for k in range(6):
        frame_image(k).save(tmp_path / f"{k}.png")
    with pytest.raises(InputError, match="fps"):
        load_video(tmp_path, num_segments=2, bound=(0, 1))
    result = load_video(tmp_path, num_segments=2, bound=(0.0, 1.0), fps=2.0)
    assert result.frame_indices == reference_index((0.0, 1.0), 2.0, 5, 2)


def test_more_tiles_per_frame_when_asked(tmp_path):
    wide = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    result = load_video([wide, wide], num_segments=2, max_num=6)
    assert result.num_patches_list == [4, 4]  # 3x1 grid + thumbnail
    assert result.pixel_values.shape[0] == 8


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no image files"):
        load_video(tmp_path)


def test_missing_and_non_video_files(tmp_path):
    with pytest.raises(InputError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"definitely not a video" * 10)
    with pytest.raises(InputError, match="bogus.mp4"):
        load_video(bogus)


def test_an_empty_video_file_is_named_empty(tmp_path):
    """A 0-byte .mp4 (a download or copy that failed) read as FFmpeg's 'Invalid data found when processing input';
    an empty image was already named as empty."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    for read in (load_video, video.planned_frame_tiles):
        with pytest.raises(InputError) as error:
            read(path)
        assert str(error.value) == f"{path}: the file is empty (0 bytes)"


def test_a_video_path_with_a_newline_or_a_very_long_name_gives_a_one_line_error(tmp_path):
    with pytest.raises(InputError) as error:
        load_video(str(tmp_path / "clip.mp4") + "\n")
    assert str(error.value) == repr(str(tmp_path / "clip.mp4") + "\n") + ": no such file"
    with pytest.raises(InputError) as error:
        load_video("x" * 5000 + ".mp4")
    assert str(error.value) == "x" * 5000 + ".mp4: not a video FFmpeg can read: File name too long"


def test_a_video_given_as_a_pipe_is_refused_as_one(video_path):
    """`chat --video <(curl ...)` gives a pipe, which a video's reading opens more than once (plan, packet list,
    decode): the second open found the data used up, "not a video FFmpeg can read: Invalid data found"; and a named
    pipe with no writer yet waited forever in FFmpeg's open."""
    read_end, write_end = os.pipe()
    data = video_path.read_bytes()
    assert len(data) < 65536  # fits the pipe's buffer: the writer never waits for a reader

    def write():
        with contextlib.suppress(OSError):
            os.write(write_end, data)
        os.close(write_end)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        for read in (load_video, video.planned_frame_tiles):
            with pytest.raises(InputError, match=r"^/dev/fd/\d+: is a pipe, not a file"):
                read(f"/dev/fd/{read_end}")
    finally:
        writer.join(5)
        os.close(read_end)


def test_video_urls_are_refused_as_urls(tmp_path):
    with pytest.raises(InputError, match="^https://example.com/clip.mp4: is a URL"):
        load_video("https://example.com/clip.mp4")
    with pytest.raises(InputError, match="cannot read a ndarray as an image"):
        load_video([np.zeros((20, 30, 3), np.uint8)])


def test_video_without_frames(tmp_path):
    for name, message in [("empty.avi", "no decodable video frames"), ("empty.mp4", "no video stream")]:
        path = tmp_path / name
        with av.open(str(path), "w") as container:
            stream = container.add_stream(available_encoder(), rate=FPS)
            stream.width, stream.height = 64, 48
            container.start_encoding()  # header only; an mp4 without samples also loses the stream
        with pytest.raises(InputError, match=f"{name}.*{message}"):
            load_video(path)


def test_a_clip_none_of_whose_frames_decode_is_named_when_its_tiles_are_planned(tmp_path):
    """An mp4 of MPEG-4 whose packets are all damaged gives no frame size (0x0): planning its tiles, as chat and the
    server do before decoding, said "image has zero area (0x0)", naming no file. Now the first frame is decoded for
    its size, and where none decodes the plan is one tile a frame and load_video refuses the clip, saying why."""
    if "mpeg4" not in av.codecs_available:
        pytest.skip("no MPEG-4 encoder in this PyAV build")
    path = tmp_path / "damaged.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = 64, 48
        for k in range(NUM_FRAMES):
            for packet in stream.encode(av.VideoFrame.from_image(frame_image(k))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size:  # all zeros, the frame's header too
                data[packet.pos:packet.pos + packet.size] = bytes(packet.size)
    path.write_bytes(data)
    with av.open(str(path)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (0, 0)
    assert video.planned_frame_tiles(path) == video.planned_frame_tiles(path, max_num=6) == [1] * 8
    with pytest.raises(InputError) as error:
        load_video(path)
    assert str(error.value) == (f"{path}: cannot decode video: the packet at 0.000 s does not decode (Invalid data "
                                "found when processing input)")


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.webp", "photo.tiff", "photo.bmp"])
def test_an_image_file_is_not_a_one_frame_video(tmp_path, name):
    path = tmp_path / name
    frame_image(3).save(path)
    for read in (load_video, video.planned_frame_tiles):
        with pytest.raises(InputError, match=f"^{re.escape(str(path))}: is an image, not a video .*--image"):
            read(path)


@pytest.mark.parametrize("name", ["photo.avif", "photo.ico"])
def test_an_avif_photo_or_an_icon_is_not_a_one_frame_video(tmp_path, name):
    """FFmpeg reads an AVIF (or HEIC) photo with its mp4 reader and an icon with its ico reader, neither an image2
    or *_pipe reader: each was a one-frame clip, every FrameK that picture."""
    from PIL import features

    if name.endswith(".avif") and not features.check("avif"):
        pytest.skip("this Pillow writes no AVIF")
    path = tmp_path / name
    frame_image(3).save(path)
    for read in (load_video, video.planned_frame_tiles):
        with pytest.raises(InputError, match=f"^{re.escape(str(path))}: is an image, not a video .*--image"):
            read(path)


def test_a_text_file_named_as_an_image_is_not_called_an_image(tmp_path):
    """FFmpeg's image2 reader takes a file by its name: a text file named .jpg, or an HTML error page saved as .png,
    was called "an image, not a video" and sent to --image, where it was "not an image Pillow can read"."""
    for name, text in [("notes.jpg", "hello\n"), ("page.png", "<!DOCTYPE html><html><body>Not found</body></html>\n")]:
        path = tmp_path / name
        path.write_text(text)
        for read in (load_video, video.planned_frame_tiles):
            with pytest.raises(InputError) as error:
                read(path)
            assert str(error.value) == (f"{path}: not a video (FFmpeg takes it for an image, with its image2 reader),"
                                        " nor an image Pillow can read")
    # a TIFF cut inside its tags: Pillow's "UserWarning: Corrupt EXIF data" was printed above the message
    data = io.BytesIO()
    Image.new("RGB", (40, 30)).save(data, format="TIFF")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data.getvalue()[:20])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="nor an image Pillow can read$"):
            load_video(cut)
    assert not shown, [str(w.message) for w in shown]


def test_an_image_sequence_pattern_is_still_read_as_frames(tmp_path):
    for k in range(5):
        frame_image(k).save(tmp_path / f"f{k:03d}.png")
    clip = load_video(str(tmp_path / "f%03d.png"), num_segments=4, image_size=32)
    assert clip.frame_indices == [0, 1, 2, 3]


def test_a_song_with_an_album_cover_is_not_a_one_frame_video(tmp_path):
    """FFmpeg lists an mp3's ID3 cover picture as a video stream (an attached picture): it was read as a
    video whose every sampled frame is the cover; decord refuses such a file too."""
    try:
        av.codec.Codec("libmp3lame", "w")
    except ValueError:  # av's UnknownCodecError
        pytest.skip("needs the libmp3lame encoder")
    audio = io.BytesIO()
    with av.open(audio, "w", format="mp3", options={"write_id3v2": "0", "write_xing": "0"}) as container:
        stream = container.add_stream("libmp3lame", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16p", layout="mono")
            frame.sample_rate, frame.pts = 16000, 1152 * k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cover = io.BytesIO()
    frame_image(0).save(cover, "JPEG")
    apic = b"\x00image/jpeg\x00\x03\x00" + cover.getvalue()  # encoding, MIME type, front cover, no description
    tag = b"APIC" + struct.pack(">IH", len(apic), 0) + apic
    size = bytes((len(tag) >> shift) & 0x7F for shift in (21, 14, 7, 0))  # ID3v2 sizes are 7 bits a byte
    path = tmp_path / "song.mp3"
    path.write_bytes(b"ID3\x03\x00\x00" + size + tag + audio.getvalue())
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["audio", "video"]
    with pytest.raises(InputError) as error:
        load_video(path)
    assert str(error.value) == f"{path}: has no video stream (only a cover picture)"


def test_video_in_a_codec_ffmpeg_cannot_decode_is_named(tmp_path):
    """An mkv whose codec id FFmpeg does not know: its stream has no decoder, and reading it raised
    AttributeError ('VideoStream' object has no attribute 'width')."""
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for packet in [*stream.encode(av.VideoFrame.from_image(frame_image(0))), *stream.encode()]:
            container.mux(packet)
    data = path.read_bytes()
    assert data.count(b"V_MJPEG") == 1
    path.write_bytes(data.replace(b"V_MJPEG", b"V_QQQQQ"))
    with pytest.raises(InputError, match=r"clip.mkv: its video codec is one this FFmpeg \(PyAV .*\) cannot decode$"):
        load_video(path)


@pytest.mark.parametrize("container_format,keep", [("avi", 0.8), ("mkv", 0.6)])
def test_truncated_video_uses_the_frames_that_decode(tmp_path, container_format, keep):
    """The avi header still claims 30 frames; the mkv has no frame count, so packets are counted."""
    if available_encoder() != "mpeg4":
        pytest.skip("needs the mpeg4 encoder")
    path = tmp_path / f"cut.{container_format}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(NUM_FRAMES):
            for packet in stream.encode(av.VideoFrame.from_image(frame_image(k))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    frames = decoded_frames(path)
    assert 0 < len(frames) < NUM_FRAMES
    result = load_video(path, num_segments=8)
    assert result.frame_indices == reference_index(None, FPS, len(frames) - 1, 8)
    for tile, index in zip(result.pixel_values, result.frame_indices):
        assert torch.equal(tile, reference_tile(frames[index]))


def test_bound_outside_the_video(video_path, tmp_path):
    """The error names the video, as other errors about it do."""
    with pytest.raises(InputError, match=f"^{re.escape(str(video_path))}: bound \\(10.0, 20.0\\) selects no frames"):
        load_video(video_path, bound=(10.0, 20.0))
    for k in range(3):
        frame_image(k).save(tmp_path / f"{k}.png")
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path))}: bound \\(5, 9\\) selects no frames"):
        load_video(tmp_path, bound=(5, 9), fps=1)


@pytest.mark.parametrize(
    "bound,fps,message",
    [
        (("1", "2"), 10.0, "bound must be"),
        ((0, 1, 2), 10.0, "bound must be"),
        ((0.0, float("inf")), 10.0, "bound must be"),
        ((float("nan"), 1.0), 10.0, "bound must be"),
        (5, 10.0, "bound must be"),
        ((0.0, 1.0), float("nan"), "fps must be"),
        ((0.0, 1.0), -2.0, "fps must be"),
        ((0.0, 1.0), "10", "fps must be"),
        ((True, 3), 10.0, "bound must be"),  # a bool is not a number of seconds (True read as 1)
        ((0.0, 1.0), True, "fps must be"),
    ],
)
def test_bad_bound_or_frame_rate_is_named(bound, fps, message):
    """The card's get_index would raise TypeError, ValueError or OverflowError deep inside, or index backwards."""
    with pytest.raises(InputError, match=message):
        get_index(bound, fps, 29, num_segments=4)
    with pytest.raises(InputError, match=message):
        load_video([frame_image(k) for k in range(6)], num_segments=2, bound=bound, fps=fps)


def test_an_empty_bound_is_no_bound_as_the_cards_if_bound():
    frames = [frame_image(k) for k in range(6)]
    for empty in ((), []):
        assert get_index(empty, 10.0, 29, num_segments=8) == get_index(None, 10.0, 29, num_segments=8)
        assert load_video(frames, num_segments=3, bound=empty).frame_indices == reference_index(None, 1.0, 5, 3)


def test_bad_bound_on_a_video_file_is_named(video_path):
    with pytest.raises(InputError, match="bound must be"):
        load_video(video_path, bound=(1.0, float("inf")))


def test_fps_with_a_video_file_is_refused_not_ignored(video_path):
    """`fps` serves frame folders and lists; a file's bound was read at its own rate, the fps dropped silently."""
    with pytest.raises(InputError, match=r"fps is for frame folders and lists; the video file .* has its own frame"):
        load_video(video_path, num_segments=4, bound=(0, 1), fps=5)
    assert load_video(video_path, num_segments=4, bound=(0, 1)).frame_indices


@pytest.mark.parametrize("source", [b"\x00\x00\x00\x18ftypmp42", Image.new("RGB", (8, 8)), None, 5, "file object"])
def test_a_source_that_is_no_video_path_or_frame_list_is_named(video_path, source):
    """Bytes were read as a list of ints, a file object as a list of lines, and the rest raised TypeError."""
    with open(video_path, "rb") as file:
        with pytest.raises(InputError, match="video must be a video file, a folder of frames or a list of frames, got"):
            load_video(file if source == "file object" else source)


def test_missing_pyav_is_a_clear_error(video_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(InputError, match="pip install av"):
        load_video(video_path)
    assert load_video([frame_image(0)], num_segments=1).num_patches_list == [1]  # frames need no PyAV


def test_pyav_older_than_17_is_a_clear_error(video_path, monkeypatch):
    """Older PyAV converts BT.709 clips with the BT.601 matrix (and before 14.1 has no frame.rotation)."""
    monkeypatch.setattr(av, "__version__", "16.1.0")
    with pytest.raises(InputError, match=r"needs PyAV >= 17 \(this is 16.1.0\)"):
        load_video(video_path)


def test_frame_folder_orders_unpadded_numbers_as_numbers(tmp_path):
    frames = [frame_image(k) for k in range(12)]
    for k, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{k}.png")  # frame_10 sorts before frame_2 by name alone
    result = load_video(tmp_path, num_segments=6)
    assert result.frame_indices == reference_index(None, 1.0, 11, 6)
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i]) for i in result.frame_indices]))


def test_frame_folder_order_ignores_letter_case(tmp_path):
    """The official order is by frame number alone; Frame_3 sorted before frame_1 by its capital letter
    (a camera's IMG_ beside an editor's img_), and a superscript digit between numbers raised ValueError."""
    frames = [frame_image(k) for k in range(4)]
    for k, name in enumerate(["frame_1.png", "Frame_2.png", "FRAME_3.png", "frame_4\u00b25.png"]):
        frames[k].save(tmp_path / name)
    result = load_video(tmp_path, num_segments=8)
    assert result.frame_indices == reference_index(None, 1.0, 3, 8) == [0, 0, 1, 1, 2, 2, 2, 3]
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i]) for i in result.frame_indices]))


def test_frame_folder_skips_files_pillow_names_but_cannot_decode(tmp_path):
    """A source video, PDF or HDF5 file beside the frames (Pillow registers .mpg, .pdf and .h5) was counted
    as a frame: it shifted every index, or failed when sampled."""
    frames = [frame_image(k) for k in range(12)]
    for k, frame in enumerate(frames):
        frame.save(tmp_path / f"clip_{k:04d}.png")
    for name in ("clip.mpg", "clip.mpeg", "notes.pdf", "features.h5", "scan.eps", "zz.bufr", "zz.grib", "zz.wmf",
                 "._clip_0003.png"):  # and a hidden file (macOS's resource fork beside each copied frame)
        (tmp_path / name).write_bytes(b"\x00\x00\x01\xb3 not a frame")
    assert video.frame_files(tmp_path) == [tmp_path / f"clip_{k:04d}.png" for k in range(12)]
    result = load_video(tmp_path, num_segments=6)
    assert result.frame_indices == reference_index(None, 1.0, 11, 6)
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i]) for i in result.frame_indices]))


def test_video_file_uses_the_best_stream_not_a_cover_picture_first(tmp_path):
    path = tmp_path / "cover_first.mkv"
    codec = available_encoder()
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 24, "yuvj420p"
        clip = container.add_stream(codec, rate=FPS)
        clip.width, clip.height = 64, 48
        clip.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for packet in cover.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 24), "white"))):
            container.mux(packet)
        for packet in cover.encode():
            container.mux(packet)
        for k in range(NUM_FRAMES):
            for packet in clip.encode(av.VideoFrame.from_image(frame_image(k))):
                container.mux(packet)
        for packet in clip.encode():
            container.mux(packet)
    result = load_video(path, num_segments=4)
    assert result.frame_indices == reference_index(None, FPS, NUM_FRAMES - 1, 4)
    for tile, index in zip(result.pixel_values, result.frame_indices):
        grey = float((tile[1, :, 300:] * STD[1, 0, 0] + MEAN[1, 0, 0]).mean() * 255)
        assert abs(grey - 8 * index) < 4


def test_get_index_without_a_frame_rate_still_spans_the_video():
    assert get_index(None, 0.0, 29, num_segments=8) == get_index(None, 10.0, 29, num_segments=8)


def test_frames_without_a_bound_span_more_than_100000_frames():
    """Without a known rate the card's +-100000 s window is not scaled to 100000 frames (an hour of
    frames at 30 fps is 108,000): the frames past it were never sampled. A frame list's fps only
    turns a bound into frames."""
    whole = reference_index(None, 10.0, 149_999, 4)  # 10 fps: a window of 1,000,000 frames, no clipping
    assert whole[-1] > 100_000
    assert get_index(None, 0.0, 149_999, num_segments=4) == whole
    frames = [frame_image(0)] * 150_000
    for fps in (None, 0.5):
        assert load_video(frames, num_segments=4, fps=fps).frame_indices == whole


def set_mp4_rotation(path, matrix):
    """Write a display matrix (a, b, c, d of the 16.16 track matrix) into an mp4's only track header,
    as a phone does for a clip filmed in portrait or upside down."""
    data = bytearray(path.read_bytes())
    header = data.find(b"tkhd") - 4
    assert header >= 0 and data[header + 8] == 0  # a version-0 track header: the matrix is at byte 48
    a, b, c, d = (v * 65536 for v in matrix)
    data[header + 48 : header + 84] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    path.write_bytes(data)


@pytest.mark.parametrize(
    "matrix,transpose",
    [
        ((0, 1, -1, 0), Image.Transpose.ROTATE_270),  # shown turned 90 degrees clockwise
        ((0, -1, 1, 0), Image.Transpose.ROTATE_90),
        ((-1, 0, 0, -1), Image.Transpose.ROTATE_180),
    ],
)
def test_rotated_video_frames_come_out_upright(video_path, tmp_path, matrix, transpose):
    path = tmp_path / "turned.mp4"
    path.write_bytes(video_path.read_bytes())
    set_mp4_rotation(path, matrix)
    result = load_video(path, num_segments=4)
    frames = decoded_frames(video_path)
    for tile, index in zip(result.pixel_values, result.frame_indices):
        assert torch.equal(tile, reference_tile(frames[index].transpose(transpose)))
        assert not torch.equal(tile, reference_tile(frames[index]))


def test_bt709_clip_decodes_with_its_own_colour_matrix(tmp_path):
    """HD video is tagged BT.709; decord converts it with that matrix. PyAV before 17 used BT.601
    for every clip, off by up to ~25 levels on these bars."""
    try:
        av.codec.Codec("libx264", "w")
    except ValueError:  # av's UnknownCodecError
        pytest.skip("needs the libx264 encoder")
    bars = np.zeros((48, 64, 3), np.uint8)
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (240, 200, 40)]):
        bars[:, 16 * k : 16 * (k + 1)] = colour
    path = tmp_path / "bt709.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", {"qp": "0"}
        stream.codec_context.colorspace = 1  # BT.709, written into the h264 stream
        frame = av.VideoFrame.from_ndarray(bars, "rgb24").reformat(format="yuv420p", dst_colorspace="ITU709")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    tile = load_video(path, num_segments=1).pixel_values[0]
    levels = (tile - reference_tile(Image.fromarray(bars))).abs() * torch.from_numpy(STD) * 255
    assert levels.max() < 6  # yuv rounding only


# --- Seeking: a clip in mp4 or mkv is read by decoding from the keyframe before each sampled frame; the
# frames must be those an in-order decode numbers so (compared with `decoded_frames`, PyAV in order).


def ts_cuts(tmp_path, codec):
    """(path, packets listed, frames decoded) for a .ts cut at each transport packet within its first GOPs:
    the packets of a GOP whose keyframe was cut off are listed and never decode. MPEG-2 without B-frames, or
    H.264 with 3 (their packets come out of order: a cut can leave gaps in the pts listed)."""
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # av's UnknownCodecError
        pytest.skip(f"needs the {codec} encoder")
    whole = tmp_path / "whole.ts"
    with av.open(str(whole), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if codec == "libx264":
            stream.options = {"bf": "3", "g": "12", "x264-params": "b-adapt=0:scenecut=0"}
        else:
            stream.codec_context.gop_size = 12
        for k in range(60):
            for packet in stream.encode(av.VideoFrame.from_image(frame_image(k % 30))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data, path = whole.read_bytes(), tmp_path / "cut.ts"
    for start in range(188, len(data) // 2, 188):
        path.write_bytes(data[start:])
        with av.open(str(path)) as container:
            listed = [p for p in container.demux(container.streams.video[0]) if p.size]
        yield path, listed, decoded_frames(path)


TS_CODECS = pytest.mark.parametrize("codec", ["mpeg2video", "libx264"])


@TS_CODECS
def test_a_ts_cut_inside_a_gop_is_sampled_over_the_frames_that_decode(tmp_path, codec):
    """A .ts cut at any point starts with the packets of a GOP whose keyframe was cut off: listed, they
    never decode. The indices were spread over the packets listed, and only recomputed when one passed
    the last frame that decodes; the sampled frames were then not the segment midpoints of the clip."""
    for path, listed, frames in ts_cuts(tmp_path, codec):
        wrong = reference_index(None, FPS, len(listed) - 1, 8)
        if len(listed) > len(frames) and wrong != reference_index(None, FPS, len(frames) - 1, 8) \
                and max(wrong) < len(frames):  # no index past the last frame to tell the count was wrong
            break
    else:
        pytest.fail("no cut leaves packets that never decode")
    result = load_video(path, num_segments=8)
    assert result.frame_indices == reference_index(None, FPS, len(frames) - 1, 8)
    for tile, index in zip(result.pixel_values, result.frame_indices):
        assert torch.equal(tile, reference_tile(frames[index]))


@TS_CODECS
def test_a_bound_on_a_ts_cut_inside_a_gop_counts_seconds_from_its_first_packet(tmp_path, codec):
    """A bound's seconds count from the first frame the clip lists (as decord's frame times do), not from the
    first that decodes: the frames before it never decode, and counting from the first that does put every
    sample that many frames late. Decord's own frames there are no rule to match: it counts the packets
    that never decode and returns the frames that do, off by one more after a seek. With H.264's B-frames
    the packets cut off leave gaps in the pts before that frame: the frames were counted as the packets
    listed, one or two short, and a bound past the end ended that many frames early."""
    for path, listed, frames in ts_cuts(tmp_path, codec):
        with av.open(str(path)) as container:
            first = next(container.decode(container.streams.video[0]))
        lost = round((first.time - float(min(p.pts for p in listed) * listed[0].time_base)) * FPS)
        gaps = lost - (len(listed) - len(frames))  # none without B-frames
        if len(listed) > len(frames) and lost > 1 and (gaps > 0) == (codec == "libx264"):
            break
    else:
        pytest.fail("no cut leaves packets that never decode (with gaps in their pts for H.264)")
    assert sum(p.pts >= first.pts for p in listed) == len(frames)  # every packet from the first that decodes does
    for bound in ((lost / FPS + 0.15, 4.0), (lost / FPS + 0.15, 100.0)):
        result = load_video(path, num_segments=8, bound=bound)
        frame_times = reference_index(bound, FPS, lost + len(frames) - 1, 8, first_idx=lost)
        assert result.frame_indices == [i - lost for i in frame_times]
        for tile, index in zip(result.pixel_values, result.frame_indices):
            assert torch.equal(tile, reference_tile(frames[index]))
    too_early = (0.0, (lost - 1) / FPS)
    with pytest.raises(InputError, match=rf"bound {re.escape(str(too_early))} selects no frames: the first frame"
                                         rf" that decodes is at {lost / FPS:.3f} s"):
        load_video(path, num_segments=8, bound=too_early)


def moving_frame(k, width=64, height=48):
    """Frame k of a clip with motion (x264 codes B-frames for it); no two of the first 3072 alike."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 4 + 3 * k) % 256, (y * 5 + 2 * k) % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)
    pixels[:, k % width, 2] = 255
    pixels[k // width % height, :, 1] = 255
    return Image.fromarray(pixels)


def write_h264(path, num_frames, pts=None, time_base=Fraction(1, 30), gop=20, x264="", movflags=""):
    """An H.264 clip with 3 B-frames between references and a keyframe at most every `gop` frames;
    frame k at pts[k] (default k) in `time_base`."""
    try:
        av.codec.Codec("libx264", "w")
    except ValueError:  # av's UnknownCodecError
        pytest.skip("needs the libx264 encoder")
    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"bf": "3", "g": str(gop), "x264-params": "b-adapt=0" + x264}
        stream.codec_context.time_base = time_base
        for k in range(num_frames):
            frame = av.VideoFrame.from_image(moving_frame(k))
            frame.pts, frame.time_base = k if pts is None else pts[k], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class CountingAV:
    """PyAV whose containers count the frames their decode() and their packets' decode() give: how much
    of a clip a read decoded."""

    def __init__(self):
        self.frames = 0

    def __getattr__(self, name):
        return getattr(av, name)

    def open(self, *args, **kwargs):
        return CountingContainer(av.open(*args, **kwargs), self)


class CountingContainer:
    def __init__(self, container, counter):
        self.container, self.counter = container, counter

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.counter.frames += 1
            yield frame

    def demux(self, *args, **kwargs):
        for packet in self.container.demux(*args, **kwargs):
            yield CountingPacket(packet, self.counter)


class CountingPacket:
    def __init__(self, packet, counter):
        self.packet, self.counter = packet, counter

    def __getattr__(self, name):
        return getattr(self.packet, name)

    def decode(self):
        frames = self.packet.decode()
        self.counter.frames += len(frames)
        return frames


def vfr_pts(num_frames):
    """Frame times (1/100 s) with gaps of 1 to 7 hundredths."""
    gaps = [1, 1, 2, 3, 7, 1, 2]
    return [sum(gaps[j % 7] for j in range(k)) for k in range(num_frames)]


SEEK_CLIPS = {
    "bframes.mp4": lambda p: write_h264(p, 150),
    "bframes.mkv": lambda p: write_h264(p, 150),
    # seeks by decode time, and without the clip's start offset: a seek to a keyframe's pts lands on a later one
    "fragmented.mp4": lambda p: write_h264(p, 150, gop=3, movflags="frag_keyframe+empty_moov"),
    "fragmented-start-at-40s.mp4": lambda p: write_h264(
        p, 150, [(1200 + k) * 3000 for k in range(150)], Fraction(1, 90000), gop=3, movflags="frag_keyframe+empty_moov"
    ),
    "keyframe-every-7.mp4": lambda p: write_h264(p, 150, gop=7, x264=":scenecut=0"),
    "open-gop.mkv": lambda p: write_h264(p, 150, gop=15, x264=":open-gop=1:scenecut=0"),
    "open-gop.mp4": lambda p: write_h264(p, 150, gop=15, x264=":open-gop=1:scenecut=0"),
    "vfr.mkv": lambda p: write_h264(p, 150, vfr_pts(150), Fraction(1, 100)),
    "vfr.mp4": lambda p: write_h264(p, 150, vfr_pts(150), Fraction(1, 100)),
    "start-at-40s.mp4": lambda p: write_h264(p, 150, [1200 + k for k in range(150)]),
    "start-at-40s.mkv": lambda p: write_h264(p, 150, [1200 + k for k in range(150)]),
}


@pytest.fixture(scope="module")
def seek_clips(tmp_path_factory):
    return tmp_path_factory.mktemp("seek"), {}


@pytest.mark.parametrize("name", sorted(SEEK_CLIPS))
def test_seeking_gives_the_frames_of_an_in_order_decode(seek_clips, name, monkeypatch):
    folder, made = seek_clips
    if name not in made:
        made[name] = SEEK_CLIPS[name](folder / name)
    path = made[name]
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert any(b.pts < a.pts for a, b in itertools.pairwise(packets))  # B-frames: decode order is not display order
    frames = decoded_frames(path)
    counter, in_order = CountingAV(), []
    monkeypatch.setattr(video, "_import_av", lambda: counter)
    decode_in_order = video._decode_frames
    monkeypatch.setattr(video, "_decode_frames", lambda *args: in_order.append(args) or decode_in_order(*args))
    for num_segments, bound in [(4, None), (8, None), (32, None), (3, (1.0, 2.5)), (5, (0.2, 0.6))]:
        start = counter.frames
        try:
            result = load_video(path, num_segments=num_segments, bound=bound, image_size=64)
        except InputError as e:  # the VFR clip's rate is its average: a bound past its end selects nothing
            assert "selects no frames" in str(e) and bound
            continue
        expected = torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices])
        assert torch.equal(result.pixel_values, expected)
        if num_segments == 4 and "open-gop" not in name:  # the seeks skipped frames
            assert counter.frames - start < max(result.frame_indices) + 1
    assert not in_order  # every read was answered by seeking, none decoded in order after a failed seek


def trimmed_clip(path):
    """150 H.264 frames of which the first 10 have negative times, as `ffmpeg -ss T -c copy` writes the frames
    before T that the kept ones need: the mp4's edit list starts the clip at time 0, and the frames before
    it that are still needed are marked to be discarded."""
    return write_h264(path, 150, [k - 10 for k in range(150)])


def test_an_edit_list_trimmed_mp4_is_sampled_over_the_frames_it_shows(tmp_path):
    """The container counts all 150 frames it stores; the indices were spread over 150 where 140 are shown."""
    path = trimmed_clip(tmp_path / "trimmed.mp4")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 150
    frames = decoded_frames(path)
    assert len(frames) == 140
    for num_segments in (8, 32):
        result = load_video(path, num_segments=num_segments, image_size=64)
        assert result.frame_indices == reference_index(None, 30, 139, num_segments)
        assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices]))


def damage_packet(path, index):
    """Overwrite all but the first 8 bytes of the clip's packet `index` (in decode order) with 0xff."""
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as container:
        packet = [p for p in container.demux(container.streams.video[0]) if p.size][index]
        start, end = packet.pos + 8, packet.pos + packet.size
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(data)


def damaged_clip(folder):
    """150 H.264 frames at 30 fps, a keyframe every 20, and the packet of frame 48 (1.6 s) damaged: an
    in-order decode that goes on past it loses that frame, so every later frame would move up one index."""
    good = write_h264(folder / "good.mp4", 150, gop=20, x264=":scenecut=0")
    path = folder / "damaged.mp4"
    path.write_bytes(good.read_bytes())
    damage_packet(path, 45)
    return good, path


def test_a_damaged_packet_the_reading_passes_is_an_error_not_a_shorter_clip(tmp_path):
    """The in-order decode stopped at the damaged packet and sampled the 43 frames before it as if the clip
    ended there (indices 5..37 of 150), silently; decord raises there."""
    good, path = damaged_clip(tmp_path)
    lost = []
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            try:
                lost += packet.decode()
            except av.error.FFmpegError:
                pass
    assert len(lost) == 149 and 48 * 512 not in [f.pts for f in lost]  # decoding on past it shifts the indices
    with pytest.raises(InputError, match=r"damaged.mp4: damaged video: the packet at 1.600 s does not decode"):
        load_video(path, num_segments=4, image_size=64)  # frame 56 is decoded from the keyframe at 40, past 48


def test_a_damaged_packet_after_the_last_sampled_frame_is_no_error(tmp_path):
    """An in-order decode goes on to the end to count the frames: a damaged packet past the last sampled
    frame leaves the frames before it numbered right, so the clip is sampled over the frames that decode."""
    good = write_h264(tmp_path / "good.avi", 150, gop=20, x264=":scenecut=0")
    path = tmp_path / "damaged.avi"
    path.write_bytes(good.read_bytes())
    damage_packet(path, 145)  # frame 4 * 37.25 + 18 = 167 > 149: no sample past 130 of 150 frames
    decoded = []
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            with contextlib.suppress(av.error.FFmpegError):
                decoded += packet.decode()
    assert len(decoded) < 150
    result = load_video(path, num_segments=4, image_size=64)
    assert result.frame_indices == reference_index(None, 30, len(decoded) - 1, 4)
    frames = decoded_frames(good)
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices]))


@pytest.mark.parametrize("bound", [(0.0, 1.2), (2.0, 4.9)])
def test_a_damaged_packet_seeking_skips_leaves_the_frames_the_index_names(tmp_path, bound):
    good, path = damaged_clip(tmp_path)
    result = load_video(path, num_segments=4, bound=bound, image_size=64)
    assert result.frame_indices == reference_index(bound, 30, 149, 4)
    frames = decoded_frames(good)
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices]))


def test_seeking_a_long_clip_decodes_only_near_the_sampled_frames(tmp_path, monkeypatch):
    """A 50 s clip with a keyframe every 25 frames: 8 frames sampled over it cost at most 8 x 25 decoded
    frames, where decoding in order from the start took all 1500 up to the last one."""
    path = write_h264(tmp_path / "long.mp4", 1500, gop=25, x264=":scenecut=0")
    counter = CountingAV()
    monkeypatch.setattr(video, "_import_av", lambda: counter)
    result = load_video(path, num_segments=8, image_size=64)
    assert result.frame_indices == reference_index(None, 30, 1499, 8)
    assert counter.frames <= 8 * 25
    frames = decoded_frames(path)
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices]))


def test_an_mjpeg_avi_is_read_by_seeking(tmp_path, monkeypatch):
    """Every MJPEG frame is a keyframe: each sampled frame is the only one decoded."""
    path = tmp_path / "clip.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for k in range(200):
            for packet in stream.encode(av.VideoFrame.from_image(moving_frame(k))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    counter = CountingAV()
    monkeypatch.setattr(video, "_import_av", lambda: counter)
    result = load_video(path, num_segments=4, image_size=64)
    assert counter.frames == 4
    frames = decoded_frames(path)
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices]))


@pytest.mark.parametrize("container_format", ["ts", "avi"])
def test_clips_without_a_trusted_index_decode_in_order(tmp_path, container_format, monkeypatch):
    """MPEG-TS seeks by searching the file, and an avi of H.264 with B-frames has no presentation
    times (the decoder hands its frames out with the packets' times in decode order)."""
    path = write_h264(tmp_path / f"clip.{container_format}", 150)
    counter = CountingAV()
    monkeypatch.setattr(video, "_import_av", lambda: counter)
    result = load_video(path, num_segments=4, image_size=64)
    frames = decoded_frames(path)
    assert counter.frames == len(frames)  # one decode, to the end to count the frames
    assert torch.equal(result.pixel_values, torch.stack([reference_tile(frames[i], 64) for i in result.frame_indices]))


@pytest.mark.parametrize(
    "packets,starts",
    [
        ([(0, True), (3, False), (1, False), (2, False), (4, True), (5, False)], [0, 4]),
        # the keyframe at pts 4 of an open GOP: frames 2 and 3 show before it but need the GOP before
        ([(0, True), (1, False), (4, True), (2, False), (3, False), (5, False)], [0]),
        # a keyframe decoded after a frame shown later than it
        ([(0, True), (3, False), (2, True), (1, False), (4, False)], [0]),
        ([(100, True), (101, False), (102, True)], [0, 2]),
    ],
)
def test_frame_table_starts_only_at_keyframes_that_split_the_clip(packets, starts):
    table = video._frame_table(packets, len(packets))
    assert table.starts == starts
    assert table.pts == sorted(p for p, _ in packets)


@pytest.mark.parametrize(
    "packets,num_frames",
    [
        ([(0, True), (1, False), (None, False)], 3),  # a packet without a pts
        ([(0, True), (1, False), (1, False)], 3),  # two packets at one pts
        ([(0, True), (1, False), (2, False)], 4),  # the container counts a frame more than its packets
        ([(0, False), (1, True), (2, False)], 3),  # no keyframe first: the decoder drops frames until one
        ([(1, True), (0, False), (2, False)], 3),  # the first keyframe's leading frame needs a GOP before the clip
    ],
)
def test_frame_table_refuses_clips_an_in_order_decode_might_number_otherwise(packets, num_frames):
    assert video._frame_table(packets, num_frames) is None


class FailingPacketAV(CountingAV):
    """PyAV whose containers' packet `failing` (of those with data, in decode order) does not decode."""

    def __init__(self, failing):
        super().__init__()
        self.failing = failing

    def open(self, *args, **kwargs):
        container = CountingContainer(av.open(*args, **kwargs), self)
        packets = container.demux

        def demux(*a, **k):
            for index, packet in enumerate(p for p in packets(*a, **k) if p.size):
                yield FailingPacket(packet) if index == self.failing else packet

        container.demux = demux
        return container


class FailingPacket(CountingPacket):
    def __init__(self, packet):
        super().__init__(packet, None)

    def decode(self):
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")


def test_a_damaged_packet_at_the_last_sampled_frame_is_an_error_when_later_frames_decode(video_path):
    """The packet of the last wanted frame fails: the next packet's frame would take its index (and every
    later one move up), so it is an error, as it is for a damaged packet before the last wanted frame."""
    for failing in (5, 8):
        with pytest.raises(InputError, match=r"clip.mp4: damaged video: the packet at 0.[58]00 s does not decode"):
            video._decode_frames(FailingPacketAV(failing), str(video_path), {0, 3, failing}, None)
    # past the last wanted frame: no error, the count is the frames that decode
    kept, decoded = video._decode_frames(FailingPacketAV(9), str(video_path), {0, 3, 8}, None, to_end=True)
    assert sorted(kept) == [0, 3, 8] and decoded == NUM_FRAMES - 1


class LandingContainer:
    """A container whose seeks land on the frame with pts `lands` and decode on from there."""

    def __init__(self, pts, lands):
        self.pts, self.lands = pts, lands

    def seek(self, target, stream=None):
        pass

    def decode(self, stream):
        return iter([type("Frame", (), {"pts": p})() for p in self.pts if p >= self.lands])


def test_a_seek_that_lands_off_a_start_is_not_decoded_from():
    """A seek that lands on a keyframe that is no start (an open GOP's, whose leading frames need the GOP
    before) gives no decode: the frames after it would be wrong; the clip is then decoded in order."""
    table = video._FrameTable(pts=[0, 1, 2, 3, 4, 5], starts=[0, 3])
    assert video._decode_from(LandingContainer(table.pts, 2), None, table, 3) is None
    frames, position = video._decode_from(LandingContainer(table.pts, 0), None, table, 3)
    assert position == 0 and [f.pts for f in frames] == table.pts


def test_a_video_file_without_a_video_stream_is_named_as_other_errors_name_it(tmp_path):
    path = tmp_path / "empty\n.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(available_encoder(), rate=FPS)
        stream.width, stream.height = 64, 48
        container.start_encoding()  # an mp4 without samples loses its stream
    with pytest.raises(InputError) as error:
        load_video(path)
    assert str(error.value) == repr(str(path)) + ": has no video stream"


def test_planned_frame_tiles_are_the_tiles_load_video_makes(tmp_path):
    """planned_frame_tiles reads a video file's stream, or the sampled frames' headers, before any frame is
    decoded (InternVLChat refuses frames too many for its context with it); its counts must be those
    load_video makes. A 64x44 frame takes one tile with max_num 2, but turned upright by its display matrix (44x64) it
    takes a 1x2 grid and a thumbnail: the one case where the planner decodes the first frame, to read it."""
    from internvl_mpo.processor.video import planned_frame_tiles

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(available_encoder(), rate=FPS)
        stream.width, stream.height = 64, 44
        stream.pix_fmt = "yuvj420p" if stream.codec_context.name == "mjpeg" else "yuv420p"
        for k in range(NUM_FRAMES):
            for packet in stream.encode(av.VideoFrame.from_image(frame_image(k, 64, 44))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    turned = tmp_path / "turned.mp4"
    turned.write_bytes(path.read_bytes())
    set_mp4_rotation(turned, (0, 1, -1, 0))
    folder = tmp_path / "frames"
    folder.mkdir()
    sizes = [(64, 44), (44, 64), (200, 30), (30, 30), (90, 40)]
    frames = [frame_image(k, *size) for k, size in enumerate(sizes)]
    for k, frame in enumerate(frames):
        frame.save(folder / f"frame_{k}.png")
    expected = {(path, 2): [1] * 4, (turned, 2): [3] * 4, (turned, 1): [1] * 4, (path, 6): [7] * 4}
    for (source, max_num), tiles in expected.items():
        assert planned_frame_tiles(source, 4, 56, max_num) == tiles
        assert load_video(source, 4, image_size=56, max_num=max_num).num_patches_list == tiles
    for source in (frames, folder, [folder / f"frame_{k}.png" for k in range(len(sizes))]):
        for segments, max_num in ((4, 2), (7, 6), (2, 1)):
            planned = planned_frame_tiles(source, segments, 56, max_num)
            assert planned == load_video(source, segments, image_size=56, max_num=max_num).num_patches_list
            assert len(set(planned)) > 1 or max_num == 1
    with pytest.raises(InputError, match="exceeds the limit of 1000"):
        planned_frame_tiles(path, max_pixels=1000)
    with pytest.raises(InputError, match="gone.mp4: no such file"):
        planned_frame_tiles(tmp_path / "gone.mp4")


def test_video_benchmark_runs(tmp_path):
    """benchmarks/video.py, which the README quotes, reads the sampled frames both ways and checks them equal:
    its in-order side called video._decode_frames without the max_pixels argument that function gained, and
    stopped with a TypeError before printing a line."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "video.py"
    args = ["--minutes", "0.02", "--size", "64x48", "--gop", "10", "--segments", "4", "--rounds", "1",
            "--keep", str(tmp_path / "clip.mp4")]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "4 segments (last frame " in run.stdout and "seeking gave other frames" not in run.stderr


def test_chat_refuses_a_second_video_flag(tmp_path, capsys):
    """`chat --video a.mp4 --video b.mp4` (as --image repeats) asked about b.mp4 alone, dropping a.mp4 unsaid."""
    from internvl_mpo.cli import main

    with pytest.raises(SystemExit) as exit_:  # a wrong flag: argparse's usage and one error line, before any load
        main(["chat", "--video", str(tmp_path / "a.mp4"), "What happens?", "--video", str(tmp_path / "frames")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"internvl-mpo chat: error: --video takes one value, got "
                                            f"'{tmp_path / 'a.mp4'}' and '{tmp_path / 'frames'}'\n")


def test_video_benchmark_without_pyav_or_frames_says_so_in_one_line(tmp_path):
    """benchmarks/video.py imported av at its top: without the optional `video` extra it was a ModuleNotFoundError
    traceback; `--minutes 0` wrote no clip and ended in PyAV's FileNotFoundError traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "video.py"
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "av.py").write_text("raise ModuleNotFoundError(\"No module named 'av'\", name='av')\n")
    path = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(script), "--minutes", "0.01"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.startswith("video.py needs PyAV") and "internvl-mpo[video]" in run.stderr
    run = subprocess.run([sys.executable, str(script), "--minutes", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.splitlines()[-1].endswith("--minutes 0.0: the clip needs at least one frame (1/1800 of a minute)")


def test_a_relative_video_path_with_a_colon_is_read_as_that_file(video_path, tmp_path, monkeypatch):
    # FFmpeg takes the text before a colon for a protocol: "file:clip.mp4" opened clip.mp4, another video, and
    # "2024-05-01T12:30:00.mp4" was "Protocol not found"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(video_path.read_bytes())  # NUM_FRAMES frames
    short = tmp_path / "short.mp4"
    with av.open(str(short), "w") as container:
        codec = available_encoder()
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for k in range(3):
            for packet in stream.encode(av.VideoFrame.from_image(frame_image(k))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "file:clip.mp4").write_bytes(short.read_bytes())  # 3 frames, and named file:clip.mp4
    (tmp_path / "2024-05-01T12:30:00.mp4").write_bytes(video_path.read_bytes())
    assert load_video("file:clip.mp4", num_segments=4).frame_indices == reference_index(None, FPS, 2, 4)
    assert load_video("2024-05-01T12:30:00.mp4", num_segments=4).frame_indices == reference_index(
        None, FPS, NUM_FRAMES - 1, 4)
    with pytest.raises(InputError, match="^'': no such file$"):  # not "./", the working directory
        video.planned_frame_tiles("")
