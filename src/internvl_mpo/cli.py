"""The `internvl-mpo` command (also `python -m internvl_mpo`).

Each subcommand is a typed function; its signature gives the flags and its docstring the help
(one "name: text" line per parameter, continued on indented lines). Parameters without a default are
positional, and so are positional-only ones (before `/`), which are optional when they have a default,
and `*words`, which takes the remaining positional words (none or more); keyword-only ones (after `*`)
are flags, required when they have no default. Flags may come between positional words. Subcommands live with
the code they drive and are imported only when called, so `internvl-mpo chat` does not import the
trainer or the web stack.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import inspect
import os
import signal
import sys
import types
import typing
from pathlib import Path

# name -> "module:function" (relative to this package)
COMMANDS = {
    "chat": "cli_chat:chat",
    "generate": "cli_chat:generate",
    "tiles": "cli_chat:tiles",
    "pairs": "pairs:pairs",
    "eval": "evaluate:eval_",
    "serve": "server.runner:serve",
    "convert": "cli_convert:convert_command",
    "train": "train.cli:train",
    "plot": "train.cli:plot",
    "demo-data": "demo.synth:make_demo_data",
}


# single-value flags that sit beside a repeatable sibling (`chat --video` beside `--image`): given twice, they are
# refused, where argparse would keep the last and drop the first video without a word
ONCE = ("video",)


class _Once(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} takes one value, got {getattr(namespace, self.dest)!r} and {values!r}")
        setattr(namespace, self.dest, values)


def _unwrap(annotation):
    """(base type, is_list) of an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return (args[0] if args else str), True
    return annotation, False


def _param_help(doc: str) -> dict[str, str]:
    """{name: text} of the docstring's "name: text" lines; an indented line goes on the text above it."""
    out, last = {}, None
    for line in doc.splitlines():
        if last and line.startswith(" ") and line.strip():
            out[last] += " " + line.strip()
            continue
        name, sep, text = line.strip().partition(": ")
        last = name if sep and name.isidentifier() else None
        if last:
            out[name] = text
    return out


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each optional flag's default, unless its help text already says it in words ("default:"),
    says the flag is required, or the default is None (not given: nothing to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        said = "default:" in text or "(required" in text
        return text if action.required or said or action.default is None else super()._get_help_string(action)


def build_parser(fn, name: str) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or ""
    parser = argparse.ArgumentParser(
        prog=f"internvl-mpo {name}",
        description=doc.split("\n\n")[0],
        formatter_class=_DefaultsFormatter,
    )
    helps = _param_help(doc)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind, many = _unwrap(hints.get(name, str))
        help_text = helps.get(name, "")
        flag = "--" + name.replace("_", "-")
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            parser.add_argument(name, type=kind, nargs="*", help=help_text)
            continue
        if param.default is inspect.Parameter.empty:
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                parser.add_argument(flag, type=kind, required=True, nargs="+" if many else None, help=help_text)
            else:
                parser.add_argument(name, type=kind, nargs="+" if many else None, help=help_text)
            continue
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            parser.add_argument(name, type=kind, nargs="*" if many else "?", default=param.default, help=help_text)
            continue
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, help=help_text)
        elif many:
            said = "repeat" in help_text  # "repeat the flag for ..." already says it
            parser.add_argument(flag, type=kind, action="append", default=None,
                                help=help_text if said else help_text + " (repeatable)")
        else:
            parser.add_argument(flag, type=kind, default=param.default, help=help_text,
                                action=_Once if name in ONCE else "store")
    return parser


def _resolve(name: str):
    module, _, func = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), func)


def _summary(name: str) -> str:
    """The first line of a command's docstring, read from its source: importing the command's module
    (torch, the trainer, the web stack) would make `--help` take seconds."""
    module, _, func = COMMANDS[name].partition(":")
    node = next(n for n in _module_tree(module).body if isinstance(n, ast.FunctionDef) and n.name == func)
    return (ast.get_docstring(node) or "").splitlines()[0]


