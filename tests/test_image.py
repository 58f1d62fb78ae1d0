"""Pixel tensors against an independent PIL + NumPy implementation of the model card's `load_image`
(Image.open().convert('RGB'), dynamic_preprocess, ToTensor = uint8/255, Normalize = (x-mean)/std in
float32), against transformers' GOT-OCR2 image processor, and every bad-input case."""

import gc
import io
import os
import re
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.processor.image import image_to_pixel_values, load_image, open_image, read_size

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def reference_grid(width, height, max_num=12, size=448):
    ratios = sorted(
        {(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if 1 <= i * j <= max_num},
        key=lambda r: r[0] * r[1],
    )
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in ratios:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def reference_pixel_values(source, max_num=12, size=448):
    image = source.convert("RGB") if isinstance(source, Image.Image) else Image.open(source).convert("RGB")
    cols, rows = reference_grid(*image.size, max_num=max_num, size=size)
    resized = image.resize((cols * size, rows * size))
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((size, size)))
    arrays = [(np.asarray(t, np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255) - MEAN) / STD for t in tiles]
    return torch.from_numpy(np.stack(arrays))


def photo(width, height, seed=0):
    """Smooth colour gradients plus noise, so resampling and JPEG coding both matter."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = np.sin(x * 17 + y * 9 + np.arange(3, dtype=np.float32)) * 90 + 128 + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def assert_same(ours, expected):
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours, expected), float((ours - expected).abs().max())


@pytest.mark.parametrize(
    "size,fmt", [((1920, 1080), "JPEG"), ((448, 448), "JPEG"), ((447, 449), "PNG"), ((1, 10000), "PNG"), ((10000, 1), "PNG"), ((1, 1), "PNG"), ((800, 600), "JPEG")]
)
def test_load_image_matches_reference(tmp_path, size, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    photo(*size).save(path, format=fmt)
    assert_same(load_image(path), reference_pixel_values(path))


@pytest.mark.parametrize("max_num", [1, 6])
def test_load_image_other_max_num(tmp_path, max_num):
    path = tmp_path / "img.jpg"
    photo(1000, 700).save(path)
    assert_same(load_image(path, max_num=max_num), reference_pixel_values(path, max_num=max_num))


def test_use_thumbnail_false_drops_only_the_thumbnail(tmp_path):
    path = tmp_path / "img.png"
    photo(900, 450).save(path)
    full, bare = load_image(path), load_image(path, use_thumbnail=False)
    assert full.shape[0] == 3 and bare.shape[0] == 2
    assert torch.equal(full[:2], bare)


MODES = {
    "1": "PNG", "L": "PNG", "P": "PNG", "RGBA": "PNG", "LA": "PNG", "I;16": "PNG", "CMYK": "JPEG",
    "I": "TIFF", "F": "TIFF", "RGB": "TIFF", "YCbCr": "TIFF",
}


def image_in_mode(mode, width=300, height=200):
    base = photo(width, height, seed=3)
    if mode == "P":
        return base.quantize(50)
    if mode in ("I;16", "I", "F"):
        gray = np.asarray(base.convert("L"), np.float32)
        values = {"I;16": (gray * 250).astype(np.uint16), "I": (gray * 1000 - 40000).astype(np.int32), "F": gray / 7 - 3}[mode]
        return Image.fromarray(values)
    if mode in ("RGBA", "LA"):
        rgba = base.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.tile(np.arange(width, dtype=np.uint8), (height, 1))))
        return rgba.convert(mode)
    return base.convert(mode)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_image_mode_converts_like_the_official_open(tmp_path, mode):
    path = tmp_path / f"img.{MODES[mode].lower()}"
    image = image_in_mode(mode)
    image.save(path, format=MODES[mode])
    with Image.open(path) as check:
        if (mode, check.mode) == ("YCbCr", "RGB"):
            pytest.skip("Pillow before 13 cannot read back the YCbCr TIFF it writes (a truncated-file error)")
        # the file really has that mode (Pillow before 10.3 reads a 16-bit grayscale PNG as I)
        assert check.mode == image.mode or (mode, check.mode) == ("I;16", "I")
        official_rgb = np.asarray(check.convert("RGB"))
    rgb = open_image(path)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), official_rgb)
    assert_same(load_image(path), reference_pixel_values(path))


def test_palette_with_transparency_and_pil_modes_without_files():
    palette = image_in_mode("P")
    palette.info["transparency"] = 0
    for image in (palette, Image.new("HSV", (40, 30), (10, 200, 90)), image_in_mode("RGBA").convert("RGBa")):
        assert np.array_equal(np.asarray(open_image(image)), np.asarray(image.convert("RGB")))
        assert_same(load_image(image), reference_pixel_values(image))
    palette.info["transparency"] = bytes(range(0, 250, 5))  # one alpha a palette entry
    with warnings.catch_warnings():  # the official convert('RGB') warns "should be converted to RGBA images"
        warnings.simplefilter("ignore")
        official = np.asarray(palette.convert("RGB"))
    with warnings.catch_warnings():  # the same colours, without the warning
        warnings.simplefilter("error")
        assert np.array_equal(np.asarray(open_image(palette)), official)


def test_all_source_kinds_give_the_same_tensor(tmp_path):
    path = tmp_path / "img.jpg"
    photo(640, 480).save(path)
    expected = reference_pixel_values(path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        from_file = load_image(f)
    with Image.open(path) as pil:
        from_pil = load_image(pil)
    for ours in (load_image(str(path)), load_image(path), load_image(data), load_image(bytearray(data)), from_file, from_pil):
        assert_same(ours, expected)


def test_image_to_pixel_values_on_an_open_image():
    image = photo(1200, 500)
    assert_same(image_to_pixel_values(image, max_num=6), reference_pixel_values(image, max_num=6))


def test_image_to_pixel_values_on_a_freshly_opened_file(tmp_path):
    """An RGB file straight from Image.open is still undecoded: it must be decoded once, before the
    grid and thumbnail resizes run on two threads (each used to start its own decode of the same
    file: Pillow errors or garbled tiles, depending on timing; 20 tries hit it almost surely)."""
    path = tmp_path / "img.jpg"
    photo(800, 600).save(path)
    expected = reference_pixel_values(path)
    for _ in range(20):
        with Image.open(path) as lazy:
            assert_same(image_to_pixel_values(lazy), expected)
    with Image.open(path) as lazy:
        pass
    with pytest.raises(InputError, match="img.jpg: the image was closed before its pixels were read"):
        image_to_pixel_values(lazy)
    with pytest.raises(InputError, match="cannot convert image mode 'La' to RGB"):
        image_to_pixel_values(Image.new("La", (4, 4)))


def test_concurrent_calls_give_identical_results():
    image = photo(1000, 500)
    expected = reference_pixel_values(image)
    results = [None] * 4

    def work(k):
        results[k] = load_image(image)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert_same(r, expected)


def _tile_count(path):
    return load_image(path).shape[0]


def test_works_in_a_forked_worker_after_use_in_the_parent(tmp_path):
    """DataLoader workers fork: the child must not wait on the parent's (absent) pool threads."""
    import multiprocessing

    path = tmp_path / "img.png"
    photo(900, 450).save(path)
    assert load_image(path).shape[0] == 3  # starts the pool in this process
    with multiprocessing.get_context("fork").Pool(1) as workers:
        assert workers.apply_async(_tile_count, (path,)).get(timeout=60) == 3


