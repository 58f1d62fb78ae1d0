"""JSON schema mode: the recognizer on hand-made bytes and on random values of random schemas (checked with the
jsonschema package), the masks against a token-by-token oracle, the refused keywords, and constrained generation
through the engine, the chat API and the server's request parsing."""

from __future__ import annotations

import copy
import datetime
import ipaddress
import itertools
import json
import math
import random
import re
import string
import uuid

import jsonschema
import numpy
import pytest
import torch

from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.generate import json_mode as jm
from internvl_mpo.generate import json_schema as js
from internvl_mpo.generate.engine import Request
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.server.requests import ApiError, parse_chat_request, parse_completion_request
from internvl_mpo.server.settings import ServerSettings

from conftest import tiny_chat_folder

# a realistic schema: typed fields, an enum, an optional field, an array of objects, a nullable field
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "description": "ignored"},
        "count": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", "Café 😀"]},
        "score": {"type": "number"},
        "objects": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "visible": {"type": "boolean"},
                                             "box": {"type": "array", "items": {"type": "number"}}},
            "required": ["name", "visible"], "additionalProperties": False}},
        "note": {"type": ["string", "null"]},
        "caption": {"type": "string", "minLength": 2, "maxLength": 6},
    },
    "required": ["title", "count", "kind", "objects"],
    "additionalProperties": False,
}


def refused_at(schema, data: bytes) -> int | None:
    """The index of the first byte the schema's recognizer refuses, or None."""
    state = js.compile_schema(schema).initial
    for i, byte in enumerate(data):
        state = js.compile_schema(schema).advance(state, byte)
        if state is None:
            return i
    return None


def complete(schema, data: bytes) -> bool:
    compiled = js.compile_schema(schema)
    state = compiled.initial
    for byte in data:
        state = compiled.advance(state, byte)
        if state is None:
            return False
    return compiled.complete(state)


def test_a_realistic_schema_takes_its_values_and_refuses_others_at_the_first_wrong_byte():
    value = {"title": "A \"room\"\n", "count": -3, "kind": "Café 😀", "score": 1.5e3,
             "objects": [{"name": "猫", "visible": True, "box": [1, 2.5]}, {"name": "", "visible": False}],
             "note": None, "caption": "\\😀"}
    for text in (json.dumps(value), json.dumps(value, indent=2), json.dumps(value, ensure_ascii=False),
                 json.dumps({k: v for k, v in value.items() if k not in ("score", "note")})):
        assert complete(SCHEMA, text.encode()), text
    cases = [  # (bytes, where the first wrong byte is)
        (b'{"count":1', 2),  # title is required first: "c" cannot start its key
        (b'{"title":1', 9),  # a string
        (b'{"title":"a","count":1.5', 22),  # an integer has no fraction
        (b'{"title":"a","count":1e3', 22),
        (b'{"title":"a","count":1,"kind":"cow"', 32),  # not in the enum
        (b'{"title":"a","count":1,"kind":"Caf\\u00E9 \\ud83d\\ude00","objects":[]}', None),  # any spelling of it
        (b'{"title":"a","count":1,"kind":"Caf\\u00e8', 39),
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"extra"', 50),  # no other property
        (b'{"title":"a","count":1,"kind":"cat"}', 35),  # objects is required
        (b'{"title":"a","count":1,"kind":"cat","objects":[{"visible":true', 49),  # name before visible
        (b'{"title":"a","count":1,"kind":"cat","objects":[{"name":"x","visible":true}],"title"', 77),  # order
        (b'{"title":"a","count":1,"kind":"cat","objects":[' + b'{"name":"x","visible":true},' * 3, 130),
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"note":nul', None),
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"note":t', 56),
        (b'{"title":"a","count":1,"kind":"cat","objects":[]} ', 49),  # nothing after the value
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"caption":"abcdef"}', None),
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"caption":"abcdefg', 66),  # at most 6 characters
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"caption":"a"', 61),  # at least 2
        (b'{"title":"a","count":1,"kind":"cat","objects":[],"caption":"ab",', 63),  # no property after the last
    ]
    for data, at in cases:
        assert refused_at(SCHEMA, data) == at, (data, refused_at(SCHEMA, data))


def test_string_lengths_count_code_points_as_json_loads_reads_them():
    """minLength/maxLength count characters, raw or escaped; an escaped surrogate pair is one (a lone surrogate is
    refused, as JSON mode refuses it), and a string at its maxLength may still take the low half of a pair whose
    high half it ends with."""
    short = {"type": "string", "minLength": 2, "maxLength": 3}
    for text in ('"ab"', '"abc"', '"a😀"', '"猫é"', '"a\\n"', '"\\u00e9\\u00e9\\u00e9"', '"a\\ud83d\\ude00b"',
                 '"\\ud83d\\ude00\\ud83d\\ude00"'):
        assert complete(short, text.encode()) and 2 <= len(json.loads(text)) <= 3, text
    for text in (b'"\\ud83d\\ud83d"', b'"\\ude00\\ud83d\\ude00"', b'"ab\\ud83d"', b'"\\ud83dab"'):
        assert not complete(short, text) and not complete({"type": "string"}, text), text
    assert refused_at(short, b'"a"') == 2 and refused_at(short, b'"abcd') == 4
    assert refused_at(short, "\"猫猫猫猫".encode()) == 10  # the fourth character's lead byte
    assert refused_at(short, b'"abc\\') == 4  # nothing more after three characters
    assert refused_at(short, b'"ab\\ud83d\\u0041') == 11  # only a low surrogate may follow a full string's high one
    assert complete(short, b'"ab\\ud83d\\udc00"') and refused_at(short, b'"ab\\ud83d\\udb') == 12
    assert complete({"maxLength": 0}, b'""') and refused_at({"minLength": 1}, b'""') == 1
    parts = ["a", "\\ud83d", "\\ude00", "\\n", "é", "😀", "\\u00e9"]  # every string of up to 4 of them
    for low, high in ((0, 1), (1, 2), (2, 3), (3, 3)):
        schema = {"type": "string", "minLength": low, "maxLength": high}
        for count in range(5):
            for chosen in itertools.product(parts, repeat=count):
                text = '"' + "".join(chosen) + '"'
                value = json.loads(text)
                paired = not any(0xD800 <= ord(c) <= 0xDFFF for c in value)  # json.loads keeps a lone surrogate
                assert complete(schema, text.encode()) == (paired and low <= len(value) <= high), text
    assert complete({"type": ["string", "null"], "maxLength": 1}, b"null")


