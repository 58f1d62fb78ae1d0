"""Findings of a user's audit of the OpenAI-compatible server (chat), each pinned where it was fixed."""

import pytest

pytest.importorskip("fastapi")

from internvl_mpo.server import ServerSettings  # noqa: E402
from internvl_mpo.server.requests import ApiError, parse_chat_request  # noqa: E402


@pytest.mark.parametrize("message", ["hi", None, ["user", "hi"], 5])
def test_a_message_that_is_not_an_object_is_named_as_such(message):
    """A message sent as a bare string (or null, a list) was refused as having the role null: "messages[1]: role must
    be system, user, assistant or tool, got null", which points at a role the client never wrote."""
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}, message]}, ServerSettings())
    assert e.value.status == 400 and e.value.param == "messages[1]"
    assert e.value.message.startswith("messages[1] must be an object with a role and content, got ")