def test_matches_transformers_got_ocr2_processor():
    """transformers' InternVL image processor (GOT-OCR2 tiler, PIL backend) gives the same tiles."""
    got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    processor = got_ocr2.GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448}, image_mean=list(MEAN.ravel()), image_std=list(STD.ravel()),
        crop_to_patches=True, min_patches=1, max_patches=12,
    )
    for size in [(1920, 1080), (447, 449), (30, 900)]:
        image = photo(*size)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"]
        ours = load_image(image)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-6


# --- bad input ---


def png_header_only(width, height):
    """A PNG whose header claims width x height (enough for Image.open, which reads only the header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="nope.jpg.*no such file"):
        load_image(path)


def test_a_path_with_a_newline_or_a_very_long_name_gives_a_one_line_error(tmp_path):
    """A path read from a list without strip() named itself over two lines, an empty one not at all, and a
    too-long name twice."""
    with pytest.raises(InputError) as error:
        load_image(str(tmp_path / "img.jpg") + "\n")
    assert str(error.value) == repr(str(tmp_path / "img.jpg") + "\n") + ": no such file"
    with pytest.raises(InputError, match="^'': no such file$"):
        load_image("")
    with pytest.raises(InputError) as error:
        load_image("x" * 5000 + ".jpg")
    assert str(error.value) == "x" * 5000 + ".jpg: cannot open: File name too long"


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("just some text, not pixels")
    with pytest.raises(InputError, match="notes.jpg.*not an image"):
        load_image(path)
    with pytest.raises(InputError, match="directory"):
        open_image(tmp_path)


def test_a_video_given_as_an_image_is_pointed_to_the_video_input(tmp_path):
    """A video file given as an image (`chat --image clip.mp4`) was "not an image Pillow can read", without a
    word of the video input; a video's extension, or the first bytes of one, now get that hint."""
    hint = r"not an image Pillow can read, and it looks like a video: pass it as a video \(video= in Python, --video "
    mp4 = b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2mp41" + bytes(100)
    named = tmp_path / "clip.mkv"
    named.write_bytes(b"not really a matroska file")
    unnamed = tmp_path / "clip.bin"
    unnamed.write_bytes(mp4)
    for source, name in ((named, "clip.mkv"), (unnamed, "clip.bin"), (mp4, "<128 bytes>"), (io.BytesIO(mp4), "<file "),
                         (b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(20), "<36 bytes>"),
                         (b"\x1a\x45\xdf\xa3" + bytes(40), "<44 bytes>")):
        with pytest.raises(InputError, match=re.escape(name) + ".*: " + hint):
            open_image(source)
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40)  # a HEIF image, not a video
    notes = tmp_path / "notes.txt"
    notes.write_text("just some text")
    for source in (heic, notes):
        with pytest.raises(InputError, match=r": not an image Pillow can read$"):
            open_image(source)


