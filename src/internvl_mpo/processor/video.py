"""Video input: sample frames uniformly, one 448x448 tile per frame, and the `Frame{k}: <image>` prefix.

Mirrors the model card's `get_index` / `load_video` (reference section 6.1), with PyAV instead of
decord. Kept for parity:
- `get_index` arithmetic exactly: `round` is round-half-even (Python and NumPy agree), the segment
  centre is `start_idx + seg/2 + round(seg*k)` summed in that order and truncated by `int`. Without
  a bound the range is the whole video, [0, num_frames - 1] (the card's +-100000 s sentinels).
- Each frame goes through dynamic tiling with `max_num=1` (one tile, hence no thumbnail), then the
  same ToTensor + Normalize as images.
- The prompt prefix is "Frame1: <image>\\nFrame2: <image>\\n..." with a newline after every frame
  (the inference card; the MPO training code joins with "\\n" and has none after the last frame,
  reference section 13.8).
- Frames are RGB from FFmpeg's swscale with the clip's own colour matrix and range, turned
  upright when the display matrix says so (phone videos), as decord's are. Against decord 0.6.0
  (the card's reader, FFmpeg 4.1) on mpeg4, h264 (B-frames, 4:4:4, full range, BT.709-tagged),
  mjpeg and vp9 clips in mp4, avi, mkv and webm, an odd width, a truncated avi and rotated mp4s:
  the same frame count, fps, indices and bit-identical pixel_values (tests/test_video_decord.py).

Reading by seeking. Frame k is the k-th frame an in-order decode from the start gives. Where that
numbering can be known without decoding, frames are decoded from the keyframe before each sampled
frame, as decord's `get_batch` does, instead of from the start (an hour of video was ~100k frames
decoded for 8 samples): an mp4/mov or mkv/webm clip of H.264, HEVC, VP9, AV1, MPEG-4 or MJPEG, or an
avi of MJPEG, whose demuxed packets (read, not decoded) each have their own pts, none corrupt or to
be discarded, as many as the container's frame count, starting on a keyframe. Their pts in order are
the frames'; a keyframe is a start when all packets before it show before it and all after it show
after it (an open GOP's keyframe, whose leading frames need the GOP before, is none). A sampled frame
is decoded from the last start at or before it unless the decode already under way is nearer, and
every frame decoded must come out with the pts the table gives its index: if one does not (or a seek
lands off a start), the clip is decoded in order, as are all other clips (other codecs in avi: no
presentation times, wrong with B-frames; MPEG-PS/TS: seeks by searching the file, where decord's
frames go wrong; VP8 and others). A damaged packet in a stretch seeking skips is not noticed: the
frames sampled are those the packets number, as decord's are. One that a decode passes before the last
sampled frame is an InputError when a later packet decodes (the decoder has dropped its frame, or its
whole GOP, so counting on would shift every later index; decord raises there too), and ends the clip
there when none does (a cut tail).

Differences from decord, measured:
- Frames that take swscale's general path, 4:2:0 with an odd height or more than 8 bits a sample
  (10-bit video), are converted differently by FFmpeg 8 (in PyAV >= 16) than by decord's FFmpeg
  4.1: about 1-2 levels of 255 per channel on average, up to ~140 at a sharp colour edge
  (pixel_values: mean 0.02-0.04, max ~2.7). FFmpeg 7.1 (PyAV 15) gave decord's pixels there, but
  PyAV 15 converts BT.709 clips as BT.601, hence PyAV >= 17.
- In MPEG program and transport streams (.mpg, .ts) decord's seeking returns wrong frames, seen
  from 12 frames before to 14 after the index (with B-frames on any access, without them when an
  index repeats); here frames are decoded in order, so the frame is the one the index names.
- The frame count is the number of packets shown where the packets are listed (clips read by
  seeking, and any clip whose container gives no count), else the container's (`stream.frames`);
  decord always counts packets. A clip decoded in order is decoded to its end without a bound (half a
  segment more than the last sampled frame needs) to count the frames that decode; where they are
  not the frames counted (a cut or damaged tail, the packets that never decode at the start of a .ts
  cut inside a GOP), the indices are recomputed from that count and the clip decoded again. A bound's
  seconds count from the earliest pts listed, as decord's frame times do; where frames listed before
  the first that decodes never decode (that .ts), the time they span is counted before frame 0 (the
  card's `first_idx`; with B-frames the packets cut off leave gaps in it), and the frames after it are
  the packets listed from that frame on. Decord counts them as frames 0.. yet returns the frames that
  decode for them, one later after some seeks: no rule to match. An mp4
  whose edit list trims frames (a cut without re-encoding, `ffmpeg -ss T -c copy`):
  FFmpeg drops the trimmed packets it does not need and marks those it needs as references to be
  discarded, so an in-order decode gives the frames shown, as players show them; the container's
  count includes the trimmed frames, and decord counts the discarded packets as frames and returns
  trimmed pictures for its first indices. A clip that only starts late (an edit list that begins
  with empty time) reads as decord reads it; a bound counts from its first frame in both.
  Listing the packets reads the whole file, as decord's VideoReader does when it opens one: for 30
  minutes of 320x180 (54k packets, 860 MB) about 1 s from the page cache, 1.6-5.4 s from disk (PyAV's
  `index_entries` would not read it, but they give decode times, not the pts the table needs).
- A bound that selects no frames raises InputError instead of indexing outside the video, and so
  does a bound that is not two finite numbers of seconds (the card's arithmetic raises TypeError or
  OverflowError on those).
"""

