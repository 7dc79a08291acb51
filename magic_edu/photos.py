"""Real photographs for the paper's presets: a few bundled samples, and your own images.

The samples are the photographs scikit-image ships inside its wheel (``skimage/data``),
read straight from the installed package, so they work offline and never trigger
scikit-image's download of its larger data set. Their licences, as scikit-image documents
them, allow reuse: CC0 or public domain (see :data:`SAMPLE_PHOTOS`).

>>> list_sample_photos()                      # name -> what it shows (licence)
>>> photo = load_sample_photo("chelsea")      # a PIL RGB image
>>> mine = load_user_image(upload_widget)     # a path, bytes or an ipywidgets FileUpload
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import MagicEduError
from .inputs import decode_image_file, load_image


@dataclass(frozen=True)
class SamplePhoto:
    """One bundled photograph: its file in ``skimage/data``, what it shows, its licence."""

    file: str
    description: str
    licence: str
    credit: str


SAMPLE_PHOTOS: dict[str, SamplePhoto] = {
    "astronaut": SamplePhoto("astronaut.png",
                             "astronaut Eileen Collins in an orange suit, a flag and a model space shuttle",
                             "public domain", "NASA"),
    "chelsea": SamplePhoto("chelsea.png", "close-up of a tabby cat (Chelsea)", "CC0",
                           "Stefan van der Walt"),
    "coffee": SamplePhoto("coffee.png", "a red cup of espresso on a saucer with a spoon, on a wooden table", "CC0",
                          "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    "rocket": SamplePhoto("rocket.jpg", "a SpaceX Falcon 9 rocket on its launch pad at dusk (DSCOVR launch)",
                          "public domain", "SpaceX"),
    "hubble_deep_field": SamplePhoto("hubble_deep_field.jpg", "the Hubble deep field: thousands of distant galaxies",
                                     "public domain", "NASA"),
    "camera": SamplePhoto("camera.png", "a man looking through a camera on a tripod (black and white)", "CC0",
                          "Lav Varshney"),
}


def list_sample_photos() -> dict[str, str]:
    """Sample photo name -> what it shows (licence, credit)."""
    return {name: f"{p.description} ({p.licence}, {p.credit})" for name, p in SAMPLE_PHOTOS.items()}


def sample_photo_path(name: str) -> Path:
    """The file of a sample photo inside the installed scikit-image."""
    if not isinstance(name, str) or name not in SAMPLE_PHOTOS:
        raise MagicEduError(f"name must be one of {', '.join(map(repr, SAMPLE_PHOTOS))}; got {name!r}")
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise MagicEduError(
            "the sample photos come with scikit-image, which is not installed: "
            "pip install scikit-image (or pip install 'magic_edu[photos]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SAMPLE_PHOTOS[name].file
    if not path.is_file():
        raise MagicEduError(f"sample photo {name!r}: this scikit-image does not bundle {path.name} (in {path.parent})")
    return path


def load_sample_photo(name: str) -> Image.Image:
    """A bundled sample photograph as a PIL RGB image (offline; see :func:`list_sample_photos`)."""
    return load_image(sample_photo_path(name), name=f"sample photo {name!r}")


def load_user_image(source: Any, name: str = "image") -> Image.Image:
    """Your own image as a PIL RGB image.

    ``source`` may be a file path, the raw bytes of an image file, an ``ipywidgets.FileUpload``
    (its first file), its ``.value`` or one entry of it (a dict with ``content``, ipywidgets 8;
    ipywidgets 7's ``{filename: {"content": ...}}`` works too), or anything
    :func:`magic_edu.load_image` takes (PIL image, array, tensor).
    """
    if isinstance(source, (str, os.PathLike)):
        return load_image(source, name=name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _image_from_bytes(bytes(source), name)
    if isinstance(source, Mapping):
        if "content" in source:  # one FileUpload entry
            label = f"{name} ({source['name']})" if source.get("name") else name
            return load_user_image(source["content"], name=label)
        if len(source) == 1:  # ipywidgets 7: {filename: {"metadata": ..., "content": ...}}
            (filename, entry), = source.items()
            if isinstance(entry, Mapping) and "content" in entry:
                return load_user_image(entry["content"], name=f"{name} ({filename})")
        if not source:
            raise MagicEduError(f"{name}: no file uploaded yet; choose a file with the upload button first")
        raise MagicEduError(f"{name}: a dict must be a FileUpload entry with a 'content' key; got keys {list(source)}")
    if isinstance(source, (list, tuple)):  # FileUpload.value
        if not source:
            raise MagicEduError(f"{name}: no file uploaded yet; choose a file with the upload button first")
        return load_user_image(source[0], name=name)
    if _is_file_upload(source):
        return load_user_image(source.value, name=name)
    return load_image(source, name=name)


def _is_file_upload(obj: Any) -> bool:
    return type(obj).__name__ == "FileUpload" and hasattr(obj, "value")


def _image_from_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an uploaded file's bytes with the same checks as a file on disk (size bounded before decoding)."""
    if not data:
        raise MagicEduError(f"{name}: the uploaded file is empty")
    return decode_image_file(io.BytesIO(data), name, f"{name}: the uploaded file")
