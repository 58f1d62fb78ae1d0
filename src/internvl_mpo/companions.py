"""The files that travel with a checkpoint's weights: tokenizer, generation and processor files, and the
remote code (`*.py`) its config.json and tokenizer_config.json name, with the modules that code imports.

A save copies them from the source folder (`companions`, `tokenizer_files`, `remote_code`), leaves out
transformers' InternVLProcessor files and tokens, which belong to the other layout
(`transformers_processor_files`, `without_processor_tokens`), and added tokens' ids are read from them by
string (`find_token_id`).
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Files that travel with the weights when a model is saved.
COMPANION_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "added_tokens.json", "special_tokens_map.json", "tokenizer.model", "preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",  # where newer transformers save the chat template
)
# Of those, the model's own settings (generation defaults, image processing): from the model's folder when the
# tokenizer's files come from another (`model_files`).
MODEL_FILES = ("generation_config.json", "preprocessor_config.json")
# transformers' processor file: its layout (`convert --to hf`) writes it, the official layout never holds it.
PROCESSOR_FILE = "processor_config.json"
# The tokenizer attributes transformers' InternVLProcessor reads (it needs a video token even for images),
# and the tokenizer files that can hold them (`without_processor_tokens`).
PROCESSOR_TOKENS = {
    "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
PROCESSOR_TOKEN_FILES = ("tokenizer_config.json", "tokenizer.json", "added_tokens.json")


def auto_map_files(auto_map: dict[str, Any]) -> list[str]:
    """The .py files an auto_map names: "module.Class" (or "repo--module.Class") -> "module.py"."""
    entries = [e for value in auto_map.values() for e in (value if isinstance(value, list) else [value])
               if isinstance(e, str) and e]
    return sorted({e.split("--")[-1].rsplit(".", 1)[0] + ".py" for e in entries})


def _json_object(path: Path) -> dict:
    """A JSON file's object; {} when it is missing or not a JSON object (nothing it names is then known)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# `import .x` and `from .x import y`, as transformers reads a remote-code file's imports from its own folder.
_RELATIVE_IMPORT = re.compile(r"^\s*(?:import\s+\.(\w+)\s*$|from\s+\.(\w+)\s+import)", re.M)


def remote_code(folder: Path, configs: Iterable[dict]) -> list[str]:
    """The .py files of `folder` that the auto_maps of `configs` name (a config's own and its nested
    configs': InternLM2's llm_config names modeling_internlm2), with the modules they import relatively
    from the folder, recursively: the files transformers fetches with them (`from .conversation import`)."""
    maps = [c.get("auto_map") for config in configs for c in (config, *config.values()) if isinstance(c, dict)]
    pending = [name for auto_map in maps if isinstance(auto_map, dict) for name in auto_map_files(auto_map)]
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name in found or Path(name).name != name or "\\" in name or not (folder / name).is_file():
            continue  # only files of the folder itself: "../x.Cls" reaches elsewhere
        found.add(name)
        text = (folder / name).read_text(encoding="utf-8", errors="replace")
        pending += [(plain or source) + ".py" for plain, source in _RELATIVE_IMPORT.findall(text)]
    return sorted(found)


def transformers_processor_files(folder: Path) -> list[str]:
    """The files of `folder` that belong to transformers' InternVLProcessor (`convert --to hf` writes them):
    processor_config.json, and a preprocessor_config.json that names that processor (the official one is
    a CLIP image processor's). In an official-layout folder they claim the other layout: transformers'
    AutoProcessor would build InternVLProcessor, which reads transformers' layout only."""
    names = [PROCESSOR_FILE] if (folder / PROCESSOR_FILE).is_file() else []
    if _json_object(folder / "preprocessor_config.json").get("processor_class") == "InternVLProcessor":
        names.append("preprocessor_config.json")
    return names


