"""Function calling on the server (OpenAI `tools` with a named or "required" `tool_choice`, as vLLM serves it without
a tool parser): the answer held to the tools' schemas and returned as `tool_calls`, plain and streamed, over real
HTTP on the tiny checkpoint with the official `openai` client; the 400s; and a conversation's tool calls and tool
results read into the template's turns."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import stop, tiny_chat_folder

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import KEY, hand_prompt, launch, post_to

from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.server import ServerSettings
from internvl_mpo.server.app import ToolCalls
from internvl_mpo.server.requests import ApiError, parse_chat_request

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit", "days"],
    "additionalProperties": False}
# a $ref into its own $defs, which must still resolve once the schema sits inside the "required" list's schema
TIME = {"type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"],
        "$defs": {"Zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
         {"type": "function", "function": {"name": "ping"}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME, "ping": {"type": "object", "additionalProperties": False}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, checkpoint folder) of a running `internvl-mpo serve` subprocess on the tiny checkpoint."""
    root = tmp_path_factory.mktemp("serve")
    folder, _ = tiny_chat_folder(root / "model")
    cmd = [sys.executable, "-m", "internvl_mpo.cli", "serve", "--model", str(folder), "--served-model-name", "m",
           "--port", "0", "--api-key", KEY, "--max-batch", "4", "--max-len", "1024", "--max-tokens", "600"]
    proc, url = launch(cmd, root / "server.log")
    try:
        yield url, folder
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def local_chat(server):
    return InternVLChat.from_pretrained(server[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def closing_bias(local_chat) -> dict[str, int]:
    """A logit bias that nudges the tiny random model to close strings, objects and lists and to end its turn
    (away from escapes and whitespace); it leaves the constraint whole, so that the answers stop."""
    tokenizer = local_chat.tokenizer
    pieces = {i: tokenizer.token_bytes(i) for i in range(len(tokenizer)) if not tokenizer.is_special(i)}
    return {**{str(i): 4 for i, piece in pieces.items() if any(c in piece for c in b'}]",')},
            **{str(i): -4 for i, piece in pieces.items() if b"\\" in piece or piece.strip() == b""},
            str(tokenizer.im_end_id): 4}


def parse(**fields):
    return parse_chat_request({"messages": MESSAGES, **fields}, ServerSettings())


def streamed_calls(client, **kwargs) -> tuple[dict[int, list[dict]], dict[int, str]]:
    """Per choice, its calls as the streamed tool_calls deltas add up ({"id", "name", "arguments"} in index
    order), and its finish_reason; checks that each call's first delta names it and the later ones do not."""
    calls, finishes = {}, {}
    for chunk in client.chat.completions.create(model="m", stream=True, **kwargs):
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                made = calls.setdefault(choice.index, [])
                if delta.index == len(made):
                    assert delta.id.startswith("chatcmpl-tool-") and delta.type == "function", delta
                    made.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
                else:
                    assert delta.index == len(made) - 1 and delta.id is None and delta.function.name is None
                made[delta.index]["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return calls, finishes


def plain_calls(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]


def test_a_named_tool_choice_answers_one_call_whose_arguments_the_schema_takes(client, local_chat, closing_bias):
    """The arguments are what chat() writes held to the function's parameters; content is "" and finish_reason
    "stop" (OpenAI's and vLLM's for a named function); streamed, the deltas name the call first and then join to
    the same arguments (same seed); n 2 gives each choice its call."""
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": NAMED, "temperature": 0, "max_tokens": 300,
            "logit_bias": closing_bias}
    reply = client.chat.completions.create(model="m", **body)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == "" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    expected = local_chat.chat(MESSAGES[0]["content"], json_schema=WEATHER, do_sample=False, max_new_tokens=300,
                               logit_bias={int(k): v for k, v in closing_bias.items()})
    assert call.function.arguments.strip() == expected
    sampled = {**body, "temperature": 1.0, "seed": 11, "n": 2}
    reply = client.chat.completions.create(model="m", **sampled)
    calls, finishes = streamed_calls(client, **sampled)
    assert finishes == {0: "stop", 1: "stop"}
    for choice in reply.choices:
        assert [{**c, "id": None} for c in calls[choice.index]] == \
            [{**c, "id": None} for c in plain_calls(choice.message)]
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), WEATHER)


