"""CLI commands that talk to a model: `chat`, `generate` (batch files) and `tiles` (where tokens go)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import check_tile_budget
from .errors import (
    CheckpointError, ConfigError, InputError, Interrupted, NumericsError, PromptTooLongError, SettingError,
)
from .jsonl import json_problem

if TYPE_CHECKING:
    from .checkpoint import Weights


def model_path(model: str | None) -> str:
    """What a command's `--model` runs: the path or hub id given, or else the shipped demo model."""
    from .cli import default_model

    if model:
        return model
    if default_model().exists():
        return str(default_model())
    raise InputError("no --model given and the demo model is not installed; pass --model PATH_OR_HUB_ID")


def run_dtype(dtype: str | None, device: str, model: str) -> tuple[str, Weights | None]:
    """The name of the dtype `--dtype` gives a run of `model` on `device` ("auto": the checkpoint's, from its
    config.json or else its weights, `auto_dtype`), as a run's settings record it: answers computed in
    another precision differ, so a resume in one is refused. With it the weights it opened, to read the dtype and
    for the run to record (`checkpoint.weights_identity`; None for a missing model or one without weights: the
    load says what is wrong), for the load to take (`InternVLChat.from_pretrained`): each header read once. A hub id is
    downloaded here: its weights are recorded too."""
    from .checkpoint import auto_dtype, open_weights, resolve_checkpoint
    from .config import ModelConfig
    from .devices import parse_device, parse_dtype

    # the device is checked here, before a hub id downloads or a run records settings (a bf16 dtype for "cuda")
    kind = parse_device(device)
    chosen = None if dtype == "auto" else parse_dtype(dtype, kind)  # refused before a hub id downloads
    folder = weights = None
    if chosen is None:
        folder = resolve_checkpoint(model)
        config_dtype = ModelConfig.from_json(folder / "config.json").torch_dtype
        weights = open_weights(folder) if config_dtype is None else None
        chosen = parse_dtype(dtype, kind, auto_dtype(folder, config_dtype, weights))
    if weights is None:  # no model there, or no weights: the load says what is wrong
        with contextlib.suppress(CheckpointError):
            weights = open_weights(folder or resolve_checkpoint(model))
    return str(chosen).removeprefix("torch."), weights


def _check_counts(**counts: int | None) -> None:
    """Tile and frame counts, checked before the model loads (every question or request would fail on them)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise SettingError("", name, f" must be at least 1, got {value}")
    if counts.get("max_num") is not None:
        check_tile_budget(counts["max_num"])  # past it every image would fail alone, after the model loads


def _pixel_limit(max_pixels: int | None) -> None:
    """--max-pixels, checked before torch loads, in the words of the image code's own check."""
    if max_pixels is not None and max_pixels < 1:
        raise SettingError("", "max_pixels", f" must be a whole number of pixels >= 1, got {max_pixels}")


def _per_image(max_num: int | None, video) -> int | None:
    """--max-num is the tile budget of images: a video's frames take one tile each, as the model card's."""
    return None if video is not None else max_num


def _generation(temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int | None,
                repetition_penalty: float, min_new_tokens: int, json_mode: bool, json_schema, regex: str | None,
                choice: list[str] | None, grammar: str | None = None) -> dict:
    return dict(
        do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p, top_k=top_k,  # SamplingParams refuses < 0
        max_new_tokens=max_new_tokens, seed=seed, repetition_penalty=repetition_penalty,
        min_new_tokens=min_new_tokens, json_mode=json_mode, json_schema=json_schema, regex=_guide(regex),
        choice=None if choice is None else [_utf8(text, "--choice") for text in choice], grammar=grammar,
    )


def _guide(regex: str | None) -> str | None:
    """--regex checked: InputError naming the flag and what the regex module does not take."""
    from .generate.regex import RegexError, compile_regex

    if regex is not None:
        try:
            compile_regex(_utf8(regex, "--regex"))
        except RegexError as e:
            raise InputError(f"--regex: {e}") from None
    return regex


def _read_grammar(path: str | None) -> str | None:
    """The GBNF or Lark grammar in the file of --grammar (None without one), checked: InputError naming the file."""
    from .generate.grammar import GrammarError, compile_grammar

    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is dropped
        compile_grammar(text)
    except OSError as e:
        raise InputError(f"--grammar {path}: {e.strerror or e}") from None
    except (ValueError, GrammarError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"--grammar {path}: {e}") from None
    return text


