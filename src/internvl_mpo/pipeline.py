"""`InternVLChat`: the model, its tokenizer and the generation engine behind the official chat API.

`chat`, `stream_chat` and `batch_chat` take the names users of the official `InternVLChatModel`
know, without the tokenizer argument: images may be paths, bytes, PIL images or preprocessed
`pixel_values`; a video may be a file, a list of frames, a folder of frames or what
`processor.video.load_video` returns (decoded once for several turns). The prompt is the
official one (template, `<image>\\n` prefix on the first turn, or the first with images, `Image-k:` /
`FrameK:` prefixes for several images or frames), the answer is cleaned up as `chat()` does (cut at `<|im_end|>`, also where
it is spelled in ordinary tokens, strip).

Default generation settings are the model card's quick start: `max_new_tokens=1024,
do_sample=True` with transformers' defaults (temperature 1.0, top_k 50, top_p 1.0). Pass
`do_sample=False` (or `temperature=0`) for greedy decoding.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .chat.template import (
    IMAGE_PLACEHOLDER,
    add_image_prefix,
    build_prompt_ids,
    check_prompt_length,
    get_template,
    place_video,
    prompt_length,
)
from .chat.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, Tokenizer, check_vocabulary, load_tokenizer
from .config import ModelConfig
from .errors import ConfigError, InputError, NumericsError, SettingError, located
from .generate.engine import SPAN_BUCKET, Engine, Event, Generation, Request
from .generate.params import INPUT_KEYS, SamplingParams, sampling_params, whole_number
from .model import InternVL, check_tile_values
from .processor.multi import load_images, planned_tiles, refuse_unordered

if TYPE_CHECKING:
    from .checkpoint import Weights

@dataclass
class Prepared:
    """A prompt ready for the engine, and the question as history stores it."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    num_patches_list: list[int]
    question: str

    @property
    def image_tokens(self) -> int:
        return sum(self.num_patches_list)