def test_top_level_values_of_any_type_enums_consts_and_recursion():
    assert complete({"type": "string"}, b'"x"') and complete({"type": "integer"}, b"-12")
    assert complete({"type": "number"}, b"0.5") and not complete({"type": "number"}, b"0.")
    assert refused_at({"type": "integer"}, b"1 ") == 1  # nothing after a top-level value
    assert complete({"type": ["integer", "null"]}, b"null") and refused_at({"type": "boolean"}, b"n") == 0
    assert complete({"enum": [1.5, "a", None, [1, {"b": True}]]}, b' [1, {"b": true}]')
    assert refused_at({"enum": [1.5, [1, {"b": True}]]}, b'[1, {"b": false') == 10
    assert complete({"const": 12}, b"12") and not complete({"const": 12}, b"1")
    assert refused_at({"const": 12}, b"13") == 1
    assert complete({"enum": ["a", 2], "type": "string"}, b'"a"') and refused_at({"enum": ["a", 2],
                                                                                  "type": "string"}, b"2") == 0
    tree = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}, "$ref": "#/$defs/node"}
    assert complete(tree, b'{"v":1,"kids":[{"v":2},{"v":3,"kids":[{"v":4,"kids":[]}]}]}')
    deep = b'{"v":1,"kids":[' * (jm.MAX_DEPTH // 2) + b'{"v":1}'
    assert refused_at(tree, deep) == len(deep) - 7  # one level too deep
    linked = {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
              "required": ["next"]}
    assert complete(linked, b'{"next":{"next":null}}')
    # a $ref may point anywhere in the schema, as zod-to-json-schema's refs to a schema used before
    shared = {"type": "object", "required": ["a", "b", "c", "f"], "properties": {
        "a": {"enum": ["x", "y"]}, "b": {"$ref": "#/properties/a"}, "d/e": {"type": "boolean"},
        "c": {"anyOf": [{"type": "null"}, {"$ref": "#/properties/c/anyOf/0"}]}, "f": {"$ref": "#/properties/d~1e"}}}
    assert complete(shared, b'{"a":"x","b":"y","c":null,"f":true}') and refused_at(shared, b'{"a":"x","b":"z') == 14
    assert refused_at(shared, b'{"a":"x","b":"y","c":null,"f":1') == 30
    # RFC 6901: '~01' is the name '~1' ('~1' is unescaped before '~0'), not '/'
    tilde = {"$defs": {"~1": {"const": 1}, "/": {"const": 2}}, "$ref": "#/$defs/~01"}
    assert complete(tilde, b"1") and refused_at(tilde, b"2") == 0
    any_object = {"type": "object"}
    assert complete(any_object, b'{"x":[1,{"y":"z"}],"x":null}')
    assert complete({"type": "object", "additionalProperties": {"type": "integer"}}, b'{"a":1,"b":2}')
    assert refused_at({"type": "object", "additionalProperties": {"type": "integer"}}, b'{"a":"') == 5
    assert refused_at({"type": "object", "additionalProperties": False}, b'{"') == 1
    # an empty `properties` (a function without parameters, a Pydantic model without fields) lists no key: `{}` only
    assert complete({"type": "object", "properties": {}}, b"{}") and refused_at({"type": "object", "properties": {}},
                                                                              b'{"') == 1
    assert complete({"properties": {}, "additionalProperties": {"type": "integer"}}, b'{"a":1}')
    assert refused_at({"type": "array", "minItems": 2, "items": {"type": "integer"}}, b"[1]") == 2
    assert complete({"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                               {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}]},
                    b'{"a":"x"}')


def test_number_bounds_refuse_at_the_first_byte_no_value_in_range_begins_with():
    """minimum/maximum/exclusiveMinimum/exclusiveMaximum (numbers, draft 2020-12) are exact: a prefix is taken only
    where some value in range completes it (exponents included), a '-' begins a negative value (no -0), and every
    int or float json.dumps writes is taken exactly where jsonschema validates it."""
    age = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"]}
    assert refused_at(age, b'{"n": 6}') == 6 and complete(age, b'{"n": 5}') and refused_at(age, b'{"n": 5') is None
    assert refused_at(age, b'{"n": 50') == 7 and complete(age, b'{"n": -123}')
    assert refused_at({"type": "integer", "minimum": 0}, b"-") == 0
    assert refused_at({"type": "integer", "maximum": 9}, b"10") == 1
    assert refused_at({"type": "integer", "minimum": 0}, b"0") is None and not complete({"minimum": 1}, b"0")
    assert refused_at({"type": "integer", "minimum": 100}, b"9") is None  # 9xx
    assert refused_at({"type": "integer", "minimum": 100, "maximum": 150}, b"16") == 1
    assert refused_at({"type": "integer", "maximum": 0}, b"-0") == 1  # no -0
    positive = {"type": "number", "exclusiveMinimum": 0, "maximum": 5}
    for text in (b"0.5", b"5", b"5.000", b"5e0", b"0.5e1", b"50e-1", b"1E-300", b"4.999999"):
        assert complete(positive, text), text
    for text, at in ((b"[0]", 2), (b"[0.0e", 4), (b"[5.0001]", 7), (b"[5.0001e-1]", None), (b"[5e1", 3),
                     (b"[6]", 2), (b"[-", 1), (b"[0.5e2", 5), (b"[0.5e+2", 6), (b"[50e+", 4), (b"[50e-00", None)):
        assert refused_at({"items": positive}, text) == at, text
    assert not complete(positive, b"0") and not complete(positive, b"0.000") and not complete(positive, b"0e5")
    big = {"type": "number", "minimum": 1e21, "exclusiveMaximum": 1.5e21}
    assert complete(big, json.dumps(1e21).encode()) and complete(big, b"1400000000000000000000.5")
    assert refused_at(big, b"1.5") == 2 and refused_at(big, b"2") == 0 and refused_at(big, b"1e2") is None
    negative = {"type": "number", "minimum": -0.25, "exclusiveMaximum": 0}
    assert complete(negative, b"-0.25") and complete(negative, b"-2.5e-1") and complete(negative, b"-1e-99")
    assert refused_at({"items": negative}, b"[-0.26]") == 6 and refused_at({"items": negative}, b"[-0.0e") == 5
    assert not complete(negative, b"-0") and not complete(negative, b"-0.0")
    assert refused_at(negative, b"0") == 0 and refused_at(negative, b"-1") is None  # -1e-1
    # as a double reads the digits: 1e-400 is 0.0, and 4.99999999999999999 is 5.0
    assert refused_at({"items": positive}, b"[1e-400]") == 6 and complete(positive, b"5e-324")
    assert refused_at({"items": {"exclusiveMaximum": 5}}, b"[4.99999999999999999]") == 20
    assert complete({"exclusiveMaximum": 5}, b"4.9999999999999991")
    assert refused_at({"minimum": 0}, b"-") == 0 and refused_at({"maximum": 0}, b"1") == 0  # no -1e-400 (-0.0)
    tenth = {"items": {"minimum": 0.1, "maximum": 0.1}}  # the digits json.dumps writes for the double 0.1
    assert complete(tenth, b"[0.1, 1e-1, 0.10000000000000000555]") and refused_at(tenth, b"[0.1000000000000001") == 18
    rng = random.Random(3)
    for _ in range(300):
        schema = random_bounds(rng, rng.choice(["integer", "number"]))
        checker = jsonschema.Draft202012Validator(schema)
        low = schema.get("minimum", schema.get("exclusiveMinimum", -100))
        values = [random_in_bounds(rng, schema) for _ in range(3)] + [rng.choice([-1, 1]) * rng.randrange(10**6)]
        values += [low, low - 1, low + 0.5, -low, low * 10, rng.uniform(-200, 200), 1e22, -3e-7, 0]
        for value in values:
            text = json.dumps(value).encode()
            written = schema["type"] == "number" or isinstance(value, int)  # an integer has no fraction or exponent
            assert complete(schema, text) == (written and checker.is_valid(value)), (schema, value)


def validator(schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def random_formatted(rng: random.Random, name: str) -> str:
    """A random string of the format, as Python's isoformat() and str(UUID) write them."""
    moment = datetime.datetime(1, 1, 1) + datetime.timedelta(seconds=rng.randrange(315 * 10**9),
                                                             microseconds=rng.choice([0, rng.randrange(10**6)]))
    moment = moment.replace(tzinfo=datetime.timezone(datetime.timedelta(minutes=rng.randrange(-1439, 1440))))
    if name == "uuid":
        text = str(uuid.UUID(int=rng.getrandbits(128)))
        return text.upper() if rng.random() < 0.3 else text
    text = {"date": moment.date().isoformat(), "time": moment.timetz().isoformat(), "date-time": moment.isoformat()}
    return text[name].replace("+00:00", "Z") if rng.random() < 0.5 else text[name]


def test_excluded_number_bounds_hit_exactly_by_mantissa_and_exponent():
    """An excluded bound that the digits times a power of ten meet exactly: below an exclusiveMaximum the digits
    that equal it go on with a negative exponent (10000000000000001e-1 is within 1e16+2), and above an
    exclusiveMinimum the exponent that lands on it is refused (45035996273704965e-1 reads as the double 2**52)."""
    below = {"type": "number", "exclusiveMaximum": 10**16 + 2}
    assert refused_at(below, b"10000000000000001e-1") is None and complete(below, b"10000000000000001e-1")
    above = {"type": "number", "exclusiveMinimum": 2**52}
    assert json.loads("45035996273704965e-1") == 2**52 and not complete(above, b"45035996273704965e-1")
    assert json.loads("45035996273704966e-1") > 2**52 and complete(above, b"45035996273704966e-1")

def test_formats_take_rfc3339_dates_and_times_and_uuids_only():
    """format date (real month lengths, February 29 in leap years only), time and date-time (RFC 3339: T, seconds,
    a fraction of up to 9 digits, Z or an offset) and uuid: each byte is refused where no string of the format
    begins with the content so far; what completes, the format checker of jsonschema takes."""
    def refused(name: str, text: bytes):
        return refused_at({"type": "string", "format": name}, text)

    for name, text, at in [
        ("date", b'"2024-02-29"', None), ("date", b'"2023-02-29"', 10), ("date", b'"2024-02-30"', 9),
        ("date", b'"2024-04-31', 10), ("date", b'"2024-13', 7), ("date", b'"2024-00', 7), ("date", b'"0000', 4),
        ("date", b'"2024-1-', 7), ("date", b'"2024-01-01T', 11), ("date", b'"\\u0032', 1), ("date", b'"2024-01-0"', 10),
        ("time", b'"23:59:59.123456789+14:00"', None), ("time", b'"24', 2), ("time", b'"23:60', 4),
        ("time", b'"23:59:60', 7), ("time", b'"12:00:00"', 9), ("time", b'"12:00:00.+', 10), ("time", b'"12:00:00z', 9),
        ("time", b'"12:00:00.1234567890', 19), ("time", b'"12:00:00+24', 11), ("time", b'"12:00:00+05:60', 13),
        ("date-time", b'"1999-12-31T23:59:59Z"', None), ("date-time", b'"2024-01-01 12', 11),
        ("date-time", b'"2024-01-01t', 11), ("date-time", b'"2024-01-01T12:00:00.5-00:00"', None),
        ("uuid", b'"123e4567-E89B-12d3-a456-426614174000"', None), ("uuid", b'"123e4567e', 9), ("uuid", b'"123g', 4),
        ("uuid", b'"123e4567-e89b-12d3-a456-4266141740000', 37),
    ]:
        assert refused(name, text) == at, (name, text)
    rng = random.Random(5)
    for name in js.FORMATS:
        schema = {"type": "object", "properties": {"at": {"type": "string", "format": name}}, "required": ["at"]}
        checker = validator(schema)
        for _ in range(60):
            value = {"at": random_formatted(rng, name)}
            assert checker.is_valid(value) and complete(schema, json.dumps(value).encode()), value
            data = json.dumps(value).encode()
            for _ in range(10):  # single-byte changes: taken whole only where the format checker takes them
                at = rng.randrange(7, len(data) - 2)
                changed = data[:at] + bytes([rng.choice(b"0123456789:-.+TZtzabcdefG ")]) + data[at + rng.randrange(2):]
                if complete(schema, changed):
                    assert checker.is_valid(json.loads(changed)), changed
    assert complete({"format": "uuid"}, b'"00000000-0000-0000-0000-000000000000"')  # a string without type


ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-")


def hostname_ok(text: str) -> bool:
    """RFC 1123 host names, by hand: dot-separated labels of 1 to 63 ASCII letters, digits and hyphens, not beginning
    or ending with a hyphen, 253 characters in all."""
    return len(text) <= 253 and all(
        1 <= len(label) <= 63 and label[0] != "-" and label[-1] != "-" and
        all(c.isascii() and (c.isalnum() or c == "-") for c in label) for label in text.split("."))


def email_ok(text: str) -> bool:
    """By hand: RFC 5322's dot-atom of at most 32 characters (dots aside), '@' and a host name of two labels or more
    whose last begins with a letter (254 characters in all)."""
    local, at, domain = text.rpartition("@")
    return bool(at) and len(text) <= 254 and all(part and set(part) <= ATEXT for part in local.split(".")) and \
        len(local.replace(".", "")) <= 32 and hostname_ok(domain) and "." in domain and \
        domain.rsplit(".", 1)[1][:1].isalpha()


def duration_ok(text: str) -> bool:
    """RFC 3339 appendix A's durations, by hand: P, then units of digits each, Y M D in order without a gap and/or T
    and H M S likewise, or weeks alone."""
    def units(part: str):
        found = []
        while part:
            digits = len(part) - len(part.lstrip("0123456789"))
            if not 0 < digits < len(part):
                return None
            found.append(part[digits])
            part = part[digits + 1:]
        return "".join(found)

    if not text.startswith("P"):
        return False
    date, t, time = text[1:].partition("T")
    date, time = units(date), units(time)
    if date == "W" and not t:
        return True
    return date is not None and time is not None and bool(date or time) and (not t or bool(time)) and \
        date in "YMD" and time in "HMS"


def ip_ok(version: int, text: str) -> bool:
    try:
        (ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address)(text)
    except ValueError:
        return False
    return "%" not in text  # a zone id: Python takes it, this mode does not write one


FORMAT_ORACLES = {"email": email_ok, "hostname": hostname_ok, "ipv4": lambda text: ip_ok(4, text),
                  "ipv6": lambda text: ip_ok(6, text), "duration": duration_ok}


def random_label(rng: random.Random) -> str:
    inner = "".join(rng.choice(string.ascii_letters + string.digits + "-") for _ in range(rng.choice([0, 1, 3, 61])))
    return rng.choice(string.ascii_letters + string.digits) + (inner + rng.choice("a7Z") if rng.random() < 0.8 else "")


def random_of_format(rng: random.Random, name: str) -> str:
    """A random string of the format, made without its regex."""
    if name in ("uri", "uri-reference"):
        return random_uri(rng, reference=name == "uri-reference")
    if name == "uri-template":
        return random_uri_template(rng)
    if name.endswith("json-pointer"):
        pointer = "".join("/" + "".join(rng.choice(["a", "~0", "~1", " ", "0", "-", "'", "%"])
                                        for _ in range(rng.randrange(4))) for _ in range(rng.randrange(4)))
        return pointer if name == "json-pointer" else str(rng.choice([0, 1, 12, 300])) + rng.choice(["#", pointer])
    if name == "hostname":
        text = ".".join(random_label(rng) for _ in range(rng.randrange(1, 5)))
        return text if len(text) <= 253 else "x.y"
    if name == "email":
        local = ".".join("".join(rng.choice(sorted(ATEXT)) for _ in range(rng.randrange(1, 6)))
                         for _ in range(rng.randrange(1, 3)))
        domain = [random_label(rng) for _ in range(rng.randrange(1, 4))] + [rng.choice(string.ascii_letters) +
                                                                          random_label(rng)[1:]]
        return local + "@" + ".".join(domain)
    if name == "ipv4":
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    if name == "ipv6":
        value = ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 0, 64, 100, 128]))
        text = rng.choice([str(value), value.exploded, f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}",
                           value.exploded[:30] + str(ipaddress.IPv4Address(rng.getrandbits(32)))])
        return text.upper() if rng.random() < 0.3 else text
    number = lambda: str(rng.choice([0, 1, 12, rng.randrange(10**6)]))  # noqa: E731
    if rng.random() < 0.1:
        return "P" + number() + "W"
    date = "YMD"[rng.randrange(3):][:rng.randrange(4)]
    time = "HMS"[rng.randrange(3):][:rng.randrange(0 if date else 1, 4)]
    return "P" + "".join(number() + u for u in date) + ("T" + "".join(number() + u for u in time) if time else "")


URI_PLAIN = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=")  # unreserved and sub-delims
URI_PARTS = re.compile(r"(([^:/?#]+):)?(//([^/?#]*))?([^?#]*)(\?([^#]*))?(#(.*))?")  # RFC 3986's appendix B
HEX = frozenset(string.hexdigits)


def uri_chars(text: str, extra: str) -> bool:
    """Whether `text` holds only unreserved characters, sub-delims, characters of `extra` and %HH escapes."""
    first, *escaped = text.split("%")
    return set(first) <= URI_PLAIN | set(extra) and \
        all(len(part) >= 2 and set(part[:2]) <= HEX and set(part[2:]) <= URI_PLAIN | set(extra) for part in escaped)


def authority_ok(authority: str) -> bool:
    """RFC 3986's authority, by hand: [userinfo@]host[:port], the host an IP literal ([IPv6] as ipaddress takes it,
    without a zone, or [vX.IPvFuture]) or a reg-name."""
    userinfo, at, rest = authority.rpartition("@")
    if at and not uri_chars(userinfo, ":"):
        return False
    if rest.startswith("["):
        literal, bracket, port = rest[1:].partition("]")
        if not bracket:
            return False
        if literal[:1] in ("v", "V"):
            version, dot, text = literal[1:].partition(".")
            ok = bool(version and set(version) <= HEX and dot and text and set(text) <= URI_PLAIN | {":"})
        else:
            try:
                ok = bool(ipaddress.IPv6Address(literal)) and "%" not in literal
            except ValueError:
                ok = False
    else:
        host = rest.partition(":")[0]
        port = rest[len(host):]
        ok = uri_chars(host, "")
    return ok and (not port or port[0] == ":" and set(port[1:]) <= set(string.digits))


def uri_ok(text: str, reference: bool = False) -> bool:
    """RFC 3986's URI (or URI-reference), by hand: the components of its appendix B, each checked for its characters,
    the scheme's form, and the path's rules beside an authority (empty or absolute) and in a relative reference (no
    ':' in its first segment); ASCII only."""
    if not text.isascii():
        return False
    scheme, authority, path, query, fragment = URI_PARTS.fullmatch(text).group(2, 4, 5, 7, 9)
    if scheme is None and not reference or scheme is not None and not (
            scheme[0].isalpha() and set(scheme) <= set(string.ascii_letters + string.digits + "+-.")):
        return False
    if authority is not None and (not authority_ok(authority) or path and path[0] != "/"):
        return False
    if authority is None and scheme is None and ":" in path.split("/")[0]:
        return False
    return all(uri_chars(segment, ":@") for segment in path.split("/")) and \
        all(part is None or uri_chars(part, ":@/?") for part in (query, fragment))


