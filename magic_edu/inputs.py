"""Checking what users pass in: images and decoding settings.

Every check raises :class:`MagicEduError` (a ``ValueError``) whose message names the
argument and says what is allowed, so nobody meets a traceback from deep inside torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import MagicEduError

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]  # noqa: UP007 (a runtime alias on 3.10)


def load_image(image: ImageLike, name: str = "image") -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, ...), a file path,
    an H x W x 3 (or H x W) uint8 array, or a tensor (C x H x W or H x W x C, uint8 or
    float in [0, 1]). Transparent pixels are composited onto white.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open_image_file(Path(image), name)
    if isinstance(image, torch.Tensor):
        image = _tensor_to_array(image, name)
    if isinstance(image, np.ndarray):
        return _array_to_image(image, name)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    raise MagicEduError(
        f"{name} must be a PIL image, a file path, an H x W x 3 uint8 array or a tensor; "
        f"got {type(image).__name__}"
    )


def _open_image_file(path: Path, name: str) -> Image.Image:
    if not path.exists():
        raise MagicEduError(f"{name}: no such file: {path}")
    if path.is_dir():
        raise MagicEduError(f"{name}: {path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise MagicEduError(f"{name}: the file {path} is empty")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MagicEduError(f"{name}: {path} is not a readable image ({err})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _tensor_to_array(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # C x H x W -> H x W x C
    if t.is_floating_point():
        if t.numel() and (t.min() < 0 or t.max() > 1):
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
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            arr = (arr * 255).round().astype(np.uint8)
        else:
            raise MagicEduError(f"{name}: an array must be uint8 (or float in [0, 1]); got {arr.dtype}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], else a MagicEduError naming ``name``."""
    allowed = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MagicEduError(f"{name} must be {allowed}; got {value!r}")
    if value < low or (high is not None and value > high):
        raise MagicEduError(f"{name} must be {allowed}; got {value}")
    return int(value)


def check_float(value: Any, name: str, low: float, high: float | None = None) -> float:
    """``value`` as a float in [low, high], else a MagicEduError naming ``name``."""
    allowed = f"a number >= {low}" if high is None else f"a number between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MagicEduError(f"{name} must be {allowed}; got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < low or (high is not None and value > high):
        raise MagicEduError(f"{name} must be {allowed}; got {value}")
    return value
