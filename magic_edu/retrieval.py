"""CLIP retrieval: the paper's CLIPRe baseline, and the image index of its story setup.

    >>> index = build_text_index(models.clip, captions, "captions.safetensors")   # magic-edu index-text
    >>> clip_retrieval(models.clip, image, index).text        # the pool's caption CLIP scores highest
    >>> images = build_image_index(models.clip, "photos/", "images.safetensors")   # magic-edu index-images
    >>> retrieve_image(models.clip, "a day at the beach", images).best   # the path of the best image

**CLIPRe** (Su et al. 2022, Sec. 5.1; the authors' ``image_captioning/clip/clipretrieval.py``)
captions an image with the caption of a pool (the training captions of the corpus) whose CLIP
text embedding is closest to the image's: no language model, no decoding. **Stories** (Sec. 4.2;
``story_generation/image_index/``): the image that steers a story is the one of an image index
whose CLIP embedding is closest to the story's title.

**An index** is one safetensors file: the L2-normalised CLIP embeddings of its n entries as float16
(``embeddings``, n x d), the entries' texts (image paths, relative to the folder indexed, for an
image index) as UTF-8 bytes (``entry_bytes``) with their offsets (``entry_offsets``), and the
CLIP it was built with: its name (metadata) and its embeddings of a fixed probe text and a fixed
probe image (``probe_text``, ``probe_image``, float32). Searching with another CLIP (other
dimensions, or other embeddings of the probes) is an error, not a silent mismatch.

**Bounded memory.** Building streams the embeddings to disk batch by batch; searching reads them
in chunks of ``chunk_size`` rows (65,536 by default: 64 MiB of float16 at d = 512) and keeps only
the best ``top_n`` so far per query, and an entry's text is read only when it is among the
results. Scores are cosines between the float32 query and the float16-stored entries (float16
keeps about 3 significant digits), summed in float64 and rounded to float32, so a score does not
depend on the chunking; ties go to the entry stored first.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MagicEduError
from .inputs import ImageLike, load_image, read_texts
from .models import ImageTextMatcher

INDEX_FORMAT = "magic_edu.clip_index"
INDEX_VERSION = "1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHUNK_SIZE = 65_536  # rows of the index searched at once
PROBE_TEXT = "a photo of a dog playing with a red ball on the grass."
PROBE_AGREEMENT = 0.99  # the least cosine between the probes' embeddings then and now for "the same CLIP"


# -- what a search finds ---------------------------------------------------------------------
@dataclass(frozen=True)
class Retrieved:
    """The ``top_n`` best entries of an index for one query, best first: the entries (a caption, or
    an image's path), their cosines with the query and their row numbers in the index."""

    entries: list[str]
    scores: list[float]
    rows: list[int]

    @property
    def best(self) -> str:
        """The best entry: the caption (text index) or the image path (image index)."""
        return self.entries[0]

    @property
    def text(self) -> str:
        """The best entry (for a text index: CLIPRe's caption)."""
        return self.entries[0]

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(zip(self.entries, self.scores))


# -- the probes: which CLIP ------------------------------------------------------------------
def probe_image() -> Any:
    """A fixed 64 x 64 test image (colour gradients, a dark square): one of the two probes."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    pixels[20:40, 24:44] = (30, 30, 90)
    return Image.fromarray(pixels)


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embed_texts(clip: ImageTextMatcher, texts: Sequence[str]) -> torch.Tensor:
    """``clip``'s L2-normalised embeddings of ``texts``, (n, d), without reusing prefixes remembered from
    earlier calls (:attr:`ImageTextMatcher.remember_prefixes`): the same texts in the same batches
    give the same bits, whatever ran before."""
    return clip.embed_text_groups([list(texts)], remember=False)[0]


def clip_probes(clip: ImageTextMatcher) -> tuple[torch.Tensor, torch.Tensor]:
    """``clip``'s float32 embeddings of the probe text and the probe image, (d,) each (remembered per
    model object)."""
    if clip not in _PROBES:
        text = embed_texts(clip, [PROBE_TEXT])[0].float().cpu()
        image = clip.embed_image(probe_image()).float().cpu()
        _PROBES[clip] = (text, image)
    return _PROBES[clip]


# -- the index --------------------------------------------------------------------------------
@dataclass
class ClipIndex:
    """n entries (texts, or image paths) and their CLIP embeddings (float16, L2-normalised), in a
    safetensors file (``path``, read lazily) or in memory (``save`` writes it).

    ``kind``: ``"text"`` or ``"image"``; ``clip_name``: the CLIP it was built with; ``root``: the
    folder an image index's relative paths start from. ``skipped``: (path, reason) of the images
    a build could not read (not stored in the file).
    """

    kind: str
    count: int
    dim: int
    clip_name: str
    probe_text: torch.Tensor
    probe_image: torch.Tensor
    path: Path | None = None
    root: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _embeddings: torch.Tensor | None = field(default=None, repr=False)  # in memory: (n, d) float16
    _entries: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.count

    def embeddings(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start`` .. ``stop`` - 1 of the embeddings, float16 (read from disk if stored)."""
        stop = self.count if stop is None else min(stop, self.count)
        if self._embeddings is not None:
            return self._embeddings[start:stop]
        return self._open().get_slice("embeddings")[start:stop]

    def entry(self, row: int) -> str:
        """Entry ``row``: its text, or for an image index the image's full path (root / relative path)."""
        return self.entries([row])[0]

    def entries(self, rows: Sequence[int] | None = None, *, stored: bool = False) -> list[str]:
        """The entries of ``rows`` (all if None), as :meth:`entry` gives them (``stored``: as stored,
        an image index's paths relative to ``root``)."""
        rows = range(self.count) if rows is None else rows
        if self._entries is not None:
            texts = [self._entries[int(r)] for r in rows]
        else:
            f = self._open()
            offsets, data = f.get_slice("entry_offsets"), f.get_slice("entry_bytes")
            texts = []
            for r in rows:
                a, b = (int(v) for v in offsets[int(r):int(r) + 2])
                texts.append(bytes(data[a:b].numpy()).decode("utf-8"))
        if self.kind == "image" and self.root is not None and not stored:
            return [str(Path(self.root) / s) for s in texts]
        return texts

    def _open(self) -> Any:
        from safetensors import safe_open

        return safe_open(str(self.path), framework="pt")

    def save(self, path: str | os.PathLike) -> ClipIndex:
        """Write this index to ``path`` (atomically) and return it as loaded from there."""
        with _IndexWriter(Path(path), self.dim) as writer:
            for start in range(0, self.count, CHUNK_SIZE):
                writer.add(self.embeddings(start, start + CHUNK_SIZE))
            writer.finish(self.kind, self.entries(stored=True), self.clip_name, self.probe_text, self.probe_image,
                          self.root)
        return load_index(path)

    def check_clip(self, clip: ImageTextMatcher, name: str = "index") -> None:
        """Refuse to search with a CLIP other than the one the index was built with: other embedding
        dimensions, or other embeddings of the probe text or image."""
        text, image = clip_probes(clip)
        built = f"built with CLIP {self.clip_name!r} ({self.dim}-dimensional embeddings)"
        fix = ("search it with that CLIP, or build the index again with this one "
               f"(magic-edu {'index-text' if self.kind == 'text' else 'index-images'})")
        if text.numel() != self.dim:
            raise MagicEduError(f"{name}: {built}, but this CLIP ({clip.name!r}) makes {text.numel()}-dimensional "
                                f"ones; {fix}")
        agree = min(float(text @ self.probe_text.float()), float(image @ self.probe_image.float()))
        if agree < PROBE_AGREEMENT:
            raise MagicEduError(f"{name}: {built}, and this CLIP ({clip.name!r}) embeds the probe text and image "
                                f"otherwise (cosine {agree:.3f} with the index's, at least {PROBE_AGREEMENT} for the "
                                f"same model): it is another CLIP; {fix}")


