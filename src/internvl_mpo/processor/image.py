"""Open an image and turn it into normalised 448x448 tiles: `pixel_values` (N, 3, 448, 448) float32.

Mirrors the model card's `load_image` (reference section 5.2): `Image.open(f).convert('RGB')`,
`dynamic_preprocess(..., use_thumbnail=True)`, then per tile torchvision's
Resize((448, 448), BICUBIC) (a no-op on tiles that are already 448x448), ToTensor (uint8 -> float32,
divided by 255) and Normalize with the ImageNet mean/std ((x - mean) / std in float32).

Our result is bit-identical to that recipe but computed differently, for speed:
- an image that is already RGB is not copied by a `convert('RGB')`, and an image that already has
  the resized size is not resized (PIL would return a copy);
- tiles are converted in blocks straight from the resized pixels with one strided copy and three
  in-place float32 ops (the same ops, in the same order, as ToTensor + Normalize), written into
  the output tensor's memory;
- work runs on a small thread pool (Pillow and NumPy release the GIL): the thumbnail resize runs
  beside the grid resize, and the grid resize is split into Pillow's own two passes, the second
  one cut into bands of whole tile columns (or rows) that resize in parallel.
Splitting the resize is exact only because it repeats what Pillow does inside one `resize`: a
horizontal-only pass and a vertical-only pass, in the order Pillow picks, each of which depends on
one row (or column) at a time. Pillow <= 12 always runs the horizontal pass first; Pillow 13 runs
the vertical pass first when `in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)`
(src/libImaging/Resample.c, python-pillow/Pillow PR #9549). For a Pillow whose rule we have not
read we fall back to one whole-image resize. (Note the rule change itself: images that shrink much
more in height than in width get slightly different pixels under Pillow 13 than under the Pillow
versions the model was trained with; parity here is with the official recipe on the same Pillow.)

No EXIF orientation is applied (the official code does not apply it either).
"""

import contextlib
import io
import numbers
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import pairwise
from typing import BinaryIO

import numpy as np
import PIL
import torch
from PIL import Image, UnidentifiedImageError

from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.processor.tiling import TilePlan, plan_tiles

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
_WORKERS = min(4, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
# Pillow's warnings while it opens a file are held (_holding_warnings) through the hook every shown warning passes,
# swapped for the time of the open: two threads swapping it at once could restore each other's, so opens take turns.
_quiet_open = threading.Lock()
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])

# What Pillow raises while it reads a file's header (Image.open) or decodes its pixels (load), the only
# two calls guarded with it, means "this file is not a readable image": truncated data, bad headers and
# chunks give OSError, SyntaxError, ValueError or EOFError, but its readers raise other kinds on malformed
# files too (found by fuzzing the server's images: NotImplementedError from DDS, TypeError from TIFF,
# AttributeError from SPIDER), which escaped as tracebacks; so any Exception there counts, except running out
# of memory, which is the machine's state, not the file's.
_DECODE_ERRORS = (Exception,)

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://|data:")

# A file Pillow cannot read that is named as a video, or begins as one (an ISO media file of a video brand,
# Matroska/WebM, AVI, MPEG-PS, FLV), is refused with AS_A_VIDEO: the video input reads it; an image given as
# a video (processor/video.py) with AS_AN_IMAGE. The server says them in its own words.
AS_A_VIDEO = "pass it as a video (video= in Python, --video on the command line)"
AS_AN_IMAGE = "pass it as an image (images= in Python, --image on the command line)"


def pointed_elsewhere(error: Exception, video_way: str | None = None, image_way: str | None = None) -> Exception:
    """`error` where it points a video given as an image to the video input (AS_A_VIDEO), saying `video_way`
    instead, or an image given as a video to the image input (AS_AN_IMAGE), saying `image_way`: the way a
    command or file format takes the other kind (or that it takes none). Else `error` as it is."""
    for said, way in ((AS_A_VIDEO, video_way), (AS_AN_IMAGE, image_way)):
        if way is not None and said in str(error):
            return InputError(str(error).replace(said, way))
    return error