import bisect
import itertools
import math
import numbers
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig
from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.processor.image import (
    AS_AN_IMAGE,
    ImageSource,
    check_pixels,
    image_to_pixel_values,
    open_image,
    pillow_identifies,
    refuse_url,
    source_name,
)
from internvl_mpo.processor.multi import planned_tiles
from internvl_mpo.processor.tiling import plan_tiles

FrameSource = str | os.PathLike | Sequence[str | os.PathLike | Image.Image]


@dataclass
class VideoInput:
    pixel_values: torch.Tensor  # (N, 3, S, S) float32, frames in order
    num_patches_list: list[int]  # tiles per frame
    frame_indices: list[int]  # which frames of the source were used
    prefix: str  # "Frame1: <image>\nFrame2: <image>\n..."


def _finite(value) -> bool:
    """A finite number; not a bool (`fps=True` read as 1 frame per second)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bound_seconds(bound) -> tuple[float, float] | None:
    """A bound as (start, end) seconds; None for no bound (None or empty, as the card's `if bound`)."""
    if bound is None or (isinstance(bound, (tuple, list)) and not bound):
        return None
    try:
        start, end = bound
    except (TypeError, ValueError):
        start = end = None
    if not (_finite(start) and _finite(end)):
        raise InputError(f"bound must be (start, end): two finite numbers of seconds, got {bound!r}")
    return start, end


def _check_segments(num_segments, image_size=None, context_length=None) -> None:
    """Refuse a frame count below 1 and, with the frames' `image_size`, one whose image tokens, one tile each, fill
    `context_length` positions (default: InternVL2.5's 32768). Chat and training pass the context they have (the
    model's max_position_embeddings, --max-seq-length); `load_video` called alone refuses too, before it decodes a
    frame (a million frames of 448-pixel tiles would take 2.4 TB)."""
    if isinstance(num_segments, bool) or not (isinstance(num_segments, numbers.Integral) and num_segments >= 1):
        raise InputError(f"num_segments must be a whole number >= 1, got {num_segments!r}")
    if context_length is not None and (isinstance(context_length, bool)
                                       or not (isinstance(context_length, numbers.Integral) and context_length >= 1)):
        raise InputError(f"context_length must be a whole number >= 1, got {context_length!r}")
    if isinstance(image_size, int) and image_size >= 1:  # a bad image_size: the tiling refuses it
        tokens = max(1, int((image_size // VisionConfig.patch_size) ** 2 * ModelConfig.downsample_ratio**2))
        context = LLMConfig.max_position_embeddings if context_length is None else context_length
        most = (context - 1) // tokens
        if num_segments > most:
            whose = " of an InternVL2.5 model" if context_length is None else ""
            raise SettingError("", "num_segments", f" must be at most {most}, got {num_segments}: more frames of "
                               f"{tokens} image token{'s' * (tokens > 1)} (a {image_size}-pixel tile) fill the "
                               f"{context}-token context{whose}")


def get_index(
    bound: tuple[float, float] | None,
    fps: float | None,
    max_frame: int,
    first_idx: int = 0,
    num_segments: int = 32,
    source: str = "",
) -> list[int]:
    """Indices of `num_segments` frames spread evenly over `bound` (seconds) or the whole video. Without a
    bound, a known `fps` scales the card's +-100000 s window (as the card does); an unknown one (None, 0)
    spans frames first_idx..max_frame. `source` names the video in the error for a bound outside it."""
    _check_segments(num_segments)
    bound = _bound_seconds(bound)
    if bound and not (_finite(fps) and fps > 0):
        raise InputError(f"fps must be a number > 0 to turn the bound {bound} (seconds) into frames, got {fps!r}")
    if bound or (_finite(fps) and fps > 0):
        start, end = bound or (-100000, 100000)
        start_idx = max(first_idx, round(start * fps))
        end_idx = min(round(end * fps), max_frame)
    else:  # no known rate: the whole video (the window above, in frames at 1 fps, would stop at frame 100000)
        start_idx, end_idx = first_idx, max_frame
    if end_idx < start_idx:
        raise InputError(
            f"{source + ': ' if source else ''}bound {bound} selects no frames (frames {start_idx}..{end_idx} of 0..{max_frame} at {fps} fps)"
        )
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * k)) for k in range(num_segments)]


def video_prefix(num_frames: int) -> str:
    return "".join(f"Frame{k + 1}: <image>\n" for k in range(num_frames))


def _import_av():
    try:
        import av
    except ImportError as e:
        raise InputError("reading video files needs PyAV: pip install av (or internvl-mpo[video])") from e
    if int(av.__version__.split(".")[0]) < 17:  # older ones convert BT.709 clips as BT.601 (module docstring)
        raise InputError(f"reading video files needs PyAV >= 17 (this is {av.__version__}): pip install -U av")
    return av


def _open_container(av, path: str):
    name = source_name(path)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # a %03d.png pattern names no file; a missing file: FFmpeg says so below
        mode = 0
    # `--video <(curl ...)`, a named pipe: read once only, and opening one waits for a writer
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise InputError(f"{name}: is a pipe, not a file: a video is read more than once (its stream planned, its "
                         "packets listed, its frames decoded); save it to a file and give that")
    try:
        # tags (title, handler, encoder) that are not UTF-8, Latin-1 say, are read with U+FFFD where the default
        # raises UnicodeDecodeError; decord opens such files
        # FFmpeg reads what comes before a colon as a protocol: a relative "12:30:00.mp4" was "Protocol not found"
        # and "file:a.mp4" opened a.mp4 (pathlib drops a "./" the caller adds); "./" + the name is read as a file
        local = path if not path or os.path.isabs(path) else os.path.join(os.curdir, path)  # "" is no file, not "./"
        return av.open(local, metadata_errors="replace")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except av.error.FFmpegError as e:  # strerror: FFmpeg's reason without the path again
        if os.path.isfile(path) and os.path.getsize(path) == 0:  # FFmpeg says "Invalid data found"
            raise InputError(f"{name}: the file is empty (0 bytes)") from None
        raise InputError(f"{name}: not a video FFmpeg can read: {e.strerror or e}") from None


def _decode_frames(
    av, path: str, wanted: set[int], max_pixels: int | None, to_end: bool = False
) -> tuple[dict[int, Image.Image], int]:
    """Decode `path` in order, keeping the frames whose index is in `wanted`; also count the frames decoded,
    up to the last wanted one, or all of them with `to_end`.

    A packet that fails to decode ends the clip there when no later packet decodes (a damaged or cut
    tail). When a later one does, the frames after the damage exist but the decoder has dropped some
    (a whole GOP for a damaged keyframe), so counting them would give later frames wrong indices:
    that is an InputError, as it is for decord, unless every wanted frame came before it (the count
    past them is then the frames that decode)."""
    kept: dict[int, Image.Image] = {}
    decoded = 0
    last = max(wanted)
    damage = None  # the first packet before the last wanted frame that failed to decode, and why
    with _open_container(av, path) as container:
        try:
            for packet in container.demux(_video_stream(container)):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as e:
                    if decoded <= last:
                        damage = damage or (packet, e)
                    continue
                if damage and packet.size:
                    raise InputError(f"{source_name(path)}: damaged video: {_damage(*damage)}, and later frames"
                                     " decode, so they cannot be numbered (their indices would shift)")
                for frame in frames:
                    if decoded in wanted:
                        kept[decoded] = _upright(frame, path, max_pixels)
                    decoded += 1
                    if decoded > last and not to_end:
                        return kept, decoded
        except av.error.FFmpegError:  # the demuxer stops at a damaged tail: the frames before it count
            pass
    if decoded == 0 and damage:
        raise InputError(f"{source_name(path)}: cannot decode video: {_damage(*damage)}")
    return kept, decoded


def _undecodable_lead(av, path: str, start: float, fps: float) -> tuple[int, int | None]:
    """How many frames the clip lists before the first that decodes, from that frame's time and `start`,
    the time of the first frame listed (a .ts cut inside a GOP starts with packets that never decode), and
    that frame's pts (None where there are none)."""
    with _open_container(av, path) as container:
        try:
            first = next(container.decode(_video_stream(container)), None)
        except av.error.FFmpegError:  # a damaged start: the decode that follows says how
            return 0, None
    if first is None or first.time is None:
        return 0, None
    return max(0, round((first.time - start) * fps)), first.pts


def _damage(packet, error) -> str:
    at = f" at {float(packet.pts * packet.time_base):.3f} s" if packet.pts is not None and packet.time_base else ""
    return f"the packet{at} does not decode ({error.strerror or error})"


@dataclass
class _FrameTable:
    pts: list[int]  # each frame's pts, in presentation order: frame k of an in-order decode has pts[k]
    starts: list[int]  # ascending frame indices of the keyframes a decode can start from


# Where a clip is read by seeking (module docstring): containers that seek by their index to a keyframe's
# pts, and in each the codecs whose every packet decodes to one frame shown at that packet's pts (an avi
# has no presentation times, so only for a codec without reordering: MJPEG, every frame a keyframe).
_SEEKABLE = {
    "mov,mp4,m4a,3gp,3g2,mj2": {"h264", "hevc", "vp9", "av1", "mpeg4", "mjpeg"},
    "matroska,webm": {"h264", "hevc", "vp9", "av1", "mpeg4", "mjpeg"},
    "avi": {"mjpeg"},
}


def _demux(av, container, stream) -> tuple[list[tuple[int | None, bool]], bool]:
    """(pts, keyframe) of each packet in decode order whose frame is shown, read without decoding, and
    whether every packet read cleanly (no error, which ends the list, and none marked corrupt or to be
    discarded: the frames an mp4 edit list trims, decoded as references but never shown)."""
    packets = []
    clean = True
    try:
        for packet in container.demux(stream):
            if packet.size > 0:
                if not packet.is_discard:
                    packets.append((packet.pts, packet.is_keyframe))
                clean = clean and not (packet.is_corrupt or packet.is_discard)
    except av.error.FFmpegError:
        clean = False  # a damaged tail: the frames before it still count
    return packets, clean


def _frame_table(packets: list[tuple[int | None, bool]], num_frames: int) -> _FrameTable | None:
    """The frame table of a clip with one frame per packet, or None where an in-order decode might number
    the frames otherwise (a pts missing or repeated, a frame count that is not the packets')."""
    pts = [p for p, _ in packets]
    if len(pts) != num_frames or None in pts or len(set(pts)) != len(pts):
        return None
    # A keyframe can start a decode when the packets before it all show before it and those after it
    # after it: it is then frame i, and no frame from i on needs a packet before it (an open GOP's
    # keyframe, whose leading frames need the GOP before, is no start).
    later_min = list(pts)
    for i in reversed(range(len(pts) - 1)):
        later_min[i] = min(pts[i], later_min[i + 1])
    starts, shown = [], None
    for i, (p, keyframe) in enumerate(packets):
        if keyframe and (shown is None or shown < p) and (i + 1 == len(pts) or p < later_min[i + 1]):
            starts.append(i)
        shown = p if shown is None else max(shown, p)
    if not starts or starts[0] != 0:
        return None
    return _FrameTable(sorted(pts), starts)


def _decode_from(container, stream, table: _FrameTable, start: int) -> tuple[Iterator, int] | None:
    """A decode from frame `start` (a start) or from an earlier start where the container's seek lands,
    and the index of its first frame; None when no seek lands on a start. Some containers seek by
    another clock than the pts (a fragmented mp4: decode time, and without a clip's start offset) and
    land on a later keyframe: the seek is then aimed earlier by as much as it overshot, twice at most."""
    target = table.pts[start]
    for _ in range(3):
        container.seek(target, stream=stream)
        frames = container.decode(stream)
        first = next(frames, None)
        if first is None or first.pts is None:
            return None
        position = bisect.bisect_left(table.pts, first.pts)
        if position <= start:
            if table.pts[position] != first.pts or position not in table.starts:
                return None
            return itertools.chain([first], frames), position
        target -= first.pts - table.pts[start]
    return None


def _seek_frames(
    av, path: str, table: _FrameTable, wanted: set[int], max_pixels: int | None
) -> dict[int, Image.Image] | None:
    """The frames at `wanted`, each decoded from the last start at or before it unless the decode already
    under way is nearer. None (decode in order instead) when a frame does not come out where the table
    puts it."""
    kept: dict[int, Image.Image] = {}
    frames, position = None, 0  # the decode under way and the index of the frame it gives next
    with _open_container(av, path) as container:
        stream = _video_stream(container)
        try:
            for index in sorted(wanted):
                start = table.starts[bisect.bisect_right(table.starts, index) - 1]
                if frames is None or start > position:
                    frames, position = _decode_from(container, stream, table, start) or (None, 0)
                    if frames is None:
                        return None
                while position <= index:
                    frame = next(frames, None)
                    if frame is None or frame.pts != table.pts[position]:
                        return None
                    if position == index:
                        kept[index] = _upright(frame, path, max_pixels)
                    position += 1
        except av.error.FFmpegError:
            return None
    return kept


# Display rotation as PyAV reports it (`frame.rotation`, degrees counterclockwise) -> PIL transpose.
_ROTATIONS = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    -180: Image.Transpose.ROTATE_180,
    -90: Image.Transpose.ROTATE_270,
}


