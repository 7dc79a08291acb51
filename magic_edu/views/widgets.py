"""Interactive controls (ipywidgets 8) to watch MAGIC decode, one token at a time.

    >>> models = load_models("toy")
    >>> StepThrough(models)       # Next / Back / Reset / Run, the candidates, force any of them
    >>> CompareDecoders(models)   # greedy, beam, contrastive, MAGIC and sampling on the same image
    >>> Sweep(models)             # MAGIC over a grid of alpha, beta (and k)

Each widget is an ``ipywidgets.VBox`` built around :class:`ImagePicker` (toy scenes by seed,
the bundled sample photos, your own upload). ``widget.snapshot()`` returns a static matplotlib
Figure of what the widget shows, for places where no kernel runs (GitHub, HTML exports).
A bad setting or a bad upload shows a message inside the widget, never a traceback.
"""

from __future__ import annotations

import functools
import html
import io
import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import pandas as pd
from PIL import Image

from ..decoding import NO_FORCING_BEAMS, NO_FORCING_ZEROCAP, Stepper, clip_retrieval_search
from ..errors import MagicEduError
from ..photos import list_sample_photos, load_sample_photo, load_user_image
from ..presets import ModelSet
from ..registry import DECODERS, MAX_NEW_TOKENS, Decoder, Param, get_decoder, stepping_decoders
from ..retrieval import ClipIndex
from ..tools import analysis, explain
from ..toyworld import shapes
from ..toyworld.shapes import HELD_OUT_SEED
from ..trace import Generation, StepRecord, Trace
from . import plots
from .plots import Figure

PLOT_DPI = 72
PNG_CACHE = 64  # step plots kept, so Back and the step slider redraw nothing
MAX_SWEEP = 300  # most settings one sweep may decode
REFERENCE = "greedy"  # CompareDecoders marks where each decoder leaves this one's path
RETRIEVAL = "clip_retrieval"  # CompareDecoders shows it with index= (the paper's CLIPRe baseline)
NO_INDEX = ("CLIP retrieval (the paper's baseline: the caption of a pool that CLIP scores highest) is not shown: "
            "give CompareDecoders an index of captions, index=magic_edu.build_text_index(models.clip, captions) "
            "or the path of one from `magic-edu index-text captions.txt -o index.safetensors`.")
SWEPT = "magic"  # the decoder a Sweep starts with
LABELS = {"alpha": "alpha α", "beta": "beta β", "clip_text_max_len": "CLIP text max len",
          "zerocap.num_beams": "ZeroCap beams"}  # else the name

ERROR_STYLE = "border-left:4px solid #D55E00;background:#FFF1E6;padding:4px 8px;margin:2px 0"
INFO_STYLE = "border-left:4px solid #0072B2;background:#EAF4FB;padding:4px 8px;margin:2px 0"
CHIP = "display:inline-block;padding:0 3px;margin:1px;border:1px solid #999;border-radius:3px;font-family:monospace"
NEWEST = CHIP + ";border:2px solid #000;background:#F0E442;font-weight:bold"
FORCED = CHIP + ";border:2px dashed #E69F00"
PREFIX = CHIP + ";color:#555;background:#EEE;font-style:italic"
SPLIT = CHIP + ";border:2px solid #D55E00;font-weight:bold"


# -- small helpers ---------------------------------------------------------------------------------
def message_html(text: str, error: bool = True) -> str:
    """A message box: ⚠ for problems, ℹ for information (words and a symbol, not only colour)."""
    icon, style = ("⚠ Problem: ", ERROR_STYLE) if error else ("ℹ ", INFO_STYLE)
    body = html.escape(str(text)).replace("\n", "<br>")
    return f'<div role="alert" style="{style}"><b>{icon}</b>{body}</div>'


def error_text(err: BaseException) -> str:
    """A readable one-paragraph message for any exception (the library's own say what to change)."""
    if isinstance(err, MagicEduError):
        return str(err)
    return f"something went wrong ({type(err).__name__}: {err})"


def guarded(method: Callable) -> Callable:
    """Run a widget action; any exception becomes a message in ``self.message``."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.message.value = ""
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a widget must never show a traceback
            self.message.value = message_html(error_text(err))
            return None
    return wrapper


def chip(text: str, style: str = CHIP, note: str = "") -> str:
    """One token as an inline box, its invisible characters made visible."""
    sup = f"<sup>{html.escape(note)}</sup>" if note else ""
    return f'<span style="{style}">{html.escape(analysis.token_label(text))}</span>{sup}'


def png_bytes(image: Image.Image, size: int = 160) -> bytes:
    """A PNG preview of an image, at most ``size`` pixels on its longer side (small ones scaled up)."""
    scale = size / max(image.size)
    preview = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                           Image.NEAREST if scale > 1 else Image.BILINEAR)
    buf = io.BytesIO()
    preview.save(buf, format="PNG")
    return buf.getvalue()


def _row(children: list[W.Widget]) -> W.HBox:
    """A row of widgets that wraps onto the next line on a narrow screen."""
    return W.HBox(children, layout=W.Layout(flex_flow="row wrap", align_items="flex-start", grid_gap="8px"))


def figure_png(fig: Figure) -> bytes:
    return plots.to_png(fig, dpi=PLOT_DPI)


def _number_list(text: str, name: str, cast: Callable[[str], Any]) -> list:
    """'0, 0.1, 0.5' -> [0.0, 0.1, 0.5]; a MagicEduError naming the field otherwise."""
    items = [t for t in text.replace(";", ",").replace(" ", ",").split(",") if t]
    if not items:
        raise MagicEduError(f"{name}: give at least one value, separated by commas (e.g. 0, 0.1, 0.5)")
    try:
        return list(dict.fromkeys(cast(t) for t in items))
    except ValueError:
        raise MagicEduError(f"{name}: {text!r} is not a list of numbers separated by commas") from None


def _checked_values(text: str, field: str, param: Param, vocab_size: int | None = None) -> list:
    """'0, 0.1, 0.5' -> [0.0, 0.1, 0.5], each value in ``param``'s range; a MagicEduError naming
    ``field`` and the range otherwise."""
    values = _number_list(text, field, param.kind)
    for value in values:
        try:
            param.check(value, vocab_size)
        except MagicEduError:
            raise MagicEduError(f"{field}: every {param.name} must be {_allowed(param, vocab_size)}; "
                                f"got {value:g}") from None
    return values


def _allowed(param: Param, vocab_size: int | None = None) -> str:
    """``param``'s range in words: 'between 0 and 1', 'a number >= 0', 'a number in (0, 1]'."""
    high = vocab_size if param.high == "vocab" else param.high
    if param.low is None:
        return "a finite number" if high is None else f"a number <= {high:g}"
    if param.low_open:
        return f"a number in ({param.low:g}, {high:g}]" if high is not None else f"a number > {param.low:g}"
    if high is None:
        return f"{'an integer' if param.kind is int else 'a number'} >= {param.low:g}"
    return f"between {param.low:g} and {high:g}"


def _prompt(text: str) -> str | None:
    return text if text.strip() else None


def _default_length(models: ModelSet) -> int:
    try:
        return int(models.settings(models.prompt)["max_new_tokens"])
    except (MagicEduError, KeyError):
        return int(models.defaults.get("max_new_tokens", 16))


def _length_slider(models: ModelSet) -> W.IntSlider:
    """The length (max_new_tokens) slider, set to the model set's length."""
    cap = max(1, models.lm.context_length - 1)
    return _slider(MAX_NEW_TOKENS, _default_length(models), "length", cap)


