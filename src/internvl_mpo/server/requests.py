"""Request bodies parsed and checked (each endpoint's fields: taken, refused or ignored), and ApiError, the
OpenAI-style error body of a request the server refuses."""

import json
import re
import sys
from dataclasses import dataclass

from ..chat.template import IMAGE_PLACEHOLDER
from ..chat.tokenizer import IMG_CONTEXT
from ..errors import InputError, SettingError
from ..jsonl import json_problem
from ..generate.grammar import compile_grammar
from ..generate.json_schema import ANNOTATIONS, SchemaError, compile_schema
from ..generate.regex import compile_regex
from ..generate.params import MAX_TOP_LOGPROBS, SamplingParams, checked_choice
from .settings import ServerSettings

MAX_STOP_STRINGS = 64  # OpenAI takes 4, vLLM any number; lm-eval sends a task's stop strings and the EOS
MAX_LOGIT_BIAS_ENTRIES = 1024  # tokens in one request's logit_bias (OpenAI documents no count, vLLM has no cap)
# fields that would change the answer, refused when set (not silently ignored): OpenAI's, then vLLM's extras;
# each with the values that mean "off" (of their JSON type: `false`, not `0`), which pass; null always passes
UNSUPPORTED_FIELDS = {"tools": ([],), "functions": ([],), "audio": (), "prediction": (),
                      "min_p": (0, 0.0), "use_beam_search": (False,), "include_stop_str_in_output": (False,),
                      "allowed_token_ids": (), "bad_words": ([],), "logits_processors": (),
                      "truncate_prompt_tokens": (), "return_tokens_as_token_ids": (False,), "chat_template": (),
                      "modalities": (["text"],), "function_call": ("none",), "web_search_options": (), "moderation": (),
                      "length_penalty": (1, 1.0), "structural_tag": (), "documents": ([],), "return_token_ids": (False,),
                      "prompt_embeds": (), "guided_whitespace_pattern": ()}
# fields that do not change the answer, accepted and ignored, but type-checked as OpenAI's and vLLM's schemas do
IGNORED_FIELDS = {"user": (str,), "metadata": (dict,), "store": (bool,), "service_tier": (str,),
                  "parallel_tool_calls": (bool,), "reasoning_effort": (str,), "chat_template_kwargs": (dict,),
                  "mm_processor_kwargs": (dict,), "request_id": (str,), "cache_salt": (str,),
                  "spaces_between_special_tokens": (bool,), "prompt_cache_key": (str,), "prompt_cache_retention": (str,),
                  "prompt_cache_options": (dict,), "safety_identifier": (str,), "verbosity": (str,),
                  "include_reasoning": (bool,), "priority": (int,), "kv_transfer_params": (dict,), "vllm_xargs": (dict,),
                  "guided_decoding_backend": (str,)}
# the fields both endpoints read; with the two above and each endpoint's own, the only ones taken: any other is a 400
# naming it, as OpenAI answers one (vLLM ignores it), so that a typo (`max_token`) or another API's name
# (`max_new_tokens`, `stop_sequences`) does not leave the answer silently as if it had not been sent
SHARED_FIELDS = {"model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "stop_token_ids",
                 "stream", "stream_options", "n", "seed", "min_tokens", "logit_bias", "top_k", "repetition_penalty",
                 "ignore_eos", "skip_special_tokens", "frequency_penalty", "presence_penalty", "response_format",
                 "logprobs", "prompt_logprobs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs"}
CHAT_FIELDS = {"messages", "top_logprobs", "tools", "tool_choice", "add_generation_prompt", "max_num",
               "continue_final_message", "echo"}
COMPLETION_FIELDS = {"prompt", "suffix", "best_of", "echo", "add_special_tokens"}
IMAGE_DETAILS = ("auto", "low", "high")  # OpenAI's image_url.detail; tiles follow max_num whatever it says
TOOL_FIELDS = ("name", "description", "parameters", "strict")  # a function tool's fields (OpenAI's)
TOOL_CHOICES = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens (OpenAI's and vLLM's)
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        # A key or value quoted from the body may hold a lone surrogate (a JSON \ud800 escape), which no UTF-8 error
        # body can carry: written as its escape, as json.dumps would show it.
        message, param = (s if s is None else s.encode("utf-8", "backslashreplace").decode() for s in (message, param))
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A parsed /v1/chat/completions body; images are still URLs."""

    question: str | None  # None: the conversation ends with an assistant message
    history: list[tuple[str, str]]
    system_message: str | None
    image_urls: list[tuple[str, str]]  # (param path, url), in prompt order
    params: SamplingParams  # max_new_tokens is a placeholder until the prompt length is known
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    max_num: int | None
    logprobs: int | None = None  # top_logprobs when logprobs were asked for, else None
    max_tokens_key: str = "max_tokens"  # the field max_tokens came from, named in errors
    prompt_logprobs: int | None = None  # vLLM's: top alternatives per prompt token, or None
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    video_url: tuple[str, str] | None = None  # (param path, url) of a video in the last user message
    named_tool: str | None = None  # a named tool_choice: the answer is this function's arguments, one call
    tools_required: bool = False  # tool_choice "required": the answer is a JSON list of calls
    answer_start: str = ""  # vLLM's continue_final_message: the final assistant message, which the answer continues
    echo: str = ""  # vLLM's chat `echo`: the final assistant message's text, put before each answer


@dataclass
class CompletionRequest:
    """A parsed /v1/completions body: raw prompts (text or token ids), no chat template."""

    prompts: list[str | list[int]]
    params: SamplingParams  # max_new_tokens is a placeholder until the prompt length is known
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # the legacy integer: top alternatives per token, or None
    echo: bool
    max_tokens_key: str = "max_tokens"
    prompt_logprobs: int | None = None  # vLLM's: top alternatives per prompt token, or None
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    add_special_tokens: bool = True  # vLLM's: a text prompt gets the tokenizer's BOS, where it has one

    @property
    def shown_prompt_logprobs(self) -> int | None:
        """The alternatives per prompt token in vLLM's `prompt_logprobs` (as vLLM: echo with logprobs asks too)."""
        return self.prompt_logprobs if self.prompt_logprobs is not None or not self.echo else self.logprobs