def _upright(frame, path: str, max_pixels: int | None) -> Image.Image:
    """The frame as RGB, turned the way its display matrix says (a phone clip filmed upright comes
    out upright), as decord and players do; as in decord, a mirroring in the matrix is ignored and
    an angle that is not a multiple of 90 leaves the frame as stored. Its size is checked again: a
    stream can grow past the size its header gives (a new sequence header mid-stream)."""
    check_pixels(frame.width, frame.height, max_pixels, source_name(path))
    image = frame.to_image()
    transpose = _ROTATIONS.get(frame.rotation)
    return image.transpose(transpose) if transpose is not None else image


def _video_stream(container):
    """The stream FFmpeg ranks best (as decord's VideoReader takes it), not a cover picture that
    happens to come first; never an attached picture (an mp3's or m4a's album cover, which FFmpeg
    lists as a one-frame video stream). None when there is no other."""
    from av.stream import Disposition  # PyAV is imported by now (_import_av)

    videos = [s for s in container.streams.video if Disposition.attached_pic not in s.disposition]
    best = container.streams.best("video")
    return best if best in videos else next(iter(videos), None)


# ISO media brands of a still picture (HEIF, AVIF), which FFmpeg's mp4 reader reads as a one-frame video; the
# brands of picture sequences (avis, msf1, hevc: an animated AVIF or HEIF) stay videos, as an animated PNG does
_STILL_IMAGE_BRANDS = frozenset({"avif", "heic", "heix", "heim", "heis", "mif1"})