URI_TEMPLATE_LITERALS = frozenset(map(chr, [0x21, 0x23, 0x24, 0x26, *range(0x28, 0x3C), 0x3D, *range(0x3F, 0x5C), 0x5D,
                                            0x5F, *range(0x61, 0x7B), 0x7E]))


def uri_template_ok(text: str) -> bool:
    """RFC 6570's URI templates (ASCII literals), by hand: literals and %HH, and expressions {[operator]varspec,...},
    a varspec a varname (varchars, %HH, inner single dots) with an optional :max-length (1 to 9999) or *."""
    while text:
        if text[0] == "{":
            inside, brace, text = text[1:].partition("}")
            if not brace:
                return False
            for spec in (inside[1:] if inside[:1] and inside[0] in "+#./;?&=,!@|" else inside).split(","):
                name, colon, length = spec.partition(":")
                name = name[:-1] if not colon and name.endswith("*") else name
                if colon and not (length.isascii() and length.isdigit() and length[0] != "0" and len(length) <= 4):
                    return False
                if not all(label and uri_chars(label, "") and not set(label) & set("-~!$&'()*+,;=")
                           for label in name.split(".")):
                    return False
        elif text[0] == "%":
            if len(text) < 3 or not set(text[1:3]) <= HEX:
                return False
            text = text[3:]
        elif text[0] in URI_TEMPLATE_LITERALS:
            text = text[1:]
        else:
            return False
    return True


NON_ASCII_SPACES = "\u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(map(chr, range(0x2000, 0x200B)))


def json_pointer_ok(text: str) -> bool:
    """RFC 6901's JSON pointers, by hand ('/'-led reference tokens, '~' only in ~0 and ~1), whose characters JSON
    writes without an escape and which hold no non-ASCII space (ECMA-262's white space and line terminators)."""
    return (text == "" or text[0] == "/") and "~" not in text.replace("~0", "").replace("~1", "") and \
        json.dumps(text, ensure_ascii=False)[1:-1] == text and not set(text) & set(NON_ASCII_SPACES)


def relative_json_pointer_ok(text: str) -> bool:
    """draft-handrews-relative-json-pointer-01, by hand: a whole number without leading zeros, then '#' or a JSON
    pointer."""
    digits = len(text) - len(text.lstrip(string.digits))
    return digits > 0 and (text[0] != "0" or digits == 1) and (text[digits:] == "#" or json_pointer_ok(text[digits:]))


URI_ORACLES = {"uri": uri_ok, "uri-reference": lambda text: uri_ok(text, reference=True),
               "uri-template": uri_template_ok, "json-pointer": json_pointer_ok,
               "relative-json-pointer": relative_json_pointer_ok}
URI_CHARACTERS = string.ascii_letters + string.digits + "-._~!$&'()*+,;="


def random_uri_part(rng: random.Random, characters: str) -> str:
    return "".join("%" + "".join(rng.choice(string.hexdigits) for _ in range(2)) if rng.random() < 0.1 else
                   rng.choice(characters) for _ in range(rng.choice([0, 1, 3, 8])))


def random_uri(rng: random.Random, reference: bool = False) -> str:
    """A random URI (or URI reference, half of them relative), made without the format's regex: an authority and
    its path (a reg-name, IPv4, [IPv6] or [vX.future] host), an absolute, rootless or empty path, a query and a
    fragment."""
    scheme = "" if reference and rng.random() < 0.5 else rng.choice(["http", "https", "ftp", "urn", "a+b.c-d", "H1"])
    form = rng.randrange(4)
    if form == 0:
        userinfo = random_uri_part(rng, URI_CHARACTERS + ":") + "@" if rng.random() < 0.2 else ""
        host = rng.choice([lambda: random_uri_part(rng, URI_CHARACTERS), lambda: "example.com",
                           lambda: str(ipaddress.IPv4Address(rng.getrandbits(32))),
                           lambda: f"[{ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 64, 120]))}]",
                           lambda: "[v1F." + "".join(rng.choice(URI_CHARACTERS + ":") for _ in range(3)) + "]"])()
        port = ":" + rng.choice(["", "0", "80", "65536"]) if rng.random() < 0.3 else ""
        path = "//" + userinfo + host + port + "".join("/" + random_uri_part(rng, URI_CHARACTERS + ":@")
                                                       for _ in range(rng.randrange(3)))
    elif form == 3:
        path = ""
    else:  # absolute or rootless: a first segment (without ':' in a relative reference), and others
        first = rng.choice(URI_CHARACTERS) + random_uri_part(rng, URI_CHARACTERS + "@" + ":" * bool(scheme))
        path = "/" * (form == 1) + first + "".join("/" + random_uri_part(rng, URI_CHARACTERS + ":@")
                                                   for _ in range(rng.randrange(3)))
    query = "?" + random_uri_part(rng, URI_CHARACTERS + ":@/?") if rng.random() < 0.3 else ""
    fragment = "#" + random_uri_part(rng, URI_CHARACTERS + ":@/?") if rng.random() < 0.3 else ""
    return (scheme and scheme + ":") + path + query + fragment


def random_uri_template(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(5)):
        if rng.random() < 0.4:
            specs = [rng.choice(["x", "var", "a.b", "a%20b", "_1"]) + rng.choice(["", "*", ":3", ":9999"])
                     for _ in range(rng.randrange(1, 3))]
            parts.append("{" + rng.choice(["", *"+#./;?&=,!@|"]) + ",".join(specs) + "}")
        else:
            parts.append(rng.choice(["http://example.com/", "/a", "~", "%2F", "!", "[x]", "_"]))
    return "".join(parts)


def test_formats_email_hostname_ipv4_ipv6_duration_take_exactly_what_independent_validators_take():
    """The regex formats against validators that do not use their regexes (ipaddress for addresses, hand-written
    ones for the rest): random strings of each format are taken, single-byte changes of them are taken exactly where
    the validator takes them (written without escapes), random walks validate, and jsonschema's format checker takes
    what it checks (email, ipv4, ipv6)."""
    for name, text, at in [
        ("email", b'"a.b-c+d@example.com"', None), ("email", b'"a..b', 3), ("email", b'".a', 1),
        ("email", b'"a@', None),
        ("email", b'"a@-', 3), ("email", b'"a@b"', 4), ("email", b'"a@b.', None), ("email", b'"a@b."', 5),
        ("email", b'"a@b.c"', None), ("email", b'"a@b.1.c"', None), ("email", b'"a@b.1"', 6),
        ("email", b'"' + b"a." * 31 + b'a@b.c"', None), ("email", b'"' + b"a" * 32 + b"a", 33),
        ("email", b'"\\u0061@b"', 1), ("email", b'"a b', 2), ("email", b'"a@b@', 4), ("email", b'"a@b_', 4),
        ("hostname", b'"a-b.c"', None), ("hostname", b'"a-.', 3), ("hostname", b'"-', 1), ("hostname", b'"a..', 3),
        ("hostname", b'"' + b"a" * 63 + b'"', None), ("hostname", b'"' + b"a" * 64, 64),
        ("hostname", b'"' + b"a." * 126 + b'a"', None), ("hostname", b'"' + b"a." * 126 + b"ab", 254),
        ("hostname", b'"xn--bcher-kva.example"', None), ("hostname", "\"é".encode(), 1),
        ("ipv4", b'"255.255.255.255"', None), ("ipv4", b'"256', 3), ("ipv4", b'"01', 2), ("ipv4", b'"1.2.3"', 6),
        ("ipv4", b'"1.2.3.4.', 8), ("ipv4", b'"0.0.0.0"', None),
        ("ipv6", b'"::"', None), ("ipv6", b'"::1"', None), ("ipv6", b'"1:2:3:4:5:6:7::"', None),
        ("ipv6", b'"1::2::', 6), ("ipv6", b'"12345', 5), ("ipv6", b'"::ffff:1.2.3.04', 15),
        ("ipv6", b'"1:2:3:4:5:6:7:8:', 16), ("ipv6", b'"1:2:3:4:5:6:1.2.3.4"', None), ("ipv6", b'"::1%', 4),
        ("ipv6", b'"1:2:3:4:5:6:7:1.', 16), ("ipv6", b'"1.2', 2), ("ipv6", b'"FE80::a"', None),
        ("duration", b'"P1Y2M3DT4H5M6S"', None), ("duration", b'"P4W"', None), ("duration", b'"P1W2', 4),
        ("duration", b'"PT"', 3), ("duration", b'"P"', 2), ("duration", b'"P1Y2D', 5), ("duration", b'"PT1H2S', 6),
        ("duration", b'"P1DT2M"', None), ("duration", b'"P1.5', 3), ("duration", b'"p', 1),
        ("duration", b'"PT1S"', None),
    ]:
        assert refused_at({"type": "string", "format": name}, text) == at, (name, text)
        if at is None and text.endswith(b'"'):
            assert FORMAT_ORACLES[name](json.loads(text)), text
    changes = b"0123456789abcdefABCDEF.:-@_PTYMDHSW%\\\" \xc3\xa9"
    alphabet = bytes(sorted(set(b'[],"0123456789abcdefABCDEF.:-@PTYMDHSW!#$%&*+/=?^_`{|}~')))
    assert_formats_exact(random.Random(11), FORMAT_ORACLES, changes, alphabet)


def assert_formats_exact(rng: random.Random, oracles: dict, changes: bytes, alphabet: bytes,
                         checked: bool = True) -> None:
    """Per format of `oracles` (its validator): random strings of it are taken, single-byte changes of them (bytes of
    `changes`) are taken exactly where the validator takes them (written without escapes), and random walks (bytes of
    `alphabet`) validate, also with jsonschema's format checker where `checked`."""
    for name, ok in oracles.items():
        schema = {"type": "array", "items": {"type": "string", "format": name}}
        checker, compiled = validator(schema if checked else {}), js.compile_schema(schema)
        for _ in range(150):
            value = random_of_format(rng, name)
            assert ok(value) and complete(schema, json.dumps([value]).encode()), (name, value)
            data = json.dumps(value).encode()
            for _ in range(6):  # a byte changed, inserted or dropped
                at = rng.randrange(1, max(len(data) - 1, 2))
                changed = data[:at] + bytes([rng.choice(changes)]) * rng.randrange(2) + data[at + rng.randrange(2):]
                try:
                    text = json.loads(changed)
                except ValueError:
                    text = None
                expected = isinstance(text, str) and json.dumps(text, ensure_ascii=False).encode() == changed and \
                    ok(text)
                assert complete(schema, b"[" + changed + b"]") == expected, (name, changed)
                if expected:
                    assert checker.is_valid([text]), (name, text)
        walked = 0
        for _ in range(60):
            walk = random_walk(rng, compiled, alphabet)
            if walk is not None:
                values = json.loads(walk)
                walked += bool(values)
                assert all(ok(v) for v in values) and checker.is_valid(values), (name, walk)
        assert walked > 20, name