def _is_list(value) -> bool:
    """A list, tuple or array of values (not one value, and not a string)."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (Iterator, Set)) and not hasattr(images, "read"):  # a generator, a set: not one image
        refuse_unordered(images)
    return [images]


def _fewer_tiles(planned: list[int], max_num: int | Sequence[int], total_max_num: int | None) -> tuple[str, ...]:
    """The hint of a prompt whose images of `planned` tiles do not fit, as SettingError parts: the settings
    that give fewer tiles (total_max_num where the call gave one that caps them below max_num, or below one
    image's where it is a list), or fewer images where each has 1 tile."""
    shown = str(planned) if len(planned) <= 10 else "[" + ", ".join(map(str, planned[:10])) + ", ...]"
    said = f"; the images take {sum(planned)} tile{'s' * (sum(planned) > 1)} ({shown} by image"
    if max(planned) == 1:
        return (f"{said}; 1 tile each, the fewest an image takes: fewer images fit)",)
    largest = max(max_num) if isinstance(max_num, Sequence) else max_num  # checked: whole numbers, one per image
    if total_max_num is None or max(1, total_max_num // len(planned)) >= largest:
        return (f"{said}; a smaller ", "max_num", " gives fewer)")
    return (f"{said}; a smaller ", "max_num", " or ", "total_max_num", " gives fewer)")


class InternVLChat:
    def __init__(self, model: InternVL, tokenizer: Tokenizer, compile: bool = False):
        if model.image_token_id is None:
            model.image_token_id = tokenizer.img_context_id
        elif model.image_token_id != tokenizer.img_context_id:
            raise InputError(
                f"the model's image token id {model.image_token_id} is not the tokenizer's <IMG_CONTEXT> "
                f"id {tokenizer.img_context_id}"
            )
        check_vocabulary(tokenizer, model.config.llm.vocab_size)
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.engine = Engine(model, stop_token_ids=(tokenizer.im_end_id,), compile=compile, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        compile: bool = False,
        revision: str | None = None,
        device_map: str | dict | None = None,
        weights: Weights | None = None,
    ) -> "InternVLChat":
        """Model and tokenizer from a checkpoint folder or hub id; see `InternVL.from_pretrained` (and its
        `weights`: the folder's, where the caller has opened them)."""
        from .checkpoint import resolve_checkpoint
        from .devices import check_device_and_dtype

        check_device_and_dtype(device, dtype)
        folder = resolve_checkpoint(path_or_id, revision)
        config_path = folder / "config.json"
        config = ModelConfig.from_json(config_path)
        get_template(config.template, config_path)  # unknown: refused before the weights, as another model's tokenizer
        tokenizer = load_tokenizer(folder)
        check_vocabulary(tokenizer, config.llm.vocab_size)
        model = InternVL.from_pretrained(
            folder, dtype=dtype, device=device, image_token_id=tokenizer.img_context_id, device_map=device_map,
            weights=weights,
        )
        return cls(model, tokenizer, compile=compile)

    @property
    def context(self) -> int:
        return self.config.llm.max_position_embeddings

    # ---- inputs ---------------------------------------------------------------------------

    def _system_message(self, given: str | None) -> str | None:
        """The system message of a prompt: the one `given`, else config.json's `system_message` where the file
        has one (the official model's chat() and batch_chat() use it then), else None: the template's."""
        if given is not None:
            return given
        stored = self.config.extra.get("system_message")
        if stored is not None and not isinstance(stored, str):
            raise ConfigError(f"config.json: system_message must be a string (or null), got {stored!r:.80}")
        return stored

    def check_prompt(self, question: str, history: Sequence[tuple[str, str]] | None, num_patches_list: list[int],
                     system_message: str | None = None, hint: Sequence[str] = ("",)) -> None:
        """Refuse, as `prepare` does and with its message (`hint` added: `check_prompt_length`'s), a prompt whose text and images of
        `num_patches_list` tiles leave no room for a new token in the model's context. Only the text is
        tokenized: called with tile counts planned from the images' headers, it refuses a prompt before a tile
        is made (each ~2.4 MB at 448 pixels)."""
        tokens, system = self.model.num_image_token, self._system_message(system_message)
        length = prompt_length(self.tokenizer, question, history or (), num_patches_list, system, tokens,
                               self.config.template)
        if length > self.context - 1 and num_patches_list:  # a hint of fewer tiles or images must be able to help
            bare = [(q and q.replace(IMAGE_PLACEHOLDER, ""), a) for q, a in [*(history or ()), (question, "")]]
            text = prompt_length(self.tokenizer, bare[-1][0], bare[:-1], (), system, tokens, self.config.template)
            if text > self.context - 1:
                hint = (f"; without its images it is {text} tokens",)
        check_prompt_length(length, num_patches_list, self.context - 1, tokens, hint)

    def check_video_frames(self, video, num_segments: int = 8, max_num: int = 1, max_pixels: int | None = None,
                           question: str = "", history: Sequence[tuple[str, str]] | None = None,
                           system_message: str | None = None) -> None:
        """Refuse, before a frame is decoded, a video whose `num_segments` frames, tiled with `max_num` (the
        tile counts planned from the stream's frame size or the frames' headers: `planned_frame_tiles`), leave
        no room in the model's context beside the prompt's text (`check_prompt`; the question without images
        gets the frames' prefix). A count whose frames alone fill the context (a frame takes one tile at least)
        is refused before the video is opened."""
        from .processor.video import planned_frame_tiles, video_prefix

        tokens = num_segments * self.model.num_image_token if isinstance(num_segments, int) else 0
        if tokens >= self.context:
            raise SettingError("", "num_segments", f"={num_segments}: its frames take {tokens} image tokens at "
                               f"least, leaving no room in the model's context of {self.context}")
        planned = planned_frame_tiles(video, num_segments, self.config.image_size, max_num, max_pixels,
                                      context_length=self.context)
        question = place_video(question, video_prefix(len(planned)), history or ())
        frames = "1 frame takes" if len(planned) == 1 else f"{len(planned)} frames take"
        said = f"; the video's {frames} {sum(planned)} tile{'s' * (sum(planned) > 1)} (a smaller "
        fewer = ("num_segments", " or ", "max_num", " gives fewer)") if max_num > 1 else ("num_segments", " gives fewer)")
        self.check_prompt(question, history, planned, system_message, (said, *fewer))

    def load_images(
        self, images, max_num: int | None = None, total_max_num: int | None = None, num_patches_list=None,
        max_pixels: int | None = None, fits: Callable[[list[int], Sequence[str]], None] | None = None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Tiles of every image, concatenated, and the tile count of each image.

        Each image gets `max_num` tiles at most (default: the config's `tiles_per_image`); with
        `total_max_num`, the per-image budget shrinks to max(1, total_max_num // n_images)
        (see processor/multi.py). Images over `max_pixels` pixels (default: Pillow's
        decompression-bomb limit, about 89 million) are refused. Files and PIL images are checked by `fits`
        (a prompt's `check_prompt`, say) before a tile is made: it gets the tile counts they will have, planned
        from their headers, and a hint naming them, and raises where they do not fit.
        Preprocessed tiles pass through: one tensor (N, 3, S, S), which `num_patches_list` splits
        into images (one image without it), or a list of such tensors, one per image (the tile
        budgets and `max_pixels` are refused beside them). With files or PIL images, or none, a
        `num_patches_list` given must be the tile counts they get.
        """
        if num_patches_list is not None:
            if not _is_list(num_patches_list):
                raise InputError(f"num_patches_list must be a list of whole tile counts, got {num_patches_list!r}")
            num_patches_list = list(num_patches_list)
        items = _as_list(images)
        if not items:
            if num_patches_list:  # the official code passes [] for a text-only question
                raise InputError(f"num_patches_list {list(num_patches_list)} given without images")
            return None, []
        tensors = [isinstance(item, torch.Tensor) for item in items]
        if any(tensors):
            if not all(tensors):
                raise InputError("give images as files or PIL images, or all as preprocessed pixel_values tensors")
            for name, value in (("max_num", max_num), ("total_max_num", total_max_num), ("max_pixels", max_pixels)):
                if value is not None:
                    raise InputError(f"{name} applies to files and PIL images; pixel_values are tiles made already")
            for item in items:
                size = self.config.image_size
                if item.dim() != 4 or tuple(item.shape[1:]) != (3, size, size) or item.shape[0] == 0:
                    raise InputError(f"pixel_values must have the shape (tiles, 3, {size}, {size}), got "
                                     f"{tuple(item.shape)}")
                check_tile_values(item)
            pixels = torch.cat(items) if len(items) > 1 else items[0]
            counts = [t.shape[0] for t in items]
            if num_patches_list is not None:
                if not all(whole_number(n) for n in num_patches_list):
                    raise InputError(f"num_patches_list must hold whole tile counts, got {num_patches_list!r}")
                if len(items) > 1 and list(num_patches_list) != counts:
                    raise InputError(f"num_patches_list {list(num_patches_list)} does not match the tiles of the "
                                     f"{len(items)} tensors given {counts}")
                counts = [int(n) for n in num_patches_list]
            if not counts:
                raise InputError(f"num_patches_list [] splits the {pixels.shape[0]} tiles given into no image; leave "
                                 "pixel_values out for a question without an image")
            if min(counts) < 1:
                raise InputError(f"num_patches_list {counts}: an image takes 1 tile at least (a 0 asks a question "
                                 "without an image only in batch_chat)")
            if sum(counts) != pixels.shape[0]:
                raise InputError(f"num_patches_list {counts} does not add up to the {pixels.shape[0]} tiles given")
            return pixels, counts
        budgets = dict(
            max_num=self.config.tiles_per_image if max_num is None else max_num,
            min_num=self.config.min_dynamic_patch, image_size=self.config.image_size,
            use_thumbnail=self.config.use_thumbnail, total_budget=total_max_num, max_pixels=max_pixels,
        )
        if fits is not None:  # each tile ~2.4 MB at 448 pixels: refuse before making any
            planned = planned_tiles(items, **budgets)
            fits(planned, _fewer_tiles(planned, budgets["max_num"], total_max_num))
        loaded = load_images(items, **budgets)
        if num_patches_list is not None and list(num_patches_list) != loaded.num_patches_list:
            raise InputError(f"num_patches_list {list(num_patches_list)} does not match the tiles of the images "
                             f"given {loaded.num_patches_list} (files and PIL images are tiled here; "
                             "num_patches_list splits one pixel_values tensor)")
        return loaded.pixel_values, loaded.num_patches_list

    def prepare(
        self,
        question: str,
        images=None,
        video=None,
        history: Sequence[tuple[str, str]] | None = None,
        max_num: int | None = None,
        total_max_num: int | None = None,
        num_segments: int | None = None,
        num_patches_list: Sequence[int] | None = None,
        system_message: str | None = None,
        max_pixels: int | None = None,
    ) -> Prepared:
        """The prompt of one question. It must leave room for at least one new token in the model's
        context; the answer then stops where the context ends, even before `max_new_tokens`."""
        if not isinstance(question, str):
            raise InputError(
                f"the question must be a string, got {type(question).__name__}; the official chat(tokenizer, "
                "pixel_values, question, generation_config) is chat(question, pixel_values=pixel_values, "
                "generation_config=generation_config) here"
            )
        if history is not None and not isinstance(history, (list, tuple)):  # `history or ()` below: a NumPy array
            raise InputError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
        if isinstance(video, dict):  # chat(question, images, generation_config): the settings went to video=
            raise InputError("video must be a file, a folder or a list of frames, got a dict; pass generation "
                             "settings as keywords or as generation_config=")
        if video is not None and images is not None:
            raise InputError("give images or a video, not both")
        if video is None and num_segments is not None:
            raise InputError("num_segments applies to a video (the frames sampled from it), not to images")
        if video is not None:
            from .processor.video import VideoInput, load_video

            for name, value in (("total_max_num", total_max_num), ("num_patches_list", num_patches_list)):
                if value is not None:
                    raise InputError(f"{name} applies to images, not to a video (max_num tiles each frame)")
            if isinstance(video, VideoInput):  # loaded once for several turns
                if video.pixel_values.shape[-1] != self.config.image_size:
                    raise InputError(f"the video's frames are {video.pixel_values.shape[-1]} pixels wide; this "
                                     f"model takes {self.config.image_size} (load_video(image_size=...))")
                if max_num is not None:
                    raise InputError("max_num: the video is decoded already; pass it to load_video")
                if num_segments is not None and num_segments != len(video.num_patches_list):
                    raise InputError(f"num_segments={num_segments}: the video is decoded already, "
                                     f"{len(video.num_patches_list)} frames; pass it to load_video")
                clip = video
            else:  # tiles per frame: the card's load_video(max_num=1) by default; 8 frames, the card's num_segments
                per_frame = 1 if max_num is None else max_num
                num_segments = 8 if num_segments is None else num_segments
                self.check_video_frames(video, num_segments, per_frame, max_pixels, question, history, system_message)
                clip = load_video(video, num_segments=num_segments, image_size=self.config.image_size,
                                  max_num=per_frame, max_pixels=max_pixels, context_length=self.context)
            pixels, counts = clip.pixel_values, list(clip.num_patches_list)
            question = place_video(question, clip.prefix, history or ())
        else:
            pixels, counts = self.load_images(
                images, max_num, total_max_num, num_patches_list, max_pixels,
                fits=lambda planned, hint: self.check_prompt(question, history, planned, system_message, hint))
        ids = build_prompt_ids(
            self.tokenizer, question, history or (), counts, self._system_message(system_message),
            max_length=self.context - 1,
            num_image_token=self.model.num_image_token, template=self.config.template,
        )
        return Prepared(ids, pixels, counts, add_image_prefix(question, len(counts), history or ()))

    # ---- chat -----------------------------------------------------------------------------

    def _split(self, kwargs: dict) -> tuple[dict, SamplingParams]:
        """Separate input settings (tile budgets, system message, ...) from generation settings, which
        may also come as the official `generation_config` dict."""
        config = kwargs.pop("generation_config", None) or {}
        if not isinstance(config, dict):
            raise InputError(f"generation_config must be a dict of settings, got {type(config).__name__}")

        def unset(settings: dict, key: str) -> bool:  # None is "not set", but top_k=None turns top-k off
            return settings[key] is None and key != "top_k"

        both = sorted(k for k in set(config) & set(kwargs) if not unset(config, k) and not unset(kwargs, k))
        if both:
            raise InputError(f"{both} given in generation_config and as a keyword")
        kwargs = {**config, **{k: v for k, v in kwargs.items() if k not in config or not unset(kwargs, k)}}
        inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in INPUT_KEYS}
        return inputs, sampling_params(**kwargs)

    def stream_chat(self, question: str, images=None, video=None, history=None, *, pixel_values=None,
                    **kwargs) -> Iterator[str]:
        """The answer as an iterator of text pieces (never a broken UTF-8 character); joined they
        equal chat(). Bad settings and inputs raise here, before any piece."""
        if "return_history" in kwargs:
            raise InputError("stream_chat takes no return_history (chat's): it yields the answer's pieces; for a "
                             "history, add (prepare(question, images).question, answer) to it, the question as chat "
                             "stores it")
        if "verbose" in kwargs:
            raise InputError("stream_chat takes no verbose (chat's): it yields the answer's pieces; print them as they "
                             "come (prepare(question, images) gives the prompt)")
        inputs, params = self._split(kwargs)
        prepared = self.prepare(question, _images(images, pixel_values), video, history, **inputs)
        return self.stream_prepared(prepared, params)

    def stream_prepared(self, prepared: Prepared, params: SamplingParams) -> Iterator[str]:
        """Text pieces of the answer to an already prepared prompt; joined, the stripped answer."""
        gen = self.engine.generate([Request(prepared.prompt_ids, params, prepared.pixel_values)])  # checks it here
        return _stream_text(gen, 0, self._texts(params))

    def chat(self, question: str, images=None, video=None, history=None, return_history: bool = False, *,
             pixel_values=None, verbose: bool = False, **kwargs):
        """The answer as a string; with return_history=True, (answer, history + [(question, answer)]).
        `pixel_values=` (the official argument's name) may stand for `images=`; `verbose=True` prints
        the prompt (images as `<image>`) and the answer, as the official method does."""
        inputs, params = self._split(kwargs)
        prepared = self.prepare(question, _images(images, pixel_values), video, history, **inputs)
        answer = "".join(self.stream_prepared(prepared, params))
        if verbose:
            self._show(prepared, answer)
        if return_history:
            return answer, list(history or []) + [(prepared.question, answer)]
        return answer

    def batch_chat(self, questions: Sequence[str], images=None, *, pixel_values=None, history=None,
                   return_history: bool = False, verbose: bool = False, image_counts=None, **kwargs) -> list[str]:
        """Answers to several independent questions, decoded together. `images[i]` goes with
        questions[i] (None, one image or a list of images). The official form works too: one
        `pixel_values` tensor (as `pixel_values=` or `images=`) with `num_patches_list` giving each
        question's tile count (`image_counts=`, its old name there, works too). A `seed` seeds question
        i with seed + i, so repeated questions get different samples. As in the official method,
        `history` and `return_history` are refused, and `verbose=True` prints each prompt and answer."""
        if history is not None or return_history:
            raise InputError("batch_chat answers independent questions: no history (as the official batch_chat); "
                             "use chat() for a conversation")
        if "video" in kwargs:
            raise InputError("batch_chat takes no video (as the official batch_chat); ask about a video with chat()")
        inputs, params = self._split(kwargs)
        if image_counts is not None:
            if inputs.get("num_patches_list") is not None:
                raise InputError("image_counts is the official batch_chat's old name of num_patches_list: give one")
            inputs["num_patches_list"] = image_counts
        images = _images(images, pixel_values)
        if isinstance(questions, torch.Tensor) or not (isinstance(questions, str) or _is_list(questions)):
            raise InputError(f"questions must be a list of strings, got {type(questions).__name__}; the official "
                             "batch_chat(tokenizer, pixel_values, questions, generation_config) is batch_chat(questions, "
                             "pixel_values=pixel_values, generation_config=generation_config) here")
        questions = [questions] if isinstance(questions, str) else list(questions)
        if isinstance(images, torch.Tensor):
            counts = inputs.pop("num_patches_list", None)
            if not _is_list(counts) or len(counts := list(counts)) != len(questions):
                raise InputError("with one pixel_values tensor, pass num_patches_list with the tile count of each "
                                 f"of the {len(questions)} questions")
            if not all(whole_number(n) and n >= 0 for n in counts):
                raise InputError(f"num_patches_list must hold whole tile counts (0: a question without images), "
                                 f"got {counts!r}")
            if sum(counts) != images.shape[0]:
                raise InputError(f"num_patches_list {list(counts)} does not add up to the {images.shape[0]} tiles")
            per_question = [images[start:start + n] if n else None
                            for start, n in zip(itertools.accumulate([0, *counts]), counts)]
        elif images is None:
            per_question = [None] * len(questions)
        elif isinstance(images, (list, tuple)):
            if inputs.get("num_patches_list") is not None:
                raise InputError("num_patches_list goes with one pixel_values tensor of all the questions' tiles; "
                                 "a list of images has one entry per question already")
            per_question = list(images)
        else:
            raise InputError("batch_chat takes images as a list with one entry per question (or one pixel_values "
                             "tensor with num_patches_list)")
        if len(per_question) != len(questions):
            raise InputError(f"{len(questions)} questions but {len(per_question)} image entries")
        requests: list[tuple[Prepared, SamplingParams]] = []
        for i, (question, imgs) in enumerate(zip(questions, per_question)):
            try:
                p = self.prepare(question, imgs, **inputs)
            except InputError as e:  # which of the questions
                raise located(e, f"questions[{i}]: ") from None
            seed = None if params.seed is None else (params.seed + i) % 2**63  # an int64, as the server reads seeds
            requests.append((p, dataclasses.replace(params, seed=seed)))
        answers = self.answer_prepared(requests)
        if verbose:
            for (p, _), answer in zip(requests, answers):
                self._show(p, answer)
        return answers

    def _show(self, prepared: Prepared, answer: str) -> None:
        """The official `verbose=True` output: the prompt with each image's tokens shown as `<image>`, then
        the answer."""
        prompt = self.tokenizer.decode(prepared.prompt_ids, skip_special_tokens=False)
        print(prompt.replace(IMG_CONTEXT, "").replace(IMG_START + IMG_END, "<image>"), answer)

    def answer_prepared(self, jobs: Sequence[tuple[Prepared, SamplingParams] | InputError]) -> list:
        """The answers (cut at each job's stop strings, stripped) of prepared prompts,
        decoded together. An InputError in `jobs` (a prompt that could not be built) stands in its place
        in the result."""
        good = [job for job in jobs if not isinstance(job, InputError)]
        requests = [Request(p.prompt_ids, params, p.pixel_values) for p, params in good]
        where = [f"questions[{i}]: " for i, job in enumerate(jobs) if not isinstance(job, InputError)]
        texts = iter(generate_texts(self.engine.generate(requests), [self._texts(params) for _, params in good], where)
                     if requests else [])
        return [job if isinstance(job, InputError) else next(texts) for job in jobs]

    def answers_as_they_finish(self, jobs: Iterable[tuple[Any, Prepared | InputError, SamplingParams]],
                               batch_size: int) -> Iterator[tuple[Any, str | Exception]]:
        """(key, answer) of every (key, prepared prompt, params) job, in the order the answers finish.
        Answers are cut at the job's stop strings (`params.stop`).

        Up to `batch_size` rows decode together, and a row that finishes takes the next job at the
        next step (continuous batching), so a long answer does not hold the others' rows idle. Jobs
        are pulled only when a row can take them, so a generator that prepares each job when asked
        (loading its images) keeps at most one batch of images in memory. The KV cache holds the
        longest prompt + max_new_tokens among the jobs it starts with (rounded up to 256 slots, at
        most the context); a later job that needs more waits until the running rows finish, then a
        new cache is sized for it. An InputError job comes back as its own answer at once, and so does
        the error of a job whose prompt fails inside the engine (out of memory on its images, say: the
        engine keeps such a failure to its own request) or whose activations overflow at any token
        (NumericsError); a failing decode step, which fails every running row, raises. When `jobs` itself
        raises (a bad request line, a bug in the caller's generator), no job is pulled any more; the answers
        in flight are finished and yielded (a caller that writes each answer as it comes keeps them), then the
        exception is raised."""
        if not (whole_number(batch_size) and batch_size >= 1):
            raise InputError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        jobs = iter(jobs)
        held = None  # the next job, when it is too long for the running batch
        failure: Exception | None = None  # what `jobs` raised: raised once the jobs in flight are answered
        gen: Generation | None = None
        owners: dict[int, tuple[Any, TextAssembler, list[str]]] = {}  # rid -> key, its text so far

        def room(job) -> int:
            return min(len(job[1].prompt_ids) + job[2].max_new_tokens, self.context)

        def pull():
            nonlocal held, failure
            job, held = held, None
            if job is not None or failure is not None:
                return job
            try:
                return next(jobs, None)
            except Exception as e:
                failure = e
                return None

        def add(job) -> None:
            key, prepared, params = job
            owners[gen.add(Request(prepared.prompt_ids, params, prepared.pixel_values))] = (
                key, self._texts(params), [])

        while True:
            window = []  # jobs for a new batch
            while (not gen and len(window) < batch_size) or (gen and held is None and
                                                             gen.active + len(gen.waiting) < gen.max_batch):
                job = pull()
                if job is None:
                    break
                if isinstance(job[1], InputError):
                    yield job[0], job[1]
                elif not gen:
                    window.append(job)
                elif room(job) > gen.max_len:
                    held = job
                else:
                    add(job)
            if not gen:  # no batch yet, or it has finished: one sized for the window
                if not window:
                    if failure is not None:
                        raise failure
                    return
                longest = -(-max(map(room, window)) // SPAN_BUCKET) * SPAN_BUCKET
                gen = None  # the finished batch goes first: a compiled engine gives its buffers to the next
                gen = self.engine.start(len(window), min(longest, self.context))
                for job in window:
                    add(job)
            for event in gen.step():
                if event.error is not None:
                    if event.rid in owners and event.alone:  # its prompt failed, or its activations overflowed
                        yield owners.pop(event.rid)[0], event.error
                        continue
                    raise event.error
                if event.rid not in owners:  # its answer is out already (a stop string ended it)
                    continue
                key, assembler, pieces = owners[event.rid]
                piece, stopped = assembler.feed_event(event)
                pieces.append(piece)
                if stopped:
                    gen.finish(event.rid)
                if stopped or event.finish is not None:
                    del owners[event.rid]
                    yield key, "".join(pieces).strip() if assembler.strip else "".join(pieces)

    def _texts(self, params: SamplingParams) -> TextAssembler:
        """The text of one answer, cut at `params.stop` and, as the official chat() cuts its
        decoded answer, at the template's end of turn `<|im_end|>` spelled in ordinary tokens (unless
        ignore_eos, which goes past the end-of-turn token too, or a constrained answer, where that text is its own).
        An answer held to a regex, choice or grammar is not stripped: its text is what the regex or grammar took; nor
        does a constrained answer hold the text of an ordinary stop_token_ids token that ends it (the text before it is
        complete)."""
        constrained = params.constrained_by is not None
        end = () if params.ignore_eos or constrained else (get_template(self.config.template).sep.strip(),)
        return TextAssembler(self.tokenizer, params.stop, params.min_new_tokens, end, strip=params.guide is None,
                             stop_token_text=not constrained)


def _images(images, pixel_values):
    """`images`, or the same thing passed under the official argument's name `pixel_values`."""
    if pixel_values is None:
        return images
    if images is not None:
        raise InputError("pass the images once: as images= or as pixel_values=, not both")
    return pixel_values


def _stream_text(gen: Generation, rid: int, texts: TextAssembler) -> Iterator[str]:
    """Text pieces of request `rid`, held back while they could still be the start of a stop string.
    Leading whitespace is dropped and trailing whitespace held until more text follows, so the pieces
    join to the stripped answer (unless `texts.strip` is off)."""
    held, started = "", False  # held: whitespace at the end of the text shown so far
    for events in gen:
        for event in events:
            if event.rid != rid:
                continue
            piece, stopped = texts.feed_event(event)
            shown = piece
            if texts.strip:
                text = held + piece if started else piece.lstrip()
                shown = text.rstrip()
                started = started or bool(shown)
                held = text[len(shown):]
            if shown:
                yield shown
            if stopped:
                gen.finish(rid)
                return


def generate_texts(gen: Generation, assemblers: list[TextAssembler], where: list[str] | None = None) -> list[str]:
    """Run a Generation to the end and return the answer of each request id 0..n-1, whose text
    `assemblers[id]` puts together, stripped (unless the assembler's `strip` is off). A request that fails
    raises its error; one of its own (NumericsError) names it with `where[id]` first, where given."""
    answers = [""] * len(assemblers)
    while gen:
        events = gen.step()
        for event in events:
            if event.error is not None:
                if where is not None and isinstance(event.error, NumericsError):
                    raise NumericsError(where[event.rid] + str(event.error)) from None
                raise event.error
        for event in events:
            piece, stopped = assemblers[event.rid].feed_event(event)
            answers[event.rid] += piece
            if stopped:
                gen.finish(event.rid)
    return [a.strip() if texts.strip else a for a, texts in zip(answers, assemblers)]


class TextAssembler:
    """Turns one sequence's tokens into text pieces, cutting where a stop string first appears.

    Special tokens are skipped (so `<|im_end|>` never reaches the text); a piece that could be the
    start of a stop string is held back until it is decided. As vLLM's `min_tokens` does, a stop
    string counts only where it ends in the text of a token after the first `min_tokens`; the `end`
    strings (the end of turn spelled in ordinary tokens, which the official chat() cuts its answer
    at) count everywhere. `strip`: whether the answer's callers strip its whitespace. `stop_token_text`: whether
    `feed_event` keeps the text of a stop token that ends the answer (an ordinary token of stop_token_ids).
    The answer continues its prompt: its text is its tokens' bytes, the space that a SentencePiece dummy prefix
    gives its first token kept (what a constraint read; vLLM's text too, decoded after the prompt's tokens).
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0,
                 end: tuple[str, ...] = (), strip: bool = True, stop_token_text: bool = True):
        self.strip = strip
        self.stop_token_text = stop_token_text
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.decoder.strip_space = False
        self.stop = tuple(s for s in stop if s)
        self.end = tuple(s for s in end if s)
        self.min_tokens = min_tokens
        self.tokens = 0
        self.checked_from = 0  # in held + new text: where text after the first min_tokens tokens begins
        self.held = ""
        self.done = False
        self.stopped_by: str | None = None  # the stop (or end) string that ended the text

    def feed_event(self, event: Event) -> tuple[str, bool]:
        """`feed` of an engine Event's token (left out where it is a stop token and stop_token_text is off)."""
        stop_token = event.finish == "stop" and not self.stop_token_text
        return self.feed(None if stop_token else event.token, last=event.finish is not None)

    def feed(self, token: int | None, last: bool = False) -> tuple[str, bool]:
        """(text that is safe to show, whether a stop string ended the answer)."""
        if self.done:
            return "", True
        text = self.held + (self.decoder.feed(token) if token is not None else "")
        if last:
            text += self.decoder.flush()
        self.tokens += token is not None
        if self.tokens <= self.min_tokens:
            self.checked_from = len(text)
        found = [(text.find(s, max(0, self.checked_from - len(s) + 1)), s) for s in self.stop]
        cuts = [(cut, s) for cut, s in found + [(text.find(s), s) for s in self.end] if cut >= 0]
        if cuts:  # the earliest match, whatever the order of the stop strings
            cut, self.stopped_by = min(cuts, key=lambda c: c[0])
            self.done = True
            self.held = ""
            return text[:cut], True
        keep = 0 if last else max((_overlap(text, s) for s in self.stop + self.end), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        self.checked_from = max(0, self.checked_from - (len(text) - keep))
        return text[: len(text) - keep], False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