def _reads_an_image(container) -> bool:
    """Whether FFmpeg reads the file as a picture: with its image2 reader (which goes by the name), a `*_pipe`
    reader of one image format, its icon reader, or its mp4 reader where the file's major brand is a still
    picture's (an AVIF or HEIC photo)."""
    reader = container.format.name
    if reader == "image2" or reader.endswith("_pipe") or reader == "ico":
        return True
    return reader.startswith("mov,") and container.metadata.get("major_brand", "").strip() in _STILL_IMAGE_BRANDS


def _checked_stream(av, container, name: str, max_pixels: int | None):
    """The video stream to read (`_video_stream`); refused, before a frame is decoded, when the file is an image
    (FFmpeg reads a JPEG, PNG or WebP as a one-frame video: every sample would be that picture), when there is no
    stream, its codec cannot be decoded, or its frames have more than `max_pixels` pixels. A `%03d.png` pattern,
    which FFmpeg's image2 reader reads as a sequence of frames, names no file and is left to it."""
    reader = container.format.name
    if _reads_an_image(container) and os.path.isfile(container.name):
        if not pillow_identifies(container.name):  # image2 goes by the name alone: a text file named .jpg
            raise InputError(f"{name}: not a video (FFmpeg takes it for an image, with its {reader} reader), nor an"
                             " image Pillow can read")
        raise InputError(f"{name}: is an image, not a video (FFmpeg reads it with its {reader} reader); "
                         + AS_AN_IMAGE)
    stream = _video_stream(container)
    if stream is None:
        raise InputError(f"{name}: has no video stream" + (" (only a cover picture)" if container.streams.video else ""))
    if stream.codec_context is None:
        raise InputError(f"{name}: its video codec is one this FFmpeg (PyAV {av.__version__}) cannot decode")
    check_pixels(stream.width, stream.height, max_pixels, name)
    return stream


