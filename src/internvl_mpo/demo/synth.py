"""Synthetic visual questions for the demo model: coloured shapes on a 3x3 grid.

Each scene is a 448x448 image (one InternVL tile) with 2 to 7 shapes (circle, square, triangle) in
four colours, one per cell of a 3x3 grid, with a little jitter in size and place. Questions need
looking (which colour / shape is where) and a few steps of reasoning (filtering, counting,
subtracting, comparing). Every answer is written in one small, regular language, step by step:

    Goal: count red shapes and blue shapes.
    top left: red circle, red 1 blue 0.
    top right: green square, no.
    center: blue triangle, red 1 blue 1.
    bottom left: red square, red 2 blue 1.
    Red shapes: 2. Blue shapes: 1.
    2 - 1 = 1.
    Final answer: 1

The answer first restates what the question asks for (a supervised token for reading the question,
which the marks below depend on), then scans every shape in reading order (the looking step, so every
item supervises the whole picture), marking each shape that counts with the matched attribute and the running count(s),
so that counting is copying the last number; then it concludes and ends in MMPR's "Final answer: ..."
line. Half of the
SFT conversations wrap the question in MMPR's chain-of-thought instruction (the prompt of
`internvl-mpo pairs correctness` and `internvl-mpo eval --cot`), half ask it plainly (`chat`).
With `direct` > 0 that share of the SFT answers (drawn per item, whatever the prompt) is only the
`Final answer: ...` line, as in corpora that merge short-answer VQA sets with reasoning data: the
SFT model then reasons only some of the time, even when asked to, which is the situation MPO's
correctness pairs are meant to repair. The evaluation / `pairs` items always carry the reasoning.
Splits are drawn from separate seeds and a scene never appears in two splits. Everything is
deterministic given `seed`: the same call writes byte-identical files.

Files written by `write_split` (paths in items are relative to the output folder):
- `images/<split>/<id>.png` (or .jpg); the split's images of an earlier run that this one does not write go;
- `<split>.jsonl`: evaluation / `internvl-mpo pairs` items
  {"id", "image", "question", "answer", "category", "chosen", "scene"}; `chosen` is the reference
  step-by-step answer (the good answer DropoutNTP truncates), `scene` lists the shapes so that a
  checker can recompute the answer;
- `<split>_sft.jsonl`: SFT conversations in the official format
  {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from internvl_mpo.answers import build_cot_question
from internvl_mpo.errors import InputError

IMAGE_SIZE = 448
GRID = 3
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
MIN_SHAPES, MAX_SHAPES = 2, 7
CATEGORIES = (
    "count_color", "count_shape", "count_both", "count_total", "count_row",
    "color_at", "shape_at", "more_color", "more_shape", "compare_color", "compare_shape",
)
SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_029, "tokenizer": 3_000_017}


@dataclass(frozen=True)
class Shape:
    row: int
    col: int
    color: str
    shape: str

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Item:
    """One question about one scene, with its step-by-step answer and the short final answer."""

    id: str
    category: str
    question: str
    reasoning: str  # ends with "Final answer: <answer>"
    answer: str
    scene: tuple[Shape, ...]


def position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


def plural(shape: str) -> str:
    return shape + "s"


# ---- scenes and pictures ------------------------------------------------------------------


def random_scene(rng: random.Random) -> tuple[Shape, ...]:
    """2..7 shapes on distinct cells, in reading order (row by row, left to right)."""
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(MIN_SHAPES, MAX_SHAPES)))
    return tuple(Shape(c // GRID, c % GRID, rng.choice(list(COLORS)), rng.choice(SHAPES)) for c in cells)


def draw_scene(scene: tuple[Shape, ...], rng: random.Random) -> Image.Image:
    """The picture of a scene: flat shapes on a light background, jittered in size and place."""
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / GRID
    for s in scene:
        radius = rng.uniform(42, 56)
        slack = 12
        cx = (s.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (s.row + 0.5) * cell + rng.uniform(-slack, slack)
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif s.shape == "square":
            half = radius * 0.9
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius * 1.05, cy + radius * 0.8), (cx + radius * 1.05, cy + radius * 0.8)],
                fill=fill,
            )
    return image


# ---- questions and answers ----------------------------------------------------------------


def scan(scene: tuple[Shape, ...], note) -> list[str]:
    """One line per shape in reading order, 'top left: red circle' plus the question's note on it."""
    return [f"{s.position}: {s.color} {s.shape}{note(s)}." for s in scene]


