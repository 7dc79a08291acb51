"""Hostile and misleading images: corrupt files, decompression bombs, thin strips, NaN, 16-bit."""

from __future__ import annotations

import io
import random
import resource
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from magic_edu import MagicEduError, load_image
from magic_edu.inputs import MAX_ASPECT_RATIO, MAX_PIXELS, MAX_RESIZED_PIXELS, check_image_size
from magic_edu.photos import load_user_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, idat: bytes = b"") -> bytes:
    """A minimal PNG with correct CRCs: IHDR declaring width x height (8-bit RGB) and one IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


def encoded(fmt: str, seed: int = 0, size=(13, 9), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def loads_or_refuses(path) -> str:
    """load_image(path) must return an RGB image or raise MagicEduError; which one happened."""
    try:
        img = load_image(path)
    except MagicEduError as err:
        assert str(err).startswith("image"), err
        return "refused"
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.width > 0 and img.height > 0
    return "loaded"


# -- corrupt files --------------------------------------------------------------------------------
def test_the_constants_say_the_same_thing():
    assert MAX_RESIZED_PIXELS == 224 * 224 * MAX_ASPECT_RATIO
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS  # refused before PIL's own (warning-only) limit
    assert 12000 * 12000 > MAX_PIXELS >= 6000 * 6000  # a big camera photo passes, 144 megapixels do not


def test_a_45_byte_png_declaring_50000_by_50000_is_refused(tmp_path):
    data = png_header_only(50000, 50000)
    assert len(data) == 45
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(MagicEduError, match=r"image: .*bomb\.png.*(too large|megapixels)"):
        load_image(path)
    with pytest.raises(MagicEduError, match=r"bomb\.png.*(too large|megapixels)"):
        load_user_image({"name": "bomb.png", "content": memoryview(data)})


@pytest.mark.parametrize("size", [(9000, 9000), (10000, 8000)])
def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, size):
    """Between our limit and PIL's own bomb limit: PIL would decode it; we stop at the header."""
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(*size, idat=zlib.compress(b"\0" * 100)))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MagicEduError, match=r"big\.png.*megapixels.*Downscale"):
        load_image(path)
    with pytest.raises(MagicEduError, match=r"upload.*megapixels"):
        load_user_image(path.read_bytes(), name="upload")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing big allocated


def test_decompression_bomb_warning_size_is_refused(tmp_path):
    """Above PIL's warning limit but below its error limit: a MagicEduError, not a warning."""
    path = tmp_path / "warn.png"
    path.write_bytes(png_header_only(10000, 10000))
    with pytest.raises(MagicEduError, match="warn.png"):
        load_image(path)


def test_hand_made_bad_files(tmp_path):
    good = encoded("PNG")
    cases = {
        "empty.png": (b"", "empty"),
        "truncated.png": (good[: len(good) // 2], "not a readable image"),
        "notes.png": (b"this is a text file, not a picture\n" * 3, "not a readable image"),
        "header_only.png": (PNG_SIGNATURE, "not a readable image"),
        "zero.png": (png_header_only(0, 5), "image"),
        "truncated.jpg": (encoded("JPEG")[:200], "not a readable image"),
        "truncated.gif": (encoded("GIF")[:30], "not a readable image"),
    }
    for filename, (data, words) in cases.items():
        path = tmp_path / filename
        path.write_bytes(data)
        with pytest.raises(MagicEduError, match=words):
            load_image(path)
        if data:
            with pytest.raises(MagicEduError, match=filename.replace(".", r"\.")):
                load_user_image({"name": filename, "content": data})


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "set", "insert", "delete", "truncate", "header", "dims"))
        if not out:
            break
        pos = rng.randrange(len(out))
        if op == "flip":
            out[pos] ^= 1 << rng.randrange(8)
        elif op == "set":
            out[pos] = rng.randrange(256)
        elif op == "insert":
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == "delete":
            del out[pos:pos + rng.randint(1, 16)]
        elif op == "truncate":
            del out[pos:]
        elif op == "header":  # corrupt the first bytes, where every format keeps its header
            out[rng.randrange(min(len(out), 40))] = rng.randrange(256)
        else:  # overwrite the declared width/height with a random 16- or 32-bit value
            if out[:8] == PNG_SIGNATURE and len(out) >= 24:
                value = rng.choice((0, 1, rng.randrange(1 << 16), rng.randrange(1 << 32)))
                offset = rng.choice((16, 20))
                out[offset:offset + 4] = struct.pack(">I", value)
                if rng.random() < 0.7:  # a correct CRC, so PIL believes it
                    out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])) & 0xFFFFFFFF)
            elif out[:3] == b"GIF" and len(out) >= 10:
                offset = rng.choice((6, 8))
                out[offset:offset + 2] = struct.pack("<H", rng.randrange(1 << 16))
            elif out[:2] == b"\xff\xd8":
                sof = out.find(b"\xff\xc0")
                if sof > 0 and len(out) > sof + 9:
                    offset = sof + rng.choice((5, 7))
                    out[offset:offset + 2] = struct.pack(">H", rng.randrange(1 << 16))
    return bytes(out)