def _stream_frame_tiles(path: str, max_num: int, image_size: int, max_pixels: int | None) -> int:
    """The tiles of each frame of a video file, planned from its stream's frame size. The display matrix that
    turns a frame (`_upright`) comes only with decoded frames, so where turning the frame changes its tile
    count the first frame is decoded to read it (never with max_num 1: one tile whatever the shape); so it is
    where the stream gives no size (0x0: an mp4 of MPEG-4 whose first frame is damaged)."""
    av = _import_av()
    name = source_name(path)
    with _open_container(av, path) as container:
        stream = _checked_stream(av, container, name, max_pixels)
        width, height = stream.width, stream.height
        stored = None
        if width and height:
            stored, turned = (plan_tiles(w, h, 1, max_num, image_size).num_tiles for w, h in ((width, height),
                                                                                                (height, width)))
            if stored == turned:
                return stored
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError:  # a damaged start: load_video says how
            first = None
        if first is None:
            return stored or 1  # without a size: load_video refuses the clip, saying why
        if stored is None:
            width, height = first.width, first.height
        upright = (height, width) if first.rotation in (90, -90) else (width, height)
        return plan_tiles(*upright, 1, max_num, image_size).num_tiles


def planned_frame_tiles(
    src: FrameSource, num_segments: int = 8, image_size: int = 448, max_num: int = 1, max_pixels: int | None = None,
    context_length: int | None = None,
) -> list[int]:
    """The tile count of each frame `load_video(src, num_segments, image_size=..., max_num=...)` samples (no
    bound), planned before the frames are decoded, so a caller can refuse frames too many for its context
    first: from a video file's stream (all its frames have the size it gives; at most its first frame is
    decoded, `_stream_frame_tiles`), from the headers of the sampled frames of a folder or list
    (`planned_tiles`: a file object that cannot seek counts one tile). Refused as load_video refuses the
    video before decoding it (`context_length` as there)."""
    _check_segments(num_segments, image_size, context_length)
    if isinstance(src, (str, os.PathLike)):
        refuse_url(src)
        if not os.path.isdir(src):
            return [_stream_frame_tiles(os.fspath(src), max_num, image_size, max_pixels)] * num_segments
        src = frame_files(Path(src))
    if not isinstance(src, Sequence) or isinstance(src, (bytes, bytearray)) or not src:
        return [1] * num_segments  # load_video refuses it, saying why
    indices = get_index(None, None, len(src) - 1, num_segments=num_segments)
    distinct = sorted(set(indices))
    tiles = dict(zip(distinct, planned_tiles([src[i] for i in distinct], max_num, image_size=image_size,
                                             max_pixels=max_pixels)))
    return [tiles[i] for i in indices]


