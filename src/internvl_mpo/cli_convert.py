"""`internvl-mpo convert`. Apart from convert.py, which imports torch and the model code (about 2 s): `cli.py`
imports a command's module to build its flags, so `convert --help` answers at once."""

from __future__ import annotations


def convert_command(src: str, dst: str, *, to: str) -> int:
    """Convert a checkpoint between the official InternVL layout and transformers' InternVL layout.

    src: checkpoint folder to read, or a hub id (downloaded to the hub cache)
    dst: new folder to write
    to: "hf" (official -> transformers' InternVLForConditionalGeneration) or "official" (the reverse)
    """
    from .convert import convert, remote_code_note, tokenizer_note

    out = convert(src, dst, to)
    print(f"wrote {out} ({'transformers' if to == 'hf' else 'official'} layout)")
    for note in (remote_code_note(out), tokenizer_note(out) if to == "official" else None):
        if note:
            print(note)
    return 0
