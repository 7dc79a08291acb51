"""A decode as one self-contained HTML page: parsed, searched for outside references, fed hostile
tokens, measured, and written through the command line."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from magic_edu import MagicEduError, Stepper
from magic_edu.presets import data_dir, load_models
from magic_edu.tools import cli
from magic_edu.tools.analysis import token_label
from magic_edu.toyworld import shapes
from magic_edu.trace import StepRecord, Trace
from magic_edu.views.export import export_html

from conftest import make_image

HOSTILE = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "&lt;b&gt;", "a\u2028b",
           "<!--", "]]>", "%DATA%"]


class Page(HTMLParser):
    """Every start tag with its attributes, and the text inside each <script>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def embedded(page: Page) -> dict:
    """The decode's JSON, read back from its <script type="application/json"> block."""
    blocks = [text for attrs, text in page.scripts if attrs.get("type") == "application/json"]
    assert len(blocks) == 1
    return json.loads(blocks[0])


def outside_references(page: Page) -> list[str]:
    """Every attribute that makes a browser fetch something, but for inline data: URIs."""
    refs = []
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is not None and not value.startswith("data:"):
                refs.append(f"<{tag} {name}={value!r}>")
        if tag == "link":
            refs.append(f"<link {attrs}>")
    return refs


@pytest.fixture(scope="module")
def magic_trace(tiny_lm, tiny_clip) -> Trace:
    return Stepper(tiny_lm, "magic", clip=tiny_clip, image=make_image(2), k=4, alpha=0.2, beta=1.0,
                   max_new_tokens=6, stop_at_eos=False).run()[0].trace


def test_the_page_is_self_contained_and_embeds_every_step(magic_trace, tmp_path):
    big = make_image(7, size=(640, 480))
    out = export_html(magic_trace, tmp_path / "decode.html", image=big, title="a test decode")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = parse(out)
    assert outside_references(page) == []
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    scripts = [attrs for attrs, _ in page.scripts]
    assert all("src" not in attrs for attrs in scripts) and len(scripts) == 2
    data = embedded(page)
    assert len(data["steps"]) == len(magic_trace.steps) == 6
    for shown, record in zip(data["steps"], magic_trace.steps):
        assert shown["tokens"] == [token_label(t) for t in record.tokens]
        assert shown["chosen"] == record.chosen and shown["forced"] == record.forced
        assert shown["values"]["lm_prob"] == pytest.approx(record.lm_prob, rel=1e-4)
        assert shown["values"]["score"] == pytest.approx(record.score, rel=1e-4, abs=1e-6)
    assert [c["key"] for c in data["columns"]] == ["lm_prob", "degeneration_penalty", "clip_score", "score"]
    assert data["settings"]["k"] == 4 and data["settings"]["decoder"] == "magic"
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 1 and images[0]["alt"]
    png = base64.b64decode(images[0]["src"].removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(png)) as shown_image:
        assert shown_image.format == "PNG" and max(shown_image.size) == 256
        assert shown_image.size == (256, 192)  # the 4:3 image, downscaled
    buttons = [attrs for tag, attrs in page.tags if tag == "button"]
    assert {b["id"] for b in buttons} == {"first", "prev", "next", "last"} and all(b["aria-label"] for b in buttons)
    assert [t for t, _ in page.tags].count("title") == 1 and "a test decode" in text


def test_to_html_writes_the_same_page(magic_trace, tmp_path):
    a = export_html(magic_trace, tmp_path / "a.html", image=make_image(1))
    b = magic_trace.to_html(tmp_path / "b.html", image=make_image(1))
    assert b == tmp_path / "b.html" and a.read_bytes() == b.read_bytes()


def hostile_trace() -> Trace:
    k = len(HOSTILE)
    record = StepRecord(step=0, text="", token_ids=list(range(k)), tokens=HOSTILE, lm_prob=[1 / k] * k,
                        degeneration_penalty=[float("nan")] * k, penalty_position=[-1] * k, clip_text=[""] * k,
                        clip_cosine=[float("nan")] * k, clip_score=[float("nan")] * k, score=[1 / k] * k, chosen=1,
                        forced=True)
    return Trace({"decoder": "greedy", "prompt": "</script><b>bold</b>", "lm": "<img src=y onerror=alert(3)>"},
                 [0], ["<-start_of_text->"], [record])


