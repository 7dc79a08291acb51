"""Checking what users pass in: images, decoding settings and files of texts.

Every check raises :class:`MagicEduError` (a ``ValueError``) whose message names the
argument and says what is allowed, so nobody meets a traceback from deep inside torch.

Images are bounded before any pixel is decoded or resized (PIL's ``Image.open`` reads only
the header, so a file's size is known for free): see :data:`MAX_PIXELS` and
:data:`MAX_ASPECT_RATIO`. Any failure of PIL's decoders becomes a :class:`MagicEduError`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch
from PIL import Image

from .errors import MagicEduError

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]  # noqa: UP007 (a runtime alias on 3.10)

# The most pixels an image may have (width x height), checked on the file's header before
# decoding. 64 megapixels (e.g. 8000 x 8000) cost about 192 MB as RGB; CLIP only ever sees
# 224 x 224, so nothing is lost by downscaling first. This is below PIL's own bomb limit
# (Image.MAX_IMAGE_PIXELS, about 89 megapixels, which only warns) and refuses e.g. a
# 12000 x 12000 photo, which would need well over a gigabyte while decoding and converting.
MAX_PIXELS = 64_000_000

# CLIP's preprocessing scales the SHORT side to 224 pixels whatever the long side is, so a
# w x h image becomes 224 x 224 * (long / short) pixels: a 1 x 100000 strip would become
# 224 x 22,400,000 (15 GB as 8-bit RGB, 60 GB as float32). We refuse images whose resized pixel count
# would exceed MAX_RESIZED_PIXELS = 224 * 224 * 64, i.e. an aspect ratio above 64:1
# (panoramas are about 4:1 to 10:1; beyond 64:1 CLIP's centre crop would keep under 2 %).
CLIP_SIDE = 224
MAX_ASPECT_RATIO = 64
MAX_RESIZED_PIXELS = CLIP_SIDE * CLIP_SIDE * MAX_ASPECT_RATIO

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how 16-bit PNGs used to open
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(image: ImageLike, name: str = "image") -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, ...), a file path,
    an H x W x 3 (or H x W, or H x W x 4) uint8 or uint16 array, or a tensor (C x H x W or
    H x W x C, uint8 or float in [0, 1]). Transparent pixels are composited onto white;
    16-bit images are scaled by their bit depth (65535 -> 255), not stretched.

    Refused with a :class:`MagicEduError` naming ``name``: unreadable or corrupt files,
    images over :data:`MAX_PIXELS` pixels or more elongated than :data:`MAX_ASPECT_RATIO`:1,
    empty images, and float pixels outside [0, 1], NaN or infinite.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open_image_file(Path(image), name)
    if isinstance(image, torch.Tensor):
        image = _tensor_to_array(image, name)
    if isinstance(image, np.ndarray):
        return _array_to_image(image, name)
    if isinstance(image, Image.Image):
        check_image_size(image.size, name)
        return _to_rgb(image, name)
    raise MagicEduError(
        f"{name} must be a PIL image, a file path, an H x W x 3 uint8 array or a tensor; "
        f"got {type(image).__name__}"
    )


def check_image_size(size: tuple[int, int], what: str) -> None:
    """Refuse a (width, height) that is empty, over :data:`MAX_PIXELS`, or too elongated for CLIP."""
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise MagicEduError(f"{what}: the image is empty ({width} x {height} pixels)")
    pixels = width * height
    if pixels > MAX_PIXELS:
        raise MagicEduError(
            f"{what}: the image is {width} x {height} pixels ({pixels / 1e6:.0f} megapixels); at most "
            f"{MAX_PIXELS / 1e6:.0f} megapixels are accepted. Downscale it first (e.g. to 2000 pixels on "
            f"the long side: CLIP only sees {CLIP_SIDE} x {CLIP_SIDE})"
        )
    short, long = min(width, height), max(width, height)
    if long > short * MAX_ASPECT_RATIO:  # i.e. CLIP_SIDE**2 * long / short > MAX_RESIZED_PIXELS
        resized = f"{CLIP_SIDE} x {CLIP_SIDE * long // short:,}" if width < height else \
            f"{CLIP_SIDE * long // short:,} x {CLIP_SIDE}"
        ratio = f"{long / short:.1f}".removesuffix(".0")  # 64.5:1 must not read as 64:1
        raise MagicEduError(
            f"{what}: the image is {width} x {height} pixels, an aspect ratio of {ratio}:1; at most "
            f"{MAX_ASPECT_RATIO}:1 is accepted, because CLIP scales the short side to {CLIP_SIDE} pixels "
            f"(this one would become {resized}). Crop it to a less elongated shape first"
        )


def decode_image_file(source: str | os.PathLike | IO[bytes], name: str, what: str) -> Image.Image:
    """Decode an image file (a path or a binary file object) into an RGB PIL image.

    The size is checked on the header, before any pixel is decoded. Every failure of PIL
    (corrupt data, decompression bombs, unknown formats, a plugin's SyntaxError,
    struct.error, EOFError, ...) becomes a :class:`MagicEduError` starting with ``what``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                check_image_size(img.size, what)  # the header only: nothing decoded yet
                img.load()
                check_image_size(img.size, what)  # a few formats pick their size while loading
                return _to_rgb(img, name)
    except MagicEduError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MagicEduError(
            f"{what}: the image is too large to decode safely ({err}); at most {MAX_PIXELS / 1e6:.0f} "
            "megapixels are accepted. Downscale it first"
        ) from None
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise all sorts; none may escape
        reason = str(err) or type(err).__name__
        raise MagicEduError(f"{what} is not a readable image ({reason})") from None