def test_an_mpeg_video_stream_given_as_an_image_is_pointed_to_the_video_input(tmp_path):
    """Pillow reads the size in an MPEG-1/2 video stream's sequence header (.m1v, .m2v, a .mpg that is no program
    stream) but decodes none of it: such a video was planned as 13 tiles, then refused as "cannot decode image
    (truncated or corrupt): cannot load this image", as if the file were damaged."""
    stream = b"\x00\x00\x01\xb3" + b"\x02\x80\x1e\x00" + bytes(40)  # a sequence header: 40x30
    path = tmp_path / "clip.m1v"
    path.write_bytes(stream)
    hint = ": not an image Pillow can read, and it looks like a video: pass it as a video"
    for source in (path, stream, io.BytesIO(stream)):
        for read in (open_image, read_size, load_image):
            with pytest.raises(InputError, match=re.escape(hint)):
                read(source)


def test_multi_frame_files_are_closed_after_decoding(tmp_path):
    """Pillow keeps a multi-frame file open after decoding (to seek later frames); it used to stay
    open until garbage collection, with a ResourceWarning, and as long as an RGB result lived."""
    frames = [photo(40, 30, seed=s) for s in range(3)]
    paths = [tmp_path / "anim.gif", tmp_path / "anim.png", tmp_path / "pages.tif"]
    frames[0].quantize(16).save(paths[0], save_all=True, append_images=[f.quantize(16) for f in frames[1:]])
    for path in paths[1:]:  # RGB: APNG and a multi-page TIFF
        frames[0].save(path, save_all=True, append_images=frames[1:])
    for path in paths:
        gc.collect()  # earlier tests' garbage first: a file or socket they left unclosed warned here now and then
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            rgb = open_image(path)
            with Image.open(path) as official:
                assert np.array_equal(np.asarray(rgb), np.asarray(official.convert("RGB")))  # the first frame
            del rgb
            gc.collect()
        # only this file's ("unclosed file <_io.BufferedReader name='.../anim.gif'>"): a collection also finalises
        # whatever else is garbage by then
        assert not [w for w in caught if issubclass(w.category, ResourceWarning) and str(path) in str(w.message)], \
            (path.name, [str(w.message) for w in caught])


def test_empty_file_is_named_as_empty(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    for source in (path, str(path), b""):
        with pytest.raises(InputError, match=r"(empty.jpg|<0 bytes>): the file is empty \(0 bytes\)"):
            load_image(source)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_not_named_an_empty_file():
    """/dev/zero (and /dev/urandom) seek to an "end" at 0 and were named "the file is empty (0 bytes)"."""
    with pytest.raises(InputError) as error:
        load_image("/dev/zero")
    assert str(error.value) == "/dev/zero: not an image Pillow can read"


def test_pillows_warnings_about_a_file_it_refuses_are_not_shown(tmp_path, monkeypatch):
    """A TIFF cut inside its tags printed Pillow's "UserWarning: Corrupt EXIF data", two lines naming Pillow's
    source, before the one-line error; the warnings of a file that opens still show."""
    data = io.BytesIO()
    Image.new("RGB", (40, 30)).save(data, format="TIFF")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data.getvalue()[:20])
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        with pytest.raises(Exception):
            Image.open(cut)
    if not raw:
        pytest.skip("this Pillow does not warn about the cut TIFF")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="cut.tif: not an image Pillow can read$"):
            load_image(cut)
    assert not shown, [str(w.message) for w in shown]
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30)).save(good)
    pillow_open = Image.open

    def warning_open(fp, *args, **kwargs):
        warnings.warn("Possibly corrupt EXIF data", UserWarning)
        return pillow_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", warning_open)
    with pytest.warns(UserWarning, match="Possibly corrupt EXIF data"):
        load_image(good)


