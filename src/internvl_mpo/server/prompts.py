"""The prompt ids of a request: a chat's images fetched and tiled (or its video's frames) and its conversation
through the chat template, or /v1/completions' raw prompts (and the text an echo puts in front of their answers);
each checked against the token limits, and a request's stop_token_ids and logit_bias against the vocabulary."""

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..chat.template import build_prompt_ids, get_template, place_video, prompt_length
from ..chat.tokenizer import IMG_CONTEXT, Tokenizer
from ..errors import InputError, SettingError
from ..generate.params import SamplingParams
from ..pipeline import InternVLChat
from ..processor.image import AS_A_VIDEO, AS_AN_IMAGE, load_image
from ..processor.multi import planned_tiles
from ..processor.video import load_video, planned_frame_tiles, video_prefix
from .media import image_bytes
from .requests import ApiError, ChatRequest, CompletionRequest, TokenizeRequest
from .settings import ServerSettings

TEXT_ROOM = 512  # tokens of a sequence that image tiles leave to the text and the answer
VIDEO_FRAMES = 8  # frames sampled from a video (the model card's num_segments)


@dataclass
class Prompt:
    ids: list[int]
    pixel_values: torch.Tensor | None
    max_new_tokens: int


def build_prompt(chat: InternVLChat, req: ChatRequest, settings: ServerSettings, max_len: int) -> Prompt:
    """Fetch and tile the images, tokenize the conversation and check the token limits (blocking); the limits
    are checked before a tile is made too, on the length the images' headers give."""
    media = " (the video's frames included)" if req.video_url is not None else " (images included)" * bool(
        req.image_urls)

    def room(length: int) -> int:
        return _answer_room(length, req, settings, max_len, "messages", "the prompt", media)

    ids, pixels = chat_prompt_ids(chat, req, settings, max_len, room)
    return Prompt(ids, pixels, room(len(ids)))


@contextlib.contextmanager
def _invalid_image(param: str):
    """An image the processor refuses, as the 400 naming its part (the pixel limit as the server's flag)."""
    try:
        yield
    except InputError as e:
        if isinstance(e, SettingError):
            e = e.named({"max_pixels": "--max-image-pixels of internvl-mpo serve"})
        why = str(e).replace(AS_A_VIDEO, "send it as a video_url part")
        raise ApiError(400, f"{param}: {why}", param, "invalid_image") from None


