"""The decoder registry: names and aliases, parameter ranges, where a setting's value comes from,
that every entry matches the function that runs it, and that a new entry reaches the widgets and
the command line with no change to them."""

from __future__ import annotations

import inspect
from dataclasses import replace
from types import SimpleNamespace

import pytest

import magic_edu
from magic_edu import MagicEduError, Stepper
from magic_edu.registry import (
    ALPHA,
    BETA,
    DECODERS,
    LENGTH_PENALTY,
    MASS,
    MAX_NEW_TOKENS,
    NUM_BEAMS,
    SEED,
    TEMPERATURE,
    Decoder,
    P,
    Param,
    candidate_decoders,
    get_decoder,
    stepping_decoders,
)
from magic_edu.tools import cli

ALL_NAMES = ("greedy", "top_k", "nucleus", "typical", "beam", "contrastive", "magic", "zerocap", "clip_retrieval")


# -- names ------------------------------------------------------------------------------------
def test_names_and_aliases_resolve():
    assert tuple(DECODERS) == ALL_NAMES
    for name, decoder in DECODERS.items():
        assert decoder.name == name and get_decoder(name) is decoder
        for alias in decoder.aliases:
            assert get_decoder(alias) is decoder
    assert get_decoder("top-k") is DECODERS["top_k"]
    assert get_decoder("top-p") is DECODERS["nucleus"]
    assert get_decoder("typical-p") is DECODERS["typical"] and get_decoder("beam-search") is DECODERS["beam"]
    assert get_decoder("clip-retrieval") is DECODERS["clip_retrieval"]
    aliases = [a for d in DECODERS.values() for a in d.aliases]
    assert len(set(aliases)) == len(aliases) and not set(aliases) & set(DECODERS)


@pytest.mark.parametrize("name", ["diverse_beam", "Magic", "", None, 3, ["magic"]])
def test_unknown_names_are_rejected_naming_the_allowed_ones(name):
    with pytest.raises(MagicEduError) as err:
        get_decoder(name)
    message = str(err.value)
    assert message.startswith("decoder must be one of ") and repr(name) in message
    assert all(n in message for n in ALL_NAMES)


def test_what_each_decoder_is():
    assert candidate_decoders() == ("contrastive", "magic")
    assert [n for n, d in DECODERS.items() if d.samples] == ["top_k", "nucleus", "typical"]
    assert [n for n, d in DECODERS.items() if d.needs_image] == ["magic", "zerocap", "clip_retrieval"]
    assert [n for n, d in DECODERS.items() if d.retrieves] == ["clip_retrieval"]
    assert stepping_decoders() == ALL_NAMES[:-1]  # CLIP retrieval takes no steps
    assert DECODERS["clip_retrieval"].param_names == ()  # its index is a file, given as index= / --index
    assert [n for n, d in DECODERS.items() if d.beams] == ["beam"]
    assert [n for n, d in DECODERS.items() if d.steers] == ["zerocap"]
    assert DECODERS["zerocap"].param_names == (
        "num_iterations", "stepsize", "grad_norm_factor", "ce_scale", "clip_scale", "clip_temperature",
        "fusion_factor", "end_factor", "forbidden_factor", "repetition_penalty", "candidates", "num_beams")
    # ZeroCap's num_beams is its own: one beam by default (the MAGIC paper's baseline), never preset
    assert DECODERS["zerocap"].settings({}, {"num_beams": 7, "k": 3})[0]["num_beams"] == 1
    assert DECODERS["greedy"].param_names == ()
    assert DECODERS["magic"].param_names == ("k", "alpha", "beta", "clip_text_max_len")
    # every sampler takes a temperature; the searches do not
    assert [n for n, d in DECODERS.items() if "temperature" in d.param_names] == ["top_k", "nucleus", "typical"]
    assert DECODERS["typical"].param_names == ("mass", "temperature", "seed")
    assert DECODERS["beam"].param_names == ("num_beams", "length_penalty")
    with pytest.raises(MagicEduError, match="greedy has no parameter 'k'; its parameters: "):
        DECODERS["greedy"].param("k")


