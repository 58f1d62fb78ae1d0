"""Conversation templates, `<image>` expansion and prompt / training token ids for InternVL2.5.

Mirrors, from OpenGVLab/InternVL `internvl_chat`:
- `conversation.py`, template `internvl2_5` (MPT separator style) and `get_prompt`, as used by
  `InternVLChatModel.chat`: the system turn, then each (role, message); a non-empty message renders as
  role + message + sep, an empty one as the role alone (the generation slot). Kept quirk: an empty
  question or an empty answer in the history renders as a bare role too, exactly like the reference.
- `chat()`: `"<image>\\n"` is prepended to the first question when images are given and it has no
  `<image>` (here also to a later question when no question of the conversation has one: the
  reference prefixes only the first turn, then fails on the missing image tokens); each `<image>`,
  left to right, becomes `<img>` + `<IMG_CONTEXT>` x (256 x tiles) + `</img>`.
  Unlike the reference (which replaces the first placeholders of the whole prompt, as many as it has
  images, and never checks), only the questions' placeholders place images: an `<image>` in a
  history answer stays text. A placeholder count in the questions that differs from the number of
  images raises InputError, and so does text (a question, an answer, a turn) that the tokenizer reads
  as `<IMG_CONTEXT>`: only images place it.
- `train/dataset.py` `preprocess_internvl2_5`: each turn is tokenized on its own and the ids are
  concatenated; labels are -100 except in assistant segments, where the `<|im_start|>assistant\\n`
  header and the final `\\n` are masked, so the response and its `<|im_end|>` are supervised.
  Deliberate difference: the reference masks a fixed 3 header tokens; when a response starts with a
  newline, BPE merges it with the header's `\\n` into one token and the reference silently masks that
  first response newline. We mask only the tokens that are entirely header (the ids shared with the
  header tokenized alone), so the first response token is always supervised. Ids are identical.

Prompts are tokenized piecewise: the text between `<image>` placeholders is encoded on its own and
the image ids are spliced in, which gives the same ids as encoding the expanded string (the image
tokens are added tokens that split the text anyway) without running 40k characters of
`<IMG_CONTEXT>` through the tokenizer. When the tokenizer's image tokens strip whitespace, need word
boundaries or are matched after normalization, the whole expanded string is encoded instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from internvl_mpo.chat.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, Tokenizer, check_unicode
from internvl_mpo.errors import ConfigError, InputError, PromptTooLongError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # where a video's frames go (training data, vLLM); the card prefixes them
IGNORE_INDEX = -100
NUM_IMAGE_TOKEN = 256  # LLM tokens per 448x448 tile: (448 / 14) ** 2 * 0.5 ** 2


@dataclass(frozen=True)
class Template:
    """An MPT-style conversation template, as in the reference `conversation.py`."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]  # (user prefix, assistant prefix)
    sep: str

    def system_turn(self, system_message: str | None = None) -> str:
        message = self.system_message if system_message is None else system_message
        if not isinstance(message, str):
            raise InputError(f"the system message must be a string, got {type(message).__name__}")
        return self.system_template.replace("{system_message}", message) + self.sep

    def segments(self, messages: Sequence[tuple[str, str | None]], system_message: str | None = None) -> list[str]:
        """System turn, then role + message + sep per message, or the bare role for an empty message."""
        return [self.system_turn(system_message)] + [role + message + self.sep if message else role
                                                     for role, message in messages]

    def render(self, messages: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        return "".join(self.segments(messages, system_message))


TEMPLATES: dict[str, Template] = {
    "internvl2_5": Template(
        name="internvl2_5",
        system_template="<|im_start|>system\n{system_message}",
        system_message=(
            "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
        ),
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep="<|im_end|>\n",
    ),
}


def get_template(name: str, config_path: str | os.PathLike | None = None) -> Template:
    """The template of that name; an unknown one raises ConfigError, naming `config_path` (the config.json
    whose `template` it is) where given."""
    if name not in TEMPLATES:
        where, key = ("", "") if config_path is None else (f"{config_path}: ", ' (the key "template")')
        raise ConfigError(f"{where}unknown conversation template {name!r}; known: {sorted(TEMPLATES)}{key}")
    return TEMPLATES[name]


def render_prompt(
    question: str,
    history: Sequence[tuple[str, str]] = (),
    system_message: str | None = None,
    template: str = "internvl2_5",
) -> str:
    """The prompt `chat()` builds: history as user/assistant pairs, the question, an open assistant turn."""
    tmpl = get_template(template)
    return tmpl.render(_chat_messages(tmpl, question, history), system_message)


def _check_history(history: Sequence[tuple[str | None, str]]) -> None:
    """(question, answer) pairs of strings; the first question may be None: the conversation opens with the
    assistant's turn (a greeting, as chat apps send one; vLLM renders it as that turn alone)."""
    if not isinstance(history, (list, tuple)):
        raise InputError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2 or not (
                isinstance(turn[0], str) or (i == 0 and turn[0] is None)) or not isinstance(turn[1], str):
            raise InputError(f"history entries must be (question, answer) pairs of strings (the first question may "
                             f"be None: an opening assistant turn), got {turn!r}")


def _chat_messages(tmpl: Template, question: str | None,
                   history: Sequence[tuple[str, str]]) -> list[tuple[str, str | None]]:
    _check_history(history)
    user, assistant = tmpl.roles
    messages: list[tuple[str, str | None]] = []
    for old_question, old_answer in history:
        messages += ([] if old_question is None else [(user, old_question)]) + [(assistant, old_answer)]
    return messages + ([] if question is None else [(user, question)]) + [(assistant, None)]


def holds_images(question: str | None, history: Sequence[tuple[str, str]] = ()) -> bool:
    """Whether the question or an earlier one holds `<image>`: the images go there, no prefix is added."""
    _check_history(history)
    return IMAGE_PLACEHOLDER in (question or "") or any(IMAGE_PLACEHOLDER in (old_question or "")
                                                for old_question, _ in history)


def add_image_prefix(question: str | None, num_images: int, history: Sequence[tuple[str, str]] = ()) -> str | None:
    """Put image placeholders in front of a question when no question of the conversation has any.

    One image: `"<image>\\n" + question`, as `chat()` does. Several: `"Image-1: <image>\\nImage-2: <image>\\n"`
    + question, the model card's multi-image convention. Unchanged when there is no image or the
    question or one in the `history` already holds `<image>`.
    """
    if num_images == 0 or question is None or holds_images(question, history):  # None: no question to hold them
        return question
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    return "".join(f"Image-{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, num_images + 1)) + question


def place_video(question: str, prefix: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The question with a video's frame `prefix` ("Frame1: <image>\\n..."): at its `<video>` (with the newline
    after it), as training data puts them (there also beside an `<image>`, as the official reader does); without
    one, unchanged where the question or one in the `history` holds `<image>` (the frames go there), else in
    front, as the model card does. Two `<video>` are refused: one video fills one."""
    count = question.count(VIDEO_PLACEHOLDER)
    if count > 1:
        raise InputError(f"the question holds {count} {VIDEO_PLACEHOLDER} placeholders; a video's frames go at one")
    if count == 0:
        return question if holds_images(question, history) else prefix + question
    at = VIDEO_PLACEHOLDER + "\n" if VIDEO_PLACEHOLDER + "\n" in question else VIDEO_PLACEHOLDER
    return question.replace(at, prefix, 1)


def _tiles_said(num_patches_list: Sequence[int]) -> str:
    """The images' tile counts for a placeholder error; nothing without images, where "num_patches_list=[]"
    would only puzzle a command-line user."""
    return f" (num_patches_list={list(num_patches_list)})" if len(num_patches_list) else ""


def _check_images(count: int, num_patches_list: Sequence[int], where: str = "the prompt has", hint: str = "") -> None:
    if count != len(num_patches_list):
        raise InputError(
            f"{where} {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_patches_list)} image(s)"
            f" were given{_tiles_said(num_patches_list)}{hint}"
        )
    for tiles in num_patches_list:
        if not isinstance(tiles, int) or tiles < 1:
            raise InputError(f"each image needs a positive whole number of tiles, got {tiles!r}")


def _image_text(tiles: int, num_image_token: int) -> str:
    return IMG_START + IMG_CONTEXT * (num_image_token * tiles) + IMG_END


def expand_image_tokens(prompt: str, num_patches_list: Sequence[int], num_image_token: int = NUM_IMAGE_TOKEN) -> str:
    """Replace each `<image>`, in order, by `<img>` + `<IMG_CONTEXT>` x (num_image_token x tiles) + `</img>`."""
    _check_images(prompt.count(IMAGE_PLACEHOLDER), num_patches_list)
    return _join_images(prompt.split(IMAGE_PLACEHOLDER), num_patches_list, num_image_token)


def _join_images(pieces: Sequence[str], num_patches_list: Sequence[int], num_image_token: int) -> str:
    out = [pieces[0]]
    for tiles, piece in zip(num_patches_list, pieces[1:]):
        out += [_image_text(tiles, num_image_token), piece]
    return "".join(out)


def encode_with_images(
    tokenizer: Tokenizer, text: str, num_patches_list: Sequence[int], num_image_token: int = NUM_IMAGE_TOKEN
) -> list[int]:
    """Ids of `expand_image_tokens(text, ...)`, computed piecewise (see the module docstring)."""
    _check_images(text.count(IMAGE_PLACEHOLDER), num_patches_list)
    return _encode_pieces(tokenizer, text.split(IMAGE_PLACEHOLDER), num_patches_list, num_image_token)


def _encode_pieces(
    tokenizer: Tokenizer, pieces: Sequence[str], num_patches_list: Sequence[int], num_image_token: int
) -> list[int]:
    """Ids of the text `pieces` with image k's tokens between pieces k and k + 1."""
    if not _plain_image_tokens(tokenizer):
        return tokenizer.encode(_join_images(pieces, num_patches_list, num_image_token))
    piece_ids = [tokenizer.encode(piece) for piece in pieces]
    start, context, end = tokenizer.img_start_id, tokenizer.img_context_id, tokenizer.img_end_id
    ids = list(piece_ids[0])
    for tiles, after in zip(num_patches_list, piece_ids[1:]):
        ids += [start, *([context] * (num_image_token * tiles)), end, *after]
    return ids


def _plain_image_tokens(tokenizer: Tokenizer) -> bool:
    """Whether text on either side of the image tokens is tokenized independently of them (module docstring)."""
    return all(tokenizer.is_plain_added_token(t) for t in (IMG_START, IMG_CONTEXT, IMG_END))


def _refuse_typed_context(
    tokenizer: Tokenizer, ids: Sequence[int], num_patches_list: Sequence[int], num_image_token: int
) -> None:
    """Raise when text the user typed reads as the image-context token (only images may place it)."""
    extra = ids.count(tokenizer.img_context_id) - num_image_token * sum(num_patches_list)
    if extra:
        raise InputError(f"the text contains {IMG_CONTEXT} {extra} time(s); it is reserved for image features")


def _prompt_pieces(
    question: str | None, history: Sequence[tuple[str, str]], num_patches_list: Sequence[int],
    system_message: str | None, template: str, answer_start: str = "",
) -> list[str]:
    """The `chat()` prompt's text, split where its questions place the images (an `<image>` in an answer stays
    text); refused unless they place one for each entry of `num_patches_list`. A `question` None asks none: the
    assistant answers anew after the history's last answer (a conversation ending with an assistant message, as
    vLLM renders the chat template with its generation prompt). `answer_start` is written after the open
    assistant turn's header: the answer goes on from it (vLLM's `continue_final_message`)."""
    _check_history(history)
    texts = [("the question", question), ("the system message", system_message), ("the answer's start", answer_start)]
    texts += [(f"history[{i}][{j}]", text) for i, turn in enumerate(history) for j, text in enumerate(turn)]
    for what, text in texts:
        if isinstance(text, str):
            check_unicode(text, what)
    question = add_image_prefix(question, len(num_patches_list), history)
    tmpl = get_template(template)
    messages = _chat_messages(tmpl, question, history)
    runs: list[list[str]] = [[]]  # each piece's segments, joined once: adding each to the piece so far is quadratic
    for (role, _), text in zip([(None, None), *messages], tmpl.segments(messages, system_message)):
        parts = text.split(IMAGE_PLACEHOLDER) if role == tmpl.roles[0] else [text]
        runs[-1].append(parts[0])
        runs += [[part] for part in parts[1:]]
    runs[-1].append(answer_start)
    pieces = ["".join(run) for run in runs]
    # Only the questions place images: an answer that says "<image>" (about HTML, say) stays text.
    hint = "" if not history else (
        "; pass the conversation's images again with every question" if len(pieces) - 1 > len(num_patches_list)
        else f"; an image new to the conversation needs its {IMAGE_PLACEHOLDER} in the question")
    _check_images(len(pieces) - 1, num_patches_list, "the questions hold", hint)
    return pieces


def build_prompt_ids(
    tokenizer: Tokenizer,
    question: str | None,
    history: Sequence[tuple[str, str]] = (),
    num_patches_list: Sequence[int] = (),
    system_message: str | None = None,
    max_length: int | None = None,
    num_image_token: int = NUM_IMAGE_TOKEN,
    template: str = "internvl2_5",
    answer_start: str = "",
) -> list[int]:
    """Token ids of the `chat()` prompt, ready for prefill.

    When no question of the conversation holds `<image>` (on the first turn, say), the question gets
    the image prefix; on later turns the placeholders live in the stored question (pass it with its
    prefix, as `chat()` stores it) and are expanded again with the same `num_patches_list`. A `question` None
    asks none: the prompt opens a new answer after the history's last one (`_prompt_pieces`). `answer_start`
    is the open answer's opening text, which the answer continues.
    """
    pieces = _prompt_pieces(question, history, num_patches_list, system_message, template, answer_start)
    ids = _encode_pieces(tokenizer, pieces, num_patches_list, num_image_token)
    if tokenizer.add_bos_token:  # the official chat() tokenizes the prompt with the tokenizer's BOS
        ids = [tokenizer.bos_id, *ids]
    _refuse_typed_context(tokenizer, ids, num_patches_list, num_image_token)
    check_prompt_length(len(ids), num_patches_list, max_length, num_image_token)
    return ids


def prompt_length(
    tokenizer: Tokenizer,
    question: str | None,
    history: Sequence[tuple[str, str]] = (),
    num_patches_list: Sequence[int] = (),
    system_message: str | None = None,
    num_image_token: int = NUM_IMAGE_TOKEN,
    template: str = "internvl2_5",
    answer_start: str = "",
) -> int:
    """`len(build_prompt_ids(...))` (refused as it refuses the prompt, but for its length), from tile counts
    alone: only the text is tokenized, so the prompt can be measured before its images are tiled. Where the
    image tokens are not plain added tokens the whole prompt is tokenized, as build_prompt_ids does then."""
    if not _plain_image_tokens(tokenizer):
        return len(build_prompt_ids(tokenizer, question, history, num_patches_list, system_message,
                                    num_image_token=num_image_token, template=template, answer_start=answer_start))
    pieces = _prompt_pieces(question, history, num_patches_list, system_message, template, answer_start)
    text = [tokenizer.encode(piece) for piece in pieces]
    _refuse_typed_context(tokenizer, [i for ids in text for i in ids], (), num_image_token)
    return sum(map(len, text)) + _image_ids(num_patches_list, num_image_token) + int(tokenizer.add_bos_token)


def _image_ids(num_patches_list: Sequence[int], num_image_token: int) -> int:
    """Ids the images take in a prompt: `<img>`, num_image_token a tile, `</img>`."""
    return sum(num_image_token * tiles + 2 for tiles in num_patches_list)


def check_prompt_length(length: int, num_patches_list: Sequence[int], max_length: int | None,
                        num_image_token: int = NUM_IMAGE_TOKEN, hint: Sequence[str] = ("",)) -> None:
    """Refuse a prompt of `length` ids (its images' tiles: `num_patches_list`) longer than `max_length`;
    `hint` ends the message (what to change), as SettingError's parts: text, setting, text, ..."""
    if max_length is not None and length > max_length:
        raise PromptTooLongError(
            f"prompt is {length} tokens ({_image_ids(num_patches_list, num_image_token)} of them image tokens), "
            f"longer than the context allows: at most {max_length}{hint[0]}", *hint[1:]
        )


def _assistant_labels(ids: list[int], header_ids: list[int]) -> list[int]:
    """Supervise an assistant segment except its header tokens and its final "\\n"."""
    masked = 0
    while masked < min(len(header_ids), len(ids)) and ids[masked] == header_ids[masked]:
        masked += 1
    return [IGNORE_INDEX] * masked + ids[masked:-1] + [IGNORE_INDEX]


def _segments(
    tokenizer: Tokenizer,
    tmpl: Template,
    turns: Sequence[tuple[str, str]],
    num_patches_list: Sequence[int],
    num_image_token: int,
    start: bool = True,
) -> tuple[list[int], list[int]]:
    """Tokenize (role, content) turns one segment each, as `preprocess_internvl2_5`; returns ids, labels.
    At the `start` of a sequence a tokenizer that adds BOS (InternLM2) gets it, masked, as the official
    code prepends it to the first segment."""
    user_images = sum(content.count(IMAGE_PLACEHOLDER) for role, content in turns if role == "user")
    if user_images != len(num_patches_list):
        raise InputError(
            f"the user turns hold {user_images} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_patches_list)}"
            f" image(s) were given{_tiles_said(num_patches_list)}"
        )
    header_ids = tokenizer.encode(tmpl.roles[1])
    input_ids: list[int] = [tokenizer.bos_id] if start and tokenizer.add_bos_token else []
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    next_image = 0
    for role, content in turns:
        if role == "system":
            ids = tokenizer.encode(tmpl.system_turn(content))
            seg_labels = [IGNORE_INDEX] * len(ids)
        elif role == "user":
            count = content.count(IMAGE_PLACEHOLDER)
            patches = num_patches_list[next_image : next_image + count]
            next_image += count
            ids = encode_with_images(tokenizer, tmpl.roles[0] + content + tmpl.sep, patches, num_image_token)
            seg_labels = [IGNORE_INDEX] * len(ids)
        else:
            ids = tokenizer.encode(tmpl.roles[1] + content + tmpl.sep)
            seg_labels = _assistant_labels(ids, header_ids)
        input_ids += ids
        labels += seg_labels
    _refuse_typed_context(tokenizer, input_ids, num_patches_list, num_image_token)
    return input_ids, labels


def _read_messages(
    messages: Sequence[Mapping[str, str]], system_message: str | None, tmpl: Template
) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InputError(f"message {i} needs role system/user/assistant and string content, got {dict(message)!r}")
        if role == "system" and i != 0:
            raise InputError(f"message {i}: a system message may only come first")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise InputError("a training conversation needs at least one assistant message to supervise")
    if not turns or turns[0][0] != "system":
        turns.insert(0, ("system", tmpl.system_message if system_message is None else system_message))
    return turns


def build_training_ids(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    num_patches_list: Sequence[int] = (),
    system_message: str | None = None,
    num_image_token: int = NUM_IMAGE_TOKEN,
    template: str = "internvl2_5",
) -> tuple[list[int], list[int]]:
    """Input ids and labels of a training conversation (list of {"role", "content"} dicts).

    A leading system message wins over `system_message`, which wins over the template's. `<image>`
    placeholders are expanded in user turns only, in order. No truncation happens here.
    """
    tmpl = get_template(template)
    turns = _read_messages(messages, system_message, tmpl)
    return _segments(tokenizer, tmpl, turns, num_patches_list, num_image_token)


class PairIds(NamedTuple):
    """A preference pair sharing one prompt: full sequences are prompt + chosen and prompt + rejected."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def build_pair_ids(
    tokenizer: Tokenizer,
    question: str,
    chosen: str,
    rejected: str,
    num_patches_list: Sequence[int] = (),
    system_message: str | None = None,
    num_image_token: int = NUM_IMAGE_TOKEN,
    template: str = "internvl2_5",
) -> PairIds:
    """Ids for one MPO record: the question (image prefix added as the MPO dataset does) and two answers.

    Because turns are tokenized separately, prompt_ids + chosen_ids equals `build_training_ids` of
    [user: question, assistant: chosen]; the prompt labels are all -100.
    """
    tmpl = get_template(template)
    question = add_image_prefix(question, len(num_patches_list))
    system = tmpl.system_message if system_message is None else system_message
    prompt_ids, _ = _segments(
        tokenizer, tmpl, [("system", system), ("user", question)], num_patches_list, num_image_token
    )
    chosen_ids, chosen_labels = _segments(tokenizer, tmpl, [("assistant", chosen)], (), num_image_token, start=False)
    rejected_ids, rejected_labels = _segments(tokenizer, tmpl, [("assistant", rejected)], (), num_image_token,
                                              start=False)
    return PairIds(prompt_ids, chosen_ids, chosen_labels, rejected_ids, rejected_labels)