_VIDEO_SUFFIXES = frozenset(".3gp .asf .avi .flv .m2ts .m4v .mkv .mov .mp4 .mpeg .mpg .mts .ogv .ts .webm .wmv".split())
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heim", b"heis", b"heix", b"hevc", b"hevx", b"mif1", b"msf1")  # HEIF/AVIF


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="internvl-tiles")
    return _pool


def _forget_pool_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads;
    # submitting to it would wait forever, so the child starts its own pool.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def source_name(src: ImageSource) -> str:
    """How an image source is named in error messages (an empty path, or one with a newline or another
    control character, as its repr, so the message stays one line and shows it)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        return path if isinstance(path, str) and path.isprintable() and path else repr(path)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<PIL image>"
    return str(getattr(src, "name", "") or "<file object>")


def is_url(src: object) -> bool:
    """Whether `src` is a string naming a URL (scheme://... or data:...) rather than a local file."""
    return isinstance(src, str) and bool(_URL.match(src)) and not os.path.exists(src)


def beside(folder: str | os.PathLike, name: str) -> str:
    """A path named in a data file, read relative to that file's `folder`; absolute paths and URLs
    (refused later, as URLs) stay as written."""
    return name if os.path.isabs(name) or is_url(name) else os.path.join(folder, name)


def refuse_url(src: object) -> None:
    """Raise for a URL given as a path: inputs are read from local files only, nothing is downloaded."""
    if is_url(src):
        raise InputError(f"{src[:100]}: is a URL; images and videos are read from local files only (nothing is "
                         "downloaded): download it and pass its path")


def _limit(max_pixels: int | None) -> int | None:
    if max_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    # 0 was taken, and refused every image
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise SettingError("", "max_pixels", f" must be a whole number of pixels >= 1, got {max_pixels!r}")
    return max_pixels


def let_pillow_open(max_pixels: int | None) -> None:
    """Refuse a bad `max_pixels`, and raise Pillow's own `Image.MAX_IMAGE_PIXELS` to it where that is larger:
    Pillow refuses images over twice its limit whatever `max_pixels` says. For a program that owns the process (a
    command's --max-pixels), at its start; library calls leave Pillow's setting to their caller."""
    if max_pixels is not None and _limit(max_pixels) > (Image.MAX_IMAGE_PIXELS or max_pixels):
        Image.MAX_IMAGE_PIXELS = max_pixels


def _is_empty(fp: BinaryIO) -> bool:
    try:
        if not stat.S_ISREG(os.fstat(fp.fileno()).st_mode):  # /dev/zero seeks to its "end" at 0 too
            return False
    except (OSError, ValueError, AttributeError):  # no file descriptor: bytes, BytesIO
        pass
    try:
        return fp.seek(0, os.SEEK_END) == 0
    except (OSError, ValueError, AttributeError):
        return False


def _open_file(path: str | os.PathLike, name: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not an image file") from None
    except OSError as e:
        raise InputError(f"{name}: cannot open: {e.strerror or e}") from None  # strerror: without the path again
    except ValueError as e:  # a NUL in the path
        raise InputError(f"{name}: cannot open: {e}") from None


@contextlib.contextmanager
def _holding_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """The warnings this thread shows inside the block, held in the list yielded instead of shown (another thread's
    pass). They are taken at `warnings.showwarning`, the function Python documents as the one to replace to handle
    the warnings its filters let through; catch_warnings would replace the filter list, and any change to it makes
    Python forget which warnings it has shown: every module's "once per place" warnings would show again after
    each image."""
    show, opener, held = warnings.showwarning, threading.get_ident(), []

    def hold(message, category, filename, lineno, file=None, line=None) -> None:
        if threading.get_ident() == opener:
            held.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
        else:
            show(message, category, filename, lineno, file, line)

    with _quiet_open:
        warnings.showwarning = hold
        try:
            yield held
        finally:
            warnings.showwarning = show


def _pillows_pixels(error: Exception) -> int | None:
    """The pixel count in Pillow's decompression-bomb message ("Image size (N pixels) exceeds ...")."""
    counted = re.search(r"\((\d+) pixels\)", str(error))
    return int(counted[1]) if counted else None


def _embedded_size(data: bytes, bmp: bool) -> tuple[int, int] | None:
    """The size a PNG, JPEG 2000 or (`bmp`: an ICO's) BMP picture's header gives, from its first bytes; None for
    others."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"\xff\x4f\xff\x51") and len(data) >= 24:  # a JPEG 2000 codestream: SIZ's extents less offsets
        right, bottom, left, top = struct.unpack(">IIII", data[8:24])
        return right - left, bottom - top
    jp2 = data.startswith(b"\0\0\0\x0cjP  \r\n\x87\n")
    if jp2 and (at := data.find(b"ihdr", 0, 200)) >= 0 and len(data) >= at + 12:  # the file's image header box
        height, width = struct.unpack(">II", data[at + 4 : at + 12])
        return width, height
    if bmp and len(data) >= 12 and struct.unpack("<I", data[:4])[0] in (12, 40, 52, 56, 108, 124):  # a DIB header
        core = data[:4] == b"\x0c\0\0\0"  # the old BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[4:8]) if core else struct.unpack("<ii", data[4:12])
        return abs(width), abs(height) // 2  # an icon's BMP counts its mask's rows too
    return None


def _rewound(fp: BinaryIO) -> BinaryIO:
    """`fp` at its start, where `Image.open` reads a file object from; one that cannot seek (an HTTP response) read
    into memory, as `Image.open` reads it."""
    try:
        fp.seek(0)
        return fp
    except (AttributeError, io.UnsupportedOperation):
        return io.BytesIO(fp.read())


def _check_icon_pictures(fp: BinaryIO, name: str, max_pixels: int | None) -> None:
    """Refuse an ICO or ICNS file (`fp` at its start, seekable) holding a picture over the limit, from the pictures'
    own headers. Pillow takes their sizes from the directory, which says 256x256 at most, and decodes the picture
    whatever it holds (ICO while it opens the file, in `Image.open`): a 0.7 MB icon held a 13000x13000 PNG (650 MB
    once decoded)."""
    try:
        head = fp.read(8)
        pictures = []  # where each embedded picture starts
        if head[:4] == b"\0\0\1\0":  # ICO: a directory of 16-byte entries (size and offset last)
            count = struct.unpack("<H", head[4:6])[0]
            fp.seek(6)
            entries = fp.read(16 * count)
            pictures = [struct.unpack("<I", entries[i + 12 : i + 16])[0] for i in range(0, len(entries) - 15, 16)]
        elif head[:4] == b"icns":  # ICNS: blocks of a 4-byte type and a 4-byte length (header included)
            end, at = struct.unpack(">I", head[4:8])[0], 8
            while at + 8 <= end and len(pictures) < 1000:
                fp.seek(at)
                block = fp.read(8)
                length = struct.unpack(">I", block[4:8])[0] if len(block) == 8 else 0
                if length < 8:
                    break
                pictures.append(at + 8)
                at += length
        sizes = []
        for offset in pictures:
            fp.seek(offset)
            sizes.append(_embedded_size(fp.read(200), bmp=head[:4] != b"icns"))
        fp.seek(0)
    except (OSError, ValueError, struct.error):  # cut short: Pillow says what is wrong
        with contextlib.suppress(OSError, ValueError):
            fp.seek(0)
        return
    for size in sizes:
        if size is not None:
            check_pixels(*size, max_pixels, name)


def _open_pil(src: BinaryIO | bytes | bytearray, name: str, max_pixels: int | None) -> Image.Image:
    try:
        fp = _rewound(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    except MemoryError:
        raise
    except _DECODE_ERRORS as e:  # what Image.open would have raised reading it (a tar stream seeking back, say)
        raise InputError(f"{name}: cannot read image header: {e}") from None
    _check_icon_pictures(fp, name, max_pixels)
    try:
        # Pillow's warnings (a cut TIFF's "Corrupt EXIF data", two lines naming Pillow's source) are held: shown for
        # a file it opens, dropped for one refused here, whose one-line error says what is wrong. Its warning above
        # MAX_IMAGE_PIXELS is dropped: we enforce our own limit after opening instead.
        with _holding_warnings() as held:
            image = Image.open(fp)
    except Image.DecompressionBombWarning as e:  # the warning filters make Pillow's warning an error
        counted = _pillows_pixels(e)
        if counted is not None and counted > _limit(max_pixels):  # refused by the caller's limit anyway
            raise SettingError(f"{name}: {counted} pixels exceeds the limit of {_limit(max_pixels)} "
                               "(possible decompression bomb; a larger ", "max_pixels", " allows it)") from None
        raise InputError(f"{name}: over PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS} pixels), and the "
                         "warning filters make Pillow's DecompressionBombWarning an error; raise "
                         "PIL.Image.MAX_IMAGE_PIXELS to open images this large") from None
    except Image.DecompressionBombError as e:
        pillows = 2 * Image.MAX_IMAGE_PIXELS  # Pillow raises only past twice its limit
        if _limit(max_pixels) <= pillows:  # the caller's limit refuses it too: name that one, as check_pixels does
            counted = _pillows_pixels(e)  # the size is known only from Pillow's message
            size = f"{counted} pixels exceeds" if counted else f"more than {pillows} pixels, over"
            raise SettingError(f"{name}: {size} the limit of {_limit(max_pixels)} "
                               "(possible decompression bomb; a larger ", "max_pixels", " allows it)") from None
        raise InputError(
            f"{name}: refused as a possible decompression bomb ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "to open images this large"
        ) from None
    except UnidentifiedImageError:
        if _is_empty(fp):
            raise InputError(f"{name}: the file is empty (0 bytes)") from None
        if _looks_like_video(fp, name):
            raise InputError(f"{name}: not an image Pillow can read, and it looks like a video: {AS_A_VIDEO}") from None
        raise InputError(f"{name}: not an image Pillow can read") from None
    except MemoryError:
        raise
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: cannot read image header: {e}") from None
    if image.format == "MPEG":  # an MPEG-1/2 video stream (.m1v, .m2v, a .mpg without a program stream): Pillow
        # reads its sequence header's size but decodes none of it ("cannot load this image"); the file stays open
        # (a caller's file object is theirs; a path's is closed by open_image or read_size)
        raise InputError(f"{name}: not an image Pillow can read, and it looks like a video: {AS_A_VIDEO}")
    for warning in held:  # let through by the filters already (Python's default: once a place)
        if not issubclass(warning.category, Image.DecompressionBombWarning):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno, warning.file,
                                 warning.line)
    return image


def pillow_identifies(path: str) -> bool:
    """Whether Pillow reads the header of the file at `path` as an image's (one too large to open counts)."""
    try:
        with _holding_warnings():  # and dropped: its warnings about a damaged file, which the caller's message says
            Image.open(path).close()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return True
    except MemoryError:
        raise
    except _DECODE_ERRORS:
        return False
    return True


def _looks_like_video(fp: BinaryIO, name: str) -> bool:
    """Whether `name` has a video's extension or the file `fp` begins as a video does."""
    if os.path.splitext(name)[1].lower() in _VIDEO_SUFFIXES:
        return True
    try:
        fp.seek(0)
        head = fp.read(12)
    except (OSError, ValueError, AttributeError):  # a stream that cannot seek back: no telling
        return False
    return ((head[4:8] == b"ftyp" and head[8:12] not in _IMAGE_BRANDS)
            or head.startswith((b"\x1a\x45\xdf\xa3", b"\x00\x00\x01\xba", b"FLV\x01"))
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))


def open_image(src: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Open `src` (path, bytes, binary file object or PIL image) as a fully decoded RGB image.

    The pixels are those of the official `Image.open(src).convert('RGB')` for every mode Pillow
    can convert (palette, RGBA, LA, CMYK, I;16, I, F, grayscale, ...). Raises InputError naming the
    source for a missing file, a URL (nothing is downloaded), an object of another kind, data that
    is not an image, a truncated file, a zero-area image, a mode with no RGB conversion, or more
    than `max_pixels` pixels (default: Pillow's `Image.MAX_IMAGE_PIXELS`, about 89.5 M). Pillow
    itself refuses images above twice its own limit even when `max_pixels` is larger.
    """
    if isinstance(src, Image.Image):
        return _checked_rgb(src, source_name(src), max_pixels)
    name = _readable_name(src)
    if isinstance(src, (str, os.PathLike)):
        # Read through a file closed here: Pillow would keep a multi-frame file (GIF, APNG, TIFF, MPO)
        # open after decoding, to seek later frames, until the image is garbage collected.
        with _open_file(src, name) as f:
            return _checked_rgb(_open_pil(f, name, max_pixels), name, max_pixels)
    image = _open_pil(src, name, max_pixels)
    try:
        return _checked_rgb(image, name, max_pixels)
    except InputError:
        if not hasattr(src, "read"):
            image.close()  # decoded from bytes; the caller's file objects stay open
        raise


def read_size(src: ImageSource, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of `src` from its header, nothing decoded, refused as `open_image` refuses it (a
    missing file, data that is not an image, zero area, over `max_pixels`). A file object is read from its
    start, as `open_image` reads it; one that cannot seek is used up."""
    if isinstance(src, Image.Image):
        return _checked_size(src, source_name(src), max_pixels)
    name = _readable_name(src)
    with (_open_file(src, name) if isinstance(src, (str, os.PathLike)) else contextlib.nullcontext(src)) as fp:
        with _open_pil(fp, name, max_pixels) as image:
            return _checked_size(image, name, max_pixels)


def _readable_name(src: object) -> str:
    """The name of a path, bytes or file object to read an image from; other objects and URLs are refused."""
    if not isinstance(src, (str, os.PathLike, bytes, bytearray)) and not hasattr(src, "read"):
        raise InputError(f"cannot read a {type(src).__name__} as an image; give a path, bytes, a binary file "
                         "object or a PIL image (PIL.Image.fromarray makes one from an HxWx3 uint8 array)")
    refuse_url(src)
    if isinstance(src, io.TextIOBase):  # Pillow would fail decoding the image's bytes as text
        raise InputError(f"{source_name(src)}: is a file opened in text mode; open images with open(path, 'rb')")
    return source_name(src)


def check_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    """Refuse a picture (an image, a video's frames) of more than `max_pixels` pixels (default: Pillow's limit)."""
    limit = _limit(max_pixels)
    if limit is not None and width * height > limit:
        raise SettingError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
                           "(possible decompression bomb; a larger ", "max_pixels", " allows it)")


def _checked_size(image: Image.Image, name: str, max_pixels: int | None) -> tuple[int, int]:
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{name}: image has zero area ({width}x{height})")
    check_pixels(width, height, max_pixels, name)
    return width, height


def _checked_rgb(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    _checked_size(image, name, max_pixels)
    return _decoded_rgb(image, name)


def _decoded_rgb(image: Image.Image, name: str) -> Image.Image:
    """`image` fully decoded, in RGB. A lazily opened file is decoded here, once: the tiling threads
    would otherwise each start decoding it at the same time (garbled pixels or Pillow errors)."""
    if getattr(image, "fp", True) is None and image.tile:  # opened lazily, then closed before any load
        raise InputError(f"{name}: the image was closed before its pixels were read; pass it while it is open "
                         "(inside its `with Image.open(...)` block) or call its load() first")
    try:
        image.load()
    except MemoryError:
        raise
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: cannot decode image (truncated or corrupt): {e}") from None
    if image.mode == "RGB":
        return image
    if image.mode == "P" and isinstance(image.info.get("transparency"), bytes):
        # the same colours, without the warning of its convert('RGB') ("should be converted to RGBA images")
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"{name}: cannot convert image mode {image.mode!r} to RGB: {e}") from None


def _fill_tiles(block: Image.Image, out: torch.Tensor) -> None:
    """Normalise a resized block of whole tiles into `out` (rows, cols, C, S, S), in place.

    The same float32 ops as ToTensor + Normalize: x / 255, then - mean, then / std, each rounded
    to float32 (NumPy and torch both divide exactly). Done in NumPy on one thread: torch's
    intra-op threads cost more CPU than they save at this size, and the tiles already run in parallel.
    """
    rows, cols, _, s, _ = out.shape
    pixels = np.asarray(block).reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3)  # (rows, cols, C, S, S) uint8
    dst = out.numpy()
    np.copyto(dst, pixels, casting="unsafe")
    np.divide(dst, np.float32(255), out=dst)
    np.subtract(dst, _MEAN, out=dst)
    np.divide(dst, _STD, out=dst)


def _thumbnail_job(image: Image.Image, out: torch.Tensor) -> None:
    s = out.shape[-1]
    _fill_tiles(image.resize((s, s)), out.view(1, 1, 3, s, s))


def _horizontal_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool | None:
    """Pillow's order of resize passes (see the module docstring); None for an unknown Pillow."""
    if _PILLOW_MAJOR > 13:
        return None
    shrink_w, shrink_h = in_size[0] - out_size[0], in_size[1] - out_size[1]
    return _PILLOW_MAJOR < 13 or not (shrink_h > 0 and shrink_h > 2 * shrink_w)


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    return list(pairwise(round(k * n / parts) for k in range(parts + 1)))


def _resize_band(source: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], out: torch.Tensor) -> None:
    _fill_tiles(source.crop(box).resize(size), out)