def count_scan(scene: tuple[Shape, ...], match, mark) -> tuple[list[str], int]:
    """Scan lines marking each matching shape '<mark> k' (k-th match so far), the others 'no'; and the count.

    The mark repeats the matched attribute ('yellow 1', 'circle 2'): writing it is a copy from the
    line, which a small model learns much faster than a bare 'yes' that needs an equality test.
    """
    count = 0

    def note(s: Shape) -> str:
        nonlocal count
        if not match(s):
            return ", no"
        count += 1
        return f", {mark(s)} {count}"

    lines = scan(scene, note)
    return lines, count


def two_group_scan(scene: tuple[Shape, ...], names: tuple[str, str], key) -> tuple[list[str], int, int]:
    """Scan lines carrying both running counts ('red 2 blue 1') on each shape of group a or b, others 'no'.

    Each count line copies the previous one and bumps one number, so no count has to be looked up
    further back than the last marked line.
    """
    counts = {names[0]: 0, names[1]: 0}

    def note(s: Shape) -> str:
        group = key(s)
        if group not in counts:
            return ", no"
        counts[group] += 1
        return f", {names[0]} {counts[names[0]]} {names[1]} {counts[names[1]]}"

    lines = scan(scene, note)
    return lines, counts[names[0]], counts[names[1]]


def _compare_word(a: int, b: int) -> str:
    return "more than" if a > b else "less than" if a < b else "equal to"


