"""Images per second of image preprocessing: ours (`internvl_mpo.processor.load_image`) against the
official model-card recipe (torchvision transforms + `dynamic_preprocess`), on a 1920x1080 JPEG
(4x2 tiles + thumbnail) and a 448x448 JPEG (one tile).

The official side needs torchvision, which does not import next to the CPU torch of this project.
Make a separate environment once (about 5.5 GB, a few minutes; the wheels come from local disk):

    python3 -m venv /work/venv-official
    /work/venv-official/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy

then run

    python benchmarks/preprocess.py --official-python /work/venv-official/bin/python

which runs this script again in that interpreter (`--side both --json`, with our package on
PYTHONPATH: it needs only torch, numpy and Pillow), times ours and the official recipe there in
alternating rounds, checks that both give identical tensors on a few awkward images, and prints
both rates and their ratio; where the tensors differ it exits with an error after that report.
Alternating rounds in one process keeps a change in background load on a shared machine from
favouring one side; each side reports its best and median round. That does not hold for torch's
intra-op threads, which only the official side uses (ToTensor, Normalize, stack): where other jobs
hold the other cores, each of those ops waits milliseconds for one (2026-12-05, 2 cores, load
average 2-3: the official side fell from 14.6 to 2-4 images/s at 1920x1080). The report's first
line gives torch's thread count and the load average; with `OMP_NUM_THREADS=1` (the run in the
other interpreter inherits it) the recipe is timed on one thread, free of that wait.
`--side ours` needs nothing extra; `--side official` needs torchvision in the running interpreter.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZES = {"1920x1080": (1920, 1080), "448x448": (448, 448)}


def make_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A photo-like JPEG: smooth colour waves plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    waves = np.sin(x * 23 + y * 11 + np.arange(3, dtype=np.float32)) * 90 + 128
    pixels = waves + rng.normal(0, 18, (height, width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


# --- The official recipe, written from the published algorithm (model card / reference section 5) ---


def official_load_image(path, input_size: int = 448, max_num: int = 12):
    import torch
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    transform = T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    image = Image.open(path).convert("RGB")
    tiles = official_dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(tile) for tile in tiles])


def official_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    width, height = image.size
    aspect = width / height
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    grids = sorted(grids, key=lambda g: g[0] * g[1])
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [
        resized.crop((k % cols * image_size, k // cols * image_size, (k % cols + 1) * image_size, (k // cols + 1) * image_size))
        for k in range(cols * rows)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


# --- timing ---


def ours_fn():
    sys.path.insert(0, str(REPO / "src"))
    from internvl_mpo.processor.image import load_image

    return load_image


def one_round(fn, path: Path, seconds: float) -> tuple[float, float]:
    """(images per second of wall time, CPU milliseconds per image, all threads of the process)."""
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(path)
        count += 1
    return count / elapsed, (time.process_time() - cpu_start) * 1000 / count


def measure(sides: dict, workdir: Path, rounds: int, seconds: float) -> dict:
    """Images/s per side and image. Rounds alternate between the sides, so a change in background
    load on a shared machine hits both alike; each side reports its best and median round."""
    result = {side: {} for side in sides}
    for label, (w, h) in SIZES.items():
        path = workdir / f"{label}.jpg"
        make_jpeg(path, w, h)
        for fn in sides.values():
            fn(path)  # warm-up (imports, thread pools, caches)
        rates = {side: [] for side in sides}
        cpu_ms = {side: [] for side in sides}
        for _ in range(rounds):
            for side, fn in sides.items():
                rate, cpu = one_round(fn, path, seconds)
                rates[side].append(rate)
                cpu_ms[side].append(cpu)
        for side, r in rates.items():
            result[side][label] = {
                "best": max(r), "median": float(np.median(r)), "rounds": r, "cpu_ms": float(np.median(cpu_ms[side]))
            }
    return result


def check_identical(workdir: Path) -> dict:
    """Ours vs the official recipe on a few awkward images; both must give the same tensor."""
    import torch
    from PIL import ImageFilter

    load_image = ours_fn()
    cases = {
        "1920x1080.jpg": ("RGB", (1920, 1080)),
        "800x600_rgba.png": ("RGBA", (800, 600)),
        "31x1000_palette.png": ("P", (31, 1000)),
        "447x449_gray.png": ("L", (447, 449)),
        "3000x200_cmyk.jpg": ("CMYK", (3000, 200)),
        "1000x3000.png": ("RGB", (1000, 3000)),
    }
    rng = np.random.default_rng(1)
    report = {}
    for name, (mode, (w, h)) in cases.items():
        path = workdir / name
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        (rgb.quantize(64) if mode == "P" else rgb.convert(mode)).save(path)
        ours, official = load_image(path), official_load_image(path)
        report[name] = {
            "shape": list(ours.shape),
            "identical": bool(torch.equal(ours, official)),
            "max_abs_diff": float((ours - official).abs().max()) if ours.shape == official.shape else None,
        }
    return report


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # missing, or built for another torch
        return False
    return True


def run_here(side: str, rounds: int, seconds: float) -> dict:
    import torch

    sides = {}
    if side in ("both", "ours"):
        sides["ours"] = ours_fn()
    if side in ("both", "official"):
        sides["official"] = official_load_image
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        load = os.getloadavg()[0]
        result = {"python": sys.executable, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "images_per_s": measure(sides, workdir, rounds, seconds)}
        result["load_average"] = [load, os.getloadavg()[0]]
        if "official" in sides:
            result["check"] = check_identical(workdir)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["both", "ours", "official"], default="both")
    parser.add_argument("--official-python", help="interpreter with torchvision that runs the comparison")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1 round is needed")
    if args.seconds <= 0:
        parser.error(f"--seconds {args.seconds}: a round needs a positive length")

    side = args.side
    if side != "ours" and not torchvision_available():
        if side == "both" and args.official_python:
            result = run_official_python(args)
        elif side == "official":
            sys.exit("the official side needs torchvision; see this script's docstring")
        else:
            print(  # stderr: with --json, stdout holds the JSON object only
                "official side not run: torchvision does not import here. Create /work/venv-official as described "
                "in this script's docstring and pass --official-python /work/venv-official/bin/python\n",
                file=sys.stderr,
            )
            result = run_here("ours", args.rounds, args.seconds)
    else:
        result = run_here(side, args.rounds, args.seconds)
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
        exit_if_different(result)


def run_official_python(args) -> dict:
    """Both sides in the --official-python interpreter (our package only needs torch, numpy and Pillow),
    so that their rounds interleave in one process; it must import torchvision."""
    python = args.official_python
    try:
        done = subprocess.run([python, "-c", "import torchvision"], capture_output=True, text=True, check=False)
    except OSError as e:
        raise SystemExit(f"--official-python {python}: cannot run it ({e.strerror})") from None
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"--official-python {python}: it cannot import torchvision ({error}); make the environment"
                         " this script's docstring shows and pass its python")
    cmd = [python, __file__, "--side", "both", "--json", "--rounds", str(args.rounds), "--seconds", str(args.seconds)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"--official-python {python}: the run there failed ({error})")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"--official-python {python}: the run there printed no JSON object: "
                         f"{done.stdout.strip()[:200]!r}") from None


def report(result: dict) -> None:
    start, end = result["load_average"]
    print(f"measured with {result['python']} (torch {result['torch']}, intra-op threads {result['torch_threads']}, "
          f"load average {start:.1f} -> {end:.1f}); best of interleaved rounds, median in brackets")
    rates = result["images_per_s"]
    for side, by_label in rates.items():
        line = ", ".join(
            f"{label} {r['best']:.1f} img/s ({r['median']:.1f}), {r['cpu_ms']:.1f} CPU ms/img" for label, r in by_label.items()
        )
        print(f"  {side:9s} {line}")
    if {"ours", "official"} <= rates.keys():
        for label in SIZES:
            best = rates["ours"][label]["best"] / rates["official"][label]["best"]
            median = rates["ours"][label]["median"] / rates["official"][label]["median"]
            print(f"  speed-up {label}: {best:.2f}x (medians {median:.2f}x)")
    for name, r in result.get("check", {}).items():
        print(f"  identical {name} {r['shape']}: {r['identical']} (max abs diff {r['max_abs_diff']})")


def exit_if_different(result: dict) -> None:
    """After the report: a run whose sides gave different tensors compares nothing, so it fails."""
    different = [name for name, r in result.get("check", {}).items() if not r["identical"]]
    if different:
        raise SystemExit(f"ours and the official recipe give different tensors for {', '.join(different)}")


if __name__ == "__main__":
    from internvl_mpo.errors import InternVLError

    try:
        main()
    except InternVLError as e:  # a bad path or setting: one line, as the command line gives it
        raise SystemExit(f"error: {e}") from None
