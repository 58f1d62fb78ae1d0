"""Reading the sampled frames of a long clip: seeking, what `load_video` does for an mp4/mov or mkv/webm
clip (decode from the keyframe before each sampled frame), against decoding in order from the start to
the end (counting the frames, as its fallback does without a bound), what it did before 2026-12-03 and
still does where seeking cannot be trusted, and against the model card's decord reader (`vr[i]` for
each index, one thread) when decord is installed.

The clip is encoded here with libx264: --minutes of --size video at 30 fps, 3 B-frames, a keyframe
every --gop frames (250 is x264's default). Our two sides must give the same frames (checked); decord's
are compared too, and where they differ the run exits with an error after its report. The sides take
turns, --rounds each, and each keeps its best time; the ratios are each side's time over seeking's.
Only the reading is timed, not the tiling that follows it.

    python benchmarks/video.py                              # 5 minutes of 640x360
    python benchmarks/video.py --minutes 60 --keep /tmp/hour.mp4
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import av
except ImportError as error:  # the optional `video` extra
    raise SystemExit(f"video.py needs PyAV, which does not import here ({error}); pip install 'internvl-mpo[video]'")

from internvl_mpo.processor import video


def write_clip(path: Path, minutes: float, width: int, height: int, gop: int) -> None:
    """A moving gradient with a sweeping bar: cheap to make, and no two neighbouring frames alike."""
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "bf": "3", "g": str(gop), "x264-params": "b-adapt=0"}
        for k in range(int(minutes * 60 * 30)):
            pixels = np.stack([(x + 3 * k) % 256, (y + 2 * k) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
            pixels[:, k % width] = 255
            frame = av.VideoFrame.from_ndarray(pixels, "rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_seeking(path: str, num_segments: int) -> tuple[list[np.ndarray], list[int]]:
    frames, indices = video._read_video(path, num_segments, None, None)
    return [np.asarray(f) for f in frames], indices


def read_in_order(path: str, indices: list[int]) -> list[np.ndarray]:
    # no pixel limit, as read_seeking's; to the end, as _read_video's fallback without a bound (to count the frames)
    kept, _ = video._decode_frames(av, path, set(indices), None, to_end=True)
    return [np.asarray(kept[i]) for i in indices]


def read_decord(path: str, indices: list[int]) -> list[np.ndarray]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    return [reader[i].asnumpy() for i in indices]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT")
    parser.add_argument("--gop", type=int, default=250, help="frames from one keyframe to the next")
    parser.add_argument("--segments", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the clip here and reuse it if it exists")
    args = parser.parse_args()
    try:
        width, height = (int(v) for v in args.size.split("x"))
    except ValueError:
        parser.error(f"--size {args.size}: give WIDTHxHEIGHT, e.g. 640x360")
    if width < 2 or height < 2 or width % 2 or height % 2:  # yuv420p halves both
        parser.error(f"--size {args.size}: width and height must be even, 2 or more")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1 round is needed")
    if args.keep is None or not args.keep.exists():
        if args.minutes * 60 * 30 < 1:
            parser.error(f"--minutes {args.minutes}: the clip needs at least one frame (1/1800 of a minute)")
    try:
        import decord  # noqa: F401
    except ImportError:
        decord_here = False
        print("decord not installed: its side is not run")
    else:
        decord_here = True

    if args.keep is not None and not args.keep.parent.is_dir():
        parser.error(f"--keep {args.keep}: no folder {args.keep.parent} to write the clip in")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "clip.mp4"
        if not path.exists():
            seconds, _ = timed(write_clip, path, args.minutes, width, height, args.gop)
            print(f"encoded {path} in {seconds:.1f} s")
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            print(f"{path.name}: {stream.frames} frames of {stream.width}x{stream.height}, "
                  f"{float(stream.average_rate):.2f} fps, {path.stat().st_size / 1e6:.1f} MB")
        read_seeking(str(path), 1)  # warm-up: imports, the file in the page cache
        decord_differs = []
        for num_segments in args.segments:
            best = {"seeking": float("inf"), "in order": float("inf"), "decord": float("inf")}
            for _ in range(args.rounds):
                seconds, (frames, indices) = timed(read_seeking, str(path), num_segments)
                best["seeking"] = min(best["seeking"], seconds)
                seconds, in_order = timed(read_in_order, str(path), indices)
                best["in order"] = min(best["in order"], seconds)
                assert all(np.array_equal(a, b) for a, b in zip(frames, in_order)), "seeking gave other frames"
                if decord_here:
                    seconds, card = timed(read_decord, str(path), indices)
                    best["decord"] = min(best["decord"], seconds)
            line = (f"{num_segments} segments (last frame {indices[-1]}): seeking {best['seeking']:.2f} s, "
                    f"in order {best['in order']:.2f} s ({best['in order'] / best['seeking']:.1f}x)")
            if decord_here:
                same = all(np.array_equal(a, b) for a, b in zip(frames, card))
                line += (f", decord {best['decord']:.2f} s ({best['decord'] / best['seeking']:.1f}x;"
                         f" its frames {'identical' if same else 'differ'})")
                if not same:
                    decord_differs.append(str(num_segments))
            print(line)
    if decord_differs:  # the times are printed, but readers that give other frames compare nothing
        raise SystemExit(f"decord's frames differ from ours at {' and '.join(decord_differs)} segments")


if __name__ == "__main__":
    from internvl_mpo.errors import InternVLError

    try:
        main()
    except InternVLError as e:  # a bad path or setting: one line, as the command line gives it
        raise SystemExit(f"error: {e}") from None