def _pick_pair(options, rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(list(options), 2)
    return a, b


def make_question(scene: tuple[Shape, ...], category: str, rng: random.Random) -> tuple[str, list[str], str]:
    """(question, reasoning lines without the final one, final answer) for one category."""
    if category in ("count_color", "count_shape", "count_both", "count_total", "count_row"):
        yes = lambda s: "yes"  # noqa: E731
        if category == "count_color":
            color = rng.choice(list(COLORS))
            question, label, match, mark = (f"How many {color} shapes are there?", f"{color} shapes",
                                            lambda s: s.color == color, lambda s: s.color)
        elif category == "count_shape":
            shape = rng.choice(SHAPES)
            question, label, match, mark = (f"How many {plural(shape)} are there?", plural(shape),
                                            lambda s: s.shape == shape, lambda s: s.shape)
        elif category == "count_both":
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            question, label = f"How many {color} {plural(shape)} are there?", f"{color} {plural(shape)}"
            match = lambda s: s.color == color and s.shape == shape  # noqa: E731
            mark = lambda s: f"{s.color} {s.shape}"  # noqa: E731
        elif category == "count_total":
            question, label, match, mark = "How many shapes are there?", "shapes", lambda s: True, yes
        else:
            row = rng.randrange(GRID)
            question, label = f"How many shapes are in the {ROWS[row]} row?", f"shapes in the {ROWS[row]} row"
            match, mark = (lambda s: s.row == row), yes
        lines, n = count_scan(scene, match, mark)
        return question, [f"Goal: count {label}.", *lines, f"{label.capitalize()}: {n}."], str(n)
    if category in ("color_at", "shape_at"):
        target = rng.choice(scene)
        lines = scan(scene, lambda s: ", yes" if s == target else ", no")
        asked = "color" if category == "color_at" else "shape"
        value = target.color if category == "color_at" else target.shape
        lines = [f"Goal: find the {asked} at the {target.position}.", *lines,
                 f"The {asked} at the {target.position} is {value}."]
        if category == "color_at":
            return f"What color is the shape at the {target.position}?", lines, value
        return f"What shape is at the {target.position}?", lines, value
    if category in ("more_color", "compare_color", "more_shape", "compare_shape"):
        by_color = category.endswith("color")
        a, b = _pick_pair(COLORS if by_color else SHAPES, rng)
        key = (lambda s: s.color) if by_color else (lambda s: s.shape)
        counts = {g: sum(key(s) == g for s in scene) for g in (a, b)}
        if category.startswith("more") and counts[a] < counts[b]:
            a, b = b, a
        lines, na, nb = two_group_scan(scene, (a, b), key)
        label_a, label_b = (f"{a} shapes", f"{b} shapes") if by_color else (plural(a), plural(b))
        lines = [f"Goal: count {label_a} and {label_b}.", *lines,
                 f"{label_a.capitalize()}: {na}. {label_b.capitalize()}: {nb}."]
        if category.startswith("more"):
            question = f"How many more {label_a} than {label_b} are there?"
            return question, lines + [f"{na} - {nb} = {na - nb}."], str(na - nb)
        question = f"Are there more {label_a} than {label_b}?"
        return question, lines + [f"{na} is {_compare_word(na, nb)} {nb}."], "yes" if na > nb else "no"
    raise InputError(f"unknown question category {category!r}; known: {', '.join(CATEGORIES)}")


def make_item(item_id: str, scene: tuple[Shape, ...], category: str, rng: random.Random) -> Item:
    question, lines, answer = make_question(scene, category, rng)
    reasoning = "\n".join([*lines, f"Final answer: {answer}"])
    return Item(item_id, category, question, reasoning, answer, scene)


def scene_key(scene: tuple[Shape, ...]) -> tuple:
    return tuple((s.row, s.col, s.color, s.shape) for s in scene)


def generate_split(split: str, n: int, seed: int, exclude: set | None = None) -> list[Item]:
    """`n` items of a split; scenes in `exclude` are skipped and the new ones added to it."""
    if split not in SPLIT_SEED_OFFSET:
        raise InputError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEED_OFFSET)}")
    if n < 0:
        raise InputError(f"the number of {split} items must be >= 0, got {n}")
    rng = random.Random(seed * 7_919 + SPLIT_SEED_OFFSET[split])
    exclude = set() if exclude is None else exclude
    out = []
    while len(out) < n:
        scene = random_scene(rng)
        key = scene_key(scene)
        if key in exclude:
            continue
        exclude.add(key)
        category = CATEGORIES[len(out) % len(CATEGORIES)]
        item = make_item(f"{split}-{len(out):05d}", scene, category, rng)
        out.append(item)
    return out


def picture(item: Item, seed: int) -> Image.Image:
    """The item's image; its jitter comes from its own generator, so items and pictures stay independent."""
    return draw_scene(item.scene, random.Random(f"{seed}:{item.id}"))


# ---- files --------------------------------------------------------------------------------


def scene_to_json(scene: tuple[Shape, ...]) -> list[dict]:
    return [{"row": s.row, "col": s.col, "color": s.color, "shape": s.shape} for s in scene]


def eval_record(item: Item, image: str) -> dict:
    return {
        "id": item.id, "image": image, "question": item.question, "answer": item.answer,
        "category": item.category, "chosen": item.reasoning, "scene": scene_to_json(item.scene),
    }


