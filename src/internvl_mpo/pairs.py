"""Preference pairs in MMPR format from a model's own samples: the correctness pipeline and DropoutNTP.

Mirrors OpenGVLab/InternVL `internvl_chat/tools/mm_reasoning_pipeline/`:
- `internvl_lmdeploy_correctness.py`: the question loses a trailing short-answer instruction, is
  wrapped in the English CoT instruction, and a single `<image>` placeholder moves to the front as
  `<image>\\n`; K samples per question (the paper: 32 at temperature 0.7, top_k 50, top_p 1.0, 6 tiles; the
  script's defaults: 8 at temperature 1.0).
- `internvl_lmdeploy_correctness_postprocess.py`: a response without a parsable final answer is a
  format negative; the others are checked against the ground truth. Pairs are positive x negative of
  one question, skipping pairs where the positive's answer is contained in the negative's
  (case-insensitive); at most P per question (3 when there are more than 500k responses); exact
  duplicates removed; correctness pairs and format pairs go to separate files
  (`<name>_pairs_vqa_correctness_rules.jsonl`, `<name>_pairs_vqa_format_rules.jsonl`), each line
  {image, question (the CoT prompt the model saw), chosen, rejected, answer_gt}.
- `internvl_lmdeploy_continue_wo_image.py` (DropoutNTP): the chosen answer is cut to its first
  int(0.5 * n_words) words (split on single spaces, stripped); the model continues that prefix as its
  own turn with the image placeholder removed from the question (stripped) and no image; rejected =
  prefix + continuation, plain string concatenation. Pairs keep the item's question and image.

Output folder: the pair files, a `meta.json` (`train.mmpr.write_meta`; root = the input file's
folder, so relative image paths resolve as in the input), `settings.json` and `progress.jsonl`, and for
correctness `samples.jsonl` (each sample's verdict: positive, negative or format, and its extracted answer); a
running job holds `.pairs.lock` there (`run_folder.hold_output`), so a second run on the folder is refused.
Every finished item's raw samples are appended to `progress.jsonl` (one line per item, fsynced); a
rerun skips the items found there with the same prompt and images (DropoutNTP: question and prefix),
redoes an item edited since, or whose image files were edited in place (`filestamp`; a line cut by
an interruption is dropped and redone too) and rebuilds the pair files from all samples, written atomically. An item that cannot run (a prompt longer than
the model's context) is recorded there with the reason, counted as failed and reported with its
file:line and id; it is not retried. The sampling settings must match the earlier run's; `max_pairs`
may change, which only rebuilds the files.

Deliberate differences:
- Answers are checked by `answers.check_answer` for every dataset (the official picks TextVQA score,
  relaxed accuracy, ANLS, letter or math rules from the dataset's file name), and a final answer that
  cannot be read as the item's kind (no option letter, no number) is a format negative as well.
- Format negatives without an extracted answer skip the containment check (the official compares with
  the string 'None', so a positive answering "No" never pairs with them).
- Duplicates are removed before the P pairs are drawn (a question yields P distinct pairs when it
  can); the draw uses a generator seeded by (seed, item id), so the result does not depend on order.
- Responses are grouped by item id: two items with the same image, question and answer draw their
  pairs separately (the official groups by (image, question, answer): one draw of at most P pairs);
  pairs that come out identical are written once.
- Each sample has its own seed derived from (seed, item id, sample index): a rerun reproduces the
  samples and a resumed run gives the same files as an uninterrupted one.
- DropoutNTP draws one continuation per item (the paper; the official script defaults to 8).
- A DropoutNTP item must have an image (the official script keys each item by its 'image' and fails on one
  without): without one, the continuation "without the image" would be the model's answer to the same prompt.
- Samples keep the official scripts' min_new_tokens (`MIN_NEW_TOKENS`: 1 for correctness, 5 for
  DropoutNTP: the end of turn cannot come sooner, so a continuation that would stop at once does
  not leave the bare prefix as the rejected answer). `max_new_tokens` defaults to 1024 for both;
  the official defaults vary by script version: 2048 or 4096 for correctness, 1024
  (`mm_reasoning_pipeline`) or 2048 (the later `reasoning_data_pipeline`, which sets no minimum)
  for DropoutNTP. A chain of thought cut at 1024 tokens has no final answer and becomes a format
  negative; raise `max_new_tokens` for long reasoning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from internvl_mpo.answers import (
    KINDS,
    build_cot_question,
    check_answer,
    extract_final_answer,
    normalize_options,
    options_text,
)
from internvl_mpo.chat.template import IMAGE_PLACEHOLDER, IMG_CONTEXT, VIDEO_PLACEHOLDER, add_image_prefix
from internvl_mpo.config import check_tile_budget
from internvl_mpo.errors import (
    ConfigError, InputError, Interrupted, NumericsError, PromptTooLongError, SettingError,
)
from internvl_mpo.filestamp import stamps, unchanged
from internvl_mpo.jsonl import read_objects, refuse_misspelt_fields
from internvl_mpo.locks import check_not_in_use
from internvl_mpo.run_folder import (
    Progress,
    atomic_write,
    check_output_folder,
    check_settings,
    hold_output,
    read_settings,
    recorded_weights,
)

CORRECTNESS = "correctness"
DROPOUT_NTP = "dropout-ntp"
METHODS = (CORRECTNESS, DROPOUT_NTP)
# the fields of an item that decide its samples: a misspelling of one (`refuse_misspelt_fields`) is refused
ITEM_FIELDS = ("question", "hint", "image", "video", "answer", "chosen", "options", "kind")
# the official scripts' --min-new-tokens defaults (internvl_lmdeploy_correctness.py,
# internvl_lmdeploy_continue_wo_image.py); lmdeploy suppresses the stop ids until then
MIN_NEW_TOKENS = {CORRECTNESS: 1, DROPOUT_NTP: 5}
LARGE_FILE_RESPONSES = 500_000  # above this many responses the official keeps 3 pairs per question
LARGE_FILE_MAX_PAIRS = 3
# written into the output folder beside settings.json and the pairs (samples.jsonl by correctness only)
RUN_FILES = ("meta.json", "progress.jsonl", "samples.jsonl")
# held by a run in its output folder, as train holds its own (`locks.lock_output`)
PAIRS_LOCK = (".pairs.lock", "pairs run", "samples and pairs")


@dataclass(frozen=True)
class Item:
    """One line of the items file (`where`: file:line). `images` are absolute paths; `image` is the value as given."""

    id: str
    question: str
    image: str | list[str] | None = None
    images: tuple[str, ...] = ()
    answer: str = ""
    options: dict[str, str] | None = None
    kind: str | None = None
    chosen: str = ""
    where: str = ""


@dataclass(frozen=True)
class SampleJob:
    """K answers to one prompt (image placeholders already placed), one per seed."""

    question: str
    images: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class ContinueJob:
    """Continue `prefix` as the assistant's answer to `question` (text only)."""

    question: str
    prefix: str
    seed: int