def _grid_jobs(image: Image.Image, plan: TilePlan, grid: torch.Tensor) -> list[partial]:
    """Jobs that resize the grid and fill `grid` (rows, cols, C, S, S) between them.

    Runs Pillow's first pass here and returns one job per band of the second pass.
    """
    s, out_size = plan.image_size, plan.resized_size
    (in_w, in_h), (out_w, out_h) = image.size, out_size
    order = _horizontal_first(image.size, out_size)
    bands = min(_WORKERS, plan.cols if order else plan.rows)
    # Pillow checks each crop against its pixel limit; an upscaled band can hold more pixels than the image itself,
    # so a limit the image passes could refuse the band (or warn): such an image is resized whole
    widest = -(-(plan.cols if order else plan.rows) // max(bands, 1)) * s * (in_h if order else in_w)
    if order is None or bands < 2 or (Image.MAX_IMAGE_PIXELS and widest > Image.MAX_IMAGE_PIXELS):
        resized = image if image.size == out_size else image.resize(out_size)
        return [partial(_fill_tiles, resized, grid)]
    if order:  # horizontal pass on the whole image, then vertical passes on bands of tile columns
        first = image if in_w == out_w else image.resize((out_w, in_h))
        return [
            partial(_resize_band, first, (c0 * s, 0, c1 * s, in_h), ((c1 - c0) * s, out_h), grid[:, c0:c1])
            for c0, c1 in _splits(plan.cols, bands)
        ]
    first = image.resize((in_w, out_h))  # vertical pass on the whole image, then horizontal on bands of tile rows
    return [
        partial(_resize_band, first, (0, r0 * s, in_w, r1 * s), (out_w, (r1 - r0) * s), grid[r0:r1])
        for r0, r1 in _splits(plan.rows, bands)
    ]


def tiles_to_tensor(image: Image.Image, plan: TilePlan) -> torch.Tensor:
    """Normalised tiles of an RGB `image` laid out by `plan`: (N, 3, S, S) float32."""
    s = plan.image_size
    pixel_values = torch.empty((plan.num_tiles, 3, s, s), dtype=torch.float32)  # (N, C, H, W)
    pool = _thread_pool()
    pending: list[Future] = []
    if plan.has_thumbnail:
        pending.append(pool.submit(_thumbnail_job, image, pixel_values[-1]))
    grid = pixel_values[: plan.grid_tiles].view(plan.rows, plan.cols, 3, s, s)
    *others, last = _grid_jobs(image, plan, grid)
    pending += [pool.submit(job) for job in others]
    last()
    for job in pending:
        job.result()
    return pixel_values


def image_to_pixel_values(
    image: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Tile and normalise an already opened PIL image (decoded and converted to RGB first if needed)."""
    image = _decoded_rgb(image, source_name(image))
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