def _read_video(path: str, num_segments: int, bound, max_pixels: int | None) -> tuple[list[Image.Image], list[int]]:
    av = _import_av()
    name = source_name(path)
    with _open_container(av, path) as container:
        stream = _checked_stream(av, container, name, max_pixels)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        seekable = stream.codec_context.codec.canonical_name in _SEEKABLE.get(container.format.name, ())
        listed = seekable or not stream.frames
        packets, clean = _demux(av, container, stream) if listed else ([], False)
        num_frames = len(packets) if listed else stream.frames  # the container's count includes trimmed frames
        table = _frame_table(packets, stream.frames or len(packets)) if seekable and clean else None
        listed_pts = [p for p, _ in packets if p is not None]
        start = float(min(listed_pts) * stream.time_base) if listed_pts and stream.time_base else None
    if bound and fps <= 0:
        raise InputError(f"{name}: frame rate unknown, cannot apply bound {bound}")
    # a bound's seconds count from the first frame listed; frame 0 is the first that decodes, `lost` frames later
    lost, first_pts = _undecodable_lead(av, path, start, fps) if bound and table is None and start is not None \
        else (0, None)
    if lost:  # frames lost.. are the packets listed from the first that decodes on (B-frames cut off leave
        # gaps before it: counting all packets listed came one or two frames short, and a bound ended early)
        num_frames = lost + sum(p >= first_pts for p in listed_pts)
    if lost and round(bound[1] * fps) < lost:
        raise InputError(f"{name}: bound {bound} selects no frames: the first frame that decodes is at"
                         f" {lost / fps:.3f} s (the clip starts inside a GOP whose keyframe was cut off)")
    for _ in range(2):  # second round only when other than the frames counted decode
        if num_frames - lost < 1:
            raise InputError(f"{name}: no decodable video frames")
        indices = [i - lost for i in get_index(bound, fps, num_frames - 1, lost, num_segments, name)]
        kept = _seek_frames(av, path, table, set(indices), max_pixels) if table else None
        if kept is not None:
            return [kept[i] for i in indices], indices
        # without a bound the decode goes on to the end (half a segment more) to count the frames: packets
        # that never decode (a .ts cut in a GOP starts with some) would spread the indices unevenly
        kept, decoded = _decode_frames(av, path, set(indices), max_pixels, not bound)
        if len(kept) == len(set(indices)) and (bound or decoded == num_frames):
            return [kept[i] for i in indices], indices
        num_frames, table = lost + decoded, None
    raise InputError(f"{name}: only {num_frames - lost} frames decode, fewer than the sampled indices need")