def _slider(param: Param, value: Any, description: str, cap: int | None = None) -> W.Widget:
    """A slider for ``param`` from its ``slider`` (min, max, step), widened to take ``value``
    (max at least twice the value, min at most the value) but never past the allowed range."""
    lo, hi, step = param.slider
    high = cap if param.high == "vocab" else param.high
    if high is None:
        high = cap
    hi = max(hi, 2 * value)
    if high is not None:
        hi = min(hi, high)
    lo = min(lo, value)
    style = {"description_width": "60px" if len(description) <= 8 else "initial"}
    if param.kind is int:
        return W.IntSlider(value=int(value), min=int(lo), max=int(hi), step=max(1, int(step)),
                           description=description, tooltip=param.help, continuous_update=False, style=style)
    return W.FloatSlider(value=float(value), min=float(lo), max=float(hi), step=float(step), description=description,
                         tooltip=param.help, continuous_update=False, style=style)


def control_key(decoder: Decoder, name: str) -> str:
    """The key of the control that sets ``decoder``'s parameter ``name``: the name itself, shared by
    every decoder that has it, except for a decoder that steers the LM (ZeroCap), whose settings
    are its own: there a name another decoder uses too (num_beams) gets ``"zerocap.num_beams"``."""
    if decoder.steers and any(name in d.param_names for d in DECODERS.values() if not d.steers):
        return f"{decoder.name}.{name}"
    return name


def _param_controls(models: ModelSet, main: str) -> dict[str, W.Widget]:
    """One control per parameter key (:func:`control_key`) of the registry's decoders: a slider
    where the registry gives one (sliders first), else a number box. It starts at the model set's
    preset value for parameters that take one, else at the default of ``main`` (the widget's first
    decoder), else at the first default the registry gives (a box without one starts at its
    lowest value: the seed at 0)."""
    params: dict[str, list[Param]] = {}
    for decoder in DECODERS.values():
        for param in decoder.params:
            params.setdefault(control_key(decoder, param.name), []).append(param)
    main_params = {control_key(DECODERS[main], p.name): p for p in DECODERS[main].params} if main in DECODERS else {}
    preset = models.defaults or {}
    sliders, boxes = {}, {}
    for key, ps in params.items():
        name = ps[0].name
        shown = next((p for p in ps if p.slider is not None), ps[0])
        if any(p.from_preset for p in ps) and preset.get(name) is not None:
            value = preset[name]
        elif key in main_params and main_params[key].default is not None:
            value = main_params[key].default
        else:
            value = next((p.default for p in ps if p.default is not None), shown.low or 0)
        description = LABELS.get(key, LABELS.get(name, name))
        if shown.slider is not None:
            sliders[key] = _slider(shown, value, description, cap=models.lm.vocab_size)
        else:
            box = W.IntText if shown.kind is int else W.FloatText
            boxes[key] = box(value=value, description=description, tooltip=shown.help,
                             style={"description_width": "60px" if len(description) <= 8 else "initial"},
                             layout=W.Layout(width="220px"))
    return {**sliders, **boxes}


def _expose(widget: W.Widget, controls: dict[str, W.Widget]) -> None:
    """``widget.k``, ``widget.alpha``, ``widget.zerocap_num_beams``, ...: each control as an attribute
    too (unless the name is taken)."""
    for key, control in controls.items():
        name = key.replace(".", "_")
        if not hasattr(widget, name):
            setattr(widget, name, control)


def _settings_column(controls: dict[str, W.Widget], length: W.Widget) -> list[W.Widget]:
    """The parameters' sliders, the length slider, then the parameters' number boxes."""
    sliders = [c for c in controls.values() if isinstance(c, (W.IntSlider, W.FloatSlider))]
    return [*sliders, length, *(c for c in controls.values() if c not in sliders)]


def _decoder_kwargs(decoder: Decoder, controls: dict[str, W.Widget], models: ModelSet, image: Any) -> dict[str, Any]:
    """``decoder``'s keyword arguments for :class:`Stepper`: each of its parameters from the control
    of that name (a parameter without one takes the preset's or the registry's default), and
    ``clip`` and ``image`` if it needs the image."""
    keys = {name: control_key(decoder, name) for name in decoder.param_names}
    kwargs: dict[str, Any] = {name: controls[key].value for name, key in keys.items() if key in controls}
    if decoder.needs_image:
        if image is None:
            raise MagicEduError(f"image: {decoder.label} needs an image; pick a toy scene or a sample photo, "
                                "or upload one")
        kwargs.update(clip=models.clip, image=image)
    return kwargs


def _enable(controls: dict[str, W.Widget], decoders: Sequence[Decoder]) -> None:
    """Enable a control iff one of ``decoders`` has a parameter of its key."""
    used = {control_key(d, name) for d in decoders for name in d.param_names}
    for name, control in controls.items():
        control.disabled = name not in used


def compared_decoders(steered: bool = False) -> list[str]:
    """The decoders :class:`CompareDecoders` always runs: every registry decoder that does not sample
    and, with ``steered``, those that steer the LM with gradient steps (ZeroCap: slow, left out
    unless asked for)."""
    return [d.name for d in DECODERS.values() if not d.samples and not d.retrieves and (steered or not d.steers)]


def stepping_options() -> list[tuple[str, str]]:
    """(label, name) of the decoders that write token by token: what StepThrough and Sweep offer (CLIP
    retrieval picks a whole caption: CompareDecoders shows it, given an index)."""
    return [(DECODERS[name].label, name) for name in stepping_decoders()]


def _stepping(name: str) -> str:
    decoder = get_decoder(name)
    if decoder.retrieves:
        raise MagicEduError(f"decoder: {decoder.label} takes no steps; CompareDecoders(models, image, index=...) "
                            "shows it beside the decoders")
    return decoder.name


def sampling_decoders() -> list[Decoder]:
    """The registry's sampling decoders (CompareDecoders runs one of them, chosen)."""
    return [d for d in DECODERS.values() if d.samples]