def test_formats_uri_uri_reference_uri_template_and_json_pointers_take_exactly_what_the_rfcs_take():
    """uri and uri-reference (RFC 3986, ASCII), uri-template (RFC 6570, ASCII literals), json-pointer (RFC 6901) and
    relative-json-pointer against validators written from the RFCs' grammars (appendix B's split, then each part's
    characters): strings refused at their first wrong byte, random strings and changes of them taken exactly where
    the validators take them, random walks valid; beside minLength/maxLength, walks of the lengths, no dead end."""
    for name, text, at in [
        ("uri", b'"https://user:pw@example.com:8080/a/b%20c?q=1&r=/x?#frag/?"', None), ("uri", b'"a:"', None),
        ("uri", b'"urn:isbn:0451450523"', None), ("uri", b'"file:///etc/x"', None),
        ("uri", b'"http://[::1]:80/"', None),
        ("uri", b'"http://[v7.a:b]"', None), ("uri", b'"http://1.2.3.999/"', None),  # a reg-name, as RFC 3986 reads
        ("uri", b'"1a', 1), ("uri", b'"a"', 2), ("uri", b'"/a', 1), ("uri", b'"a b', 2), ("uri", b'"a:b c', 4),
        ("uri", b'"a:%zz', 4), ("uri", b'"http://a/b#c#', 13), ("uri", b'"http://[1::2::', 14),
        ("uri", b'"http://a:8o/', 12), ("uri", b'"http://a:8o@b"', None), ("uri", b'"http://[::1]x', 13),
        ("uri", b'"a:\\', 3), ("uri", '"a:é'.encode(), 3),
        ("uri-reference", b'""', None), ("uri-reference", b'"//host"', None), ("uri-reference", b'"../a?b"', None),
        ("uri-reference", b'"#f"', None), ("uri-reference", b'"a/b:c"', None), ("uri-reference", b'"1a:', 3),
        ("uri-template", b'"http://example.com/{user}/{+path*}{?q,lang:2}"', None), ("uri-template", b'"{}', 2),
        ("uri-template", b'"{a:0', 4), ("uri-template", b'"{a:10000', 8), ("uri-template", b'"a b', 2),
        ("uri-template", b'"{a..b', 4), ("uri-template", b'"}', 1), ("uri-template", b'"{a"', 3),
        ("json-pointer", b'""', None), ("json-pointer", b'"/a~1b/~0/"', None),
        ("json-pointer", '"/café 1"'.encode(), None), ("json-pointer", b'"a', 1), ("json-pointer", b'"/~2', 3),
        ("json-pointer", b'"/a~"', 4), ("json-pointer", b'"/\\u0041', 2),
        ("relative-json-pointer", b'"0#"', None), ("relative-json-pointer", b'"12/a"', None),
        ("relative-json-pointer", b'"0"', None), ("relative-json-pointer", b'"01', 2),
        ("relative-json-pointer", b'"#', 1), ("relative-json-pointer", b'"1#/', 3),
        ("relative-json-pointer", b'"-1', 1), ("relative-json-pointer", b'""', 1),
    ]:
        assert refused_at({"type": "string", "format": name}, text) == at, (name, text)
        if at is None and text.endswith(b'"'):
            assert URI_ORACLES[name](json.loads(text)), text
    changes = b"0123456789abfAFvx.:-@_%/?#[]{}~!$&'()*+,;= \\\"<>|^`\xc3\xa9"
    alphabet = bytes(sorted(set(b'[],"0123456789abfAFvx.:-@_~!$&\'()*+,;=/?#%{}| \xc3\xa9')))
    # jsonschema's relative-json-pointer checker (there when the jsonpointer package is) refuses a 0 after a digit
    # ("100#"), which the draft takes: the relative pointers are checked by the test's own validator alone
    relative = URI_ORACLES["relative-json-pointer"]
    assert relative("100#") and refused_at({"type": "string", "format": "relative-json-pointer"}, b'"100#"') is None
    checked = {name: ok for name, ok in URI_ORACLES.items() if ok is not relative}
    assert_formats_exact(random.Random(12), checked, changes, alphabet)
    assert_formats_exact(random.Random(12), {"relative-json-pointer": relative}, changes, alphabet, checked=False)
    rng = random.Random(13)
    for name, ok in URI_ORACLES.items():
        compiled = js.compile_schema({"type": "string", "format": name, "minLength": 6, "maxLength": 12})
        walks = [json.loads(walk) for walk in (random_walk(rng, compiled, alphabet) for _ in range(30)) if walk]
        assert len(walks) > 10 and all(ok(text) and 6 <= len(text) <= 12 for text in walks), (name, walks)
    assert refused_at({"format": "uri", "maxLength": 3}, b'"ab:c') == 4
    assert refused_at({"format": "uri", "minLength": 5}, b'"ab:c"') == 5 and complete({"format": "uri"}, b'"ab:c"')
    with pytest.raises(js.SchemaError, match="^no string of the format relative-json-pointer at # has a length"):
        js.compile_schema({"type": "string", "format": "relative-json-pointer", "maxLength": 0})


def test_pydantic_urls_compile_and_take_what_pydantic_writes():
    """AnyUrl and HttpUrl (format uri, HttpUrl's with minLength 1 and maxLength 2083): the schema compiles and takes
    the URLs Pydantic dumps, which it reads back. The format holds an answer to RFC 3986's URIs, all that the schema
    says: HttpUrl's own validator (http and https only, a host, WHATWG's rules) refuses some of them."""
    pytest.importorskip("pydantic")
    from pydantic import AnyUrl, BaseModel, HttpUrl, ValidationError

    class Links(BaseModel):
        page: HttpUrl
        source: AnyUrl
        refs: list[HttpUrl] = []

    schema = Links.model_json_schema()
    assert schema["properties"]["page"]["format"] == "uri" and schema["properties"]["page"]["maxLength"] == 2083
    values = [Links(page="https://example.com/a/b?q=1&r=%20#top", source="urn:isbn:0451450523",
                    refs=["http://[::1]:8080/x", "https://user:pw@example.org:8443"]),
              Links(page="http://1.2.3.4", source="mailto:a@b.c"), Links(page="https://a.b/é", source="file:///x")]
    for value in values:
        for text in (value.model_dump_json(), value.model_dump_json(indent=2)):
            assert complete(schema, text.encode()) and Links.model_validate_json(text) == value, text
    for url in ("ftp://a", "https://"):  # URIs that HttpUrl refuses
        text = json.dumps({"page": url, "source": "a:"})
        assert complete(schema, text.encode()) and uri_ok(url)
        with pytest.raises(ValidationError):
            Links.model_validate_json(text)
    assert refused_at(schema, b'{"page":"example.com"') == 20 and refused_at(schema, b'{"page":""') == 9
    rng, compiled = random.Random(3), js.compile_schema(schema)
    alphabet = bytes(sorted(set(b'{}[],:"/0129?#%@-_~!$&\'()*+;=') | set(compiled.canonical.encode())))
    walks = [json.loads(walk) for walk in (random_walk(rng, compiled, alphabet) for _ in range(40)) if walk]
    checker = validator(schema)
    assert len(walks) > 10 and all(checker.is_valid(value) and uri_ok(value["page"]) and uri_ok(value["source"]) and
                                   all(map(uri_ok, value.get("refs", []))) for value in walks), walks


def test_multiple_of_holds_integers_to_multiples_within_their_bounds_without_dead_ends():
    """An integer's multipleOf, alone and with minimum/maximum: every text of up to 3 characters of '-0123456789' and
    every integer from -300 to 300 is taken whole exactly where it is an integer within the bounds and a multiple
    (brute force); with both bounds, a text is taken as a beginning exactly where such an integer begins with it;
    random walks of arrays of them end in valid values, never in a dead end."""
    for multiple in (2, 3, 7, 10, 25):
        for low, high in [(None, None), (-40, None), (None, 35), (-23, 47), (5, 95), (-90, -11), (0, 0), (101, 130)]:
            schema = {"type": "integer", "multipleOf": multiple}
            schema.update({key: bound for key, bound in (("minimum", low), ("maximum", high)) if bound is not None})
            compiled = js.compile_schema(schema)

            def valid(text: str) -> bool:
                return bool(re.fullmatch("-?(0|[1-9][0-9]*)", text)) and text != "-0" and int(text) % multiple == 0 \
                    and (low is None or int(text) >= low) and (high is None or int(text) <= high)

            states = {"": compiled.initial}
            for chars in (chars for size in (1, 2, 3) for chars in itertools.product("-0123456789", repeat=size)):
                text = "".join(chars)
                before = states.get(text[:-1])
                states[text] = None if before is None else compiled.advance(before, ord(text[-1]))
            beginnings = {str(v)[:k] for v in range(-300, 301) if valid(str(v)) for k in range(5)} \
                if low is not None and high is not None else None
            for text, state in states.items():
                assert (state is not None and compiled.complete(state)) == valid(text), (schema, text)
                if beginnings is not None:
                    assert (state is not None) == (text in beginnings), (schema, text)
            for value in range(-300, 301):
                assert complete(schema, str(value).encode()) == valid(str(value)), (schema, value)
    assert complete({"multipleOf": 4}, b"-8") and not complete({"multipleOf": 4}, b"8.0")  # an integer without type
    assert not complete({"multipleOf": 4}, b'"8"') and refused_at({"multipleOf": 4}, b"6") is None
    big = {"type": "integer", "multipleOf": 7, "minimum": 10**20, "maximum": 10**20 + 10}
    assert [v for v in range(10**20, 10**20 + 11) if complete(big, str(v).encode())] == [10**20 + 5]
    assert refused_at(big, b"100000000000000000004") == 20 and refused_at(big, b"100000000000000000005") is None
    rng = random.Random(4)
    for schema in ({"type": "array", "items": {"type": "integer", "multipleOf": 7, "minimum": -100}},
                   {"type": "array", "items": {"type": ["integer", "null"], "multipleOf": 12, "exclusiveMaximum": 50}}):
        compiled, checker = js.compile_schema(schema), validator(schema)
        walks = [json.loads(walk) for walk in (random_walk(rng, compiled, b"[],-0123456789 n") for _ in range(40))
                 if walk]
        assert sum(map(len, walks)) > 20 and all(checker.is_valid(values) for values in walks), walks


def test_pydantic_multiple_of_compiles_and_takes_what_pydantic_writes():
    """conint(multiple_of=5, gt=0) and Field(multiple_of=3, le=30): compiled, Pydantic's dumps taken, others refused
    at the first byte no multiple in range begins with; a float's multiple_of (type number) is refused naming it."""
    pytest.importorskip("pydantic")
    from pydantic import BaseModel, Field, conint

    class Order(BaseModel):
        boxes: conint(multiple_of=5, gt=0)
        dozen: int = Field(multiple_of=3, le=30)

    class Weight(BaseModel):
        grams: float = Field(multiple_of=5)

    for value in (Order(boxes=5, dozen=-3), Order(boxes=1000, dozen=30), Order(boxes=35, dozen=0)):
        for text in (value.model_dump_json(), value.model_dump_json(indent=2)):
            assert complete(Order, text.encode()) and Order.model_validate_json(text) == value
    assert refused_at(Order, b'{"boxes":0') == 9 and refused_at(Order, b'{"boxes":-') == 9
    assert refused_at(Order, b'{"boxes":5,"dozen":31') == 20 and refused_at(Order, b'{"boxes":12,') == 11
    with pytest.raises(js.SchemaError, match="^multipleOf at #/properties/grams is supported on an integer only"):
        js.compile_schema(Weight)


PATTERNS = ["^a+b$", "ab", "^(ab|c)*$", "a.c", "^[^a]{2,}$", "c?y$", "^[ab]*é", "\\d-|-\\d"]


def test_patterns_hold_the_content_to_the_regex_searched_and_to_the_length_bounds_without_dead_ends():
    """`pattern` (unanchored, ECMA-262) with minLength/maxLength: every string of up to 4 characters of a small
    alphabet is taken exactly where re.search finds the pattern in it and its length is within the bounds; a prefix
    is taken exactly where some such string (of up to maxLength characters) begins with it; the content is written
    without escapes."""
    alphabet = ["a", "b", "c", "y", "-", "1", "é", "\\n", '\\"']
    for pattern in PATTERNS:
        for low, high in ((0, None), (2, 4), (3, None), (0, 3), (4, 4)):
            schema = {"type": "string", "pattern": pattern, "minLength": low}
            if high is not None:
                schema["maxLength"] = high
            compiled = js.compile_schema(schema)
            checker = validator(schema)
            state = compiled.advance(compiled.initial, 0x22)

            def visit(state, text: str) -> bool:
                """Whether a string taken (of up to 4 characters) begins with `text`, checking the recognizer at
                `text` (whose state is `state`, None where it was refused) and below it."""
                value = json.loads('"' + text + '"')
                expected = "\\" not in text and bool(re.search(pattern, value)) and low <= len(value) and \
                    (high is None or len(value) <= high)
                closed = state and compiled.advance(state, 0x22)
                assert bool(closed and compiled.complete(closed)) == expected, (schema, text)
                if expected:
                    assert checker.is_valid(value)
                found = expected
                if len(value) < 4:
                    for piece in alphabet:
                        after = state
                        for byte in piece.encode():
                            after = after and compiled.advance(after, byte)
                        found = visit(after, text + piece) or found
                # refused: no string below; taken with a maxLength of at most 4: some string below (no dead end)
                assert found == (state is not None) if high is not None else not found or state is not None, \
                    (schema, text)
                return found

            assert visit(state, "")
    assert refused_at({"pattern": "^a{2}$", "maxLength": 5}, b'"aa"') is None
    assert refused_at({"pattern": "^[a-z]+$", "maxLength": 3}, b'"abcd') == 4
    assert refused_at({"pattern": "x", "maxLength": 3}, b'"aaa') == 3  # only an x may come third
    assert refused_at({"pattern": "x", "minLength": 3}, b'"x"') == 2
    assert complete({"pattern": "😀", "minLength": 1, "maxLength": 1}, '"😀"'.encode())
    assert refused_at({"pattern": "^.{2}$"}, '"😀😀😀'.encode()) == 9  # code points, not bytes
    assert refused_at({"pattern": "a"}, b'"\\u0061"') == 1  # no escapes
    assert refused_at({"pattern": "a\\S"}, "\"a\u00a0".encode()) == 3  # no non-ASCII space (ECMA-262's \S takes none)
    assert complete({"type": ["string", "null"], "pattern": "^a$"}, b"null")
    assert complete({"type": "integer", "pattern": "^a$"}, b"1")  # pattern holds strings only
    assert complete({"format": "ipv4", "maxLength": 7}, b'"1.2.3.4"')
    assert refused_at({"format": "ipv4", "maxLength": 7}, b'"1.2.3.45') == 8
    rng, walked = random.Random(13), 0
    for _ in range(40):  # random walks never dead-end, and what they complete validates
        pattern = rng.choice(PATTERNS + ["^[A-Z]{2}-\\d{2,4}$", "(?:x|yz)+$", "^[^\\d]*\\d"])
        low = rng.choice([0, 1, 3, 8])
        schema = {"type": "array", "items": {"type": "string", "pattern": pattern, "minLength": low,
                                             "maxLength": low + rng.choice([0, 2, 5, 20])}}
        try:
            compiled, checker = js.compile_schema(schema), validator(schema)
        except js.SchemaError as e:  # such as ^[A-Z]{2}-\d{2,4}$ beside a minLength of 8
            assert "no string of the pattern at #/items has a length within" in str(e)
            continue
        for _ in range(3):
            walk = random_walk(rng, compiled, "[],\"abcxyzAZ-019é\\".encode())
            if walk is not None:
                walked += len(json.loads(walk))
                assert checker.is_valid(json.loads(walk)), (schema, walk)
                assert all(re.search(pattern, v) for v in json.loads(walk))
    assert walked > 60