def _natural_key(name: str) -> list:
    """Sort key with digit runs compared as numbers and letters without case: frame_2 before frame_10
    and Frame_3, as the official training code orders frames by their number alone."""
    return [(0, int(part), "") if part.isdecimal() else (1, 0, part.casefold())
            for part in re.split(r"(\d+)", name) if part]


# Formats Pillow names by extension but does not decode by itself (an MPEG stream it only identifies,
# Ghostscript and Windows formats, scientific stubs): a source video or a data file beside the frames.
_NOT_FRAMES = {"MPEG", "EPS", "WMF", "BUFR", "GRIB", "HDF5"}


def frame_files(folder: Path) -> list[Path]:
    """The frames `load_video` reads from `folder`, in its order; InputError when there are none. They are the
    files of the formats Pillow opens (.pdf is write-only) except those above: any other file would count as a
    frame and shift every sampled index, or fail when sampled."""
    extensions = {ext for ext, fmt in Image.registered_extensions().items()
                  if fmt in Image.OPEN and fmt not in _NOT_FRAMES}
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions),
        key=lambda p: (_natural_key(p.name), p.name),
    )
    if not files:
        raise InputError(f"{folder}: folder has no image files to use as video frames")
    return files


def _read_frames(
    frames: Sequence[ImageSource], num_segments: int, bound, fps: float | None, max_pixels: int | None, name: str
) -> tuple[list[Image.Image], list[int]]:
    if not frames:
        raise InputError(f"{name}: no frames given")
    if bound and not fps:
        raise InputError(f"{name}: a bound in seconds needs the frame rate (fps) of the frames")
    indices = get_index(bound, fps if bound else None, len(frames) - 1, num_segments=num_segments, source=name)
    opened = {i: open_image(frames[i], max_pixels=max_pixels) for i in sorted(set(indices))}
    return [opened[i] for i in indices], indices


