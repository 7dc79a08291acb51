"""The course's exercise checkers: right answers pass, typical mistakes get a hint, nothing raises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magic_edu.course import exercises as ex
from magic_edu.models import STORY_PROMPT_FORMAT
from magic_edu.toyworld import shapes
from magic_edu.trace import StepRecord


def right(v):
    assert isinstance(v, ex.Verdict), v
    assert v.status == "right" and v.ok and bool(v) and str(v).startswith("✅"), str(v)


def wrong(v, *words):
    assert isinstance(v, ex.Verdict), v
    assert v.status == "wrong" and not v and str(v).startswith("❌"), str(v)
    for w in words:
        assert w in v.message, (w, v.message)


def unanswered(v):
    assert isinstance(v, ex.Verdict), v
    assert v.status == "unanswered" and not v and str(v).startswith("✏️"), str(v)


def placeholder(*args):
    ...


def raises(*args):
    raise RuntimeError("oops")


def not_implemented(*args):
    raise NotImplementedError


FUNCTION_CHECKERS = [ex.check_top_k_filter, ex.check_nucleus_filter, ex.check_degeneration_penalty,
                     ex.check_clip_scores, ex.check_magic_score, ex.check_clip_retrieval, ex.check_rep_n,
                     ex.check_candidate_mask]


@pytest.mark.parametrize("check", FUNCTION_CHECKERS, ids=lambda c: c.__name__)
def test_function_checkers_never_raise(check):
    unanswered(check(None))
    unanswered(check(placeholder))
    unanswered(check(not_implemented))
    wrong(check(raises), "RuntimeError", "oops")
    wrong(check(42), "function")
    wrong(check(lambda *a: "text"))
    wrong(check(lambda *a: [1.0, 2.0, float("nan")]))


@pytest.mark.parametrize("check", [ex.check_mle_preset, ex.check_contrastive_pick, ex.check_temperature,
                                   ex.check_decoders_that_see, ex.check_k_equals_one, ex.check_beta_limit,
                                   ex.check_gradient_free], ids=lambda c: c.__name__)
def test_value_checkers_never_raise(check):
    unanswered(check(None))
    unanswered(check(...))
    for junk in (object(), 3.5, "zzz", [1, 2, 3], {"a": 1}, float("nan")):
        v = check(junk)
        assert isinstance(v, ex.Verdict) and not v.ok


# -- notebook 1 --------------------------------------------------------------------------
def test_scene_caption():
    scene = shapes.make_scene(7)
    truth = " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects) + "."
    right(ex.check_scene_caption(truth, scene))
    unanswered(ex.check_scene_caption("", scene))
    wrong(ex.check_scene_caption("a picture.", scene), "colour")
    other = next(c for c in shapes.COLOURS if all(o.colour != c for o in scene.objects))
    wrong(ex.check_scene_caption(f"a {other} {scene.objects[0].shape}.", scene), "no " + other)
    wrong(ex.check_scene_caption(12, scene), "string")
    wrong(ex.check_scene_caption("a red circle.", None))  # a broken scene argument is reported, not raised


def test_mle_preset():
    right(ex.check_mle_preset("toy-mle"))
    wrong(ex.check_mle_preset("toy"), "description")
    wrong(ex.check_mle_preset("gpt-5"), "list_presets")


# -- notebook 2 --------------------------------------------------------------------------
def top_k(probs, k):
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[probs.topk(k).indices] = True
    q = torch.where(keep, probs, torch.zeros_like(probs))
    return q / q.sum()


def nucleus(probs, p):
    sorted_p, order = probs.sort(descending=True)
    keep_sorted = (sorted_p.cumsum(0) - sorted_p) < p
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[keep_sorted]] = True
    q = torch.where(keep, probs, torch.zeros_like(probs))
    return q / q.sum()


def test_top_k_filter():
    right(ex.check_top_k_filter(top_k))
    right(ex.check_top_k_filter(lambda p, k: np.asarray(top_k(p, k))))  # numpy result is fine
    unnormalised = lambda p, k: top_k(p, k) * p[p.topk(k).indices].sum()
    wrong(ex.check_top_k_filter(unnormalised), "sums to")
    wrong(ex.check_top_k_filter(lambda p, k: p.topk(k).values), "all")


def test_nucleus_filter():
    right(ex.check_nucleus_filter(nucleus))

    def one_short(probs, p):  # stops before the token that crosses p
        sorted_p, order = probs.sort(descending=True)
        keep_sorted = sorted_p.cumsum(0) < p
        keep_sorted[0] = True
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        q = torch.where(keep, probs, torch.zeros_like(probs))
        return q / q.sum()

    wrong(ex.check_nucleus_filter(one_short), "crosses p")
    wrong(ex.check_nucleus_filter(lambda p, pp: p))


# -- notebook 3 --------------------------------------------------------------------------
def penalty(cand, ctx):
    return (F.normalize(cand, dim=-1) @ F.normalize(ctx, dim=-1).T).max(dim=-1).values


def test_degeneration_penalty():
    right(ex.check_degeneration_penalty(penalty))
    wrong(ex.check_degeneration_penalty(lambda c, x: (c @ x.T).max(dim=-1).values), "normalise")
    wrong(ex.check_degeneration_penalty(
        lambda c, x: (F.normalize(c, dim=-1) @ F.normalize(x, dim=-1).T).mean(dim=-1)), "max")
    wrong(ex.check_degeneration_penalty(lambda c, x: F.normalize(c, dim=-1) @ F.normalize(x, dim=-1).T), "shape")


def test_library_penalty_passes_its_own_checker():
    from magic_edu import degeneration_penalty

    right(ex.check_degeneration_penalty(lambda c, x: degeneration_penalty(c[None], x[None])[0][0]))


def test_contrastive_pick():
    t, a = ex.CONTRASTIVE_TABLE, ex.CONTRASTIVE_ALPHA
    scores = [(1 - a) * p - a * s for p, s in zip(t["lm_prob"], t["degeneration_penalty"])]
    best = t["token"][int(np.argmax(scores))]
    # the example teaches something: neither the most probable nor the least penalised candidate wins
    assert best != t["token"][int(np.argmax(t["lm_prob"]))]
    assert best != t["token"][int(np.argmin(t["degeneration_penalty"]))]
    right(ex.check_contrastive_pick(best))
    right(ex.check_contrastive_pick(" " + best.upper()))
    wrong(ex.check_contrastive_pick("star"), "alpha")
    wrong(ex.check_contrastive_pick("triangle"), "not one of")


# -- notebook 4 --------------------------------------------------------------------------
def test_clip_scores():
    right(ex.check_clip_scores(lambda c, s: torch.softmax(s * c, dim=0)))
    wrong(ex.check_clip_scores(lambda c, s: torch.softmax(c, dim=0)), "temperature")
    wrong(ex.check_clip_scores(lambda c, s: s * c), "softmax")
    # the notebook's "stored as its logarithm" invites exp(logit_scale): the checker says why it is wrong
    wrong(ex.check_clip_scores(lambda c, s: torch.softmax(math.exp(s) * c, dim=0)), "exp(logit_scale)")
    wrong(ex.check_clip_scores(lambda c, s: torch.softmax(torch.exp(torch.tensor(s)) * c, dim=0)), "1/tau")


def test_temperature():
    want = (1 / (1 + math.exp(-5)), 1 / (1 + math.exp(-0.05)))
    right(ex.check_temperature(want))
    right(ex.check_temperature([round(want[0], 3), round(want[1], 3)]))
    wrong(ex.check_temperature(want[::-1]), "swapped")
    wrong(ex.check_temperature((0.5, 0.5)))
    wrong(ex.check_temperature(0.99), "pair")
    unanswered(ex.check_temperature((None, None)))


# -- notebook 5 --------------------------------------------------------------------------
def test_magic_score():
    right(ex.check_magic_score(lambda p, s, c, a, b: (1 - a) * p - a * s + b * c))
    wrong(ex.check_magic_score(lambda p, s, c, a, b: p - a * s + b * c), "(1 - alpha)")
    wrong(ex.check_magic_score(lambda p, s, c, a, b: (1 - a) * p + a * s + b * c), "subtracted")


def test_library_magic_score_passes_its_own_checker():
    from magic_edu import magic_score

    right(ex.check_magic_score(magic_score))


def make_record(lm_prob, penalty, clip_score, alpha, beta):
    score = [(1 - alpha) * p - alpha * s + beta * c for p, s, c in zip(lm_prob, penalty, clip_score)]
    k = len(lm_prob)
    return StepRecord(step=0, text="", token_ids=list(range(k)), tokens=[" a", " red", " blue", " star"][:k],
                      lm_prob=lm_prob, degeneration_penalty=penalty, penalty_position=[0] * k,
                      clip_text=[""] * k, clip_cosine=[0.0] * k, clip_score=clip_score, score=score,
                      chosen=int(np.argmax(score)))


def test_pick_without_clip():
    rec = make_record([0.5, 0.3, 0.15, 0.05], [0.2, 0.3, 0.1, 0.9], [0.05, 0.05, 0.85, 0.05], 0.1, 2.0)
    assert rec.chosen_token == " blue"  # MAGIC takes the image's token ...
    right(ex.check_pick_without_clip(rec, 0.1, " a"))  # ... contrastive search the most probable
    right(ex.check_pick_without_clip(rec, 0.1, "a"))  # surrounding spaces do not matter
    right(ex.check_pick_without_clip(rec, 0.1, 1))  # a rank works too
    wrong(ex.check_pick_without_clip(rec, 0.1, " blue"), "Recompute")
    wrong(ex.check_pick_without_clip(rec, 0.1, "cat"), "not among")
    wrong(ex.check_pick_without_clip(rec, 0.1, 9), "rank")
    unanswered(ex.check_pick_without_clip(rec, 0.1, None))
    wrong(ex.check_pick_without_clip(None, 0.1, " a"))


def test_pick_without_clip_on_a_real_trace(tiny_lm, tiny_clip):
    from magic_edu import Stepper

    from conftest import make_image

    s = Stepper(tiny_lm, "magic", clip=tiny_clip, image=make_image(0), k=5, alpha=0.3, beta=1.0)
    rec = s.step()
    scores = [(1 - 0.3) * p - 0.3 * d for p, d in zip(rec.lm_prob, rec.degeneration_penalty)]
    right(ex.check_pick_without_clip(rec, 0.3, int(np.argmax(scores)) + 1))


# -- notebook 6 --------------------------------------------------------------------------
def test_clip_retrieval():
    right(ex.check_clip_retrieval(lambda img, txt, texts: texts[int((txt @ img).argmax())]))
    wrong(ex.check_clip_retrieval(lambda img, txt, texts: int((txt @ img).argmax())), "index")
    wrong(ex.check_clip_retrieval(lambda img, txt, texts: texts[int((txt @ img).argmin())]), "worst")


def test_decoders_that_see():
    right(ex.check_decoders_that_see({"MAGIC", "CLIP retrieval"}))
    right(ex.check_decoders_that_see(["magic", "clip retrieval"]))
    wrong(ex.check_decoders_that_see({"MAGIC"}), "CLIP retrieval")
    wrong(ex.check_decoders_that_see({"MAGIC", "CLIP retrieval", "nucleus"}), "nucleus")
    wrong(ex.check_decoders_that_see({"beam"}), "not among")
    unanswered(ex.check_decoders_that_see(set()))


# -- notebook 7 --------------------------------------------------------------------------
def test_k_equals_one():
    right(ex.check_k_equals_one("greedy"))
    right(ex.check_k_equals_one("Greedy search"))
    wrong(ex.check_k_equals_one("contrastive"), "most probable")


def test_beta_limit():
    right(ex.check_beta_limit("b"))
    right(ex.check_beta_limit("(B)"))
    wrong(ex.check_beta_limit("c"), "argmax")
    wrong(ex.check_beta_limit("e"), "none of the options")


def test_k_equals_one_holds_in_the_library(tiny_lm, tiny_clip):
    """What the checker teaches is true of the decoder: k = 1 MAGIC is greedy search."""
    from magic_edu import greedy_search, magic_search

    from conftest import make_image

    g = greedy_search(tiny_lm, max_new_tokens=8)
    m = magic_search(tiny_lm, tiny_clip, make_image(1), k=1, alpha=0.5, beta=5.0, max_new_tokens=8)
    assert m.token_ids == g.token_ids


# -- notebook 8 --------------------------------------------------------------------------
class StoryLM:
    """Enough of a LanguageModel for the story checkers."""

    prompt_format = STORY_PROMPT_FORMAT
    sos_token = None
    eos_token = "<|endoftext|>"

    def prefix_ids(self, prompt):
        return list(range(len((prompt or "").split()) + 1))


def test_story_prefix():
    lm = StoryLM()
    right(ex.check_story_prefix("a new friend <|endoftext|>", lm, "a new friend"))
    wrong(ex.check_story_prefix("a new friend<|endoftext|>", lm, "a new friend"), "spaces")
    wrong(ex.check_story_prefix("<-start_of_text->a new friend", lm, "a new friend"), "prompt_format")


def test_story_budget():
    lm = StoryLM()
    right(ex.check_story_budget(96, lm, "a new friend"))
    right(ex.check_story_budget("96", lm, "a new friend"))
    wrong(ex.check_story_budget(100, lm, "a new friend"), "count the prompt")
    wrong(ex.check_story_budget(97, lm, "a new friend"), "prefix_ids")
    wrong(ex.check_story_budget("many", lm, "a new friend"), "whole number")


# -- notebook 9 --------------------------------------------------------------------------
def rep_n(texts, n):
    unique = total = 0
    for t in texts:
        w = t.split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        unique, total = unique + len(set(grams)), total + len(grams)
    return 100 * (1 - unique / total)


def test_rep_n():
    right(ex.check_rep_n(rep_n))
    wrong(ex.check_rep_n(lambda t, n: rep_n(t, n) / 100), "percentage")
    wrong(ex.check_rep_n(lambda t, n: rep_n([" ".join(t)], n)), "across texts")


def test_rep_n_agrees_with_the_evaluation_module():
    from magic_edu.tools.evaluation import repetition_and_diversity

    texts = ["a red circle a red circle .", "a blue star on the left .", "star star star star"]
    lib = repetition_and_diversity(texts)
    for n in (2, 3, 4):
        assert math.isclose(rep_n(texts, n), lib[f"rep-{n}"])
    right(ex.check_rep_n(lambda t, n: repetition_and_diversity(t)[f"rep-{n}"]))


def test_gradient_free():
    right(ex.check_gradient_free("b"))
    wrong(ex.check_gradient_free("a"), "frozen")


def candidate_mask(past, k):
    mask = torch.zeros(k, past + k, dtype=torch.bool)
    mask[:, :past] = True
    mask[torch.arange(k), past + torch.arange(k)] = True
    return mask


def test_candidate_mask():
    right(ex.check_candidate_mask(candidate_mask))
    right(ex.check_candidate_mask(lambda past, k: candidate_mask(past, k).int().tolist()))
    wrong(ex.check_candidate_mask(lambda past, k: torch.ones(k, past + k).tril(past)), "causal")
    wrong(ex.check_candidate_mask(lambda past, k: torch.where(candidate_mask(past, k), 0.0, float("-inf"))),
          "additive")
    wrong(ex.check_candidate_mask(lambda past, k: candidate_mask(past, k)[:, past:]), "shape")
    wrong(ex.check_candidate_mask(_without_self), "itself")
    wrong(ex.check_candidate_mask(lambda past, k: torch.cat([torch.zeros(k, past, dtype=torch.bool),
                                                             torch.eye(k, dtype=torch.bool)], 1)), "cached")


def _without_self(past, k):
    mask = candidate_mask(past, k)
    mask[torch.arange(k), past + torch.arange(k)] = False
    return mask


def test_candidate_mask_is_what_the_library_attends_with(tiny_lm64):
    """The exercise's mask, as an additive mask, in a plain forward gives forward_candidates' hidden states."""
    lm = tiny_lm64
    prefix = torch.tensor([lm.prefix_ids("a red circle")])
    _, _, cache = lm.forward(prefix)
    candidates = torch.tensor([[5, 9, 13, 2]])
    hidden, _ = lm.forward_candidates(candidates, cache)
    past = prefix.shape[1]
    allowed = torch.zeros(past + 4, past + 4, dtype=torch.bool)
    allowed[:past, :past] = torch.ones(past, past, dtype=torch.bool).tril()  # the prefix: causal
    allowed[past:] = candidate_mask(past, 4)  # the candidates: the exercise's mask
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    positions = torch.cat([torch.arange(past), torch.full((4,), past)])[None]
    out = lm.model(input_ids=torch.cat([prefix, candidates], dim=1), attention_mask=additive[None, None],
                   position_ids=positions, output_hidden_states=True)
    assert torch.allclose(out.hidden_states[-1][0, past:], hidden[0], atol=1e-10)