# -- ranges -----------------------------------------------------------------------------------
def test_float_ranges():
    assert ALPHA.check(0) == 0.0 and isinstance(ALPHA.check(0), float) and ALPHA.check(1) == 1.0
    for bad in (-0.01, 1.01, float("nan"), float("inf")):
        with pytest.raises(MagicEduError, match="alpha must be a number between 0.0 and 1.0"):
            ALPHA.check(bad)
    assert BETA.check(1e6) == 1e6  # no upper bound
    with pytest.raises(MagicEduError, match="beta must be a number >= 0.0"):
        BETA.check(-1)


def test_the_new_ranges_name_the_argument_and_the_range():
    """temperature > 0 and finite, mass in (0, 1], num_beams in [1, vocab], length_penalty finite."""
    assert TEMPERATURE.check(1e-3) == 1e-3 and TEMPERATURE.check(50) == 50.0
    for bad in (0, 0.0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(MagicEduError, match=r"^temperature must be a number > 0.0 \(finite\); got "):
            TEMPERATURE.check(bad)
    assert MASS.check(1.0) == 1.0 and MASS.check(1e-9) == 1e-9
    with pytest.raises(MagicEduError, match=r"^mass must be a number in \(0.0, 1.0\]; got 0.0"):
        MASS.check(0)
    with pytest.raises(MagicEduError, match="^mass must be a number between 0.0 and 1.0; got 1.5"):
        MASS.check(1.5)
    assert NUM_BEAMS.check(81, vocab_size=81) == 81
    for bad, message in ((0, "got 0"), (82, "got 82"), (2.0, "got 2.0"), (True, "got True")):
        with pytest.raises(MagicEduError, match=f"^num_beams must be an integer between 1 and 81; {message}"):
            NUM_BEAMS.check(bad, vocab_size=81)
    assert LENGTH_PENALTY.check(-3) == -3.0 and LENGTH_PENALTY.check(0) == 0.0 and LENGTH_PENALTY.check(1e6) == 1e6
    for bad in (float("inf"), -float("inf"), float("nan"), None, "1"):
        with pytest.raises(MagicEduError, match="^length_penalty must be a finite number; got "):
            LENGTH_PENALTY.check(bad)


def test_p_excludes_zero():
    assert P.low_open and P.check(1.0) == 1.0 and P.check(1e-9) == 1e-9
    with pytest.raises(MagicEduError, match=r"p must be a number in \(0.0, 1.0\]; got 0.0"):
        P.check(0)
    with pytest.raises(MagicEduError, match="p must be a number between"):
        P.check(1.5)


def test_ints_reject_floats_and_bools_and_k_is_at_most_the_vocabulary():
    k = DECODERS["contrastive"].param("k")
    assert k.check(3) == 3 and k.check(400, vocab_size=401) == 400
    for bad in (2.0, 2.5, True, "3", None):
        with pytest.raises(MagicEduError, match="k must be an integer"):
            k.check(bad)
    with pytest.raises(MagicEduError, match="k must be an integer between 1 and 401; got 402"):
        k.check(402, vocab_size=401)
    assert k.check(10**6) == 10**6  # no vocabulary known: no upper bound
    with pytest.raises(MagicEduError, match="k must be an integer >= 1; got 0"):
        k.check(0)
    for bad in (True, 1.5):
        with pytest.raises(MagicEduError, match="alpha must be a number"):
            ALPHA.check(bad)
    with pytest.raises(MagicEduError, match="max_new_tokens must be an integer >= 1"):
        MAX_NEW_TOKENS.check(0)
    assert SEED.check(2**64 - 1) == 2**64 - 1
    with pytest.raises(MagicEduError, match="seed"):
        SEED.check(-1)


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=list(DECODERS))
def test_every_default_and_slider_is_in_its_range(decoder):
    for param in (*decoder.params, MAX_NEW_TOKENS):
        if param.default is not None:
            assert param.check(param.default) == param.default, param.name
        if param.slider is not None:
            lo, hi, step = param.slider
            assert lo < hi and step > 0, param.name
            for end in (lo, hi):  # both ends allowed
                param.check(param.kind(end))
            if param.default is not None:
                assert lo <= param.default, param.name


# -- where a setting comes from ------------------------------------------------------------------
PRESET = {"k": 8, "alpha": 0.25, "beta": 3.0, "p": 0.5, "seed": 99, "max_new_tokens": 9}