# A job that cannot run (a prompt longer than the context: InputError) or that fails alone in the engine
# (NumericsError) gets its error instead of its text(s); the item is recorded as failed, reported and not retried.
Sampler = Callable[[list[SampleJob]], list[list[str] | Exception]]
Continuer = Callable[[list[ContinueJob]], list[str | Exception]]


@dataclass(frozen=True)
class PairSettings:
    samples: int = 32
    max_pairs: int = 15
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_num: int = 6
    batch_size: int = 8
    seed: int = 0
    start_ratio: float = 0.5
    model: str = ""
    dtype: str = ""  # the dtype's name, as cli_chat.run_dtype gives it: samples of another precision differ
    weights: str | dict | None = None  # checkpoint.weights_identity: a model saved again, or other weight files, differ

    def __post_init__(self):
        for name in ("samples", "max_pairs", "batch_size", "max_num"):
            if getattr(self, name) < 1:
                raise SettingError("", name, f" must be at least 1, got {getattr(self, name)}")
        check_tile_budget(self.max_num)
        if self.temperature <= 0 or self.top_k == 1:
            raise SettingError("pairs need sampling: ", "temperature", " > 0 and ", "top_k", " other than 1 (got ",
                               "temperature", f" {self.temperature}, ", "top_k", f" {self.top_k}); greedy samples are "
                               "all the same and give no pairs")
        if not 0 < self.start_ratio < 1:
            raise SettingError("", "start_ratio", f" must be in (0, 1), got {self.start_ratio}")
        self.sampling_params(0, DROPOUT_NTP)  # its checks (max_new_tokens, top_k, top_p) before any model loads

    def sampling_params(self, seed: int, method: str):
        from internvl_mpo.generate.params import SamplingParams

        return SamplingParams(
            max_new_tokens=self.max_new_tokens, min_new_tokens=min(MIN_NEW_TOKENS[method], self.max_new_tokens),
            do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed,
        )

    def identity(self, method: str, input_path: Path) -> dict[str, Any]:
        """What decides the samples: a resumed run must match it (max_pairs and batch_size may change)."""
        out = asdict(self)
        del out["max_pairs"], out["batch_size"]
        if method == DROPOUT_NTP:
            del out["samples"], out["max_num"]
        else:
            del out["start_ratio"]  # only DropoutNTP reads it
        # a run from before the minimum was kept sampled without it: its folder is refused, not mixed
        out["min_new_tokens"] = MIN_NEW_TOKENS[method]
        from internvl_mpo.checkpoint import model_key

        out["model"] = model_key(self.model)
        return {"method": method, "input": str(input_path.resolve()), **out}