def test_required_answers_calls_of_the_listed_tools_each_valid(client, closing_bias):
    """tool_choice "required": one or more calls, each of a listed tool with arguments its parameters take (a $ref
    into the tool's own $defs included), finish_reason "tool_calls"; streamed the same (same seed), each call's
    name first, then its arguments in pieces; parallel_tool_calls false makes it one call."""
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "temperature": 1.0, "seed": 3,
            "max_tokens": 400, "logit_bias": closing_bias, "n": 2}
    reply = client.chat.completions.create(model="m", **body)
    calls, finishes = streamed_calls(client, **body)
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == ""
        made = plain_calls(choice.message)
        assert made and len({c["id"] for c in made}) == len(made)
        for c in made:
            jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
        assert [{**c, "id": None} for c in calls[choice.index]] == [{**c, "id": None} for c in made]
    for seed in range(3):
        reply = client.chat.completions.create(model="m", **{**body, "n": 1, "seed": seed,
                                                            "parallel_tool_calls": False})
        assert reply.choices[0].finish_reason == "tool_calls" and len(reply.choices[0].message.tool_calls) == 1


def test_the_openai_clients_pydantic_function_tool_and_parse_fill_parsed_arguments(client, closing_bias):
    """`client.chat.completions.create(tools=..., tool_choice=...)` gives arguments that validate, and the client's
    `pydantic_function_tool(Model)` with `parse()` fills each call's `parsed_arguments` with the model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=6)
        unit: Literal["celsius", "fahrenheit"]
        days: int = Field(ge=1, le=7)

    reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED,
                                           temperature=0, max_tokens=300, logit_bias=closing_bias)
    jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments), WEATHER)
    parse_reply = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    tool = openai.pydantic_function_tool(Weather)
    reply = parse_reply(model="m", messages=MESSAGES, tools=[tool], temperature=0, max_tokens=300,
                        tool_choice={"type": "function", "function": {"name": "Weather"}}, logit_bias=closing_bias)
    call = reply.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather)
    assert call.function.parsed_arguments == Weather.model_validate_json(call.function.arguments)


def test_auto_none_and_no_tool_choice_as_vllm_without_a_tool_parser(client):
    """Tools without tool_choice ask for "auto" (OpenAI's default), which needs a tool parser: a 400 saying so, as
    vLLM answers without --enable-auto-tool-choice; "none" answers with text, the tools ignored."""
    for choice in ({}, {"tool_choice": "auto"}):
        with pytest.raises(openai.BadRequestError, match='tool_choice "auto" .* needs a parser'):
            client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, max_tokens=5, **choice)
    reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                           max_tokens=5, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content


def test_tools_and_tool_choice_that_cannot_be_served_are_400s_naming_them():
    cases = [
        ({"tools": {}}, "tools", "^tools must be a list"),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}], "tool_choice": "none"}, "tools[0]",
         r"^tools\[0\] must be .*functions are the only tools"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name", "non-empty string"),
        ({"tools": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}, "tools[0].function",
         r"^tools\[0\].function.arguments is not a field this server knows"),
        ({"tools": [TOOLS[2], TOOLS[2]], "tool_choice": "required"}, "tools[1].function.name",
         '"ping" is the name of tools.0. too'),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools[0].function.strict",
         "strict must be bool"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters", "must be the JSON schema of an object"),
        ({"tools": [TOOLS[2], {"type": "function", "function": {"name": "g", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "not": {}}}}}}], "tool_choice": "required"},
         "tools[1].function.parameters", r"^tools\[1\].function.parameters: the keyword .not."),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         'names the function "nope", which is not among the tools \\("get_weather", "get_time", "ping"\\)'),
        ({"tools": TOOLS, "tool_choice": {"function": "get_weather"}}, "tool_choice", "^tool_choice must be"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "^tool_choice must be"),
        ({"tool_choice": "required"}, "tool_choice", 'tool_choice "required" needs tools'),
        ({"tool_choice": NAMED, "tools": []}, "tool_choice", "needs tools"),
        ({"tools": TOOLS}, "tool_choice", 'tool_choice "auto" \\(the default when tools are given\\)'),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
         "give tool_choice .* or response_format json_object, not both"),
        ({"tools": TOOLS, "tool_choice": NAMED, "guided_json": {"type": "object"}}, "tool_choice",
         "or guided_json, not both"),
        ({"tools": TOOLS, "tool_choice": NAMED, "min_tokens": 2}, "min_tokens", "min_tokens does not go with "
                                                                               "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls",
         "^parallel_tool_calls must be bool"),
    ]
    for fields, param, message in cases:
        with pytest.raises(ApiError, match=message) as e:
            parse(**fields)
        assert (e.value.status, e.value.param) == (400, param), fields
    # "none" ignores the tools, even one this server could not hold an answer to; an empty list has nothing to call
    assert parse(tools=[{"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "not": {}}}}}}], tool_choice="none").question
    for choice in ("auto", "required", "none", None):
        request = parse(tools=[], tool_choice=choice)
        assert request.named_tool is None and not request.tools_required and request.params.json_schema is None
    request = parse(tools=TOOLS, tool_choice=NAMED)
    assert request.named_tool == "get_weather" and request.params.json_schema is not None


def test_a_conversation_with_tool_calls_and_tool_results_is_read_as_documented(server, local_chat):
    """As a client sends them back (Instructor's retry in TOOLS mode): an assistant message with tool_calls and null
    content is its calls as the JSON list "required" answers with, after its content when it has one; a tool
    message is read as a user message (the template has no tool turn), joined with the messages beside it; the
    ids of /tokenize are those of the hand-written prompt. Malformed calls and a tool message without its
    tool_call_id are 400s naming them."""
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 2}'}}
    messages = [MESSAGES[0], {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "Sunny, 21 C."},
                {"role": "user", "content": "Thanks. And tomorrow?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [
                    {**call, "function": {"name": "ping", "arguments": "{"}}]},  # arguments cut short stay text
                {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": [{"type": "text", "text": "Rain."}]}]
    first = '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius", "days": 2}}]'
    second = 'Let me look.\n[{"name": "ping", "parameters": "{"}]'
    request = parse_chat_request({"messages": messages, "tools": TOOLS, "tool_choice": "required"}, ServerSettings())
    assert request.history == [(MESSAGES[0]["content"], first), ("Sunny, 21 C.\nThanks. And tomorrow?", second)]
    assert request.question == "Rain."
    reply = post_to(server, "/tokenize", {"messages": messages, "tools": TOOLS, "tool_choice": "required"})
    assert reply.status_code == 200, reply.text
    prompt = hand_prompt(MESSAGES[0]["content"], first, "Sunny, 21 C.\nThanks. And tomorrow?", second, "Rain.")
    assert reply.json()["tokens"] == local_chat.tokenizer.encode(prompt)
    bad = [({"role": "tool", "content": "x"}, "messages[1].tool_call_id", "tool_call_id must be a string"),
           ({"role": "tool", "tool_call_id": "1", "content": "<image>"}, "messages[1].content", "holds '<image>'"),
           ({"role": "tool", "tool_call_id": "1", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
            "messages[1].content[0]", "images are only accepted in user messages"),
           ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
            "messages[1].tool_calls[0]", r"must be \{'id': ..., 'type': 'function'"),
           ({"role": "assistant", "content": None, "tool_calls": "x"}, "messages[1].tool_calls", "must be a list"),
           ({"role": "function", "content": "x"}, "messages[1]", "role must be system, user, assistant or tool")]
    for message, param, text in bad:
        with pytest.raises(ApiError, match=text) as e:
            parse_chat_request({"messages": [MESSAGES[0], message, MESSAGES[0]]}, ServerSettings())
        assert (e.value.status, e.value.param) == (400, param)


def read_in_pieces(pieces: list[str]) -> list[tuple[str, str]]:
    """(name, arguments) of each call as the streamed deltas of a "required" answer read in `pieces` join, checking
    that each call's first delta names it and the later ones only add to its arguments."""
    calls, joined = ToolCalls(None), []
    for piece in pieces:
        for delta in calls.read(piece):
            if "id" in delta:
                assert delta["index"] == len(joined)
                joined.append([delta["function"]["name"], ""])
            else:
                assert delta["index"] == len(joined) - 1 and set(delta) == {"index", "function"}
            joined[-1][1] += delta["function"]["arguments"]
    return [tuple(call) for call in joined]


def test_streamed_tool_call_deltas_join_to_the_calls_however_the_text_is_cut():
    """ToolCalls reads a "required" answer in any pieces (escapes, brackets inside strings, scalar arguments) to the
    calls it reads whole, each call's name once its string is closed."""
    text = ('[ {"name" : "get_\\u0074ime", "parameters": {"s": "x}\\"]", "l": [1, {"z": null}]} },'
            '{"name":"ping","parameters":5 },{"name":"a","parameters":"str"}, {"name":"b","parameters":true}]')
    whole = ToolCalls(None)
    assert whole.read(text)  # a stream of one piece
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.calls] == [
        ("get_time", '{"s": "x}\\"]", "l": [1, {"z": null}]}'), ("ping", "5"), ("a", '"str"'), ("b", "true")]
    for size in (1, 2, 3, 7):
        assert read_in_pieces([text[start:start + size] for start in range(0, len(text), size)]) == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in whole.calls]
    named = ToolCalls("f")
    assert named.read("") == [{"index": 0, "id": named.calls[0]["id"], "type": "function",
                               "function": {"name": "f", "arguments": ""}}]
    assert named.read('{"a"') == [{"index": 0, "function": {"arguments": '{"a"'}}] and named.read("") == []