def json_body(body: bytes | bytearray):
    """The JSON value of a request body; a 400 naming what is wrong with it."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError:  # Python's limit on the digits of an int read from text (a 500 before)
        raise ApiError(400, f"the request body holds an integer of more than {sys.get_int_max_str_digits()} "
                            "digits") from None


def _field(body: dict, key: str, kinds: tuple[type, ...], default=None, low=None, high=None):
    """body[key] checked for type (bool is never a number) and range, or `default` when absent/null."""
    value = body.get(key)
    if value is None:
        return default
    is_bool_field = bool in kinds
    if isinstance(value, bool) != is_bool_field or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{key} must be {names}, got {json.dumps(value)[:80]}", key)
    if value != value:  # NaN, which the range checks below would let through
        raise ApiError(400, f"{key} must be a finite number, got NaN", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"{key} must be {bounds}, got {value}", key)
    return value


def _unicode(text: str, param: str) -> str:
    """`text`, refused when it holds a lone surrogate (a JSON \\ud800-\\udfff escape outside a pair)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: character {e.start} is a lone surrogate {text[e.start]!r}, which is not "
                            "valid Unicode", param) from None
    return text


def _plain_text(text: str, param: str, role: str) -> str:
    """A text part; `<image>` places an image in a user message, so it is refused there and in a tool's result,
    which is read as one (an answer or a system message that mentions it keeps it as text). The image-context token
    is refused in any message: the model would look for image features there."""
    _unicode(text, param)
    _refuse_image_context(text, param)
    if role in ("user", "tool") and IMAGE_PLACEHOLDER in text:
        raise ApiError(400, f"{param}: the text holds {IMAGE_PLACEHOLDER!r}; send images as image_url parts", param)
    return text


def _refuse_image_context(text: str, param: str) -> None:
    """A 400 naming `param` where `text` holds the image-context token: the model would look for image features
    there."""
    if IMG_CONTEXT in text:
        raise ApiError(400, f"{param}: the text holds the image-context token {IMG_CONTEXT}, which is reserved for"
                            " image features", param)


def _content_text(content, param: str, role: str, images: list[tuple[str, str]]) -> str:
    """The text of one message (`_turn_text` of its `_content_parts`)."""
    return _turn_text(*_content_parts(content, param, role, images))


def _turn_text(image_count: int, pieces: list[str]) -> str:
    """An `<image>` line for each image of a turn in front of its text pieces, joined by newlines: whatever the
    order of the parts (and of the messages of one role read as one turn), as the model card puts images in front
    of the question and vLLM a message's placeholders."""
    return "\n".join([IMAGE_PLACEHOLDER] * image_count + ["\n".join(pieces)])


def _content_parts(content, param: str, role: str, images: list[tuple[str, str]],
                   videos: list[tuple[str, str]] | None = None) -> tuple[int, list[str]]:
    """(the number of image parts, the text parts) of one message's content; the image parts' URLs are appended to
    `images`. A video part (vLLM's `video_url`) adds its URL to `videos` and nothing to the text: its frames'
    lines go in front of the question (`prompts._video_prompt`)."""
    if isinstance(content, str):
        return 0, [_plain_text(content, param, role)]
    if not isinstance(content, list):
        raise ApiError(400, f"{param} must be a string or a list of content parts", param)
    image_count, pieces = 0, []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(_plain_text(part["text"], where, role))
        elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):  # what it said
            pieces.append(_plain_text(part["refusal"], where, role))
        elif kind == "video_url" and videos is not None:
            video = part.get("video_url")
            url = video.get("url") if isinstance(video, dict) else None
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{where}: video_url needs a url string ({{'url': ...}})", where)
            videos.append((f"{where}.video_url", _unicode(url, f"{where}.video_url")))
        elif kind == "image_url":
            if role != "user":
                raise ApiError(400, f"{where}: images are only accepted in user messages", where)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{where}: image_url needs a url string", where)
            if isinstance(image, dict) and image.get("detail") not in (None, *IMAGE_DETAILS):
                raise ApiError(400, f"{where}.image_url.detail must be one of {', '.join(IMAGE_DETAILS)}, got "
                                    f"{json.dumps(image['detail'])[:80]}", f"{where}.image_url.detail")
            images.append((f"{where}.image_url", _unicode(url, f"{where}.image_url")))
            image_count += 1
        else:
            video = " or {'type': 'video_url', 'video_url': {'url': ...}}" if role == "user" else ""
            raise ApiError(400, f"{where}: content parts must be {{'type': 'text', 'text': ...}} or "
                                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}{video}", where)
    return image_count, pieces


def _refusal(message: dict, param: str) -> str:
    """The text of an assistant message whose content is null: its `refusal` (OpenAI's refusals come so), or none."""
    refusal = message.get("refusal")
    if refusal is None:
        return ""
    if not isinstance(refusal, str):
        raise ApiError(400, f"{param}.refusal must be a string, got {json.dumps(refusal)[:80]}", f"{param}.refusal")
    return _plain_text(refusal, f"{param}.refusal", "assistant")