def test_opening_images_leaves_other_code_warnings_shown_once(tmp_path):
    """Each open held Pillow's warnings in warnings.catch_warnings, whose change of the filter list makes Python
    forget the warnings it has shown: a user's warning from one place, shown once by Python's default filter, came
    again after every image. Run in a fresh interpreter, with Python's own filters and stderr."""
    import subprocess
    import sys

    data = io.BytesIO()
    Image.new("RGB", (40, 30)).save(data, format="TIFF")
    (tmp_path / "cut.tif").write_bytes(data.getvalue()[:20])  # refused, Pillow warning "Corrupt EXIF data"
    (tmp_path / "bomb.png").write_bytes(png_header_only(10000, 9000))  # over Pillow's limit: Pillow warns
    Image.new("P", (40, 30)).save(tmp_path / "clear.png", transparency=bytes(range(256)))  # convert('RGB') warns
    photo(40, 30).save(tmp_path / "good.png")
    script = f"""
import warnings
from internvl_mpo.processor.image import load_image, open_image

def noisy():
    warnings.warn("the user's own warning")

for _ in range(3):
    noisy()
    load_image({str(tmp_path / "good.png")!r})
    load_image({str(tmp_path / "clear.png")!r})
    for name in ("cut.tif", "bomb.png"):
        try:
            open_image({str(tmp_path)!r} + "/" + name)
        except ValueError as e:
            print(e)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("UserWarning: the user's own warning") == 1, run.stderr
    assert "Warning" not in run.stderr.replace("UserWarning: the user's own warning", ""), run.stderr
    assert run.stdout.count("not an image Pillow can read") == 3 and run.stdout.count("exceeds the limit") == 3


def test_warnings_of_other_threads_pass_while_an_image_opens(monkeypatch):
    """Pillow's warnings are held only in the thread that opens the file: another thread's warning, made while
    the open is under way, shows at once (and is not dropped with a refused file's)."""
    pillow_open, started, warned = Image.open, threading.Event(), threading.Event()

    def slow_open(fp, *args, **kwargs):
        started.set()
        assert warned.wait(10)
        warnings.warn("Corrupt EXIF data of a file refused", UserWarning)
        return pillow_open(fp, *args, **kwargs)

    def other_thread():
        assert started.wait(10)
        warnings.warn("from another thread", UserWarning)
        warned.set()

    monkeypatch.setattr(Image, "open", slow_open)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        thread = threading.Thread(target=other_thread)
        thread.start()
        with pytest.raises(InputError, match="not an image Pillow can read"):
            load_image(b"not an image")
        thread.join()
    assert [str(w.message) for w in shown] == ["from another thread"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    photo(256, 256).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    with Image.open(path) as header_ok:
        assert header_ok.size == (256, 256)  # the header survives: only a full decode notices
    with pytest.raises(InputError, match=f"cut.{fmt.lower()}.*truncated"):
        load_image(path)


def test_files_that_make_pillow_raise_odd_errors_are_input_errors():
    """Found by fuzzing the server's image input: Pillow's DDS reader raises NotImplementedError for pixel
    format flags it does not know (at open), and its TIFF reader a TypeError for a strip offset written as
    a fraction (at load); both escaped as tracebacks (a 500 from the server)."""
    out = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(out, format="DDS")
    dds = bytearray(out.getvalue())
    dds[80:84] = struct.pack("<I", 0x200000)  # DDS_PIXELFORMAT.dwFlags: no flag Pillow knows
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="TIFF")
    tiff = bytearray(out.getvalue())
    ifd = struct.unpack("<I", tiff[4:8])[0]
    for k in range(struct.unpack("<H", tiff[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", tiff[entry:entry + 2])[0] == 273:  # StripOffsets, its type made RATIONAL (5)
            tiff[entry + 2:entry + 4] = struct.pack("<H", 5)
    for data, message in ((dds, "cannot read image header: Un(known|implemented) pixel format"),  # 10.1: Unimplemented
                          (tiff, "cannot decode image .*IFDRational")):
        with pytest.raises(InputError, match=rf"^<\d+ bytes>: {message}"):
            load_image(bytes(data))


def test_running_out_of_memory_while_decoding_is_not_blamed_on_the_file(monkeypatch):
    """Every other error Pillow raises at open or load is the file's; a MemoryError is the machine's."""
    data = io.BytesIO()
    photo(40, 30).save(data, format="PNG")

    def exhausted(self, *args):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", exhausted)
    with pytest.raises(MemoryError):
        load_image(data.getvalue())
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: exhausted(None))
    with pytest.raises(MemoryError):
        load_image(data.getvalue())


def test_an_image_closed_before_loading_is_named_as_closed(tmp_path):
    path = tmp_path / "shut.png"
    photo(40, 30).save(path)
    with Image.open(path) as lazy:
        pass
    with pytest.raises(InputError, match="shut.png: the image was closed before its pixels were read"):
        load_image(lazy)
    with Image.open(path) as loaded:
        loaded.load()
    assert_same(load_image(loaded), reference_pixel_values(path))  # loaded pixels stay usable


def test_zero_area_image():
    with pytest.raises(InputError, match="zero area"):
        load_image(Image.new("RGB", (0, 5)))
    for size in ((0, 5), (5, 0), (0, 0)):  # either side zero: refused by open_image and read_size, naming the source
        for function in (open_image, read_size):
            with pytest.raises(InputError, match=rf"^<PIL image>: image has zero area \({size[0]}x{size[1]}\)$"):
                function(Image.new("RGB", size))


def test_mode_without_rgb_conversion():
    with pytest.raises(InputError, match="'La'"):
        open_image(Image.new("La", (4, 4)))


def test_decompression_bomb_refused_without_pillow_warning(tmp_path):
    just_over = tmp_path / "bomb.png"  # 10000 x 9000 = 90 M pixels > Pillow's 89.5 M: Pillow would only warn
    just_over.write_bytes(png_header_only(10000, 9000))
    far_over = tmp_path / "huge.png"  # 400 M pixels: Pillow itself raises
    far_over.write_bytes(png_header_only(20000, 20000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="bomb.png.*exceeds the limit of 89478485"):
            open_image(just_over)
        with pytest.raises(InputError, match="huge.png.*decompression bomb"):
            open_image(far_over)
        # under the caller's limit, Pillow's warning is still an error by those filters: the message says so
        with pytest.raises(InputError, match=r"bomb.png: over PIL.Image.MAX_IMAGE_PIXELS \(89478485 pixels\), and the "
                                             "warning filters make Pillow's DecompressionBombWarning an error"):
            open_image(just_over, max_pixels=100_000_000)


def test_an_image_pillow_refuses_unopened_names_the_callers_limit(tmp_path):
    """Over twice Pillow's limit, Pillow refuses the file before its size is known. Where the caller's own
    limit is exceeded too, the error names that limit and the way to raise it, as for a smaller image (it
    told command-line users and server clients to raise PIL.Image.MAX_IMAGE_PIXELS, which neither can);
    only past a caller's limit that Pillow's own stops does it point at Pillow's. The pixel count is the file's
    (it said "more than" twice Pillow's limit)."""
    far_over = tmp_path / "huge.png"  # 400 M pixels
    far_over.write_bytes(png_header_only(20000, 20000))
    for max_pixels, limit in ((None, 89478485), (40_000_000, 40000000), (178956970, 178956970)):
        with pytest.raises(InputError, match=f"huge.png: 400000000 pixels exceeds the limit of {limit} "
                                             r"\(possible decompression bomb; a larger max_pixels allows it\)") as e:
            open_image(far_over, max_pixels=max_pixels)
        assert "PIL.Image.MAX_IMAGE_PIXELS" not in str(e.value)
    with pytest.raises(InputError, match="huge.png: .*raise PIL.Image.MAX_IMAGE_PIXELS"):
        open_image(far_over, max_pixels=500_000_000)


def test_configurable_pixel_limit(tmp_path):
    path = tmp_path / "small.png"
    photo(100, 50).save(path)
    with pytest.raises(InputError, match="small.png.*5000 pixels exceeds the limit of 4999"):
        load_image(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).shape == (3, 3, 448, 448)
    for bad in (True, -1, 0, 1.5):  # True was a limit of 1 pixel ("exceeds the limit of True")
        with pytest.raises(InputError, match=rf"^max_pixels must be a whole number of pixels >= 1, got {bad!r}$"):
            load_image(path, max_pixels=bad)


def test_a_command_pixel_limit_raises_pillows_own_and_never_lowers_it(monkeypatch):
    """let_pillow_open (a command's --max-pixels): Pillow refuses images past twice its own limit whatever the
    caller allows, so a larger limit raises Pillow's; a smaller one, or none, leaves it (and a disabled one)."""
    from internvl_mpo.processor.image import let_pillow_open

    for pillows, max_pixels, after in ((1000, 5000, 5000), (1000, 500, 1000), (1000, None, 1000), (None, 5000, None)):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillows)
        let_pillow_open(max_pixels)
        assert Image.MAX_IMAGE_PIXELS == after, (pillows, max_pixels)
    with pytest.raises(InputError, match=r"^max_pixels must be a whole number of pixels >= 1, got 0$"):
        let_pillow_open(0)


def test_a_pixel_limit_of_0_is_refused_as_a_setting(tmp_path, capsys):
    """max_pixels=0 (--max-pixels 0) was taken, and refused every image as "exceeds the limit of 0": the setting
    is refused, by each command before anything loads, in its own words."""
    from internvl_mpo.cli import main
    from internvl_mpo.processor.video import load_video

    path = tmp_path / "small.png"
    photo(10, 10).save(path)
    for read in (load_image, open_image, read_size, lambda p, max_pixels: load_video([p], 1, max_pixels=max_pixels)):
        with pytest.raises(InputError, match=r"^max_pixels must be a whole number of pixels >= 1, got 0$"):
            read(path, max_pixels=0)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("")
    for command in (["chat", "Hi"], ["generate", "--input", str(requests), "--output", str(tmp_path / "a.jsonl")],
                    ["tiles", str(path)], ["pairs", "correctness", "--model", "m", "--input", str(requests),
                                           "--output", str(tmp_path / "pairs")],
                    ["eval", "--data", str(requests)], ["train", "mpo", "--model", "m", "--data", "meta.json",
                                                        "--output", str(tmp_path / "run")]):
        assert main([*command, "--max-pixels", "0"]) == 1
        assert capsys.readouterr().err == (f"internvl-mpo {command[0]}: error: --max-pixels must be a whole number "
                                           "of pixels >= 1, got 0\n")


def test_bytes_and_file_objects_are_named_in_errors():
    with pytest.raises(InputError, match="<12 bytes>"):
        open_image(b"not an image")
    stream = io.BytesIO(b"not an image either")
    with pytest.raises(InputError, match="<file object>"):
        open_image(stream)


def test_a_file_opened_in_text_mode_is_named_as_such(tmp_path):
    path = tmp_path / "photo.png"
    photo(60, 40).save(path)
    with open(path) as text:  # Pillow read it as text: "'utf-8' codec can't decode byte 0x89"
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: is a file opened in text mode; .*'rb'"):
            load_image(text)


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "http://host/a.png", "data:image/png;base64,iVBOR"])
def test_urls_are_refused_as_urls_not_as_missing_files(url):
    with pytest.raises(InputError, match="is a URL.*local files only"):
        load_image(url)


@pytest.mark.parametrize("source", [np.zeros((20, 30, 3), np.uint8), torch.zeros(3, 20, 30), None, 7])
def test_sources_that_are_not_images_name_their_type(source):
    with pytest.raises(InputError, match=f"cannot read a {type(source).__name__} as an image; give a path"):
        load_image(source)


def test_split_resize_is_exact_across_many_shapes():
    """The grid resize is split into Pillow's two passes and run in bands; sweep shapes that take
    either pass order (tall images shrink height first on Pillow 13) and every band layout."""
    rng = np.random.default_rng(7)
    shapes = [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(60)]
    shapes += [(40, 900), (900, 40), (300, 1200), (1200, 300), (64, 64), (33, 640), (640, 33)]
    for width, height in shapes:
        image = photo(width, height, seed=width * 1000 + height)
        for max_num in (6, 12):
            ours = image_to_pixel_values(image, max_num=max_num, image_size=32)
            assert torch.equal(ours, reference_pixel_values(image, max_num=max_num, size=32)), (width, height, max_num)



def test_a_pixel_limit_the_image_passes_does_not_refuse_its_upscaled_bands(monkeypatch):
    """The bands of the split resize are crops of the image after Pillow's first pass, which Pillow checks against
    its pixel limit: an upscaled 200 x 540 image (108,000 pixels) has bands of 448 x 540 (241,920), so a limit of
    110,000 the image passes raised DecompressionBombError from inside load_image (and a band between the limit and
    twice it warned), where the official code (448 x 448 crops) tiles it. Such an image is resized whole."""
    import internvl_mpo.processor.image as image_module

    monkeypatch.setattr(image_module, "_WORKERS", 2)  # bands whatever this machine's cores
    image = photo(200, 540, seed=3)
    expected = reference_pixel_values(image, max_num=12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 110_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert torch.equal(image_to_pixel_values(image, max_num=12), expected)


# --- several images in one prompt (processor/multi.py) ---


def test_separate_images_prefix_counts_and_pixels():
    from internvl_mpo.processor.multi import load_images

    images = [photo(900, 450, seed=1), photo(300, 300, seed=2), photo(200, 800, seed=3)]
    result = load_images(images, max_num=6)
    expected = [reference_pixel_values(img, max_num=6) for img in images]
    assert result.num_patches_list == [e.shape[0] for e in expected] == [3, 1, 5]
    assert result.prefix == "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n"
    assert torch.equal(result.pixel_values, torch.cat(expected))


def test_combined_images_share_one_placeholder():
    from internvl_mpo.processor.multi import load_images

    images = [photo(900, 450, seed=1), photo(300, 300, seed=2)]
    result = load_images(images, max_num=[2, 12], combined=True)
    assert result.prefix == "<image>\n"
    assert result.num_patches_list == [3 + 1]
    assert torch.equal(result.pixel_values, torch.cat([reference_pixel_values(images[0], max_num=2), reference_pixel_values(images[1])]))
    assert load_images(images[:1]).prefix == "<image>\n"  # one image: the card's plain placeholder


def test_tile_budget_follows_the_official_evaluation_rule():
    from internvl_mpo.processor.multi import (
        OFFICIAL_EVAL_TILE_BUDGET,
        load_images,
        per_image_max_num,
        planned_tiles,
    )

    # VLMEvalKit: max_num = max(1, min(max_num, total_max_num // n_images)), total_max_num = 64.
    assert OFFICIAL_EVAL_TILE_BUDGET == 64
    assert per_image_max_num(12, 2, 64) == [12, 12]
    assert per_image_max_num(12, 5, 64) == [12] * 5  # 64 // 5 = 12: thumbnails can push the total to 65
    assert per_image_max_num(12, 10, 64) == [6] * 10
    assert per_image_max_num(12, 100, 64) == [1] * 100
    assert per_image_max_num([2, 24, 9], 3, 30) == [2, 10, 9]
    assert per_image_max_num(12, 3) == [12, 12, 12]
    assert per_image_max_num(np.int64(12), 2, np.int64(9)) == [4, 4]  # NumPy integers, as load_image takes them
    wide = photo(1600, 400)
    result = load_images([wide] * 3, max_num=12, total_budget=9)  # each image capped at 3 tiles
    assert result.num_patches_list == [4, 4, 4]
    assert torch.equal(result.pixel_values[:4], reference_pixel_values(wide, max_num=3))
    # a min_num above an image's own max_num (given, or cut by the budget) comes down to it, not a refusal
    for settings, expected in ((dict(max_num=[2, 12]), [3, 5]), (dict(max_num=12, total_budget=4), [3, 3])):
        assert load_images([wide, wide], min_num=4, **settings).num_patches_list == expected
        assert planned_tiles([wide, wide], min_num=4, **settings) == expected


def test_multi_image_bad_input():
    from internvl_mpo.processor.multi import load_images

    with pytest.raises(InputError, match="no images"):
        load_images([])
    with pytest.raises(InputError, match="2 max_num values for 3 images"):
        load_images([photo(10, 10)] * 3, max_num=[1, 2])
    with pytest.raises(InputError, match="budget"):
        load_images([photo(10, 10)], total_budget=0)
    with pytest.raises(InputError, match="gone.png"):
        load_images([photo(10, 10), "gone.png"])
    for bad in (2.5, "6", [3, 0], True, [True, 2]):  # a bool was read as 1
        with pytest.raises(InputError, match="max_num must be a whole number of tiles >= 1"):
            load_images([photo(10, 10)] * 2, max_num=bad)
    with pytest.raises(InputError, match="^total tile budget must be a whole number >= 1, got True$"):
        load_images([photo(10, 10)], total_budget=True)


def test_multi_image_one_image_instead_of_a_list(tmp_path):
    """A single path used to be read as a list of one-character paths ('/: is a directory')."""
    from internvl_mpo.processor.multi import load_images

    path = tmp_path / "one.png"
    photo(20, 10).save(path)
    for single in (str(path), path, path.read_bytes(), photo(20, 10)):
        with pytest.raises(InputError, match=f"images must be a list of images, got one {type(single).__name__}"):
            load_images(single)
    with open(path, "rb") as f:  # a file object is one image too (it had no len())
        with pytest.raises(InputError, match=r"images must be a list of images, got one BufferedReader \(.*one.png\)"):
            load_images(f)
    with pytest.raises(InputError, match="total tile budget must be a whole number >= 1, got 2.5"):
        load_images([path], total_budget=2.5)
    assert load_images([path]).num_patches_list == [3]


def test_multi_image_takes_an_ordered_list_not_a_generator_or_set(tmp_path):
    """As the README says, a list (or tuple): a generator gave "has no len()", and planned_tiles would use it up
    before load_images read it; a set has no order for Image-1, Image-2."""
    from internvl_mpo.processor.multi import load_images, planned_tiles

    path = tmp_path / "one.png"
    photo(20, 10).save(path)
    for function in load_images, planned_tiles:
        with pytest.raises(InputError, match=r"^images must be a list of images, got a generator; pass list\(images\)"):
            function(p for p in [path])
        with pytest.raises(InputError, match="^images must be a list of images, got a set"):
            function({path})
    assert planned_tiles((path, path)) == [3, 3] and load_images((path,)).num_patches_list == [3]


class Pipe(io.RawIOBase):
    """A stream that cannot seek, as a pipe or an HTTP response."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.data.readinto(buffer)


def test_planned_tiles_are_the_tiles_load_images_makes(tmp_path):
    """planned_tiles reads only the headers (InternVLChat refuses images too large for its context with it,
    before a tile is made); its counts must be those load_images makes. A stream that cannot seek is
    counted as one tile and still loads: its header cannot be read ahead of its pixels. Both are
    imported from `internvl_mpo.processor`, where the README names them (planned_tiles was only in
    processor.multi)."""
    from internvl_mpo.processor import load_images, planned_tiles

    images = [photo(900, 450, seed=1), photo(300, 300, seed=2), photo(200, 800, seed=3), photo(1000, 7, seed=4)]
    for budget in (dict(), dict(max_num=6), dict(max_num=[1, 40, 3, 24]), dict(max_num=30, total_budget=20),
                   dict(max_num=12, min_num=4), dict(use_thumbnail=False, max_num=9), dict(image_size=32, max_num=50)):
        assert planned_tiles(images, **budget) == load_images(images, **budget).num_patches_list, budget
    path = tmp_path / "wide.png"
    images[0].save(path)
    with open(path, "rb") as stream:
        sources = [path, str(path), path.read_bytes(), bytearray(path.read_bytes()), stream, Image.open(path)]
        assert planned_tiles(sources, max_num=6) == load_images(sources, max_num=6).num_patches_list == [3] * 6
    assert planned_tiles([Pipe(path.read_bytes())], max_num=6) == [1]
    assert load_images([Pipe(path.read_bytes())], max_num=6).num_patches_list == [3]
    with pytest.raises(InputError, match="gone.png: no such file"):
        planned_tiles([images[0], tmp_path / "gone.png"])
    with pytest.raises(InputError, match="exceeds the limit of 100"):
        planned_tiles([path], max_pixels=100)


def test_the_readme_gives_each_function_its_own_name_for_the_total_tile_budget():
    """`processor.load_images` (and `planned_tiles`) call the total tile budget `total_budget`, the
    `InternVLChat` methods `total_max_num` (VLMEvalKit's name); the README named `total_max_num` alone,
    which `processor.load_images` refuses as an unexpected keyword."""
    import inspect
    import re
    from pathlib import Path

    from internvl_mpo.generate.params import INPUT_KEYS
    from internvl_mpo.processor import multi

    text = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    calls = re.findall(r"`(?:processor\.|bot\.)(load_images|planned_tiles|chat|prepare)\(([^`]*)\)`", text)
    budgets = {(name, keyword) for name, args in calls for keyword in re.findall(r"(total\w*)=", args)}
    assert budgets == {("load_images", "total_budget"), ("chat", "total_max_num")}
    assert "total_budget" in inspect.signature(multi.load_images).parameters
    assert "total_budget" in inspect.signature(multi.planned_tiles).parameters
    assert "total_max_num" in INPUT_KEYS


def test_an_icon_holding_a_picture_over_the_limit_is_refused_before_decoding(tmp_path):
    """Pillow takes an ICO's and ICNS's sizes from their directories (256x256 at most) and decodes the picture
    they hold whatever its size, an ICO's inside Image.open: a small icon holding a 10000 x 9000 PNG was decoded
    (360 MB) before max_pixels was checked. The pictures' own headers are read first."""
    import resource

    from internvl_mpo.errors import SettingError

    inner = png_header_only(10000, 9000)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner
    block = b"ic08" + struct.pack(">I", 8 + len(inner)) + inner  # an ICNS 256x256 entry
    icns = b"icns" + struct.pack(">I", 8 + len(block)) + block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for data in (ico, icns):
        for read in (read_size, load_image):
            with pytest.raises(SettingError, match=r"10000x9000 = 90000000 pixels exceeds the limit of 1000000"):
                read(data, max_pixels=1_000_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: nothing decoded
    # Icons as Pillow writes them (PNG and BMP pictures, several sizes) open as before.
    picture = Image.new("RGB", (64, 64), (200, 30, 90))
    for options in ({"format": "ICO", "sizes": [(16, 16), (64, 64)]},
                    {"format": "ICO", "sizes": [(64, 64)], "bitmap_format": "bmp"}, {"format": "ICNS"}):
        buffer = io.BytesIO()
        picture.save(buffer, **options)
        assert read_size(buffer.getvalue(), max_pixels=5000 if options["format"] == "ICO" else None) == Image.open(
            io.BytesIO(buffer.getvalue())).size  # the largest picture (an ICNS has larger ones made from it)
        assert load_image(buffer.getvalue(), max_num=1).shape[0] == 1


class _Stream(io.RawIOBase):
    """A file object that tells its position but cannot seek, as an HTTP response (urllib3's, requests' .raw)."""

    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), len(self._data) - self._at)
        buffer[:n] = self._data[self._at : self._at + n]
        self._at += n
        return n

    def tell(self):
        return self._at


def test_a_stream_that_cannot_seek_is_read_whole_and_its_icons_checked():
    """The icon check read a stream's first bytes and could not put them back: a PNG from an HTTP response was "not
    an image Pillow can read". Such a stream is read into memory first, as Image.open reads it, and checked."""
    from internvl_mpo.errors import SettingError

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), "red").save(buffer, format="PNG")
    assert open_image(_Stream(buffer.getvalue())).size == (20, 10)
    assert read_size(_Stream(buffer.getvalue())) == (20, 10)
    inner = png_header_only(10000, 9000)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner
    with pytest.raises(SettingError, match="10000x9000"):
        read_size(_Stream(ico), max_pixels=1_000_000)
    moved = io.BytesIO(ico)
    moved.seek(5)  # Image.open reads a file object from its start, wherever it stands
    with pytest.raises(SettingError, match="10000x9000"):
        read_size(moved, max_pixels=1_000_000)


def test_a_path_naming_a_pipe_is_not_read_for_its_plan():
    """`chat(images=["/dev/fd/N"])` (a script run with `--image <(curl ...)`): the header read for the plan used up
    the pipe, and the image was then refused as "the file is empty (0 bytes)"."""
    from internvl_mpo.processor.multi import load_images, planned_tiles

    data = io.BytesIO()
    Image.new("RGB", (900, 300), (200, 10, 10)).save(data, format="PNG")
    read, write = os.pipe()

    def writer():
        with os.fdopen(write, "wb") as out:
            out.write(data.getvalue())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        path = f"/dev/fd/{read}"
        assert planned_tiles([path]) == [1]  # counted as one tile, as a file object that cannot seek
        loaded = load_images([path])
        assert loaded.num_patches_list == [4]  # 3x1 grid + thumbnail
        assert torch.equal(loaded.pixel_values, load_image(data.getvalue()))
    finally:
        thread.join(10)
        os.close(read)