def broken_link(path: Path) -> str | None:
    """Why `path` leads to no file where it is a symbolic link that does (its target gone, as a hub cache's
    snapshot keeps after its blobs were deleted or a download was cut short, or a loop of links); else None.
    Such a file would read as absent."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as e:
        hint = "" if e.errno == errno.ELOOP else ": a download cut short or a cache cleaned; fetch the file again"
        return f"{path} is a symbolic link to {os.readlink(path)}, which leads to no file ({e.strerror}){hint}"
    return None


def without_processor_tokens(files: dict[str, Path], vocab_size: int) -> dict[str, str]:
    """The tokenizer files among `files` (name -> file) that hold transformers' processor tokens, as texts
    without them (name -> text): in tokenizer_config.json the keys that name them (`extra_special_tokens`
    as a dict, which `convert --to hf` writes; `model_specific_special_tokens`, `video_token`, ..., which
    transformers saves), and the added tokens transformers gave those past the model's `vocab_size` (its
    `<video>`, not in the official vocabulary) in tokenizer.json, added_tokens.json or tokenizer_config.json's
    `added_tokens_decoder`: with it the tokenizer held one token more than the model's embeddings. Files
    without them are left out (they stay as they are, byte for byte)."""
    def beyond(token_id: Any, content: Any) -> bool:
        return content in PROCESSOR_TOKENS.values() and str(token_id).isdigit() and int(token_id) >= vocab_size

    texts = {}
    for name in PROCESSOR_TOKEN_FILES:
        data = _json_object(files[name]) if name in files else {}
        if name == "tokenizer_config.json":
            kept = {key: value for key, value in data.items() if key not in ("model_specific_special_tokens",
                    *PROCESSOR_TOKENS) and not (key == "extra_special_tokens" and isinstance(value, dict))}
            if isinstance(kept.get("added_tokens_decoder"), dict):
                kept["added_tokens_decoder"] = {i: t for i, t in kept["added_tokens_decoder"].items()
                                                if not (isinstance(t, dict) and beyond(i, t.get("content")))}
        elif name == "tokenizer.json" and isinstance(data.get("added_tokens"), list):
            kept = {**data, "added_tokens": [t for t in data["added_tokens"]
                                             if not (isinstance(t, dict) and beyond(t.get("id"), t.get("content")))]}
        elif name == "added_tokens.json":
            kept = {content: i for content, i in data.items() if not beyond(i, content)}
        else:
            kept = data
        if kept != data:
            texts[name] = json.dumps(kept, indent=2, ensure_ascii=False) + "\n"
    return texts


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer, generation and processor files of `folder` (not transformers' InternVLProcessor's),
    and the code tokenizer_config.json names."""
    code = remote_code(folder, [_json_object(folder / "tokenizer_config.json")])
    names = {name for name in COMPANION_FILES if (folder / name).is_file()} - set(transformers_processor_files(folder))
    return sorted(names | set(code))


def model_files(folder: Path) -> list[str]:
    """The generation and processor files of `folder` (`MODEL_FILES`; not transformers' InternVLProcessor's)."""
    names = {name for name in MODEL_FILES if (folder / name).is_file()}
    return sorted(names - set(transformers_processor_files(folder)))


def companions(folder: Path) -> list[str]:
    """The files of `folder` that travel with its weights: its `tokenizer_files` and the remote code its
    config.json names."""
    return sorted(set(tokenizer_files(folder)) | set(remote_code(folder, [_json_object(folder / "config.json")])))


def find_token_id(folder: Path, token: str) -> int | None:
    """Id of an added token, read from the tokenizer files by string (no tokenizer needed)."""
    from .chat.tokenizer import read_tokenizer_json  # a file that is not JSON: an error naming it

    tok_json = folder / "tokenizer.json"
    if tok_json.exists():
        added_tokens = read_tokenizer_json(tok_json).get("added_tokens")
        added_tokens = [] if added_tokens is None else added_tokens
        if not (isinstance(added_tokens, list) and all(isinstance(added, dict) for added in added_tokens)):
            raise CheckpointError(f"tokenizer file {tok_json}: added_tokens is not a list of objects")
        for added in added_tokens:
            if added.get("content") == token:
                return _token_id(added.get("id"), tok_json, token)
    config = folder / "tokenizer_config.json"
    if config.exists():
        decoder = read_tokenizer_json(config).get("added_tokens_decoder")
        decoder = {} if decoder is None else decoder
        if not (isinstance(decoder, dict) and all(isinstance(added, dict) for added in decoder.values())):
            raise CheckpointError(f"tokenizer file {config}: added_tokens_decoder is not an object of objects")
        for idx, added in decoder.items():
            if added.get("content") == token:
                return _token_id(int(idx) if idx.isdigit() else idx, config, token)
    added_file = folder / "added_tokens.json"
    if added_file.exists():
        value = read_tokenizer_json(added_file).get(token)
        if value is not None:
            return _token_id(value, added_file, token)
    return None


def _token_id(value: object, path: Path, token: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"tokenizer file {path}: {token} has the id {value!r}, not a whole number >= 0")
    return value