def _tool_calls_text(message: dict, param: str, images: list[tuple[str, str]]) -> str:
    """The text of an assistant message with `tool_calls`: its content (null allowed), then its calls as the JSON
    list a "required" tool_choice answers with, [{"name": ..., "parameters": <the arguments>}] (arguments that are
    not JSON, a call cut short, as their text); the chat template has no place for calls (its rendering in vLLM
    drops them)."""
    calls = []
    for j, call in enumerate(message["tool_calls"]):
        where = f"{param}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or call.get("type", "function") != "function"
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str)):
            raise ApiError(400, f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                                f"'arguments': <JSON text>}}}}, got {json.dumps(call)[:80]}", where)
        try:
            arguments = json.loads(function["arguments"])
            json.dumps([{"parameters": arguments}])  # as deep as the calls written below (a 500 just under the limit)
        except (ValueError, RecursionError):
            arguments = function["arguments"]
        calls.append({"name": function["name"], "parameters": arguments})
    content = message.get("content")
    text = "" if content is None else _content_text(content, f"{param}.content", "assistant", images)
    written = json.dumps(calls, ensure_ascii=False)
    _refuse_image_context(written, f"{param}.tool_calls")  # a call's name or arguments, as its text parts
    return _unicode("\n".join(filter(None, (text, written))), f"{param}.tool_calls")


