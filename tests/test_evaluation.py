"""magic_edu.tools.evaluation against hand-worked numbers and second implementations written here.

The COCO metrics run the real pycocoevalcap (Java); each such call starts METEOR's JVM
(about 10 s), so tests that are not about METEOR replace it with a stub.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from magic_edu.errors import MagicEduError
from magic_edu.tools import evaluation
from magic_edu.tools.evaluation import (
    caption_metrics,
    clip_score,
    evaluate,
    load_results,
    ref_clip_score,
    repetition_and_diversity,
    table_to_dict,
)

needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None or shutil.which("java") is None,
    reason="the COCO metrics need pycocoevalcap (pip install 'magic_edu[eval]') and Java on PATH",
)


def entry(name: str, refs: list[str], pred: str, **extra) -> dict:
    return {"image_name": name, "captions": refs, "prediction": pred, **extra}


# A small corpus of already-tokenized, lower-case captions (the PTB tokenizer leaves them as they are).
CORPUS = [
    entry("1.jpg", ["a man riding a horse on the beach", "a person rides a brown horse"], "a man riding a brown horse"),
    entry("2.jpg", ["a cat sitting on a mat", "the cat is on the mat", "a cat on a red mat"], "a cat on the mat"),
    entry("3.jpg", ["two dogs playing in the snow"], "dogs in the snow playing"),
    entry("4.jpg", ["a plate of food with broccoli", "broccoli and rice on a plate"], "a plate of rice and broccoli"),
]


# -- second implementations ------------------------------------------------------------------
def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu_reference(pairs: list[tuple[str, list[str]]], max_n: int = 4) -> list[float]:
    """Corpus BLEU (Papineni et al. 2002): clipped counts summed over the corpus, brevity
    penalty from the closest reference length (ties: the shorter), x 100."""
    matched, guessed = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for hyp, refs in pairs:
        h = hyp.split()
        rs = [r.split() for r in refs]
        c_len += len(h)
        r_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            hc = ngrams(h, n)
            best = Counter()
            for r in rs:
                best |= ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            guessed[n - 1] += max(len(h) - n + 1, 0)
    bp = 1.0 if c_len >= r_len else math.exp(1 - r_len / c_len)
    out, log_sum = [], 0.0
    for n in range(max_n):
        log_sum += math.log(matched[n] / guessed[n]) if matched[n] else -math.inf
        out.append(100 * bp * math.exp(log_sum / (n + 1)))
    return out


def rouge_l_reference(pairs: list[tuple[str, list[str]]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F (Lin 2004) with coco-caption's choice: max precision and max recall
    over the references, combined with beta = 1.2; x 100."""
    def lcs(a: list[str], b: list[str]) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    scores = []
    for hyp, refs in pairs:
        h = hyp.split()
        p = max(lcs(h, r.split()) / len(h) for r in refs)
        r = max(lcs(h, r.split()) / len(r.split()) for r in refs)
        scores.append(0.0 if p == 0 or r == 0 else (1 + beta**2) * p * r / (r + beta**2 * p))
    return 100 * float(np.mean(scores))