def test_hostile_tokens_are_data_not_markup(tmp_path):
    out = export_html(hostile_trace(), tmp_path / "hostile.html", title="<script>alert(4)</script> %DATA% %IMAGE%")
    text = out.read_text(encoding="utf-8")
    page = parse(out)
    assert [t for t, _ in page.tags].count("script") == 2  # only the page's own two
    assert [t for t, _ in page.tags].count("img") == 0 and [t for t, _ in page.tags].count("b") == 0
    assert "alert(1)" in text and "</script><script>alert" not in text and "<img src=" not in text
    assert "\u2028" not in text
    data = embedded(page)
    assert data["steps"][0]["tokens"] == [token_label(t) for t in HOSTILE]
    assert data["settings"]["prompt"] == "</script><b>bold</b>"
    assert data["steps"][0]["forced"] is True and data["steps"][0]["chosen"] == 1
    assert "&lt;script&gt;alert(4)&lt;/script&gt; &#37;DATA&#37; &#37;IMAGE&#37;" in text


def test_every_decoder_kind_shows_its_own_columns(tiny_lm, tiny_clip, tmp_path):
    expected = {"greedy": ["lm_prob"], "top_k": ["lm_prob", "sample_prob"],
                "contrastive": ["lm_prob", "degeneration_penalty", "score"],
                "beam": ["beam", "lm_prob", "score", "next_beam", "hypothesis_score"],
                "zerocap": ["beam", "lm_prob", "steered_prob", "clip_score", "fused_prob", "score", "next_beam"]}
    settings = {"top_k": {"seed": 3}, "zerocap": {"clip": tiny_clip, "image": make_image(0), "num_iterations": 1,
                                                  "candidates": 4, "num_beams": 2}}
    for decoder, columns in expected.items():
        trace = Stepper(tiny_lm, decoder, max_new_tokens=4, **settings.get(decoder, {})).run()[0].trace
        data = embedded(parse(export_html(trace, tmp_path / f"{decoder}.html")))
        assert [c["key"] for c in data["columns"]] == columns, decoder
        assert data["beams"] == (decoder in ("beam", "zerocap"))
        assert len(data["steps"]) == len(trace.steps)
        if data["beams"]:
            assert [s["values"]["beam"] for s in data["steps"]] == [s.beam for s in trace.steps]
            assert [s["before"] for s in data["steps"]] == [s.text for s in trace.steps]


def test_the_file_is_written_atomically_and_a_folder_is_refused(magic_trace, tmp_path):
    out = tmp_path / "decode.html"
    out.write_text("old")
    export_html(magic_trace, out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.html"]  # no temporary file left
    with pytest.raises(MagicEduError, match="it is a folder"):
        export_html(magic_trace, tmp_path)
    with pytest.raises(MagicEduError, match="title must be a string"):
        export_html(magic_trace, out, title=3)
    with pytest.raises(MagicEduError, match="trace must be a Trace"):
        export_html(42, out)


def test_a_32_step_toy_magic_decode_is_well_under_a_megabyte(tmp_path):
    if not (data_dir() / "toy" / "defaults.json").is_file():
        pytest.skip(f"the toy models are not in {data_dir() / 'toy'}")
    toy = load_models("toy")
    scene = shapes.make_scene(shapes.HELD_OUT_SEED)
    trace = Stepper(toy.lm, "magic", clip=toy.clip, image=scene.image, max_new_tokens=32,
                    stop_at_eos=False).run()[0].trace
    out = export_html(trace, tmp_path / "toy.html", image=scene.image)
    assert len(embedded(parse(out))["steps"]) == 32
    size = out.stat().st_size
    assert size < 200_000, f"{size:,} bytes"


# -- the command line --------------------------------------------------------------------------
def test_magic_edu_export_writes_the_page_from_a_saved_trace(magic_trace, tmp_path, capsys):
    saved = magic_trace.save(tmp_path / "trace.json")
    image = tmp_path / "img.png"
    make_image(4).save(image)
    out = tmp_path / "out" / "decode.html"
    assert cli.main(["export", str(saved), "-o", str(out), "--image", str(image), "--title", "mine"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 6 steps" in printed
    page = parse(out)
    assert len(embedded(page)["steps"]) == 6 and outside_references(page) == []
    assert [t for t, _ in page.tags].count("img") == 1


@pytest.mark.parametrize("content, message", [
    (None, "no trace file at"),
    ("{not json", "is not a JSON trace file"),
    ('{"format": "something else"}', "not a magic_edu trace"),
])
def test_magic_edu_export_refuses_a_missing_or_invalid_trace(tmp_path, capsys, content, message):
    trace = tmp_path / "trace.json"
    if content is not None:
        trace.write_text(content)
    out = tmp_path / "decode.html"
    assert cli.main(["export", str(trace), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("magic-edu export: error:") and message in err and str(trace) in err
    assert not out.exists()


def test_magic_edu_export_refuses_a_bad_image_and_needs_out(magic_trace, tmp_path, capsys):
    saved = magic_trace.save(tmp_path / "trace.json")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert cli.main(["export", str(saved), "-o", str(tmp_path / "d.html"), "--image", str(bad)]) == 2
    assert "--image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", str(saved)])  # -o is required