class _IndexWriter:
    """Stream an index to disk: embeddings appended batch by batch to a temporary file, then the
    safetensors file (header, offsets, probes, embeddings copied over, entry bytes) written next to
    the target and renamed into place."""

    def __init__(self, path: Path, dim: int | None = None) -> None:
        self.path, self.dim, self.count = path, dim, 0
        if path.is_dir():
            raise MagicEduError(f"out {path} is a folder; give a file name such as {path / 'index.safetensors'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, raw = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".embeddings.tmp")
        except OSError as err:
            raise MagicEduError(f"out {path}: cannot write next to it ({err})") from None
        self.raw_path = Path(raw)
        self.raw = os.fdopen(fd, "wb")

    def __enter__(self) -> _IndexWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.raw.close()
        self.raw_path.unlink(missing_ok=True)

    def add(self, embeddings: torch.Tensor) -> None:
        """Append (b, d) embeddings (stored as float16)."""
        e = embeddings.detach().to("cpu", torch.float16).contiguous()
        if self.dim is None:
            self.dim = int(e.shape[1])
        self.raw.write(e.numpy().tobytes())
        self.count += int(e.shape[0])

    def finish(self, kind: str, entries: Sequence[str], clip_name: str, probe_text: torch.Tensor,
               probe_image: torch.Tensor, root: str | None) -> None:
        self.raw.close()
        if len(entries) != self.count or self.count == 0:
            raise MagicEduError(f"index: {len(entries)} entries for {self.count} embeddings")
        encoded = [e.encode("utf-8") for e in entries]
        offsets = np.zeros(len(encoded) + 1, dtype="<i8")
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        probes = [np.asarray(p.float().cpu().numpy(), dtype="<f4") for p in (probe_text, probe_image)]
        d, n = int(self.dim), self.count
        layout = [("entry_offsets", "I64", [n + 1], offsets.nbytes), ("probe_text", "F32", [d], probes[0].nbytes),
                  ("probe_image", "F32", [d], probes[1].nbytes), ("embeddings", "F16", [n, d], n * d * 2),
                  ("entry_bytes", "U8", [int(offsets[-1])], int(offsets[-1]))]
        header: dict[str, Any] = {"__metadata__": {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": kind, "clip": clip_name,
            "count": str(n), "dim": str(d), "root": root or ""}}
        at = 0
        for name, dtype, shape, size in layout:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
            at += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(struct.pack("<Q", len(text)))
                f.write(text)
                f.write(offsets.tobytes())
                f.write(probes[0].tobytes())
                f.write(probes[1].tobytes())
                with open(self.raw_path, "rb") as raw:
                    shutil.copyfileobj(raw, f, 16 << 20)
                for b in encoded:
                    f.write(b)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_index(path: str | os.PathLike) -> ClipIndex:
    """An index file written by :func:`build_text_index` / :func:`build_image_index` (read lazily:
    only its header and probes now)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MagicEduError(f"index {path}: no such file")
    try:
        f = safe_open(str(path), framework="pt")
        meta = f.metadata() or {}
        keys = set(f.keys())
    except Exception as err:  # noqa: BLE001 - any failure to parse means: not an index file
        raise MagicEduError(f"index {path}: not a readable safetensors file ({err})") from None
    needed = {"embeddings", "entry_offsets", "entry_bytes", "probe_text", "probe_image"}
    if meta.get("format") != INDEX_FORMAT or not needed <= keys:
        raise MagicEduError(f"index {path}: not a magic_edu CLIP index (build one with magic-edu index-text or "
                            "index-images)")
    if meta.get("version") != INDEX_VERSION:
        raise MagicEduError(f"index {path}: version {meta.get('version')!r}; this magic_edu reads version "
                            f"{INDEX_VERSION}: build it again")
    shape = f.get_slice("embeddings").get_shape()
    n, d = int(shape[0]), int(shape[1])
    if (f.get_slice("entry_offsets").get_shape() != [n + 1] or str(n) != meta.get("count")
            or str(d) != meta.get("dim") or meta.get("kind") not in ("text", "image")):
        raise MagicEduError(f"index {path}: its parts do not agree (a damaged file?); build it again")
    return ClipIndex(kind=meta["kind"], count=n, dim=d, clip_name=meta.get("clip", "?"),
                     probe_text=f.get_tensor("probe_text"), probe_image=f.get_tensor("probe_image"), path=path,
                     root=meta.get("root") or None)


def as_index(index: ClipIndex | str | os.PathLike, kind: str, name: str = "index") -> ClipIndex:
    """``index`` (a :class:`ClipIndex` or the path of one) checked to hold ``kind`` entries."""
    if isinstance(index, (str, os.PathLike)):
        index = load_index(index)
    if not isinstance(index, ClipIndex):
        raise MagicEduError(f"{name} must be a ClipIndex or the path of an index file; got {type(index).__name__}")
    if index.kind != kind:
        what = {"text": "texts (build_text_index, magic-edu index-text)",
                "image": "images (build_image_index, magic-edu index-images)"}
        raise MagicEduError(f"{name}: needs an index of {what[kind]}; this one holds {index.kind}s")
    return index


# -- building ---------------------------------------------------------------------------------
def _progress(total: int, desc: str, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="entry", file=sys.stderr, disable=not show, mininterval=1.0)


def build_text_index(clip: ImageTextMatcher, captions: Sequence[str] | str | os.PathLike,
                     path: str | os.PathLike | None = None, *, batch_size: int = 256,
                     progress: bool = True) -> ClipIndex:
    """The CLIP text embeddings of a caption pool, in batches of ``batch_size``, with a progress bar.

    ``captions``: a list of texts, or a file (``.txt``: one a line; ``.json``: the paper's caption
    format); whitespace is collapsed and empty texts are an error. With ``path`` the index is
    written there (streamed: memory does not grow with the pool) and returned as loaded from it;
    without, it stays in memory (``.save(path)`` writes it).
    """
    texts = _caption_pool(captions)
    batch_size = _check_batch(batch_size)
    text_probe, image_probe = clip_probes(clip)
    if path is None:
        parts = []
        with _progress(len(texts), "index texts", progress) as bar:
            for start in range(0, len(texts), batch_size):
                parts.append(embed_texts(clip, texts[start:start + batch_size]).to("cpu", torch.float16))
                bar.update(len(parts[-1]))
        emb = torch.cat(parts)
        return ClipIndex("text", len(texts), int(emb.shape[1]), clip.name, text_probe, image_probe,
                         _embeddings=emb, _entries=texts)
    with _IndexWriter(Path(path)) as writer, _progress(len(texts), "index texts", progress) as bar:
        for start in range(0, len(texts), batch_size):
            writer.add(embed_texts(clip, texts[start:start + batch_size]))
            bar.update(min(batch_size, len(texts) - start))
        writer.finish("text", texts, clip.name, text_probe, image_probe, None)
    return load_index(path)


def _caption_pool(captions: Any) -> list[str]:
    if isinstance(captions, (str, os.PathLike)):
        return read_texts(captions, "captions")
    if not isinstance(captions, (list, tuple)):
        raise MagicEduError(f"captions must be a list of texts or a file of them; got {type(captions).__name__}")
    if not captions:
        raise MagicEduError("captions: the caption pool is empty; give at least one caption")
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise MagicEduError(f"captions: caption {i} must be a non-empty string; got {c!r}")
    return [" ".join(c.split()) for c in captions]


def _check_batch(batch_size: Any) -> int:
    from .inputs import check_int

    return check_int(batch_size, "batch_size", 1)


def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files under ``folder`` (by suffix, hidden ones left out), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise MagicEduError(f"folder {root}: no such folder")
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def build_image_index(clip: ImageTextMatcher, folder: str | os.PathLike, path: str | os.PathLike | None = None, *,
                      batch_size: int = 64, recursive: bool = True, progress: bool = True) -> ClipIndex:
    """The CLIP image embeddings of every image under ``folder`` (the paper's image index for story
    generation), in batches, with a progress bar. Entries are the images' paths relative to
    ``folder`` (``root``). Images that cannot be read are skipped (``index.skipped`` says why);
    none readable is an error. ``path``: as :func:`build_text_index`."""
    files = image_files(folder, recursive)
    if not files:
        raise MagicEduError(f"folder {folder}: no image files in it (image files end in "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    batch_size = _check_batch(batch_size)
    root = str(Path(folder).resolve())
    text_probe, image_probe = clip_probes(clip)
    entries: list[str] = []
    skipped: list[tuple[str, str]] = []
    parts: list[torch.Tensor] = []  # in memory (no path)
    with (_IndexWriter(Path(path)) if path is not None else nullcontext()) as writer, \
            _progress(len(files), "index images", progress) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            images, names = [], []
            for p in batch:
                try:
                    images.append(load_image(p, name="image"))
                except (MagicEduError, OSError) as err:
                    skipped.append((str(p), str(err)))
                    continue
                names.append(p.relative_to(folder).as_posix())
            if images:
                emb = clip.embed_image(images).reshape(len(images), -1)
                if writer is not None:
                    writer.add(emb)
                else:
                    parts.append(emb.to("cpu", torch.float16))
                entries += names
            bar.update(len(batch))
        if not entries:
            raise MagicEduError(f"folder {folder}: none of its {len(files)} image files could be read "
                                f"(first: {skipped[0][0]}: {skipped[0][1]})")
        if writer is None:
            emb = torch.cat(parts)
            return ClipIndex("image", len(entries), int(emb.shape[1]), clip.name, text_probe, image_probe,
                             root=root, skipped=skipped, _embeddings=emb, _entries=entries)
        writer.finish("image", entries, clip.name, text_probe, image_probe, root)
    index = load_index(path)
    index.skipped = skipped
    return index


# -- searching --------------------------------------------------------------------------------
def search(index: ClipIndex, queries: torch.Tensor, top_n: int = 1, chunk_size: int = CHUNK_SIZE
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_n`` rows of ``index`` with the highest cosine to each query: (scores, rows), both
    (q, top_n), best first, ties to the lower row. ``queries``: (q, d) L2-normalised embeddings.
    Reads ``chunk_size`` rows at a time and keeps only the best ``top_n`` so far per query."""
    from .inputs import check_int

    top_n = check_int(top_n, "top_n", 1)
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    q = queries.detach().float().cpu().double()
    if q.dim() != 2 or q.shape[1] != index.dim:
        raise MagicEduError(f"queries: expected (q, {index.dim}) embeddings; got {tuple(q.shape)}")
    best_scores = torch.empty(q.shape[0], 0)
    best_rows = torch.empty(q.shape[0], 0, dtype=torch.long)
    for start in range(0, index.count, chunk_size):
        # float64 products of a float32 query and float16 entries, rounded to float32: a score does not
        # depend on the chunk it was computed in (float32 sums would round differently per chunk size)
        chunk = index.embeddings(start, start + chunk_size).double()
        scores = torch.cat([best_scores, (q @ chunk.T).float()], dim=1)
        rows = torch.cat([best_rows, torch.arange(start, start + chunk.shape[0]).expand(q.shape[0], -1)], dim=1)
        # the best so far (lower rows) come first and a stable sort keeps that order among equals
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_n]
        best_scores, best_rows = scores.gather(1, order), rows.gather(1, order)
    return best_scores, best_rows