@dataclass
class PairStats:
    items: int = 0
    responses: int = 0
    positives: int = 0
    negatives: int = 0
    format_negatives: int = 0
    entail_skipped: int = 0
    pairs: int = 0
    format_pairs: int = 0
    # items that ran but gave no pair (correctness: all samples right, or no right one to pair; DropoutNTP: the
    # continuation gave the chosen answer back), as the official postprocess reports all_correct / all_incorrect
    no_pairs: int = 0
    files: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "file:line (id ...): why", one per item that could not run

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if k not in ("files", "failed")]
        return ", ".join([*parts, f"failed={len(self.failed)}"])


# ----------------------------------------------------------------------------- items


def _resolve_image(value: Any, folder: Path, where: str) -> tuple[str | list[str] | None, tuple[str, ...]]:
    if value is None or value == "" or value == []:
        return None, ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"{where}: field 'image' must be a path or a list of paths, got {value!r:.80}")
    from internvl_mpo.processor.image import beside, is_url

    paths = [beside(folder, name) for name in names]
    return value, tuple(path if is_url(path) else str(Path(path).resolve()) for path in paths)


FRAMES_AS_IMAGES = "give frames as a list of paths in 'image'"


def refuse_unread_media(row: dict, where: str) -> None:
    """Refuse a video, which would be ignored and leave the question without its frames."""
    if row.get("video"):
        raise InputError(f"{where}: field 'video' is not supported here; {FRAMES_AS_IMAGES}")


def refuse_video_placeholder(prompt: str, where: str) -> None:
    """Refuse a prompt holding `<video>`: training reads it as a video's place and refuses the pair without one."""
    if VIDEO_PLACEHOLDER in prompt:
        raise InputError(f"{where}: the question holds {VIDEO_PLACEHOLDER}, which training reads as a video's place "
                         f"(its pairs would be refused); videos are not read here, {FRAMES_AS_IMAGES}")


def check_images(images, where: str, checked: set, max_pixels: int | None = None) -> None:
    """Open and decode each image (path or bytes) not in `checked` yet, so a missing file, a non-image
    or one over `max_pixels` pixels is reported with its file:line before the model loads. A video given
    as an image is told the way of these files (not the --video flag, which eval and pairs do not have)."""
    from internvl_mpo.processor.image import open_image, pointed_elsewhere

    for image in images:
        if image not in checked:
            try:
                open_image(image, max_pixels).close()
            except SettingError as e:  # still naming the setting, which the command names by its flag
                raise SettingError(f"{where}: {e.parts[0]}", *e.parts[1:]) from None
            except InputError as e:
                why = pointed_elsewhere(e, f"videos are not read here; {FRAMES_AS_IMAGES}")
                raise InputError(f"{where}: {why}") from None
            checked.add(image)


def place_images(question: str, n_images: int) -> str:
    """One image: its placeholder moved to the front as `<image>\\n` (as the official pipeline); several:
    the question's placeholders, or `Image-k: <image>` lines in front when it has none."""
    count = question.count(IMAGE_PLACEHOLDER)
    if n_images == 1 and count <= 1:
        return IMAGE_PLACEHOLDER + "\n" + question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    if count == 0:
        return add_image_prefix(question, n_images)
    if count != n_images:
        raise InputError(f"the question has {count} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s)")
    return question


def correctness_prompt(item: Item) -> str:
    """The prompt the sampler sees and the pairs store: CoT-wrapped, options appended, images placed."""
    return place_images(build_cot_question(item.question, item.options), len(item.images))


