"""Sample photographs (offline, from scikit-image's wheel) and user images by path or upload."""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magic_edu import MagicEduError
from magic_edu.photos import (
    SAMPLE_PHOTOS,
    list_sample_photos,
    load_sample_photo,
    load_user_image,
    sample_photo_path,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a sample photo tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def png_bytes(mode: str = "RGB", size=(20, 16), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else (*color, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_listing_has_descriptions_and_licences():
    listed = list_sample_photos()
    assert set(listed) == set(SAMPLE_PHOTOS) and len(listed) >= 5
    for name, text in listed.items():
        assert SAMPLE_PHOTOS[name].licence in ("CC0", "public domain") and SAMPLE_PHOTOS[name].licence in text


@pytest.mark.parametrize("name", list(SAMPLE_PHOTOS))
def test_every_sample_photo_loads_offline_from_the_installed_wheel(name, no_network):
    path = sample_photo_path(name)
    skimage_dir = Path(importlib.util.find_spec("skimage").submodule_search_locations[0])
    assert path.parent == skimage_dir / "data"  # bundled, not scikit-image's download cache
    photo = load_sample_photo(name)
    assert isinstance(photo, Image.Image) and photo.mode == "RGB"
    assert min(photo.size) >= 256
    assert np.asarray(photo).std() > 10  # a real picture, not a blank


def test_grayscale_sample_becomes_rgb():
    photo = np.asarray(load_sample_photo("camera"))
    assert photo.shape[2] == 3 and (photo[..., 0] == photo[..., 1]).all()


def test_unknown_sample_lists_the_names():
    with pytest.raises(MagicEduError) as info:
        load_sample_photo("cat")
    for name in SAMPLE_PHOTOS:
        assert repr(name) in str(info.value)


def test_without_scikit_image_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "skimage" else real(n, *a))
    with pytest.raises(MagicEduError, match="pip install scikit-image"):
        load_sample_photo("astronaut")


# -- user images ---------------------------------------------------------------------------------
def upload_entry(data: bytes, name: str = "mine.png") -> dict:
    """One entry of ipywidgets 8's FileUpload.value."""
    return {"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
            "last_modified": dt.datetime.now(dt.timezone.utc)}


def test_user_image_by_path_and_bytes(tmp_path):
    data = png_bytes()
    path = tmp_path / "mine.png"
    path.write_bytes(data)
    for source in (path, str(path), data, bytearray(data), memoryview(data)):
        img = load_user_image(source)
        assert img.mode == "RGB" and img.size == (20, 16) and img.getpixel((0, 0)) == (10, 200, 30)


def test_user_image_from_a_file_upload_widget():
    import ipywidgets

    upload = ipywidgets.FileUpload(accept="image/*")
    with pytest.raises(MagicEduError, match="no file uploaded yet"):
        load_user_image(upload)
    upload.value = (upload_entry(png_bytes()),)
    for source in (upload, upload.value, upload.value[0]):
        assert load_user_image(source).getpixel((3, 3)) == (10, 200, 30)


def test_user_image_from_ipywidgets7_value():
    data = png_bytes()
    assert load_user_image({"mine.png": {"metadata": {}, "content": data}}).size == (20, 16)


def test_transparent_upload_is_composited_on_white():
    assert load_user_image(png_bytes("RGBA")).getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_upload_names_the_file():
    with pytest.raises(MagicEduError, match="notes.txt.*not a readable image"):
        load_user_image(upload_entry(b"just some text", name="notes.txt"))
    with pytest.raises(MagicEduError, match="empty"):
        load_user_image(b"")
    with pytest.raises(MagicEduError, match="no such file"):
        load_user_image("/nonexistent/photo.jpg")
    with pytest.raises(MagicEduError, match="content"):
        load_user_image({"a": 1, "b": 2})


def test_images_and_arrays_pass_through():
    arr = np.zeros((8, 9, 3), dtype=np.uint8)
    assert load_user_image(arr).size == (9, 8)
    assert load_user_image(Image.new("L", (5, 4))).mode == "RGB"