def _read_schema(path: str | None):
    """The JSON schema in the file of --json-schema (None without one), checked: InputError naming the file."""
    from .generate.json_schema import compile_schema

    if path is None:
        return None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte order mark is dropped
    except OSError as e:
        raise InputError(f"--json-schema {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and json's errors are ValueErrors
        raise InputError(f"--json-schema {path}: {json_problem(e)}") from None
    try:
        compile_schema(schema)
    except ValueError as e:  # a SchemaError
        raise InputError(f"--json-schema {path}: {e}") from None
    return schema


def chat(
    *question: str,
    model: str | None = None,
    image: list[str] | None = None,
    video: str | None = None,
    max_num: int | None = None,
    num_segments: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    max_new_tokens: int = 1024,
    min_new_tokens: int = 0,
    json_mode: bool = False,
    json_schema: str | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
    seed: int | None = None,
    system: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    max_pixels: int | None = None,
) -> int:
    """Chat with a model; streams the answer. Without a question: an interactive multi-turn chat.

    question: the question (its words, quoted or not, joined by spaces); omit it for an interactive session
      (/image F adds an image, /reset, /exit, /help)
    model: checkpoint folder or hub id (default: the shipped demo model)
    image: an image file; repeat the flag for several images
    video: a video file or a folder of frames
    max_num: most tiles per image (default: the model's max_dynamic_patch, 1 if its dynamic_image_size is false);
        video frames take one tile each
    num_segments: frames sampled from a video
    temperature: 0 = greedy, > 0 samples
    top_p: nucleus sampling mass
    top_k: sample among the k most likely tokens (0 = off)
    repetition_penalty: > 1 discourages repeating generated tokens, < 1 favours it (at least 1e-6)
    max_new_tokens: most tokens in an answer
    min_new_tokens: fewest tokens in an answer: the end of turn (and stop strings) cannot end it sooner
    json_mode: hold each answer to one JSON object (constrained decoding; see the README's Generation section)
    json_schema: a file holding a JSON schema: hold each answer to one JSON value it takes (see the README)
    regex: hold each answer's whole text to this regular expression (constrained decoding; see the README)
    choice: hold each answer to exactly one of these texts; repeat the flag for each choice
    grammar: a file holding a GBNF or Lark grammar: hold each answer's whole text to a sentence of it (see the README)
    seed: seed for sampling
    system: a system message instead of the template's
    device: cpu, cuda, cuda:1, ... (default: cuda when available)
    dtype: float32, bfloat16, float16 or auto (the checkpoint's own) (default: bf16 on CUDA, fp32 on CPU)
    compile: torch.compile the decode step
    max_pixels: refuse images (and frames) with more pixels (default: Pillow's limit, about 89 M)
    """
    from .cli import flagged
    from .generate.params import sampling_params

    question = _utf8(" ".join(question), "the question") if question else None  # `chat What is it?` as one string
    _check_counts(max_num=max_num, num_segments=num_segments)
    _pixel_limit(max_pixels)
    params = sampling_params(**_generation(temperature, top_p, top_k, max_new_tokens, seed, repetition_penalty,
                                             min_new_tokens, json_mode, _read_schema(json_schema), regex, choice,
                                             _read_grammar(grammar)))
    images = list(image or [])
    if images and video is not None:
        raise InputError("give --image or --video, not both")
    # torch loads from here on (with the image code): the flags above are refused in a fraction of a second
    from .devices import default_device
    from .pipeline import InternVLChat
    from .processor.image import let_pillow_open, open_image, pointed_elsewhere

    let_pillow_open(max_pixels)
    # a missing or broken file: one error now, not after loading the model; the decoded pictures are kept, so a
    # question (or each of a conversation's) does not decode them again
    images = [open_image(path, max_pixels) for path in images]
    device = default_device(device)
    bot = InternVLChat.from_pretrained(model_path(model), dtype=dtype, device=device, compile=compile)
    inputs = dict(system_message=system, max_pixels=max_pixels)
    if video is not None:  # decoded once for the whole conversation (and refused before the first question)
        from .processor.video import load_video

        bot.check_video_frames(video, num_segments, max_pixels=max_pixels, question=question or "",
                               system_message=system)
        video = load_video(video, num_segments=num_segments, image_size=bot.config.image_size, max_pixels=max_pixels,
                           context_length=bot.context)
    if question is not None:
        try:
            _answer(bot, bot.prepare(question, images or None, video, None, max_num=_per_image(max_num, video),
                                     **inputs), params)
        except KeyboardInterrupt:
            print()  # the shell's prompt on a line of its own, not after the answer cut short
            raise Interrupted from None
        return 0
    history: list[tuple[str, str]] = []
    commands = "/image FILE adds an image, /reset starts over, /exit quits, /help shows this list"
    print(f"Interactive chat. {commands}.", file=sys.stderr)
    with contextlib.suppress(ImportError):  # none on Windows
        import readline  # noqa: F401  (input() at a terminal then edits the line: arrow keys, earlier lines)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 comes to _utf8, which says so, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            # piped: stdout holds the answers only. A byte order mark (a session file saved as "UTF-8 with BOM")
            # is no text of the line: strip() keeps it, and "/image" would not be a command
            line = input("> " if sys.stdin.isatty() else "").removeprefix("\ufeff").strip()
        except (EOFError, KeyboardInterrupt) as stop:  # Ctrl-D or Ctrl-C at the prompt quits
            if sys.stdin.isatty():
                print()  # the shell's prompt on a line of its own, not after "> "
            if isinstance(stop, KeyboardInterrupt):
                raise Interrupted from None
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history, images, video = [], [], None
            print("the conversation starts over, with no images or video", file=sys.stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            path = _typed_path(line[len("/image"):])
            if not path:
                print("usage: /image PATH", file=sys.stderr)
                continue
            if video is not None:
                print("error: this conversation is about a video; images and a video do not mix (/reset starts "
                      "over without it)", file=sys.stderr)
                continue
            try:
                images.append(open_image(path, max_pixels))  # refused now if not an image; decoded once
            except InputError as e:
                why = pointed_elsewhere(flagged(e, chat), "a chat about a video starts with --video FILE")
                print(f"error: {why}", file=sys.stderr)
                continue
            history = []  # a new image starts a new conversation
            print(f"added {path}; the conversation starts over with {len(images)} image(s)", file=sys.stderr)
            continue
        command = re.fullmatch(r"(/[A-Za-z]+)(\s.*)?", line)  # a mistyped command (/imgae F) is not a question
        if command:  # /help, a known command with words after it, or a mistyped one
            name = command[1]
            known = name in ("/exit", "/quit", "/reset")
            told = "" if name == "/help" else f"{name} takes nothing after it; " if known else \
                f"unknown command {name}; "
            print(told + commands, file=sys.stderr)
            continue
        try:
            prepared = bot.prepare(_utf8(line, "the line"), images or None, video, history,
                                   max_num=_per_image(max_num, video), **inputs)
            history.append((prepared.question, _answer(bot, prepared, params)))
        except InputError as e:
            way_out = ""
            if isinstance(e, PromptTooLongError) and (history or images) and _fits_alone(bot, line, system):
                way_out = " (earlier turns count: /reset starts over)" if history else \
                    " (/reset starts over without the images)"
            print(f"error: {flagged(e, chat)}{way_out}", file=sys.stderr)
        except NumericsError as e:  # this answer alone failed (activations past fp16's range): the session goes on
            print(f"error: {flagged(e, chat)} (that question is left out of the conversation)", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session (Ctrl-C at the prompt quits)
            print()
            print("(interrupted; that question is left out of the conversation)", file=sys.stderr)


def _fits_alone(bot, question: str, system: str | None) -> bool:
    """Whether `question` alone, without the conversation's turns and images, fits the model's context: only
    then does /reset, which drops them, help a question too long for it."""
    from .chat.template import IMAGE_PLACEHOLDER

    try:  # its own <image> placeholders go with the images (they would be a count error without them)
        bot.check_prompt(question.replace(IMAGE_PLACEHOLDER, ""), None, [], system)
    except PromptTooLongError:
        return False
    return True


def _utf8(text: str, what: str) -> str:
    """`text` from the command line or the terminal, refused where its bytes were not UTF-8: Python reads each
    such byte as a lone surrogate (U+DC80-U+DCFF), which the tokenizer would refuse as a broken escape."""
    bad = re.search("[\udc80-\udcff]", text)
    if bad:
        raise InputError(f"{what} is not UTF-8 text (byte 0x{ord(bad[0]) - 0xDC00:02x} at character {bad.start()}); "
                         "set the terminal's encoding to UTF-8")
    return text


def _typed_path(text: str) -> str:
    """A path typed at the prompt, where no shell expands `~` or reads the quotes and backslashes that a
    terminal writes for a file dragged onto it ('my pics/a.png', my\\ pics/a.png): read as a shell reads
    one word, or as typed where it is not one (my pics/a.png, Bob's.png). On Windows, where a backslash
    separates folders, only surrounding quotes are dropped."""
    text = text.strip()
    if os.name == "posix":
        with contextlib.suppress(ValueError):  # an unclosed quote: as typed
            words = shlex.split(text)
            text = words[0] if len(words) == 1 else text
    elif len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return os.path.expanduser(text)


def _answer(bot, prepared, params) -> str:
    """Stream the answer to the terminal (its pieces join to the stripped answer), then end the line."""
    pieces = []
    try:
        for piece in bot.stream_prepared(prepared, params):
            pieces.append(piece)
            print(piece, end="", flush=True)
    except NumericsError:
        if pieces:
            print()  # the error on a line of its own, not after the half answer
        raise
    print()
    return "".join(pieces)


def generate(
    *,
    input: str,
    output: str,
    model: str | None = None,
    batch_size: int = 8,
    max_num: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 50,
    max_new_tokens: int = 1024,
    min_new_tokens: int = 0,
    json_mode: bool = False,
    json_schema: str | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_pixels: int | None = None,
) -> int:
    """Answer a JSONL file of requests; resumes where an interrupted run stopped.

    input: JSONL lines {"id", "question", "image" (path or list, relative to the file), "video"}
    output: JSONL lines {"id", "question", "image", "video", "answer", "stamps"} (image and video as the request
        wrote them, where it has them; stamps: size, mtime and sha256 of their files, so that a resume notices
        a file edited in place; "error" for a request that cannot run), appended; <output>.settings.json
        keeps the model (and the save id of its weights, or without one their files' stamps), sampling settings and
        dtype, which a resume must repeat
        (a greedy one all but --seed, --top-p and --top-k)
    model: checkpoint folder or hub id (default: the shipped demo model)
    batch_size: requests decoded together
    max_num: most tiles per image (default: the model's max_dynamic_patch, 1 if its dynamic_image_size is false);
        video frames take one tile each
    temperature: 0 = greedy
    top_p: nucleus sampling mass
    top_k: sample among the k most likely tokens (0 = off)
    max_new_tokens: most tokens per answer
    min_new_tokens: fewest tokens per answer: the end of turn cannot end it sooner
    json_mode: hold each answer to one JSON object (constrained decoding; see the README's Generation section)
    json_schema: a file holding a JSON schema: hold each answer to one JSON value it takes (recorded in the settings)
    regex: hold each answer's whole text to this regular expression (constrained decoding; recorded in the settings)
    choice: hold each answer to exactly one of these texts; repeat the flag for each choice (recorded in the settings)
    grammar: a file holding a GBNF or Lark grammar: hold each answer's whole text to a sentence of it (its text
        recorded in the settings)
    seed: seed for sampling (request k of the file, counted from 0 without blank lines, uses seed + k, as batch_chat)
    device: cpu, cuda, cuda:1, ... (default: cuda when available)
    dtype: float32, bfloat16, float16 or auto (the checkpoint's own) (default: bf16 on CUDA, fp32 on CPU)
    max_pixels: refuse images (and frames) with more pixels (default: Pillow's limit, about 89 M)
    """
    from .cli import flagged
    from .generate.params import sampling_params
    from .jsonl import check_input_file
    from .run_folder import no_folder

    _check_counts(batch_size=batch_size, max_num=max_num)
    _pixel_limit(max_pixels)
    out = Path(output)
    if out.is_symlink():  # the answers go to the file the link names (renaming over the link would replace it),
        out = out.resolve()  # locked under that file's name: a run through the link and one on the file collide
    if out.is_dir():
        raise InputError(f"--output {out} is a folder; give the path of a JSONL file")
    if not out.parent.is_dir():
        raise InputError(f"--output {out}: {no_folder(out)}")
    if out.exists() and not out.is_file():  # /dev/null would be replaced by a file (as root), a pipe read forever
        raise InputError(f"--output {out}: not a regular file (a pipe or a device); give the path of a JSONL file")
    if out.resolve() == Path(input).resolve():  # resuming rewrites the output: the requests would be lost
        raise InputError(f"--output {out} is the requests file; give the answers a file of their own")
    schema, grammar_text = _read_schema(json_schema), _read_grammar(grammar)
    base = sampling_params(**_generation(temperature, top_p, top_k, max_new_tokens, seed, 1.0, min_new_tokens,
                                         json_mode, schema, regex, choice, grammar_text))
    check_input_file(input, "requests file")
    requests = _read_requests(Path(input))
    last = len(requests) - 1  # request k samples with seed + k
    if not base.greedy and seed is not None and seed + last >= 2**63:
        raise InputError(f"--seed {seed}: request {last} samples with seed + {last}, past the largest seed 2**63 - 1; "
                         "use a smaller --seed")
    # torch loads from here on (with the image code): the flags and requests above are refused in a fraction of a
    # second
    from tqdm import tqdm

    from .checkpoint import model_key, weights_identity
    from .devices import default_device
    from .filestamp import stamps, unchanged
    from .locks import lock_output, no_lock_note
    from .pipeline import InternVLChat
    from .processor.image import let_pillow_open, pointed_elsewhere
    from .run_folder import atomic_write, recorded_weights, writing

    let_pillow_open(max_pixels)
    _read_beside(requests, Path(input).parent)
    lock = lock_output(out.absolute().parent, (f".{out.name}.lock", f"generate run writing {out.name}", "answers"))
    if lock is None:
        print(f"internvl-mpo generate: {no_lock_note(out)}", file=sys.stderr)
    with lock or contextlib.nullcontext():  # a second run would append to the file this one rewrites
        done, answered = _finished_questions(out)
        device = default_device(device)
        dtype_name, weights = run_dtype(dtype, device, model_path(model))
        _check_answer_settings(out, {"model": model_key(model_path(model)), "max_num": max_num,
                                     "temperature": temperature, "top_p": top_p, "top_k": top_k,
                                     "max_new_tokens": max_new_tokens,
                                     "min_new_tokens": min_new_tokens, "seed": seed, "dtype": dtype_name,
                                     **({"json_mode": True} if json_mode else {}),  # absent: runs before it
                                     # as text: the properties' order, which a dict's == ignores, orders the answer
                                     **({"json_schema": json.dumps(schema, ensure_ascii=False)}
                                        if json_schema is not None else {}),
                                     **({"regex": regex} if regex is not None else {}),
                                     **({"choice": choice} if choice is not None else {}),
                                     **({"grammar": grammar_text} if grammar is not None else {}),
                                     "weights": weights_identity(weights, recorded_weights(_settings_file(out)))},
                               resume=bool(done),
                               default_max_num=lambda: _default_tiles(model_path(model)))
        # an edited request is asked again, and so is one whose image or video file was edited in place
        asked = {r["id"]: r for r in requests}
        standing = {rid for rid, (question, files) in done.items() if rid in asked
                    and question == _asked(asked[rid]) and unchanged(_files(asked[rid]), files)}
        todo = [r for r in requests if r["id"] not in standing]
        if out.exists():  # only once the settings allow the resume: a refused run leaves the file as it was
            # without the answers asked again (an interrupted rerun would leave two lines of one id) and those of
            # requests no longer in the file (the answers file answers the requests file)
            atomic_write(out, b"".join(line + b"\n" for rid, line in answered.items() if rid in standing), KEPT)
        if gone := [rid for rid in done if rid not in asked]:
            shown = ", ".join(map(repr, gone[:5])) + (f", ... ({len(gone) - 5} more)" if len(gone) > 5 else "")
            print(f"internvl-mpo generate: dropped from {out} the answers of {len(gone)} id{'s' * (len(gone) > 1)} no "
                  f"longer in {input}: {shown}", file=sys.stderr)
        if not todo:  # a finished run: no need to spend minutes loading a large model
            _put_in_order(out, requests)  # one killed before it put its answers back in order
            said = f"all {len(requests)} requests are" if len(requests) > 1 else "its request is"
            print(f"internvl-mpo generate: {said} answered in {out}", file=sys.stderr)
            return 0
        bot = InternVLChat.from_pretrained(model_path(model), dtype=dtype, device=device, weights=weights)

        def jobs():  # prepared one at a time, as rows free up: one batch of images in memory at most
            for item in todo:
                params = base if seed is None or base.greedy else \
                    dataclasses.replace(base, seed=seed + item["_line"] - 1)
                item["_stamps"] = stamps(_files(item))  # before the files are read: a later edit shows on resume
                try:
                    prepared = bot.prepare(item["question"], item.get("image"), item.get("video"),
                                           max_num=_per_image(max_num, item.get("video")), max_pixels=max_pixels)
                    yield item, prepared, params
                except InputError as e:  # this request alone fails; the run goes on
                    yield item, pointed_elsewhere(flagged(e, generate), 'give it as the request\'s "video"',
                                                  'give it as the request\'s "image"'), params

        with writing(out, KEPT):
            out.touch()  # the answers file, empty until the first answer
        with tqdm(total=len(requests), initial=len(requests) - len(todo), desc="generate", unit="req") as bar:
            try:
                _write_answers(bot.answers_as_they_finish(jobs(), batch_size), out, bar)
            except KeyboardInterrupt:
                bar.close()  # its last state, then the message (a bar closed on leaving `with` came after it)
                answered = out.read_bytes().count(b"\n")  # the lines on disk: a Ctrl-C can come before the bar moves
                if answered:
                    said = f"after {answered} of {len(requests)} requests (their lines are in {out}); run the same " \
                           "command again to resume"
                else:
                    said = f"before any of {len(requests)} requests was answered; nothing was written to {out}"
                print(f"internvl-mpo generate: interrupted {said}", file=sys.stderr)
                raise Interrupted from None
        _put_in_order(out, requests)  # answers were written as they finished
        return 0


# what a run that could not write its answers file (a full disk) says: the next run resumes from what it holds
KEPT = "the answers written before are kept: make room and run the same command again to resume"


def _put_in_order(out: Path, requests: list[dict]) -> None:
    """Put the answers file's lines in the order of the requests (answers are appended as they finish)."""
    from .jsonl import in_order as ordered
    from .run_folder import atomic_write, writing

    with writing(out, KEPT):
        data = ordered(out, [item["id"] for item in requests])
    atomic_write(out, data, KEPT)


def _write_answers(answers, out: Path, bar) -> None:
    """One line per finished request, on disk before the next (a resumed run keeps every written line; a
    line cut by a full disk is dropped)."""
    from tqdm import tqdm

    from .run_folder import append_synced, writing

    for item, answer in answers:
        record = {"id": item["id"], "question": item["question"], **item["_inputs"]}
        if isinstance(answer, Exception):  # its prompt could not be built, or failed in the engine
            tqdm.write(f"internvl-mpo generate: {item['_where']} (id {item['id']!r}) skipped: {answer}",
                       file=sys.stderr)
            record["error"] = str(answer)
        else:
            record["answer"] = answer
            if item["_stamps"]:
                record["stamps"] = item["_stamps"]
        with writing(out, KEPT):
            append_synced(out, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        bar.update(1)


def _asked(row: dict) -> tuple:
    """What a request asked, as its line wrote it: question, image and video paths (a request line,
    or an answer line, which repeats them)."""
    inputs = row.get("_inputs", row)
    return row.get("question"), inputs.get("image"), inputs.get("video")


SAMPLING_ONLY = ("seed", "top_k", "top_p")  # the generate settings that only a sampled run reads


def _default_tiles(model: str) -> int:
    """The tiles per image a run without --max-num uses: the model config's `tiles_per_image`."""
    from .checkpoint import resolve_checkpoint
    from .config import ModelConfig

    return ModelConfig.from_json(resolve_checkpoint(model) / "config.json").tiles_per_image


def _settings_file(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def _check_answer_settings(out: Path, settings: dict, resume: bool, default_max_num: Callable[[], int]) -> None:
    """Answers resume only under the settings that wrote them, which `<output>.settings.json` keeps:
    other settings are refused, except the sampling ones (SAMPLING_ONLY) where either run is greedy, and
    a max_num left out (None) is the model's `default_max_num()`, read only when one run left it out
    and the other did not. A new run (no answer written yet) records its settings; answers come with the file
    (`_finished_questions` refuses them without it)."""
    from .run_folder import atomic_write, changed_settings, read_settings

    path = _settings_file(out)
    if resume:
        earlier = read_settings(path, "generate", "--output")
        # a greedy run (--temperature 0) reads no sampling flag: only the others can change its answers
        ignored = SAMPLING_ONLY if 0 in (earlier.get("temperature"), settings.get("temperature")) else ()
        changed = changed_settings(earlier, settings, ignored)
        if "max_num" in changed and None in (earlier.get("max_num"), settings["max_num"]):
            tiles = default_max_num()
            if {earlier.get("max_num"), settings["max_num"]} == {None, tiles}:
                changed.remove("max_num")
        if changed:
            raise ConfigError(f"{out} holds answers written with other settings ({', '.join(changed)}); use another "
                              "--output, or the same settings to resume")
        return
    atomic_write(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def _files(request: dict) -> list[str]:
    """The image and video paths of a request (read from the requests file), in the order its stamps keep them."""
    image, video = request.get("image"), request.get("video")
    return ([image] if isinstance(image, str) else image or []) + ([video] if video else [])


ANSWER_START = b'{"id": '  # how every line `generate` writes begins


def _finished_questions(out: Path) -> tuple[dict, dict]:
    """{id: (`_asked`, stamps)} of the requests answered in `out`, and {id: line} of their lines (the last of an
    id), the ones a resume may keep: not error lines (those requests run again), nor a line cut by an interrupted
    write, even in the middle of a character. Any other line is refused, naming it, as is a file of such lines
    without the settings file that generate writes before its first line: `out` is not an answers file (another
    file given as --output by mistake: a file of questions and their reference answers reads like one), and the
    resume would rewrite it without that line, or take its answers for the model's."""
    if not out.exists():
        return {}, {}
    kept, done, lines = {}, {}, False
    try:
        data = out.read_bytes()
    except OSError as e:  # no read permission, an I/O error
        raise InputError(f"--output {out}: cannot read it ({e.strerror or e}); a resume reads the answers "
                         "written before") from None
    for number, line in enumerate(data.split(b"\n"), 1):  # JSON strings may hold U+2028: split at LF
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8 or JSON (a cut write), or a damaged line
            if line.startswith(ANSWER_START) or ANSWER_START.startswith(line.strip()):
                continue  # a write cut short, or a blank line
            row = None
        if not _answer_line(row):
            raise InputError(f"--output {out}:{number}: not an answer line of generate; a run would rewrite the "
                             "file without it: give the answers a new file (or an earlier run's to resume it)")
        lines = True
        if "answer" in row:
            done[row["id"]] = _asked(row), row.get("stamps")  # not the answers: a large job's would fill memory
            kept[row["id"]] = line
    if lines and not _settings_file(out).exists():
        raise InputError(f"--output {out} holds answer lines but no {_settings_file(out).name} beside it, which "
                         "generate writes before its first answer: it is not the answers file of a generate run (a "
                         "file of questions and reference answers?); give the answers a new file")
    return done, kept


def _answer_line(row) -> bool:
    """Whether a JSON value is a line as `_write_answers` writes it: an id, the question, the image and video as the
    request gave them, and an answer or an error."""
    return (isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and not isinstance(row["id"], bool)
            and isinstance(row.get("question"), str) and isinstance(row.get("answer", row.get("error")), str)
            and row.keys() <= {"id", "question", "image", "video", "answer", "error", "stamps"})


REQUEST_FIELDS = ("question", "image", "video")  # a misspelling of one is refused (`refuse_misspelt_fields`)
# a line's constraint, as the Python API and vLLM name them: the run's flag holds every answer, so one is refused
LINE_CONSTRAINTS = {"json_mode": "--json-mode", "json_schema": "--json-schema FILE",
                    "guided_json": "--json-schema FILE", "response_format": "--json-mode or --json-schema FILE",
                    "regex": "--regex", "guided_regex": "--regex", "guided_choice": "--choice",
                    "grammar": "--grammar FILE", "guided_grammar": "--grammar FILE",
                    "structured_outputs": "--json-mode, --json-schema FILE, --regex, --choice or --grammar FILE"}
# a line's sampling setting, as the Python API, transformers and vLLM name them: the run's flag sets every answer's
LINE_SETTINGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed",
                 "do_sample": "--temperature", "max_new_tokens": "--max-new-tokens", "max_tokens": "--max-new-tokens",
                 "min_new_tokens": "--min-new-tokens", "min_tokens": "--min-new-tokens", "max_num": "--max-num"}
# a line's setting that generate keeps at one value (chat() reads them): what it does instead
LINE_FIXED = {"num_segments": "a video's 8 frames are sampled (the model card's num_segments)",
              "repetition_penalty": "answers are decoded without a repetition penalty (1.0)"}


def _read_requests(path: Path) -> list[dict]:
    """The requests of a requests file, checked (torch is not imported: a bad file is refused in a fraction of a
    second); their paths as written, `_read_beside` reads them relative to the file."""
    from .jsonl import read_objects, refuse_misspelt_fields

    items, lines = [], {}
    for number, (where, item) in enumerate(read_objects(path, "requests file"), 1):
        refuse_misspelt_fields(item, REQUEST_FIELDS, where)
        for key, value in item.items():
            # `choice` as the Python API's list of answers; a benchmark's "choice": "A" is the line's own data
            if value is not None and key in LINE_CONSTRAINTS or key == "choice" and isinstance(value, list):
                raise InputError(f"{where}: field {key!r} is not read: a constraint holds every answer of a run, "
                                 f"given on the command line ({LINE_CONSTRAINTS.get(key, '--choice')}); answer each "
                                 "constraint's lines in a run of their own")
            if value is not None and key in LINE_FIXED:
                raise InputError(f"{where}: field {key!r} is not read: {LINE_FIXED[key]}")
            if value is not None and key in LINE_SETTINGS:
                raise InputError(f"{where}: field {key!r} is not read: a setting holds every answer of a run, given "
                                 f"on the command line ({LINE_SETTINGS[key]}); answer each setting's lines in a run "
                                 "of their own")
        if not isinstance(item.get("question"), str):
            raise InputError(f"{where}: each line needs a string field 'question'")
        rid = item.setdefault("id", number)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise InputError(f"{where}: 'id' must be a string or an integer, got {json.dumps(rid)[:80]}")
        if rid in lines:
            raise InputError(f"{where}: id {rid!r} is already used at {lines[rid]}")
        lines[rid] = where
        item["_line"], item["_where"] = number, where
        image, video = item.get("image"), item.get("video")
        item["_inputs"] = {k: v for k, v in (("image", image), ("video", video)) if v is not None}
        if image == "":  # none, as pairs and eval read an empty field (it was the requests file's folder)
            item["image"] = image = None
        if video == "":
            item["video"] = video = None
        if not (image is None or isinstance(image, str) or
                (isinstance(image, list) and all(isinstance(v, str) and v for v in image))):
            raise InputError(f"{where}: 'image' must be a path or a list of paths, got {json.dumps(image)[:80]}")
        if not (video is None or isinstance(video, str)):
            raise InputError(f"{where}: 'video' must be a path, got {json.dumps(video)[:80]}")
        if image and video:  # as chat(): images and a video do not mix
            raise InputError(f"{where}: give 'image' or 'video', not both")
        items.append(item)
    if not items:
        raise InputError(f"{path}: no requests")
    return items


def _read_beside(requests: list[dict], folder: Path) -> None:
    """Read the image and video paths of `_read_requests`' requests relative to the requests file's `folder`."""
    from .processor.image import beside

    for item in requests:
        image, video = item.get("image"), item.get("video")
        if isinstance(image, str):
            item["image"] = beside(folder, image)
        elif isinstance(image, list):
            item["image"] = [beside(folder, v) for v in image]
        if isinstance(video, str):
            item["video"] = beside(folder, video)


def tiles(image: str, *, max_num: int = 12, min_num: int = 1, output: str | None = None,
          max_pixels: int | None = None) -> int:
    """Show how an image is tiled: grid, tile count, token cost, and a PNG of the tiles.

    image: the image file
    max_num: most tiles (the official default is 12)
    min_num: fewest tiles
    output: PNG to write (default: <image file name>.tiles.png in the current folder, a.png.tiles.png for a.png)
    max_pixels: refuse images with more pixels (default: Pillow's limit, about 89 M)
    """
    from .processor.image import let_pillow_open, pointed_elsewhere
    from .processor.preview import format_tiles_report, tiles_report

    let_pillow_open(max_pixels)
    png = output or Path(image).name + ".tiles.png"
    try:
        report = tiles_report(image, max_num=max_num, min_num=min_num, output_png=png, max_pixels=max_pixels)
    except InputError as e:
        raise pointed_elsewhere(e, "`tiles` shows images only") from None
    print(format_tiles_report(report))
    return 0