def cider_d_reference(pairs: list[tuple[str, list[str]]], sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) as coco-caption computes it, x 100:
    tf-idf n-gram vectors (idf = log(#images / #images whose references hold the n-gram)),
    the candidate's weights clipped at the reference's, a Gaussian length penalty,
    averaged over n = 1..4 and the references, times 10; mean over images."""
    n_images = len(pairs)
    df = Counter()
    for _, refs in pairs:
        df.update({g for r in refs for n in range(1, 5) for g in ngrams(r.split(), n)})

    def vectors(words: list[str]) -> list[dict]:
        return [{g: c * (math.log(n_images) - math.log(max(1.0, df[g]))) for g, c in ngrams(words, n).items()}
                for n in range(1, 5)]

    def norm(v: dict) -> float:
        return math.sqrt(sum(x * x for x in v.values()))

    per_image = []
    for hyp, refs in pairs:
        h = hyp.split()
        hv = vectors(h)
        total = 0.0
        for ref in refs:
            r = ref.split()
            rv = vectors(r)
            penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma**2))
            sims = []
            for a, b in zip(hv, rv):
                dot = sum(min(w, b.get(g, 0.0)) * b.get(g, 0.0) for g, w in a.items())
                sims.append(dot / (norm(a) * norm(b)) * penalty if norm(a) and norm(b) else 0.0)
            total += float(np.mean(sims))
        per_image.append(10 * total / len(refs))
    return 100 * float(np.mean(per_image))


def pairs_of(results: list[dict]) -> list[tuple[str, list[str]]]:
    return [(e["prediction"], e["captions"]) for e in results]


# -- the real pycocoevalcap -------------------------------------------------------------------
@pytest.fixture
def stub_meteor(monkeypatch):
    """METEOR replaced by a constant where a test is about something else (saves a JVM start)."""
    monkeypatch.setattr(evaluation, "_meteor", lambda coco, pairs: dict.fromkeys(pairs, 0.25))


@needs_coco
def test_several_result_sets_at_once_score_as_one_call_each():
    """compare_caption_metrics (one tokenizer run, one METEOR process) gives each set exactly what
    caption_metrics gives it alone, METEOR included; sets may cover different images."""
    other = [entry(e["image_name"], e["captions"], " ".join(reversed(e["prediction"].split()))) for e in CORPUS]
    together = evaluation.compare_caption_metrics({"as written": CORPUS, "reversed": other, "two": CORPUS[:2]})
    assert together == {"as written": caption_metrics(CORPUS), "reversed": caption_metrics(other),
                        "two": caption_metrics(CORPUS[:2])}
    assert together["as written"]["BLEU-4"] > together["reversed"]["BLEU-4"]
    with pytest.raises(MagicEduError, match="systems must be a non-empty mapping"):
        evaluation.compare_caption_metrics({})


@needs_coco
def test_bleu_rouge_cider_match_second_implementations(stub_meteor):
    corpus_scores = caption_metrics(CORPUS)
    expected_bleu = bleu_reference(pairs_of(CORPUS))
    for n in range(4):
        assert corpus_scores[f"BLEU-{n + 1}"] == pytest.approx(expected_bleu[n], abs=1e-4)
    assert corpus_scores["ROUGE-L"] == pytest.approx(rouge_l_reference(pairs_of(CORPUS)), abs=1e-9)
    assert corpus_scores["CIDEr"] == pytest.approx(cider_d_reference(pairs_of(CORPUS)), abs=1e-9)
    assert corpus_scores["METEOR"] == 25.0  # the stub; the real one is checked below and in test_cli
    assert set(corpus_scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


@needs_coco
def test_bleu_is_corpus_level_with_brevity_penalty_by_hand(stub_meteor):
    # c = 3 + 2 = 5 words, r = 6 + 3 = 9; every 1-, 2-, 3-gram matches; no 4-gram exists.
    # BLEU-1..3 = exp(1 - 9/5) = e^-0.8; a mean of per-sentence scores would differ.
    results = [entry("a", ["the cat sat on the mat"], "the cat sat"), entry("b", ["a dog ran"], "a dog")]
    scores = caption_metrics(results)
    for n in (1, 2, 3):
        assert scores[f"BLEU-{n}"] == pytest.approx(100 * math.exp(-0.8), abs=1e-4)
    # No 4-gram at all: coco-caption's BLEU smooths 0/0 as 1e-15/1e-9, so BLEU-4 is not 0.
    assert scores["BLEU-4"] == pytest.approx(100 * math.exp(-0.8) * (1e-15 / 1e-9) ** 0.25, rel=1e-6)
    # ROUGE-L: (P, R) = (1, 3/6) and (1, 2/3); F = 2.44 P R / (R + 1.44 P)
    f_a, f_b = 2.44 * 0.5 / (0.5 + 1.44), 2.44 * (2 / 3) / (2 / 3 + 1.44)
    assert scores["ROUGE-L"] == pytest.approx(100 * (f_a + f_b) / 2, abs=1e-9)


@needs_coco
@pytest.mark.slow
def test_exact_matches_after_ptb_tokenization_score_the_maximum():
    # Case and punctuation are removed by the PTB tokenizer, so these are exact matches.
    # All n-grams are unique to their image: idf = log 2 > 0 and CIDEr-D = 10 (x 100).
    results = [
        entry("a", ["a man riding a horse"], "A man, riding a horse."),
        entry("b", ["two dogs playing in snow"], "Two dogs playing in snow!"),
    ]
    scores = caption_metrics(results)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert scores[key] == pytest.approx(100, abs=1e-4), key
    assert scores["CIDEr"] == pytest.approx(1000, abs=1e-6)


@needs_coco
def test_cider_of_a_single_image_is_zero_with_a_note(stub_meteor):
    with pytest.warns(UserWarning, match="single image"):
        scores = caption_metrics([entry("a", ["a man riding a horse"], "a man riding a horse")])
    assert scores["CIDEr"] == 0.0
    assert scores["BLEU-1"] == pytest.approx(100, abs=1e-4)


@needs_coco
def test_line_separators_inside_captions_do_not_shift_later_captions(stub_meteor):
    results = [entry("a", ["a dog\u2028in snow"], "a dog\u2028in snow"), entry("b", ["a red car"], "a red car")]
    assert caption_metrics(results)["BLEU-1"] == pytest.approx(100, abs=1e-4)


@needs_coco
def test_spice_skipped_with_a_message_when_its_models_are_missing(stub_meteor, monkeypatch):
    monkeypatch.setattr(evaluation, "spice_models_present", lambda: False)
    with pytest.warns(UserWarning, match="SPICE skipped.*models"):
        scores = caption_metrics(CORPUS, spice=True)
    assert "SPICE" not in scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing about SPICE unless asked for
        caption_metrics(CORPUS)


@needs_coco
def test_spice_runs_when_present_and_its_failure_is_not_fatal(stub_meteor, monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    seen = {}

    class FakeSpice:
        def compute_score(self, gts, res):
            seen["opts"] = os.environ.get("JDK_JAVA_OPTIONS")
            seen["n"] = len(gts)
            return 0.113, []

    monkeypatch.setattr(evaluation, "spice_models_present", lambda: True)
    monkeypatch.setattr(spice_module, "Spice", FakeSpice)
    monkeypatch.delenv("JDK_JAVA_OPTIONS", raising=False)
    assert caption_metrics(CORPUS, spice=True)["SPICE"] == pytest.approx(11.3)
    assert seen["n"] == len(CORPUS) and "--add-opens=java.base/java.lang" in seen["opts"]
    assert "JDK_JAVA_OPTIONS" not in os.environ

    class BrokenSpice:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(spice_module, "Spice", BrokenSpice)
    with pytest.warns(UserWarning, match="SPICE skipped: its Java run failed"):
        assert "SPICE" not in caption_metrics(CORPUS, spice=True)


def test_missing_pycocoevalcap_says_how_to_install(monkeypatch):
    import sys

    for name in [m for m in sys.modules if m.startswith("pycocoevalcap")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MagicEduError, match=r"pip install 'magic_edu\[eval\]'"):
        caption_metrics(CORPUS)


@needs_coco
def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MagicEduError, match="Java"):
        caption_metrics(CORPUS)


# -- the result format ----------------------------------------------------------------------
def test_load_results_reads_the_release_format_and_ignores_extra_keys(tmp_path):
    path = tmp_path / "magic_mscoco.json"
    path.write_text(json.dumps([entry("x.jpg", ["r1", "r2"], "p", split="test", id=3)]))
    assert load_results(path) == [{"image_name": "x.jpg", "captions": ["r1", "r2"], "prediction": "p"}]
    assert load_results(str(path)) == load_results(json.loads(path.read_text()))


@pytest.mark.parametrize("bad, message", [
    ([entry("a", ["r"], "p"), {"captions": ["r"], "prediction": "p"}], r"entry 1: key 'image_name' is missing"),
    ([entry("a", ["r"], "p"), {"image_name": "b", "prediction": "p"}], r"entry 1: key 'captions' is missing"),
    ([entry("a", ["r"], "p"), {"image_name": "b", "captions": ["r"]}], r"entry 1: key 'prediction' is missing"),
    ([entry("a", ["r"], "p"), entry("b", ["r"], "")], r"entry 1: 'prediction' is empty"),
    ([entry("a", ["r"], "p"), entry("b", ["r"], "  \n")], r"entry 1: 'prediction' is empty"),
    ([entry("a", ["r"], "p"), entry("b", ["r"], None)], r"entry 1: 'prediction' must be a string"),
    ([entry("a", ["r"], "p"), entry("b", [], "p")], r"entry 1: 'captions' \(the reference captions\) is empty"),
    ([entry("a", ["r"], "p"), entry("b", "r", "p")], r"entry 1: 'captions' must be a list"),
    ([entry("a", ["r"], "p"), entry("b", ["r", ""], "p")], r"entry 1: 'captions'\[1\] must be a non-empty string"),
    ([entry("a", ["r"], "p"), entry("", ["r"], "p")], r"entry 1: 'image_name' must be a non-empty string"),
    ([entry("a", ["r"], "p"), "just text"], r"entry 1 must be an object"),
    ({"image_name": "a", "captions": ["r"], "prediction": "p"}, r"must be a JSON list"),
    ([], r"holds no entries"),
])
def test_malformed_results_are_rejected_naming_entry_and_key(bad, message):
    with pytest.raises(MagicEduError, match=message):
        load_results(bad)


def test_not_json_is_rejected_with_the_file_name(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"image_name": "a", "captions": ["r"], "prediction": "p"},')
    with pytest.raises(MagicEduError, match="broken.json is not JSON"):
        load_results(path)
    with pytest.raises(MagicEduError, match="cannot read"):
        load_results(tmp_path / "absent.json")
    assert issubclass(MagicEduError, ValueError)


def test_empty_references_are_allowed_only_when_asked():
    assert load_results([entry("a", [], "p")], require_references=False)[0]["captions"] == []


# -- SimCTG rep-n and diversity -------------------------------------------------------------
def test_repetition_and_diversity_by_hand():
    # "a b a b a b": bigrams ab ba ab ba ab (5, 2 unique); trigrams 4 (2 unique); 4-grams 3 (2 unique)
    # "the cat the cat": bigrams 3 (2 unique); trigrams 2 (2 unique); 4-grams 1 (1 unique)
    scores = repetition_and_diversity(["a b a b a b", "the cat the cat"])
    assert scores["rep-2"] == pytest.approx(100 * (1 - 4 / 8))
    assert scores["rep-3"] == pytest.approx(100 * (1 - 4 / 6))
    assert scores["rep-4"] == pytest.approx(100 * (1 - 3 / 4))
    assert scores["diversity"] == pytest.approx((4 / 8) * (4 / 6) * (3 / 4))


def test_no_repetition_gives_diversity_one_and_too_short_texts_nan():
    assert repetition_and_diversity(["a man riding a horse"]) == {"rep-2": 0.0, "rep-3": 0.0, "rep-4": 0.0,
                                                                   "diversity": 1.0}
    short = repetition_and_diversity(["a dog", "hi"])
    assert short["rep-2"] == 0.0 and math.isnan(short["rep-3"]) and math.isnan(short["diversity"])
    with pytest.raises(MagicEduError):
        repetition_and_diversity("a string, not a list")


def test_simctg_script_mode_reproduces_their_loop():
    def simctg(texts: list[str]) -> list[float]:
        # SimCTG's evaluation loop, re-expressed: the window stops while end < len(words).
        reps = []
        for n in (2, 3, 4):
            unique = total = 0
            for text in texts:
                words = text.strip().split()
                seen, count, end = set(), 0, n
                while end < len(words):
                    seen.add(" ".join(words[end - n:end]))
                    count += 1
                    end += 1
                unique += len(seen)
                total += count
            reps.append(100 * (1 - unique / total))
        return reps

    texts = ["a b a b a b", "the cat the cat on the mat", "one two three four five"]
    got = repetition_and_diversity(texts, simctg_script=True)
    assert [got["rep-2"], got["rep-3"], got["rep-4"]] == pytest.approx(simctg(texts))
    assert got["diversity"] == pytest.approx(np.prod([1 - r / 100 for r in simctg(texts)]))


# -- CLIPScore ------------------------------------------------------------------------------
class FakeClip:
    """An ImageTextMatcher stand-in with fixed 2-d embeddings (images looked up by file name)."""

    def __init__(self, images: dict[str, tuple], texts: dict[str, tuple]):
        self.images, self.texts, self.text_calls = images, texts, []

    @staticmethod
    def _unit(v) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)

    def embed_image(self, images):
        return self._unit([self.images[os.path.basename(str(im))] for im in images])

    def embed_texts(self, texts):
        self.text_calls += list(texts)
        return self._unit([self.texts[t] for t in texts])


P = evaluation.CLIP_PREFIX


@pytest.fixture
def fake_clip() -> FakeClip:
    return FakeClip(
        images={"1.jpg": (1.0, 0.0), "2.jpg": (0.0, 1.0)},
        texts={P + "red": (0.6, 0.8), P + "blue": (0.6, -0.8),  # cos with their images: 0.6 and -0.8
               P + "ref a": (0.8, 0.6), P + "ref b": (1.0, 0.0), P + "ref c": (-1.0, 0.0)},
    )


def test_clip_score_by_hand(fake_clip):
    scores = clip_score(fake_clip, ["1.jpg", "2.jpg"], ["red", "blue"])
    np.testing.assert_allclose(scores, [2.5 * 0.6, 0.0], atol=1e-6)  # negative cosines count as 0
    assert fake_clip.text_calls == [P + "red", P + "blue"]


def test_ref_clip_score_by_hand(fake_clip):
    # image 1: CLIP-S 1.5, best reference cosine max(0.96, 0.6) -> H-mean(1.5, 0.96)
    # image 2: CLIP-S 0, reference cosine max(0.6 * -1) < 0 -> 0, and H-mean(0, 0) = 0
    scores = ref_clip_score(fake_clip, ["1.jpg", "2.jpg"], ["red", "blue"], [["ref a", "ref b"], ["ref c"]])
    np.testing.assert_allclose(scores, [2 * 1.5 * 0.96 / (1.5 + 0.96), 0.0], atol=1e-6)


def test_clip_score_rejects_mismatched_lengths(fake_clip):
    with pytest.raises(MagicEduError, match="one caption per image"):
        clip_score(fake_clip, ["1.jpg", "2.jpg"], ["red"])
    with pytest.raises(MagicEduError, match=r"references\[1\]"):
        ref_clip_score(fake_clip, ["1.jpg", "2.jpg"], ["red", "blue"], [["ref a"], []])


def test_clip_score_with_a_real_open_clip_model_matches_a_direct_computation(tmp_path):
    import open_clip
    from PIL import Image

    from magic_edu.tools.random_models import random_clip

    clip = random_clip(tmp_path / "clip", seed=3)
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "navy", "white")]
    captions = ["a red square", "a small blue thing on a table", "white"]
    with torch.no_grad():
        pixels = torch.stack([clip.preprocess(im) for im in images])
        v = torch.nn.functional.normalize(clip.model.encode_image(pixels), dim=-1)
        tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}")([P + c for c in captions])
        t = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)
    direct = 2.5 * torch.clamp((v * t).sum(-1), min=0).numpy()
    np.testing.assert_allclose(clip_score(clip, images, captions, batch_size=2), direct, atol=1e-5)


# -- evaluate -------------------------------------------------------------------------------
@needs_coco
def test_evaluate_makes_one_row_with_every_metric(stub_meteor, fake_clip, tmp_path):
    results = [entry("1.jpg", ["ref a", "ref b"], "red"), entry("2.jpg", ["ref c"], "blue")]
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / name).write_bytes(b"not read by the fake")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    table = evaluate(path, clip=fake_clip, images_dir=tmp_path)
    assert list(table.index) == ["run"]
    row = table_to_dict(table)
    assert row["METEOR"] == 25.0 and row["images"] == 2
    assert row["CLIP-S"] == pytest.approx((1.5 + 0.0) / 2, abs=1e-6)
    assert row["RefCLIP-S"] == pytest.approx(2 * 1.5 * 0.96 / 2.46 / 2, abs=1e-6)
    assert row["rep-2"] is None  # one-word predictions have no bigrams
    assert list(table.columns)[:7] == list(evaluation.COCO_COLUMNS)
    json.dumps(row)  # JSON-ready


def test_evaluate_without_references_keeps_the_reference_free_metrics(fake_clip, tmp_path):
    (tmp_path / "1.jpg").write_bytes(b"x")
    with pytest.warns(UserWarning, match="no reference captions"):
        table = evaluate([entry("1.jpg", [], "red")], clip=fake_clip, images_dir=tmp_path)
    assert "BLEU-1" not in table.columns and "RefCLIP-S" not in table.columns
    assert table["CLIP-S"].iloc[0] == pytest.approx(1.5, abs=1e-6)
    assert "no reference captions" in table.attrs["notes"][0]


def test_evaluate_rejects_mixed_references_and_missing_images(fake_clip, tmp_path):
    with pytest.raises(MagicEduError, match="entry 1: 'captions' is empty"):
        evaluate([entry("1.jpg", ["r"], "red"), entry("2.jpg", [], "blue")])
    with pytest.raises(MagicEduError, match="not in"):
        evaluate([entry("1.jpg", [], "red")], clip=fake_clip, images_dir=tmp_path)
    with pytest.raises(MagicEduError, match="both clip= .* and images_dir="):
        evaluate([entry("1.jpg", [], "red")], clip=fake_clip)


def test_deeply_nested_json_is_a_clear_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000)
    with pytest.raises(MagicEduError, match="deep.json nests its JSON too deeply"):
        load_results(path)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.png", "a/../../x", "sub/../1.jpg"])
def test_evaluate_refuses_image_names_outside_the_folder_before_any_clip_work(fake_clip, tmp_path, name):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "1.jpg").write_bytes(b"x")
    (tmp_path / "x.png").write_bytes(b"x")
    with pytest.raises(MagicEduError, match=r"entry 1: image_name .* image names must be file names inside"):
        evaluate([entry("1.jpg", [], "red"), entry(name, [], "blue")], clip=fake_clip, images_dir=images)
    assert fake_clip.text_calls == []


def test_evaluate_accepts_image_names_in_a_sub_folder(fake_clip, tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "1.jpg").write_bytes(b"x")
    with pytest.warns(UserWarning, match="no reference captions"):
        table = evaluate([entry("val/1.jpg", [], "red")], clip=fake_clip, images_dir=tmp_path)
    assert table["CLIP-S"].iloc[0] == pytest.approx(1.5, abs=1e-6)