def sft_record(item: Item, image: str, cot: bool, direct: bool = False) -> dict:
    """An SFT conversation; with `cot` the question is wrapped in MMPR's chain-of-thought instruction,
    the prompt that `internvl-mpo pairs correctness` and `internvl-mpo eval --cot` send; with `direct`
    the answer is only its final line."""
    question = build_cot_question(item.question) if cot else item.question
    answer = f"Final answer: {item.answer}" if direct else item.reasoning
    return {
        "id": item.id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_split(
    folder: Path,
    split: str,
    items: list[Item],
    seed: int,
    image_format: str = "png",
    direct: float = 0.0,
    bare_copies: float = 0.0,
) -> None:
    image_dir = folder / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    evals, sfts = [], []
    for index, item in enumerate(items):
        rel = f"images/{split}/{item.id}.{image_format}"
        image = picture(item, seed)
        if image_format == "png":
            image.save(folder / rel, format="PNG")
        else:
            image.save(folder / rel, format="JPEG", quality=92)
        evals.append(eval_record(item, rel))
        bare = random.Random(f"{seed}:{item.id}:direct").random() < direct
        sfts.append(sft_record(item, rel, cot=index % 2 == 0, direct=bare))
    if bare_copies:
        # the first share of conversations once more with only the final-answer line, then one shuffle
        # so the two styles interleave; the reasoning conversations all stay
        sfts += [
            {**sft_record(item, sfts[index]["image"], cot=index % 2 == 0, direct=True), "id": f"{item.id}-bare"}
            for index, item in enumerate(items[: round(bare_copies * len(items))])
        ]
        random.Random(seed).shuffle(sfts)
    _write_jsonl(folder / f"{split}.jsonl", evals)
    _write_jsonl(folder / f"{split}_sft.jsonl", sfts)
    # an earlier run's images this one did not write (more items, the other format) go; other files stay
    written = {Path(record["image"]).name for record in evals}
    for path in image_dir.iterdir():
        if path.name not in written and re.fullmatch(rf"{split}-\d{{5,}}\.(png|jpg)", path.name) and path.is_file():
            path.unlink()


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Questions and answers of the demo language (own seed, independent of the split sizes)."""
    texts = []
    for item in generate_split("tokenizer", n, seed):
        texts += [item.question, item.reasoning]
    return texts


SETTINGS = "demo-data.json"  # marks a folder demo-data wrote, which a later run may write again


def make_demo_data(
    output: str,
    train: int = 16000,
    val: int = 300,
    test: int = 600,
    seed: int = 0,
    image_format: str = "png",
    direct: float = 0.0,
    bare_copies: float = 0.0,
) -> int:
    """Write the synthetic shapes VQA data set, its tokenizer and the tiny model's config.json.

    output: a new or empty folder, or one demo-data wrote, to write into (images/, train|val|test.jsonl, *_sft.jsonl,
      tokenizer/, config.json, demo-data.json with these settings)
    train: number of training items (one question per image)
    val: number of validation items
    test: number of held-out test items
    seed: seed of everything (>= 0); the same seed writes the same files
    image_format: png or jpg
    direct: share of SFT answers that are only the final-answer line, without the reasoning
    bare_copies: share of items that also get an SFT conversation answering with the final line only
    """
    from .config import demo_config
    from .tokenizer import write_demo_tokenizer

    for flag, n in (("--train", train), ("--val", val), ("--test", test)):
        if n < 0:
            raise InputError(f"{flag} must be >= 0, got {n}")
    if image_format not in ("png", "jpg"):
        raise InputError(f"--image-format must be png or jpg, got {image_format!r}")
    if seed < 0:  # Python's random.Random seeds with |seed|: -S wrote the training split of S
        raise InputError(f"--seed must be >= 0, got {seed}")
    if not 0 <= direct <= 1:
        raise InputError(f"--direct must be in [0, 1], got {direct}")
    if not 0 <= bare_copies <= 1:
        raise InputError(f"--bare-copies must be in [0, 1], got {bare_copies}")
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file; give a folder to write the data set into")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SETTINGS).exists():  # the user's files
        raise InputError(f"{folder} is not empty and holds no {SETTINGS} of an earlier demo-data run; give a new or"
                         " empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{folder}: cannot create the folder ({e.strerror})") from None
    settings = dict(train=train, val=val, test=test, seed=seed, image_format=image_format, direct=direct,
                    bare_copies=bare_copies)
    (folder / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")  # first: a run stopped part way can run again
    seen: set = set()
    counts = {}
    for split, n in (("test", test), ("val", val), ("train", train)):
        write_split(
            folder, split, generate_split(split, n, seed, seen), seed, image_format, direct, bare_copies
        )
        counts[split] = n
    tokenizer = write_demo_tokenizer(folder / "tokenizer", tokenizer_corpus(seed))
    demo_config(len(tokenizer)).to_json(folder / "config.json")
    print(
        f"wrote {counts['train']} train, {counts['val']} val, {counts['test']} test items to {folder};"
        f" tokenizer of {len(tokenizer)} tokens in {folder / 'tokenizer'}; model config {folder / 'config.json'}"
    )
    return 0