@functools.cache
def _module_tree(module: str) -> ast.Module:
    """The parsed source of a command's module, parsed once (`--help` reads three commands from cli_chat)."""
    # the file by its path: find_spec would import the packages above it (server/__init__ imports torch)
    source = Path(__file__).parent.joinpath(*module.split(".")).with_suffix(".py")
    return ast.parse(source.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    from .errors import OutputError

    try:
        with _guarded_stdout():
            return _main(argv)
    except OutputError as e:  # a command's own is its one-line error (_main); this is the command list's (--help)
        print(f"internvl-mpo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # also while a command's modules (torch) are still importing
        _end_line()
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    finally:
        if argv is None:  # the command line's process, which ends now: a Ctrl-C in its teardown (torch's, 0.6 s)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # printed a traceback, or turned a success into a kill


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):  # asked for: stdout, 0; no command: a usage error, as argparse
        out = sys.stdout if argv else sys.stderr
        print("usage: internvl-mpo <command> [options]\n\ncommands:", file=out)
        for name in COMMANDS:
            print(f"  {name:10s} {_summary(name)}", file=out)
        print("\n`internvl-mpo <command> --help` lists a command's options.", file=out)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"internvl-mpo: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _lenient_stdout()
    fn = _resolve(name)
    parser = build_parser(fn, name)
    # words and flags in any order (`chat What --image a.png is it`); after `--` every word is a positional one
    # (`chat What --image a.png -- -x`), which parse_intermixed_args reads as a flag on Python 3.11 (`chat --
    # --image x`): those words are parsed as stand-ins that no command line holds (a NUL), then put back
    cut = rest.index("--") + 1 if "--" in rest else len(rest)
    words = {f"\0{i}": word for i, word in enumerate(rest[cut:])}
    namespace, extra = parser.parse_known_intermixed_args(rest[:cut] + list(words))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(words.get(w, w) for w in extra)}")
    args = vars(namespace)
    for key, value in args.items():  # the words back; repeatable flags not given -> the function's default
        value = [words.get(v, v) for v in value] if isinstance(value, list) else words.get(value, value)
        args[key] = inspect.signature(fn).parameters[key].default if value is None else value
    from .errors import InternVLError, Interrupted

    positional = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(args.pop(p.name))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            positional += args.pop(p.name)
    try:
        result = fn(*positional, **args)
        if sys.stdout is not None:  # what the buffer holds (stdout into a file is block-buffered), while guarded
            sys.stdout.flush()
    except InternVLError as e:
        print(f"internvl-mpo {name}: error: {flagged(e, fn)}", file=sys.stderr)
        return 1
    except MemoryError as e:  # Python's (Pillow's buffers, lists): a line, not a traceback ending in the allocator
        print(f"internvl-mpo {name}: error: out of memory{f' ({e})' if str(e) else ''}: this machine could not "
              "allocate what the command needed", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):
            _end_line()
        return 130
    return int(result or 0)


def _lenient_stdout() -> None:
    """Let stdout write what its encoding cannot as backslash escapes, as Python's stderr does: a file name whose
    bytes are not UTF-8 (read as lone surrogates) under a UTF-8 locale, or an answer's CJK text under a Latin-1 or
    cp1252 one, raised UnicodeEncodeError, a traceback after the work was done (a converted folder, a tiles PNG) or
    in the middle of a conversation."""
    stream = sys.stdout
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="backslashreplace")


class _GuardedStdout:
    """stdout, whose writes that fail (a full disk under `chat ... > out.txt`, an I/O error; not a closed pipe,
    main's BrokenPipeError) raise OutputError, a one-line error, not an OSError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def _guard(self, call, *args):
        from .errors import OutputError

        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            with contextlib.suppress(OSError, ValueError):  # Python's flush at exit would fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            raise OutputError(f"cannot write to stdout ({e.strerror or e})") from None


@contextlib.contextmanager
def _guarded_stdout():
    """sys.stdout as a _GuardedStdout while a command runs. A stdout closed at the start (`>&-`, a daemon's) is
    None in Python, to which print() writes nothing: it stays so (a wrapper around None raised AttributeError)."""
    stream = sys.stdout
    if stream is None:
        yield
        return
    sys.stdout = _GuardedStdout(stream)
    try:
        try:
            yield
        except SystemExit:  # argparse's --help and usage errors: their text is still in the buffer
            sys.stdout.flush()
            raise
        # flushed here, not at exit: Python's own flush there fails with "Exception ignored ... OSError", exit 120
        sys.stdout.flush()
    finally:
        sys.stdout = stream


def _end_line() -> None:
    """End the line at Ctrl-C: a terminal shows ^C where its cursor is (after a progress bar, say), and a command
    stopped without a line of its own (while its model loads) left the shell's prompt there."""
    if sys.stderr.isatty():
        print(file=sys.stderr)


def flagged(error: Exception, fn) -> Exception:
    """`error` naming the settings of command `fn` by their flags (`max_num` -> `--max-num`), where it is a
    SettingError (one that names settings)."""
    from .errors import SettingError

    if not isinstance(error, SettingError):
        return error
    params = inspect.signature(fn).parameters.values()  # the flags are those build_parser makes
    flags = [p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY
             and (p.default is not inspect.Parameter.empty or p.kind is inspect.Parameter.KEYWORD_ONLY)]
    return error.named({name: "--" + name.replace("_", "-") for name in flags})


def default_model() -> Path:
    """The demo checkpoint shipped inside the package."""
    return Path(__file__).parent / "demo_model"


if __name__ == "__main__":
    sys.exit(main())
