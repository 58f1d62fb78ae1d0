"""Images per second of image preprocessing: ours (`internvl_mpo.processor.load_image`) against the
official model-card recipe (torchvision transforms + `dynamic_preprocess`), on a 1920x1080 JPEG
(4x2 tiles + thumbnail) and a 448x448 JPEG (one tile).

The official side needs torchvision, which does not import next to the CPU torch of this project.
Make a separate environment once (about 5.5 GB, a few minutes; the wheels come from local disk):

    python3 -m venv /work/venv-official
    /work/venv-official/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy

then run

    python benchmarks/preprocess.py --official-python /work/venv-official/bin/python

which measures ours here and the official recipe in that interpreter (`--side official`, JSON on
stdout), checks there that both give identical tensors, and prints both rates and their ratio.
Each side reports the best of several timed rounds, which is the least disturbed by other load on
a shared machine. `--side ours` alone needs nothing extra.
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


def images_per_second(fn, path: Path, rounds: int, seconds: float) -> dict:
    fn(path)  # warm-up (imports, thread pools, caches)
    rates = []
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            fn(path)
            count += 1
        rates.append(count / elapsed)
    return {"best": max(rates), "median": float(np.median(rates)), "rounds": rates}


def ours_fn():
    sys.path.insert(0, str(REPO / "src"))
    from internvl_mpo.processor.image import load_image

    return load_image


def check_identical(workdir: Path) -> dict:
    """Ours vs the official recipe on a few awkward images; both must give the same tensor."""
    import torch

    load_image = ours_fn()
    cases = {
        "1920x1080.jpg": ("RGB", (1920, 1080)),
        "800x600_rgba.png": ("RGBA", (800, 600)),
        "31x1000_palette.png": ("P", (31, 1000)),
        "447x449_gray.png": ("L", (447, 449)),
        "3000x200_cmyk.jpg": ("CMYK", (3000, 200)),
    }
    rng = np.random.default_rng(1)
    report = {}
    for name, (mode, (w, h)) in cases.items():
        path = workdir / name
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(_smooth())
        (rgb.convert(mode) if mode != "P" else rgb.quantize(64)).save(path)
        ours, official = load_image(path), official_load_image(path)
        report[name] = {
            "shape": list(ours.shape),
            "identical": bool(torch.equal(ours, official)),
            "max_abs_diff": float((ours - official).abs().max()) if ours.shape == official.shape else None,
        }
    return report


def _smooth():
    from PIL import ImageFilter

    return ImageFilter.GaussianBlur(2)


def run_side(side: str, workdir: Path, rounds: int, seconds: float, check: bool) -> dict:
    fn = ours_fn() if side == "ours" else official_load_image
    result = {"side": side, "python": sys.executable, "images_per_s": {}}
    for label, (w, h) in SIZES.items():
        path = workdir / f"{label}.jpg"
        if not path.exists():
            make_jpeg(path, w, h)
        result["images_per_s"][label] = images_per_second(fn, path, rounds, seconds)
    if check:
        result["check"] = check_identical(workdir)
    return result


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["both", "ours", "official"], default="both")
    parser.add_argument("--official-python", help="interpreter with torchvision that runs the official side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed round")
    parser.add_argument("--json", action="store_true", help="print one JSON object (used for --side official)")
    parser.add_argument("--check", action="store_true", help="also compare ours and official tensors")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {}
        if args.side in ("both", "ours"):
            results["ours"] = run_side("ours", workdir, args.rounds, args.seconds, check=False)
        if args.side == "official" or (args.side == "both" and torchvision_available()):
            if not torchvision_available():
                sys.exit("the official side needs torchvision; see this script's docstring")
            results["official"] = run_side("official", workdir, args.rounds, args.seconds, args.check or args.side == "both")
        elif args.side == "both" and args.official_python:
            cmd = [args.official_python, __file__, "--side", "official", "--json", "--check",
                   "--rounds", str(args.rounds), "--seconds", str(args.seconds)]
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results["official"] = json.loads(done.stdout)

    if args.json:
        print(json.dumps(results.get("official") or results.get("ours")))
        return
    report(results, args)


def report(results: dict, args) -> None:
    for side, result in results.items():
        rates = ", ".join(f"{label} {r['best']:.1f} img/s (median {r['median']:.1f})" for label, r in result["images_per_s"].items())
        print(f"{side:9s} {rates}   [{result['python']}]")
    if "official" in results and "ours" in results:
        for label in SIZES:
            ratio = results["ours"]["images_per_s"][label]["best"] / results["official"]["images_per_s"][label]["best"]
            print(f"speed-up {label}: {ratio:.2f}x")
        for name, r in results["official"].get("check", {}).items():
            print(f"identical {name} {r['shape']}: {r['identical']} (max abs diff {r['max_abs_diff']})")
    elif args.side == "both":
        print(
            "official side not run: torchvision does not import here. Create /work/venv-official as described "
            "in this script's docstring and pass --official-python /work/venv-official/bin/python"
        )


if __name__ == "__main__":
    main()
