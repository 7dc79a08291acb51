"""Named model sets: the paper's own setup, plain GPT-2, and the offline toy world.

>>> models = magic_edu.load_models("paper-mscoco")   # downloads once into the Hugging Face cache
>>> magic_search(models.lm, models.clip, image, **models.settings())

Every preset pairs a :class:`~magic_edu.models.LanguageModel` with an
:class:`~magic_edu.models.ImageTextMatcher` and carries the decoding settings it was tuned
with (``models.defaults``: k, alpha, beta, max_new_tokens), so notebooks never repeat them.

The paper's presets (Su et al. 2022) use OpenAI's CLIP ViT-B/32 through open_clip as
``ViT-B-32-quickgelu`` with the ``openai`` weights (plain ``ViT-B-32`` would run those
weights with the wrong activation). open_clip's image preprocessing and text tokenisation
differ slightly from the Hugging Face ``CLIPProcessor`` the reference code used: the weights
are the same, so results are close to the paper's but not always letter-exact.

Downloads go through the Hugging Face hub cache (``HF_HOME`` / ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE=1`` are honoured, progress bars are the hub's). With no network and the
models not cached, :func:`load_models` raises one :class:`ModelNotDownloadedError` naming
what is missing, the command that downloads it and the offline ``toy`` world. No preset runs
remote code; weights load as safetensors or with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MagicEduError
from .models import DEFAULT_PROMPT_FORMAT, STORY_PROMPT_FORMAT, ImageTextMatcher, LanguageModel
from .registry import DECODERS, MAX_NEW_TOKENS

PAPER_SOS = "<-start_of_text->"
PAPER_PAD = "<-pad->"
PAPER_CLIP = "ViT-B-32-quickgelu"
PAPER_CLIP_WEIGHTS = "openai"
DATA_ENV = "MAGIC_EDU_DATA"
PRESET_FILE = "magic_edu_preset.json"  # in a folder, it makes the folder a preset (``magic-edu adapt-lm`` writes it)
HUB_PROBE_TIMEOUT_S = 10  # a hub that has not answered one request by then counts as unreachable
SETTING_KEYS = ("k", "alpha", "beta", "max_new_tokens")

# Weight files transformers looks for, any one of which means an LM checkpoint is cached.
_LM_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
# `hf download` of a whole repo is fine for the paper's LMs (one checkpoint each); gpt2's repo
# also holds TF, Flax, ONNX and Rust weights, so name the files transformers reads.
_LM_CLI_FILES = {"gpt2": ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "vocab.json", "merges.txt")}
# What open_clip downloads for a pretrained tag whose weights live on the hub (safetensors first).
_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Preset:
    """One named model set.

    Hub presets name a hub id in ``lm``; toy presets (``toy=True``) name a folder under
    ``<data>/toy`` in ``lm`` and ``clip``, and read their settings from ``defaults.json``.
    ``max_length`` (story presets) is the authors' ``decoding_len``: tokens *counting the
    prompt*; ``max_new_tokens`` is then derived from the prompt (see :meth:`ModelSet.settings`).
    """

    name: str
    description: str
    lm: str
    kind: str = "caption"  # "caption" or "story"
    clip: str = PAPER_CLIP
    clip_pretrained: str | None = PAPER_CLIP_WEIGHTS
    defaults: Mapping[str, Any] | None = None  # None: read from <data>/toy/defaults.json
    sos_token: str | None = PAPER_SOS  # None: the tokenizer's BOS
    pad_token: str | None = PAPER_PAD
    prompt_format: str = DEFAULT_PROMPT_FORMAT
    max_sentences: int | None = None
    max_length: int | None = None
    toy: bool = False
    lm_fallback: str | None = None  # toy: used when the ``lm`` folder does not exist


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("toy", "offline toy world: tiny SimCTG GPT-2 + tiny CLIP trained on ShapesWorld (no download)",
               lm="lm", clip="clip", clip_pretrained=None, toy=True),
        Preset("toy-mle", "offline toy world, the LM twin trained with plain MLE (no SimCTG loss)",
               lm="lm-mle", clip="clip", clip_pretrained=None, toy=True),
        Preset("toy-story", "offline toy world, visually grounded stories (title, EOS, story)",
               lm="lm-story", lm_fallback="lm", clip="clip", clip_pretrained=None, toy=True, kind="story",
               prompt_format=STORY_PROMPT_FORMAT, max_sentences=5),
        # max_new_tokens 15 / 19: the authors' decoding_len (16 / 20) counts the start token
        Preset("paper-mscoco", "the paper's MSCOCO captioner: GPT-2 tuned on MSCOCO captions (SimCTG) + CLIP ViT-B/32",
               lm="cambridgeltl/magic_mscoco", defaults={"k": 45, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 15}),
        Preset("paper-flickr30k",
               "the paper's Flickr30k captioner: GPT-2 tuned on Flickr30k captions (SimCTG) + CLIP ViT-B/32",
               lm="cambridgeltl/magic_flickr30k", defaults={"k": 25, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 19}),
        Preset("story",
               "the paper's story generator: GPT-2 tuned on ROCStories (SimCTG) + CLIP ViT-B/32; prompt = title",
               lm="cambridgeltl/simctg_rocstories", kind="story", sos_token=None, pad_token=None,
               prompt_format=STORY_PROMPT_FORMAT, max_sentences=5, max_length=100,
               defaults={"k": 5, "alpha": 0.6, "beta": 0.15}),
        Preset("gpt2", "plain GPT-2 (never tuned on captions) + CLIP ViT-B/32, with the MSCOCO settings",
               lm="gpt2", sos_token=None, pad_token=None,
               defaults={"k": 45, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 15}),
    ]
}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {name: p.description for name, p in PRESETS.items()}


@dataclass
class ModelSet:
    """What :func:`load_models` returns: the two models and their decoding settings.

    ``defaults`` holds k, alpha, beta and max_new_tokens. For a story preset the paper's
    length budget counts the prompt (``max_length`` = 100 tokens of title + EOS + story),
    so ``defaults["max_new_tokens"]`` is that budget for an empty title; use
    ``settings(prompt=title)`` for the exact budget of a given title.
    """

    name: str
    kind: str
    lm: LanguageModel
    clip: ImageTextMatcher
    defaults: dict[str, Any]
    max_length: int | None = None
    description: str = ""
    prompt: str | None = None  # a suggested prompt (the toy world's story title), if the preset has one
    preset: Preset | None = field(default=None, repr=False)

    def settings(self, prompt: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``magic_search`` (a copy of ``defaults``); for story presets
        ``max_new_tokens = max_length - len(prefix ids of prompt)``, as the authors count it."""
        out = dict(self.defaults)
        if self.max_length is not None:
            prefix = len(self.lm.prefix_ids(prompt))
            if prefix >= self.max_length:
                raise MagicEduError(
                    f"prompt: its prefix is {prefix} tokens, but preset {self.name!r} generates at most "
                    f"{self.max_length} tokens counting the prompt; shorten it or pass max_new_tokens= yourself"
                )
            out["max_new_tokens"] = self.max_length - prefix
        return out

    def __repr__(self) -> str:
        return (f"ModelSet(name={self.name!r}, kind={self.kind!r}, lm={self.lm.name!r}, "
                f"clip={self.clip.name!r}, defaults={self.defaults})")


