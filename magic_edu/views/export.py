"""A decode as one self-contained HTML file: open it in any browser, no kernel, no network.

    >>> export_html(gen.trace, "decode.html", image=img)   # or gen.trace.to_html("decode.html", img)
    $ magic-edu export trace.json -o decode.html --image photo.jpg

The page steps through the decode with Prev / Next (and the arrow keys, Home and End): the
image, the text so far (the prefix greyed, the newest token highlighted, forced tokens marked),
every candidate of the step with its score parts as horizontal bars (the chosen and forced ones
marked in words, not only colour), the step number and the decoder's settings. Everything is
inline: the script, the styles, the image (a PNG at most :data:`IMAGE_SIZE` pixels on a side) and
the trace (JSON in a ``<script type="application/json">`` block, with ``<``, ``>`` and ``&``
escaped, and shown with ``textContent`` only, so no token can break out of it or inject markup).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import MagicEduError
from ..inputs import ImageLike, load_image
from ..tools.analysis import TraceLike, as_trace, token_label, trace_decoder
from ..trace import Trace, write_text_atomic

IMAGE_SIZE = 256  # the embedded image's longer side at most, in pixels
DIGITS = 5  # significant digits kept of every number

# (trace column, header, drawn as a bar); a column a decode leaves all empty (NaN) is not shown
SCORED_COLUMNS = (("lm_prob", "p(v|x)", True), ("degeneration_penalty", "degeneration penalty", True),
                  ("clip_score", "CLIP score", True), ("score", "score", True))
SAMPLING_COLUMNS = (("lm_prob", "p(v|x)", True), ("sample_prob", "sample prob (filtered)", True))
GREEDY_COLUMNS = (("lm_prob", "p(v|x)", True),)
BEAM_COLUMNS = (("beam", "beam", False), ("lm_prob", "p(v|beam)", True), ("score", "cumulative log p", True),
                ("next_beam", "becomes beam", False), ("hypothesis_score", "finished score", True))
ZEROCAP_COLUMNS = (("beam", "beam", False), ("lm_prob", "p0(v)", True), ("steered_prob", "p(v) steered", True),
                   ("clip_score", "CLIP target", True), ("fused_prob", "q(v) fused", True),
                   ("score", "score", True), ("next_beam", "becomes beam", False))


def _columns(trace: Trace) -> tuple[tuple[str, str, bool], ...]:
    decoder = trace_decoder(trace)
    if decoder is None:
        return (("lm_prob", "p(v|x)", True), ("score", "score", True))
    if decoder.steers:
        return ZEROCAP_COLUMNS
    if decoder.beams:
        return BEAM_COLUMNS
    if decoder.scores_candidates:
        return SCORED_COLUMNS
    return SAMPLING_COLUMNS if decoder.samples else GREEDY_COLUMNS


def _number(value: Any) -> float | int | None:
    """A finite number rounded to :data:`DIGITS` significant digits (JSON has no NaN: None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return value
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else None


def _image_uri(image: ImageLike) -> str:
    """The image as a PNG data URI, at most IMAGE_SIZE pixels on its longer side."""
    picture = load_image(image).copy()
    picture.thumbnail((IMAGE_SIZE, IMAGE_SIZE))
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data(trace: Trace) -> dict[str, Any]:
    """What the page shows, as plain JSON-ready values."""
    decoder = trace_decoder(trace)
    columns = [c for c in _columns(trace) if any(_number(v) is not None
                                                 for s in trace.steps for v in getattr(s, c[0], []) or [])]
    steps = []
    for s in trace.steps:
        values = {}
        for name, _, _ in columns:
            column = getattr(s, name) or [None] * s.k
            values[name] = [_number(v) for v in column]
        steps.append({"step": s.step, "before": s.text, "tokens": [token_label(t) for t in s.tokens],
                      "chosen": s.chosen, "forced": s.forced, "values": values})
    settings = {key: value for key, value in trace.settings.items()
                if value is not None and value != [] and isinstance(value, (str, int, float, bool, list))}
    return {"decoder": trace.settings.get("decoder"), "label": decoder.label if decoder else "decode",
            "beams": bool(decoder and (decoder.beams or decoder.steers)),
            "prefix": [token_label(t) for t in trace.prefix_tokens],
            "columns": [{"key": name, "label": label, "bar": bar} for name, label, bar in columns],
            "steps": steps, "settings": settings}


def script_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` (written as
    ``\\u003c`` ...), nor the line separators U+2028 / U+2029, appear literally."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                        ("\u2029", "\\u2029")):
        text = text.replace(ch, escaped)
    return text


def export_html(trace: TraceLike, path: str | os.PathLike, *, image: ImageLike | None = None,
                title: str | None = None) -> Path:
    """Write ``trace`` (a Trace, a Generation or a saved trace's path) as one self-contained HTML
    page to ``path`` (atomically); ``image``: the decode's image, embedded; ``title``: the page's
    heading (default: the decoder's name). Returns the path."""
    trace = as_trace(trace)
    if title is not None and not isinstance(title, str):
        raise MagicEduError(f"title must be a string; got {type(title).__name__}")
    data = decode_data(trace)
    heading = title if title is not None else f"{data['label']}, step by step"
    image_html = ""
    if image is not None:
        image_html = (f'<img id="image" src="{_image_uri(image)}" alt="the image the decode describes" '
                      'width="192">')
    page = (PAGE.replace("%TITLE%", html.escape(heading).replace("%", "&#37;")).replace("%IMAGE%", image_html)
            .replace("%STYLE%", STYLE).replace("%SCRIPT%", SCRIPT).replace("%DATA%", script_json(data)))
    return write_text_atomic(path, page)


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>%STYLE%</style>
</head>
<body>
<header><h1>%TITLE%</h1><p id="settings-line"></p></header>
<main>
<div class="top">
<figure>%IMAGE%</figure>
<section class="text-box" aria-labelledby="step-label">
<h2 id="step-label" aria-live="polite">Step</h2>
<p id="text" aria-label="the text so far"></p>
<p class="legend"><span class="tok prefix">prefix</span> <span class="tok newest">newest token</span>
<span class="tok forced">forced token</span></p>
<nav aria-label="step through the decode">
<button type="button" id="first" aria-label="first step">&laquo; First</button>
<button type="button" id="prev" aria-label="previous step">&#x25C0; Prev</button>
<button type="button" id="next" aria-label="next step">Next &#x25B6;</button>
<button type="button" id="last" aria-label="last step">Last &raquo;</button>
</nav>
<p class="hint">Keys: &larr; / &rarr; previous / next step, Home / End first / last.</p>
</section>
</div>
<section aria-labelledby="table-title">
<h2 id="table-title">Candidates of this step</h2>
<div class="table-wrap"><table id="candidates"><thead></thead><tbody></tbody></table></div>
</section>
<section aria-labelledby="settings-title">
<h2 id="settings-title">Settings</h2>
<dl id="settings"></dl>
</section>
</main>
<script type="application/json" id="decode-data">%DATA%</script>
<script>%SCRIPT%</script>
</body>
</html>
"""

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #111; background: #fff; margin: 0 auto;
  padding: 0.5rem 1rem 2rem; max-width: 72rem; line-height: 1.4; }
h1 { font-size: 1.3rem; margin: 0.4rem 0; } h2 { font-size: 1.05rem; margin: 0.6rem 0 0.3rem; }
.top { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; } figure img { image-rendering: pixelated; border: 1px solid #999; max-width: 100%; height: auto; }
.text-box { flex: 1 1 20rem; min-width: 0; }
#text { font-size: 1.05rem; word-wrap: break-word; }
.tok { display: inline-block; font-family: ui-monospace, Menlo, Consolas, monospace; padding: 0 3px; margin: 1px;
  border: 1px solid #888; border-radius: 3px; white-space: pre; }
.prefix { color: #444; background: #e8e8e8; font-style: italic; }
.newest { background: #F0E442; border: 2px solid #000; font-weight: bold; }
.forced { border: 2px dashed #B35C00; }
.forced::after { content: " (forced)"; font-size: 0.75em; color: #7a3e00; }
.legend .forced::after { content: ""; }
nav button { font-size: 1rem; padding: 0.35rem 0.7rem; margin: 0.15rem; border: 1px solid #333; border-radius: 4px;
  background: #f4f4f4; color: #111; cursor: pointer; }
nav button:focus-visible { outline: 3px solid #0072B2; outline-offset: 2px; }
nav button:disabled { color: #777; border-color: #aaa; cursor: default; }
.hint, .legend { font-size: 0.85rem; color: #333; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.token, th.token { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; }
td.mark { text-align: left; font-weight: bold; }
tr.chosen { background: #FFF4CC; font-weight: bold; }
tr.forced-row td.mark { color: #7a3e00; }
.cell { display: flex; align-items: center; gap: 6px; justify-content: flex-end; }
.bar { display: inline-block; height: 0.8em; background: #0072B2; min-width: 1px; }
.bar.negative { background: repeating-linear-gradient(45deg, #D55E00 0 3px, #f3c3a0 3px 6px); }
.track { display: inline-block; width: 6rem; text-align: left; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0 1rem; font-size: 0.9rem; }
dt { font-weight: bold; } dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; }
@media (max-width: 40rem) { .track { width: 3rem; } th, td { padding: 2px 4px; } }
"""

SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("decode-data").textContent);
  var steps = data.steps, n = steps.length, at = 0;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) { return "\\u2013"; }
    if (Number.isInteger(v)) { return String(v); }
    var a = Math.abs(v);
    return (a !== 0 && (a < 0.001 || a >= 1000)) ? v.toExponential(2) : v.toFixed(3);
  }
  function chip(box, cls, tok) {  // a token, then a space (so the text reads and copies as words)
    box.appendChild(el("span", cls, tok));
    box.appendChild(document.createTextNode(" "));
  }
  function showText(t) {
    var box = document.getElementById("text");
    box.textContent = "";
    data.prefix.forEach(function (tok) { chip(box, "tok prefix", tok); });
    var s = steps[t];
    if (data.beams) {
      if (s.before) { box.appendChild(el("span", "before", s.before + " ")); }
      chip(box, "tok newest", s.tokens[s.chosen]);
      box.appendChild(el("span", "hint", "(the best beam's new token)"));
      return;
    }
    for (var i = 0; i <= t; i++) {
      var r = steps[i], cls = "tok" + (i === t ? " newest" : "") + (r.forced ? " forced" : "");
      chip(box, cls, r.tokens[r.chosen]);
    }
  }
  function showTable(t) {
    var s = steps[t], table = document.getElementById("candidates");
    var head = table.tHead, body = table.tBodies[0];
    head.textContent = ""; body.textContent = "";
    var hr = head.insertRow();
    [["rank", ""], ["token", "token"]].concat(data.columns.map(function (c) { return [c.label, ""]; }))
      .concat([["", "mark"]]).forEach(function (h) {
        var th = el("th", h[1], h[0]); th.scope = "col"; hr.appendChild(th);
      });
    var scale = {};
    data.columns.forEach(function (c) {
      var m = 0;
      s.values[c.key].forEach(function (v) { if (v !== null) { m = Math.max(m, Math.abs(v)); } });
      scale[c.key] = m;
    });
    s.tokens.forEach(function (tok, i) {
      var chosen = i === s.chosen, row = body.insertRow();
      if (chosen) { row.className = "chosen" + (s.forced ? " forced-row" : ""); }
      row.appendChild(el("td", "", String(i + 1)));
      row.appendChild(el("td", "token", tok));
      data.columns.forEach(function (c) {
        var v = s.values[c.key][i], td = el("td");
        if (c.bar) {
          var cell = el("div", "cell"), track = el("span", "track");
          var bar = el("span", "bar" + (v < 0 ? " negative" : ""));
          bar.style.width = (v === null || scale[c.key] === 0 ? 0 : 100 * Math.abs(v) / scale[c.key]) + "%";
          track.appendChild(bar);
          cell.appendChild(el("span", "", fmt(v)));
          cell.appendChild(track);
          td.appendChild(cell);
        } else {
          td.textContent = fmt(v);
        }
        row.appendChild(td);
      });
      row.appendChild(el("td", "mark", chosen ? (s.forced ? "\\u25C0 forced" : "\\u25C0 chosen") : ""));
    });
  }
  function show(t) {
    if (n === 0) {
      document.getElementById("step-label").textContent = "This decode has no steps";
      return;
    }
    at = Math.max(0, Math.min(n - 1, t));
    var s = steps[at];
    document.getElementById("step-label").textContent = "Step " + s.step + " (" + (at + 1) + " of " + n + ")";
    document.getElementById("table-title").textContent = "Candidates of step " + s.step;
    showText(at);
    showTable(at);
    document.getElementById("first").disabled = document.getElementById("prev").disabled = at === 0;
    document.getElementById("next").disabled = document.getElementById("last").disabled = at === n - 1;
  }
  function settings() {
    var dl = document.getElementById("settings"), parts = [];
    Object.keys(data.settings).forEach(function (key) {
      var v = data.settings[key], shown = Array.isArray(v) ? v.join(", ") : String(v);
      dl.appendChild(el("dt", "", key));
      dl.appendChild(el("dd", "", shown));
      if (typeof v === "number") { parts.push(key + "=" + (Number.isInteger(v) ? v : +v.toPrecision(4))); }
    });
    document.getElementById("settings-line").textContent = data.label + (parts.length ? ": " + parts.join(", ") : "");
  }
  document.getElementById("first").addEventListener("click", function () { show(0); });
  document.getElementById("prev").addEventListener("click", function () { show(at - 1); });
  document.getElementById("next").addEventListener("click", function () { show(at + 1); });
  document.getElementById("last").addEventListener("click", function () { show(n - 1); });
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey) { return; }
    var to = {ArrowLeft: at - 1, ArrowRight: at + 1, Home: 0, End: n - 1}[e.key];
    if (to !== undefined) { e.preventDefault(); show(to); }
  });
  settings();
  show(0);
})();
"""