# -- the image picker ------------------------------------------------------------------------------
class ImagePicker(W.VBox):
    """Choose the image: a toy scene by seed (with "new scene"), a bundled sample photo, or an upload.

    ``picker.image`` is the current PIL image; ``picker.on_change(callback)`` calls
    ``callback()`` whenever it changes; ``picker.set_image(img)`` uses any image of your own.
    """

    def __init__(self, models: ModelSet | None = None, *, source: str | None = None, seed: int = HELD_OUT_SEED,
                 photo: str = "chelsea") -> None:
        toy = models is None or models.name.startswith("toy")
        photos = list(list_sample_photos())
        self.source = W.ToggleButtons(options=[("toy scene", "scene"), ("sample photo", "photo"),
                                               ("upload", "upload")], value=source or ("scene" if toy else "photo"),
                                      style={"button_width": "96px"})
        self.seed = W.IntText(value=seed, description="seed", layout=W.Layout(width="180px"))
        self.new_scene = W.Button(description="new scene", icon="refresh", tooltip="draw another random scene")
        self.photo = W.Dropdown(options=photos, value=photo if photo in photos else photos[0], description="photo")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.preview = W.Image(format="png", layout=W.Layout(width="160px", height="160px", object_fit="contain"))
        self.caption = W.HTML()
        self.message = W.HTML()
        self.image: Image.Image | None = None
        self.description = ""
        self._callbacks: list[Callable[[], Any]] = []
        self._rng = random.Random(seed)
        self._scene_box = W.HBox([self.seed, self.new_scene])
        super().__init__([self.source, self._scene_box, self.photo, self.upload, self.message,
                          W.HBox([self.preview, self.caption])])

        self.new_scene.on_click(lambda _: self._new_scene())
        self.seed.observe(lambda _: self._use("scene"), names="value")
        self.photo.observe(lambda _: self._use("photo"), names="value")
        self.upload.observe(lambda _: self._use("upload"), names="value")
        self.source.observe(lambda _: self._load(), names="value")
        self._load()

    def on_change(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` (no arguments) whenever the image changes."""
        self._callbacks.append(callback)

    def set_image(self, image: Any, description: str = "your image") -> None:
        """Use an image of your own (PIL image, path, array, bytes)."""
        self._set(load_user_image(image), description)

    def _new_scene(self) -> None:
        self.seed.value = self._rng.randrange(HELD_OUT_SEED, HELD_OUT_SEED + 1_000_000)  # triggers _load

    def _use(self, source: str) -> None:
        """A control of ``source`` changed: switch to that source (which loads), or load."""
        if self.source.value != source:
            self.source.value = source
        else:
            self._load()

    def _show_controls(self) -> None:
        for box, name in ((self._scene_box, "scene"), (self.photo, "photo"), (self.upload, "upload")):
            box.layout.display = None if self.source.value == name else "none"

    @guarded
    def _load(self) -> None:
        self._show_controls()
        source = self.source.value
        if source == "scene":
            scene = shapes.make_scene(int(self.seed.value))
            refs = "".join(f"<li>{html.escape(c)}</li>" for c in scene.captions[:3])
            self._set(scene.image, f"toy scene {self.seed.value}", f"<b>toy scene {self.seed.value}</b>"
                      f"<br>reference captions:<ul style='margin:0'>{refs}</ul>")
        elif source == "photo":
            self._set(load_sample_photo(self.photo.value), f"sample photo {self.photo.value!r}",
                      f"<b>{html.escape(self.photo.value)}</b>: {html.escape(list_sample_photos()[self.photo.value])}")
        elif not self.upload.value:
            self.message.value = message_html("choose an image file with the upload button", error=False)
        else:
            entry = self.upload.value[0]
            name = entry.get("name", "upload") if isinstance(entry, dict) else "upload"
            self._set(load_user_image(self.upload.value, name=f"upload {name!r}"), f"upload {name!r}",
                      f"<b>your image</b>: {html.escape(name)}")

    def _set(self, image: Image.Image, description: str, caption: str | None = None) -> None:
        self.image, self.description = image, description
        self.preview.value = png_bytes(image)
        self.caption.value = caption if caption is not None else f"<b>{html.escape(description)}</b>"
        for callback in self._callbacks:
            callback()


# -- step through one decode -------------------------------------------------------------------------
# the candidate table's columns: header -> (width, alignment)
CELLS = {"rank": ("3em", "right"), "token": ("9em", "left"), "p(v|x)": ("5em", "right"), "penalty": ("5em", "right"),
         "CLIP": ("5em", "right"), "score": ("5.5em", "right"), "": ("6em", "left")}
SAMPLING_CELLS = {"rank": ("3em", "right"), "token": ("9em", "left"), "p(v|x)": ("5em", "right"),
                  "filtered p": ("6em", "right"), "": ("6em", "left")}  # filtered p: what the draw uses
BEAM_CELLS = {"rank": ("3em", "right"), "beam + token": ("11em", "left"), "p(v|beam)": ("5.5em", "right"),
              "Σ log p": ("5.5em", "right"), "finished": ("5.5em", "right"), "": ("7em", "left")}
# ZeroCap: p0 (no steering), p after the gradient steps, CLIP's target, the fused q
ZEROCAP_CELLS = {"rank": ("3em", "right"), "beam + token": ("11em", "left"), "p0": ("5em", "right"),
                 "p steered": ("5.5em", "right"), "CLIP target": ("6em", "right"), "q": ("5em", "right"),
                 "": ("7em", "left")}


def _cells(values: Sequence[str], bold: bool = False, background: str = "", columns: dict | None = None) -> str:
    spans = "".join(f'<span style="display:inline-block;width:{width};text-align:{align};padding-right:6px">{v}</span>'
                    for (width, align), v in zip((columns or CELLS).values(), values))
    style = f"font-family:monospace;white-space:pre;{'font-weight:bold;' if bold else ''}"
    style += f"background:{background};" if background else ""
    return f'<div style="{style}">{spans}</div>'


class CandidateRow(W.HBox):
    """One candidate of the shown step: a force button and its numbers."""

    def __init__(self, index: int, on_force: Callable[[int], None]) -> None:
        self.index = index
        self.force = W.Button(description="force", tooltip="take this token instead and go on from there",
                              layout=W.Layout(width="64px", height="24px"))
        self.cells = W.HTML()
        self.force.on_click(lambda _: on_force(self.index))
        super().__init__([self.force, self.cells])


class StepThrough(W.VBox):
    """Step through one decode: the text so far, the candidates of a step and the parts of their
    score; Next / Back / Reset / Run to end; force any candidate to ask "what if?".

    Changing a setting (decoder, k, alpha, beta, length, prompt, image) decodes again with the
    new settings up to the same step.

    For contrastive and MAGIC search, under the table: for which alpha and beta the token taken
    holds and which other candidate another setting would make win (from the trace, no model
    work); **decision map** draws the step's map (:func:`~magic_edu.views.plots.plot_decision_map`)
    while it is on; for MAGIC, **what in the image?** draws the occlusion map of the token taken
    against the candidate picked in **compare with** (one CLIP image per covered square).
    """

    def __init__(self, models: ModelSet, image: Any = None, *, decoder: str = "magic", plot: bool = True) -> None:
        decoder = get_decoder(decoder).name
        self.models = models
        self.picker = ImagePicker(models)
        if image is not None:
            self.picker.set_image(image)
        self.controls = _param_controls(models, decoder)  # one per registry parameter: k, alpha, beta, p, seed, ...
        self.length = _length_slider(models)
        style = {"description_width": "60px"}
        self.decoder = W.Dropdown(options=stepping_options(), value=_stepping(decoder), description="decoder",
                                  style=style)
        self.prompt = W.Text(value=models.prompt or "", description="prompt", placeholder="(none)",
                             continuous_update=False, style=style)
        self.next_button = W.Button(description="Next", icon="step-forward", button_style="primary")
        self.back_button = W.Button(description="Back", icon="step-backward")
        self.reset_button = W.Button(description="Reset", icon="undo")
        self.run_button = W.Button(description="Run to end", icon="fast-forward")
        self.view = W.IntSlider(value=0, min=0, max=0, description="show step", continuous_update=True,
                                style={"description_width": "initial"})
        self.html_path = W.Text(value="decode.html", description="save as", style={"description_width": "initial"},
                                layout=W.Layout(width="260px"),
                                tooltip="a self-contained HTML page of this decode: opens in any browser, offline")
        self.html_button = W.Button(description="Save HTML", icon="download",
                                    tooltip="write the decode so far (steps, candidates, image) as one HTML file")
        self.message = W.HTML()
        self.text_view = W.HTML()
        self.table_title = W.HTML()
        self.header = W.HTML(_cells(list(CELLS), bold=True))
        self.rows: list[CandidateRow] = []
        self.table = W.VBox([self.table_title, W.HBox([W.HTML(layout=W.Layout(width="64px")), self.header])])
        self.plot = W.Image(format="png", layout=W.Layout(max_width="640px"))
        self.show_plot = plot
        self.explain_text = W.HTML()
        self.map_toggle = W.ToggleButton(value=False, description="decision map", icon="map",
                                         tooltip="which token wins at every (alpha, beta) of the shown step")
        self.compare_with = W.Dropdown(options=[], description="compare with", style={"description_width": "initial"},
                                       tooltip="the candidate whose CLIP text the occlusion map compares with")
        self.occlusion_button = W.Button(description="what in the image?", icon="eye",
                                         tooltip="cover the image one square at a time: what makes CLIP prefer the "
                                                 "token taken over the candidate picked")
        self.map_plot = W.Image(format="png", layout=W.Layout(max_width="640px"))
        self.occlusion_plot = W.Image(format="png", layout=W.Layout(max_width="640px"))
        self._occlusion_box = W.HBox([self.compare_with, self.occlusion_button])
        self.explain_box = W.VBox([self.explain_text, _row([self.map_toggle, self._occlusion_box]),
                                   _row([self.map_plot, self.occlusion_plot])])
        self._map_cache: dict[int, tuple[StepRecord, bytes]] = {}  # id(record) -> (record, its decision map)
        self._occluded: StepRecord | None = None  # the step the occlusion map shows
        self.stepper: Stepper | None = None
        self._view: int | None = None  # the step shown; None = the latest
        self._reached = (False, 0)  # (had ended, steps taken) of the last decode: a new one goes as far
        self._plotted: StepRecord | None = None
        self._png_cache: dict[int, tuple[StepRecord, bytes]] = {}  # id(record) -> (record, its plot)
        self._syncing = False

        _expose(self, self.controls)
        settings = W.VBox([self.decoder, self.prompt, *_settings_column(self.controls, self.length)])
        buttons = _row([self.next_button, self.back_button, self.reset_button, self.run_button, self.view,
                        self.html_path, self.html_button])
        body = _row([self.table, self.plot] if plot else [self.table])
        super().__init__([_row([self.picker, settings]), buttons, self.message, self.text_view, body,
                          self.explain_box])

        self.next_button.on_click(lambda _: self.next())
        self.back_button.on_click(lambda _: self.back())
        self.reset_button.on_click(lambda _: self.reset())
        self.run_button.on_click(lambda _: self.run_to_end())
        self.html_button.on_click(lambda _: self.save_html())
        for control in (self.decoder, self.prompt, self.length, *self.controls.values()):
            control.observe(lambda _: self.restart(), names="value")
        self.view.observe(self._view_changed, names="value")
        self.map_toggle.observe(lambda _: self._toggle_map(), names="value")
        self.occlusion_button.on_click(lambda _: self.show_occlusion())
        self.picker.on_change(self.restart)
        self.restart()

    # -- actions (each shows its own errors) --------------------------------------------------
    @guarded
    def next(self) -> None:
        """Take one step (at the end of the decode, say so)."""
        if self._need_stepper().done:
            self.message.value = message_html("the decode has ended: press Back or Reset, or force another "
                                              "candidate of a step to see where it leads", error=False)
            return
        self.stepper.step()
        self._show_latest()

    @guarded
    def back(self) -> None:
        """Undo the last step."""
        self._need_stepper().back()
        self._show_latest()

    @guarded
    def reset(self) -> None:
        """Back to before the first step."""
        self._need_stepper().reset()
        self._show_latest()

    @guarded
    def run_to_end(self) -> None:
        """Step until the decode ends (EOS or the length)."""
        self._need_stepper().run()
        self._show_latest()

    @guarded
    def save_html(self, path: str | None = None) -> None:
        """Write the decode so far as one self-contained HTML page (:func:`magic_edu.views.export.export_html`)
        at ``path`` (default: the **save as** box), the image included."""
        from .export import export_html

        if self.trace is None or not self.trace.steps:
            raise MagicEduError("save as HTML: take a first step (Next) to have a decode to save")
        target = (path if path is not None else self.html_path.value).strip()
        if not target:
            raise MagicEduError("save as: give a file name, e.g. decode.html")
        image = self.picker.image if self.stepper.spec.needs_image else None
        try:
            written = export_html(self.trace, target, image=image)
        except OSError as err:
            raise MagicEduError(f"save as {target}: cannot write it ({err.strerror or err})") from None
        size = written.stat().st_size / 1024
        self.message.value = message_html(f"wrote {html.escape(str(written))} ({size:.0f} KB): open it in any browser, "
                                          "no kernel needed", error=False)

    def _show_latest(self) -> None:
        """Show the last step taken (not an earlier one picked in the history)."""
        self._view = None
        self._render()

    @guarded
    def force(self, index: int) -> None:
        """Take the shown step's candidate ``index`` (0 = most probable) instead of the decoder's
        choice, and go on from there: as far as the decode had gone (to the end if it had ended)."""
        stepper, record = self._need_stepper(), self.shown_record()
        if stepper.spec.beams or stepper.spec.steers:
            raise MagicEduError(NO_FORCING_BEAMS if stepper.spec.beams else NO_FORCING_ZEROCAP)
        if record is None:
            raise MagicEduError("force: take a first step (Next) to see candidates to force")
        if not 0 <= index < record.k:
            raise MagicEduError(f"force: candidate index must be between 0 and {record.k - 1}; got {index}")
        token, was_done, reached = record.token_ids[index], stepper.done, stepper.step_index
        while stepper.step_index > record.step:
            stepper.back()
        stepper.step(force=token)
        while not stepper.done and (was_done or stepper.step_index < reached):
            stepper.step()
        self._view = record.step
        self._render()

    @guarded
    def restart(self) -> None:
        """A new decode with the current settings, taken as far as the previous one had gone.

        While the settings are not valid there is no decode (the buttons are off and Next says
        so), so what is shown always matches the controls, never an older decode."""
        self._enable_controls()
        if self.stepper is not None:
            self._reached = (self.stepper.done, self.stepper.step_index)
        self.stepper, self._view = None, None
        self._show_no_decode()
        stepper = self._new_stepper()
        done, reached = self._reached
        while not stepper.done and (done or stepper.step_index < reached):
            stepper.step()
        self.stepper = stepper
        self._render()

    def _show_no_decode(self) -> None:
        for button in (self.next_button, self.back_button, self.reset_button, self.run_button):
            button.disabled = True
        self.text_view.value = "<i>(no decode: the settings above need fixing)</i>"

    def _new_stepper(self) -> Stepper:
        decoder = get_decoder(self.decoder.value)
        return Stepper(self.models.lm, decoder.name, prompt=_prompt(self.prompt.value),
                       max_new_tokens=self.length.value,
                       **_decoder_kwargs(decoder, self.controls, self.models, self.picker.image))

    def _need_stepper(self) -> Stepper:
        if self.stepper is None:
            raise MagicEduError("no decode yet: fix the settings shown above first")
        return self.stepper

    def _enable_controls(self) -> None:
        """A parameter's control is enabled iff the chosen decoder has that parameter."""
        _enable(self.controls, [get_decoder(self.decoder.value)])

    @guarded
    def _view_changed(self, change: dict) -> None:
        if not self._syncing:
            self._view = int(change["new"])
            self._render()

    # -- what is shown ---------------------------------------------------------------------------
    @property
    def trace(self) -> Trace | None:
        """The trace of the decode shown (None before the first decode could start)."""
        return self.stepper.traces[0] if self.stepper is not None else None

    def shown_record(self) -> StepRecord | None:
        """The step whose candidates are shown (the latest, unless another is picked)."""
        trace = self.trace
        if trace is None or not trace.steps:
            return None
        index = len(trace.steps) - 1 if self._view is None else min(self._view, len(trace.steps) - 1)
        return trace.steps[index]

    def candidate_frame(self) -> pd.DataFrame:
        """The shown step's candidates as a DataFrame (the rows of the table)."""
        record = self.shown_record()
        if record is None:
            return pd.DataFrame()
        frame = self.trace.to_frame()
        return frame[frame["step"] == record.step].reset_index(drop=True)

    def _render(self) -> None:
        stepper, trace = self.stepper, self.trace
        n = len(trace.steps)
        self.next_button.disabled = stepper.done
        self.back_button.disabled = self.reset_button.disabled = n == 0
        self.run_button.disabled = stepper.done
        record = self.shown_record()
        self._syncing = True
        try:
            self.view.max = max(n - 1, 0)
            self.view.value = record.step if record is not None else 0
            self.view.disabled = n < 2
        finally:
            self._syncing = False
        self.text_view.value = self._text_html()
        self._render_table(record)
        self._render_explanation(record)
        if self.show_plot:
            self._render_plot(record)

    def _text_html(self) -> str:
        stepper, trace = self.stepper, self.trace
        prefix = "".join(chip(t, PREFIX) for t in trace.prefix_tokens)
        if stepper.spec.beams or stepper.spec.steers:
            return self._beams_html(prefix)
        tokens = []
        for i, s in enumerate(trace.steps):
            newest = i == len(trace.steps) - 1
            style, note = (NEWEST, "◀ newest") if newest else (CHIP, "")
            if s.forced:
                style, note = (NEWEST + ";border-style:dashed" if newest else FORCED), note + " forced"
            tokens.append(chip(s.chosen_token, style, note.strip()))
        n = len(trace.steps)
        if n == 0:
            status = "No step yet: press <b>Next</b>."
        elif stepper.done:
            status = f"Ended after {n} tokens" + (" (end-of-text token)." if
                                                   trace.steps[-1].chosen_token_id == self.models.lm.eos_token_id
                                                   else " (the length limit).")
        else:
            status = f"{n} of at most {stepper.max_new_tokens} tokens."
        output = html.escape(stepper.text()) or "<i>(empty)</i>"
        return (f"<div style='line-height:1.9'>{prefix} {''.join(tokens)}</div>"
                f"<div><b>Output:</b> “{output}” &nbsp; <span style='color:#555'>{status}</span></div>")

    def _beams_html(self, prefix: str) -> str:
        """Beam search and ZeroCap: the best beam's tokens (beam search: the result once the search
        has stopped), then every beam and every finished hypothesis with its score."""
        stepper, lm = self.stepper, self.models.lm
        tokens = "".join(chip(t) for t in lm.token_texts(stepper.token_ids()))
        result, summed = ("the best beam by Σ log q / length", "Σ log q") if stepper.spec.steers else \
            ("the best finished hypothesis", "Σ log p")
        if not stepper.step_index:
            status = "No step yet: press <b>Next</b>."
        elif stepper.done:
            status = f"The search stopped after {stepper.step_index} steps; the result is {result}."
        else:
            status = f"{stepper.step_index} of at most {stepper.max_new_tokens} steps; shown: the best beam."
        lines = [f"beam {j}: “{html.escape(lm.output_text(ids))}” &nbsp; {summed} = {log_p:.3f}"
                 for j, (ids, log_p) in enumerate(stepper.beams())]
        lines += [f"finished: “{html.escape(lm.output_text(ids))}” &nbsp; score = {score:.3f}"
                  for ids, score in stepper.hypotheses()]
        listed = "".join(f"<li>{line}</li>" for line in lines)
        output = html.escape(stepper.text()) or "<i>(empty)</i>"
        return (f"<div style='line-height:1.9'>{prefix} {tokens}</div>"
                f"<div><b>Output:</b> “{output}” &nbsp; <span style='color:#555'>{status}</span></div>"
                f"<ul style='margin:2px 0'>{listed}</ul>")

    def _shown_rows(self, record: StepRecord | None, columns, waiting: str, title) -> list:
        """Set the table's header and title (``waiting`` before the first step, ``title(record)``
        after), make enough candidate rows, hide the others; the (index, row) pairs to fill."""
        self.header.value = _cells(list(columns), bold=True, columns=columns)
        self.table_title.value = waiting if record is None else title(record)
        k = record.k if record is not None else 0
        while len(self.rows) < k:
            row = CandidateRow(len(self.rows), self.force)
            self.rows.append(row)
            self.table.children = self.table.children + (row,)
        for i, row in enumerate(self.rows):
            row.layout.display = None if i < k else "none"
        return list(enumerate(self.rows[:k]))

    def _render_table(self, record: StepRecord | None) -> None:
        if self.stepper is not None and self.stepper.spec.beams:
            self._render_beam_table(record)
            return
        if self.stepper is not None and self.stepper.spec.steers:
            self._render_zerocap_table(record)
            return
        samples = self.stepper is not None and self.stepper.spec.samples
        for i, row in self._shown_rows(
                record, SAMPLING_CELLS if samples else CELLS, "<i>The candidates of each step appear here.</i>",
                lambda r: (f"<b>Step {r.step}</b>: the {self.trace.settings.get('decoder')} decoder's candidates after "
                           f"“{html.escape(r.text)}”. <b>force</b> takes one instead and goes on.")):
            chosen = i == record.chosen
            note = ("▶ forced" if record.forced else "▶ chosen") if chosen else ""
            token = html.escape(analysis.token_label(record.tokens[i]))
            if samples:
                values = [f"#{i + 1}", token, _fmt(record.lm_prob[i]), _fmt(record.sample_prob[i]), note]
            else:
                values = [f"#{i + 1}", token, _fmt(record.lm_prob[i]), _fmt(record.degeneration_penalty[i]),
                          _fmt(record.clip_score[i]), _fmt(record.score[i]), note]
            row.cells.value = _cells(values, bold=chosen, background="#FBF3B5" if chosen else "",
                                     columns=SAMPLING_CELLS if samples else CELLS)
            row.force.disabled = chosen
            row.force.description = "taken" if chosen else "force"

    def _render_beam_table(self, record: StepRecord | None) -> None:
        """Beam search's candidates: the 2 x num_beams best continuations of all beams, the beam each
        extends, and what became of it (the next beam j, a finished hypothesis, or dropped). Forcing
        is not meaningful for beams: the force buttons are off."""
        for i, row in self._shown_rows(
                record, BEAM_CELLS, "<i>Every beam's best continuations appear here, step by step.</i>",
                lambda r: (f"<b>Step {r.step}</b>: the {r.k} best continuations of all beams (summed "
                           "log-probabilities, best first), and what became of each. Beam search advances "
                           "every beam at once: there is nothing to force.")):
            beam, finished = record.next_beam[i], record.hypothesis_score[i]
            fate = f"→ beam {beam}" if beam >= 0 else "finished" if not math.isnan(finished) else "dropped"
            token = f"beam {record.beam[i]} + {html.escape(analysis.token_label(record.tokens[i]))}"
            row.cells.value = _cells([f"#{i + 1}", token, _fmt(record.lm_prob[i]), _fmt(record.score[i]),
                                      _fmt(finished), fate], bold=beam == 0,
                                     background="#FBF3B5" if beam == 0 else "", columns=BEAM_CELLS)
            row.force.disabled = True
            row.force.description = "–"

    def _render_zerocap_table(self, record: StepRecord | None) -> None:
        """ZeroCap's candidates: every live beam's best tokens by q, with p0 (the LM alone), p after
        the gradient steps, CLIP's target and q, and what became of each. Nothing to force."""
        for i, row in self._shown_rows(
                record, ZEROCAP_CELLS, "<i>Every beam's best tokens by the fused q appear here, step by step.</i>",
                lambda r: (f"<b>Step {r.step}</b>: each beam's best tokens by q. The gradient steps move p0 to "
                           "p, towards CLIP's target; q fuses p (special tokens adjusted) with p0. The beams "
                           "advance at once: there is nothing to force.")):
            beam = record.next_beam[i]
            token = f"beam {record.beam[i]} + {html.escape(analysis.token_label(record.tokens[i]))}"
            values = [f"#{i + 1}", token, *(_fmt(getattr(record, name)[i]) for name in
                                            ("lm_prob", "steered_prob", "clip_score", "fused_prob")),
                      f"→ beam {beam}" if beam >= 0 else "dropped"]
            row.cells.value = _cells(values, bold=beam == 0, background="#FBF3B5" if beam == 0 else "",
                                     columns=ZEROCAP_CELLS)
            row.force.disabled = True
            row.force.description = "–"

    def _explains(self) -> bool:
        """Whether the decode shown scores candidates (contrastive, MAGIC): then the flip points show."""
        return self.stepper is not None and self.stepper.spec.scores_candidates

    def _render_explanation(self, record: StepRecord | None) -> None:
        """The lines on what other setting would change the shown step's choice, the candidates to
        compare with in an occlusion map, and the decision map if it is on; the occlusion map of
        another step is cleared. Nothing but arithmetic on the record: no model work."""
        explains = self._explains()
        self.explain_box.layout.display = None if explains else "none"
        self._occlusion_box.layout.display = None if explains and self.stepper.spec.needs_image else "none"
        if self._occluded is not record:
            self.occlusion_plot.value, self._occluded = b"", None
        if not explains or record is None:
            self.explain_text.value, self.compare_with.options, self.map_plot.value = "", [], b""
            return
        lines = explain.flip_sentences(self.trace, record.step)
        self.explain_text.value = ("<b>What would change this choice</b> (from the scores alone):<ul style='margin:0'>"
                                   + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
        others = [i for i in range(record.k) if i != record.chosen]
        self.compare_with.options = [(f"#{i + 1} {analysis.token_label(record.tokens[i])}", i) for i in others]
        if others:
            self.compare_with.value = max(others, key=lambda i: record.score[i])  # the runner-up
        self._render_map(record)

    @guarded
    def _toggle_map(self) -> None:
        self._render_map(self.shown_record())

    def _render_map(self, record: StepRecord | None) -> None:
        """The shown step's decision map while the toggle is on (drawn once per record: a small cache)."""
        if not (self.map_toggle.value and self._explains() and record is not None):
            self.map_plot.value = b""
            return
        cached = self._map_cache.get(id(record))
        if cached is None or cached[0] is not record:
            cached = (record, figure_png(plots.plot_decision_map(self.trace, record.step)))
            self._map_cache[id(record)] = cached
            if len(self._map_cache) > PNG_CACHE:
                self._map_cache.pop(next(iter(self._map_cache)))
        self.map_plot.value = cached[1]

    @guarded
    def show_occlusion(self) -> None:
        """Draw the occlusion map of the shown MAGIC step: the token taken against the candidate in
        **compare with** (a message shows while CLIP runs)."""
        record = self.shown_record()
        if not (self._explains() and self.stepper.spec.needs_image):
            raise MagicEduError("what in the image?: only MAGIC search looks at the image; pick it as the decoder")
        if record is None or self.compare_with.value is None:
            raise MagicEduError("what in the image?: take a first step (Next), then pick a candidate to compare with")
        self.message.value = message_html("covering the image one square at a time and asking CLIP each time "
                                          "(one image per square) …", error=False)
        occlusion = explain.step_occlusion(self.trace, record.step, self.models.clip, self.picker.image,
                                           a=record.chosen, b=self.compare_with.value)
        self.occlusion_plot.value, self._occluded = figure_png(plots.plot_occlusion(occlusion)), record
        self.message.value = ""

    def _render_plot(self, record: StepRecord | None) -> None:
        """Draw the shown step, unless it is already drawn; records drawn before (Back, the step
        slider) come from a small cache, keyed by the record object itself."""
        if record is self._plotted:
            return
        self._plotted = record
        if record is None:
            self.plot.value = b""
            return
        cached = self._png_cache.get(id(record))
        if cached is None or cached[0] is not record:
            draw = plots.plot_beams if analysis.is_beam_trace(self.trace) else plots.plot_step
            cached = (record, figure_png(draw(self.trace, record.step)))
            self._png_cache[id(record)] = cached
            if len(self._png_cache) > PNG_CACHE:
                self._png_cache.pop(next(iter(self._png_cache)))
        self.plot.value = cached[1]

    # -- for static pages ------------------------------------------------------------------------
    def snapshot(self) -> Figure:
        """A static Figure of the current view: the image, the text so far and the shown step."""
        record = self.shown_record()
        decoder = get_decoder(self.decoder.value)
        image = self.picker.image if decoder.needs_image else None
        size = (11.0, 1.6 + 0.3 * (min(record.k, 20) if record else 4))
        if record is not None and analysis.is_beam_trace(self.trace):  # the tree: a column per step
            size = (min(max(11.0, 4.0 + 0.8 * (record.step + 2)), 24.0), 2.4 + 0.45 * record.k)
        fig = Figure(figsize=size, layout="constrained")
        left, right = fig.subfigures(1, 2, width_ratios=[1, 3])
        ax_img = left.subplots()
        ax_img.set_axis_off()
        if image is not None:
            ax_img.imshow(image)
            ax_img.set_title(self.picker.description, fontsize=8)
        else:
            ax_img.text(0.5, 0.5, f"({decoder.label} does not\nlook at the image)", ha="center", va="center",
                        fontsize=8)
        ax = right.subplots()
        if record is not None:
            draw = plots.plot_beams if analysis.is_beam_trace(self.trace) else plots.plot_step
            draw(self.trace, record.step, ax=ax)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no step taken yet", ha="center", va="center")
        trace = self.trace
        tokens = [analysis.token_label(trace.steps[t].tokens[i]) for t, i in analysis.output_path(trace)]
        if tokens:
            tokens[-1] = f"[{tokens[-1]}]"
        fig.suptitle("text so far: " + (" ".join(tokens) or "(none)") + "   ([ ] = newest token)", fontsize=9)
        return fig


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


# -- decoders side by side -----------------------------------------------------------------------------
class CompareDecoders(W.VBox):
    """Every decoder of the registry that does not sample (greedy, beam, contrastive, MAGIC) and
    one sampling decoder (chosen) on the same image (and prompt): their outputs, where their paths
    split, and per output its LM log-likelihood, the CLIP score (cosine) of the whole caption
    and its repeated n-grams. (Beam search's output is its best finished hypothesis.)

    ``divergence`` is the step where the decoders that do not sample stop agreeing (the sampler
    is left out: it is random); ``leaves[name]`` is the step where a decoder leaves greedy's path.
    The decoders share one control per parameter: contrastive search uses MAGIC's k and alpha,
    so the two differ only by CLIP (beta).

    ZeroCap is left out unless ``zerocap=True``: it takes gradient steps at every token, seconds
    where the others take milliseconds. It then shares beam search's num_beams control.

    CLIP retrieval, the paper's baseline, joins the table with ``index=`` (an index of captions,
    :func:`magic_edu.retrieval.build_text_index`, or the path of one): the caption of the index
    CLIP scores highest, its LM log-likelihood and CLIP score beside the decoders'. It writes no
    tokens, so it has no lane in the plot and no part in where the paths split. Without an index
    the widget says how to add it; an index that does not fit (built with another CLIP) is a
    message, and the decoders are compared all the same.
    """

    def __init__(self, models: ModelSet, image: Any = None, *, sampler: str = "top_k", seed: int = 0,
                 zerocap: bool = False, index: Any = None) -> None:
        samplers = sampling_decoders()
        chosen = get_decoder(sampler)
        if not chosen.samples:
            raise MagicEduError(f"sampler must be one of {', '.join(d.name for d in samplers)}; got {sampler!r}")
        if not isinstance(zerocap, bool):
            raise MagicEduError(f"zerocap must be True or False; got {zerocap!r}")
        self.models, self.zerocap, self.index = models, zerocap, index
        self.picker = ImagePicker(models)
        if image is not None:
            self.picker.set_image(image)
        self.controls = _param_controls(models, "magic")  # one per registry parameter, shared by the decoders
        if "seed" in self.controls:
            self.controls["seed"].value = seed
        self.length = _length_slider(models)
        style = {"description_width": "60px"}
        self.prompt = W.Text(value=models.prompt or "", description="prompt", placeholder="(none)",
                             continuous_update=False, style=style)
        self.sampler = W.Dropdown(options=[(d.label, d.name) for d in samplers], value=chosen.name,
                                  description="sampling", style=style)
        self.compare_button = W.Button(description="Compare", icon="play", button_style="primary")
        self.message = W.HTML()
        self.summary = W.HTML()
        self.note = W.HTML(message_html(NO_INDEX, error=False) if index is None else "")
        self.table = W.HTML()
        self.plot = W.Image(format="png", layout=W.Layout(max_width="900px"))
        self.generations: dict[str, Generation] = {}
        self.frame = pd.DataFrame()
        self.divergence: int | None = None
        self.leaves: dict[str, int | None] = {}

        _expose(self, self.controls)
        settings = W.VBox([self.prompt, self.sampler, *_settings_column(self.controls, self.length),
                           self.compare_button])
        super().__init__([_row([self.picker, settings]), self.message, self.summary, self.note, self.table,
                          self.plot])
        self.compare_button.on_click(lambda _: self.compare())
        for control in (self.prompt, self.length, self.sampler, *self.controls.values()):
            control.observe(lambda _: self.compare(), names="value")
        self.picker.on_change(self.compare)
        self.compare()

    @property
    def names(self) -> list[str]:
        """The decoders compared: every registry decoder that does not sample, then the sampler chosen."""
        return [*compared_decoders(self.zerocap), self.sampler.value]

    @guarded
    def compare(self) -> None:
        """Decode with every decoder and show the results."""
        models, image, prompt = self.models, self.picker.image, _prompt(self.prompt.value)
        decoders = [get_decoder(name) for name in self.names]
        _enable(self.controls, decoders)
        if image is None:
            raise MagicEduError("image: pick a toy scene or a sample photo, or upload one")
        gens = {d.name: Stepper(models.lm, d.name, prompt=prompt, max_new_tokens=self.length.value,
                                **_decoder_kwargs(d, self.controls, models, image)).run()[0] for d in decoders}
        problem = None
        if self.index is not None:
            try:
                gens[RETRIEVAL] = clip_retrieval_search(models.lm, models.clip, image, index=self._index())
            except MagicEduError as err:
                problem = f"CLIP retrieval is left out: {err}"
        self.generations = gens
        compared = compared_decoders(self.zerocap)
        self.divergence = analysis.divergence_step([gens[name].token_ids for name in compared])
        self.leaves = {name: analysis.divergence_step([gens[REFERENCE].token_ids, g.token_ids])
                       for name, g in gens.items() if name not in (REFERENCE, RETRIEVAL)}
        self.frame = compare_frame(models, image, gens, prompt)
        self._render()
        if problem:
            self.message.value = message_html(problem)

    def _index(self) -> Any:
        """The index, loaded once (a path is read the first time)."""
        from ..retrieval import as_index

        if not isinstance(self.index, ClipIndex):
            self.index = as_index(self.index, "text")
        return self.index

    def _lanes(self) -> dict[str, Generation]:
        """The decoders that wrote their text token by token (the plot's lanes: not CLIP retrieval)."""
        return {name: g for name, g in self.generations.items() if name != RETRIEVAL}

    def _render(self) -> None:
        split, gens = self.divergence, self.generations
        compared = compared_decoders(self.zerocap)
        three = ", ".join(compared)
        if split is None:
            summary = f"{three} wrote the same tokens."
        else:
            lm = self.models.lm
            took = ", ".join(f"{name} took “{html.escape(analysis.token_label(lm.token_text(g.token_ids[split])))}”"
                             if split < len(g.token_ids) else f"{name} had ended"
                             for name, g in gens.items() if name in compared)
            summary = f"{three} split at step {split}: {took}."
        sampler, leaves = get_decoder(self.sampler.value).label, self.leaves.get(self.sampler.value)
        summary += (f" {sampler} follows the {REFERENCE} path all the way." if leaves is None
                    else f" {sampler} leaves the {REFERENCE} path at step {leaves}.")
        self.summary.value = message_html(summary, error=False)
        rows = []
        for (name, gen), (_, r) in zip(gens.items(), self.frame.iterrows()):
            mark = split if name == REFERENCE else None if name == RETRIEVAL else self.leaves[name]
            note = "split" if name == REFERENCE else f"leaves {REFERENCE}"
            chips = "".join(chip(token, SPLIT if i == mark else CHIP, note if i == mark else "")
                            for i, token in enumerate(self.models.lm.token_texts(gen.token_ids)))
            repeats = html.escape(r["repeated"]) or "none"
            rows.append(f"<tr><td><b>{name}</b></td><td>“{html.escape(gen.text)}”<br>{chips}</td>"
                        f"<td>{r['log_likelihood']:.2f}<br><small>{r['log_likelihood_per_token']:.2f} per token</small>"
                        f"</td><td>{r['clip_cosine']:.3f}</td><td>{repeats}</td></tr>")
        self.table.value = ("<table style='border-collapse:collapse' border='1' cellpadding='4'><tr><th>decoder</th>"
                            f"<th>output (tokens; where it leaves the {REFERENCE} path marked)</th>"
                            "<th>LM log-likelihood</th>"
                            "<th>CLIP cos(image, caption)</th><th>repeated n-grams</th></tr>" + "".join(rows)
                            + "</table>")
        lanes = self._lanes()
        self.plot.value = figure_png(plots.plot_decoders([g.trace for g in lanes.values()], list(lanes), split=split))

    def snapshot(self) -> Figure:
        """A static Figure: the image, the decoders' paths with the split, and the table of figures."""
        if not self.generations:
            fig = Figure(figsize=(6, 1))
            fig.text(0.5, 0.5, "nothing compared yet", ha="center")
            return fig
        n = len(self.generations)
        width = max(len(g.trace.steps) for g in self.generations.values())
        fig = Figure(figsize=(min(5 + 0.62 * width, 20.0), 2.6 + 0.95 * n), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.9 + 0.8 * n, 0.4 + 0.3 * n])
        left, right = top.subfigures(1, 2, width_ratios=[1, 4])
        ax_img = left.subplots()
        ax_img.imshow(self.picker.image)
        ax_img.set_axis_off()
        ax_img.set_title(self.picker.description, fontsize=8)
        lanes = self._lanes()
        plots.plot_decoders([g.trace for g in lanes.values()], list(lanes), split=self.divergence, fig=right)
        ax = bottom.subplots()
        ax.set_axis_off()
        cells = [[f"“{r['text'][:60]}”", f"{r['log_likelihood']:.2f}", f"{r['log_likelihood_per_token']:.2f}",
                  f"{r['clip_cosine']:.3f}", r["repeated"][:40] or "none"] for _, r in self.frame.iterrows()]
        table = ax.table(cellText=cells, rowLabels=list(self.frame["decoder"]),
                         colLabels=["output", "LM log-lik.", "per token", "CLIP cos", "repeated n-grams"],
                         loc="center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        return fig


def compare_frame(models: ModelSet, image: Any, generations: dict[str, Generation],
                  prompt: str | None = None) -> pd.DataFrame:
    """One row per decoder: its text, token count, LM log-likelihood (total and per token),
    CLIP cosine of the whole text with the image, and its repeated 2- and 3-grams."""
    texts = [g.text for g in generations.values()]
    cosines = analysis.caption_clip_score(models.clip, image, texts)
    rows = []
    for (name, gen), cos in zip(generations.items(), cosines):
        ll = analysis.lm_log_likelihood(models.lm, gen.token_ids, prompt)
        repeated = {**analysis.repeated_ngrams(gen.text, 2), **analysis.repeated_ngrams(gen.text, 3)}
        rows.append({"decoder": name, "text": gen.text, "tokens": len(gen.token_ids), "log_likelihood": ll,
                         "log_likelihood_per_token": ll / max(len(gen.token_ids), 1), "clip_cosine": float(cos),
                         "repeated_2grams": sum(c - 1 for g, c in repeated.items() if g.count(" ") == 1),
                         "repeated": "; ".join(f"“{g}” ×{c}" for g, c in repeated.items())})
    return pd.DataFrame(rows)


# -- a grid of settings ------------------------------------------------------------------------------
SWEEP_VALUES = {
    "clip_cosine": "CLIP cos(image, caption)",
    "log_likelihood_per_token": "LM log-likelihood per token",
    "repeated_2grams": "repeated bigrams",
    "tokens": "length (tokens)",
}


SWEEP_MAGIC_GRID = {"alpha": "0, 0.1, 0.3, 0.6", "beta": "0, 0.5, 1, 2"}  # MAGIC's grid unless given
SWEEP_FIELD_LABELS = {"k": "k values", "alpha": "alphas", "beta": "betas"}  # else "<name> values"


class Sweep(W.VBox):
    """Any decoder of the registry over a grid of its settings on one image: one box of values per
    parameter (commas between values; one value keeps it fixed), a progress bar while it runs,
    then a DataFrame (``sweep.frame``: a row per setting) and heat maps of the value picked (the
    two parameters with the most values as the axes, one map per value of a third).

    A sweep needs lists of values, so each parameter is a box of numbers rather than a slider;
    its tooltip gives the range the registry allows. ``alphas``, ``betas`` and ``ks`` start
    MAGIC's boxes (MAGIC's grid by default: alpha 0, 0.1, 0.3, 0.6 x beta 0, 0.5, 1, 2 at the
    preset's k); ``values`` starts any decoder's (``{"p": "0.5, 0.9", "seed": "0, 1, 2"}``).
    A parameter without a value starts at the model set's preset value, else the registry's
    default (a sampler's seed at 0: a sweep is reproducible)."""

    def __init__(self, models: ModelSet, image: Any = None, *, decoder: str = SWEPT, alphas: str | None = None,
                 betas: str | None = None, ks: str | None = None, values: dict[str, str] | None = None) -> None:
        self.models = models
        self.picker = ImagePicker(models)
        if image is not None:
            self.picker.set_image(image)
        style = {"description_width": "90px"}
        start = get_decoder(decoder).name
        self.decoder = W.Dropdown(options=stepping_options(), value=_stepping(start), description="decoder",
                                  style=style)
        given = {"alpha": alphas, "beta": betas, "k": ks} if start == "magic" else {}
        self._given = {**{n: v for n, v in given.items() if v is not None}, **(values or {})}
        self.fields: dict[str, W.Text] = {}
        self.field_box = W.VBox()
        self.length = _length_slider(models)
        self.prompt = W.Text(value=models.prompt or "", description="prompt", placeholder="(none)", style=style)
        self.value = W.Dropdown(options=[(label, v) for v, label in SWEEP_VALUES.items()], value="clip_cosine",
                                description="heat map", style=style)
        self.run_button = W.Button(description="Run sweep", icon="play", button_style="primary")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="0 / 0", style=style)
        self.message = W.HTML()
        self.table = W.HTML()
        self.plot = W.Image(format="png", layout=W.Layout(max_width="900px"))
        self.frame = pd.DataFrame()
        self._make_fields()

        settings = W.VBox([self.decoder, self.field_box, self.length, self.prompt, self.value,
                           W.HBox([self.run_button, self.progress])])
        super().__init__([_row([self.picker, settings]), self.message, self.plot, self.table])
        self.run_button.on_click(lambda _: self.run())
        self.value.observe(lambda _: self._render_plot(), names="value")
        self.decoder.observe(lambda _: self._make_fields(), names="value")

    # MAGIC's boxes by their old names (notebooks and tests use them)
    alphas = property(lambda self: self.fields["alpha"])
    betas = property(lambda self: self.fields["beta"])
    ks = property(lambda self: self.fields["k"])

    def _make_fields(self) -> None:
        """One box of values per parameter of the decoder picked, each starting at the values given
        for it, else MAGIC's grid, else the preset's or the registry's value."""
        decoder = DECODERS[self.decoder.value]
        controls = _param_controls(self.models, decoder.name)
        self.fields = {}
        for param in decoder.params:
            if param.name in self._given:
                text = self._given[param.name]
            elif decoder.name == "magic" and param.name in SWEEP_MAGIC_GRID:
                text = SWEEP_MAGIC_GRID[param.name]
            else:
                key = control_key(decoder, param.name)
                start = controls[key].value if key in controls else param.default
                text = f"{start if start is not None else 0:g}"
            label = SWEEP_FIELD_LABELS.get(param.name, f"{param.name} values")
            self.fields[param.name] = W.Text(value=text, description=label, style={"description_width": "90px"},
                                             tooltip=f"{param.help}; each {_allowed(param, self.models.lm.vocab_size)}")
        self.field_box.children = list(self.fields.values())
        self.frame = pd.DataFrame()
        self.table.value, self.plot.value = "", b""

    def grid(self) -> list[dict[str, Any]]:
        """The settings the sweep decodes (one dict per setting), each value checked against its
        range in the registry; at most :data:`MAX_SWEEP` settings and three parameters varied."""
        decoder, vocab = DECODERS[self.decoder.value], self.models.lm.vocab_size
        values = {name: _checked_values(field.value, field.description, decoder.param(name), vocab)
                  for name, field in self.fields.items()}
        varied = [name for name, v in values.items() if len(v) > 1]
        if len(varied) > 3:
            raise MagicEduError(f"{', '.join(varied)}: vary at most three parameters at a time (a heat map shows "
                                "two, one map per value of a third); give the others one value each")
        grid = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
        if len(grid) > MAX_SWEEP:
            raise MagicEduError(f"the grid has {len(grid)} settings; at most {MAX_SWEEP} at a time, use fewer values")
        return grid

    @guarded
    def run(self) -> None:
        """Decode every setting of the grid, then show the table and the heat map."""
        grid, image, prompt = self.grid(), self.picker.image, _prompt(self.prompt.value)
        if image is None:
            raise MagicEduError("image: pick a toy scene or a sample photo, or upload one")
        decoder, lm, clip = DECODERS[self.decoder.value], self.models.lm, self.models.clip
        extra = {"clip": clip, "image": image} if decoder.needs_image else {}
        self.progress.max, self.progress.value, self.progress.description = len(grid), 0, f"0 / {len(grid)}"
        rows = []
        for i, setting in enumerate(grid):
            gen = Stepper(lm, decoder.name, prompt=prompt, max_new_tokens=self.length.value, record=False,
                          history=False, **extra, **setting).run()[0]
            ll = analysis.lm_log_likelihood(lm, gen.token_ids, prompt)
            rows.append({**setting, "text": gen.text, "tokens": len(gen.token_ids),
                         "log_likelihood_per_token": ll / max(len(gen.token_ids), 1),
                         "repeated_2grams": sum(c - 1 for c in analysis.repeated_ngrams(gen.text, 2).values())})
            self.progress.value, self.progress.description = i + 1, f"{i + 1} / {len(grid)}"
        frame = pd.DataFrame(rows)
        frame.insert(len(grid[0]) + 1, "clip_cosine", analysis.caption_clip_score(clip, image, list(frame["text"])))
        self.frame = frame
        self.table.value = frame.to_html(index=False, float_format=lambda x: f"{x:.3f}", escape=True)
        self._render_plot()

    def axes(self) -> tuple[str, str | None, str | None]:
        """(x, y, facet) of the heat map: the varied parameters, most values first (the registry's
        order on a tie); y and facet None where fewer are varied (x None: a decoder without
        parameters, one cell)."""
        names = [n for n in self.frame.columns if n in DECODERS[self.decoder.value].param_names]
        varied = sorted((n for n in names if self.frame[n].nunique() > 1), key=lambda n: -self.frame[n].nunique())
        shown = (varied or names[:1]) + [None, None, None]
        return shown[0], shown[1], shown[2]

    @guarded
    def _render_plot(self) -> None:
        if not self.frame.empty:
            self.plot.value = figure_png(self._figure())

    def _figure(self) -> Figure:
        x, y, facet = self.axes()
        return plots.plot_sweep(self.frame, self.value.value, x=x, y=y, facet=facet)

    def snapshot(self) -> Figure:
        """A static Figure: the heat map of the sweep (or a note that it has not run yet)."""
        if self.frame.empty:
            fig = Figure(figsize=(6, 1))
            fig.text(0.5, 0.5, "the sweep has not run yet: press Run sweep", ha="center")
            return fig
        return self._figure()


# -- latency ------------------------------------------------------------------------------------------
