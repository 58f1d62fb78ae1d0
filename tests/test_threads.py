"""One InternVLChat called from several threads at once (a Flask or Gradio app) answers as the same
calls made one after another, and leaves nothing behind."""

from __future__ import annotations

import threading
import warnings

import pytest
from PIL import Image

from internvl_mpo.processor.image import open_image

THREADS = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("threads")
    paths = []
    for name, size, colour in (("wide.png", (300, 200), "red"), ("tall.png", (200, 300), "blue")):
        Image.new("RGB", size, colour).save(folder / name)
        paths.append(str(folder / name))
    return paths


def test_images_opened_from_several_threads_leave_the_warning_filters_alone(images):
    """Opening hides Pillow's DecompressionBombWarning with catch_warnings, which swaps the process-wide
    filter list: threads inside it at once used to leave the warning ignored for good."""
    filters = list(warnings.filters)

    def open_many():
        for _ in range(200):
            open_image(images[0])

    threads = [threading.Thread(target=open_many) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == filters