def test_settings_given_beat_the_preset_which_beats_the_default():
    magic = DECODERS["magic"]
    assert magic.settings({}) == ({"k": 45, "alpha": 0.1, "beta": 2.0, "clip_text_max_len": 60}, [])
    values, from_preset = magic.settings({"alpha": 0.5, "beta": None}, PRESET)
    assert values == {"k": 8, "alpha": 0.5, "beta": 3.0, "clip_text_max_len": 60}
    assert from_preset == ["k", "beta"]
    assert DECODERS["contrastive"].settings({}, PRESET) == ({"k": 8, "alpha": 0.25}, ["k", "alpha"])
    assert DECODERS["nucleus"].settings({}, PRESET) == ({"p": 0.5, "temperature": 1.0, "seed": None}, ["p"])
    # a seed, a temperature, a mass and the beam settings are never preset
    preset = {**PRESET, "temperature": 0.5, "mass": 0.2, "num_beams": 9, "length_penalty": 3.0}
    assert DECODERS["typical"].settings({}, preset) == ({"mass": 0.95, "temperature": 1.0, "seed": None}, [])
    assert DECODERS["beam"].settings({}, preset) == ({"num_beams": 4, "length_penalty": 1.0}, [])
    assert DECODERS["nucleus"].settings({"seed": 3}, PRESET)[0]["seed"] == 3
    assert DECODERS["greedy"].settings({}, PRESET) == ({}, [])


def test_top_k_samplings_k_ignores_a_preset_k():
    top_k = DECODERS["top_k"]
    assert top_k.settings({}, PRESET) == ({"k": 40, "temperature": 1.0, "seed": None}, [])
    assert top_k.settings({"k": 3}, PRESET)[0]["k"] == 3


def test_settings_are_checked_and_unknown_names_rejected():
    with pytest.raises(MagicEduError, match="alpha must be a number between 0.0 and 1.0; got 2.0"):
        DECODERS["magic"].settings({"alpha": 2.0})
    with pytest.raises(MagicEduError, match="k must be an integer between 1 and 10"):
        DECODERS["magic"].settings({}, {"k": 45}, vocab_size=10)  # a preset's value is checked too
    with pytest.raises(MagicEduError, match="beta: greedy search has no such parameter; its parameters are none"):
        DECODERS["greedy"].settings({"beta": 1.0})
    with pytest.raises(MagicEduError, match="p: contrastive search has no such parameter; its parameters are k, alpha"):
        DECODERS["contrastive"].settings({"p": 0.5})
    assert DECODERS["greedy"].settings({"beta": None}) == ({}, [])  # None: not given


# -- entries match their functions ------------------------------------------------------------------
def keyword_names(fn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    assert not any(p.kind is p.VAR_KEYWORD for p in params), fn  # **kwargs would hide a mismatch
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=list(DECODERS))
def test_every_entry_matches_the_function_that_runs_it(decoder):
    fn = getattr(magic_edu, decoder.function, None)
    assert callable(fn), f"magic_edu has no function {decoder.function!r}"
    assert decoder.function in magic_edu.__all__
    names = keyword_names(fn)
    assert set(decoder.param_names) <= names, set(decoder.param_names) - names
    if decoder.retrieves:  # no steps: an index instead of a prompt and a length
        assert {"index", "record"} <= names and not {"prompt", "max_new_tokens"} & names
    else:
        assert {"prompt", "max_new_tokens", "stop_at_eos", "record"} <= names  # every decoder takes these
    positional = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == (["lm", "clip", "image"] if decoder.needs_image else ["lm"])
    # the parameters nobody gives come from the preset or the registry, not from the function
    for name in decoder.param_names:
        assert inspect.signature(fn).parameters[name].default is None, (decoder.function, name)
    # and Stepper takes each of them
    assert set(decoder.param_names) <= keyword_names(Stepper)


# -- a new decoder reaches the widgets and the command line ------------------------------------------
EPSILON = Param("epsilon", float, 3e-4, 0.0, 1.0, "keep the tokens more probable than this", (0.0001, 0.01, 0.0001),
                low_open=True)