def test_tool_call_reader_takes_escapes_scalars_and_whitespace_split_anywhere():
    """A "required" answer's calls (name, arguments as written) from texts with escaped quotes in names and
    arguments, brackets inside strings, non-ASCII and \\u escapes in names, numbers, true, false and null as whole
    arguments (a number ended by a space, a newline or the brace), whitespace between all tokens and several calls;
    the same whichever single place the text is cut at, and character by character."""
    cases = [
        ('[{"name": "say\\"hi\\"", "parameters": {"q": "a\\"b}\\\\", "r": "]"}}]',
         [('say"hi"', '{"q": "a\\"b}\\\\", "r": "]"}')]),
        ('[{"name":"f","parameters":{"s":"{[}]","t":["]",{"u":"}"}],"v":"\\\\"}}]',
         [("f", '{"s":"{[}]","t":["]",{"u":"}"}],"v":"\\\\"}')]),
        ('[{"name":"\\u00e9t\\u00E9","parameters":{}},{"name":"日本","parameters":{"é":"😀"}},'
         '{"name":"\\ud83d\\ude00x","parameters":{}},{"name":"a\\/b\\n","parameters":{}}]',
         [("été", "{}"), ("日本", '{"é":"😀"}'), ("😀x", "{}"), ("a/b\n", "{}")]),
        ('[{"name":"n","parameters":-1.5e+3},{"name":"z","parameters":0 },{"name":"t","parameters":true},'
         '{"name":"f","parameters":false\n},{"name":"u","parameters":null},{"name":"i","parameters":12\n}]',
         [("n", "-1.5e+3"), ("z", "0"), ("t", "true"), ("f", "false"), ("u", "null"), ("i", "12")]),
        ('\n[ {\n  "name" : "f" ,\n  "parameters" :\t{ "a" : [ 1 , 2.5 ] , "b" : null }\n } ,\n'
         ' {"name":"g", "parameters": [ ]} ]',
         [("f", '{ "a" : [ 1 , 2.5 ] , "b" : null }'), ("g", "[ ]")]),
    ]
    for text, expected in cases:
        assert read_in_pieces([text]) == expected, text
        assert [(name, json.loads(arguments)) for name, arguments in expected] == \
            [(call["name"], call["parameters"]) for call in json.loads(text)]
        assert read_in_pieces(list(text)) == expected, text
        for cut in range(1, len(text)):
            assert read_in_pieces([text[:cut], text[cut:]]) == expected, (text, cut)