def _conversation(messages, continuing: bool = False
                  ) -> tuple[str | None, list[tuple[str, str]], list[tuple[str, str]], tuple[str, str] | None]:
    """(system message, [(role, text)] alternating user/assistant (opening and ending with either), image urls,
    the video url or None). The template has no tool turns: an assistant message's `tool_calls` are written after
    its content (`_tool_calls_text`) and a `tool` message (a call's result) is read as a user message. A video
    goes in the last user message: the last message, or the one before the final assistant message when
    `continuing` it."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    system, turns, images, videos, video_turn = None, [], [], [], None
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object with a role and content, got {json.dumps(message)[:80]}",
                           param)
        role = message.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise ApiError(400, f"{param}: a system message may only come first", param)
            system = _content_text(message.get("content"), f"{param}.content", role, [])
            continue
        if role not in ("user", "assistant", "tool"):
            raise ApiError(400, f"{param}: role must be system, user, assistant or tool, got {json.dumps(role)[:80]}",
                           param)
        count = len(videos)
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise ApiError(400, f"{param}.tool_calls must be a list of calls, got {json.dumps(calls)[:80]}",
                           f"{param}.tool_calls")
        if calls:
            image_count, pieces = 0, [_tool_calls_text(message, param, images)]
        elif role == "assistant" and message.get("content") is None:  # a refusal as OpenAI sends one, or no text
            image_count, pieces = 0, [_refusal(message, param)]
        else:
            image_count, pieces = _content_parts(message.get("content"), f"{param}.content", role, images,
                                                 videos if role == "user" else None)
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise ApiError(400, f"{param}.tool_call_id must be a string (the id of the call it answers), got "
                                    f"{json.dumps(message.get('tool_call_id'))[:80]}", f"{param}.tool_call_id")
            role = "user"
        if turns and turns[-1][0] == role:  # consecutive messages of one role read as one turn: its images in front
            turns[-1][1] += image_count
            turns[-1][2].extend(pieces)  # joined once below: adding each to the turn so far is quadratic
        else:
            turns.append([role, image_count, pieces])
        if len(videos) > count:
            video_turn = len(turns) - 1
    turns = [(role, _turn_text(image_count, pieces)) for role, image_count, pieces in turns]
    if not turns:
        raise ApiError(400, "the conversation holds no user or assistant message", "messages")
    last_user = len(turns) - 1 - (continuing and turns[-1][0] == "assistant")
    if videos and (len(videos) > 1 or images or video_turn != last_user):
        raise ApiError(400, "a request may hold one video, in the user message that ends the conversation (or comes "
                            "before the assistant message it continues), and no images beside it (its frames go in "
                            "front of the question, as the model card asks about a video)", videos[-1][0])
    return system, turns, images, videos[0] if videos else None


def _label_images(turns: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """With several images, write each placeholder as `Image-k: <image>` (k counts over the request)."""
    if count < 2:
        return turns
    k = 0
    out = []
    for role, text in turns:
        if role != "user":
            out.append((role, text))
            continue
        pieces = text.split(IMAGE_PLACEHOLDER)
        labelled = [pieces[0]]
        for piece in pieces[1:]:
            k += 1
            labelled += [f"Image-{k}: {IMAGE_PLACEHOLDER}", piece]
        out.append((role, "".join(labelled)))
    return out


def check_model(body, served: str) -> None:
    """As vLLM, before the rest of the body: a request that names another model gets a 404 (one that
    names none, or "", is served)."""
    model = _field(body, "model", (str,), "") if isinstance(body, dict) else ""
    if model not in ("", served):
        shown = _unicode(model, "model")[:200]  # a name of a megabyte is not sent back whole
        raise ApiError(404, f"The model `{shown}` does not exist; this server serves `{served}`", "model",
                       "model_not_found")


def _refuse_off(body: dict, key: str) -> None:
    """A vLLM field that is on by default and would change the answer when turned off: a 400 when false."""
    if not _field(body, key, (bool,), True):
        raise ApiError(400, f"{key}: false is not supported by this server", key)


def _sampling(body: dict, settings: ServerSettings, refused: dict[str, tuple], fields: set[str],
              lowest_max_tokens: int = 1, tool_constraint: dict | None = None) -> dict:
    """The fields that chat and text completions share (sampling, limits, n, streaming), checked; raises
    ApiError. Fields in `refused` are a 400 when set to anything but null or one of their off values, and so is
    any field not among them, the shared ones, the ignored ones and the endpoint's own `fields`.
    `tool_constraint` is a chat's tool_choice constraint (`_tool_choice`), refused beside another one."""
    _refuse_unknown(body, SHARED_FIELDS | IGNORED_FIELDS.keys() | refused.keys() | fields)
    for key, off in refused.items():
        value = body.get(key)
        if value is not None and not any(type(value) is type(v) and value == v for v in off):
            raise ApiError(400, f"{key} is not supported by this server", key)
    for key, kinds in IGNORED_FIELDS.items():
        _field(body, key, kinds)
    _refuse_off(body, "skip_special_tokens")  # the text would show the special tokens
    for key in ("frequency_penalty", "presence_penalty"):
        if _field(body, key, (int, float), 0):
            raise ApiError(400, f"{key} is not supported (use repetition_penalty)", key)
    constraint, constraint_key = _structured(body)
    if tool_constraint:
        if constraint_key:
            raise ApiError(400, f"give tool_choice (a named function or \"required\") or {constraint_key}, not both: "
                                "each holds the answer to a constraint", "tool_choice")
        constraint, constraint_key = tool_constraint, "tool_choice"
    temperature = _field(body, "temperature", (int, float), 1.0, 0, 2)
    top_p = _field(body, "top_p", (int, float), 1.0, 0, 1)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", "top_p")
    # max_completion_tokens is OpenAI's current name and wins over the older max_tokens (as in vLLM)
    limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, "max_tokens", (int,), None, lowest_max_tokens)
    max_tokens = _field(body, "max_completion_tokens", (int,), max_tokens, lowest_max_tokens)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise ApiError(400, f"{limit_key} is {max_tokens}; this server allows at most {settings.max_tokens}",
                       limit_key)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       "stop")
    for text in stop:  # one that is not valid Unicode could never match
        _unicode(text, "stop")
    stop_ids = body.get("stop_token_ids")  # vLLM's; the token that stops is counted, not shown
    stop_ids = [] if stop_ids is None else stop_ids
    if not isinstance(stop_ids, list) or not all(type(i) is int and 0 <= i < 2**31 for i in stop_ids):
        raise ApiError(400, f"stop_token_ids must be a list of token ids, got {json.dumps(stop_ids)[:80]}",
                       "stop_token_ids")
    stream_options = body.get("stream_options")
    stream_options = {} if stream_options is None else stream_options
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    usage_keys = ("include_usage", "continuous_usage_stats")
    # a typo (include_usages) left the stream without its usage chunk; include_obfuscation (OpenAI's) changes nothing
    if unknown := [key for key in stream_options if key not in (*usage_keys, "include_obfuscation")]:
        key = f"stream_options.{unknown[0][:80]}"
        raise ApiError(400, f"{key} is not a stream option this server knows (include_usage, continuous_usage_stats)",
                       key)
    include_usage, continuous_usage = (  # checked as fields of their own, named stream_options.<key>
        _field({f"stream_options.{k}": stream_options.get(k) for k in usage_keys}, f"stream_options.{k}", (bool,), False)
        for k in usage_keys)
    if stream_options and not body.get("stream"):  # as vLLM and OpenAI
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    n = _field(body, "n", (int,), 1, 1, settings.max_n)
    seed = _field(body, "seed", (int,), None, -(2**63), 2**63 - 1)  # OpenAI's int64; read modulo 2**63
    min_tokens = _field(body, "min_tokens", (int,), 0, 0)  # vLLM's; checked against the answer's room later
    logit_bias = _logit_bias(body.get("logit_bias"))
    try:
        params = SamplingParams(
            max_new_tokens=max(1, min_tokens), min_new_tokens=min_tokens,  # max_new_tokens: a placeholder
            do_sample=temperature > 0, temperature=float(temperature), top_p=float(top_p),
            top_k=max(0, _field(body, "top_k", (int,), 0, -1)), stop=tuple(stop),  # -1 is vLLM's "off" too
            stop_token_ids=tuple(stop_ids),
            repetition_penalty=float(_field(body, "repetition_penalty", (int, float), 1.0, 0.01, 10)),
            seed=None if seed is None else seed % 2**63, ignore_eos=_field(body, "ignore_eos", (bool,), False),
            logit_bias=logit_bias, **constraint,
        )
    except SettingError as e:  # named as the request names them (min_tokens beside a constraint, say)
        names = {"min_new_tokens": "min_tokens", **dict.fromkeys(constraint, constraint_key)}
        setting = e.parts[1] if len(e.parts) > 1 else None
        raise ApiError(400, str(e.named(names)), names.get(setting, setting)) from None
    except InputError as e:
        raise ApiError(400, str(e)) from None
    return {"params": params, "max_tokens": max_tokens, "max_tokens_key": limit_key, "n": n,
            "stream": _field(body, "stream", (bool,), False), "include_usage": include_usage,
            # as vLLM, continuous_usage_stats counts only beside include_usage
            "continuous_usage": include_usage and continuous_usage}