@pytest.fixture
def new_decoder(monkeypatch) -> SimpleNamespace:
    """A sampling decoder with a parameter no other decoder has, added as a plugin would add it
    (``.decoder``), and the calls of its function (``.calls``)."""
    decoder = Decoder("epsilon", "epsilon sampling", "epsilon_sampling", (EPSILON, SEED), samples=True,
                      aliases=("eps",))
    monkeypatch.setitem(DECODERS, decoder.name, decoder)
    calls = []

    def epsilon_sampling(lm, *, epsilon=None, seed=None, prompt=None, max_new_tokens=None, stop_at_eos=True,
                         record=True):
        calls.append({"epsilon": epsilon, "seed": seed, "max_new_tokens": max_new_tokens, "record": record})
        return SimpleNamespace(text=f"epsilon {seed}")

    monkeypatch.setattr(magic_edu, "epsilon_sampling", epsilon_sampling, raising=False)
    return SimpleNamespace(decoder=decoder, calls=calls)


@pytest.fixture
def models(tiny_lm, tiny_clip):
    from magic_edu.presets import ModelSet

    return ModelSet(name="tiny", kind="caption", lm=tiny_lm, clip=tiny_clip,
                    defaults={"k": 5, "alpha": 0.3, "beta": 1.0, "max_new_tokens": 6})


def test_a_new_decoder_shows_up_in_the_widgets(new_decoder, models):
    from magic_edu.views.widgets import CompareDecoders, StepThrough

    from conftest import make_image

    w = StepThrough(models, make_image(1))
    assert ("epsilon sampling", "epsilon") in w.decoder.options
    control = w.controls["epsilon"]  # a slider from the registry's description
    assert (control.min, control.max, control.step, control.value) == (0.0001, 0.01, 0.0001, 3e-4)
    assert control.disabled and not w.k.disabled  # MAGIC has no epsilon
    compare = CompareDecoders(models, make_image(1), sampler="eps")
    assert compare.sampler.value == "epsilon" and ("epsilon sampling", "epsilon") in compare.sampler.options


def test_a_new_decoder_shows_up_in_the_command_line(new_decoder, tmp_path, capsys, monkeypatch):
    from PIL import Image

    assert "epsilon" in cli.decoder_choices() and "eps" in cli.decoder_choices()
    with pytest.raises(SystemExit):
        cli.main(["caption", "--help"])
    assert "--epsilon" in capsys.readouterr().out
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: SimpleNamespace(lm="LM", clip="CLIP", defaults={}))
    out = tmp_path / "r.json"
    assert cli.main(["caption", str(tmp_path / "a.png"), "--out", str(out), "--decoder", "eps",
                     "--epsilon", "0.002", "--seed", "4"]) == 0
    assert new_decoder.calls == [{"epsilon": 0.002, "seed": cli.image_seed(4, "a.png"), "max_new_tokens": None,
                                  "record": False}]
    # its parameter is checked by the registry, and refused by the decoders that do not take it
    assert cli.main(["caption", str(tmp_path / "a.png"), "--out", str(out), "--decoder", "eps",
                     "--epsilon", "0"]) == 2
    assert cli.main(["caption", str(tmp_path / "a.png"), "--out", str(out), "--decoder", "greedy",
                     "--epsilon", "0.002"]) == 2
    err = capsys.readouterr().err
    assert "epsilon must be a number in (0.0, 1.0]" in err and "got 0.0" in err
    assert "--epsilon: --decoder greedy (greedy search) does not take it" in err
    assert len(new_decoder.calls) == 1
    with pytest.raises(SystemExit):
        cli.main(["caption", "x.png", "--out", str(out), "--epsilon", "1", "--decoder", "diverse_beam"])