def test_prefix_items_hold_each_position_to_its_schema_and_the_rest_to_items():
    """prefixItems (draft 2020-12 tuples): item k takes prefixItems[k], those after it `items` (none for false),
    within minItems/maxItems, as Pydantic writes a tuple[int, str]."""
    pair = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2}
    assert complete(pair, b'[1, "a"]') and refused_at(pair, b'[1]') == 2 and refused_at(pair, b'["a"') == 1
    assert refused_at(pair, b'[1, 2') == 4 and refused_at(pair, b'[1, "a",') == 7
    rest = {"prefixItems": [{"const": "x"}], "items": {"type": "boolean"}}
    assert complete(rest, b'[]') and complete(rest, b'["x", true, false]') and refused_at(rest, b'["x", "x"') == 6
    closed = {"prefixItems": [{"type": "null"}, {"type": "null"}], "items": False}
    assert complete(closed, b'[null]') and refused_at(closed, b'[null, null,') == 11
    assert js.compile_schema({"prefixItems": [{}]}) and refused_at({"prefixItems": [False]}, b"[1") == 1


def test_max_items_zero_and_an_empty_const_array_take_only_the_empty_array():
    """maxItems 0 (and a const/enum [], an array of no items) refuses the first item at its first byte: only [] is
    taken."""
    for schema in ({"type": "array", "maxItems": 0}, {"const": []}, {"enum": [[]]}):
        assert complete(schema, b"[]") and complete(schema, b"[ ]"), schema
        assert refused_at(schema, b"[1]") == 1 and refused_at(schema, b'["a"]') == 1, schema


@pytest.mark.parametrize("schema, message", [
    ({"type": "number", "multipleOf": 2}, "multipleOf at # is supported on an integer only (type integer), not a"),
    ({"type": "integer", "multipleOf": 0.5}, "multipleOf at # must be a whole number > 0 (a fraction is not "
                                             "supported), got 0.5"),
    ({"multipleOf": 0}, "multipleOf at # must be a whole number > 0"),
    ({"type": "integer", "minimum": 1, "maximum": 4, "multipleOf": 5},
     "no integer at # within its bounds (minimum/maximum) is a multiple of 5"),
    ({"enum": [5], "multipleOf": 5}, "multipleOf beside enum/const at # is not supported"),
    ({"type": "integer", "exclusiveMinimum": True}, "exclusiveMinimum at # must be a number (draft 2020-12), got true"),
    ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "no integer at # is within its bounds"),
    ({"exclusiveMinimum": 1, "maximum": 1}, "no number at # is within its bounds"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength at # is above its maxLength"),
    ({"maxLength": -1}, "maxLength at # must be a whole number >= 0, got -1"),
    ({"properties": {"a": {"type": "string", "pattern": "(?<=x)"}}},
     "pattern at #/properties/a: regex '(?<=x)': a lookaround (?<= at position 0 is not supported"),
    ({"pattern": "a\\bc"}, "pattern at #: regex 'a\\\\bc': the word boundary \\b at position 1 is not supported"),
    ({"pattern": "^[\"\\\\]+$"}, "pattern at #: every string it matches holds a '\"', a '\\', a control character"),
    ({"pattern": "a$b"}, "pattern at #: regex 'a$b': no text matches it"),
    ({"pattern": ["a"]}, 'pattern at # must be a string (a regex), got ["a"]'),
    ({"pattern": "^a{3}$", "maxLength": 2}, "no string of the pattern at # has a length within its minLength/"),
    ({"pattern": "^[ab]*a[ab]{13}$", "maxLength": 20}, "the pattern at # with minLength/maxLength is too complex"),
    ({"format": "email", "pattern": "@"}, "pattern beside format at # is not supported"),
    ({"enum": ["a"], "pattern": "a"}, "pattern beside enum/const at # is not supported"),
    ({"format": "hostname", "minLength": 254}, "minLength at # is above the format hostname's most characters (253)"),
    ({"format": ["email"]}, 'the format ["email"] at # is not supported'),
    ({"items": {"format": "iri"}}, 'the format "iri" at #/items is not supported (only date, time, date-time, '
                                   'uuid, email, hostname, ipv4, ipv6, duration, uri, uri-reference, uri-template, '
                                   'json-pointer, relative-json-pointer)'),
    ({"format": "date", "maxLength": 10}, "format beside minLength/maxLength at # is not supported (only beside email"),
    ({"anyOf": [{}, {"not": {}}]}, 'the keyword "not" at #/anyOf/1 is not supported'),
    ({"type": "strin"}, "type at # must be one of object, array"),
    ({"properties": {"a/b": {"$ref": "#/$defs/x"}}}, "$ref \"#/$defs/x\" at #/properties/a~1b/$ref points to nothing"),
    ({"$ref": "other.json#/x"}, "$ref at #/$ref must be '#'"),
    ({"$ref": "#/anyOf/1"}, "$ref \"#/anyOf/1\" at #/$ref points to nothing"),
    ({"properties": {"a": {}}, "required": ["b"]}, 'required at # names "b", which is not in its properties'),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "no JSON value satisfies this schema"),
    ({"allOf": [{}, {}]}, "allOf of more than one schema at # is not supported"),
    ({"type": "integer", "anyOf": [{}]}, "type beside anyOf at # is not supported"),
    ({"enum": []}, "enum at # must be a non-empty list"),
    ({"minItems": 3, "maxItems": 2}, "minItems at # is above its maxItems"),
    ({"items": [{}]}, "items at # must be one schema (a list of schemas is draft 4's tuple: write it as prefixItems)"),
    ({"prefixItems": {}}, "prefixItems at # must be a list of schemas"),
    ({"type": "array", "uniqueItems": True}, 'the keyword "uniqueItems" at # is not supported'),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}, "additionalProperties as a schema"),
    ([1], "a JSON schema must be an object or true/false, got list"),
    (dict, "a JSON schema must be an object or true/false, got the class dict, not a Pydantic model"),
    ({"const": float("nan")}, "a JSON schema must be JSON"),
    ({"$defs": {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(200)}, "$ref": "#/$defs/a0"},
     "the schema nests more than 100 levels at #/$defs/a99"),
    ({"$ref": "#"}, "no JSON value satisfies this schema"),
    ({"const": "a", "enum": ["b"]}, "const at # is none of its enum's values: no value satisfies both"),
    ({"$id": 5}, "$id at # must be a string (a URI), got 5"),
    ({"properties": {"a": {"$id": "a.json", "$defs": {"x": {}}, "$ref": "#/$defs/x"}}},
     "$id at #/properties/a is taken at the root only"),
])
def test_what_the_subset_does_not_take_is_refused_naming_the_keyword_and_its_place(schema, message):
    with pytest.raises(js.SchemaError) as e:
        js.compile_schema(schema)
    assert message in str(e.value)


def pydantic_models():
    """Pydantic models as users write them for structured outputs: a tagged union (Pydantic writes OpenAPI's
    `discriminator` beside its oneOf), a deprecated field, an enum, an optional nested model with a description
    beside its $ref, a recursive model and defaults."""
    from enum import Enum
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, Field

    class Color(Enum):
        """A color."""
        red = "red"
        green = "green"

    class Cat(BaseModel):
        pet_type: Literal["cat"]
        indoor: bool

    class Dog(BaseModel):
        pet_type: Literal["dog"]
        color: Color

    class Node(BaseModel):
        name: str = Field(max_length=3)
        children: list["Node"] = []

    class Pet(BaseModel):
        pet: Union[Cat, Dog] = Field(discriminator="pet_type")
        old_id: int = Field(0, deprecated=True)
        owner: Optional[Node] = Field(None, description="who owns it")

    return Pet, Node, [Pet(pet=Cat(pet_type="cat", indoor=True)),
                       Pet(pet=Dog(pet_type="dog", color=Color.green), old_id=3,
                           owner=Node(name="a", children=[Node(name="bc")]))]


def test_pydantic_schemas_compile_and_take_what_pydantic_writes():
    """What Pydantic's model_json_schema() and the openai client's to_strict_json_schema() write for such models
    compiles (discriminator and deprecated are annotations), takes the values Pydantic dumps, and a model itself is
    a schema (read through its model_json_schema)."""
    pytest.importorskip("pydantic")
    Pet, Node, values = pydantic_models()
    schemas = [Pet.model_json_schema(), Node.model_json_schema()]
    try:
        from openai.lib._pydantic import to_strict_json_schema
    except ImportError:
        pass
    else:
        schemas.append(to_strict_json_schema(Pet))
    assert "discriminator" in json.dumps(schemas[0]) and "deprecated" in json.dumps(schemas[0])
    for schema in schemas[::2]:
        for value in values:
            for text in (value.model_dump_json(), value.model_dump_json(indent=2)):
                assert complete(schema, text.encode()), (schema, text)
        assert refused_at(schema, b'{"pet":{"pet_type":"cat","color"') is not None
    assert js.compile_schema(Pet) is js.compile_schema(schemas[0])
    assert SamplingParams(json_schema=Node).json_schema == js.compile_schema(schemas[1])
    assert complete(Node, b'{"name":"abc","children":[{"name":""}]}') and refused_at(Node, b'{"name":"abcd') == 12


def test_pydantic_bounds_datetimes_uuids_and_tuples_compile_and_take_what_pydantic_writes():
    """Field(ge=1, le=5), PositiveInt, confloat, an aware datetime, a date, a UUID and a tuple[int, str], as Pydantic
    and the openai client's strict schema write them: compiled, Pydantic's own dumps taken, out-of-range refused."""
    pytest.importorskip("pydantic")
    from pydantic import BaseModel, Field, PositiveInt, confloat

    class Visit(BaseModel):
        stars: int = Field(ge=1, le=5)
        count: PositiveInt
        share: confloat(gt=0, lt=1)
        at: datetime.datetime
        day: datetime.date
        id: uuid.UUID
        pair: tuple[int, str]

    schemas = [Visit.model_json_schema()]
    try:
        from openai.lib._pydantic import to_strict_json_schema
    except ImportError:
        pass
    else:
        schemas.append(to_strict_json_schema(Visit))
    rng = random.Random(7)
    values = [Visit(stars=rng.randint(1, 5), count=rng.randint(1, 10**6), share=rng.random() or 0.5,
                    at=datetime.datetime.fromisoformat(random_formatted(rng, "date-time")),
                    day=datetime.date.fromisoformat(random_formatted(rng, "date")),
                    id=uuid.UUID(int=rng.getrandbits(128)), pair=(rng.randint(-9, 9), "x")) for _ in range(20)]
    for schema in schemas:
        for value in values:
            for text in (value.model_dump_json(), value.model_dump_json(indent=2)):
                assert complete(schema, text.encode()), (schema, text)
        assert refused_at(schema, b'{"stars":6') == 9 and refused_at(schema, b'{"stars":1,"count":0') == 19
        assert refused_at(schema, b'{"stars":1,"count":1,"share":1,') == 30
    answer = values[0].model_dump_json()
    assert Visit.model_validate_json(answer) == values[0]


