"""Scoring captions the way the papers do.

* :func:`load_results`: the result files of the MAGIC release (Su et al. 2022), a JSON list
  of ``{"image_name", "captions": [references...], "prediction"}``.
* :func:`caption_metrics`: the COCO caption metrics through pycocoevalcap (PTB tokenizer,
  corpus-level BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, optionally SPICE), x 100 as in the paper.
* :func:`repetition_and_diversity`: SimCTG's rep-n and diversity (Su et al. 2022, "A Contrastive
  Framework for Neural Text Generation").
* :func:`clip_score`, :func:`ref_clip_score`: CLIP-S and RefCLIP-S (Hessel et al. 2021).
* :func:`evaluate`: all of them as one pandas table.

Scales are the ones each paper reports: COCO metrics 0-100, rep-n 0-100, diversity 0-1,
CLIP-S 0-2.5 and RefCLIP-S (its harmonic mean with a plain cosine) as in Hessel et al.

The paper's MSCOCO row comes from the authors' released file
``image_captioning/inference_result/mscoco/magic_result.json`` (github.com/yxuansu/MAGIC):
``magic-edu evaluate magic_result.json --spice`` should give BLEU-1 56.8, BLEU-4 12.9,
METEOR 17.4, ROUGE-L 39.9, CIDEr 49.3 and SPICE 11.3 (SPICE needs its Stanford models).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any, Union

import numpy as np
import pandas as pd

from ..errors import MagicEduError

ResultsLike = Union[str, os.PathLike, Sequence[Mapping[str, Any]]]  # noqa: UP007 (a runtime alias on 3.10)

CLIP_PREFIX = "A photo depicts "  # Hessel et al. 2021, section 3
CLIP_W = 2.5  # their rescaling constant w
COCO_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
INSTALL_HINT = "pip install 'magic_edu[eval]'  (or: pip install pycocoevalcap)"
JAVA_HINT = "install a Java runtime, e.g. apt-get install default-jre-headless"


# -- the result files ----------------------------------------------------------------------
def load_results(path_or_list: ResultsLike, require_references: bool = True) -> list[dict[str, Any]]:
    """Read and check a result file (or an already-loaded list).

    Returns one ``{"image_name": str, "captions": list[str], "prediction": str}`` per entry;
    other keys (``"split"``, ...) are dropped. Anything malformed raises MagicEduError naming
    the entry index and the key. With ``require_references=False`` an empty ``"captions"``
    list is allowed (output of ``magic-edu caption`` without ``--references``).
    """
    source = "results"
    if isinstance(path_or_list, (str, os.PathLike)):
        path = Path(path_or_list)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise MagicEduError(f"cannot read the result file {path}: {err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise MagicEduError(f"{path} is not JSON ({err}); expected a list of "
                                '{"image_name", "captions", "prediction"} objects') from None
        except RecursionError:
            raise MagicEduError(f"{path} nests its JSON too deeply to be read; expected a flat list of "
                                '{"image_name", "captions", "prediction"} objects') from None
    else:
        data = path_or_list
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
        raise MagicEduError(f"{source} must be a JSON list of {{\"image_name\", \"captions\", \"prediction\"}} "
                            f"objects; got {type(data).__name__}")
    if len(data) == 0:
        raise MagicEduError(f"{source} holds no entries")
    return [_check_entry(i, entry, require_references) for i, entry in enumerate(data)]


def _check_entry(i: int, entry: Any, require_references: bool) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise MagicEduError(f"entry {i} must be an object with keys image_name, captions, prediction; "
                            f"got {type(entry).__name__}")
    for key in ("image_name", "captions", "prediction"):
        if key not in entry:
            raise MagicEduError(f"entry {i}: key {key!r} is missing")
    name, refs, pred = entry["image_name"], entry["captions"], entry["prediction"]
    if not isinstance(name, str) or not name.strip():
        raise MagicEduError(f"entry {i}: 'image_name' must be a non-empty string; got {name!r}")
    if not isinstance(pred, str):
        raise MagicEduError(f"entry {i}: 'prediction' must be a string; got {type(pred).__name__}")
    if not pred.strip():
        raise MagicEduError(f"entry {i}: 'prediction' is empty")
    if not isinstance(refs, list):
        raise MagicEduError(f"entry {i}: 'captions' must be a list of reference strings; got {type(refs).__name__}")
    if require_references and not refs:
        raise MagicEduError(f"entry {i}: 'captions' (the reference captions) is empty")
    for j, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            raise MagicEduError(f"entry {i}: 'captions'[{j}] must be a non-empty string; got {ref!r}")
    return {"image_name": name, "captions": list(refs), "prediction": pred}


# -- COCO caption metrics ------------------------------------------------------------------
def caption_metrics(results: ResultsLike, spice: bool = False) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) x 100, computed by pycocoevalcap.

    As coco-caption does: captions are lower-cased and tokenized by Stanford's PTBTokenizer,
    punctuation dropped; BLEU is corpus-level (clipped n-gram counts and the brevity penalty
    over the whole corpus, closest reference length); METEOR 1.5 is corpus-level from summed
    statistics; ROUGE-L (beta 1.2) and CIDEr-D (idf over the reference sets, sigma 6, x 10)
    are means over images. CIDEr's idf needs several images: with one image it is 0.
    SPICE runs only with ``spice=True`` and its Stanford CoreNLP models present; otherwise
    it is left out with a warning. Needs Java on PATH.
    """
    return compare_caption_metrics({"": results}, spice)[""]