def load_video(
    src: FrameSource,
    num_segments: int = 8,
    bound: tuple[float, float] | None = None,
    image_size: int = 448,
    max_num: int = 1,
    fps: float | None = None,
    max_pixels: int | None = None,
    frame_transform: Callable[[Image.Image], Image.Image] | None = None,
    context_length: int | None = None,
) -> VideoInput:
    """Sample `num_segments` frames from a video file, a folder of frame images or a list of frames.
    Frames of more than `max_pixels` pixels (default: Pillow's limit, about 89 M) are refused.

    `bound` is (start, end) in seconds; for frame folders and lists it needs `fps` (refused for a video file,
    whose own rate is used). A folder's
    frames are its image files in file-name order, numbers compared as numbers (frame_2 before
    frame_10). `frame_transform` (training's data augmentation) runs on each sampled frame, in
    order, before it is tiled.

    A `num_segments` whose frames (one tile each) fill `context_length` tokens is refused before the video is
    opened; the default, 32768, is InternVL2.5's context. `InternVLChat` passes its model's context and training
    its --max-seq-length.
    """
    _check_segments(num_segments, image_size, context_length)
    bound = _bound_seconds(bound)
    if fps is not None and not (_finite(fps) and fps > 0):
        raise InputError(f"fps must be a number of frames per second > 0, got {fps!r}")
    if isinstance(src, (str, os.PathLike)):
        refuse_url(src)
        path = Path(src)
        if os.path.isdir(path):  # False for a name too long to stat (Path.is_dir raises)
            frames, indices = _read_frames(frame_files(path), num_segments, bound, fps, max_pixels, str(path))
        elif fps is not None:  # it would go unused: a file's bound is read at the stream's own rate
            raise InputError(f"fps is for frame folders and lists; the video file {os.fspath(path)!r} has its own "
                             "frame rate (leave fps out)")
        else:
            frames, indices = _read_video(os.fspath(path), num_segments, bound, max_pixels)
    elif isinstance(src, Sequence) and not isinstance(src, (bytes, bytearray)):
        frames, indices = _read_frames(list(src), num_segments, bound, fps, max_pixels, "<frame list>")
    else:
        raise InputError(f"video must be a video file, a folder of frames or a list of frames, got {type(src).__name__}"
                         " (a video is read from its path, not from bytes or a file object)")
    if frame_transform is not None:
        frames = [frame_transform(f) for f in frames]
    per_frame = [image_to_pixel_values(f, max_num=max_num, image_size=image_size) for f in frames]
    return VideoInput(
        pixel_values=torch.cat(per_frame),
        num_patches_list=[t.shape[0] for t in per_frame],
        frame_indices=indices,
        prefix=video_prefix(len(frames)),
    )