def random_schema(rng: random.Random, depth: int = 0, defs: bool = True) -> dict:
    """A random schema of the subset (with oneOf and $ref)."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "types", "object", "free", "array",
             "anyOf", "oneOf"] + ["ref"] * defs
    kind = rng.choice(kinds[:8] if depth >= 3 else kinds)
    if kind == "string" and rng.random() < 0.3:
        return {"type": "string", "format": rng.choice(list(js.FORMATS) + list(js.REGEX_FORMATS))}
    if kind == "string" and rng.random() < 0.2:
        return {"type": "string", "pattern": "^[a-z]*\\d$", "maxLength": 1 + rng.randrange(5)}
    if kind == "string" and rng.random() < 0.5:
        low = rng.randrange(3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randrange(3)}
    if kind in ("integer", "number") and rng.random() < 0.5:
        return random_bounds(rng, kind)
    if kind in ("string", "integer", "number", "boolean", "null"):
        return {"type": kind, "description": "x"}
    if kind in ("enum", "const"):
        values = [rng.choice(["a", "é\"😀\n", "", 0, -1.5, 2e-3, True, None, [1, "b"], {"k": [None]}, {}])
                  for _ in range(rng.randrange(1, 4))]
        return {"enum": values} if kind == "enum" else {"const": values[0]}
    if kind == "types":
        return {"type": rng.sample(["string", "integer", "number", "boolean", "null"], 2)}
    if kind == "object":
        names = rng.sample(["a", "b", "ab", "é", "a\"b", "c d"], rng.randrange(4))
        schema = {"type": "object", "properties": {n: random_schema(rng, depth + 1, defs) for n in names},
                  "required": [n for n in names if rng.random() < 0.5]}
        if rng.random() < 0.5:
            schema["additionalProperties"] = False
        return schema
    if kind == "free":
        return {"type": "object", "additionalProperties": random_schema(rng, depth + 1, defs)}
    if kind == "array" and rng.random() < 0.3:  # a tuple
        prefix = [random_schema(rng, depth + 1, defs) for _ in range(rng.randrange(1, 4))]
        schema = {"type": "array", "prefixItems": prefix, "minItems": rng.randrange(len(prefix) + 1)}
        schema["items"] = rng.choice([False, random_schema(rng, depth + 1, defs)])
        return schema
    if kind == "array":
        low = rng.randrange(3)
        schema = {"type": "array", "items": random_schema(rng, depth + 1, defs), "minItems": low}
        if rng.random() < 0.5:
            schema["maxItems"] = low + rng.randrange(3)
        return schema
    if kind == "ref":
        return {"$ref": "#/$defs/item"}
    return {kind: [random_schema(rng, depth + 1, defs) for _ in range(rng.randrange(1, 3))]}


def random_bounds(rng: random.Random, kind: str) -> dict:
    """An integer or number schema with one or two bounds, inclusive or exclusive, that some value meets."""
    low = rng.choice([-30, -1.5, 0, 0.25, 3, 120, 1e20] if kind == "number" else [-30, -1, 0, 1, 7, 10**20])
    high = low + rng.choice([0, 0.5, 2, 99, 1e21] if kind == "number" else [0, 2, 9, 1000])
    schema = {"type": kind}
    if rng.random() < 0.8:
        schema["exclusiveMinimum" if rng.random() < 0.3 and high != low else "minimum"] = low
    if rng.random() < 0.8 or len(schema) == 1:
        schema["exclusiveMaximum" if rng.random() < 0.3 and high - low > 1 else "maximum"] = high
    return schema


def random_in_bounds(rng: random.Random, schema: dict):
    """A random value the bounded integer or number schema takes (its bounds, values between, near or far)."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    low = high - 50 - abs(high) if low is None else low
    high = low + 50 + abs(low) if high is None else high
    checker = jsonschema.Draft202012Validator(schema)
    if schema["type"] == "integer":
        low, high = math.ceil(low), math.floor(high)
        candidates = [low, high, low + 1, high - 1, rng.randint(low, high)]
    else:
        candidates = [low, high, rng.uniform(low, high), round(rng.uniform(low, high), 2), low + (high - low) * 1e-9]
    return rng.choice([v for v in candidates if checker.is_valid(v)])


def with_defs(rng: random.Random) -> dict:
    schema = random_schema(rng)
    if not isinstance(schema, dict) or "$ref" in schema:
        schema = {"anyOf": [schema] if "$ref" not in schema else [{"type": "null"}]}
    # the recursive definition: a tree of optional children, so that values are finite
    schema["$defs"] = {"item": {"type": "object", "properties": {
        "v": random_schema(rng, 2, False), "kids": {"type": "array", "items": {"$ref": "#/$defs/item"}}}}}
    return schema


def random_value(rng: random.Random, schema: dict, root: dict, depth: int = 0):
    """A random value the schema takes as this module reads it (an object's properties in order, an integer
    without a fraction, an object with properties and no others)."""
    if "$ref" in schema:
        return random_value(rng, root["$defs"]["item"], root, depth)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return random_value(rng, rng.choice(schema[key]), root, depth)
    if "enum" in schema:
        return copy.deepcopy(rng.choice(schema["enum"]))
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    kind = schema.get("type")
    kind = rng.choice(kind) if isinstance(kind, list) else kind
    if kind == "string" and "format" in schema:
        if schema["format"] in js.REGEX_FORMATS:
            return random_of_format(rng, schema["format"])
        return random_formatted(rng, schema["format"])
    if kind == "string" and "pattern" in schema:
        letters = rng.randrange(schema["maxLength"])
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(letters)) + str(rng.randrange(10))
    if kind == "string":
        count = rng.randint(schema.get("minLength", 0), schema.get("maxLength", 4))
        return "".join(rng.choice('ab"\\\n\t猫é😀 /\x7f') for _ in range(count))
    if kind in ("integer", "number") and any(key in schema for key in js.NUMBER_KEYS):
        return random_in_bounds(rng, schema)
    if kind == "integer":
        return rng.choice([0, -7, 12345, 10**20])
    if kind == "number":
        return rng.choice([0, -0.5, 1e21, 3.25e-7, 7])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "array" and "prefixItems" in schema:
        prefix, more = schema["prefixItems"], schema["items"]
        count = rng.randint(schema["minItems"], len(prefix) + (2 if more is not False and depth < 4 else 0))
        return [random_value(rng, prefix[k] if k < len(prefix) else more, root, depth + 1) for k in range(count)]
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), schema.get("maxItems", schema.get("minItems", 0) + 2))
        count = count if depth < 4 else schema.get("minItems", 0)
        return [random_value(rng, schema["items"], root, depth + 1) for _ in range(count)]
    if "properties" in schema:
        required = schema.get("required", [])
        return {name: random_value(rng, sub, root, depth + 1) for name, sub in schema["properties"].items()
                if name in required or (depth < 4 and rng.random() < 0.5)}
    if schema.get("additionalProperties") is False or depth >= 4:
        return {}
    return {name: random_value(rng, schema["additionalProperties"], root, depth + 1)
            for name in rng.sample(["x", "y", "é"], rng.randrange(3))}


def as_anyof(schema):
    """oneOf read as anyOf, as this module takes it (a value may satisfy more than one branch)."""
    if isinstance(schema, dict):
        return {("anyOf" if k == "oneOf" else k): as_anyof(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [as_anyof(v) for v in schema]
    return schema


def random_walk(rng: random.Random, compiled: js.Schema, alphabet: bytes, steps: int = 400) -> bytes | None:
    """Random bytes the recognizer takes, until it calls them complete (None if that takes too long, or the walk
    needs a byte outside `alphabet`); the bytes that close strings and containers grow likelier as the walk goes
    on. Where no byte of the alphabet continues them, the bytes must be complete or continued by another byte:
    the recognizer never takes a prefix that no value completes."""
    state, out = compiled.initial, bytearray()
    for step in range(steps):
        if compiled.complete(state) and rng.random() < 0.3:
            return bytes(out)
        options = [b for b in alphabet if compiled.advance(state, b) is not None]
        if not options:  # a byte outside the alphabet, or the end: never a dead end
            assert compiled.complete(state) or any(compiled.advance(state, b) for b in range(256)), bytes(out)
            return bytes(out) if compiled.complete(state) else None
        closing = [b for b in options if b in b'"}]0123456789el' and step > 60]
        byte = rng.choice(closing if closing and rng.random() < 0.7 else options)
        state = compiled.advance(state, byte)
        out.append(byte)
    return None


def test_random_values_of_random_schemas_are_taken_and_whatever_completes_validates():
    """Values drawn for a schema, serialized compact, indented and ASCII-escaped, are taken whole; what the
    recognizer takes as complete (random walks of it, changed values, values of other schemas) validates against
    the schema."""
    rng = random.Random(1)
    walked = validated = mutated = 0
    for _ in range(120):
        schema = with_defs(rng)
        compiled = js.compile_schema(schema)
        checker = validator(as_anyof(schema))
        for _ in range(4):
            value = random_value(rng, schema, schema)
            assert checker.is_valid(value), (schema, value)
            for text in (json.dumps(value, separators=(",", ":")), json.dumps(value, indent=2),
                         json.dumps(value, ensure_ascii=False)):
                assert complete(schema, text.encode()), (schema, text)
            data = json.dumps(value).encode()
            for _ in range(5):  # single-byte changes: taken whole only where the changed value validates
                at = rng.randrange(len(data))
                changed = data[:at] + bytes([rng.choice(b'{}[]",:0129.e-tfn "a\\')]) + data[at + rng.randrange(2):]
                if complete(schema, changed):
                    mutated += 1
                    assert checker.is_valid(json.loads(changed)), (schema, changed)
        alphabet = bytes(sorted(set(b'{}[]":, \n0123456789abcdefABCDEF-.trulsn\\u\xc3\xa9TZ+') |
                                set(compiled.canonical.encode())))
        for _ in range(3):
            walk = random_walk(rng, compiled, alphabet)
            if walk is not None:
                walked += 1
                assert checker.is_valid(json.loads(walk)), (schema, walk)
        other_schema = with_defs(rng)
        other = random_value(rng, other_schema, other_schema)
        if complete(schema, json.dumps(other).encode()):
            validated += 1
            assert checker.is_valid(other), (schema, other)
    assert walked > 150 and validated > 5 and mutated > 20


def oracle(pieces, compiled: js.Schema, state) -> numpy.ndarray:
    def takes(piece):
        current = state
        for byte in piece:
            current = compiled.advance(current, byte)
            if current is None:
                return False
        return True

    return numpy.array([bool(piece) and takes(piece) for piece in pieces])


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("json_schema") / "model")
    return InternVLChat.from_pretrained(folder, dtype=torch.float32)


def test_masks_equal_the_token_by_token_oracle_on_every_state_of_some_values(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    base = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(len(tokenizer))]
    extra = [b'"', b'":', b'",', b'"}', b'"]', b'\\', b'\\u00', b'e9"', b"\xc3", b"\xa9", b"\xf0\x9f\x98", b"\x80",
             b" " * 10, b"\n  ", b"", None, b"true", b"nu", b"ll,", b"-0.", b"5e", b"12", b"1.5", b'{"', b'"title',
             b'title":"', b'kind', b'":"c', b'at"', b'Caf', b'\xc3\xa9 ', b'[{', b'}]', b'},{"', b'name":', b"ca"]
    pieces = base + extra
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 2)
    compiled = js.compile_schema(SCHEMA)
    value = {"title": "x\\u00e9", "count": 12, "kind": "Café 😀", "score": -0.5e3,
             "objects": [{"name": "猫", "visible": True, "box": [1.5, 2]}], "note": "n", "caption": "Cé😀"}
    states = {compiled.initial}
    for text in (json.dumps(value), json.dumps(value, indent=2, ensure_ascii=False)):
        state = compiled.initial
        for byte in text.encode():
            state = compiled.advance(state, byte)
            states.add(state)
    assert len(states) > 150
    for state in states:
        expected = numpy.concatenate([oracle(pieces, compiled, state), numpy.zeros(2, dtype=bool)])
        assert (js.schema_mask(vocabulary, compiled, state) == expected).all(), state
        assert (js.schema_mask(vocabulary, compiled, state) == expected).all(), state  # cached
    constraint = js.SchemaConstraint(vocabulary, js.compile_schema({"type": "integer"}))
    constraint.advance(pieces.index(b"12"))
    assert constraint.complete and constraint.allowed([3])[3] and constraint.allowed([3])[pieces.index(b"12")]
    with pytest.raises(ValueError, match="does not continue a value of the JSON schema"):
        constraint.advance(pieces.index(b"ca"))