def chat_prompt_ids(chat: InternVLChat, req: ChatRequest, settings: ServerSettings, max_len: int,
                    fits: Callable[[int], object] | None = None) -> tuple[list[int], torch.Tensor | None]:
    """The prompt's ids and its images' tiles (None without images), each image tiled to fit (blocking).
    `fits` gets the prompt's length, planned from the images' headers, before any tile is made (each
    ~2.4 MB at 448 pixels), and raises where it is too long."""
    if req.video_url is not None:
        ids, pixels = _video_prompt(chat, req, settings, max_len, fits)
        if fits is not None:
            fits(len(ids))
        return ids, pixels
    config = chat.config
    per_image = req.max_num or config.tiles_per_image
    if req.image_urls:
        n = len(req.image_urls)
        per_image = min(per_image, max(1, settings.max_tiles // n), _fitting_tiles(chat, max_len, n))
    budget = dict(max_num=per_image, min_num=min(config.min_dynamic_patch, per_image), image_size=config.image_size,
                  use_thumbnail=config.use_thumbnail, max_pixels=settings.max_image_pixels)
    images, planned = [], []
    for param, url in req.image_urls:
        images.append((param, image_bytes(url, param, settings)))
        if fits is not None:  # /tokenize checks no limit: it needs no plan
            with _invalid_image(param):
                planned += planned_tiles([images[-1][1]], **budget)
    prompt = dict(question=req.question, history=req.history, system_message=req.system_message,
                  num_image_token=chat.model.num_image_token, template=config.template, answer_start=req.answer_start)
    if fits is not None and images:
        try:
            length = prompt_length(chat.tokenizer, num_patches_list=planned, **prompt)
        except InputError as e:
            raise ApiError(400, str(e), "messages") from None
        fits(length)
    tiles = []
    for param, raw in images:
        with _invalid_image(param):
            tiles.append(load_image(raw, **budget))
    try:
        ids = build_prompt_ids(chat.tokenizer, num_patches_list=[t.shape[0] for t in tiles], **prompt)
    except InputError as e:
        raise ApiError(400, str(e), "messages") from None
    return ids, torch.cat(tiles) if tiles else None


def _fitting_tiles(chat: InternVLChat, max_len: int, n: int) -> int:
    """The most tiles each of `n` images or frames may have so that all their tiles, thumbnails included, leave
    TEXT_ROOM tokens of the sequence to the text and the answer (1 at least)."""
    fit = (max_len - TEXT_ROOM) // chat.model.num_image_token // n
    return max(1, fit - 1 if chat.config.use_thumbnail and fit >= 2 else fit)


def _video_prompt(chat: InternVLChat, req: ChatRequest, settings: ServerSettings, max_len: int,
                  fits: Callable[[int], object] | None) -> tuple[list[int], torch.Tensor]:
    """The prompt of a request with a video, as `InternVLChat.prepare` builds it but with the template's system
    message, as other requests: VIDEO_FRAMES frames, `max_num` tiles each (1 by default, as the model card; within
    --max-tiles in all, and fewer where the frames' tiles would not leave TEXT_ROOM tokens of the sequence), their
    `Frame1: <image>` lines in front of the question or at its `<video>`. The video's bytes come as an image's do
    (a data: URL, or a file or http(s) URL when allowed, within --max-image-bytes); PyAV reads them from a temporary
    file. `fits` gets the prompt's length, planned from the stream's frame size, before a frame is decoded."""
    param, url = req.video_url
    try:
        place_video(req.question, "")  # two <video> in the question: refused before the video is fetched
    except InputError as e:
        raise ApiError(400, str(e), "messages") from None
    raw = image_bytes(url, param, settings)
    config = chat.config
    per_frame = min(req.max_num or 1, max(1, settings.max_tiles // VIDEO_FRAMES),
                    _fitting_tiles(chat, max_len, VIDEO_FRAMES))
    frames = dict(num_segments=VIDEO_FRAMES, image_size=config.image_size, max_num=per_frame,
                  max_pixels=settings.max_image_pixels)
    prompt = dict(history=req.history, system_message=req.system_message, num_image_token=chat.model.num_image_token,
                  template=config.template, answer_start=req.answer_start)
    # in a folder of its own: FFmpeg's concat demuxer (an "ffconcat" list sent as the video) opens the files its list
    # names relative to the list, and would read the videos of the temporary folder (/tmp) beside it, or say which
    # names exist there, without --allow-local-images
    with tempfile.TemporaryDirectory(prefix="internvl-video-") as folder, \
            tempfile.NamedTemporaryFile(suffix=".video", dir=folder) as file:
        file.write(raw)
        file.flush()
        try:
            if fits is not None:
                planned = planned_frame_tiles(file.name, **frames)
                fits(prompt_length(chat.tokenizer, place_video(req.question, video_prefix(len(planned))),
                                   num_patches_list=planned, **prompt))
            video = load_video(file.name, **frames)
        except InputError as e:
            why = str(e).replace(f"{file.name}: ", "").replace(file.name, "the video")
            why = why.replace(AS_AN_IMAGE, "send it as an image_url part")
            raise ApiError(400, f"{param}: {why}", param, "invalid_video") from None
    try:
        ids = build_prompt_ids(chat.tokenizer, place_video(req.question, video.prefix),
                               num_patches_list=video.num_patches_list, **prompt)
    except InputError as e:
        raise ApiError(400, str(e), "messages") from None
    return ids, video.pixel_values


def tokenize_ids(chat: InternVLChat, req: TokenizeRequest, settings: ServerSettings, max_len: int) -> list[int]:
    """/tokenize's ids: a text as /v1/completions tokenizes it, or the ids a chat request would prefill,
    image tokens included (without the trailing assistant header when add_generation_prompt is false)."""
    if req.chat is None:
        return text_prompt_ids(chat.tokenizer, req.prompt, req.add_special_tokens)
    ids, _ = chat_prompt_ids(chat, req.chat, settings, max_len)
    if not req.add_generation_prompt:
        header = chat.tokenizer.encode(get_template(chat.config.template).roles[1])
        ids = ids[: len(ids) - len(header)]
    return ids


def check_token_ids(params: SamplingParams, vocab: int) -> None:
    """Token ids the model does not have: a stop id would never stop anything, a logit_bias key has no logit
    (vLLM refuses it too); a 400 naming them."""
    if bad := [i for i in params.stop_token_ids if i >= vocab]:
        raise ApiError(400, f"stop_token_ids must be in 0..{vocab - 1}, got {bad[:5]}", "stop_token_ids")
    if bad := [i for i, _ in params.logit_bias if not 0 <= i < vocab]:
        raise ApiError(400, f"logit_bias keys must be token ids in 0..{vocab - 1}, got {bad[:5]}", "logit_bias")


def _answer_room(length: int, req: ChatRequest | CompletionRequest, settings: ServerSettings, max_len: int,
                 param: str, name: str, what: str = "") -> int:
    """The max_new_tokens of a prompt of `length` tokens (`name` in errors), after checking the token limits."""
    limit = min(settings.max_prompt_tokens or max_len - 1, max_len - 1)
    if length > limit:
        raise ApiError(400, f"{name} is {length} tokens{what}; this server accepts at most {limit}",
                       param, "context_length_exceeded")
    room = max_len - length
    if req.max_tokens is not None and req.max_tokens > room:
        raise ApiError(400, f"{name} is {length} tokens and {req.max_tokens_key} is {req.max_tokens}, more "
                            f"than the {max_len} tokens a sequence may hold here", req.max_tokens_key,
                       "context_length_exceeded")
    max_new_tokens = req.max_tokens if req.max_tokens is not None else min(settings.max_tokens, room)
    if req.params.min_new_tokens > max_new_tokens:  # as vLLM: min_tokens may not exceed max_tokens
        raise ApiError(400, f"min_tokens is {req.params.min_new_tokens}, more than the {max_new_tokens} tokens this "
                            f"answer may have ({req.max_tokens_key} or what the sequence leaves)", "min_tokens")
    return max(1, max_new_tokens)  # max_tokens 0 (an echo): the engine picks one token, which is not shown


def text_prompt_ids(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """A raw text prompt's ids as vLLM's tokenizer call gives them: with `add_special_tokens`, the BOS of a
    tokenizer that prepends one (InternLM2's `<s>`; the Qwen2 tokenizer adds nothing)."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if add_special_tokens and tokenizer.add_bos_token else ids


def build_completion_prompts(chat: InternVLChat, req: CompletionRequest, settings: ServerSettings,
                             max_len: int) -> list[Prompt]:
    """Tokenize the raw prompts (no chat template; token ids are taken as they are) and check them."""
    tokenizer = chat.tokenizer
    vocab = chat.config.llm.vocab_size
    prompts = []
    for i, prompt in enumerate(req.prompts):
        param = f"prompt[{i}]"
        ids = text_prompt_ids(tokenizer, prompt, req.add_special_tokens) if isinstance(prompt, str) else prompt
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ApiError(400, f"{param}: token ids must be in 0..{vocab - 1}, got {bad[:5]}", "prompt")
        if tokenizer.img_context_id in ids:  # the model would look for image features there
            raise ApiError(400, f"{param} holds the image-context token {IMG_CONTEXT}, which is reserved for image "
                                "features (this endpoint takes no images)", "prompt")
        prompts.append(Prompt(ids, None, _answer_room(len(ids), req, settings, max_len, "prompt", param)))
    return prompts


def echo_texts(tokenizer: Tokenizer, req: CompletionRequest) -> list[str]:
    """The text each prompt puts in front of its answers: the prompt (token ids decoded) with `echo`, else ""."""
    if not req.echo:
        return [""] * len(req.prompts)
    return [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in req.prompts]