# -- the real decoders added to the registry reach them too ----------------------------------------------
def test_typical_sampling_and_beam_search_show_up_in_the_widgets(models):
    from magic_edu.views.widgets import CompareDecoders, StepThrough, compared_decoders

    from conftest import make_image

    w = StepThrough(models, make_image(1), decoder="typical-p")
    assert w.decoder.value == "typical" and "Problem" not in w.message.value
    assert {n for n, c in w.controls.items() if not c.disabled} == {"mass", "temperature", "seed"}
    assert (w.mass.min, w.mass.max, w.mass.step, w.mass.value) == (*MASS.slider, 0.95)
    assert (w.temperature.min, w.temperature.max, w.temperature.value) == (0.1, 2.0, 1.0)
    w.temperature.value = 0.5
    w.next_button.click()
    assert w.trace.settings["temperature"] == 0.5 and w.trace.settings["mass"] == 0.95
    w.decoder.value = "beam"
    assert {n for n, c in w.controls.items() if not c.disabled} == {"num_beams", "length_penalty"}
    assert (w.num_beams.value, w.length_penalty.value) == (4, 1.0)
    w.num_beams.value = 3
    w.next_button.click()
    assert "Problem" not in w.message.value and w.trace.settings["num_beams"] == 3
    assert compared_decoders() == ["greedy", "beam", "contrastive", "magic"]  # ZeroCap only when asked: slow
    assert compared_decoders(steered=True) == ["greedy", "beam", "contrastive", "magic", "zerocap"]
    compare = CompareDecoders(models, make_image(1), sampler="typical")
    assert "Problem" not in compare.message.value
    assert list(compare.frame["decoder"]) == ["greedy", "beam", "contrastive", "magic", "typical"]


def test_typical_sampling_and_beam_search_show_up_in_the_command_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    assert {"typical", "typical-p", "beam", "beam-search"} <= set(cli.decoder_choices())
    with pytest.raises(SystemExit):
        cli.main(["caption", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--temperature", "--mass", "--num-beams", "--length-penalty"):
        assert option in help_text
    calls = []
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: SimpleNamespace(lm="LM", clip="CLIP", defaults={}))
    monkeypatch.setattr(magic_edu, "typical_sampling",
                        lambda lm, **kw: calls.append(("typical", kw)) or SimpleNamespace(text="a typical one"))
    monkeypatch.setattr(magic_edu, "beam_search",
                        lambda lm, **kw: calls.append(("beam", kw)) or SimpleNamespace(text="a beam one"))
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    argv = ["caption", str(tmp_path / "a.png")]
    assert cli.main([*argv, "--out", str(tmp_path / "t.json"), "--decoder", "typical", "--mass", "0.5",
                     "--temperature", "0.7", "--seed", "2"]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "b.json"), "--decoder", "beam-search", "--num-beams", "3",
                     "--length-penalty", "-0.5"]) == 0
    assert calls == [("typical", {"mass": 0.5, "temperature": 0.7, "seed": cli.image_seed(2, "a.png"),
                                  "record": False}),
                     ("beam", {"num_beams": 3, "length_penalty": -0.5, "record": False})]
    for bad, message in ((["--decoder", "typical", "--mass", "0"], "mass must be a number in (0.0, 1.0]; got 0.0"),
                         (["--decoder", "top_k", "--temperature", "0"], "temperature must be a number > 0.0"),
                         (["--decoder", "beam", "--num-beams", "0"], "num_beams must be an integer >= 1; got 0"),
                         (["--decoder", "beam", "--length-penalty", "inf"], "length_penalty must be a finite number"),
                         (["--decoder", "greedy", "--temperature", "0.5"], "--temperature: --decoder greedy"),
                         (["--decoder", "magic", "--num-beams", "2"], "--num-beams: --decoder magic"),
                         (["--decoder", "zerocap", "--k", "2"], "--k: --decoder zerocap (ZeroCap) does not take it"),
                         (["--decoder", "zerocap", "--fusion-factor", "2"],
                          "fusion_factor must be a number between 0.0 and 1.0; got 2.0")):
        assert cli.main([*argv, "--out", str(tmp_path / "x.json"), *bad]) == 2
        assert message in capsys.readouterr().err
    assert len(calls) == 2


def test_replacing_an_entry_changes_what_the_plots_draw(monkeypatch):
    """(The plots read the registry each time; see also tests/test_plots.py.)"""
    from magic_edu.tools import analysis
    from magic_edu.trace import Trace

    trace = Trace({"decoder": "greedy"}, [0], ["<s>"])
    assert not analysis.scores_candidates(trace)
    monkeypatch.setitem(DECODERS, "greedy", replace(DECODERS["greedy"], scores_candidates=True))
    assert analysis.scores_candidates(trace)
