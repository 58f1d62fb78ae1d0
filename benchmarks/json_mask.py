"""Time JSON mode's token masks (`internvl_mpo.generate.json_mode`): building a vocabulary's index, a mask of
each state a pretty-printed object passes through computed afresh (uncached), and the same masks from the
cache, as the engine asks for them at each step. `--schema` times JSON schema mode's masks
(`internvl_mpo.generate.json_schema`) the same way, on a realistic schema (typed fields, an enum, an array
of objects, a nullable field, a string of bounded length) and a pretty-printed value of it; `--typed` on a schema
with bounded numbers, formatted strings (date-time, uuid, date) and a tuple, as Pydantic writes them; `--mixed` on
strings held to a pattern, a length or an enum as alternatives of an anyOf (beside a free string), and a pattern with
a bounded repetition; `--schema-file FILE --text VALUE` on the schema in FILE and a JSON value of it. `--regex
PATTERN` times guided decoding's masks (`internvl_mpo.generate.regex`) on the states of `--text` (a text the
regex takes; without it, a random walk of the regex's automaton, seed 0). `--grammar FILE` times grammar-guided
decoding's masks (`internvl_mpo.generate.grammar`) of the GBNF grammar in FILE the same way (`--text`: a sentence of
it; without it, the pretty-printed sample object where the grammar takes it, else a random walk). Both print the
compile time of the regex or grammar.

The vocabulary that matters is Qwen2's (151,643 tokens + specials, InternVL2.5's 1B/4B/38B/78B; the 2B/8B/26B
sizes use InternLM2's SentencePiece vocabulary):

    python benchmarks/json_mask.py --tokenizer /path/to/InternVL2_5-4B-MPO      # a checkpoint folder
    python benchmarks/json_mask.py --tiktoken qwen.tiktoken                     # the same 151,643 byte strings

(`qwen.tiktoken`, Qwen's vocabulary as base64 lines, ships inside the dashscope wheel on PyPI: `pip download
--no-deps dashscope`, then unzip dashscope/resources/qwen.tiktoken.) Without either it times the demo
model's tokenizer, which is tiny. `--check` also compares each mask with every token run through the
recognizer byte by byte (seconds per state on a Qwen2 vocabulary).

`--against xgrammar` also times xgrammar (vLLM's default structured-output backend; `pip install --no-deps xgrammar
apache-tvm-ffi`, its triton is for GPU kernels only) on the same byte strings (`TokenizerInfo` of the raw bytes,
`VocabType.RAW`) and the same text: its compile on one thread (JSON mode: its builtin JSON grammar; `--schema`:
`compile_json_schema`, any whitespace, strict; `--regex`: `compile_regex`; `--grammar`: `compile_grammar`, a Lark
grammar `compile_lark`) and `fill_next_token_bitmask` at the states we time, after accepting the same prefix, and
prints both sides, the ratio and how many of those masks agree with ours (ordinary tokens; where they
differ the languages differ: our whitespace bound, an object at the top, ...). Where xgrammar refuses a byte of the
text (`--mixed`: an escape in a string with a length) both sides count the states before it.
"""

import argparse
import importlib.metadata
import base64
import json
import random
import re
import statistics
import time
from pathlib import Path

from internvl_mpo.generate import json_mode as jm
from internvl_mpo.generate import grammar as gr
from internvl_mpo.generate import json_schema as js
from internvl_mpo.generate.lark import is_lark
from internvl_mpo.generate import regex as rx

REGEX, GRAMMAR = -1, -2  # the labels of a regex's and a grammar's states in the table
MODES = {REGEX: "regex", GRAMMAR: "grammar", jm.START: "start", jm.VALUE: "value", jm.ARRAY_START: "array start",
         jm.OBJECT_START: "object start",
         jm.KEY: "key", jm.COLON: "colon", jm.AFTER: "after value", jm.STRING: "string", jm.ESCAPE: "escape",
         jm.UNICODE: "\\u escape", jm.NUMBER: "number", jm.LITERAL: "true/false/null", jm.DONE: "done"}