class ModelNotDownloadedError(MagicEduError):
    """A preset's model is neither in the Hugging Face cache nor downloadable right now."""

    def __init__(self, message: str, preset: str, missing: list[str]) -> None:
        super().__init__(message)
        self.preset = preset
        self.missing = missing


def data_dir() -> Path:
    """The folder holding ``toy/``: ``$MAGIC_EDU_DATA`` if set, else the repository's ``data/``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parent.parent / "data"


def load_models(name: str | os.PathLike = "toy", device: str | torch.device | None = None) -> ModelSet:
    """Load a preset by name (see :func:`list_presets`) and return a :class:`ModelSet`.

    ``name`` may also be a folder holding a ``magic_edu_preset.json`` (what ``magic-edu adapt-lm``
    writes next to the adapted LM): its LM, the CLIP and the settings that file names."""
    if isinstance(name, str) and name in PRESETS:
        preset = PRESETS[name]
        return _load_toy(preset, device) if preset.toy else _load_hub(preset, device)
    if isinstance(name, (str, os.PathLike)) and (Path(name) / PRESET_FILE).is_file():
        return _load_folder(Path(name), device)
    raise MagicEduError(f"name must be one of {', '.join(map(repr, PRESETS))}, or a folder with a {PRESET_FILE} "
                        f"(magic-edu adapt-lm writes one); got {name!r}")


def load_clip(name: str | os.PathLike = "toy", device: str | torch.device | None = None) -> ImageTextMatcher:
    """The CLIP of a preset (or of a folder :func:`load_models` loads) alone, without its LM: what
    CLIP retrieval and building an index need."""
    if isinstance(name, str) and name in PRESETS:
        preset = PRESETS[name]
    elif isinstance(name, (str, os.PathLike)) and (Path(name) / PRESET_FILE).is_file():
        spec = read_folder_preset(name)
        preset = Preset(str(name), spec["description"], lm=str(name), clip=spec["clip"],
                        clip_pretrained=spec["clip_pretrained"])
    else:
        raise MagicEduError(f"name must be one of {', '.join(map(repr, PRESETS))}, or a folder with a {PRESET_FILE} "
                            f"(magic-edu adapt-lm writes one); got {name!r}")
    if preset.toy:
        clip_dir = data_dir() / "toy" / preset.clip
        if not (clip_dir / "open_clip_config.json").is_file():
            raise MagicEduError(f"preset {preset.name!r}: the toy CLIP is not in {clip_dir}; set {DATA_ENV} to the "
                                "folder that holds toy/")
        return ImageTextMatcher.from_pretrained(f"local-dir:{clip_dir}", device=device)
    needed = _hub_models(preset)[1:]  # the CLIP's weights on the hub, if it has any there
    missing = [m for m in needed if not m.cached() and not _fetch(m)]
    if missing:
        raise _not_downloaded(preset, missing)
    return _loading(preset, needed, 0, lambda: ImageTextMatcher.from_pretrained(
        preset.clip, pretrained=preset.clip_pretrained, device=device))


# -- the offline toy world ------------------------------------------------------------
def _load_toy(preset: Preset, device: str | torch.device | None) -> ModelSet:
    toy = data_dir() / "toy"
    lm_dir = toy / preset.lm
    if not lm_dir.is_dir() and preset.lm_fallback:
        lm_dir = toy / preset.lm_fallback
    clip_dir, defaults_file = toy / preset.clip, toy / "defaults.json"
    missing = [p for p, ok in ((lm_dir, (lm_dir / "config.json").is_file()),
                               (clip_dir, (clip_dir / "open_clip_config.json").is_file()),
                               (defaults_file, defaults_file.is_file())) if not ok]
    if missing:
        raise MagicEduError(
            f"preset {preset.name!r}: the toy models are not in {toy} (missing: "
            f"{', '.join(str(p.relative_to(toy)) for p in missing)}). They come with the magic_edu "
            f"repository in data/toy/; if they live elsewhere, set {DATA_ENV} to the folder that holds toy/."
        )
    try:
        settings = json.loads(defaults_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MagicEduError(f"preset {preset.name!r}: {defaults_file} is not valid JSON ({err})") from None
    if preset.kind == "story" and isinstance(settings, dict):
        settings = settings.get("story")
    if not isinstance(settings, dict):
        if preset.kind == "story":
            raise MagicEduError(f"preset {preset.name!r}: {defaults_file} has no \"story\" settings")
        raise MagicEduError(f"preset {preset.name!r}: {defaults_file} must hold a JSON object of settings")
    max_length = settings.get("max_length")
    defaults = _check_defaults(settings, preset.name, need_length=max_length is None)
    prompt = settings.get("prompt") if isinstance(settings.get("prompt"), str) else None

    lm = LanguageModel.from_pretrained(
        str(lm_dir), sos_token=preset.sos_token, pad_token=preset.pad_token, prompt_format=preset.prompt_format,
        max_sentences=preset.max_sentences, device=device,
    )
    clip = ImageTextMatcher.from_pretrained(f"local-dir:{clip_dir}", device=device)
    return _model_set(preset, lm, clip, defaults, max_length, prompt)


def _check_defaults(settings: Mapping[str, Any], preset: str, need_length: bool = True) -> dict[str, Any]:
    keys = SETTING_KEYS if need_length else SETTING_KEYS[:3]
    absent = [k for k in keys if k not in settings]
    if absent:
        raise MagicEduError(f"preset {preset!r}: the decoding settings lack {', '.join(absent)}")
    magic = DECODERS["magic"]
    params = {**{p.name: p for p in magic.params}, MAX_NEW_TOKENS.name: MAX_NEW_TOKENS}
    try:  # the ranges the decoders accept (k up to the vocabulary is checked when decoding)
        return {k: params[k].check(settings[k]) for k in SETTING_KEYS if k in settings}
    except MagicEduError as err:
        raise MagicEduError(f"preset {preset!r}: its decoding settings are out of range: {err}") from None


def _model_set(preset: Preset, lm: LanguageModel, clip: ImageTextMatcher, defaults: dict[str, Any],
               max_length: int | None, prompt: str | None = None) -> ModelSet:
    models = ModelSet(preset.name, preset.kind, lm, clip, dict(defaults), max_length, preset.description, prompt,
                      preset)
    lm.defaults, lm.max_length = dict(defaults), max_length  # the decoders use them when given nothing
    if max_length is not None and "max_new_tokens" not in defaults:
        models.defaults["max_new_tokens"] = models.settings(None)["max_new_tokens"]
    return models


# -- a folder: an adapted LM -----------------------------------------------------------------
def _load_folder(folder: Path, device: str | torch.device | None) -> ModelSet:
    """The LM in ``folder`` (Hugging Face format), the CLIP its ``magic_edu_preset.json`` names, and
    that file's settings."""
    spec = read_folder_preset(folder)
    preset = Preset(str(folder), spec["description"], lm=str(folder), kind=spec["kind"], clip=spec["clip"],
                    clip_pretrained=spec["clip_pretrained"], defaults=spec["defaults"], sos_token=spec["sos_token"],
                    pad_token=spec["pad_token"], prompt_format=spec["prompt_format"],
                    max_sentences=spec["max_sentences"], max_length=spec["max_length"])
    lm = LanguageModel.from_pretrained(str(folder), sos_token=preset.sos_token, pad_token=preset.pad_token,
                                       prompt_format=preset.prompt_format, max_sentences=preset.max_sentences,
                                       device=device)
    clip = load_clip(folder, device)
    defaults = _check_defaults(preset.defaults or {}, preset.name, need_length=preset.max_length is None)
    return _model_set(preset, lm, clip, defaults, preset.max_length)