def _refuse_unknown(body: dict, known) -> None:
    """A 400 naming the fields of `body` not in `known`, as OpenAI answers one (vLLM ignores it): a typo
    (`max_token`, `add_special_token`) would otherwise leave the answer as if it had not been sent."""
    if unknown := [key for key in body if key not in known]:
        shown = ", ".join(json.dumps(key)[:80] for key in unknown[:5])
        raise ApiError(400, f"unrecognized request argument supplied: {shown} (this server does not know "
                            f"{'them' if len(unknown) > 1 else 'it'}, so it would have no effect)", unknown[0][:80])


def _structured(body: dict) -> tuple[dict, str | None]:
    """(SamplingParams fields of the answer's constraint, the name of what asked for it or None) from OpenAI's
    `response_format` ({"type": "json_object"}: JSON mode; {"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": ...}}: a schema), vLLM's `guided_json` (a schema, or its JSON as a string),
    `guided_regex` (a regex the whole answer matches), `guided_choice` (strings the answer is one of),
    `guided_grammar` (a GBNF or Lark grammar the whole answer is a sentence of) or its newer `structured_outputs`
    ({"json": a schema or its JSON}, {"json_object": true}: JSON mode, {"regex": ...}, {"choice": [...]} or
    {"grammar": ...}; its other keys, structural_tag, ..., are refused); {"type": "text"} and null ask for none.
    Anything else, two at once, or a schema, regex or grammar that cannot be compiled is a 400 naming it."""
    response_format, guided = body.get("response_format"), body.get("guided_json")
    formatted = response_format is not None and response_format != {"type": "text"}
    structured = body.get("structured_outputs")
    given = [name for name, on in (("response_format", formatted), ("guided_json", guided is not None),
                                   ("guided_regex", body.get("guided_regex") is not None),
                                   ("guided_choice", body.get("guided_choice") is not None),
                                   ("guided_grammar", body.get("guided_grammar") is not None),
                                   ("structured_outputs", structured is not None)) if on]
    if len(given) > 1 and {"guided_regex", "guided_choice", "guided_grammar"} & set(given):
        raise ApiError(400, f"give one of {', '.join(given[:-1])} and {given[-1]}, not more: each asks for a "
                            "constraint of the answer", given[-1])
    for name, kind in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if body.get(name) is not None:
            return _guide(kind, body[name], name, name), name
    if structured is not None:
        if not isinstance(structured, dict):
            raise ApiError(400, "structured_outputs must be an object such as {'json': <a JSON schema>}, got "
                                f"{json.dumps(structured)[:80]}", "structured_outputs")
        kinds = ("json", "json_object", "regex", "choice", "grammar")
        others = [json.dumps(key)[:40] for key, value in structured.items()
                  if key not in kinds and value is not None and value is not False]
        json_object = structured.get("json_object")
        if not (json_object is None or isinstance(json_object, bool)):  # 1 == True
            raise ApiError(400, "structured_outputs.json_object must be true or false, got "
                                f"{json.dumps(json_object)[:80]}", "structured_outputs")
        asked = [key for key in kinds if structured.get(key) is not None and structured.get(key) is not False]
        if others or len(asked) != 1:
            what = ", ".join(others[:5]) or ("no constraint" if not asked else f"both {asked[0]} and {asked[1]}"
                                             if len(asked) == 2 else f"{', '.join(asked[:-1])} and {asked[-1]}")
            raise ApiError(400, f"structured_outputs is not supported by this server with {what}: only its json (a "
                                "JSON schema), json_object: true, regex, choice or grammar is taken",
                           "structured_outputs")
        if guided is not None or formatted:
            raise ApiError(400, "give one of response_format, guided_json and structured_outputs, not more",
                           "structured_outputs")
        if json_object:  # JSON mode
            return {"json_mode": True}, "structured_outputs json_object"
        if asked[0] != "json":
            return _guide(asked[0], structured[asked[0]], f"structured_outputs.{asked[0]}", "structured_outputs"), \
                f"structured_outputs {asked[0]}"
        return {"json_schema": _schema(_json_text(structured["json"], "structured_outputs.json"),
                                       "structured_outputs")}, "structured_outputs"
    if guided is not None:
        if formatted:
            raise ApiError(400, "give response_format or guided_json, not both", "guided_json")
        return {"json_schema": _schema(_json_text(guided, "guided_json"), "guided_json")}, "guided_json"
    if response_format is None or response_format == {"type": "text"}:
        return {}, None
    if response_format == {"type": "json_object"}:
        return {"json_mode": True}, "response_format json_object"
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema" and set(response_format) == {"type", "json_schema"}:
        spec = response_format["json_schema"]
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ApiError(400, "response_format json_schema must be an object with a schema: {'name': ..., 'schema': "
                                f"{{...}}}}, got {json.dumps(spec)[:80]}", "response_format")
        if unknown := [key for key in spec if key not in ("name", "schema", "strict", "description")]:
            raise ApiError(400, f"response_format.json_schema.{unknown[0][:80]} is not a field this server knows "
                                "(name, schema, strict, description)", "response_format")
        for key, kinds in (("name", str), ("strict", bool), ("description", str)):
            if spec.get(key) is not None and not isinstance(spec[key], kinds):
                raise ApiError(400, f"response_format.json_schema.{key} must be {kinds.__name__}", "response_format")
        return {"json_schema": _schema(spec["schema"], "response_format")}, "response_format json_schema"
    if isinstance(kind, str) and kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format type {json.dumps(kind)[:80]} is not supported: this server has JSON "
                            "mode ({'type': 'json_object'}) and JSON schemas ({'type': 'json_schema'}) only",
                       "response_format")
    raise ApiError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                        f"'json_schema', 'json_schema': {{...}}}}, got {json.dumps(response_format)[:80]}",
                   "response_format")