def _open_image_file(path: Path, name: str) -> Image.Image:
    if not path.exists():
        raise MagicEduError(f"{name}: no such file: {path}")
    if path.is_dir():
        raise MagicEduError(f"{name}: {path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise MagicEduError(f"{name}: the file {path} is empty")
    return decode_image_file(path, name, f"{name}: {path}")


def _to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    try:
        return _convert_to_rgb(img, name)
    except MagicEduError:
        raise
    except Exception as err:  # noqa: BLE001 - an exotic mode PIL cannot convert
        raise MagicEduError(f"{name}: cannot convert a {img.mode!r} image to RGB ({err})") from None


def _convert_to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in _SIXTEEN_BIT_MODES:  # scale by the bit depth: 65535 is white, 0 black
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 65535)
        return Image.fromarray(_sixteen_to_eight(arr), "L").convert("RGB")
    if img.mode == "F":  # PIL's own convention for F -> L: values 0..255, clipped
        arr = np.asarray(img, dtype=np.float32)
        _check_finite(arr, name, "the image")
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """16-bit values (0..65535) -> uint8 (0..255) by the bit depth (not a min-max stretch)."""
    return np.rint(arr.astype(np.float32) * np.float32(255.0 / 65535.0)).clip(0, 255).astype(np.uint8)


def _check_finite(values: np.ndarray | torch.Tensor, name: str, what: str) -> None:
    finite = torch.isfinite(values) if isinstance(values, torch.Tensor) else np.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        total = values.numel() if isinstance(values, torch.Tensor) else values.size
        raise MagicEduError(
            f"{name}: {what} holds NaN or infinite values ({bad} of {total} values); "
            "pixels must be finite numbers in [0, 1]"
        )


def _tensor_to_array(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # C x H x W -> H x W x C
    if t.ndim in (2, 3) and t.numel():
        check_image_size((t.shape[1], t.shape[0]), name)  # before any copy or conversion
    if t.is_floating_point():
        if t.numel():
            _check_finite(t, name, "the tensor")
            if t.min() < 0 or t.max() > 1:
                raise MagicEduError(f"{name}: a float tensor must hold values in [0, 1]")
        t = (t * 255).round().to(torch.uint8)
    return t.numpy()


def _array_to_image(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise MagicEduError(f"{name}: an array must be H x W x 3 (or H x W x 4, or H x W); got shape {arr.shape}")
    if arr.size == 0:
        raise MagicEduError(f"{name}: the array is empty (shape {arr.shape})")
    check_image_size((arr.shape[1], arr.shape[0]), name)  # before any copy or conversion
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # uint16, either byte order
        arr = _sixteen_to_eight(arr)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise MagicEduError(f"{name}: an array must be uint8, uint16 or float in [0, 1]; got {arr.dtype}")
        _check_finite(arr, name, "the array")
        if arr.min() < 0 or arr.max() > 1:
            raise MagicEduError(f"{name}: a float array must hold values in [0, 1]; "
                                f"got values from {arr.min()} to {arr.max()}")
        arr = (arr * 255).round().astype(np.uint8)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)), name)


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], else a MagicEduError naming ``name``."""
    allowed = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MagicEduError(f"{name} must be {allowed}; got {value!r}")
    if value < low or (high is not None and value > high):
        raise MagicEduError(f"{name} must be {allowed}; got {value}")
    return int(value)


def check_float(value: Any, name: str, low: float | None, high: float | None = None) -> float:
    """``value`` as a finite float in [low, high] (None: no bound), else a MagicEduError naming ``name``."""
    if low is None:
        allowed = "a finite number" if high is None else f"a number <= {high}"
    else:
        allowed = f"a number >= {low}" if high is None else f"a number between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MagicEduError(f"{name} must be {allowed}; got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise MagicEduError(f"{name} must be {allowed}; got {value}")
    return value


# -- files of texts (corpora, caption pools) ---------------------------------------------------
def read_texts(source: str | os.PathLike | Sequence[str], name: str = "texts") -> list[str]:
    """The texts of ``source``: a ``.txt`` file (one text a line, blank lines skipped), a
    ``.json`` file (a list of ``{"captions": [...]}`` as the paper's caption files, or a list of
    strings), or a list of strings. Whitespace is collapsed and blank texts are skipped; none left is an
    error, and so is anything that is not a string."""
    if isinstance(source, (list, tuple)):
        texts = list(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise MagicEduError(f"{name} {path}: no such file")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise MagicEduError(f"{name} {path}: cannot read it as UTF-8 text ({err})") from None
        if path.suffix.lower() == ".json":
            texts = _json_texts(raw, path, name)
        else:
            texts = [line for line in raw.splitlines() if line.strip()]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MagicEduError(f"{name}: text {i} must be a string; got {type(t).__name__}")
    texts = [" ".join(t.split()) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        raise MagicEduError(f"{name}: no texts in it (a .txt file needs one text a line; a .json file a list of "
                            '{"captions": [...]} or of strings)')
    return texts


def _json_texts(raw: str, path: Path, name: str) -> list[Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as err:
        raise MagicEduError(f"{name} {path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise MagicEduError(f"{name} {path}: expected a JSON list of {{\"captions\": [...]}} or of strings")
    texts: list[Any] = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            captions = item.get("captions")
            if not isinstance(captions, list):
                raise MagicEduError(f"{name} {path}: item {i} has no list \"captions\"")
            texts += captions
        else:
            texts.append(item)
    return texts