def assert_masks_are_the_oracle(tokenizer, extra: list[bytes], schema: dict, texts: list[str], at_least: int):
    """The schema's masks, over the tokenizer's pieces and `extra` ones, equal the token-by-token oracle at every
    state that `texts` (values of it) pass through, of which there are more than `at_least`."""
    pieces = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(len(tokenizer))] + extra
    vocabulary = jm.JsonVocabulary(pieces, len(pieces))
    compiled = js.compile_schema(schema)
    states = {compiled.initial}
    for text in texts:
        state = compiled.initial
        for byte in text.encode():
            state = compiled.advance(state, byte)
            states.add(state)
    assert len(states) > at_least
    for state in states:
        assert (js.schema_mask(vocabulary, compiled, state) == oracle(pieces, compiled, state)).all(), state


# bounds, formats and a tuple: what Pydantic writes for int Field(ge=1, le=5), confloat, datetime, UUID, tuple
TYPED = {"type": "object", "properties": {
    "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "share": {"type": "number", "exclusiveMinimum": 0,
                                                                         "maximum": 1},
    "at": {"type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"},
    "pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": -3}, {"type": "string", "format": "date"}],
             "minItems": 2, "maxItems": 2}},
    "required": ["stars", "share", "at", "id", "pair"], "additionalProperties": False}


def test_masks_equal_the_oracle_on_states_of_bounds_formats_and_tuples(tiny_chat):
    value = {"stars": 5, "share": 0.5, "at": "2024-02-29T12:00:00.25+05:30",
             "id": "123e4567-e89b-12d3-a456-426614174000", "pair": [-3, "2023-12-31"]}
    extra = [b"2024", b"-02-", b"29T", b"12:00", b":00Z", b'"}', b"0.", b"5e-1", b"-3", b"e+", b'", "', b"6"]
    assert_masks_are_the_oracle(tiny_chat.tokenizer, extra, TYPED,
                                [json.dumps(value), json.dumps({**value, "share": 1e-3}, indent=2)], 100)


# patterns (one with length bounds) and the regex formats
PATTERNED = {"type": "object", "properties": {
    "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2,4}$"},
    "note": {"pattern": "é", "minLength": 2, "maxLength": 5},
    "mail": {"type": "string", "format": "email"}, "host": {"type": "string", "format": "hostname"},
    "ip": {"type": "string", "format": "ipv6"}, "ip4": {"type": "string", "format": "ipv4"},
    "wait": {"type": "string", "format": "duration"},
    "either": {"anyOf": [{"pattern": "^[x.0-9]+$", "maxLength": 9}, {"format": "ipv4"}, {"enum": ["y"]}]}},
    "required": ["code", "note", "mail", "host", "ip", "ip4", "wait"], "additionalProperties": False}


def test_masks_equal_the_oracle_on_states_inside_patterns_and_regex_formats(tiny_chat):
    value = {"code": "AB-123", "note": "aébc", "mail": "first.last+tag@mail.example.com", "host": "a-1.example",
             "ip": "2001:db8::ffff:1.2.3.4", "ip4": "192.168.0.1", "wait": "P1Y2M3DT4H5M6S",
             "either": "1.2.3.4"}
    other = {**value, "ip": "::1", "note": "éé", "either": "x.x"}
    texts = [json.dumps(value, ensure_ascii=False), json.dumps(other, indent=2, ensure_ascii=False)]
    for text in texts:
        assert complete(PATTERNED, text.encode()) and validator(PATTERNED).is_valid(json.loads(text))
    extra = [b"AB-", b"12", b'"}', b'",', b"@", b".com", b"::", b"\xc3", b"\xa9", b"\xc3\xa9", b"PT", b"1H", b"\\",
             b"ff:", b"1.2", b".3.4", b"-1", b"x\xc3\xa9y"]
    assert_masks_are_the_oracle(tiny_chat.tokenizer, extra, PATTERNED, texts, 150)


# the RFC formats (a uri as Pydantic's HttpUrl writes it) and multiples
LINKED = {"type": "object", "properties": {
    "url": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}, "ref": {"format": "uri-reference"},
    "path": {"format": "uri-template"}, "at": {"format": "json-pointer"}, "up": {"format": "relative-json-pointer"},
    "n": {"type": "integer", "multipleOf": 5, "minimum": -20}, "m": {"multipleOf": 12}},
    "required": ["url", "ref", "path", "at", "up", "n", "m"], "additionalProperties": False}


def test_masks_equal_the_oracle_on_states_inside_uris_json_pointers_and_multiples(tiny_chat):
    value = {"url": "https://user@example.com:8080/a/b%20c?q=1#top", "ref": "../a?b", "path": "/x{+path*}{?q,r:3}",
             "at": "/a~1b/é", "up": "1#", "n": -15, "m": 144}
    other = {**value, "url": "http://[::1]/", "ref": "//h/a", "at": "", "up": "0/~0", "n": 20, "m": -12}
    texts = [json.dumps(value, ensure_ascii=False), json.dumps(other, indent=2)]
    for text in texts:
        assert complete(LINKED, text.encode()) and validator(LINKED).is_valid(json.loads(text))
    extra = [b"https", b"://", b"example", b".com", b"/a", b"?q=", b"%2", b"0#", b"~1", b"{+", b"}/", b"-1", b"5",
             b"20", b"144", b'",', b"\xc3\xa9", b"\xc3", b"[::", b"1]", b"%", b"\\"]
    assert_masks_are_the_oracle(tiny_chat.tokenizer, extra, LINKED, texts, 150)


STRING_ALTERNATIVES = [{"type": "string"}, {"type": "string", "maxLength": 3}, {"minLength": 2, "maxLength": 40},
                       {"pattern": "^[a-c]{0,30}$"}, {"pattern": "b.", "maxLength": 6}, {"pattern": "^[^x]+$"},
                       {"enum": ["ab", 'a"b', "é", "abc"]}, {"format": "ipv4"}, {"format": "date"}, {"const": "ca"}]


@pytest.mark.parametrize("few_words", [0, 256])
def test_masks_of_strings_of_random_anyofs_equal_the_oracle(monkeypatch, few_words):
    """Strings that an anyOf holds to several alternatives at once (free, bounded, patterned, enum, formatted), whose
    masks are the union of each thread's; a vocabulary of random tokens (quotes, escapes, split characters) large
    enough for the all-tokens walk, on the states of random walks; `few_words` moves where that walk turns to a
    trie."""
    monkeypatch.setattr(jm, "FEW_WORDS", few_words)
    rng = random.Random(21)
    alphabet = 'abcx"\\u0019-.é:,}'.encode()
    pieces = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(1200)]
    pieces += [b"\xc3", b"\xa9", b'\\u00e9', b'\\"', None, b""]
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 1)
    checked = 0
    for _ in range(12):
        schema = {"type": "object", "properties": {"s": {"anyOf": rng.sample(STRING_ALTERNATIVES, rng.randint(2, 4))}},
                  "required": ["s"], "additionalProperties": False}
        compiled = js.compile_schema(schema)
        states = set()
        for _ in range(3):
            state = compiled.initial
            for byte in random_walk(rng, compiled, alphabet + b"{}0123456789") or b"":
                state = compiled.advance(state, byte)
                states.add(state)
        for state in states:
            expected = numpy.concatenate([oracle(pieces, compiled, state), [False]])
            assert (js.schema_mask(vocabulary, compiled, state) == expected).all(), (schema, state)
            checked += len(state[1]) > 1 and state[0][0] == jm.STRING
    assert checked > 30