def test_a_named_call_s_arguments_begin_at_their_value_so_the_openai_stream_helper_parses_them():
    """The text JSON schema mode writes may begin with whitespace; a named call's arguments began with it, and the
    openai client's `beta.chat.completions.stream` (jiter's partial parse of each delta's arguments so far) failed on
    arguments of whitespace alone ("EOF while parsing a value"). They begin at the value now, as "required" ones do,
    whichever pieces the whitespace comes in; whitespace inside and after the value is kept."""
    jiter = pytest.importorskip("jiter")
    text = '\n\n \t{ "a" : [1, 2] }\n'
    for pieces in ([text], list(text), ["\n", "\n \t{", ' "a" : [1, 2] }\n']):
        named, joined = ToolCalls("f"), ""
        for piece in pieces:
            for delta in named.read(piece):
                joined += delta["function"]["arguments"]
                if joined:
                    jiter.from_json(joined.encode(), partial_mode=True)  # as the openai client reads each chunk
        assert joined == named.calls[0]["function"]["arguments"] == '{ "a" : [1, 2] }\n', pieces
    named = ToolCalls("f")
    assert [d["function"]["arguments"] for d in named.read("\n")] == [""] and named.read(" \n") == []


def test_a_tool_call_stream_sends_no_empty_delta_and_loses_no_logprobs(client, closing_bias):
    """As vLLM, a tool call stream sends no chunk whose delta is empty (the "required" list's brackets and keys) but
    each choice's last; the logprobs of the tokens behind a chunk not sent come with the next one: they join to the
    non-streamed answer's (same seed), and the last chunk's continuous usage counts every token."""
    for choice in ("required", NAMED):
        body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "temperature": 1.0, "seed": 5,
                "max_tokens": 200, "logit_bias": closing_bias, "n": 2, "logprobs": True, "top_logprobs": 2}
        reply = client.chat.completions.create(model="m", **body)
        entries: dict[int, list] = {0: [], 1: []}
        used = {}
        stream = client.chat.completions.create(
            model="m", stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **body)
        for chunk in stream:
            for c in chunk.choices:
                delta = c.delta.to_dict()
                assert delta or c.finish_reason, chunk
                if delta.get("role"):
                    continue
                entries[c.index] += [(e.token, e.logprob) for e in c.logprobs.content]
                if c.finish_reason:
                    used[c.index] = chunk.usage.completion_tokens
        for c in reply.choices:
            assert entries[c.index] == [(e.token, e.logprob) for e in c.logprobs.content], choice
        assert sum(used.values()) == reply.usage.completion_tokens