def refuse_non_finite(value: Any, key: str, where: str) -> None:
    """Refuse a JSON number that no float holds (NaN, Infinity, 1e400), which str() would make the text "nan" or
    "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: field {key!r} must be a finite number, got {value!r} (JSON NaN, Infinity or a "
                         "number beyond about 1.8e308)")


def _text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise InputError(f"{where}: field {key!r} is required (a string or a number)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise InputError(f"{where}: field {key!r} must be a non-empty string or a number, got {value!r:.80}")
    refuse_non_finite(value, key, where)
    return str(value)


def _parse_item(row: dict, method: str, folder: Path, where: str) -> Item:
    refuse_misspelt_fields(row, ITEM_FIELDS, where)
    item_id = _text_field(row, "id", where)
    question = _text_field(row, "question", where)
    if row.get("hint") not in (None, ""):  # a line before the question, as `eval` puts it: it may need the hint
        question = f"{_text_field(row, 'hint', where).strip()}\n{question}"
    refuse_unread_media(row, where)
    image, images = _resolve_image(row.get("image"), folder, where)
    if method == DROPOUT_NTP:
        chosen = row.get("chosen") or row.get("answer")
        if row.get("chosen") is None and isinstance(chosen, (int, float)):  # an answer of 3, as correctness reads it
            chosen = _text_field(row, "answer", where)
        if not isinstance(chosen, str) or not chosen.strip():
            raise InputError(f"{where}: DropoutNTP needs a non-empty string 'chosen' (or 'answer')")
        try:
            # options as correctness's prompt gives them ("A. text" lines after the question): the chosen answer may
            # name a letter, which a question without them would leave the pair's training to guess
            block = options_text(normalize_options(row.get("options")))
            question = f"{question}\n{block.rstrip()}" if block else question
            place_images(question, len(images))  # the pairs keep the question: training must be able to place them
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        refuse_video_placeholder(question, where)
        if not images:  # without an image the "continued without the image" answer is a sample of the same prompt
            raise InputError(f"{where}: DropoutNTP needs an 'image': its rejected answer is the chosen one continued "
                             "without the image, which for an item without one is the model's own answer to the same prompt")
        return Item(item_id, question, image, images, chosen=chosen, where=where)
    answer = _text_field(row, "answer", where)
    kind = row.get("kind")
    if kind is not None and kind not in KINDS:
        raise InputError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        options = normalize_options(row.get("options")) or None
        item = Item(item_id, question, image, images, answer, options, kind, where=where)
        correctness_prompt(item)
        self_check = check_answer(answer, answer, kind, options)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    refuse_video_placeholder(correctness_prompt(item), where)
    if not self_check:
        raise InputError(f"{where}: the ground truth {answer!r} cannot be checked (it does not match itself); "
                         'give the options, or "kind": "text" to compare it as text')
    return item


def read_items(path: str | Path, method: str, max_pixels: int | None = None, progress: bool = False) -> list[Item]:
    """Items of a JSONL file; relative image paths are taken against the file's folder. Every image
    is opened and decoded once here (refused over `max_pixels` pixels, default: Pillow's limit); `progress`
    shows a bar after a second, since decoding thousands of images takes minutes before the model loads."""
    from tqdm import tqdm

    path = Path(path)
    items, seen, checked = [], {}, set()
    # shown once reading has taken a second: a small file reads without a bar
    rows = tqdm(read_objects(path, "items file"), desc="reading items", unit="item", disable=not progress, delay=1)
    for where, row in rows:
        item = _parse_item(row, method, path.parent, where)
        if item.id in seen:
            raise InputError(f"{where}: id {item.id!r} appears twice (first at {seen[item.id]})")
        check_images(item.images, where, checked, max_pixels)
        seen[item.id] = where
        items.append(item)
    if not items:
        raise InputError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- seeds, progress and output files


def sample_seed(seed: int, item_id: str, index: int) -> int:
    """A 63-bit seed for sample `index` of an item, independent of order and batching."""
    digest = hashlib.sha256(f"{seed}:{item_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _write_outputs(out: Path, input_path: Path, files: dict[str, list[dict]]) -> list[str]:
    """Each dataset's pairs as JSONL (exact duplicates dropped), then a meta.json of the non-empty ones."""
    from internvl_mpo.train.mmpr import DatasetSpec, write_meta

    specs, written = [], []
    for name, rows in files.items():
        seen, unique = set(), []
        for row in rows:
            key = json.dumps(row, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                unique.append(row)
        path = out / f"{name}.jsonl"
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique))
        written.append(str(path))
        if unique:
            root = str(input_path.parent.resolve())
            specs.append(DatasetSpec(name, root, str(path.resolve()), repeat_time=1.0, length=len(unique)))
    tmp = out / "meta.json.tmp"
    try:
        write_meta(str(tmp), specs)
        os.replace(tmp, out / "meta.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return [*written, str(out / "meta.json")]


def _run(
    items: list[Item], progress: Progress, per_call: int, desc: str, inputs: Callable[[Item], dict],
    work: Callable[[list[Item]], list[dict]], show_progress: bool = True,
) -> dict:
    """Call `work` on chunks of unfinished items, appending its rows to the progress file. An item is
    finished when a row with its id holds its `inputs` (what its samples depend on) and, where the row
    keeps "stamps", its image files are unchanged (`filestamp`): an item edited since its row was written
    is redone (a field missing from a row, written by an older version, is not compared)."""
    from tqdm import tqdm

    done = progress.load()
    todo = [item for item in items
            if item.id not in done or any(done[item.id].get(k, v) != v for k, v in inputs(item).items())
            or not unchanged(item.images, done[item.id].get("stamps"))]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item", disable=not show_progress) as bar:
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            rows = work(chunk)
            progress.append(rows)
            done.update((row["id"], row) for row in rows)
            bar.update(len(chunk))
    return done


# ----------------------------------------------------------------------------- correctness


def judge(item: Item, response: str) -> tuple[str, str | None]:
    """("positive" | "negative" | "format", the extracted final answer or None)."""
    answer = extract_final_answer(response, strict=True)
    if answer is None:
        return "format", None
    correct = check_answer(answer, item.answer, item.kind, item.options)
    if correct is None:
        return "format", answer
    return ("positive" if correct else "negative"), answer


def _pair_row(item: Item, question: str, chosen: str, rejected: str, answer_gt: str | None) -> dict:
    row: dict[str, Any] = {} if item.image is None else {"image": item.image}
    row.update(question=question, chosen=chosen, rejected=rejected)
    if answer_gt is not None:
        row["answer_gt"] = answer_gt
    return row


def _draw(item: Item, question: str, positives, negatives, max_pairs: int, seed: int, tag: str, stats: PairStats):
    candidates: dict[tuple[str, str], None] = {}
    for chosen, chosen_answer in positives:
        for rejected, rejected_answer in negatives:
            if rejected_answer is not None and chosen_answer.lower() in rejected_answer.lower():
                stats.entail_skipped += 1
                continue
            candidates.setdefault((chosen, rejected), None)
    keys = list(candidates)
    picked = random.Random(f"{seed}:{item.id}:{tag}").sample(keys, min(max_pairs, len(keys)))
    return [_pair_row(item, question, c, r, item.answer) for c, r in picked]


def item_pairs(item: Item, question: str, responses: Sequence[str], max_pairs: int, seed: int, stats: PairStats):
    """(correctness pairs, format pairs, each response's `samples.jsonl` row) of one question's responses."""
    verdicts: dict[str, list[tuple[str, str | None]]] = {"positive": [], "negative": [], "format": []}
    judged = []
    for index, response in enumerate(responses):
        verdict, answer = judge(item, response)
        verdicts[verdict].append((response, answer))
        judged.append({"id": item.id, "sample": index, "verdict": verdict, "answer": answer, "response": response})
    stats.responses += len(responses)
    stats.positives += len(verdicts["positive"])
    stats.negatives += len(verdicts["negative"])
    stats.format_negatives += len(verdicts["format"])
    pos = verdicts["positive"]
    return (
        _draw(item, question, pos, verdicts["negative"], max_pairs, seed, "correctness", stats),
        _draw(item, question, pos, verdicts["format"], max_pairs, seed, "format", stats),
        judged,
    )


def make_correctness_pairs(
    input: str | Path, output: str | Path, sample_fn: Sampler, settings: PairSettings, items: list[Item] | None = None,
    progress: bool = True,
) -> PairStats:
    """Sample answers for every item (resuming), check them, write the pair files and meta.json. `items`: those
    of `input` when already read (reading decodes every image); `progress`: show a progress bar."""
    input_path, out = Path(input), Path(output)
    items = read_items(input_path, CORRECTNESS) if items is None else items

    def inputs(it: Item) -> dict:
        return {"question": correctness_prompt(it), "images": list(it.images)}

    def work(chunk: list[Item]) -> list[dict]:
        jobs = [
            SampleJob(correctness_prompt(it), it.images, tuple(sample_seed(settings.seed, it.id, k) for k in range(settings.samples)))
            for it in chunk
        ]
        taken = [stamps(it.images) for it in chunk]  # before the sampler reads the images
        answers = sample_fn(jobs)
        if len(answers) != len(jobs) or any(not isinstance(a, Exception) and len(a) != settings.samples
                                            for a in answers):
            raise InputError(f"the sampler returned {len(answers)} answer lists for {len(jobs)} x {settings.samples}")
        return [
            {"id": it.id, **inputs(it), "stamps": st,
             **({"error": str(a)} if isinstance(a, Exception) else {"responses": a})}
            for it, st, a in zip(chunk, taken, answers, strict=True)
        ]

    per_call = max(1, settings.batch_size // settings.samples)
    with hold_output(out, settings.identity(CORRECTNESS, input_path), RUN_FILES, PAIRS_LOCK):
        done = _run(items, Progress(out / "progress.jsonl"), per_call, "pairs correctness", inputs, work, progress)
        max_pairs = settings.max_pairs
        if len(items) * settings.samples > LARGE_FILE_RESPONSES:
            max_pairs = min(max_pairs, LARGE_FILE_MAX_PAIRS)
        stats = PairStats(items=len(items))
        correct_rows, format_rows, judged = [], [], []
        for item in items:
            row = done[item.id]
            if "error" in row:
                stats.failed.append(f"{item.where} (id {item.id!r}): {row['error']}")
                continue
            correct, formats, samples = item_pairs(item, row["question"], row["responses"], max_pairs, settings.seed,
                                                   stats)
            if not correct and not formats:
                stats.no_pairs += 1
            correct_rows += correct
            format_rows += formats
            judged += samples
        atomic_write(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in judged))
        name = input_path.stem
        stats.files = _write_outputs(
            out, input_path,
            {f"{name}_pairs_vqa_correctness_rules": correct_rows, f"{name}_pairs_vqa_format_rules": format_rows},
        )
        stats.pairs, stats.format_pairs = _count_lines(stats.files[0]), _count_lines(stats.files[1])
    return stats


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def refuse_other_method(out: Path, method: str) -> None:
    """A folder holds one method's pairs, or one `eval` run (`method` "eval"): a run of another there is refused
    naming what the folder holds (the settings check would list every setting the two record differently)."""
    if (out / "settings.json").is_file():
        earlier = read_settings(out / "settings.json", "eval" if method == "eval" else "pairs", "output folder")
        earlier = earlier.get("method", "eval" if "cot" in earlier else method)  # eval records no method
        if earlier == method:
            return
        if "eval" in (earlier, method):
            held = "an eval run's predictions" if earlier == "eval" else f"{earlier} pairs"
            wanted = "eval" if method == "eval" else f"the {method} pairs"
            raise ConfigError(f"{out} holds {held} (eval and pairs need output folders of their own): give {wanted} "
                              "another --output")
        raise ConfigError(f"{out} holds {earlier} pairs (an output folder holds one method's): give the {method} "
                          "pairs another --output")


def interrupted(command: str, kept: Path, noun: str) -> str:
    """The line a resumable command (`pairs`, `eval`) prints at Ctrl-C: how many `noun`s its progress file
    `kept` holds, and how to go on."""
    n = len(Progress(kept).load())
    return (f"internvl-mpo {command}: interrupted; {kept} keeps {n} {noun}{'' if n == 1 else 's'}: run the same "
            "command again to resume")


# ----------------------------------------------------------------------------- DropoutNTP


def truncate_words(text: str, ratio: float = 0.5) -> str:
    """The first int(ratio * n_words) words, split on single spaces (as the official), stripped."""
    words = text.split(" ")
    return " ".join(words[: int(len(words) * ratio)]).strip()


def text_only_question(question: str) -> str:
    return question.replace(IMAGE_PLACEHOLDER, "").strip()


def make_dropout_ntp_pairs(
    input: str | Path, output: str | Path, continue_fn: Continuer, settings: PairSettings, items: list[Item] | None = None,
    progress: bool = True,
) -> PairStats:
    """Continue half of each chosen answer without the image; write the pairs and meta.json. `items`: those
    of `input` when already read (reading decodes every image); `progress`: show a progress bar."""
    input_path, out = Path(input), Path(output)
    items = read_items(input_path, DROPOUT_NTP) if items is None else items

    def inputs(it: Item) -> dict:
        return {"question": text_only_question(it.question), "prefix": truncate_words(it.chosen, settings.start_ratio)}

    def work(chunk: list[Item]) -> list[dict]:
        jobs = [ContinueJob(**inputs(it), seed=sample_seed(settings.seed, it.id, 0)) for it in chunk]
        texts = continue_fn(jobs)
        if len(texts) != len(jobs):
            raise InputError(f"the continuer returned {len(texts)} texts for {len(jobs)} prefixes")
        return [
            {"id": it.id, **inputs(it), **({"error": str(t)} if isinstance(t, Exception) else {"continuation": t})}
            for it, t in zip(chunk, texts, strict=True)
        ]

    with hold_output(out, settings.identity(DROPOUT_NTP, input_path), RUN_FILES, PAIRS_LOCK):
        done = _run(items, Progress(out / "progress.jsonl"), settings.batch_size, "pairs dropout-ntp", inputs, work, progress)
        stats = PairStats(items=len(items), responses=len(items))
        rows = []
        for item in items:
            row = done[item.id]
            if "error" in row:
                stats.failed.append(f"{item.where} (id {item.id!r}): {row['error']}")
                continue
            if IMG_CONTEXT in item.chosen:  # training refuses the pair (the text reads as image tokens)
                stats.failed.append(f"{item.where} (id {item.id!r}): the chosen answer contains {IMG_CONTEXT}; it is "
                                    "reserved for image features")
                continue
            rejected = row["prefix"] + row["continuation"]
            # training refuses a pair whose answers are the same text, or whose rejected one is blank
            if rejected != item.chosen and rejected.strip() and IMG_CONTEXT not in rejected:
                rows.append(_pair_row(item, item.question, item.chosen, rejected, None))
            else:
                stats.no_pairs += 1
        stats.files = _write_outputs(out, input_path, {f"{input_path.stem}_pairs_dropout_ntp": rows})
        stats.pairs = _count_lines(stats.files[0])
    return stats


# ----------------------------------------------------------------------------- the model


def continuation_prompt_ids(tokenizer, question: str, prefix: str, template: str = "internvl2_5") -> list[int]:
    """Template prompt (open assistant turn) + the prefix's ids. The prefix is stripped, so this equals
    tokenizing the rendered prompt and the prefix as one string, as the official script does: the
    assistant header ends in a newline, which the Qwen2 pre-tokenizer never joins to following text."""
    from internvl_mpo.chat.template import build_prompt_ids, get_template

    if question:
        ids = build_prompt_ids(tokenizer, question, template=template)
    else:  # a question that was only its image: lmdeploy closes the empty user turn, where chat()'s template leaves
        # the bare role ("<|im_start|>user\n<|im_start|>assistant\n")
        tmpl = get_template(template)
        ids = tokenizer.encode(tmpl.system_turn() + tmpl.roles[0] + tmpl.sep + tmpl.roles[1])
        ids = [tokenizer.bos_id, *ids] if tokenizer.add_bos_token else ids
    prefix_ids = tokenizer.encode(prefix)
    if tokenizer.img_context_id in prefix_ids:  # the continuation has no image to fill it
        raise InputError(f"the kept part of the chosen answer contains {IMG_CONTEXT}; it is reserved for image "
                         "features")
    return ids + prefix_ids


class ModelGenerator:
    """Samples and continuations through an InternVLChat's engine, with continuous batching.

    A prompt's images are encoded once and shared by its K seeded requests; images over `max_pixels`
    pixels (default: Pillow's limit) are refused.
    """

    def __init__(self, chat, settings: PairSettings, max_pixels: int | None = None):
        self.chat = chat
        self.settings = settings
        self.max_pixels = max_pixels

    def _generate(self, requests: list) -> list[str | Exception]:
        """Raw text of each request (special tokens skipped, nothing stripped); a request that failed alone in the
        engine for its input (an InputError; its activations overflowing, at any token: NumericsError) gets its
        error, and the others still run: such an item is recorded as failed and not retried. Any other failure
        (out of memory on a prompt, which another batch or a rerun may not hit; a failing decode step) raises,
        so that the same command retries its items."""
        from internvl_mpo.pipeline import TextAssembler

        if not requests:
            return []
        longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        gen = self.chat.engine.start(min(self.settings.batch_size, len(requests)), longest)
        for request in requests:
            gen.add(request)
        assemblers = [TextAssembler(self.chat.tokenizer) for _ in requests]
        texts: list[str | Exception] = [""] * len(requests)
        while gen:
            for event in gen.step():
                if event.error is not None:
                    if not (event.alone and isinstance(event.error, (InputError, NumericsError))):
                        raise event.error
                    texts[event.rid] = event.error
                    continue
                piece, _ = assemblers[event.rid].feed(event.token, last=event.finish is not None)
                texts[event.rid] += piece
        return texts

    def sample(self, jobs: list[SampleJob]) -> list[list[str] | Exception]:
        import torch

        from internvl_mpo.generate.engine import Request

        model = self.chat.model
        requests, owners = [], []
        out: list[list[str] | Exception] = [[] for _ in jobs]
        for j, job in enumerate(jobs):
            try:
                prepared = self.chat.prepare(job.question, list(job.images) or None, max_num=self.settings.max_num,
                                             max_pixels=self.max_pixels)
            except InputError as e:  # a prompt longer than the context: this job fails alone, naming pairs' flags
                from internvl_mpo.cli import flagged

                out[j] = flagged(e, pairs)
                continue
            vit_embeds = None
            if prepared.pixel_values is not None:
                with torch.no_grad():
                    vit_embeds = model.extract_feature(prepared.pixel_values.to(model.device, model.dtype))
            for seed in job.seeds:
                requests.append(Request(prepared.prompt_ids, self.settings.sampling_params(seed, CORRECTNESS), vit_embeds=vit_embeds))
                owners.append(j)
        for owner, text in zip(owners, self._generate(requests), strict=True):
            if isinstance(out[owner], list):  # a sample that failed fails its item (alone), with its error
                out[owner] = text if isinstance(text, Exception) else out[owner] + [text.strip()]
        return out

    def continue_prefix(self, jobs: list[ContinueJob]) -> list[str | Exception]:
        from internvl_mpo.generate.engine import Request

        template = self.chat.config.template
        out: list[str | Exception | None] = []
        requests = []
        for job in jobs:
            try:  # the question or the prefix may hold <IMG_CONTEXT>, which only image features fill: it fails alone
                ids = continuation_prompt_ids(self.chat.tokenizer, job.question, job.prefix, template)
            except InputError as e:
                out.append(e)
                continue
            if len(ids) >= self.chat.context:
                out.append(PromptTooLongError(f"prompt is {len(ids)} tokens, longer than the context allows: at "
                                              f"most {self.chat.context - 1}"))
            else:
                out.append(None)
                requests.append(Request(ids, self.settings.sampling_params(job.seed, DROPOUT_NTP)))
        texts = iter(self._generate(requests))
        return [next(texts) if text is None else text for text in out]


def pairs(
    method: str,
    *,
    model: str,
    input: str,
    output: str,
    samples: int = 32,
    max_pairs: int = 15,
    temperature: float = 0.7,
    top_k: int = 50,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    max_num: int = 6,
    batch_size: int = 8,
    seed: int = 0,
    start_ratio: float = 0.5,
    device: str | None = None,
    dtype: str | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> int:
    """Build MMPR preference pairs from a model's samples (resumable).

    method: correctness (sample K CoT answers, check them against "answer") or dropout-ntp (continue half of "chosen" without the image)
    model: checkpoint folder or hub id
    input: JSONL items {"id", "image" (path or list, relative to the file), "question", "answer" or "chosen", optional "options", "kind", "hint" (a line before the question)}
    output: folder for the pair files, meta.json and the progress file
    samples: answers sampled per question (correctness; DropoutNTP draws one continuation)
    max_pairs: most pairs per question (3 when there are more than 500k responses)
    temperature: sampling temperature
    top_k: sample among the k most likely tokens (0 = off)
    top_p: nucleus sampling mass
    max_new_tokens: most tokens per sample
    max_num: most tiles per image
    batch_size: sequences decoded together
    seed: base seed; each sample's seed derives from it, the item id and the sample index
    start_ratio: DropoutNTP keeps this fraction of the chosen answer's words
    device: cpu, cuda, cuda:1, ... (default: cuda when available)
    dtype: float32, bfloat16, float16 or auto (the checkpoint's own) (default: bf16 on CUDA, fp32 on CPU)
    max_pixels: refuse images with more pixels (default: Pillow's limit, about 89 M)
    progress: show a progress bar
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method == CORRECTNESS and samples == 1:
        raise InputError("--samples 1: correctness pairs need at least 2 samples per question (each pair is a right "
                         "and a wrong answer to it)")
    # the flags, checked before torch loads (in a fraction of a second); the dtype and weights come below
    settings = PairSettings(samples, max_pairs, temperature, top_k, top_p, max_new_tokens, max_num, batch_size, seed,
                            start_ratio, model)
    from internvl_mpo.checkpoint import weights_identity
    from internvl_mpo.cli_chat import run_dtype
    from internvl_mpo.devices import default_device
    from internvl_mpo.pipeline import InternVLChat
    from internvl_mpo.processor.image import let_pillow_open

    let_pillow_open(max_pixels)
    device = default_device(device)
    dtype_name, weights = run_dtype(dtype, device, model)
    settings = replace(settings, dtype=dtype_name,
                       weights=weights_identity(weights, recorded_weights(Path(output) / "settings.json")))
    # fail on a bad file or output folder before loading the model
    items = read_items(input, method, max_pixels, progress)
    check_output_folder(Path(output))
    refuse_other_method(Path(output), method)
    check_not_in_use(Path(output), PAIRS_LOCK)
    check_settings(Path(output) / "settings.json", settings.identity(method, Path(input)), RUN_FILES, record=False)
    chat = InternVLChat.from_pretrained(model, dtype=dtype, device=device, weights=weights)
    generator = ModelGenerator(chat, settings, max_pixels)
    try:
        if method == CORRECTNESS:
            stats = make_correctness_pairs(input, output, generator.sample, settings, items, progress)
        else:
            stats = make_dropout_ntp_pairs(input, output, generator.continue_prefix, settings, items, progress)
    except KeyboardInterrupt:  # the progress bar is closed: the line goes below it
        print(interrupted("pairs", Path(output) / "progress.jsonl", "finished item"), file=sys.stderr)
        raise Interrupted from None
    for failure in stats.failed:
        print(f"skipped {failure}")
    print(stats.summary())
    print(f"meta: {stats.files[-1]}")
    if method == CORRECTNESS:
        print(f"each sample's verdict: {Path(output) / 'samples.jsonl'}")
    return 0
