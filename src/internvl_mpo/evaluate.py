"""Benchmark evaluation: multiple-choice, yes/no and short-answer questions, scored as VLMEvalKit scores MPO models.

Mirrors open-compass/VLMEvalKit:
- Prompts (`vlmeval/vlm/internvl/utils.py`, `internvl_chat.py` `build_prompt`): multiple choice as
  `build_multi_choice_prompt` (hint line, question, "\\nA. text" per option, then "Answer with the
  option's letter from the given choices directly." or "请直接回答选项字母。" when the prompt has Chinese);
  yes/no questions as given; short answers + "\\nAnswer the question using a single word or phrase."; a hint
  line goes before a question of any kind (VLMEvalKit's files have hints for multiple choice only).
  With `cot`, the MPO prompt of `build_mpo_prompt`: the question (kept quirk: without the hint),
  options appended as "A. text" lines, wrapped in the CoT instruction. One image goes in front as
  `<image>\\n`, several as `Image-k: <image>` lines (`reorganize_prompt`); `max_num` tiles per image
  and 64 in all (`set_max_num`); greedy decoding.
- Answers: with `cot`, the text after the first "Final answer:" / "Answer:" (nothing when nothing follows
  it; the whole response where it has neither), as `mpo_post_processing`; letters as `can_infer`
  (`answers.parse_choice`, a superset, except that a negated letter, "not A", or a copied options list
  picks none, and "A cat" names the option "cat");
  yes/no as `YOrN_Extraction` (`answers.parse_yes_no`, a superset).
- MMBench-style TSV (`ImageBaseDataset.prepare_tsv`): columns index, question, hint, A..Z, answer,
  category, image (base64); an image cell of at most 64 characters names the row whose image it
  shares. Each image is re-encoded as `dump_image` writes it (`<index>.jpg`: JPEG at Pillow's default quality,
  RGBA, P and LA converted to RGB), in memory, so the model sees VLMEvalKit's pixels. Rows i + k * 10**6
  are question i with its options rotated (`mcq_circular_eval`): a question counts right only when all its
  rows are.

Differences: there is no judge model, so an answer whose letter cannot be inferred counts wrong
(VLMEvalKit's exact-matching mode); short answers are compared by `answers.check_answer` (VLMEvalKit has per-benchmark scorers); with
`cot` the final answer is extracted for every kind, not only multiple choice and yes/no. Empty and
"nan" TSV cells are missing values (pandas also reads "None", "NA", "null", ... as missing). A TSV row with
fewer cells than the header is refused (pandas reads the missing ones as missing values), and so is a column
named twice (pandas renames the second `name.1`).

JSONL rows without an "id" are numbered from 1 in file order, as `generate` numbers requests (an
explicit id that repeats such a number is refused as a duplicate).

Outputs, in the output folder (default: `<data stem>_eval`, or `<data stem>_cot_eval` with `cot`, in
the current folder, so that a read-only benchmark folder or a source checkout is not written into):
`predictions.jsonl` (one line per question, appended and fsynced as
answers arrive; a rerun skips the questions found there with
the same prompt, images (paths, and `filestamp` stamps of their files) and ground truth), `score.json` (overall and per-category
accuracy, recomputed from all predictions) and `settings.json` (a rerun must use the same settings); a
running job holds `.eval.lock` there (`run_folder.hold_output`), so a second run on the folder is refused.
A question that cannot run (a prompt longer than the model's context, out of memory in the engine) is recorded
with the reason, counted wrong and listed under "failed" with its file:line and id; a rerun asks it again (as
`generate` retries failed requests: the failure may have been the machine's).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from internvl_mpo.answers import (
    ANSWER_INSTRUCTIONS,
    KINDS,
    build_cot_question,
    check_answer,
    extract_final_answer,
    infer_kind,
    normalize_options,
    states_answer,
)
from internvl_mpo.chat.template import IMAGE_PLACEHOLDER
from internvl_mpo.config import check_tile_budget
from internvl_mpo.errors import InputError, Interrupted, SettingError
from internvl_mpo.filestamp import stamps, unchanged
from internvl_mpo.jsonl import check_input_file, read_objects, refuse_misspelt_fields
from internvl_mpo.locks import check_not_in_use
from internvl_mpo.pairs import (
    check_images,
    interrupted,
    refuse_non_finite,
    refuse_other_method,
    refuse_unread_media,
)
from internvl_mpo.run_folder import (
    Progress,
    atomic_write,
    check_output_folder,
    check_settings,
    hold_output,
    recorded_weights,
)

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MCQ_INSTRUCTION_ZH = "请直接回答选项字母。"
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
DIRECT_INSTRUCTION = "Answer the question directly."  # build_multi_choice_prompt's line for a question without options
DIRECT_INSTRUCTION_ZH = "请直接回答问题。"
TOTAL_MAX_NUM = 64  # VLMEvalKit's cap on tiles over all images of one question
IMAGE_REFERENCE_CHARS = 64  # a TSV image cell this short names another row's image
RUN_FILES = ("predictions.jsonl", "score.json")  # written into the output folder beside settings.json
# held by a run in its output folder, as train holds its own (`locks.lock_output`)
EVAL_LOCK = (".eval.lock", "eval run", "predictions and scores")
CIRCULAR_OFFSET = 10**6  # an MMBench TSV's row i + k * 10**6 is question i with its options rotated k times
_MISSING = {"", "nan", "NaN"}
# the fields of a JSONL question that decide its prompt or score: a misspelling of one is refused
BENCH_FIELDS = ("question", "answer", "image", "video", "options", "hint", "category", "kind")


@dataclass(frozen=True)
class BenchItem:
    id: str
    question: str
    answer: str
    kind: str
    images: tuple[str | bytes, ...] = ()  # paths or encoded image bytes
    options: dict[str, str] | None = None
    hint: str = ""
    category: str = ""
    where: str = ""  # file:line, or file:row for a TSV


@dataclass(frozen=True)
class Prompt:
    question: str
    images: tuple[str | bytes, ...]


# Called with (key, Prompt) pairs and a batch size, it yields (key, answer) as answers finish, in any
# order; a question that cannot run (a prompt longer than the context, out of memory on its images)
# gets its exception instead.
Answerer = Callable[[Iterable[tuple[Any, Prompt]], int], Iterable[tuple[Any, str | Exception]]]


# ----------------------------------------------------------------------------- reading


def _item(item_id: str, question: str, answer: str, images, options, hint, category, kind, where: str) -> BenchItem:
    if not question.strip():
        raise InputError(f"{where}: the question is empty")
    count = question.count(IMAGE_PLACEHOLDER)  # none: the images go in front
    if count and count != len(images):
        raise InputError(f"{where}: the question has {count} {IMAGE_PLACEHOLDER} placeholder(s) "
                         f"for {len(images)} image(s)")
    if not answer.strip():
        raise InputError(f"{where}: the answer is empty")
    try:
        opts = normalize_options(options) or None
        kind = kind or infer_kind(answer, opts)
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        ok = check_answer(answer, answer, kind, opts)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    if not ok:
        raise InputError(f"{where}: the answer {answer!r} cannot be checked (it does not match itself); "
                         'give the options, or "kind": "text" to compare it as text')
    return BenchItem(item_id, question, answer, kind, tuple(images), opts, hint, category, where)


def _read_jsonl(path: Path, max_pixels: int | None) -> list[BenchItem]:
    from internvl_mpo.processor.image import beside

    items, checked = [], set()
    for number, (where, row) in enumerate(read_objects(path, "benchmark file"), 1):
        refuse_misspelt_fields(row, BENCH_FIELDS, where)
        row.setdefault("id", number)  # no id: its number in the file, as `generate` numbers requests
        for key in ("id", "question", "answer"):
            if row.get(key) is None:
                raise InputError(f"{where}: field {key!r} is required (a string or a number)")
            if not isinstance(row[key], (str, int, float)) or isinstance(row[key], bool):
                raise InputError(f"{where}: field {key!r} must be a string or a number, got {row[key]!r:.80}")
            refuse_non_finite(row[key], key, where)
        refuse_unread_media(row, where)
        for key in ("hint", "category"):  # a list or an object would go into the prompt or score.json as its repr
            if row.get(key) is not None and (isinstance(row[key], bool) or not isinstance(row[key], (str, int, float))):
                raise InputError(f"{where}: field {key!r} must be a string, got {row[key]!r:.80}")
            refuse_non_finite(row.get(key), key, where)  # NaN (pandas' empty cell) would be the text "nan"
        options = row.get("options")
        for key, value in (options.items() if isinstance(options, dict) else enumerate(options or [])):
            refuse_non_finite(value, f"options[{key!r}]", where)
        letters = [k for k in ("A", "B") if k in row]  # a VLMEvalKit row written as JSON: its choices as columns
        if letters and options is None:
            raise InputError(f"{where}: field {letters[0]!r} is not read: give the choices as \"options\": "
                             '{"A": ..., "B": ...} (or a list)')
        image = row.get("image") or []
        names = [image] if isinstance(image, str) else image
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise InputError(f"{where}: field 'image' must be a path or a list of paths, got {image!r:.80}")
        paths = [beside(path.parent, name) for name in names]
        check_images(paths, where, checked, max_pixels)
        items.append(_item(
            str(row["id"]), str(row["question"]), str(row["answer"]), paths, row.get("options"),
            "" if row.get("hint") is None else str(row["hint"]),  # a hint or category 0 is one (not `or ""`)
            "" if row.get("category") is None else str(row["category"]), row.get("kind"), where,
        ))
    return items


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    """The rows under the header, as {column: cell}; blank lines are skipped, as pandas skips them. An empty
    file, a header without the required columns or with a name twice, and a row with more or fewer cells
    than the header has columns (its cells would go under the wrong columns) are refused, naming the file
    and the row or column."""
    previous = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images exceed the 128 kB default
    # Read as a stream: the whole file as bytes, then as text, then a StringIO copy of it (4 bytes a character) held
    # about 7 times the file's size at once (1 GB for a 144 MB TSV), where VLMEvalKit's TSVs reach gigabytes.
    rows, line = [], 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # a leading byte order mark is dropped, as pandas
            reader = csv.reader(f, delimiter="\t", strict=True)
            # strict: a quote opened in a cell and never closed took every row after it into that cell without a word
            for row in reader:
                if row:
                    rows.append(row)
                line = reader.line_num + 1  # where the next row starts
    except UnicodeDecodeError:
        data = path.read_bytes()  # the error's offset is into the chunk decoded: find the line in the bytes
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise InputError(f"{path}: not valid UTF-8 (line {line})") from None
        raise
    except csv.Error as e:  # as pandas (VLMEvalKit's reader) refuses it: "EOF inside string"
        raise InputError(f"{path}:line {line}: not a readable TSV ({e}; a quote opened in a cell and never "
                         "closed?)") from None
    finally:
        csv.field_size_limit(previous)
    if not rows:
        raise InputError(f"{path}: the file is empty (or blank); expected a header row naming the columns, index, "
                         "question, answer, ...")
    header = rows[0]
    missing = [k for k in ("index", "question", "answer") if k not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    twice = next((name for name in header if name and header.count(name) > 1), None)
    if twice is not None:
        raise InputError(f"{path}: column {twice!r} appears more than once in the header; rename or remove one")
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise InputError(f"{path}:row {number}: {len(row)} cells, but the header has {len(header)} columns "
                             "(a tab missing or extra in the row, or a cell's text opening with a quote)")
    return [dict(zip(header, row)) for row in rows[1:]]


def _cell(row: dict[str, str], key: str) -> str:
    value = row.get(key)
    return "" if value is None or value.strip() in _MISSING else value


def _as_dumped(data: bytes) -> bytes:
    """A TSV's image as VLMEvalKit hands it to the model: decoded, RGBA, P and LA converted to RGB, and saved as
    `<index>.jpg` (`decode_base64_to_image_file`: Pillow's JPEG at its default quality, 75), which the model reads.
    An image JPEG cannot hold (16-bit, float; VLMEvalKit fails on it) is kept as given."""
    try:
        with warnings.catch_warnings():  # its pixels were checked against the run's limit already
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                out = io.BytesIO()
                (image.convert("RGB") if image.mode in ("RGBA", "P", "LA") else image).save(out, format="JPEG")
    except (OSError, ValueError, Image.DecompressionBombError):
        return data
    return out.getvalue()


def _read_tsv(path: Path, max_pixels: int | None) -> list[BenchItem]:
    rows = _tsv_rows(path)
    if not rows:
        return []
    if "image_path" in rows[0] and "image" not in rows[0]:
        raise InputError(f"{path}: images given as an image_path column are not read (the questions would go without "
                         "them); give base64 images in an image column, or a JSONL file with image paths")
    encoded = {row["index"]: _cell(row, "image") for row in rows}
    items, checked, dumped = [], set(), {}
    for number, row in enumerate(rows, 2):
        where = f"{path}:row {number} (index {row['index']})"
        if not _cell(row, "index"):
            raise InputError(f"{path}:row {number}: the index is empty")
        cell = encoded[row["index"]]
        if cell and len(cell) <= IMAGE_REFERENCE_CHARS:
            if len(encoded.get(cell, "")) <= IMAGE_REFERENCE_CHARS:
                raise InputError(f"{where}: image refers to index {cell!r}, which holds no image")
            cell = encoded[cell]
        images = []
        if cell:
            try:
                images.append(base64.b64decode("".join(cell.split()), validate=True))  # lines of 76 as encodebytes
            except (binascii.Error, ValueError):
                raise InputError(f"{where}: the image is not valid base64") from None
        check_images(images, where, checked, max_pixels)
        if cell:
            if cell not in dumped:  # rotated copies of a question repeat its image
                dumped[cell] = _as_dumped(images[0])
            images = [dumped[cell]]
        options = {k: _cell(row, k) for k in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if _cell(row, k)}
        items.append(_item(
            row["index"], row["question"] or "", _cell(row, "answer"), images, options or None, _cell(row, "hint"),
            _cell(row, "category"), None, where,
        ))
    return items


def read_benchmark(path: str | Path, max_pixels: int | None = None) -> list[BenchItem]:
    """Questions of a .jsonl or MMBench-style .tsv benchmark file, in file order; every image is decoded
    once here and refused over `max_pixels` pixels (default: Pillow's limit); a TSV's are re-encoded as
    VLMEvalKit writes them (`_as_dumped`)."""
    path = check_input_file(path, "benchmark file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise InputError(f"{path}: expected a .jsonl or .tsv benchmark file")
    items = _read_tsv(path, max_pixels) if suffix == ".tsv" else _read_jsonl(path, max_pixels)
    first: dict[str, BenchItem] = {}
    for item in items:
        if item.id in first:
            raise InputError(f"{item.where}: id {item.id!r} appears twice (first at {first[item.id].where})")
        first[item.id] = item
    if not items:
        raise InputError(f"{path}: no questions")
    return items


# ----------------------------------------------------------------------------- prompts and scores


def _has_instruction(question: str) -> bool:
    return question.rstrip().endswith(ANSWER_INSTRUCTIONS)


def refuse_hidden_options(items: list[BenchItem], cot: bool) -> None:
    """Options go into the prompt of a multiple-choice question, and of any question with `cot`: without it, a
    question of another kind that gives options would be asked without them."""
    if cot:
        return
    for item in items:
        if item.options and item.kind != "choice":
            raise InputError(f"{item.where}: the question gives options, but its kind is {item.kind!r} and without --cot"
                             " only a multiple-choice question is asked with its options; give \"kind\": \"choice\""
                             " (the answer a letter or an option), drop the options, or use --cot")


def build_prompt(item: BenchItem, cot: bool = False) -> str:
    """The question the model sees (image placeholders are added by the chat pipeline)."""
    if cot:
        return build_cot_question(item.question, item.options)
    question = f"{item.hint}\n{item.question}" if item.hint else item.question  # any kind's hint, not only a choice's
    if item.kind == "choice":
        prompt = question + "".join(f"\n{key}. {text}" for key, text in (item.options or {}).items())
        if _has_instruction(prompt):
            return prompt
        chinese = re.search("[\u4e00-\u9fff]", prompt)
        if not item.options:  # build_multi_choice_prompt without option columns: no letters to ask for
            return prompt + "\n" + (DIRECT_INSTRUCTION_ZH if chinese else DIRECT_INSTRUCTION)
        return prompt + "\n" + (MCQ_INSTRUCTION_ZH if chinese else MCQ_INSTRUCTION)
    if item.kind == "yesno" or _has_instruction(question):
        return question
    return f"{question}\n{SHORT_INSTRUCTION}"


def score_response(item: BenchItem, response: str, cot: bool) -> tuple[str, bool | None]:
    """(the answer text that was checked, True / False / None = unparseable). With `cot`, a response whose trigger
    has nothing after it (cut by --max-new-tokens there) answers nothing, as `mpo_post_processing` reads it: the
    whole response is read only where it has no trigger."""
    text = response
    if cot:
        text = extract_final_answer(response) or ("" if states_answer(response) else response)
    return text, check_answer(text, item.answer, item.kind, item.options)


def summarize(items: list[BenchItem], predictions: dict[str, dict], cot: bool, circular: bool = False) -> dict[str, Any]:
    """Accuracy overall and per category (rescored from the stored responses); a question that could
    not run counts wrong and is listed under "failed". With `circular` (an MMBench TSV holding rotated
    copies of question i as rows i + k * 10**6), a question counts right only when every copy is
    (VLMEvalKit's circular evaluation) and the totals count questions, not rows."""
    groups: dict[str, list[tuple[str, bool]]] = {}
    unparsed = 0
    failed = []
    for item in items:
        row = predictions[item.id]
        if "error" in row:
            failed.append(f"{item.where} (id {item.id!r}): {row['error']}")
            verdict = False
        else:
            _, verdict = score_response(item, row["prediction"], cot)
        unparsed += verdict is None
        groups.setdefault(question_key(item, circular), []).append((item.category, verdict is True))
    totals: dict[str, list[int]] = {}
    for copies in groups.values():
        counts = totals.setdefault(copies[0][0], [0, 0])
        counts[0] += all(right for _, right in copies)
        counts[1] += 1
    correct = sum(c for c, _ in totals.values())
    return {
        "accuracy": correct / len(groups),
        "correct": correct,
        "total": len(groups),
        **({"circular": True, "rows": len(items)} if circular else {}),
        "unparsed": unparsed,
        "failed": failed,
        "categories": {
            name: {"accuracy": c / n, "correct": c, "total": n} for name, (c, n) in sorted(totals.items())
        },
    }


def rescore(items: list[BenchItem], predictions: dict[str, dict], cot: bool) -> bool:
    """Bring each stored prediction's kind, category, extracted answer and verdict up to date with the data
    (a kind or category edited since) and this version's checks, as `summarize` scores them; True when any
    changed."""
    changed = False
    for item in items:
        row = predictions[item.id]
        if "error" not in row:
            text, verdict = score_response(item, row["prediction"], cot)
            fresh = {"category": item.category, "kind": item.kind, "extracted": text, "correct": verdict}
            changed |= any(row.get(key) != value for key, value in fresh.items())
            row.update(fresh)
    return changed


def question_key(item: BenchItem, circular: bool) -> str:
    """The question a row asks: with `circular`, rows i + k * 10**6 all ask question i."""
    return str(int(item.id) % CIRCULAR_OFFSET) if circular else item.id


def first_questions(items: list[BenchItem], limit: int, circular: bool) -> list[BenchItem]:
    """The rows of the first `limit` questions, each with all its rows (a circular TSV's rotated copies)."""
    keys = set(list(dict.fromkeys(question_key(item, circular) for item in items))[:limit])
    return [item for item in items if question_key(item, circular) in keys]


def is_circular(data: str | Path, items: list[BenchItem]) -> bool:
    """An MMBench-style TSV with rotated copies, scored as VLMEvalKit does: each row of index 10**6 or more
    asks the question of row index % 10**6, which the file holds. Large indexes of another kind (rows that
    are no such copies) leave each row a question of its own."""
    if Path(data).suffix.lower() != ".tsv" or not all(item.id.isdigit() for item in items):
        return False
    questions = {item.id: item.question for item in items}
    copies = [item for item in items if int(item.id) >= CIRCULAR_OFFSET]
    return bool(copies) and all(questions.get(str(int(c.id) % CIRCULAR_OFFSET)) == c.question for c in copies)


def format_table(score: dict[str, Any]) -> str:
    width = max([len("overall"), *(len(name) for name in score["categories"])])
    lines = [f"{'category':<{width}}  accuracy  correct/total"]
    rows = [("overall", score)]
    if len(score["categories"]) > 1 or "" not in score["categories"]:
        rows += [(name or "(none)", s) for name, s in score["categories"].items()]
    for name, s in rows:
        lines.append(f"{name:<{width}}  {100 * s['accuracy']:7.2f}%  {s['correct']}/{s['total']}")
    if score.get("circular"):
        lines.append(f"circular: {score['total']} questions in {score['rows']} rows; a question counts when "
                     "every rotation of its options is answered right")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def default_output(data: str | Path, cot: bool) -> Path:
    """`<data stem>_eval` (`<data stem>_cot_eval` with `cot`) in the current folder."""
    return Path(f"{Path(data).stem}{'_cot' if cot else ''}_eval")


def check_counts(batch_size: int, limit: int | None) -> None:
    if batch_size < 1:
        raise SettingError("", "batch_size", f" must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise SettingError("", "limit", f" must be at least 1, got {limit}")


def image_files(item: BenchItem) -> list[str]:
    """A question's images that are files (not TSV cells), in the order a prediction keeps their stamps."""
    return [image for image in item.images if not isinstance(image, bytes)]


def image_keys(item: BenchItem) -> list[str]:
    """A question's images as a stored prediction records them: the resolved path, or the sha256 of an
    encoded image (a TSV cell)."""
    return [hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else str(Path(image).resolve())
            for image in item.images]


def run_identity(data: str | Path, cot: bool, settings: dict[str, Any] | None) -> dict[str, Any]:
    """What a resumed run must match (settings.json); the model as `checkpoint.model_key` records it."""
    identity = {"data": str(Path(data).resolve()), "cot": cot, **(settings or {})}
    if isinstance(identity.get("model"), str):
        from internvl_mpo.checkpoint import model_key

        identity["model"] = model_key(identity["model"])
    return identity


def run_eval(
    data: str | Path,
    answer_fn: Answerer,
    output: str | Path | None = None,
    cot: bool = False,
    batch_size: int = 8,
    limit: int | None = None,
    settings: dict[str, Any] | None = None,
    items: list[BenchItem] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every question not yet in predictions.jsonl (or stored there as failed, or with another prompt or
    ground truth: the data changed), then score all; returns the score dict.
    `items`: those of `data` when already read (reading decodes every image); `progress`: show a progress bar."""
    from tqdm import tqdm

    check_counts(batch_size, limit)
    items = read_benchmark(data) if items is None else items
    refuse_hidden_options(items, cot)
    circular = is_circular(data, items)
    if limit is not None:
        items = first_questions(items, limit, circular)
    out = Path(output) if output else default_output(data, cot)
    with hold_output(out, run_identity(data, cot, settings), RUN_FILES, EVAL_LOCK):
        predictions = Progress(out / "predictions.jsonl")
        done = predictions.load()
        for key, row in done.items():  # a hand-edited or damaged file: named here, not a traceback in rescoring
            if not (isinstance(row.get("prediction"), str) and isinstance(row.get("correct", False), bool | None)):
                raise InputError(f"{predictions.path}: the row of id {key!r} is not one eval writes (a string "
                                 "'prediction', a boolean or null 'correct'); delete the folder to start over")
        # A stored prediction counts only for the same question: ids may be line numbers, and a data file
        # edited between runs would otherwise have old answers scored against new questions (or images).
        # An image file edited in place is told by its stamp. A row without "images" or "stamps" (written
        # by an older version) is not compared on them.
        images = {item.id: image_keys(item) for item in items}
        todo = [item for item in items if item.id not in done or "error" in done[item.id]
                or done[item.id].get("prompt") != build_prompt(item, cot)
                or done[item.id].get("answer") != item.answer
                or done[item.id].get("images", images[item.id]) != images[item.id]
                or not unchanged(image_files(item), done[item.id].get("stamps"))]
        file_stamps = {}

        def prompts():  # keyed by (item, prompt): answers come back in any order
            for item in todo:
                file_stamps[item.id] = stamps(image_files(item))  # before the answerer reads them
                prompt = Prompt(build_prompt(item, cot), item.images)
                yield (item, prompt), prompt

        answered = set()
        with tqdm(total=len(items), initial=len(items) - len(todo), desc="eval", unit="q", disable=not progress) as bar:
            for (item, prompt), response in answer_fn(prompts(), batch_size):
                row = {"id": item.id, "category": item.category, "kind": item.kind, "prompt": prompt.question,
                       "images": images[item.id], "stamps": file_stamps[item.id]}
                if isinstance(response, Exception):  # its prompt could not be built, or failed in the engine
                    row.update(prediction="", extracted="", answer=item.answer, correct=False, error=str(response))
                else:
                    text, verdict = score_response(item, response, cot)
                    row.update(prediction=response, extracted=text, answer=item.answer, correct=verdict)
                predictions.append([row])
                done[item.id] = row
                answered.add(item.id)
                bar.update(1)
        missing = [item.id for item in todo if item.id not in answered]
        if missing:
            raise InputError(f"the answering function gave no answer for {len(missing)} questions (ids {missing[:5]})")
        stale = rescore(items, done, cot)
        ids = [item.id for item in items]
        listed = set(ids)
        rows = [done[i] for i in ids] + [row for key, row in done.items() if key not in listed]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        # answers came as they finished: the file in data order, with up-to-date verdicts (also after a run
        # killed before it wrote them so, which left nothing to do)
        if todo or stale or not predictions.path.exists() or predictions.path.read_bytes() != text.encode("utf-8"):
            atomic_write(predictions.path, text)
        score = {"data": str(data), "cot": cot, **summarize(items, done, cot, circular)}
        atomic_write(out / "score.json", json.dumps(score, indent=2, ensure_ascii=False) + "\n")
    return score


def greedy_params(max_num: int, max_new_tokens: int):
    """The sampling settings of `model_answerer`, checked (with max_num) before a model loads."""
    from internvl_mpo.generate.params import sampling_params

    if max_num < 1:
        raise SettingError("", "max_num", f" must be at least 1, got {max_num}")
    check_tile_budget(max_num)
    return sampling_params(do_sample=False, max_new_tokens=max_new_tokens)


def model_answerer(chat, max_num: int, params, max_pixels: int | None = None) -> Answerer:
    """Greedy answers (`params`: `greedy_params`) from an InternVLChat with continuous batching
    (`answers_as_they_finish`): each question's images load when a row takes it (refused over `max_pixels`
    pixels); a question whose prompt cannot be built (or fails in the engine) gets its exception (naming the
    settings by eval's flags: `--max-num`) and the others still run."""
    from internvl_mpo.cli import flagged

    def answer(prompts: Iterable[tuple[Any, Prompt]], batch_size: int) -> Iterable[tuple[Any, str | Exception]]:
        def jobs():
            for key, p in prompts:
                try:
                    yield key, chat.prepare(p.question, list(p.images) or None, max_num=max_num,
                                            total_max_num=TOTAL_MAX_NUM, max_pixels=max_pixels), params
                except InputError as e:  # a prompt longer than the context: this question fails alone
                    yield key, flagged(e, eval_), params

        return chat.answers_as_they_finish(jobs(), batch_size)

    return answer


def eval_(
    *,
    data: str,
    model: str | None = None,
    output: str | None = None,
    cot: bool = False,
    max_num: int = 6,
    batch_size: int = 8,
    max_new_tokens: int = 4096,  # VLMEvalKit's for InternVL2.5-MPO: a chain of thought cut short answers nothing
    limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_pixels: int | None = None,
    progress: bool = True,
) -> int:
    """Score a model on a multiple-choice / short-answer benchmark (resumable); prints the accuracy table.

    data: benchmark file: JSONL {"id", "image", "question", "answer", optional "options", "hint" (a line before the question, left out with --cot), "category", "kind" (choice, number, yesno or text; inferred when absent)} (no "id": the question's number in the file) or MMBench-style TSV
    model: checkpoint folder or hub id (default: the shipped demo model)
    output: folder for predictions.jsonl, score.json and settings.json; a rerun into it resumes (default: ./<data stem>_eval, or ./<data stem>_cot_eval with --cot, in the current folder)
    cot: use the MPO chain-of-thought prompt and read the answer after "Final answer:"
    max_num: most tiles per image (64 over all images of a question)
    batch_size: questions decoded together
    max_new_tokens: most tokens per answer
    limit: only the first N questions (each with all its rotated copies in an MMBench TSV)
    device: cpu, cuda, cuda:1, ... (default: cuda when available)
    dtype: float32, bfloat16, float16 or auto (the checkpoint's own) (default: bf16 on CUDA, fp32 on CPU)
    max_pixels: refuse images with more pixels (default: Pillow's limit, about 89 M)
    progress: show a progress bar
    """
    check_counts(batch_size, limit)  # fail on bad flags, a bad file or another run's folder before loading the model
    params = greedy_params(max_num, max_new_tokens)
    # torch loads from here on (with the image code): the flags above are refused in a fraction of a second
    from internvl_mpo.checkpoint import weights_identity
    from internvl_mpo.cli_chat import model_path, run_dtype
    from internvl_mpo.devices import default_device
    from internvl_mpo.pipeline import InternVLChat
    from internvl_mpo.processor.image import let_pillow_open

    let_pillow_open(max_pixels)
    items = read_benchmark(data, max_pixels)
    refuse_hidden_options(items, cot)
    model = model_path(model)
    out = Path(output) if output else default_output(data, cot)
    check_output_folder(out)
    refuse_other_method(out, "eval")
    check_not_in_use(out, EVAL_LOCK)
    device = default_device(device)
    dtype_name, weights = run_dtype(dtype, device, model)
    settings = {"model": model, "max_num": max_num, "max_new_tokens": max_new_tokens, "dtype": dtype_name,
                "weights": weights_identity(weights, recorded_weights(out / "settings.json"))}
    check_settings(out / "settings.json", run_identity(data, cot, settings), RUN_FILES, record=False)
    chat = InternVLChat.from_pretrained(model, dtype=dtype, device=device, weights=weights)
    try:
        score = run_eval(data, model_answerer(chat, max_num, params, max_pixels), out, cot, batch_size, limit, settings,
                         items, progress)
    except KeyboardInterrupt:  # the progress bar is closed: the line goes below it
        print(interrupted("eval", out / "predictions.jsonl", "answer"), file=sys.stderr)
        raise Interrupted from None
    for failure in score["failed"]:
        print(f"failed (counted wrong) {failure}")
    print(format_table(score))
    print(f"predictions and scores: {out / 'predictions.jsonl'}, {out / 'score.json'}")
    return 0
