"""Stamps of input files: what a resumed batch job counts as the same file."""

from __future__ import annotations

import json
import os
import shutil

from internvl_mpo.filestamp import stamps, unchanged


def rewrite(path, data: bytes, recorded_mtime_ns: int) -> None:
    """`path` written again with `data` and, as a clock that moved on gives it, another mtime than the one recorded:
    a filesystem clock of coarse ticks (Linux before 6.13 stamps files with the jiffy clock, 1-10 ms) gives a rewrite
    within the tick of the first write the same mtime, and stats then rightly call it unchanged (filestamp's doc)."""
    path.write_bytes(data)
    if path.stat().st_mtime_ns == recorded_mtime_ns:
        os.utime(path, ns=(recorded_mtime_ns + 10**7, recorded_mtime_ns + 10**7))


def test_an_edit_changes_the_stamp_and_a_copy_with_the_same_bytes_does_not(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    recorded = stamps([image])
    assert unchanged([image], recorded)
    os.utime(image, ns=(1, 1))  # another mtime, same bytes: a copy made without keeping times
    assert unchanged([image], recorded)
    rewrite(image, b"two", recorded[0]["mtime_ns"])  # same size, other bytes, another mtime (both kept go unseen)
    assert not unchanged([image], recorded)
    image.write_bytes(b"three")  # another size
    assert not unchanged([image], recorded)
    shutil.copy(image, tmp_path / "b.png")  # a fresh copy elsewhere holds the same bytes
    assert unchanged([tmp_path / "b.png"], stamps([image]))


def test_a_folder_of_frames_has_one_stamp_of_its_files(tmp_path):
    """A folder of thousands of frames gets a stamp of constant size (one per frame made answer lines
    of a megabyte); an edit, added or renamed frame still shows, a copy without times does not."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(1000):
        (frames / f"{k}.png").write_bytes(b"frame")
    (frames / ".DS_Store").write_bytes(b"x")  # hidden files are no frames
    recorded = stamps([frames])
    assert set(recorded[0]) == {"stats", "sha256"} and len(json.dumps(recorded)) < 200
    (frames / ".DS_Store").write_bytes(b"yy")
    assert unchanged([frames], recorded)
    copy = tmp_path / "copy"
    shutil.copytree(frames, copy, copy_function=shutil.copyfile)  # no times kept
    assert unchanged([copy], recorded)
    (frames / "1000.png").write_bytes(b"frame")
    assert not unchanged([frames], recorded)
    (frames / "1000.png").unlink()
    (frames / "1.png").rename(frames / "01.png")
    assert not unchanged([frames], recorded)
    (frames / "01.png").rename(frames / "1.png")
    first = (frames / "1.png").stat().st_mtime_ns  # as recorded (its stats are in the stamp's digest)
    rewrite(frames / "1.png", b"FRAME", first)  # same size
    assert not unchanged([frames], recorded)
    assert not unchanged([frames / "0.png"], recorded)  # a file where the folder was


def test_missing_files_and_old_lines(tmp_path):
    image = tmp_path / "a.png"
    assert stamps([image]) == [None]  # the job reports the missing file itself
    assert not unchanged([image], [None])
    image.write_bytes(b"one")
    assert not unchanged([image], [None])  # it could not be read then: its answer is an error, asked again
    recorded = stamps([image])
    image.unlink()
    assert not unchanged([image], recorded)
    assert unchanged([image], None)  # a line written before stamps were kept is not compared
    assert not unchanged([image, image], recorded)  # another number of files
    assert not unchanged([tmp_path], recorded)  # a folder where the file was
    assert not unchanged([image], "junk") and not unchanged([image], [{"size": "junk"}])