def test_fuzzed_png_jpeg_and_gif_files_load_or_raise_magic_edu_error(tmp_path):
    rng = random.Random(20240607)
    seeds = [encoded("PNG"), encoded("PNG", 1, (7, 20), "P"), encoded("PNG", 2, (16, 16), "LA"),
             encoded("JPEG", 3, (24, 17)), encoded("GIF", 4, (11, 14)), encoded("PNG", 5, (9, 9), "L")]
    path = tmp_path / "fuzz.bin"
    outcomes = {"loaded": 0, "refused": 0}
    deadline = time.monotonic() + 20
    runs = 0
    for runs in range(1, 2001):
        data = mutate(rng.choice(seeds), rng)
        path.write_bytes(data)
        try:
            outcomes[loads_or_refuses(path)] += 1
        except Exception as err:  # noqa: BLE001 - report which input broke the contract
            pytest.fail(f"run {runs}: {type(err).__name__}: {err} for bytes {data[:64]!r}...")
        if time.monotonic() > deadline:
            break
    assert runs >= 300, f"only {runs} runs in the time allowed"
    assert outcomes["loaded"] and outcomes["refused"]  # the mutations exercise both sides


def test_any_exception_from_a_pil_decoder_becomes_magic_edu_error(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(encoded("PNG"))
    for exc in (struct.error("unpack requires a buffer"), EOFError(), SyntaxError("bad plugin"),
                IndexError("list index out of range"), ValueError("bad"), OSError("broken data stream"),
                Image.DecompressionBombError("too big"), ZeroDivisionError()):
        def broken(self, exc=exc):
            raise exc
        monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
        with pytest.raises(MagicEduError, match=r"image: .*x\.png"):
            load_image(path)
        with pytest.raises(MagicEduError, match="upload"):
            load_user_image(path.read_bytes(), name="upload")


# -- thin, huge and empty images ------------------------------------------------------------------
def test_a_1_by_100000_png_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "thin.png"
    Image.new("L", (1, 100_000), 128).save(path)
    assert path.stat().st_size < 10_000  # small on disk; CLIP would make it 224 x 22,400,000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MagicEduError, match=r"thin\.png.*1 x 100000.*aspect ratio.*64:1"):
        load_image(path)
    with pytest.raises(MagicEduError, match="aspect ratio"):
        load_user_image(path.read_bytes())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_thin_arrays_tensors_and_images_are_refused():
    for thin in (np.zeros((1, 20000, 3), np.uint8), np.zeros((20000, 2), np.uint8),
                 torch.zeros(3, 1, 20000), torch.zeros(20000, 1, 3, dtype=torch.uint8),
                 Image.new("RGB", (1, 65))):
        with pytest.raises(MagicEduError, match="image.*aspect ratio"):
            load_image(thin)
    assert load_image(Image.new("RGB", (1, 64))).size == (1, 64)  # exactly 64:1 is allowed
    assert load_image(np.zeros((3, 192, 3), np.uint8)).size == (192, 3)


def test_huge_arrays_are_refused_without_a_copy():
    big = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (8001, 8001, 3))  # no memory behind it
    with pytest.raises(MagicEduError, match="image.*megapixels"):
        load_image(big)
    with pytest.raises(MagicEduError, match="megapixels"):
        check_image_size((MAX_PIXELS + 1, 1), "x")


