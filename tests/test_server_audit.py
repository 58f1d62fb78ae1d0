"""Findings of a user's audit of the OpenAI-compatible server (chat), each pinned where it was fixed."""

import json

import pytest

pytest.importorskip("fastapi")

from internvl_mpo.server import ServerSettings  # noqa: E402
from internvl_mpo.server.media import image_bytes  # noqa: E402
from internvl_mpo.server.requests import ApiError, parse_chat_request  # noqa: E402


@pytest.mark.parametrize("message", ["hi", None, ["user", "hi"], 5])
def test_a_message_that_is_not_an_object_is_named_as_such(message):
    """A message sent as a bare string (or null, a list) was refused as having the role null: "messages[1]: role must
    be system, user, assistant or tool, got null", which points at a role the client never wrote."""
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}, message]}, ServerSettings())
    assert e.value.status == 400 and e.value.param == "messages[1]"
    assert e.value.message.startswith("messages[1] must be an object with a role and content, got ")


@pytest.mark.parametrize("url, words", [
    ("data:video/mp4;base64," + "AAAA" * 40, "the video is larger; videos may be at most 100 bytes"),
    ("http://example.com/clip.mp4", "remote video URLs are refused; send the video as a data: URL"),
    ("/tmp/clip.mp4", "local video files are refused; send the video as a data: URL"),
    ("ftp://example.com/clip.mp4", "videos come as data: URLs"),
])
def test_a_video_urls_errors_speak_of_a_video(url, words):
    """A video_url part's bytes are read as an image's, and their errors spoke of an image: a 20 MB clip was told
    "the image is larger; images may be at most 16777216 bytes", a clip's http URL "remote image URLs are refused".
    An image_url part's errors still speak of an image."""
    settings = ServerSettings(max_image_bytes=100)
    with pytest.raises(ApiError) as e:
        image_bytes(url, "messages[0].content[0].video_url", settings)
    assert e.value.message.startswith("messages[0].content[0].video_url: ") and words in e.value.message
    assert "image " not in e.value.message
    with pytest.raises(ApiError) as e:
        image_bytes(url, "messages[0].content[0].image_url", settings)
    assert words.replace("video", "image") in e.value.message and "video" not in e.value.message


@pytest.mark.parametrize("body, words", [
    ({"\ud800": 1}, 'unrecognized request argument supplied: "\\ud800"'),
    ({"stream": True, "stream_options": {"\ud800": True}}, "stream_options.\\ud800 is not a stream option"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "\ud800": 1}}},
     "response_format.json_schema.\\ud800 is not a field"),
    ({"tools": [{"type": "function", "function": {"name": "f", "\ud800": 1}}]},
     "tools[0].function.\\ud800 is not a field"),
])
def test_an_unknown_key_that_is_not_valid_unicode_is_a_400_that_encodes(body, words):
    """An unknown key holding a lone surrogate went into the error's message or param as it was, and rendering the
    400 failed on it (UnicodeEncodeError: the client got a 500 and the log a traceback); it is written as its escape."""
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body}, ServerSettings())
    assert e.value.status == 400 and words in e.value.message
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # what the server sends (starlette's rendering)