def compare_caption_metrics(systems: Mapping[str, ResultsLike], spice: bool = False) -> dict[str, dict[str, float]]:
    """:func:`caption_metrics` of several result sets (e.g. one per decoder), by name: the same
    figures as one call each, with one run of the PTB tokenizer over all captions and one METEOR
    process for all sets (each a Java start; METEOR's takes about 10 s)."""
    if not isinstance(systems, Mapping) or not systems:
        raise MagicEduError(f"systems must be a non-empty mapping of name -> results; got {systems!r:.80}")
    scores, notes = _caption_metrics({name: load_results(results) for name, results in systems.items()}, spice)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return scores


def _caption_metrics(systems: dict[str, list[dict[str, Any]]], spice: bool
                     ) -> tuple[dict[str, dict[str, float]], list[str]]:
    coco = _import_pycocoevalcap()
    if shutil.which("java") is None:
        raise MagicEduError(f"pycocoevalcap's PTB tokenizer and METEOR run on Java, and no `java` is on PATH; "
                            f"{JAVA_HINT}")
    # every caption of every set tokenized in one run, keyed (set, image index)
    gts = {(name, i): [{"caption": _one_line(r)} for r in e["captions"]]
           for name, entries in systems.items() for i, e in enumerate(entries)}
    res = {(name, i): [{"caption": _one_line(e["prediction"])}]
           for name, entries in systems.items() for i, e in enumerate(entries)}
    try:
        tokenizer = coco.PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    except OSError as err:  # it writes a temporary file next to its jar
        raise MagicEduError(f"pycocoevalcap's PTB tokenizer failed: {err}") from err
    pairs = {}
    for name, entries in systems.items():
        g = {i: gts.get((name, i), []) for i in range(len(entries))}
        r = {i: res[(name, i)] for i in range(len(entries)) if (name, i) in res}
        if [len(g[i]) for i in range(len(entries))] != [len(e["captions"]) for e in entries] or \
                len(r) != len(entries):
            raise MagicEduError("pycocoevalcap's PTB tokenizer lost lines; check the captions for odd characters")
        pairs[name] = (g, r)

    meteor = _meteor(coco, pairs)
    out, notes = {}, []
    for name, (g, r) in pairs.items():
        bleu, _ = coco.Bleu(4).compute_score(g, r, verbose=0)
        scores = {f"BLEU-{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
        scores["METEOR"] = 100.0 * meteor[name]
        scores["ROUGE-L"] = 100.0 * float(coco.Rouge().compute_score(g, r)[0])
        scores["CIDEr"] = 100.0 * float(coco.Cider().compute_score(g, r)[0])
        where = f"{name}: " if name else ""
        if len(g) == 1:
            notes.append(f"{where}CIDEr is 0 by construction for a single image (its idf needs several images)")
        if spice:
            value, note = _spice(coco, g, r)
            if value is not None:
                scores["SPICE"] = 100.0 * value
            if note and note not in notes:
                notes.append(note)
        out[name] = scores
    return out, notes


def _import_pycocoevalcap() -> Any:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise MagicEduError(f"the COCO caption metrics need pycocoevalcap, which is not installed: "
                            f"{INSTALL_HINT}") from err
    import pycocoevalcap

    return SimpleNamespace(Bleu=Bleu, Cider=Cider, Meteor=Meteor, Rouge=Rouge, PTBTokenizer=PTBTokenizer,
                           root=Path(next(iter(pycocoevalcap.__path__))))


def _one_line(text: str) -> str:
    """Whitespace (incl. Unicode line separators) collapsed to single spaces: the PTB tokenizer
    and METEOR exchange one caption per line, so a stray separator would shift every later
    caption. '|||' is METEOR's field separator."""
    return " ".join(text.replace("|||", " ").split())


def _meteor(coco: Any, pairs: dict[str, tuple[dict, dict]]) -> dict[str, float]:
    """METEOR of every (references, captions) pair of sets, by name, from one Java process."""
    meteor = coco.Meteor()  # starts `java -jar meteor-1.5.jar` (about 10 s to load its tables)
    try:
        return {name: float(meteor.compute_score(gts, res)[0]) for name, (gts, res) in pairs.items()}
    except ValueError as err:  # the jar died: readline() returned ''
        proc = meteor.meteor_p
        proc.kill()
        detail = proc.stderr.read().decode(errors="replace").strip()[-2000:]
        raise MagicEduError(f"METEOR's Java process failed ({err}): {detail}") from None
    finally:
        with meteor.lock:  # stop the JVM now instead of whenever the object is collected
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()


def spice_models_present() -> bool:
    """Whether pycocoevalcap's SPICE has its Stanford CoreNLP 3.6.0 jars (else it would download them)."""
    try:
        coco = _import_pycocoevalcap()
    except MagicEduError:
        return False
    lib = coco.root / "spice" / "lib"
    return all((lib / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models"))


def _spice(coco: Any, gts: dict, res: dict) -> tuple[float | None, str | None]:
    if not spice_models_present():
        return None, (
            "SPICE skipped: its Stanford CoreNLP models are not installed (a download of several hundred "
            "MB). To add them run once: python -c 'from pycocoevalcap.spice.get_stanford_models "
            "import get_stanford_models; get_stanford_models()'"
        )
    from pycocoevalcap.spice.spice import Spice

    try:
        with _java_opens():
            value = float(Spice().compute_score(gts, res)[0])
    except (subprocess.CalledProcessError, OSError, ValueError) as err:
        return None, f"SPICE skipped: its Java run failed ({err}); SPICE 1.0 is known to work with Java 8 and 11"
    return value, None


@contextmanager
def _java_opens() -> Iterator[None]:
    """SPICE's serializer reflects into java.base, which Java 17+ forbids unless opened.
    JDK_JAVA_OPTIONS is read by the `java` launcher of Java 9+ and ignored by Java 8."""
    opens = " ".join(f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in
                     ("java.lang", "java.util", "java.math", "java.io", "java.net", "java.text",
                      "java.util.concurrent"))
    old = os.environ.get("JDK_JAVA_OPTIONS")
    os.environ["JDK_JAVA_OPTIONS"] = f"{old} {opens}" if old else opens
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JDK_JAVA_OPTIONS", None)
        else:
            os.environ["JDK_JAVA_OPTIONS"] = old


# -- SimCTG repetition and diversity ---------------------------------------------------------
def repetition_and_diversity(texts: Sequence[str], simctg_script: bool = False) -> dict[str, float]:
    """rep-2, rep-3, rep-4 (0-100) and diversity (0-1) of a set of generations.

    Su et al. 2022 (SimCTG, section 5): ``rep-n = 100 x (1 - |unique n-grams| / |total n-grams|)``
    and ``diversity = prod_{n=2..4} (1 - rep-n / 100)``. Words are whitespace-separated;
    as in their evaluation script the counts are summed over the texts (n-grams are unique
    within each text) before the ratio. ``simctg_script=True`` reproduces that script exactly,
    which by an off-by-one never counts the last n-gram of a text, for comparison with
    published numbers. rep-n is NaN when no text has n words.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise MagicEduError("texts must be a list of strings")
    scores: dict[str, float] = {}
    diversity = 1.0
    for n in (2, 3, 4):
        unique = total = 0
        for text in texts:
            words = text.split()
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            if simctg_script:
                grams = grams[:-1]
            unique += len(set(grams))
            total += len(grams)
        rep = 100.0 * (1.0 - unique / total) if total else math.nan
        scores[f"rep-{n}"] = rep
        diversity *= 1.0 - rep / 100.0
    scores["diversity"] = diversity
    return scores


# -- CLIPScore -----------------------------------------------------------------------------
def clip_score(clip: Any, images: Sequence[Any], captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Per-image CLIP-S = 2.5 x max(cos(E_image, E_text("A photo depicts " + caption)), 0).

    Hessel et al. 2021, eq. 1. ``clip`` is an ImageTextMatcher (``embed_image``, ``embed_texts``);
    ``images`` are PIL images or file paths. Average the result for the corpus score.
    """
    return _clip_scores(clip, images, captions, None, batch_size)[0]


def ref_clip_score(
    clip: Any, images: Sequence[Any], captions: Sequence[str], references: Sequence[Sequence[str]],
    batch_size: int = 32,
) -> np.ndarray:
    """Per-image RefCLIP-S = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0)).

    Hessel et al. 2021, eq. 2: the harmonic mean of CLIP-S and the best plain cosine between
    the candidate and a reference (both texts encoded with the "A photo depicts " prefix,
    as their released code does). 0 where both parts are 0.
    """
    return _clip_scores(clip, images, captions, references, batch_size)[1]


def _clip_scores(
    clip: Any, images: Sequence[Any], captions: Sequence[str],
    references: Sequence[Sequence[str]] | None, batch_size: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(captions, str) or len(images) != len(captions):
        raise MagicEduError(f"need one caption per image; got {len(images)} images and "
                            f"{1 if isinstance(captions, str) else len(captions)} captions")
    image_emb = _rows(clip.embed_image, list(images), batch_size)
    caption_emb = _rows(clip.embed_texts, [CLIP_PREFIX + c for c in captions], batch_size)
    clip_s = CLIP_W * np.clip(np.sum(image_emb * caption_emb, axis=1), 0.0, None)
    if references is None:
        return clip_s, None
    if len(references) != len(captions):
        raise MagicEduError(f"need one list of references per caption; got {len(references)} for {len(captions)}")
    flat, owner = [], []
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise MagicEduError(f"references[{i}] must be a non-empty list of strings")
        flat += [CLIP_PREFIX + r for r in refs]
        owner += [i] * len(refs)
    ref_cos = np.sum(_rows(clip.embed_texts, flat, batch_size) * caption_emb[owner], axis=1)
    best = np.full(len(captions), -np.inf)
    np.maximum.at(best, np.asarray(owner), ref_cos)
    best = np.clip(best, 0.0, None)
    denom = clip_s + best
    ref_s = np.divide(2.0 * clip_s * best, denom, out=np.zeros_like(denom), where=denom > 0)
    return clip_s, ref_s


def _rows(embed: Any, items: list, batch_size: int) -> np.ndarray:
    """Embed ``items`` in batches: (n, d) float64 rows, re-normalised to unit length."""
    chunks = []
    for start in range(0, len(items), batch_size):
        out = embed(items[start:start + batch_size])
        if hasattr(out, "detach"):
            out = out.detach().float().cpu().numpy()
        chunks.append(np.atleast_2d(np.asarray(out, dtype=np.float64)))
    rows = np.concatenate(chunks, axis=0)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# -- everything in one table ---------------------------------------------------------------
def evaluate(
    results: ResultsLike, clip: Any = None, images_dir: str | os.PathLike | None = None,
    spice: bool = False, name: str | None = None,
) -> pd.DataFrame:
    """One row of scores for a result file: COCO metrics (when it has references),
    rep-2/3/4 and diversity of the predictions, CLIP-S (and RefCLIP-S with references)
    when ``clip`` and ``images_dir`` (holding the ``image_name`` files) are given. Image
    names must stay inside ``images_dir``: an absolute name or one with ``..`` is refused.

    Skipped metrics are explained in ``table.attrs["notes"]`` and as warnings.
    ``pd.concat([evaluate(a), evaluate(b)])`` compares runs.
    """
    entries = load_results(results, require_references=False)
    if name is None:
        name = Path(results).stem if isinstance(results, (str, os.PathLike)) else "results"
    predictions = [e["prediction"] for e in entries]
    has_refs = [bool(e["captions"]) for e in entries]
    if any(has_refs) and not all(has_refs):
        i = has_refs.index(False)
        raise MagicEduError(f"entry {i}: 'captions' is empty while other entries have references")

    if (clip is None) != (images_dir is None):
        raise MagicEduError("CLIPScore needs both clip= (an ImageTextMatcher) and images_dir=")
    paths: list[Path] = []
    if clip is not None:  # checked before the (slow) metrics, so a bad name fails at once
        paths = [_image_path(images_dir, i, e["image_name"]) for i, e in enumerate(entries)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MagicEduError(f"{len(missing)} images named in the results are not in {images_dir}, "
                                f"e.g. {missing[0]}")

    row: dict[str, float] = {}
    notes: list[str] = []
    if all(has_refs):
        scores, notes = _caption_metrics({"": entries}, spice)
        row.update(scores[""])
    else:
        notes.append("no reference captions: BLEU, METEOR, ROUGE-L, CIDEr and SPICE skipped")
    row.update(repetition_and_diversity(predictions))

    if clip is not None:
        refs = [e["captions"] for e in entries] if all(has_refs) else None
        clip_s, ref_s = _clip_scores(clip, [str(p) for p in paths], predictions, refs, batch_size=32)
        row["CLIP-S"] = float(np.mean(clip_s))
        if ref_s is not None:
            row["RefCLIP-S"] = float(np.mean(ref_s))
    row["images"] = len(entries)

    table = pd.DataFrame([row], index=pd.Index([name], name="results"))
    table.attrs["notes"] = notes
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return table


def _image_path(images_dir: str | os.PathLike, i: int, name: str) -> Path:
    """``images_dir / name``, refusing a name that leaves the folder: an absolute path or one
    with a ``..`` part (``../x.png``, ``a/../../x``). Sub-folders (``val2014/x.jpg``) are fine.
    The check is on the name's text: a symbolic link inside the folder is followed, since the
    folder and its links are the user's own; only the result file's names are distrusted."""
    rel = PurePath(name)
    if rel.is_absolute() or rel.anchor or ".." in rel.parts:
        raise MagicEduError(f"entry {i}: image_name {name!r} points outside {images_dir}; image names must be "
                            f"file names inside the images folder (no absolute paths, no '..')")
    return Path(images_dir) / rel


def table_to_dict(table: pd.DataFrame) -> dict[str, float | int | None]:
    """The first row of an :func:`evaluate` table as metric name -> value (NaN -> None)."""
    out: dict[str, float | int | None] = {}
    for key, value in table.iloc[0].items():
        if key == "images":
            out[key] = int(value)
        else:
            out[key] = None if pd.isna(value) else float(value)
    return out


__all__ = [
    "CLIP_PREFIX",
    "CLIP_W",
    "caption_metrics",
    "clip_score",
    "evaluate",
    "load_results",
    "ref_clip_score",
    "repetition_and_diversity",
    "spice_models_present",
    "table_to_dict",
]