def _results(index: ClipIndex, scores: torch.Tensor, rows: torch.Tensor) -> list[Retrieved]:
    return [Retrieved(index.entries(r.tolist()), s.tolist(), r.tolist()) for s, r in zip(scores, rows)]


def clip_retrieval(clip: ImageTextMatcher, image: ImageLike | Sequence[ImageLike],
                   index: ClipIndex | str | os.PathLike, top_n: int = 1, *, chunk_size: int = CHUNK_SIZE
                   ) -> Retrieved | list[Retrieved]:
    """CLIPRe: the caption of ``index`` (a text index) whose CLIP embedding is closest to the image's
    (``.text``), and the ``top_n`` best with their cosines. A list of images gives one each."""
    index = as_index(index, "text")
    index.check_clip(clip)
    single = not isinstance(image, (list, tuple))
    images = [image] if single else list(image)
    if not images:
        raise MagicEduError("image: the list of images is empty")
    found = _results(index, *search(index, clip.embed_image(images).reshape(len(images), -1), top_n, chunk_size))
    return found[0] if single else found


def retrieve_image(clip: ImageTextMatcher, title: str | Sequence[str], index: ClipIndex | str | os.PathLike,
                   top_n: int = 1, *, chunk_size: int = CHUNK_SIZE) -> Retrieved | list[Retrieved]:
    """The image of ``index`` (an image index) whose CLIP embedding is closest to the text ``title``
    (``.best``: its path), and the ``top_n`` best with their cosines: the paper's way of finding
    the image for a story's title. A list of titles gives one each."""
    index = as_index(index, "image")
    index.check_clip(clip)
    single = isinstance(title, str)
    titles = [title] if single else list(title)
    if not titles or not all(isinstance(t, str) and t.strip() for t in titles):
        raise MagicEduError(f"title must be a non-empty string (or a list of them); got {title!r}")
    found = _results(index, *search(index, embed_texts(clip, titles), top_n, chunk_size))
    return found[0] if single else found