def _guide(kind: str, value, name: str, param: str) -> dict:
    """The SamplingParams field of vLLM's regex (a string), choice (a non-empty list of strings) or grammar (a GBNF
    or Lark grammar's text) sent as `name`, checked and compiled; a 400 naming what is wrong."""
    if kind in ("regex", "grammar") and not isinstance(value, str):
        what = "a regular expression" if kind == "regex" else "a GBNF or Lark grammar"
        raise ApiError(400, f"{name} must be a string ({what}), got {json.dumps(value)[:80]}", param)
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        raise ApiError(400, f"{name} must be a non-empty list of strings, got {json.dumps(value)[:80]}", param)
    try:
        if kind == "grammar":
            return {"grammar": compile_grammar(value).key}
        return {"regex": compile_regex(value).key[0]} if kind == "regex" else {"choice": checked_choice(value)}
    except SettingError as e:  # a choice whose regex is too large, naming `choice`
        raise ApiError(400, str(e.named({"choice": name})), param) from None
    except InputError as e:  # a RegexError or GrammarError names the construct and its place
        raise ApiError(400, f"{name}: {e}", param) from None


def _json_text(value, name: str):
    """A schema sent as its JSON in a string, read; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"{name} is not JSON: {json_problem(e)}", name.split(".")[0]) from None


def _schema(schema, param: str):
    try:
        return compile_schema(schema)
    except SchemaError as e:
        raise ApiError(400, f"{param}: {e}", param) from None


def _tools(body: dict) -> dict[str, tuple[int, dict]]:
    """The request's `tools`, each {"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}, as {name: (its index, its parameters' JSON schema)}; no parameters is a function of none, as
    OpenAI reads it (`strict` has no effect: the answer is held to the schema either way). A 400 naming what is
    wrong."""
    tools = body.get("tools")
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list of {'type': 'function', 'function': {'name': ..., 'parameters': "
                            f"{{...}}}}}} objects, got {json.dumps(tools)[:80]}", "tools")
    named = {}
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or set(tool) != {"type", "function"}:
            raise ApiError(400, f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                                f"{{...}}}}}} (functions are the only tools here), got {json.dumps(tool)[:80]}", where)
        if unknown := [key for key in function if key not in TOOL_FIELDS]:
            raise ApiError(400, f"{where}.function.{unknown[0][:80]} is not a field this server knows "
                                f"({', '.join(TOOL_FIELDS)})", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{where}.function.name must be a non-empty string, got {json.dumps(name)[:80]}",
                           f"{where}.function.name")
        if name in named:
            raise ApiError(400, f"{where}.function.name {json.dumps(name)[:80]} is the name of tools"
                                f"[{named[name][0]}] too; names must be unique", f"{where}.function.name")
        for key, kind in (("description", str), ("strict", bool)):
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise ApiError(400, f"{where}.function.{key} must be {kind.__name__}, got "
                                    f"{json.dumps(function[key])[:80]}", f"{where}.function.{key}")
        parameters = function.get("parameters")
        if parameters is None:  # no parameters: the arguments are {}
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        elif not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ApiError(400, f"{where}.function.parameters must be the JSON schema of an object ({{'type': "
                                f"'object', 'properties': {{...}}}}), got {json.dumps(parameters)[:80]}",
                           f"{where}.function.parameters")
        elif not parameters.keys() & {"type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const"}:
            parameters = {"type": "object", **parameters}  # `{}` too: a function's arguments are an object
        named[_unicode(name, f"{where}.function.name")] = (k, parameters)
    return named


def _tool_choice(body: dict) -> tuple[str | None, bool, dict | None]:
    """(the function a named tool_choice names or None, whether tool_choice is "required", the SamplingParams
    fields of its constraint or None), as vLLM serves tools without a tool parser: a named function holds the
    answer to that function's parameters, "required" to a JSON list of calls [{"name": <a tool's name>,
    "parameters": <its arguments>}] (one call at most with `parallel_tool_calls: false`); "none" ignores the
    tools. Without a tool_choice, tools ask for "auto" (OpenAI's and vLLM's default), which needs a parser that
    finds calls in free text: a 400, as vLLM answers without --enable-auto-tool-choice."""
    tools, choice = _tools(body), body.get("tool_choice")
    named = None
    if isinstance(choice, dict):
        function = choice.get("function")
        if (set(choice) - {"type", "function"} or choice.get("type", "function") != "function"
                or not isinstance(function, dict) or set(function) != {"name"}
                or not isinstance(function["name"], str)):
            raise ApiError(400, f"tool_choice must be {TOOL_CHOICES}, got {json.dumps(choice)[:80]}", "tool_choice")
        named = function["name"]
    elif choice not in (None, "none", "auto", "required"):
        raise ApiError(400, f"tool_choice must be {TOOL_CHOICES}, got {json.dumps(choice)[:80]}", "tool_choice")
    if choice == "none" or (choice is None and not tools):
        return None, False, None
    if not tools:
        if choice in ("auto", "required") and body.get("tools") == []:
            return None, False, None  # nothing to call: answered with text
        raise ApiError(400, f"tool_choice {json.dumps(choice)[:80]} needs tools (when tool_choice is given, tools "
                            "must be set, as vLLM answers)", "tool_choice")
    if choice in (None, "auto"):
        raise ApiError(400, 'tool_choice "auto" (the default when tools are given) needs a parser that finds calls '
                            "in free text, which this server does not have (vLLM's --enable-auto-tool-choice): send "
                            'tool_choice "required" or {"type": "function", "function": {"name": ...}}, which hold '
                            'the answer to the tools\' schemas, or "none"', "tool_choice")
    if named is not None:
        if named not in tools:
            listed = ", ".join(json.dumps(name)[:40] for name in list(tools)[:10])
            raise ApiError(400, f"tool_choice names the function {json.dumps(named)[:80]}, which is not among the "
                                f"tools ({listed})", "tool_choice")
        k, parameters = tools[named]
        return named, False, {"json_schema": _schema(parameters, f"tools[{k}].function.parameters")}
    for k, parameters in tools.values():  # each tool's schema on its own first: a 400 names the tool
        _schema(parameters, f"tools[{k}].function.parameters")
    items = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": _moved_refs(
        {key: value for key, value in parameters.items() if key != "$id"},  # a root's $id, nested below it no more
        f"#/items/anyOf/{k}/properties/parameters")}, "required": ["name", "parameters"]}
        for name, (k, parameters) in tools.items()]
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not _field(body, "parallel_tool_calls", (bool,), True):
        calls["maxItems"] = 1
    return None, True, {"json_schema": _schema(calls, "tools")}


def _moved_refs(schema, prefix: str):
    """`schema`, to be placed at the JSON pointer `prefix` of a larger schema, with each `$ref` into itself ("#",
    "#/$defs/...") pointing there; values that are data or annotations, not schemas (enum, const, default, ...),
    are left as they are."""
    if isinstance(schema, list):
        return [_moved_refs(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    moved = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            value = prefix + value[1:]
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):  # names, then schemas
            value = {name: _moved_refs(item, prefix) for name, item in value.items()}
        elif key not in ANNOTATIONS and key not in ("enum", "const"):
            value = _moved_refs(value, prefix)
        moved[key] = value
    return moved


def _logit_bias(value) -> dict[int, float]:
    """OpenAI's `logit_bias`, {"token id": bias}, as {id: bias}; ids are checked against the vocabulary by
    `prompts.check_token_ids`. A bias outside -100..100 is a 400 where vLLM clamps it silently."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "logit_bias must be an object mapping token ids (as strings) to biases from -100 to 100, "
                            f"got {json.dumps(value)[:80]}", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ApiError(400, f"logit_bias has {len(value)} entries; this server accepts at most "
                            f"{MAX_LOGIT_BIAS_ENTRIES}", "logit_bias")
    bias = {}
    for key, number in value.items():
        if not re.fullmatch(r"-?[0-9]{1,20}", key):  # JSON keys are strings; vLLM reads them with int()
            raise ApiError(400, f"logit_bias keys must be token ids written as decimal integers, got "
                                f"{json.dumps(key)[:80]}", "logit_bias")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not -100 <= number <= 100:
            raise ApiError(400, f"logit_bias[{json.dumps(key)}] must be a number from -100 to 100, got "
                                f"{json.dumps(number)[:80]}", "logit_bias")
        bias[int(key)] = float(number)
    return bias