def read_folder_preset(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of ``folder/magic_edu_preset.json``."""
    path = Path(folder) / PRESET_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MagicEduError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(spec, dict) or spec.get("format") != "magic_edu.preset":
        raise MagicEduError(f"{path}: not a magic_edu preset file (its \"format\" must be \"magic_edu.preset\")")
    out = {"description": f"the model in {folder}", "kind": "caption", "clip": PAPER_CLIP,
           "clip_pretrained": PAPER_CLIP_WEIGHTS, "defaults": {}, "sos_token": PAPER_SOS, "pad_token": PAPER_PAD,
           "prompt_format": DEFAULT_PROMPT_FORMAT, "max_sentences": None, "max_length": None}
    out.update({k: v for k, v in spec.items() if k in out})
    if out["kind"] not in ("caption", "story"):
        raise MagicEduError(f"{path}: \"kind\" must be \"caption\" or \"story\"; got {out['kind']!r}")
    if not isinstance(out["defaults"], dict):
        raise MagicEduError(f"{path}: \"defaults\" must be an object of decoding settings")
    for key in ("clip", "prompt_format", "description"):
        if not isinstance(out[key], str) or not out[key]:
            raise MagicEduError(f"{path}: \"{key}\" must be a non-empty string")
    return out


# -- hub presets ------------------------------------------------------------------------
@dataclass(frozen=True)
class _HubModel:
    """One hub repository a preset needs, and how to check it is cached."""

    what: str  # "language model" / "CLIP weights"
    repo_id: str
    probe: str  # the file downloaded first: it tells whether the hub answers
    any_of: tuple[str, ...]  # cached if one of these is cached ...
    requires: tuple[str, ...] = ()  # ... and all of these
    cli_files: tuple[str, ...] = ()  # files to name in the `hf download` command (empty: whole repo)

    def cached(self) -> bool:
        from huggingface_hub import try_to_load_from_cache

        def has(f: str) -> bool:
            return isinstance(try_to_load_from_cache(self.repo_id, f), str)

        return all(has(f) for f in self.requires) and any(has(f) for f in self.any_of)

    def cli(self) -> str:
        return " ".join(["hf download", self.repo_id, *self.cli_files])


def _hub_models(preset: Preset) -> list[_HubModel]:
    out = [_HubModel("language model", preset.lm, "config.json", _LM_WEIGHT_FILES, ("config.json",),
                     _LM_CLI_FILES.get(preset.lm, ()))]
    clip = _clip_hub_file(preset.clip, preset.clip_pretrained)
    if clip is not None:
        repo_id, files = clip
        out.append(_HubModel(f"CLIP weights ({preset.clip}, {preset.clip_pretrained})", repo_id, files[0], files,
                             cli_files=(files[0],)))
    return out


def _clip_hub_file(model: str, pretrained: str | None) -> tuple[str, tuple[str, ...]] | None:
    """The hub repository and weight files open_clip reads for ``pretrained`` weights of ``model``
    (its pretrained table says ``org/repo/`` for the default files or ``org/repo/file``)."""
    if not pretrained:
        return None
    import open_clip

    hub = open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)
    return repo_id, ((filename,) if filename else _CLIP_WEIGHT_FILES)


def _load_hub(preset: Preset, device: str | torch.device | None) -> ModelSet:
    needed = _hub_models(preset)
    missing: list[_HubModel] = []
    reachable = True
    for model in needed:
        if model.cached():
            continue
        if reachable and _fetch(model):
            continue
        reachable = False
        missing.append(model)
    if missing:
        raise _not_downloaded(preset, missing)
    lm = _loading(preset, needed, 0, lambda: LanguageModel.from_pretrained(
        preset.lm, sos_token=preset.sos_token, pad_token=preset.pad_token, prompt_format=preset.prompt_format,
        max_sentences=preset.max_sentences, device=device,
    ))
    clip = _loading(preset, needed, len(needed) - 1, lambda: ImageTextMatcher.from_pretrained(
        preset.clip, pretrained=preset.clip_pretrained, device=device,
    ))
    return _model_set(preset, lm, clip, dict(preset.defaults or {}), preset.max_length)


def _loading(preset: Preset, needed: list[_HubModel], which: int, load: Callable[[], Any]) -> Any:
    """Run a loader; if its own download fails for want of network (a partly cached model),
    raise the same one error as a model not cached at all."""
    try:
        return load()
    except Exception as err:
        if not _unavailable(err):
            raise
        missing = [m for i, m in enumerate(needed) if i == which or not m.cached()]
        raise _not_downloaded(preset, missing) from None


def _fetch(model: _HubModel) -> bool:
    """Download the model's probe file (the hub's progress bar); False if the hub cannot be reached."""
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE or not _hub_answers(model):
        return False
    try:
        hf_hub_download(model.repo_id, model.probe)
    except Exception as err:  # noqa: BLE001 (any failure: reachable or not is what we ask)
        if _unavailable(err):
            return False
        # any other answer (e.g. the file does not exist on the hub) is for the loader to report
    return True


def _hub_answers(model: _HubModel) -> bool:
    """One request for the probe file's headers, with a short timeout and no retries: the hub's
    own downloader retries a silent server with back-off for minutes (398 s measured with a
    server that accepts connections and never answers), so a user hears within seconds."""
    from huggingface_hub import constants, get_session

    url = f"{constants.ENDPOINT}/{model.repo_id}/resolve/main/{model.probe}"
    try:
        get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception:  # noqa: BLE001 (no answer of any kind: not reachable, whatever the reason)
        return False
    return True


def _unavailable(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) means "not cached and no network"."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = bool(constants.HF_HUB_OFFLINE)
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError,
                          socket.gaierror)):
            return True
        if offline and isinstance(e, OSError) and not isinstance(e, PermissionError):
            return True  # offline, transformers reports a file it could not find in the cache
        e = e.__cause__ or e.__context__
    return False


def _not_downloaded(preset: Preset, missing: list[_HubModel]) -> ModelNotDownloadedError:
    from huggingface_hub import constants

    why = ("offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
           else "the Hugging Face hub cannot be reached (with HF_HUB_OFFLINE=1 this shows without the wait)")
    lines = [
        f"preset {preset.name!r} needs models that are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and {why}. Missing:",
        *(f"  - {m.what}: {m.repo_id}" for m in missing),
        "Download them once on a machine with network (same HF_HOME; the paper's models are about 1 GB):",
        f"  python -c \"import magic_edu; magic_edu.load_models('{preset.name}')\"",
        "or with the Hugging Face command line:",
        *(f"  {m.cli()}" for m in missing),
        "Meanwhile the offline toy world needs no download: magic_edu.load_models('toy')",
    ]
    return ModelNotDownloadedError("\n".join(lines), preset.name, [m.repo_id for m in missing])