def test_pydantic_patterns_and_regex_formats_through_the_tiny_model(tiny_chat):
    """A Pydantic model with constr(pattern=..., max_length=...) fields, and a plain schema with email, ipv4 and
    duration strings of bounded length (Pydantic's EmailStr needs the email-validator package): the stopped answers
    validate (the model reads them back; jsonschema with its format checker)."""
    from pydantic import BaseModel, constr

    class Part(BaseModel):
        code: constr(pattern=r"^[A-Z]{2}-\d{2,4}$")
        name: constr(pattern=r"^[a-z]+$", min_length=2, max_length=6)

    contact = {"type": "object", "properties": {"mail": {"type": "string", "format": "email", "maxLength": 12},
                                                "ip": {"type": "string", "format": "ipv4"},
                                                "wait": {"type": "string", "format": "duration", "maxLength": 6}},
               "required": ["mail", "ip", "wait"], "additionalProperties": False}
    assert js.compile_schema(Part).canonical == js.compile_schema(Part.model_json_schema()).canonical
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("Describe the part as JSON.").prompt_ids
    bias = closing_bias(tokenizer, 4.0)
    requests = [Request(ids, SamplingParams(max_new_tokens=120, json_schema=schema, do_sample=True, seed=s,
                                            logit_bias=bias)) for schema in (Part, contact) for s in range(3)]
    out = [([], None) for _ in requests]
    for events in tiny_chat.engine.generate(requests):
        for event in events:
            out[event.rid][0].append(event.token)
            out[event.rid] = (out[event.rid][0], event.finish or out[event.rid][1])
    stopped = [0, 0]
    for k, (tokens, finish) in enumerate(out):
        schema = (Part, contact)[k // 3]
        text = b"".join(tokenizer.token_bytes(t) for t in (tokens[:-1] if finish == "stop" else tokens))
        if finish == "stop":
            if schema is Part:
                part = Part.model_validate_json(text)
                assert re.search(r"^[A-Z]{2}-\d{2,4}$", part.code) and 2 <= len(part.name) <= 6
            else:
                validator(contact).validate(json.loads(text))
                assert email_ok(json.loads(text)["mail"]) and duration_ok(json.loads(text)["wait"])
            stopped[k // 3] += 1
        else:
            assert refused_at(schema if isinstance(schema, dict) else Part.model_json_schema(), text) is None
    assert min(stopped) >= 1, stopped


def test_constrained_answers_with_bounds_formats_and_tuples_validate(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("Describe the visit as JSON.").prompt_ids
    bias = closing_bias(tokenizer, 4.0)
    requests = [Request(ids, SamplingParams(max_new_tokens=200, json_schema=TYPED, do_sample=True, seed=s,
                                            logit_bias=bias)) for s in range(4)]
    out = [([], None) for _ in requests]
    for events in tiny_chat.engine.generate(requests):
        for event in events:
            out[event.rid][0].append(event.token)
            out[event.rid] = (out[event.rid][0], event.finish or out[event.rid][1])
    stopped = 0
    for tokens, finish in out:
        text = b"".join(tokenizer.token_bytes(t) for t in (tokens[:-1] if finish == "stop" else tokens))
        if finish == "stop":
            validator(TYPED).validate(json.loads(text))
            stopped += 1
        else:
            assert refused_at(TYPED, text) is None
    assert stopped >= 2


def closing_bias(tokenizer, strength: float) -> dict[int, float]:
    """A logit bias towards the tokens that close strings, arrays and objects and the end of turn, and away from
    whitespace and escapes, so that the tiny random model finishes some values within a few dozen tokens."""
    pieces = {i: tokenizer.token_bytes(i) for i in range(len(tokenizer)) if not tokenizer.is_special(i)}
    closing = [i for i, piece in pieces.items() if any(c in piece for c in (b"}", b"]", b'"', b","))]
    padding = [i for i, piece in pieces.items() if b"\\" in piece or piece.strip() == b""]
    return {**dict.fromkeys(closing, strength), **dict.fromkeys(padding, -strength), tokenizer.im_end_id: strength}


def test_constrained_answers_validate_when_they_stop(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("Describe the picture as JSON.").prompt_ids
    bias = closing_bias(tokenizer, 4.0)
    settings = [dict(do_sample=False, logit_bias=bias), *({"do_sample": True, "seed": s} for s in range(3)),
                *({"do_sample": True, "seed": s, "logit_bias": bias} for s in range(6))]
    requests = [Request(ids, SamplingParams(max_new_tokens=160, json_schema=SCHEMA, **kw)) for kw in settings]
    out = [([], None) for _ in requests]
    for events in tiny_chat.engine.generate(requests):
        for event in events:
            out[event.rid][0].append(event.token)
            out[event.rid] = (out[event.rid][0], event.finish or out[event.rid][1])
    stopped = 0
    for tokens, finish in out:
        text = b"".join(tokenizer.token_bytes(t) for t in (tokens[:-1] if finish == "stop" else tokens))
        if finish == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
            stopped += 1
        else:
            assert refused_at(SCHEMA, text) is None
    assert stopped >= 3
    answer = tiny_chat.chat("JSON!", json_schema={"enum": ["yes", "no", 3]}, do_sample=False, max_new_tokens=20)
    assert json.loads(answer) in ("yes", "no", 3)


def test_json_schema_settings_that_cannot_work_are_refused():
    with pytest.raises(SettingError, match="^give json_mode or json_schema, not both$"):
        SamplingParams(json_mode=True, json_schema={})
    with pytest.raises(SettingError, match="^min_new_tokens does not go with json_schema"):
        SamplingParams(json_schema={}, min_new_tokens=2)
    with pytest.raises(InputError, match='^the keyword "not" at #/properties/a is not supported$'):
        SamplingParams(json_schema={"properties": {"a": {"not": {"const": 2}}}})
    assert SamplingParams(json_schema={"type": "string"}) == SamplingParams(json_schema={"type": "string"})
    assert js.compile_schema({"type": "string"}) is js.compile_schema({"type": "string"})  # cached


def test_the_server_takes_json_schema_and_guided_json():
    settings = ServerSettings()
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    spec = {"name": "scene", "schema": SCHEMA, "strict": True}
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, {"prompt": "hi"})):
        params = parse({**body, "response_format": {"type": "json_schema", "json_schema": spec}}, settings).params
        assert params.json_schema == js.compile_schema(SCHEMA) and not params.json_mode
        assert parse({**body, "guided_json": SCHEMA}, settings).params.json_schema == js.compile_schema(SCHEMA)
        assert parse({**body, "guided_json": json.dumps(SCHEMA)}, settings).params.json_schema.canonical == \
            js.compile_schema(SCHEMA).canonical
        typed = {"type": "object", "properties": {"id": {"pattern": "^[A-Z]{2}\\d+$", "maxLength": 8},
                                                   "mail": {"format": "email"}}}
        assert parse({**body, "guided_json": typed}, settings).params.json_schema == js.compile_schema(typed)
        with pytest.raises(ApiError, match="^guided_json: pattern at #/properties/id: regex '\\(a': the '\\('"):
            parse({**body, "guided_json": {"properties": {"id": {"pattern": "(a"}}}}, settings)
        bad = {**spec, "schema": {"type": "string", "not": {}}}
        with pytest.raises(ApiError, match='^response_format: the keyword "not" at # is not supported') as e:
            parse({**body, "response_format": {"type": "json_schema", "json_schema": bad}}, settings)
        assert e.value.status == 400 and e.value.param == "response_format"
        with pytest.raises(ApiError, match='^guided_json: the format "iri" at #/items is not supported'):
            parse({**body, "guided_json": {"items": {"format": "iri"}}}, settings)
        with pytest.raises(ApiError, match="^response_format json_schema must be an object with a schema"):
            parse({**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, settings)
        with pytest.raises(ApiError, match="^give response_format or guided_json, not both"):
            parse({**body, "guided_json": {}, "response_format": {"type": "json_object"}}, settings)
        with pytest.raises(ApiError, match="^min_tokens does not go with response_format json_schema"):
            parse({**body, "response_format": {"type": "json_schema", "json_schema": spec}, "min_tokens": 2}, settings)
        # vLLM's newer structured_outputs: its json taken as guided_json is, its other keys refused naming them
        for sent in (SCHEMA, json.dumps(SCHEMA)):
            params = parse({**body, "structured_outputs": {"json": sent, "backend": None}}, settings).params
            assert params.json_schema == js.compile_schema(SCHEMA) and not params.json_mode
        for structured, message in (({"structural_tag": "x"}, 'with "structural_tag": only its json'),
                                    ({"json": SCHEMA, "choice": ["a"]}, "with both json and choice"),
                                    ({"grammar": "root ::= x", "json_object": True}, "both json_object and grammar"),
                                    ({}, "with no constraint"), ({"json": "{"}, "^structured_outputs.json is not JSON"),
                                    ({"json": {"not": {}}}, '^structured_outputs: the keyword "not" at #'),
                                    ("x", "^structured_outputs must be an object such as")):
            with pytest.raises(ApiError, match=message) as e:
                parse({**body, "structured_outputs": structured}, settings)
            assert e.value.status == 400 and e.value.param == "structured_outputs"
        with pytest.raises(ApiError, match="^give one of response_format, guided_json and structured_outputs"):
            parse({**body, "structured_outputs": {"json": {}}, "guided_json": {}}, settings)
        with pytest.raises(ApiError, match="^min_tokens does not go with structured_outputs"):
            parse({**body, "structured_outputs": {"json": {}}, "min_tokens": 2}, settings)


def test_the_root_s_id_is_taken_as_json_schema_s_own_examples_write_it_and_refs_still_point_into_the_schema():
    """JSON Schema's getting-started example begins with `$schema` and `$id`: the root's `$id` (its base URI) is
    ignored as vLLM's backends ignore it, the `#` pointers of its $refs still pointing into the document."""
    product = {"$schema": "https://json-schema.org/draft/2020-12/schema",
               "$id": "https://example.com/product.schema.json", "title": "Product", "type": "object",
               "properties": {"productId": {"type": "integer"}, "tag": {"$ref": "#/$defs/tag"}},
               "required": ["productId"], "$defs": {"tag": {"enum": ["a", "b"]}}}
    assert complete(product, b'{"productId": 1, "tag": "b"}') and complete(product, b'{"productId": 1}')
    assert refused_at(product, b'{"productId": 1, "tag": "c"}') == 25
    assert refused_at(product, b'{"$id": 1}') == 2


def test_enum_and_const_equality_tells_booleans_from_numbers_at_every_depth():
    """Python's == takes [0] for [False] and {"a": 0} for {"a": False}: a const [False] beside an enum holding [0]
    let "[0]" through, and consts no enum value equals (JSON Schema's equality) compiled."""
    schema = {"enum": [[0], [False]], "const": [False]}
    assert refused_at(schema, b"[0]") == 1 and complete(schema, b"[false]")
    for schema in ({"enum": [[True]], "const": [1]}, {"enum": [{"a": False}], "const": {"a": 0}}):
        with pytest.raises(js.SchemaError, match="const at # is none of its enum's values"):
            js.compile_schema(schema)
    assert complete({"enum": [[1.0, {"a": [None]}]], "const": [1, {"a": [None]}]}, b'[1.0,{"a":[null]}]')


@pytest.mark.parametrize("schema, text", [
    ({"type": "number", "minimum": 2**53 + 1}, b"9007199254740993.0"),  # reads as 2**53
    ({"type": "number", "minimum": 2**53 + 1}, b"9007199254740993e0"),
    ({"type": "number", "maximum": 2**53 + 3}, b"9007199254740995.0"),  # reads as 2**53 + 4
    ({"type": "number", "maximum": -20820017870132778235}, b"-20820017870132778235.5"),
])
def test_an_included_bound_that_is_no_double_holds_as_json_loads_reads_the_digits(schema, text):
    """Past 2**53 an included bound may lie between two doubles; digits with a fraction or an exponent were held to
    the exact bound, and json.loads reads them as the double on the wrong side of it."""
    assert not validator(schema).is_valid(json.loads(text))
    assert not complete(schema, text)
    bound = schema.get("minimum", schema.get("maximum"))
    inner = math.nextafter(float(bound), math.inf if "minimum" in schema else -math.inf)
    for written in (repr(float(bound)), repr(inner)):  # a double on the inner side is taken, one outside it is not
        assert complete(schema, written.encode()) == validator(schema).is_valid(json.loads(written))


def test_a_long_number_is_cut_at_max_number_digits_not_a_value_error_mid_answer():
    """Bounded numbers of more than 4300 digits (or exponent digits) raised ValueError from int() inside the decode
    step; every run of digits holds at most MAX_NUMBER_DIGITS, and bounds or enum values that need more are refused
    when the schema is compiled."""
    most = jm.MAX_NUMBER_DIGITS
    for schema in ({"type": "integer", "minimum": 0}, {"type": "number", "minimum": 0}, {"type": "number"}):
        assert complete(schema, b"1" * most) and refused_at(schema, b"1" * (most + 1)) == most
    assert complete({"type": "number", "maximum": 5}, b"1e-" + b"0" * (most - 1) + b"1")
    assert refused_at({"type": "number", "maximum": 5}, b"1e-" + b"0" * most + b"1") == most + 3
    for schema in ({"type": "integer", "minimum": 10**most}, {"type": "integer", "maximum": -(10**most)},
                   {"enum": [1, 10**most]}):
        with pytest.raises(js.SchemaError, match=f"more than {most} digits"):
            js.compile_schema(schema)
    assert complete({"type": "integer", "minimum": 10**most - 1}, b"9" * most)


def test_ref_pointers_are_percent_decoded_and_array_indexes_are_ascii_digits():
    """A $ref's fragment is a URI fragment (RFC 6901, section 6): "#/$defs/a%25" points to the key "a%" (it pointed
    to "a%25"), "a%20b" to "a b" (refused before); "²" passed str.isdigit and raised ValueError from int()."""
    schema = {"$defs": {"a%25": {"type": "string"}, "a%": {"type": "integer"}}, "$ref": "#/$defs/a%25"}
    assert complete(schema, b"1") and refused_at(schema, b'"x"') == 0
    assert complete({"$defs": {"a b": {"type": "string"}}, "$ref": "#/$defs/a%20b"}, b'"x"')
    items = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}
    assert complete({"properties": {"a": {"$ref": "#/properties/b/prefixItems/1"}, "b": items}, "type": "object",
                     "required": ["a"], "additionalProperties": False}, b'{"a":5}')
    # the decoded pointer is the target's key: "#/properties/a%20b" is "a b", not the property named "a%20b"
    collide = {"type": "object", "properties": {"a%20b": {"type": "integer"}, "a b": {"type": "string", "maxLength": 3},
                                                "r": {"$ref": "#/properties/a%20b"}},
               "required": ["a%20b", "a b", "r"], "additionalProperties": False}
    assert complete(collide, b'{"a%20b":1,"a b":"x","r":"y"}') and not complete(collide, b'{"a%20b":1,"a b":"x","r":2}')
    for index in ("\u00b2", "01", "1" * 30, "%FF"):
        schema = {"type": "object", "properties": {"a": {"$ref": f"#/properties/b/prefixItems/{index}"}, "b": items}}
        with pytest.raises(js.SchemaError, match=r"\$ref .* at #/properties/a/\$ref (points to nothing|percent-enc)"):
            js.compile_schema(schema)


def test_a_huge_length_beside_a_pattern_is_held_or_refused_not_an_overflow():
    """maxLength 10**20 beside a pattern raised OverflowError (a 10**20-bit length table), 10**19 beside the ipv4
    format MemoryError, and 10**6 ran for minutes; above MAX_PATTERN_LENGTH a maxLength is held at it and a
    minLength refused."""
    most = js.MAX_PATTERN_LENGTH
    schema = {"type": "string", "pattern": "^a+$", "maxLength": 10**20}
    assert complete(schema, b'"' + b"a" * most + b'"') and refused_at(schema, b'"' + b"a" * (most + 1)) == most + 1
    assert complete({"type": "string", "format": "ipv4", "minLength": 7, "maxLength": 10**19}, b'"1.2.3.4"')
    for schema in ({"type": "string", "pattern": "^a+$", "minLength": most + 1},
                   {"type": "string", "format": "ipv4", "minLength": 10**20}):
        with pytest.raises(js.SchemaError, match=f"minLength at # beside the (pattern|format ipv4) is above {most}"):
            js.compile_schema(schema)


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": False, "minItems": 1},
    {"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 2},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
])
def test_a_schema_no_value_satisfies_is_not_called_too_deep(schema):
    """Schemas that no value satisfies at any depth were refused as "no JSON value within 32 levels of nesting",
    which sent the user to look for deep nesting."""
    with pytest.raises(js.SchemaError, match=r"^no JSON value satisfies this schema: a value it describes needs"):
        js.compile_schema(schema)


def test_a_schema_whose_values_nest_too_deep_says_so():
    schema = {"type": "integer"}
    for _ in range(jm.MAX_DEPTH + 1):
        schema = {"type": "array", "items": schema, "minItems": 1}
    with pytest.raises(js.SchemaError, match=rf"^no JSON value within {jm.MAX_DEPTH} levels of nesting satisfies"):
        js.compile_schema(schema)
    js.compile_schema(schema["items"])  # one level less fits


def test_a_schema_nested_past_the_recursion_limit_is_a_schema_error():
    """A schema whose data (an enum's value) nests deeper than Python's json module goes raised RecursionError from
    json.dumps or json.loads, which the server answered with a 500 (a request body decodes just under the limit)."""
    deep = [0]
    for _ in range(5000):
        deep = [deep]
    for schema in ({"enum": [deep]}, {"const": deep}, {"type": "array", "default": deep}):
        with pytest.raises(js.SchemaError, match="nested too deeply"):
            js.compile_schema(schema)