def test_empty_pil_images_are_refused_naming_image():
    for size in ((0, 0), (0, 7), (7, 0)):
        with pytest.raises(MagicEduError, match=r"^image: the image is empty"):
            load_image(Image.new("RGB", size))
        with pytest.raises(MagicEduError, match=r"^photo: .*empty"):
            load_image(Image.new("L", size), name="photo")
    with pytest.raises(MagicEduError, match="image"):
        load_image(torch.zeros(3, 0, 4))


# -- misleading pixels ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_pixels_are_refused(bad):
    arr = np.full((4, 5, 3), 0.5, np.float32)
    arr[1, 2, 0] = bad
    for source in (arr, arr.astype(np.float64), arr[..., 0], torch.from_numpy(arr),
                   torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr).half()):
        with pytest.raises(MagicEduError, match="image.*NaN or infinite"):
            load_image(source)
    f_img = Image.fromarray(arr[..., 0], "F")
    with pytest.raises(MagicEduError, match="NaN or infinite"):
        load_image(f_img)


def test_float_pixels_in_range_still_load():
    arr = np.linspace(0, 1, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    expected = (arr * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(arr)), expected)
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(arr).permute(2, 0, 1))), expected)


def sixteen_bit_sources(value_or_array):
    arr = np.asarray(value_or_array, dtype=np.uint16)
    if arr.ndim == 0:
        arr = np.full((6, 7), arr, np.uint16)
    return {
        "uint16 array": arr,
        "big-endian uint16 array": arr.astype(">u2"),
        "uint16 H x W x 3": np.repeat(arr[..., None], 3, axis=-1),
        "I;16 image": Image.fromarray(arr),
        "I;16B image": Image.frombytes("I;16B", (arr.shape[1], arr.shape[0]), arr.astype(">u2").tobytes()),
        "I image": Image.fromarray(arr.astype(np.int32), "I"),
    }


def sixteen_bit_png(tmp_path, arr) -> object:
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.asarray(arr, np.uint16)).save(path)
    return path


def test_white_16_bit_images_stay_white(tmp_path):
    sources = sixteen_bit_sources(65535)
    sources["16-bit PNG file"] = sixteen_bit_png(tmp_path, np.full((6, 7), 65535))
    sources["uint16 tensor"] = torch.full((6, 7), 65535, dtype=torch.uint16)
    for kind, source in sources.items():
        out = np.asarray(load_image(source))
        assert out.shape == (6, 7, 3) and (out == 255).all(), kind


def test_near_black_16_bit_images_stay_dark(tmp_path):
    sources = sixteen_bit_sources(300)  # 300 / 65535 of full scale: about 1 of 255
    sources["16-bit PNG file"] = sixteen_bit_png(tmp_path, np.full((6, 7), 300))
    for kind, source in sources.items():
        out = np.asarray(load_image(source))
        assert out.max() <= 2, kind  # not stretched to white


def test_16_bit_gradient_keeps_its_order_and_scale(tmp_path):
    gradient = np.linspace(0, 65535, 7 * 6).round().astype(np.uint16).reshape(6, 7)
    expected = np.rint(gradient / 65535 * 255).astype(np.uint8)
    sources = sixteen_bit_sources(gradient)
    sources["16-bit PNG file"] = sixteen_bit_png(tmp_path, gradient)
    for kind, source in sources.items():
        out = np.asarray(load_image(source))[..., 0]
        assert np.array_equal(out, expected), kind
        flat = out.ravel()
        assert (np.diff(flat.astype(int)) >= 0).all() and flat[0] == 0 and flat[-1] == 255, kind
    narrow = np.full((6, 7), 1000, np.uint16)
    narrow[0, 0] = 1001  # a min-max stretch would turn this into black and white
    out = np.asarray(load_image(Image.fromarray(narrow)))
    assert out.max() <= 5


def test_pil_images_of_other_modes_still_become_rgb():
    base = Image.new("RGB", (5, 4), (200, 100, 50))
    images = [base.convert(mode) for mode in ("L", "LA", "P", "RGBA", "CMYK", "1", "YCbCr")]
    images += [base.convert("L").convert(mode) for mode in ("F", "I", "I;16")] + [Image.new("HSV", (5, 4))]
    for img in images:
        out = load_image(img)
        assert out.mode == "RGB" and out.size == (5, 4), img.mode
    assert load_image(base.convert("L").convert("F")).getpixel((0, 0))[0] == base.convert("L").getpixel((0, 0))
