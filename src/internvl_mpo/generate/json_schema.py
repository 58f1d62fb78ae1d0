"""JSON schema mode: constrained decoding to one JSON value that a JSON schema accepts (OpenAI's structured
outputs, vLLM's `guided_json`), on top of JSON mode's recognizer (json_mode.py).

`compile_schema` turns a schema (a dict, or True/False) into a `Schema`, cached by its canonical JSON (the
schema as compact JSON, keys in their order: the properties' order is the order they are generated in). The
subset taken, and the rest refused with a `SchemaError` naming the keyword and its JSON pointer in the schema:
`type` (one or a list), `properties`, `required`, `additionalProperties`, `prefixItems` (a tuple's items, each its
schema; those after them `items`), `items` (one schema), `minItems`, `maxItems`, `minLength`, `maxLength` (code
points, as json.loads reads the string), `pattern` (ECMA-262, unanchored; regex.py's syntax), `format` `date`,
`time`, `date-time` (RFC 3339) and `uuid`, and `email`, `hostname`, `ipv4`, `ipv6`, `duration`, `uri`,
`uri-reference`, `uri-template`, `json-pointer` and `relative-json-pointer` (REGEX_FORMATS), `minimum`, `maximum`,
`exclusiveMinimum`, `exclusiveMaximum` (numbers, as in draft 2020-12; as a double reads the digits), an integer's
`multipleOf` (a whole number; beside the bounds, a digit is taken only while some multiple within them begins with
the digits so far), `enum`, `const`, `anyOf`, `oneOf` (taken as anyOf), `allOf` of one schema, `$ref` to `#` or a
JSON pointer into the schema (`#/$defs/...`, `#/properties/...`; recursion allowed), and the annotations
`description`, `title`, `default`, `examples`, `deprecated`, `readOnly`, `writeOnly`, `$schema`, `$comment`,
`discriminator` (OpenAPI's, as Pydantic writes it) and the root's `$id` (a nested one would change what the `#`
pointers of its $refs point to), which are ignored.
Without `type`, a schema with object keywords (properties, required, additionalProperties) is an object, one
with array keywords an array, one with string keywords a string, one with `multipleOf` an integer and one with
number bounds a number. An object with `properties` has only those keys, in the schema's order, each at most once,
the optional ones may be left out (`additionalProperties` absent or true lets the output have none other, as OpenAI's
strict mode and xgrammar's default); one without `properties` may have any keys, with values of its
`additionalProperties` schema (any JSON value when absent or true; none when false). An integer is written without a
fraction or exponent; an `enum`/`const` number as json.dumps writes it; an enum string in any JSON spelling of it. A
bounded number's digits (exponent included) are taken only while some number within its bounds begins with them
(worked out in fractions, an exponent never raised to a power), and a '-' begins a negative number there (no -0);
an integer's with `multipleOf` only while some multiple within its bounds does. A formatted
string's content is ASCII without escapes, each byte taken while some string of the format begins with them. A
string with a `pattern` or a regex format is held to a regex.py automaton (a pattern's searched: `^`/`$` anchor it)
whose content holds none of UNWRITTEN, so it is written without escapes; with minLength/maxLength, each of the
automaton's states knows the lengths of its completions (`_lengths`, searched once), and a byte is taken only while
one of them ends the string within the bounds (`_Bounded`). Inside such a string the content tokens' mask is
automaton.py's (automaton_mask, one token per class of the byte runs), the tokens with a quote walked as elsewhere.

A state is (the json_mode state, a frozenset of threads): the lexical state is JSON mode's (the top-level
value may be of any type), and each thread is one way the schema may still accept the bytes so far, as (open
containers' frames, what comes next); a thread is split where a value starts that more than one alternative of
an anyOf (or type list) takes. A thread only lives while a complete value can still follow: a value that
cannot fit within MAX_DEPTH levels (a required recursion) is not started, so a rejected prefix is never a dead
end of an accepted one. Masks come from JSON mode's vocabulary index, cached per schema and state: a walk of the
tokens as a trie from a state; inside a string free but for its length the plain content class is taken whole
(those of its tokens within the length left); inside a string that threads hold to different alternatives, the
union of each thread's mask (threads go on alone); inside any other string, all tokens walked together.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import urllib.parse
from fractions import Fraction
from functools import lru_cache

import numpy

from ..errors import InputError
from . import json_mode as jm
from . import regex as rx
from .automaton import automaton_mask

CACHED_SCHEMAS = 64  # compiled schemas kept, by their canonical JSON
CACHED_MASKS = 1024  # schema masks kept per vocabulary (all schemas together), packed 8 to a byte
STRING_MODES = frozenset((jm.STRING, jm.ESCAPE, jm.UNICODE))  # lexical modes inside a string
MAX_NESTING = 100  # schemas (and enum/const values) inside one another, $refs followed included
# ignored: JSON Schema's meta-data and OpenAPI's `discriminator`, which Pydantic writes beside a tagged union's
# oneOf (whose branches hold the tag as a const already): none of them constrains a value
ANNOTATIONS = frozenset(("description", "title", "default", "examples", "deprecated", "readOnly", "writeOnly",
                         "$schema", "$comment", "discriminator"))
OBJECT_KEYS = ("properties", "required", "additionalProperties")
ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems")
STRING_KEYS = ("minLength", "maxLength")
NUMBER_KEYS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
# string formats, each the items of its content: a literal character, (NUMBER, digits, lowest, highest or None for
# the days of the month given before), (HEX, digits), FRACTION (an optional '.' and 1 to 9 digits) or OFFSET (Z or
# +hh:mm/-hh:mm); RFC 3339's date, time and date-time (upper-case T and Z) and RFC 4122's uuid
DIGITS, HEX_DIGITS, FRACTION, OFFSET = "digits", "hex", "fraction", "offset"
HOURS, MINUTES = (DIGITS, 2, 0, 23), (DIGITS, 2, 0, 59)
_DATE = ((DIGITS, 4, 1, 9999), "-", (DIGITS, 2, 1, 12), "-", (DIGITS, 2, 1, None))
_TIME = (HOURS, ":", MINUTES, ":", MINUTES, FRACTION, OFFSET)
FORMATS = {"date": _DATE, "time": _TIME, "date-time": _DATE + ("T",) + _TIME,
           "uuid": ((HEX_DIGITS, 8), "-", (HEX_DIGITS, 4), "-", (HEX_DIGITS, 4), "-", (HEX_DIGITS, 4), "-",
                    (HEX_DIGITS, 12))}
INFINITE = math.inf
# string formats as regexes (whole strings), each with its most characters: RFC 1123 host names (labels of 1 to 63
# letters, digits and inner hyphens, 253 characters in all), e-mail addresses (RFC 5322's dot-atom of at most 32
# characters with single dots between them, so within RFC 5321's 64; '@'; a host name of two labels or more, the last
# beginning with a letter, as the email-validator package behind Pydantic's EmailStr asks; 254 characters), IPv4
# and IPv6 addresses as Python's ipaddress takes them (no leading zeros; the text forms of RFC 4291, '::' and an IPv4
# tail, no zone) and RFC 3339's durations (appendix A: weeks alone)
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16, _LS32 = "[0-9A-Fa-f]{1,4}", rf"(?:[0-9A-Fa-f]{{1,4}}:[0-9A-Fa-f]{{1,4}}|{_IPV4})"
_IPV6 = "|".join([f"(?:{_H16}:){{6}}{_LS32}", f"::(?:{_H16}:){{5}}{_LS32}", f"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}"] +
                 [f"(?:(?:{_H16}:){{0,{k}}}{_H16})?::{tail}" for k, tail in (
                     (1, f"(?:{_H16}:){{3}}{_LS32}"), (2, f"(?:{_H16}:){{2}}{_LS32}"), (3, f"{_H16}:{_LS32}"),
                     (4, _LS32), (5, _H16), (6, ""))])
_DUR_TIME = "T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_DURATION = f"P(?:(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)(?:{_DUR_TIME})?|{_DUR_TIME}|[0-9]+W)"
_ATEXT = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # a domain's last label: not all digits
_EMAIL = rf"{_ATEXT}(?:\.?{_ATEXT}){{0,31}}@(?:{_LABEL}\.)+{_TOP_LABEL}"
# RFC 3986's URIs and URI references (ASCII; an IPv4 address is a reg-name too), RFC 6570's URI templates (ASCII
# literals), RFC 6901's JSON pointers and relative JSON pointers (draft-handrews-relative-json-pointer-01: a whole
# number, then '#' or a JSON pointer)
_PCT = "%[0-9A-Fa-f]{2}"
_PLAIN = "A-Za-z0-9._~!$&'()*+,;="  # a class's unreserved characters and sub-delims ('-' added last)
_PCHAR = f"(?:[{_PLAIN}:@-]|{_PCT})"
_SEGMENTS = f"(?:/{_PCHAR}*)*"
_ROOTLESS = f"{_PCHAR}+{_SEGMENTS}"
_HOST = rf"\[(?:{_IPV6}|[vV][0-9A-Fa-f]+\.[{_PLAIN}:-]+)\]|(?:[{_PLAIN}-]|{_PCT})*"
_HIER = f"//(?:(?:[{_PLAIN}:-]|{_PCT})*@)?(?:{_HOST})(?::[0-9]*)?{_SEGMENTS}|/(?:{_ROOTLESS})?"  # or an absolute path
_URI_TAIL = rf"(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?"  # the query and the fragment
_URI = f"[A-Za-z][A-Za-z0-9+.-]*:(?:{_HIER}|{_ROOTLESS})?{_URI_TAIL}"
_RELATIVE_REF = f"(?:{_HIER}|(?:[{_PLAIN}@-]|{_PCT})+{_SEGMENTS})?{_URI_TAIL}"  # no ':' in the first segment
_VARCHAR = f"(?:[A-Za-z0-9_]|{_PCT})"
_VARSPEC = rf"{_VARCHAR}(?:\.?{_VARCHAR})*(?::[1-9][0-9]{{0,3}}|\*)?"
_URI_TEMPLATE = (rf"(?:[\x21\x23\x24\x26\x28-\x3B\x3D\x3F-\x5B\x5D\x5F\x61-\x7A\x7E]|{_PCT}|"
                 rf"\{{[+#./;?&=,!@|]?{_VARSPEC}(?:,{_VARSPEC})*\}})*")
_JSON_POINTER = "(?:/(?:[^/~]|~[01])*)*"
REGEX_FORMATS = {"email": (_EMAIL, 254), "hostname": (_HOSTNAME, 253), "ipv4": (_IPV4, INFINITE),
                 "ipv6": (_IPV6, INFINITE), "duration": (_DURATION, INFINITE), "uri": (_URI, INFINITE),
                 "uri-reference": (f"{_URI}|{_RELATIVE_REF}", INFINITE), "uri-template": (_URI_TEMPLATE, INFINITE),
                 "json-pointer": (_JSON_POINTER, INFINITE),
                 "relative-json-pointer": (f"(?:0|[1-9][0-9]*)(?:#|{_JSON_POINTER})", INFINITE)}
# what a pattern's or regex format's content never holds: the characters JSON writes with an escape (the content is
# written without escapes), and ECMA-262's non-ASCII white space and line terminators (so that \S and . hold as
# ECMA-262 reads them, where this module's \s is ASCII only)
UNWRITTEN = '"\\' + "".join(map(chr, range(0x20))) + "\u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
MAX_PATTERN_STATES = 5_000  # automaton states of a pattern (or format) with a length bound, searched at compile time
# lengths (code points) a pattern's length table tracks: beside a pattern a maxLength above it is held at it (fewer
# values), a minLength above it refused; the table's work grows with the square of the lengths
MAX_PATTERN_LENGTH = 4096
# an integer written in the output is below it (its digits are jm.MAX_NUMBER_DIGITS at most; a number has its exponent)
WIDEST_INTEGER = 10**jm.MAX_NUMBER_DIGITS
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
KNOWN = ANNOTATIONS | frozenset(("type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
                                 "format", "pattern", "multipleOf") + OBJECT_KEYS + ARRAY_KEYS + STRING_KEYS +
                                NUMBER_KEYS)

# what comes next in a thread (the first item of its `next` tuple)
(VALUE, KEY0, KEY, COLON, ITEM0, AFTER, LITERAL, FREE, BOUNDED, NUMBER, NUMBER_LITERAL, WORD, END, RANGE,
 FORMAT, PATTERN) = range(16)
# frames of open containers: (OBJECT, alternative, index of the last property given or -1) and
# (ARRAY, alternative, values begun)
OBJECT, ARRAY = 0, 1
_END = ((), (END,))
SIMPLE = {0x22: b'\\"', 0x5C: b"\\\\", 0x2F: b"\\/", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r",
          0x09: b"\\t"}


class SchemaError(InputError):
    """A JSON schema this module cannot compile; the message names the keyword and where it is."""


class _Alternative:
    """One concrete choice for a value: kind is "object", "array", "string" (any), "number", "integer", "null",
    "true", "false", "strings" (enum strings, `targets`) or "numbers" (enum numbers' spellings, `targets`)."""

    def __init__(self, kind: str, **fields):
        self.kind = kind
        self.targets: tuple[bytes, ...] = ()
        self.names: tuple[bytes, ...] = ()  # an object's property names, UTF-8, in order
        self.values: tuple[int, ...] = ()  # their schemas
        self.required: tuple[bool, ...] = ()
        self.additional: int | None = None  # an object without properties: the schema of its values
        self.prefix: tuple[int, ...] = ()  # an array's first items' schemas (an enum array's, one each)
        self.items: int | None = None  # the schema of the items after them; None: no more
        self.min_items, self.max_items = 0, INFINITE
        self.min_length, self.max_length = 0, INFINITE  # a string's, in code points
        self.format: str | None = None  # a string's format, a key of FORMATS
        self.automaton = None  # a string's pattern or regex format: an rx.Regex, or a _Bounded one with a length bound
        # a number's or integer's bounds, each None or (a Fraction, whether it is excluded); an integer's inclusive
        self.lower: tuple | None = None
        self.upper: tuple | None = None
        self.multiple = 1  # an integer's multipleOf
        self.depth = INFINITE  # the fewest containers open in a value it takes (0 for a scalar)
        for name, value in fields.items():
            setattr(self, name, value)

    def item(self, k: int) -> int | None:
        return self.prefix[k] if k < len(self.prefix) else self.items


class Schema:
    """A compiled schema: its (sub)schemas by id (`root` the whole, `any` any JSON value), each with its
    alternatives (`choices`), and the recognizer over them (`initial`, `advance`, `complete`). Equal (and hashed)
    by its canonical JSON."""

    def __init__(self, canonical: str, schema):
        self.canonical = canonical
        if isinstance(schema, dict) and "$id" in schema:  # the root's base URI: `#` pointers still point here
            if not isinstance(schema["$id"], str):
                raise SchemaError(f"$id at # must be a string (a URI), got {_short(schema['$id'])}")
            schema = {key: value for key, value in schema.items() if key != "$id"}
        self._document = schema
        self._ids: dict[str, int] = {}  # a JSON pointer's schema id
        self._entries: list = []  # per schema id: ("alternatives", ids) or ("union", schema ids)
        self.alternatives: list[_Alternative] = []
        self._nesting = 0
        self.any = self._new_entry()  # the schema of any JSON value
        self._entries[self.any] = ("alternatives", tuple(self._alternative(kind, **fields) for kind, fields in (
            ("object", {"additional": self.any}), ("array", {"items": self.any}), ("string", {}), ("number", {}),
            ("true", {}), ("false", {}), ("null", {}))))
        self.root = self._compile(schema, "#")
        self.choices = [self._expand(i, set()) for i in range(len(self._entries))]  # alternative ids per schema
        self.depths = self._depths()
        if self.depths[self.root] == INFINITE:  # no value at all, at any depth: not a matter of nesting
            raise SchemaError("no JSON value satisfies this schema: a value it describes needs what it cannot hold "
                              "(an array's minItems past its prefixItems with items false, required properties "
                              "that nest without end, a $ref to itself alone)")
        if self.depths[self.root] > jm.MAX_DEPTH:
            raise SchemaError(f"no JSON value within {jm.MAX_DEPTH} levels of nesting satisfies this schema")
        self.initial = (jm.ANY_VALUE, frozenset({((), (VALUE, self.root))}))

    def __eq__(self, other):
        return isinstance(other, Schema) and other.canonical == self.canonical

    def __hash__(self):
        return hash(self.canonical)

    def __repr__(self):
        return f"Schema({self.canonical[:80]})"

    # compiling

    def _new_entry(self, entry=None) -> int:
        self._entries.append(entry)
        return len(self._entries) - 1

    def _alternative(self, kind: str, **fields) -> int:
        self.alternatives.append(_Alternative(kind, **fields))
        return len(self.alternatives) - 1

    def _nested(self, path: str) -> None:
        self._nesting += 1
        if self._nesting > MAX_NESTING:
            raise SchemaError(f"the schema nests more than {MAX_NESTING} levels at {path[:200]}")

    def _compile(self, schema, path: str) -> int:
        if path in self._ids:
            return self._ids[path]
        self._nested(path)
        try:
            return self._compiled(schema, path)
        finally:
            self._nesting -= 1

    def _compiled(self, schema, path: str) -> int:
        sid = self._ids[path] = self._new_entry()
        if schema is True:
            self._entries[sid] = ("union", (self.any,))
            return sid
        if schema is False:
            self._entries[sid] = ("alternatives", ())
            return sid
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or true/false, got {_short(schema)} at {path}")
        for key in schema:
            if key == "$id":
                raise SchemaError(f"$id at {path} is taken at the root only (a nested one changes what the '#' "
                                  "pointers of the $refs inside it point to)")
            if key not in KNOWN:
                raise SchemaError(f"the keyword {json.dumps(key)[:60]} at {path} is not supported")
        for key in ("$defs", "definitions"):
            if key in schema and not isinstance(schema[key], dict):
                raise SchemaError(f"{key} at {path} must be an object")
        combinators = [key for key in ("$ref", "anyOf", "oneOf", "allOf") if key in schema]
        if combinators:
            key = combinators[0]
            others = [k for k in schema if k not in ANNOTATIONS | {"$defs", "definitions", key}]
            if others:
                raise SchemaError(f"{others[0]} beside {key} at {path} is not supported")
            if key == "$ref":
                self._entries[sid] = ("union", (self._ref(schema[key], f"{path}/$ref"),))
                return sid
            branches = schema[key]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"{key} at {path} must be a non-empty list of schemas")
            if key == "allOf" and len(branches) > 1:
                raise SchemaError(f"allOf of more than one schema at {path} is not supported")
            self._entries[sid] = ("union", tuple(self._compile(b, f"{path}/{key}/{i}") for i, b in enumerate(branches)))
            return sid
        self._entries[sid] = ("alternatives", self._typed(schema, path))
        return sid

    def _ref(self, ref, path: str) -> int:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"$ref at {path} must be '#' or a JSON pointer into this schema ('#/$defs/...'), got "
                              f"{_short(ref)}")
        target = self._document
        try:  # a $ref is a URI reference: its fragment is the pointer percent-encoded (RFC 6901, section 6)
            pointer = urllib.parse.unquote(ref[2:], errors="strict")
        except UnicodeDecodeError:
            raise SchemaError(f"$ref {_short(ref)} at {path} percent-encodes bytes that are not UTF-8") from None
        canonical = "#"  # the target's path as its schema's own is written, the key it is compiled under
        for part in pointer.split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            canonical += f"/{_pointer(part)}"
            index = re.fullmatch("0|[1-9][0-9]{0,17}", part)  # an array index: ASCII digits, no leading zero
            if isinstance(target, list) and index and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise SchemaError(f"$ref {_short(ref)} at {path} points to nothing")
        return self._compile(target, canonical)

    def _typed(self, schema: dict, path: str) -> tuple[int, ...]:
        kinds = schema.get("type")
        if kinds is None:
            kinds = ["object"] if any(k in schema for k in OBJECT_KEYS) else \
                ["array"] if any(k in schema for k in ARRAY_KEYS) else \
                ["string"] if any(k in schema for k in STRING_KEYS + ("format", "pattern")) else \
                ["integer"] if "multipleOf" in schema else \
                ["number"] if any(k in schema for k in NUMBER_KEYS) else list(TYPES)
        elif isinstance(kinds, str):
            kinds = [kinds]
        if not isinstance(kinds, list) or not kinds or any(k not in TYPES for k in kinds):
            raise SchemaError(f"type at {path} must be one of {', '.join(TYPES)} or a list of them, "
                              f"got {_short(schema['type'])}")
        if "format" in schema and (not isinstance(schema["format"], str) or
                                   schema["format"] not in FORMATS and schema["format"] not in REGEX_FORMATS):
            raise SchemaError(f"the format {_short(schema['format'])} at {path} is not supported (only "
                              f"{', '.join([*FORMATS, *REGEX_FORMATS])})")
        if "integer" in kinds and "number" in kinds:
            kinds = [k for k in kinds if k != "integer"]
        if "enum" in schema or "const" in schema:
            return self._literals(schema, kinds, path)
        found = []
        for kind in dict.fromkeys(kinds):
            if kind == "object":
                found.append(self._object(schema, path))
            elif kind == "array":
                found.append(self._array(schema, path))
            elif kind == "boolean":
                found += [self._alternative("true"), self._alternative("false")]
            elif kind == "string":
                found.append(self._string(schema, path))
            elif kind in ("number", "integer"):
                bounds = _number_bounds(schema, kind, path)
                found.append(self._alternative(kind, multiple=_multiple_of(schema, kind, bounds, path), **bounds))
            else:
                found.append(self._alternative(kind))
        return tuple(found)

    def _string(self, schema: dict, path: str) -> int:
        low, high = _bounds(schema, STRING_KEYS, path)
        name, pattern = schema.get("format"), schema.get("pattern")
        if name is not None and pattern is not None:
            raise SchemaError(f"pattern beside format at {path} is not supported")
        if name in FORMATS:
            if low or high < INFINITE:
                raise SchemaError(f"format beside minLength/maxLength at {path} is not supported (only beside "
                                  f"{', '.join(REGEX_FORMATS)})")
            return self._alternative("string", format=name)
        if pattern is not None:
            regex, where = _pattern(pattern, path), f"the pattern at {path}"
        elif name is not None:
            regex, most = rx.compile_regex(REGEX_FORMATS[name][0], excluded=UNWRITTEN), REGEX_FORMATS[name][1]
            where, high = f"the format {name} at {path}", min(high, most)
            if low > high:
                raise SchemaError(f"minLength at {path} is above the format {name}'s most characters ({most})")
        else:
            return self._alternative("string", min_length=low, max_length=high)
        if not low and high == INFINITE:
            return self._alternative("string", automaton=regex)
        if low > MAX_PATTERN_LENGTH:
            raise SchemaError(f"minLength at {path} beside {where.split(' at ')[0]} is above {MAX_PATTERN_LENGTH}, the "
                              "longest string such a pair is held to here")
        high = min(high, MAX_PATTERN_LENGTH)
        lengths = _lengths(regex, low, high)
        if lengths is None:
            raise SchemaError(f"{where} with minLength/maxLength is too complex: its automaton has more than "
                              f"{MAX_PATTERN_STATES} states")
        automaton = _Bounded(regex, low, high, lengths)
        if automaton.initial is None:
            raise SchemaError(f"no string of {where} has a length within its minLength/maxLength")
        return self._alternative("string", automaton=automaton)

    def _object(self, schema: dict, path: str) -> int:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaError(f"properties at {path} must be an object")
        required = schema.get("required", [])
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise SchemaError(f"required at {path} must be a list of property names")
        for name in required:
            if name not in properties:
                raise SchemaError(f"required at {path} names {json.dumps(name)[:60]}, which is not in its properties")
        additional = schema.get("additionalProperties", True)
        if not isinstance(additional, (bool, dict)):
            raise SchemaError(f"additionalProperties at {path} must be a schema")
        names = tuple(_utf8(name, f"{path}/properties") for name in properties)
        values = tuple(self._compile(value, f"{path}/properties/{_pointer(name)}")
                       for name, value in properties.items())
        free = None
        given = isinstance(additional, dict) and bool(additional)  # a schema of the other keys' values
        if given and properties:
            raise SchemaError(f"additionalProperties as a schema beside properties at {path} is not supported")
        if given or "properties" not in schema and additional is not False:  # an empty `properties` lists no key
            free = self._compile(additional, f"{path}/additionalProperties")
        return self._alternative("object", names=names, values=values,
                                 required=tuple(name in required for name in properties), additional=free)

    def _array(self, schema: dict, path: str) -> int:
        items, prefix = schema.get("items", True), schema.get("prefixItems", [])
        if not isinstance(items, (bool, dict)):
            raise SchemaError(f"items at {path} must be one schema (a list of schemas is draft 4's tuple: write it "
                              f"as prefixItems)")
        if not isinstance(prefix, list):
            raise SchemaError(f"prefixItems at {path} must be a list of schemas")
        bounds = _bounds(schema, ARRAY_KEYS[2:], path)
        return self._alternative("array", items=self._compile(items, f"{path}/items"), min_items=bounds[0],
                                 max_items=bounds[1], prefix=tuple(self._compile(item, f"{path}/prefixItems/{i}")
                                                                   for i, item in enumerate(prefix)))

    def _literals(self, schema: dict, kinds: list[str], path: str) -> tuple[int, ...]:
        self._nested(path)
        try:
            return self._literal_values(schema, kinds, path)
        finally:
            self._nesting -= 1

    def _literal_values(self, schema: dict, kinds: list[str], path: str) -> tuple[int, ...]:
        values = None
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"enum at {path} must be a non-empty list")
        if "const" in schema:
            values = [schema["const"]] if values is None else [v for v in values if _same(v, schema["const"])]
            if not values:
                raise SchemaError(f"const at {path} is none of its enum's values: no value satisfies both")
        others = [k for k in schema if k not in ANNOTATIONS | {"type", "enum", "const", "$defs", "definitions"}]
        if others:
            raise SchemaError(f"{others[0]} beside enum/const at {path} is not supported")
        values = [v for v in values if _type_of(v) in kinds or _type_of(v) == "integer" and "number" in kinds]
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) >= WIDEST_INTEGER for v in values):
            raise SchemaError(f"an integer of the enum/const at {path} has more than {jm.MAX_NUMBER_DIGITS} digits, "
                              "more than a number of the output may hold")
        if not values:
            raise SchemaError(f"no value of the enum/const at {path} has its type")
        strings = tuple(dict.fromkeys(_utf8(v, path) for v in values if isinstance(v, str)))
        numbers = tuple(dict.fromkeys(json.dumps(v).encode() for v in values if _type_of(v) in ("integer", "number")))
        found = [self._alternative("strings", targets=strings)] if strings else []
        found += [self._alternative("numbers", targets=numbers)] if numbers else []
        for value in values:
            if value is None or isinstance(value, bool):
                found.append(self._alternative(json.dumps(value)))
            elif isinstance(value, dict):
                consts = tuple(self._new_entry(("alternatives", self._literals({"const": v}, list(TYPES), path)))
                               for v in value.values())
                found.append(self._alternative("object", names=tuple(_utf8(k, path) for k in value), values=consts,
                                               required=(True,) * len(value)))
            elif isinstance(value, list):
                consts = tuple(self._new_entry(("alternatives", self._literals({"const": v}, list(TYPES), path)))
                               for v in value)
                found.append(self._alternative("array", prefix=consts, min_items=len(value), max_items=len(value)))
        return tuple(dict.fromkeys(found))

    def _expand(self, sid: int, seen: set) -> tuple[int, ...]:
        """The alternatives of schema `sid`, its unions' and refs' flattened (a cycle adds nothing)."""
        if sid in seen:
            return ()
        seen.add(sid)
        kind, ids = self._entries[sid]
        if kind == "alternatives":
            return ids
        return tuple(dict.fromkeys(a for i in ids for a in self._expand(i, seen)))

    def _depths(self) -> list[float]:
        """Each schema's fewest containers open in a value it takes (infinite where none is finite), by
        iterating to the fixed point; alternatives keep theirs in `depth`."""
        depths = [INFINITE] * len(self._entries)
        for _ in range(len(self.alternatives) + len(self._entries) + 2):
            for alternative in self.alternatives:
                if alternative.kind == "object":
                    inside = [depths[v] for v, needed in zip(alternative.values, alternative.required) if needed]
                elif alternative.kind == "array":
                    count = alternative.min_items
                    inside = [depths[alternative.item(k)] if alternative.item(k) is not None else INFINITE
                              for k in range(min(count, len(alternative.prefix) + 1))]
                else:
                    alternative.depth = 0
                    continue
                alternative.depth = 1 + max(inside, default=0)
            new = [min((self.alternatives[a].depth for a in choices), default=INFINITE) for choices in self.choices]
            if new == depths:
                break
            depths = new
        return depths

    # recognizing

    def fits(self, sid: int | None, open_containers: int) -> bool:
        return sid is not None and open_containers + self.depths[sid] <= jm.MAX_DEPTH

    def advance(self, state, byte: int):
        """The state after one more byte, or None where no value the schema takes begins with the bytes."""
        lexical, threads = state
        if lexical[0] == jm.NUMBER and not lexical[2]:  # a top-level number: nothing may follow it
            after = jm.advance((jm.NUMBER, lexical[1], "[", lexical[3]), byte)
            after = (jm.NUMBER, after[1], "", after[3]) if after is not None and after[0] == jm.NUMBER else None
        else:
            after = jm.advance(lexical, byte)
        if after is None:
            return None
        if lexical[0] in jm.SPACED and byte in jm.WHITESPACE:
            return after, threads
        found = set()
        for frames, next_ in threads:
            found.update(self._step(frames, next_, lexical, after, byte))
        return (after, frozenset(found)) if found else None

    def complete(self, state) -> bool:
        """Whether the bytes so far are a whole value the schema takes."""
        lexical, threads = state
        if lexical[0] == jm.DONE:
            return any(next_[0] == END for _, next_ in threads)
        if lexical[0] != jm.NUMBER or lexical[2] or lexical[1] not in jm.NUMBER_ENDS:
            return False
        return any(next_[0] == NUMBER or next_[0] == NUMBER_LITERAL and next_[2] in map(len, next_[1]) or
                   next_[0] == RANGE and _in_range(self.alternatives[next_[1]], next_[2], True)
                   for _, next_ in threads)

    def string_room(self, state) -> float | None:
        """Inside a string that every thread takes free or bounded only in length: the most characters that
        may still come (infinite if free); else None."""
        if state[0][0] != jm.STRING or not all(next_[0] in (FREE, BOUNDED) for _, next_ in state[1]):
            return None
        return max(INFINITE if next_[0] == FREE else self.alternatives[next_[1]].max_length - next_[2]
                   for _, next_ in state[1])

    def _done(self, frames) -> list:
        return [(frames, (AFTER,))] if frames else [_END]

    def _step(self, frames, next_, lexical, after, byte) -> list:
        kind = next_[0]
        closed = lexical[0] == jm.STRING and byte == 0x22
        if kind == FREE:
            if closed:
                return self._string_done(frames, after[0] == jm.COLON, None)
            return [(frames, next_)]
        if kind == LITERAL:
            return self._literal(frames, next_, after, byte, closed)
        if kind == BOUNDED:
            return self._bounded(frames, next_, lexical, byte, closed)
        if kind == FORMAT:  # the content is ASCII, written without escapes
            _, a, text = next_
            if closed:
                return self._done(frames) if _formatted(self.alternatives[a].format, text)[1] else []
            text += chr(byte)
            return [(frames, (FORMAT, a, text))] if _formatted(self.alternatives[a].format, text)[0] else []
        if kind == PATTERN:
            return self._pattern(frames, next_, byte, closed)
        if kind == VALUE:
            return self._start(frames, next_[1], byte)
        if kind == NUMBER or kind == NUMBER_LITERAL or kind == RANGE:
            if after[0] == jm.NUMBER:
                if kind == NUMBER:
                    return [] if next_[1] and byte in b".eE" else [(frames, next_)]
                if kind == RANGE:
                    alternative, text = self.alternatives[next_[1]], next_[2] + bytes((byte,))
                    if alternative.kind == "integer" and byte in b".eE" or not _in_range(alternative, text):
                        return []
                    return [(frames, (RANGE, next_[1], text))]
                _, targets, position = next_
                kept = tuple(t for t in targets if len(t) > position and t[position] == byte)
                return [(frames, (NUMBER_LITERAL, kept, position + 1))] if kept else []
            if kind == NUMBER_LITERAL and next_[2] not in map(len, next_[1]):
                return []
            if kind == RANGE and not _in_range(self.alternatives[next_[1]], next_[2], True):
                return []
            if byte in jm.WHITESPACE:  # the number ended: the byte is the first after it
                return self._done(frames)
            return self._step(frames, (AFTER,), lexical, after, byte)
        if kind == WORD:
            return [(frames, next_)] if after[0] == jm.LITERAL else self._done(frames)
        top, alternative, index = frames[-1] if frames else (None, None, None)
        alternative = self.alternatives[alternative] if frames else None
        if kind == COLON:
            value = alternative.additional if alternative.additional is not None else alternative.values[index]
            return [(frames, (VALUE, value))]
        if kind == KEY0 or kind == KEY:
            if byte == 0x7D:
                return self._close(frames)
            return self._key(frames, alternative, index)
        if kind == ITEM0:
            if byte == 0x5D:
                return self._close(frames)
            if alternative.max_items < 1:
                return []
            return self._start(frames[:-1] + ((ARRAY, frames[-1][1], 1),), alternative.item(0), byte)
        if kind == AFTER:
            if byte == 0x2C:
                if top == OBJECT:  # only where a key may follow
                    return [(frames, (KEY,))] if self._key(frames, alternative, index) else []
                item = alternative.item(index)
                if index < alternative.max_items and self.fits(item, len(frames)):
                    return [(frames[:-1] + ((ARRAY, frames[-1][1], index + 1),), (VALUE, item))]
                return []
            return self._close(frames)
        return []  # END

    def _start(self, frames, sid, byte) -> list:
        """The threads after the first byte of a value of schema `sid`."""
        found = []
        depth = len(frames)
        for a in self.choices[sid]:
            alternative = self.alternatives[a]
            if depth + alternative.depth > jm.MAX_DEPTH:
                continue
            kind = alternative.kind
            if byte == 0x22:
                if kind == "string" and alternative.format:
                    found.append((frames, (FORMAT, a, "")))
                elif kind == "string" and alternative.automaton is not None:
                    found.append((frames, (PATTERN, a, alternative.automaton.initial)))
                elif kind == "string" and (alternative.min_length or alternative.max_length < INFINITE):
                    found.append((frames, (BOUNDED, a, 0, False, "")))
                elif kind == "string":
                    found.append((frames, (FREE,)))
                elif kind == "strings":
                    found.append((frames, (LITERAL, alternative.targets, 0, b"")))
            elif byte == 0x7B:
                if kind == "object":
                    found.append((frames + ((OBJECT, a, -1),), (KEY0,)))
            elif byte == 0x5B:
                if kind == "array":
                    found.append((frames + ((ARRAY, a, 0),), (ITEM0,)))
            elif byte == 0x2D or 0x30 <= byte <= 0x39:
                if (kind == "number" or kind == "integer") and (alternative.lower or alternative.upper or
                                                                alternative.multiple > 1):
                    if _in_range(alternative, bytes((byte,))):
                        found.append((frames, (RANGE, a, bytes((byte,)))))
                elif kind == "number" or kind == "integer":
                    found.append((frames, (NUMBER, kind == "integer")))
                elif kind == "numbers":
                    kept = tuple(t for t in alternative.targets if t[0] == byte)
                    if kept:
                        found.append((frames, (NUMBER_LITERAL, kept, 1)))
            elif kind[0] == chr(byte) and kind in ("true", "false", "null"):
                found.append((frames, (WORD,)))
        return found

    def _key(self, frames, alternative: _Alternative, index: int) -> list:
        """The threads after the quote that opens a key of the object in frames[-1]."""
        if not alternative.names:
            return [(frames, (FREE,))] if self.fits(alternative.additional, len(frames)) else []
        names = []
        for j in range(index + 1, len(alternative.names)):
            if self.fits(alternative.values[j], len(frames)):
                names.append(alternative.names[j])
            if alternative.required[j]:
                break
        return [(frames, (LITERAL, tuple(names), 0, b""))] if names else []

    def _close(self, frames) -> list:
        kind, a, index = frames[-1]
        alternative = self.alternatives[a]
        if kind == OBJECT:
            if any(alternative.required[index + 1:]):
                return []
        elif index < alternative.min_items:
            return []
        return self._done(frames[:-1])

    def _string_done(self, frames, key: bool, name: bytes | None) -> list:
        if not key:
            return self._done(frames)
        kind, a, _ = frames[-1]
        index = -1 if name is None else self.alternatives[a].names.index(name)
        return [(frames[:-1] + ((OBJECT, a, index),), (COLON,))]

    def _bounded(self, frames, next_, lexical, byte, closed) -> list:
        """A string value with a length in code points, as json.loads counts them: a character, raw or escaped, is
        one, and so is a \\u escape of a surrogate pair (the high half is counted, the low one not; the lexical
        state holds the pair together).
        `next_` is (BOUNDED, alternative, characters so far, whether the last was a high surrogate's \\u escape,
        the hex digits of the \\u escape being read)."""
        _, a, count, high, digits = next_
        alternative = self.alternatives[a]
        room = count < alternative.max_length
        if closed:
            return self._done(frames) if count >= alternative.min_length else []
        mode = lexical[0]
        if mode == jm.STRING:
            if lexical[1] & 7:  # a UTF-8 continuation byte
                return [(frames, next_)]
            if byte == 0x5C:  # counted where the escape ends
                return [(frames, next_)] if room else []
            return [(frames, (BOUNDED, a, count + 1, False, ""))] if room else []
        if mode == jm.ESCAPE:
            if byte == 0x75:
                return [(frames, next_)]
            return [(frames, (BOUNDED, a, count + 1, False, ""))] if room else []
        if lexical[1] & 15 in (jm.U_BACKSLASH, jm.U_U):  # the \\u of a pair's low half
            return [(frames, next_)]
        digits += chr(byte).lower()  # UNICODE
        if not room and not (high and "dc00"[:len(digits)] <= digits <= "dfff"):
            return []  # full: only the low half of a pair may come
        if len(digits) < 4:
            return [(frames, (BOUNDED, a, count, high, digits))]
        value = int(digits, 16)
        if high and 0xDC00 <= value <= 0xDFFF:
            return [(frames, (BOUNDED, a, count, False, ""))]
        return [(frames, (BOUNDED, a, count + 1, 0xD800 <= value <= 0xDBFF, ""))]

    def _pattern(self, frames, next_, byte, closed) -> list:
        """A string held to a regex (a pattern or a format), its content written without escapes (the regex takes no
        character that needs one). `next_` is (PATTERN, alternative, the state of its automaton)."""
        _, a, state = next_
        automaton = self.alternatives[a].automaton
        if closed:
            return self._done(frames) if automaton.accepting(state) else []
        state = automaton.advance(state, byte)
        return [] if state is None else [(frames, (PATTERN, a, state))]

    def string_automata(self, state) -> list | None:
        """Inside a string that every thread holds to an automaton (a pattern or a regex format): the (automaton,
        its state) pairs; else None."""
        if state[0][0] != jm.STRING or not all(next_[0] == PATTERN for _, next_ in state[1]):
            return None
        return [(self.alternatives[next_[1]].automaton, next_[2]) for _, next_ in state[1]]

    def _literal(self, frames, next_, after, byte, closed) -> list:
        """A string held to `targets` (enum strings, property names): each character in any JSON spelling."""
        _, targets, position, typed = next_
        if closed:
            if typed:
                return []
            ended = [t for t in targets if len(t) == position]
            return self._string_done(frames, after[0] == jm.COLON, ended[0]) if ended else []
        typed += bytes((byte,))
        if len(typed) > 2 and typed[0] == 0x5C:
            typed = typed[:2] + typed[2:].lower()
        whole, part = [], []
        for target in targets:
            if position >= len(target):
                continue
            for spelling in _spellings(target[position:position + _width(target[position])]):
                if spelling == typed:
                    whole.append(target)
                elif spelling.startswith(typed):
                    part.append(target)
        found = []
        if whole:
            width = _width(whole[0][position])
            found.append((frames, (LITERAL, tuple(dict.fromkeys(whole)), position + width, b"")))
        if part:
            found.append((frames, (LITERAL, tuple(dict.fromkeys(part)), position, typed)))
        return found


