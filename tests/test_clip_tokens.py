"""ClipTokenizer gives open_clip's ids exactly, and stops re-tokenising known words."""

from __future__ import annotations

import random

import open_clip
import pytest
import torch

from magic_edu.fast.clip_tokens import ClipTokenizer

WORDS = ["a", "red", "circle", "on", "the", "left", "of", "two", "dogs", "Dog", "playing", "frisbee", "it's",
         "they're", "don't", "I'll", "we've", "X-ray", "e-mail", "3D", "2024", "7", "<start_of_text>", "<end_of_text>",
         "&", "&amp;", "&lt;b&gt;", "caf\u00e9", "na\u00efve", "\u201cquoted\u201d", "\u00c9cole", "\U0001f436",
         "\u3053\u3093\u306b\u3061\u306f", "\ufb01sh", "\uff21\uff22", "", "'s", "'", "'''", "...", "?!", ",", ".",
         "(x)", "co-op", "U.S.A.", "mr.", "HTTP://x.org", "C++", "#tag", "@user", "50%", "$3.99", "\u00bd", "x\u00b2"]
SPACES = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\r\n", "\u00a0", "\u2028", ""]


PLAIN_WORDS = [w for w in WORDS if w.isascii() and w.isprintable() and "&" not in w]


def random_text(rng: random.Random) -> str:
    """Half of them plain printable ASCII (ClipTokenizer's word-by-word path), half anything."""
    n = rng.choice([0, 1, 2, 3, 5, 8, 13, 40, 90])  # 90 words run past the 77-token context
    words, spaces = (PLAIN_WORDS, [" ", "  ", ""]) if rng.random() < 0.5 else (WORDS, SPACES)
    parts = []
    for _ in range(n):
        parts.append(rng.choice(words))
        parts.append(rng.choice(spaces))
    text = "".join(parts)
    return rng.choice(["", " ", "  "]) + text if rng.random() < 0.3 else text


@pytest.fixture(scope="module")
def simple_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32-quickgelu")


def test_same_ids_as_open_clip_on_random_texts(simple_tokenizer):
    rng = random.Random(0)
    fast = ClipTokenizer(simple_tokenizer)
    assert fast.remembers_words
    texts = [random_text(rng) for _ in range(3000)]
    for start in range(0, len(texts), 100):
        batch = texts[start: start + 100]
        expected = simple_tokenizer(batch)  # open_clip itself, 77 columns
        assert torch.equal(fast(batch, trim=False), expected)
        trimmed = fast(batch)
        width = int((expected != 0).any(dim=0).nonzero().max()) + 1
        assert torch.equal(trimmed, expected[:, :width])
    # the word-by-word path was taken for most texts, the full path for the others
    assert sum(t.isascii() and t.isprintable() and "&" not in t for t in texts) > 1000
    assert sum(not (t.isascii() and t.isprintable()) for t in texts) > 1000


def test_growing_caption_like_magic_steps(simple_tokenizer):
    """Texts the way MAGIC makes them: a caption so far plus one candidate piece, including
    pieces that glue onto the last word (no space) and the empty EOS text."""
    fast = ClipTokenizer(simple_tokenizer)
    caption = ""
    pieces = [" a", " man", " rid", "ing", " a", " horse", ",", " it", "'s", " 2", "0", "24", ".", "", " The", "End"]
    for piece in pieces:
        candidates = [caption + p for p in (" the", "s", "'", " x", "", piece)]
        assert torch.equal(fast(candidates, trim=False), simple_tokenizer(candidates))
        caption += piece


def test_known_words_are_not_tokenised_again(simple_tokenizer, monkeypatch):
    fast = ClipTokenizer(simple_tokenizer)
    fast(["a red circle on the left", "a red square"])
    calls = []
    original = open_clip.tokenizer.SimpleTokenizer.encode
    monkeypatch.setattr(open_clip.tokenizer.SimpleTokenizer, "encode",
                        lambda self, text: calls.append(text) or original(self, text))
    fast(["a red circle", "the left square", "a red circle on the left"])
    assert calls == []
    fast(["a blue circle"])
    assert calls == ["blue"]


def test_new_words_skip_the_cleaning_and_match_open_clip(simple_tokenizer, monkeypatch):
    """A word seen for the first time goes to open_clip's regex split and BPE without ftfy;
    its ids are open_clip's, for words of every printable ASCII character but "&" and space."""
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(33, 127) if chr(c) != "&"]
    vocab_words = [w[:-4] for w in list(simple_tokenizer.encoder)[256:]
                   if w.endswith("</w>") and w.isascii() and w.isprintable() and "&" not in w]
    words = rng.sample(vocab_words, 2000)
    words += ["".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(2000)]
    words += [w.upper() for w in words[:200]] + [w.capitalize() for w in words[200:400]] + ["'s", "'ll", "x's"]
    fixes = []
    fix_text = open_clip.tokenizer.ftfy.fix_text
    monkeypatch.setattr(open_clip.tokenizer.ftfy, "fix_text",
                        lambda text, **kw: fixes.append(text) or fix_text(text, **kw))
    fast = ClipTokenizer(simple_tokenizer)
    got = [fast.encode(w) for w in words]
    assert fixes == []  # nothing went through ftfy
    assert got == [simple_tokenizer.encode(w) for w in words]  # open_clip's own path, ftfy included
    assert len(fixes) == len(words)


def test_other_tokenizers_go_through_unchanged():
    canonical = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    fast = ClipTokenizer(canonical)
    assert not fast.remembers_words
    texts = ["A Red, circle!", "two  dogs."]
    assert torch.equal(fast(texts, trim=False), canonical(texts))
    assert fast(texts).shape[1] == 5  # [start, a, red, circle, end]: trimmed to the longest