SAMPLE = {"title": "Ein Café in Zürich", "objects": [{"name": "猫", "box": [12, 34.5, -0.5e3, 1e-2], "visible": True},
                                                   {"name": "dog \"Rex\"\n\\", "box": [], "note": None}],
          "caption": "😀 \u00e9\u4e2d", "count": 2, "nested": {"a": {"b": {"c": [[False]]}}}}

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "kind": {"enum": ["photo", "drawing", "screenshot", "diagram"]},
    "count": {"type": "integer"},
    "objects": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "visible": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
        "required": ["name", "box", "visible"], "additionalProperties": False}},
    "caption": {"type": "string", "minLength": 1, "maxLength": 200}},
    "required": ["title", "kind", "count", "objects", "caption"], "additionalProperties": False}
TYPED = {"type": "object", "properties": {
    "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "share": {"type": "number", "exclusiveMinimum": 0,
                                                                         "maximum": 1},
    "price": {"type": "number", "minimum": 0}, "at": {"type": "string", "format": "date-time"},
    "id": {"type": "string", "format": "uuid"},
    "pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": -3}, {"type": "string", "format": "date"}],
             "minItems": 2, "maxItems": 2}},
    "required": ["stars", "share", "price", "at", "id", "pair"], "additionalProperties": False}
TYPED_VALUE = {"stars": 4, "share": 0.125, "price": 1234.5e-2, "at": "2024-02-29T12:34:56.789+05:30",
               "id": "123e4567-e89b-12d3-a456-426614174000", "pair": [-3, "2023-12-31"]}
MIXED = {"type": "object", "properties": {
    "code": {"anyOf": [{"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"}, {"type": "string", "maxLength": 300}]},
    "tag": {"anyOf": [{"enum": ["red", "green"]}, {"type": "string", "pattern": "^#[0-9a-f]{6}$"}, {"type": "string"}]},
    "note": {"type": "string", "pattern": "^[^\\n]{0,300}$"}},
    "required": ["code", "tag", "note"], "additionalProperties": False}
MIXED_VALUE = {"code": "Not a code: a free text of some words, \"quoted\" and ünïcode", "tag": "#00ff7f",
               "note": "A note of a line, with a 'pattern' of bounded length."}
SCHEMA_VALUE = {"title": "Ein Café in Zürich", "kind": "photo", "count": 2,
                "objects": [{"name": "猫", "box": [12, 34.5, -0.5e3, 1e-2], "visible": True},
                            {"name": "dog \"Rex\"\n\\", "box": [0, 0, 1, 1], "visible": False, "note": None}],
                "caption": "😀 \u00e9\u4e2d"}


def pieces_of(args) -> tuple[list, int, str]:
    if args.tiktoken:
        lines = Path(args.tiktoken).read_bytes().split(b"\n")
        pieces = [base64.b64decode(line.split()[0]) for line in lines if line.strip()]
        return pieces, len(pieces) + 293, f"{args.tiktoken} ({len(pieces)} tokens)"  # Qwen2's padded 151,936
    from internvl_mpo.chat.tokenizer import load_tokenizer

    folder = args.tokenizer or Path(__file__).parent.parent / "src/internvl_mpo/demo_model"
    tokenizer = load_tokenizer(folder)
    pieces = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(len(tokenizer))]
    return pieces, len(pieces), f"{folder} ({len(pieces)} tokens)"