def test_required_calls_a_stop_string_cuts_finish_as_stop_not_tool_calls(client):
    """A stop string that ends a "required" answer cuts its calls (here before the list opens): the finish_reason is
    "stop" with the string as stop_reason, as for any cut, not "tool_calls" beside no calls; streamed the same."""
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "temperature": 0, "max_tokens": 50,
            "stop": ["["]}
    choice = client.chat.completions.create(model="m", **body).choices[0]
    assert (choice.finish_reason, choice.stop_reason, choice.message.tool_calls) == ("stop", "[", [])
    calls, finishes = streamed_calls(client, **body)
    assert (calls, finishes) == ({}, {0: "stop"})


def test_a_tool_s_parameters_with_a_root_id_are_served_named_and_required():
    """Parameters that begin with `$id` (as JSON Schema's examples write them) are taken for a named function and
    for "required", where they sit inside the list's schema: their $ref still points into them."""
    from internvl_mpo.generate import json_schema as js
    parameters = {"$id": "https://example.com/add.json", "type": "object", "properties": {
        "a": {"$ref": "#/$defs/n"}}, "required": ["a"], "additionalProperties": False,
        "$defs": {"n": {"type": "integer", "maximum": 9}}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": parameters}}]
    for choice, text in (({"type": "function", "function": {"name": "add"}}, '{"a": %d}'),
                         ("required", '[{"name": "add", "parameters": {"a": %d}}]')):
        schema = js.compile_schema(parse(tools=tools, tool_choice=choice).params.json_schema)
        for value, taken in ((7, True), (12, False)):  # 12: over the $ref's maximum
            state = schema.initial
            for byte in (text % value).encode():
                state = state and schema.advance(state, byte)
            assert bool(state and schema.complete(state)) == taken, (choice, value)


def test_parameters_without_a_type_hold_the_arguments_to_an_object():
    """`parameters: {}` (or properties without `type`) is an object's schema: the arguments are a JSON object, never
    another JSON value (`7`, `"x"`) that no client can call a function with; named and "required" alike."""
    from internvl_mpo.generate import json_schema as js
    for parameters in ({}, {"properties": {"x": {"type": "integer"}}}, {"description": "no arguments"}):
        tools = [{"type": "function", "function": {"name": "g", "parameters": parameters}}]
        for choice, text in (({"type": "function", "function": {"name": "g"}}, "%s"),
                             ("required", '[{"name": "g", "parameters": %s}]')):
            schema = js.compile_schema(parse(tools=tools, tool_choice=choice).params.json_schema)
            for value, taken in (("{}", True), ("7", False), ('"x"', False), ("[]", False)):
                state = schema.initial
                for byte in (text % value).encode():
                    state = state and schema.advance(state, byte)
                assert bool(state and schema.complete(state)) == taken, (parameters, choice, value)


def test_tool_call_arguments_nested_near_the_recursion_limit_are_no_500():
    """Arguments that json.loads reads just under the recursion limit but that json.dumps, writing them inside the
    calls' list, cannot: a RecursionError (a 500 on the server) before; they are taken as their text, as arguments
    that json.loads cannot read are."""
    for depth in range(sys.getrecursionlimit() - 200, sys.getrecursionlimit() + 10):
        arguments = "[" * depth + "]" * depth
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        messages = [MESSAGES[0], {"role": "assistant", "content": None, "tool_calls": [call]}, MESSAGES[0]]
        written = parse_chat_request({"messages": messages}, ServerSettings()).history[0][1]
        assert written in (f'[{{"name": "f", "parameters": {arguments.replace("][", "], [")}}}]',
                           f'[{{"name": "f", "parameters": "{arguments}"}}]'), depth


def test_image_context_token_in_tool_call_arguments_is_refused_naming_the_message():
    """The README: no message may hold <IMG_CONTEXT>, a 400 naming the message. An assistant turn's tool-call
    arguments holding it passed the request check and failed later as "the text contains <IMG_CONTEXT> 1
    time(s)", naming no message."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": "<IMG_CONTEXT>"}'}}
    messages = [MESSAGES[0], {"role": "assistant", "content": None, "tool_calls": [call]}, MESSAGES[0]]
    with pytest.raises(ApiError, match=r"^messages\[1\]\.tool_calls: the text holds the image-context token"):
        parse_chat_request({"messages": messages}, ServerSettings())