@lru_cache(maxsize=4096)
def _spellings(character: bytes) -> tuple[bytes, ...]:
    """The ways JSON writes one character (its UTF-8 bytes) inside a string, \\u escapes in lower case."""
    code = ord(character.decode())
    found = [] if code < 0x20 or code in (0x22, 0x5C) else [character]
    if code in SIMPLE:
        found.append(SIMPLE[code])
    if code < 0x10000:
        found.append(b"\\u%04x" % code)
    else:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        found.append(b"\\u%04x\\u%04x" % (high, low))
    return tuple(found)


def _width(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _bounds(schema: dict, keys: tuple[str, str], path: str) -> tuple:
    """The (low, high) bounds that `keys` (minItems and maxItems, minLength and maxLength) give."""
    low, high = schema.get(keys[0], 0), schema.get(keys[1], INFINITE)
    for key, value in zip(keys, (low, high)):
        if value is not INFINITE and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise SchemaError(f"{key} at {path} must be a whole number >= 0, got {_short(value)}")
    if low > high:
        raise SchemaError(f"{keys[0]} at {path} is above its {keys[1]}")
    return low, high


def _formatted(name: str, text: str) -> tuple[bool, bool]:
    """(whether `text` begins a string of the format, whether it is one)."""
    items, at, values = list(FORMATS[name]), 0, []
    while items:
        item = items.pop(0)
        if at == len(text):
            return True, False
        if item == FRACTION:
            if text[at] != ".":
                continue
            digits = len(text[at + 1:]) - len(text[at + 1:].lstrip("0123456789"))
            if at + 1 + digits == len(text) and digits <= 9:
                return True, False
            if not 1 <= digits <= 9:
                return False, False
            at += 1 + digits
        elif item == OFFSET:
            if text[at] in "+-":
                items = [HOURS, ":", MINUTES]
            elif text[at] != "Z":
                return False, False
            at += 1
        elif isinstance(item, str):
            if text[at] != item:
                return False, False
            at += 1
        else:
            part = text[at:at + item[1]]
            if item[0] == HEX_DIGITS:
                if part.strip("0123456789abcdefABCDEF"):
                    return False, False
            else:
                high = item[3] or calendar.monthrange(*values[:2])[1]
                missing = item[1] - len(part)
                if part.strip("0123456789") or int(part + "0" * missing) > high or int(part + "9" * missing) < item[2]:
                    return False, False
                values.append(int(part))
            if len(part) < item[1]:
                return True, False
            at += item[1]
    return at == len(text), at == len(text)


def _pattern(pattern, path: str) -> rx.Regex:
    """A `pattern` (ECMA-262, unanchored: it matches anywhere in the string) as a regex of the content this mode
    writes; SchemaError where regex.py does not take it or no such content matches it."""
    if not isinstance(pattern, str):
        raise SchemaError(f"pattern at {path} must be a string (a regex), got {_short(pattern)}")
    try:
        return rx.compile_regex(pattern, search=True, excluded=UNWRITTEN)
    except rx.RegexError:
        try:
            rx.compile_regex(pattern, search=True)
        except rx.RegexError as e:
            raise SchemaError(f"pattern at {path}: {e}") from None
    raise SchemaError(f"pattern at {path}: every string it matches holds a '\"', a '\\', a control character or a "
                      "non-ASCII space, which this mode does not write (a string's content is written without escapes)")


@lru_cache(maxsize=CACHED_SCHEMAS)
def _lengths(regex: rx.Regex, low: int, high: float) -> dict | None:
    """Per state of `regex` reachable from its start: the lengths in code points of the texts that complete it, as
    an int's bits (bit n: a completion of n characters), none above `high`; where `high` is infinite, bit `low`
    stands for every length from `low` on. None where the regex has more than MAX_PATTERN_STATES states."""
    cap = low if high == INFINITE else high
    full = (1 << (cap + 1)) - 1
    before: dict = {regex.initial: []}  # per state, the (state, characters added) pairs that reach it by a byte
    # the bytes that begin a run of bytes the regex reads alike and alike a character's first byte or not: one of each
    # run is read
    starts = sorted({0x80, 0xC0}.union(regex.byte_runs()))
    todo = [regex.initial]
    while todo:
        state = todo.pop()
        for byte in starts:
            after = regex.advance(state, byte)
            if after is None:
                continue
            if after not in before:
                if len(before) >= MAX_PATTERN_STATES:
                    return None
                before[after] = []
                todo.append(after)
            before[after].append((state, int(not 0x80 <= byte < 0xC0)))
    bits = {state: int(regex.accepting(state)) for state in before}
    todo = [state for state in before if bits[state]]
    while todo:  # a fixed point: each change adds bits, and there are at most cap + 1
        after = todo.pop()
        for state, step in before[after]:
            more = bits[after] << step
            if more > full:  # lengths past `cap`: past `low` (kept as `low`'s bit) or past `high` (dropped)
                more = (more & full) | (1 << cap) if high == INFINITE else more & full
            if more | bits[state] != bits[state]:
                bits[state] |= more
                todo.append(state)
    return bits


class _Bounded:
    """A regex held to a string length (code points) as well, as an automaton of regex.py's kind (`initial`,
    `advance`, `accepting`; its masks by automaton_mask): a state is (the regex's state, characters so far), and lives
    only while one of the regex state's completions (`lengths`, from _lengths) ends the string within low..high.
    Equal (and hashed) by the regex and the bounds."""

    def __init__(self, regex: rx.Regex, low: int, high: float, lengths: dict):
        self.regex, self.low, self.high, self.lengths = regex, low, high, lengths
        self.initial = self._fitting(regex.initial, 0)

    def __eq__(self, other):
        return isinstance(other, _Bounded) and (other.regex, other.low, other.high) == (self.regex, self.low, self.high)

    def __hash__(self):
        return hash((self.regex, self.low, self.high))

    @property
    def cache_key(self) -> tuple:
        """automaton_mask's key: the regex's and the bounds (not the automaton, which the mask cache would keep)."""
        return "bounded", self.regex.cache_key, self.low, self.high

    def accepting(self, state) -> bool:
        return self.regex.accepting(state[0]) and state[1] >= self.low

    def byte_runs(self) -> list[int]:
        """The regex's byte runs, split where characters' first bytes begin and end (they are counted)."""
        return sorted({0x80, 0xC0}.union(self.regex.byte_runs()))

    def advance(self, state, byte: int):
        after = self.regex.advance(state[0], byte)
        if after is None:
            return None
        return self._fitting(after, state[1] + (not 0x80 <= byte < 0xC0))  # a character counted at its first byte

    def _fitting(self, state, count: int):
        """(state, count) where some completion of the regex state ends the string within the bounds, else None."""
        low, high = max(self.low - count, 0), self.high - count
        if high < 0:
            return None
        bits = self.lengths[state] >> low
        return (state, count) if (bits if high == INFINITE else bits & ((1 << (high - low + 1)) - 1)) else None


def _number_bounds(schema: dict, kind: str, path: str) -> dict:
    """The `lower` and `upper` bounds of a number or integer (draft 2020-12: exclusiveMinimum/Maximum are numbers),
    the tighter of two on one side; an integer's made inclusive whole numbers."""
    bounds = {"lower": None, "upper": None}
    for key in NUMBER_KEYS:
        if key not in schema:
            continue
        value = schema[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{key} at {path} must be a number (draft 2020-12), got {_short(value)}")
        side = "lower" if "Min" in key or key == "minimum" else "upper"
        bound = (Fraction(value), key.startswith("exclusive"))
        if kind == "number":
            bound = _as_read(bound, side == "lower", f"{key} at {path}")
        bounds[side] = (_tighter_lower if side == "lower" else _tighter_upper)(bounds[side], bound)
    if kind == "integer":
        if bounds["lower"]:
            value, open_ = bounds["lower"]
            bounds["lower"] = (Fraction(math.floor(value) + 1 if open_ else math.ceil(value)), False)
        if bounds["upper"]:
            value, open_ = bounds["upper"]
            bounds["upper"] = (Fraction(math.ceil(value) - 1 if open_ else math.floor(value)), False)
    if not _meets(bounds["lower"], bounds["upper"]):
        raise SchemaError(f"no {'integer' if kind == 'integer' else 'number'} at {path} is within its bounds "
                          f"(minimum/maximum)")
    if kind == "integer" and (bounds["lower"] and bounds["lower"][0] >= WIDEST_INTEGER or
                              bounds["upper"] and bounds["upper"][0] <= -WIDEST_INTEGER):
        raise SchemaError(f"every integer at {path} within its bounds has more than {jm.MAX_NUMBER_DIGITS} digits, "
                          "more than a number of the output may hold")
    return bounds


def _as_read(bound: tuple, lower: bool, where: str) -> tuple:
    """A number's bound on the digits written, such that the number also meets it as a reader that takes the digits
    as a double (json.loads, Pydantic, jsonschema) sees it. An included bound also takes the digits that read as the
    bound's double (json.dumps writes 0.1 for the double 0.1000000000000000055...), or where the bound is no double
    (an integer past 2**53), of the nearest double on its inner side; an excluded one none that round onto it (the
    midpoint to the next double, taken as excluded). Past 2**53, where json.loads reads digits without a fraction or
    exponent as an exact int, the bound itself holds too (so an included bound that is no double takes no digits
    between it and that double: fewer values, never more)."""
    value, excluded = bound
    try:
        near = float(value)
    except OverflowError:
        raise SchemaError(f"{where} is beyond the range of a double") from None
    if not excluded:  # the double nearest the bound on its inner side (past 2**53 a bound may lie between two)
        if lower and Fraction(near) < value:
            near = math.nextafter(near, math.inf)
        elif not lower and Fraction(near) > value:
            near = math.nextafter(near, -math.inf)
        if math.isinf(near):
            raise SchemaError(f"{where} is beyond the range of a double")
        exact, written = Fraction(near), Fraction(repr(near))
        read = (min(exact, written) if lower else max(exact, written), False)
    else:  # the double next to the bound on its inner side, and the midpoint below it
        if lower and Fraction(near) <= value:
            near = math.nextafter(near, math.inf)
        elif not lower and Fraction(near) >= value:
            near = math.nextafter(near, -math.inf)
        beyond = math.nextafter(near, -math.inf if lower else math.inf)
        if math.isinf(near) or math.isinf(beyond):
            raise SchemaError(f"{where} is beyond the range of a double")
        read = ((Fraction(near) + Fraction(beyond)) / 2, True)
    if abs(value) < 2**53:
        return read
    return (_tighter_lower if lower else _tighter_upper)(read, bound)


def _tighter_lower(a, b):
    if a is None or b is None:
        return a or b
    return max(a, b, key=lambda bound: (bound[0], bound[1]))


def _tighter_upper(a, b):
    if a is None or b is None:
        return a or b
    return min(a, b, key=lambda bound: (bound[0], not bound[1]))


def _meets(lower, upper) -> bool:
    """Whether some number lies between the bounds (each None or (value, excluded))."""
    return lower is None or upper is None or lower[0] < upper[0] or \
        lower[0] == upper[0] and not lower[1] and not upper[1]


def _mirrored(bound):
    return None if bound is None else (-bound[0], bound[1])


def _floor_log10(q: Fraction) -> int:
    """The largest e with 10**e <= q (q > 0)."""
    e = len(str(q.numerator)) - len(str(q.denominator))
    while Fraction(10) ** e > q:
        e -= 1
    while Fraction(10) ** (e + 1) <= q:
        e += 1
    return e


def _naturals(digits: bytes, whole: bool, low, high, multiple: int, room: int) -> bool:
    """Whether a whole number >= 0 written beginning with `digits` (exactly them if `whole`; any for none), with at
    most `room` more digits, lies in low..high (ints, None: no bound) and is a multiple of `multiple`."""
    low = 0 if low is None else max(low, 0)
    if whole:
        return low <= int(digits) and (high is None or int(digits) <= high) and int(digits) % multiple == 0
    if not digits:  # 1 to `room` digits
        most = 10**room - 1
        return _multiple_within(low, most if high is None else min(high, most), multiple)
    first, scale = int(digits), 1
    for _ in range(room + 1):  # the numbers of len(digits) + k digits: first * 10**k to (first + 1) * 10**k - 1
        if high is not None and first * scale > high:
            break
        top = (first + 1) * scale - 1
        if _multiple_within(max(first * scale, low), top if high is None else min(top, high), multiple):
            return True
        scale *= 10
    return False


def _multiple_within(low: int, high: int, multiple: int) -> bool:
    """Whether a multiple of `multiple` lies in low..high."""
    return -(-low // multiple) * multiple <= high


def _multiple_of(schema: dict, kind: str, bounds: dict, path: str) -> int:
    """An integer's `multipleOf` (1 where absent), a whole number > 0, that some integer within its `bounds` (from
    _number_bounds) is a multiple of; refused on a number."""
    if "multipleOf" not in schema:
        return 1
    value = schema["multipleOf"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != math.floor(value):
        raise SchemaError(f"multipleOf at {path} must be a whole number > 0 (a fraction is not supported), got "
                          f"{_short(value)}")
    if kind != "integer":
        raise SchemaError(f"multipleOf at {path} is supported on an integer only (type integer), not a number")
    multiple, lower, upper = int(value), bounds["lower"], bounds["upper"]
    if lower and upper and not _multiple_within(int(lower[0]), int(upper[0]), multiple):
        raise SchemaError(f"no integer at {path} within its bounds (minimum/maximum) is a multiple of {multiple}")
    return multiple


NUMBER_PARTS = re.compile(rb"(-?)([0-9]*)(\.?)([0-9]*)(?:[eE]([+-]?)([0-9]*))?")


def _in_range(alternative: _Alternative, text: bytes, whole: bool = False) -> bool:
    """Whether `text`, a JSON number or its beginning (the lexical state has checked its grammar), is (`whole`) or
    begins a number within the alternative's bounds: exactly, in fractions, an exponent never raised to a power. A
    '-' begins a negative number (a -0 is not taken)."""
    match = NUMBER_PARTS.fullmatch(text)
    negative, digits, dot, fraction, exponent_sign, exponent = match.groups()
    lower, upper = alternative.lower, alternative.upper
    if negative:  # the magnitude's bounds
        lower, upper = _mirrored(upper), _mirrored(lower)
    lower = _tighter_lower(lower, (Fraction(0), bool(negative)))  # a magnitude > 0 after a '-', >= 0 without
    if alternative.kind == "integer":
        return _naturals(digits, whole or digits == b"0", math.ceil(lower[0]) + lower[1],
                         None if upper is None else int(upper[0]), alternative.multiple,
                         jm.MAX_NUMBER_DIGITS - len(digits))
    mantissa = Fraction(int(digits + fraction or b"0"), 10 ** len(fraction))
    if exponent_sign is None and (whole or mantissa == 0 and (dot or digits == b"0")):
        if whole:  # no exponent: the value itself
            return _meets(_tighter_lower(lower, (mantissa, False)), _tighter_upper(upper, (mantissa, False)))
        return _meets(lower, upper)  # 0 or 0.00...: any magnitude >= 0 follows (0.5e3)
    if exponent_sign is None:
        if not digits:  # a '-' alone
            return _meets(lower, upper)
        # magnitudes of the mantissa's completions, [low, high), times 10**e for any e
        low, high = (mantissa, mantissa + Fraction(1, 10 ** len(fraction))) if dot else (mantissa, mantissa + 1)
        if upper is None:
            return True
        if upper[0] <= 0:
            return False
        scale = _floor_log10(upper[0] / low)  # the largest e with low * 10**e <= upper (or <)
        if upper[1] and low * Fraction(10) ** scale == upper[0]:
            scale -= 1
        return _meets(_tighter_lower(lower, (low * Fraction(10) ** scale, False)),
                      _tighter_upper(upper, (high * Fraction(10) ** scale, True)))
    if mantissa == 0:
        return _meets(_tighter_lower(lower, (mantissa, False)), _tighter_upper(upper, (mantissa, False)))
    # mantissa * 10**e within the bounds for e from `least` to `most` (None: no bound)
    least = most = None
    if lower[0] > 0:
        least = _floor_log10(lower[0] / mantissa)
        if not (Fraction(10) ** least == lower[0] / mantissa and not lower[1]):
            least += 1
    if upper is not None:
        if upper[0] <= 0:
            return False
        most = _floor_log10(upper[0] / mantissa)
        if upper[1] and Fraction(10) ** most == upper[0] / mantissa:
            most -= 1
    if least is not None and most is not None and least > most:
        return False
    if not exponent_sign and not exponent:
        return True  # any e may follow
    if exponent_sign == b"-":
        least, most = None if most is None else -most, None if least is None else -least
    room = jm.MAX_NUMBER_DIGITS - len(exponent)  # leading zeros count: they take room a digit could have
    return _naturals(exponent.lstrip(b"0") or (exponent if whole else b""), whole, least, most, 1, room)


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _same(a, b) -> bool:
    """JSON Schema's equality: the same type and value at every depth (Python's == takes False for 0 inside lists
    and dicts too), 1 and 1.0 alike."""
    if _type_of(a) != _type_of(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _utf8(text: str, path: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise SchemaError(f"a string at {path} holds a lone surrogate") from None


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _short(value) -> str:
    return json.dumps(value)[:60]


def compile_schema(schema) -> Schema:
    """`schema` (a dict or bool, as json.loads gives it; a Schema; or a Pydantic model, any object with a
    `model_json_schema()`) compiled; SchemaError where it is not JSON or uses what this module does not support."""
    if isinstance(schema, Schema):
        return schema
    if callable(getattr(schema, "model_json_schema", None)):  # a Pydantic model class (or instance): its schema
        schema = schema.model_json_schema()
    if not isinstance(schema, (dict, bool)):
        shown = f"the class {schema.__name__}, not a Pydantic model" if isinstance(schema, type) else \
            type(schema).__name__
        raise SchemaError(f"a JSON schema must be an object or true/false, got {shown}")
    nested = "the schema is nested too deeply to be read (Python's recursion limit)"
    try:
        canonical = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:  # a value nested near the recursion limit (a request body's: a 500 on the server)
        raise SchemaError(nested) from None
    except (TypeError, ValueError) as e:
        raise SchemaError(f"a JSON schema must be JSON: {e}") from None
    try:
        return _compiled(canonical)
    except RecursionError:  # its json.loads, called deeper than the dumps above
        raise SchemaError(nested) from None


@lru_cache(maxsize=CACHED_SCHEMAS)
def _compiled(canonical: str) -> Schema:
    return Schema(canonical, json.loads(canonical))


def schema_mask(vocabulary: jm.JsonVocabulary, schema: Schema, state) -> numpy.ndarray:
    """A new boolean array (vocabulary size,): the ids whose bytes take `state` of `schema` to a valid prefix,
    cached in the vocabulary per schema (its canonical JSON: the Schema itself, a key there, would stay alive) and
    state (the whitespace run counted apart, as JSON mode's)."""
    key = (jm.unspaced(state[0]), state[1])
    return vocabulary.cached_mask(vocabulary.schema_cache, CACHED_MASKS, (schema.canonical, key), state[0],
                                  lambda: _compute(vocabulary, schema, key))


def _compute(vocabulary: jm.JsonVocabulary, schema: Schema, state) -> numpy.ndarray:
    """The mask of `state`. Inside a string free or bounded only in length: the plain content class (within the room
    left); held to automata: their regex masks; then the tokens with a quote or a backslash walked. Inside another
    string: of more than one thread, the union of each one's mask (threads go on alone), else all tokens walked
    together (most go on). Elsewhere a walk of the tokens as a trie (most end or are refused within a byte or two)."""
    lexical, threads = state
    room, held = schema.string_room(state), schema.string_automata(state)
    mask = numpy.zeros(vocabulary.size, dtype=bool)
    if room is not None:
        content = vocabulary._content[lexical[1] & 7]
        mask |= content if room == INFINITE else content & (vocabulary.characters <= room)
    elif held is not None:  # the content the automata take (none with a quote or a backslash: they take neither)
        for automaton, at in held:
            mask |= automaton_mask(vocabulary, automaton, at)
    elif lexical[0] in STRING_MODES and len(threads) > 1:
        for thread in threads:
            mask |= schema_mask(vocabulary, schema, (lexical, frozenset((thread,))))
        return mask
    elif lexical[0] in STRING_MODES:
        return jm.walk_tokens(vocabulary, schema.advance, state)
    else:
        mask[vocabulary._ids[jm._walk(vocabulary._words, state, schema.advance)]] = True
        return mask
    mask[vocabulary._quoted_ids[jm.walk_flat(vocabulary.quoted_flat, schema.advance, state)]] = True
    return mask


class SchemaConstraint(jm.JsonConstraint):
    """One answer held to a JSON schema: JsonConstraint over the schema's states."""

    held_to = "a value of the JSON schema"

    def __init__(self, vocabulary: jm.JsonVocabulary, schema: Schema):
        super().__init__(vocabulary, schema.initial)
        self.schema = schema

    @property
    def complete(self) -> bool:
        return self.schema.complete(self.state)

    def _mask(self) -> numpy.ndarray:
        return schema_mask(self.vocabulary, self.schema, self.state)

    def _after(self, piece: bytes):
        return jm.advance_bytes(self.state, piece, self.schema.advance)