def read_json(parser: argparse.ArgumentParser, flag: str, text: str):
    """The JSON value of `text`, or argparse's one-line error naming `flag`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        parser.error(f"{flag}: not valid JSON ({e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a checkpoint folder whose tokenizer to index")
    parser.add_argument("--tiktoken", type=Path, help="a vocabulary as tiktoken's base64 lines (qwen.tiktoken)")
    parser.add_argument("--check", action="store_true", help="compare every mask with the byte-by-byte oracle")
    parser.add_argument("--schema", action="store_true", help="JSON schema mode's masks (a realistic schema)")
    parser.add_argument("--typed", action="store_true", help="JSON schema mode's masks (bounds, formats, a tuple)")
    parser.add_argument("--mixed", action="store_true", help="JSON schema mode's masks (patterns, lengths and enums "
                        "as alternatives of a string)")
    parser.add_argument("--schema-file", type=Path, help="JSON schema mode's masks of the schema in this file (with "
                        "--text: a JSON value of it, timed pretty-printed)")
    parser.add_argument("--regex", help="guided decoding's masks of this regex (the whole answer matches it)")
    parser.add_argument("--grammar", type=Path, help="grammar-guided decoding's masks of the GBNF grammar in this file")
    parser.add_argument("--against", choices=["xgrammar"], help="also time this reference on the same vocabulary and "
                        "states, and print the ratio")
    parser.add_argument("--text", help="with --regex or --grammar: a text it takes, whose states are timed (default: a "
                        "random walk); with --schema-file: a JSON value")
    args = parser.parse_args()
    for flag, path in (("--tiktoken", args.tiktoken), ("--grammar", args.grammar), ("--schema-file", args.schema_file)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.schema_file is not None and args.text is None:
        parser.error("--schema-file needs --text, a JSON value of the schema")
    if args.against == "xgrammar":  # before our side's index and masks (a minute on Qwen2's vocabulary), not after
        try:
            import xgrammar  # noqa: F401
        except ImportError as error:
            raise SystemExit(f"--against xgrammar: xgrammar is not importable ({error}); pip install --no-deps "
                             "xgrammar apache-tvm-ffi")
    args.schema = args.schema or args.typed or args.mixed or args.schema_file is not None
    pieces, size, name = pieces_of(args)
    start = time.perf_counter()
    vocabulary = jm.JsonVocabulary(pieces, size)
    if args.schema:
        vocabulary.characters  # the index's part that schema mode's string lengths add, built on first use
    vocabulary.flat_words, vocabulary.quoted_flat  # the index's parts that walk_flat walks, built on first use
    built = time.perf_counter() - start
    print(f"vocabulary: {name}; index built in {built:.2f} s")
    compiled = 0.0
    if args.regex is not None or args.grammar is not None:
        start = time.perf_counter()
        if args.regex is not None:
            regex, what = rx.compile_regex(args.regex), f"regex: {args.regex!r}"
            default = None
        else:
            regex, what = gr.compile_grammar(args.grammar.read_text()), f"grammar: {args.grammar}"
            default = json.dumps(SAMPLE, indent=2, ensure_ascii=False)
        compiled = time.perf_counter() - start
        print(f"{what} compiled in {1000 * compiled:.1f} ms")
        start = time.perf_counter()
        vocabulary.token_classes(regex.byte_runs())  # built on the first mask, kept for its byte runs
        compiled += time.perf_counter() - start
        print(f"token classes of the automaton's byte runs built in {1000 * (time.perf_counter() - start):.0f} ms")
        initial, advance = regex.initial, regex.advance
        sample = args.text if args.text is not None else default if default and regex.matches(default.encode()) \
            else walk(regex)
        if not regex.matches(sample.encode()):
            parser.error(f"--text {sample!r} is not a text the {'regex' if args.grammar is None else 'grammar'} takes")
        print(f"{what}, {regex.size} automaton nodes; text: {sample[:60]!r}")

        def mask(state):
            return regex.mask(vocabulary, state)

        def lexical(state):
            return (REGEX if args.grammar is None else GRAMMAR, 0, "", 0)

        def clear():
            vocabulary.regex_cache.clear()
    elif args.schema:
        schema, sample = (TYPED, TYPED_VALUE) if args.typed else (MIXED, MIXED_VALUE) if args.mixed else \
            (read_json(parser, "--schema-file", args.schema_file.read_text()), read_json(parser, "--text", args.text)) \
            if args.schema_file else (SCHEMA, SCHEMA_VALUE)
        start = time.perf_counter()
        reference = schema
        schema = js.compile_schema(schema)
        initial, advance = schema.initial, schema.advance
        runs = {tuple(a.automaton.byte_runs()) for a in schema.alternatives if a.automaton is not None}
        for run in runs:  # built on a pattern's first mask, kept for its byte runs
            vocabulary.token_classes(run)
        compiled = time.perf_counter() - start
        print(f"schema compiled, with the token classes of {len(runs)} patterns' byte runs, in "
              f"{1000 * compiled:.0f} ms")

        def mask(state):
            return js.schema_mask(vocabulary, schema, state)

        def lexical(state):
            return state[0]

        def clear():
            vocabulary.schema_cache.clear()
    else:
        initial, advance, sample, mask = jm.INITIAL, jm.advance, SAMPLE, vocabulary.mask

        def lexical(state):
            return state

        def clear():
            vocabulary._cache.clear()
    states, state = [], initial
    text = sample if args.regex is not None or args.grammar is not None else json.dumps(sample, indent=2,
                                                                                      ensure_ascii=False)
    data = text.encode()
    for position, byte in enumerate(data):
        states.append(state)
        state = advance(state, byte)
        if state is None:  # only --schema-file's --text can get here: the other texts are checked or built in
            parser.error(f"--text is not a value of the schema in {args.schema_file}: no value it takes begins with "
                         f"{data[max(0, position - 30):position + 1].decode(errors='replace')!r} (byte {position})")
    if args.schema_file is not None and not schema.complete(state):
        parser.error(f"--text is not a value of the schema in {args.schema_file}: it ends before one does")
    states.append(state)
    fresh: dict[int, list[float]] = {}
    # one state per mask the cache keeps (a whitespace count filters the mask of the state without it)
    timed = {}  # each timed state: the first position (bytes of `text` taken) where it comes
    for position, state in enumerate(states):
        timed.setdefault(unspaced(state, lexical), position)
    each = []  # the uncached times in `timed`'s order
    for state in timed:
        clear()
        start = time.perf_counter()
        got = mask(state)
        each.append(time.perf_counter() - start)
        fresh.setdefault(lexical(state)[0], []).append(each[-1])
        if args.check:
            expected = [bool(p) and advance_bytes(advance, state, p) for p in pieces]
            assert got[: len(pieces)].tolist() == expected and not got[len(pieces):].any(), state
    print(f"{'state':>16} {'states':>6} {'uncached ms (median, max)':>26}")
    for mode, times in sorted(fresh.items()):
        print(f"{MODES[mode]:>16} {len(times):>6} {1000 * statistics.median(times):>14.2f} {1000 * max(times):>10.2f}")
    every = [t for times in fresh.values() for t in times]
    print(f"{'all':>16} {len(every):>6} {1000 * statistics.median(every):>14.2f} {1000 * max(every):>10.2f}")

    def cached_step(count: int) -> float:
        """The mean time of a mask from the cache over the first `count` states."""
        for state in states[:count]:  # fill the cache
            mask(state)
        start = time.perf_counter()
        for state in states[:count]:
            mask(state)
        return (time.perf_counter() - start) / count

    cached = cached_step(len(states))
    print(f"cached: {1e6 * cached:.0f} us a step over the {len(states)} steps "
          "of the sample (one byte each)" + ("; every mask equals the oracle's" if args.check else ""))
    if args.against == "xgrammar":
        ours = {"index": built, "compile": compiled, "uncached": each, "cached": cached, "cached_step": cached_step}
        source = args.regex if args.regex is not None else args.grammar.read_text() if args.grammar else \
            reference if args.schema else None
        masks = [mask(states[position])[: len(pieces)] for position in timed.values()]
        against_xgrammar(pieces, size, source, "regex" if args.regex is not None else "grammar" if args.grammar
                         else "schema" if args.schema else "json", text.encode(), list(timed.values()), masks, ours)


def against_xgrammar(pieces, size, source, kind, data, positions, masks, ours) -> None:
    """Time xgrammar on the same tokens and text: its tokenizer info, its compile of `source` (a regex, a grammar, a
    schema; JSON mode: its builtin JSON grammar), its mask at the byte `positions` of `data` (after accepting the
    bytes before them, one at a time) and at every step; print both sides, the ratios and how many masks agree.
    `ours["uncached"]`: our uncached time at each of `positions`; `ours["cached_step"](n)`: our mean time from the cache
    over the first n states (`ours["cached"]` over all); where xgrammar refuses a byte of `data`, both sides count the
    states before it."""
    try:
        import numpy as np
        import xgrammar as xg
    except ImportError as error:
        raise SystemExit(f"--against xgrammar: xgrammar is not importable ({error}); pip install --no-deps xgrammar "
                         "apache-tvm-ffi")
    encoded = [p or b"" for p in pieces] + [b""] * (size - len(pieces))  # empty: a special token to xgrammar
    stop = encoded.index(b"") if b"" in encoded else size - 1
    start = time.perf_counter()
    info = xg.TokenizerInfo(encoded, xg.VocabType.RAW, vocab_size=size, stop_token_ids=[stop])
    compiler = xg.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    index = time.perf_counter() - start
    start = time.perf_counter()
    try:
        if kind == "regex":
            compiled = compiler.compile_regex(source)
        elif kind == "grammar":
            compiled = compiler.compile_lark(source) if is_lark(source) else compiler.compile_grammar(source)
        elif kind == "schema":
            compiled = compiler.compile_json_schema(json.dumps(source), any_whitespace=True, strict_mode=True)
        else:
            compiled = compiler.compile_builtin_json_grammar()
    except Exception as error:  # xgrammar raises RuntimeError or its own errors for what it does not take
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        message = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", message)  # its C++ log prefix: time, file and line
        raise SystemExit(f"--against xgrammar: xgrammar does not take the {kind}: {message}")
    compile_time = time.perf_counter() - start
    matcher, bitmask = xg.GrammarMatcher(compiled), xg.allocate_token_bitmask(1, size)
    ordinary = np.array([p is not None for p in pieces])
    times, steps, agree, wanted = [], [], 0, dict(zip(positions, masks))
    for position in range(len(data) + 1):
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        took = time.perf_counter() - start
        steps.append(took)
        if position in wanted:
            times.append(took)
            theirs = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[: len(pieces)].astype(bool)
            agree += bool((theirs[ordinary] == np.asarray(wanted[position])[ordinary]).all())
        if position < len(data) and not matcher.accept_string(data[position:position + 1]):
            print(f"xgrammar refuses byte {position} of the text ({data[max(0, position - 20):position + 1]!r}): the "
                  "languages differ there; both sides below cover the states before it")
            break
    theirs = {"index": index, "compile": compile_time, "uncached": statistics.median(times), "max": max(times),
              "cached": sum(steps) / len(steps)}
    reached = ours["uncached"][: len(times)]
    cached = ours["cached"] if len(steps) == len(data) + 1 else ours["cached_step"](len(steps))
    ours = dict(ours, uncached=statistics.median(reached), max=max(reached), cached=cached)
    version = importlib.metadata.version("xgrammar")
    print(f"xgrammar {version}: masks equal to ours (ordinary tokens) at {agree} of {len(times)} timed states"
          + (f" (of our {len(positions)})" if len(times) < len(positions) else ""))
    print(f"{'':>36} {'ours':>10} {'xgrammar':>10}  ours/xgrammar")
    for key, label, unit, scale in (("index", "tokenizer index", "ms", 1e3),
                                    ("compile", "compile (+ token classes / mask cache)", "ms", 1e3),
                                    ("uncached", "mask, median over the timed states", "us", 1e6),
                                    ("max", "mask, max over the timed states", "us", 1e6),
                                    ("cached", "a step, mean (ours from the cache)", "us", 1e6)):
        if not ours[key]:  # JSON mode compiles nothing
            print(f"{label:>36} {'-':>10} {theirs[key] * scale:>8.1f}{unit}")
            continue
        ratio = ours[key] / theirs[key]
        print(f"{label:>36} {ours[key] * scale:>8.1f}{unit} {theirs[key] * scale:>8.1f}{unit}  {ratio:>8.2f} "
              f"({'ours' if ratio < 1 else 'xgrammar'} faster)")


def walk(regex, limit: int = 200) -> str:
    """A text the regex takes: a random walk of its automaton (seed 0) over printable ASCII where it can, stopped at
    an accepting state after a few bytes (or at `limit`, where it goes on to the nearest accepting state)."""
    rng, state, data = random.Random(0), regex.initial, b""
    while True:
        live = [b for b in range(256) if regex.advance(state, b) is not None]
        if regex.accepting(state) and (not live or len(data) >= limit or rng.random() < 0.02):
            return data.decode()
        ascii_live = [b for b in live if 0x20 <= b < 0x7F]
        byte = rng.choice(ascii_live if ascii_live and len(data) < limit else live)
        state, data = regex.advance(state, byte), data + bytes((byte,))


def unspaced(state, lexical):
    """`state` with its whitespace run's count at 0 (the state whose mask the cache keeps)."""
    mode, detail, stack, ws = lexical(state)
    if mode not in jm.SPACED or not ws:
        return state
    return (mode, detail, stack, 0) if lexical(state) is state else ((mode, detail, stack, 0), state[1])


def advance_bytes(advance, state, piece: bytes) -> bool:
    """Whether `piece` takes `state` to a valid prefix, byte by byte."""
    for byte in piece:
        state = advance(state, byte)
        if state is None:
            return False
    return True


if __name__ == "__main__":
    from internvl_mpo.errors import InternVLError

    try:
        main()
    except InternVLError as e:  # a bad path or setting: one line, as the command line gives it
        raise SystemExit(f"error: {e}") from None