def _prompt_logprobs(body: dict) -> int | None:
    """vLLM's `prompt_logprobs` (alternatives per prompt token), refused with a stream as vLLM refuses it."""
    value = _field(body, "prompt_logprobs", (int,), None, 0, MAX_TOP_LOGPROBS)
    if value is not None and body.get("stream"):  # 0 too, as vLLM
        raise ApiError(400, "prompt_logprobs are not available with stream: true", "prompt_logprobs")
    return value


def _continuing(body: dict) -> bool:
    """vLLM's `continue_final_message`: the answer continues the final assistant message instead of following
    it; as in vLLM it needs `add_generation_prompt: false` (the two exclude each other)."""
    continuing = _field(body, "continue_final_message", (bool,), False)
    if continuing and _field(body, "add_generation_prompt", (bool,), True):
        raise ApiError(400, "continue_final_message needs add_generation_prompt: false (the answer continues the "
                            "final message rather than opening a new one)", "continue_final_message")
    return continuing


def parse_chat_request(body, settings: ServerSettings, tokenizing: bool = False) -> ChatRequest:
    """Check a /v1/chat/completions body and map it onto the chat template; raises ApiError. `tokenizing`
    (/tokenize) takes `add_generation_prompt: false` without `continue_final_message`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    # vLLM's chat fields: a BOS besides the template's
    refused = {**UNSUPPORTED_FIELDS, "best_of": (1,), "add_special_tokens": (False,)}
    del refused["tools"]  # taken here (`_tool_choice`)
    named_tool, tools_required, tool_constraint = _tool_choice(body)
    sampling = _sampling(body, settings, refused, CHAT_FIELDS, tool_constraint=tool_constraint)
    continuing = _continuing(body)
    if not continuing and not tokenizing:
        _refuse_off(body, "add_generation_prompt")  # the answer would go on with the user's turn
    logprobs = _field(body, "logprobs", (bool,), False)
    top_logprobs = _field(body, "top_logprobs", (int,), None, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:  # 0 asks for nothing: taken without logprobs, as vLLM takes it
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    system, turns, images, video = _conversation(body.get("messages"), continuing)
    if len(images) > settings.max_images:
        raise ApiError(400, f"the request has {len(images)} images; this server accepts at most "
                            f"{settings.max_images}", "messages", "too_many_images")
    turns = _label_images(turns, len(images))
    # vLLM's chat echo: the final message, where it is the answer's role (assistant), goes before each answer: its
    # own content (text parts joined by newlines; "" for null), not the turn it joins nor its tool calls' text
    echo, messages = "", body["messages"]
    final = messages[-1]
    if _field(body, "echo", (bool,), False) and final.get("role") == "assistant" and final.get("content") is not None:
        echo = _content_text(final["content"], f"messages[{len(messages) - 1}].content", "assistant", [])
    answer_start = ""
    if continuing:
        if turns[-1][0] != "assistant":
            raise ApiError(400, "continue_final_message needs a conversation that ends with an assistant message "
                                "(the answer to continue)", "messages")
        answer_start = turns.pop()[1]
    opening = [(None, turns.pop(0)[1])] if turns and turns[0][0] == "assistant" else []  # the opening answer
    history = opening + [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    # ending with an assistant message, no question: a new answer follows it, as vLLM renders the template
    question = turns[-1][1] if turns and turns[-1][0] == "user" else None
    return ChatRequest(
        question=question, history=history, system_message=system, image_urls=images, video_url=video,
        max_num=_field(body, "max_num", (int,), None, 1, settings.max_tiles),
        logprobs=(top_logprobs or 0) if logprobs else None, prompt_logprobs=_prompt_logprobs(body),
        named_tool=named_tool, tools_required=tools_required, answer_start=answer_start, echo=echo, **sampling,
    )


def _prompt_list(prompt) -> list[str | list[int]]:
    """The prompts of a /v1/completions body: a string, a list of strings, a list of token ids, or a list
    of such lists (as OpenAI and vLLM accept them)."""
    def token_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)  # not bool

    if isinstance(prompt, str) or token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(token_ids(p) for p in prompt)):  # not mixed, as vLLM
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of token "
                            "id lists (not strings and token lists mixed), none of them empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"the request has {len(prompts)} prompts; this server accepts at most {MAX_PROMPTS}",
                       "prompt")
    for i, text in enumerate(prompts):
        if text == "":
            raise ApiError(400, f"prompt[{i}] is empty", "prompt")
        if isinstance(text, str):
            _unicode(text, f"prompt[{i}]")
    return prompts


def parse_completion_request(body, settings: ServerSettings) -> CompletionRequest:
    """Check a /v1/completions body (raw text in, no chat template, as vLLM serves it); raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    echo = _field(body, "echo", (bool,), False)
    # as vLLM, max_tokens 0 echoes the prompt (with its log-probabilities) and generates nothing
    sampling = _sampling(body, settings, {**UNSUPPORTED_FIELDS, "suffix": ("",)}, COMPLETION_FIELDS,
                         lowest_max_tokens=0 if echo else 1)
    if sampling["max_tokens"] is None:  # OpenAI's and vLLM's default for text completions
        sampling["max_tokens"] = min(COMPLETION_MAX_TOKENS, settings.max_tokens)
    if _field(body, "best_of", (int,), 1) != 1:
        raise ApiError(400, "best_of other than 1 is not supported (ask for n choices instead)", "best_of")
    logprobs = _field(body, "logprobs", (int,), None, 0, MAX_TOP_LOGPROBS)
    return CompletionRequest(prompts=_prompt_list(body.get("prompt")), logprobs=logprobs, echo=echo,
                             prompt_logprobs=_prompt_logprobs(body),
                             add_special_tokens=_field(body, "add_special_tokens", (bool,), True), **sampling)


@dataclass
class TokenizeRequest:
    """A parsed /tokenize body (vLLM's): raw text as /v1/completions takes it, or a chat as
    /v1/chat/completions takes it (`chat`, its images still URLs)."""

    prompt: str | None
    chat: ChatRequest | None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # for a prompt: its BOS, as /v1/completions adds it


def parse_tokenize_request(body, settings: ServerSettings) -> TokenizeRequest:
    """Check a /tokenize body: vLLM's `prompt` (with `add_special_tokens`) or `messages` (with
    `add_generation_prompt`, `add_special_tokens`); raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise ApiError(400, "send either prompt (text, tokenized as /v1/completions tokenizes it) or messages (a "
                            "chat, as /v1/chat/completions takes it)", "prompt")
    if _field(body, "return_token_strs", (bool,), False):  # vLLM's
        raise ApiError(400, "return_token_strs is not supported by this server", "return_token_strs")
    # vLLM's add_special_tokens (the BOS of a tokenizer that has one); a chat's ids are the template's, BOS included
    add_special_tokens = _field(body, "add_special_tokens", (bool,), True)
    if body.get("prompt") is not None:  # the messages' fields are checked as a chat request's
        _refuse_unknown(body, {"model", "prompt", "messages", "add_special_tokens", "return_token_strs",
                               *IGNORED_FIELDS})
        return TokenizeRequest(_unicode(_field(body, "prompt", (str,)), "prompt"), None,
                               add_special_tokens=add_special_tokens)
    own = ("prompt", "add_special_tokens", "return_token_strs")
    chat = parse_chat_request({k: v for k, v in body.items() if k not in own}, settings, True)
    # the open answer's header stays when the final message is continued
    return TokenizeRequest(None, chat, _field(body, "add_generation_prompt", (bool,), True) or _continuing(body))


def parse_detokenize_request(body, vocab: int) -> list[int]:
    """The token ids of a /detokenize body (vLLM's `tokens`), each in 0..vocab - 1; raises ApiError."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if isinstance(body, dict):
        _refuse_unknown(body, {"model", "tokens", *IGNORED_FIELDS})
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise ApiError(400, f"tokens must be a list of token ids, got {json.dumps(tokens)[:80]}", "tokens")
    if bad := [t for t in tokens if not 0 <= t < vocab]:
        raise ApiError(400, f"tokens must be in 0..{vocab - 1}, got {bad[:5]}", "tokens")
    return tokens
