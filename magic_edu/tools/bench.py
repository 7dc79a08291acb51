"""Speed benchmarks: ``magic-edu bench`` prints them (figures, not timed tests).

For every decoder: milliseconds per token and per caption; for MAGIC the share of time
inside the LM and CLIP forwards, the cost of recording the trace, the gain of encoding the
candidates' shared CLIP prefix once, the extra cost over contrastive search, batch
throughput, and one interactive step's latency; and every decoder's work per step (LM and
CLIP forwards and tokens, from the steps' cost counters: :mod:`magic_edu.costs`). Models: the
toy world, and GPT-2-small + CLIP ViT-B/32 architectures with random weights (speed does not
depend on the weights).
"""

from __future__ import annotations

import contextlib
import gc
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..costs import COUNTS, Cost
from ..decoding import Stepper
from ..errors import MagicEduError
from ..models import ImageTextMatcher, LanguageModel
from ..registry import DECODERS
from ..zerocap import PROMPT as ZEROCAP_PROMPT


@dataclass
class Timing:
    label: str
    seconds: float  # median wall time of one call
    tokens: int  # tokens generated per call (all rows)
    captions: int  # captions per call
    lm_s: float = 0.0  # of which inside the LM forward
    clip_s: float = 0.0  # of which inside CLIP forwards

    @property
    def ms_per_caption(self) -> float:
        return 1000 * self.seconds / self.captions

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / max(1, self.tokens)

    @property
    def model_share(self) -> float:
        return (self.lm_s + self.clip_s) / self.seconds


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): a timer must not stop before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def forward_timers(lm: LanguageModel, clip: ImageTextMatcher | None) -> Iterator[dict[str, float]]:
    """Accumulate the time spent inside the LM's forwards (and its head) and CLIP's forwards.

    The transformers / open_clip modules themselves are timed (and, for CLIP's text tower,
    ``ImageTextMatcher.text_encoder.encode``, which counts the shared-prefix encoder's own
    packing and masks as part of the forward), so any decode loop is measured the same way; a forward
    called from inside another timed one is not counted twice.
    """
    spent = {"lm": 0.0, "clip": 0.0}
    depth = {"lm": 0, "clip": 0}
    patched: list[tuple[Any, str]] = []

    def wrap(obj: Any, name: str, key: str, device: torch.device) -> None:
        original = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if depth[key]:
                return original(*args, **kwargs)
            synchronize(device)
            depth[key] += 1
            t = time.perf_counter()
            try:
                out = original(*args, **kwargs)
                synchronize(device)
            finally:
                spent[key] += time.perf_counter() - t
                depth[key] -= 1
            return out

        patched.append((obj, name))
        setattr(obj, name, timed)  # an instance attribute, removed afterwards

    wrap(lm.model, "forward", "lm", lm.device)
    wrap(lm, "logits", "lm", lm.device)  # the LM head applied to the chosen candidates
    if clip is not None:
        # the CLIP forwards proper (tokenisation stays outside, it is glue)
        wrap(clip.text_encoder, "encode", "clip", clip.device)
        for name in ("encode_text", "encode_image"):
            wrap(clip.model, name, "clip", clip.device)
    try:
        yield spent
    finally:
        for obj, name in reversed(patched):
            del obj.__dict__[name]


def _timed_run(run: Callable[[], list], lm: LanguageModel, clip: ImageTextMatcher | None) -> tuple:
    """(seconds, of which in the LM, of which in CLIP, tokens, captions) of one call of ``run``
    (the Generations themselves are dropped: kept across rounds, their traces' many small
    objects would slow every later run through Python's garbage collector).

    Timing a forward on a GPU means waiting for it, which stops the CPU's text work from
    overlapping the GPU's; so on a GPU ``run`` is called twice, once plainly for the wall time
    and once with the forwards timed, whose shares are scaled to the plain run's time.
    """
    plain = None
    if lm.device.type == "cuda":
        synchronize(lm.device)
        t = time.perf_counter()
        run()
        synchronize(lm.device)
        plain = time.perf_counter() - t
    with forward_timers(lm, clip) as spent:
        synchronize(lm.device)
        t = time.perf_counter()
        gens = run()
        synchronize(lm.device)
        elapsed = time.perf_counter() - t
    scale = 1.0 if plain is None else plain / elapsed
    return elapsed * scale, spent["lm"] * scale, spent["clip"] * scale, sum(len(g.token_ids) for g in gens), len(gens)


def _median_timing(label: str, samples: list[tuple]) -> Timing:
    elapsed, lm_s, clip_s, tokens, captions = sorted(samples, key=lambda r: r[0])[len(samples) // 2]
    return Timing(label, elapsed, tokens, captions, lm_s, clip_s)


def time_decode(label: str, run: Callable[[], list], lm: LanguageModel, clip: ImageTextMatcher | None,
                repeats: int = 3) -> Timing:
    """Median of ``repeats`` runs (after one warm-up) of ``run`` (returns Generations)."""
    return time_decodes([(label, run, lm, clip)], repeats)[0]


def time_decodes(runs: list[tuple[str, Callable[[], list], LanguageModel, ImageTextMatcher | None]],
                 repeats: int = 3) -> list[Timing]:
    """Median of ``repeats`` rounds for each (label, run, lm, clip), after one warm-up each. Every
    round runs every entry once, so a shared machine's slow drifts touch all entries alike, and
    every other round in reverse order (the first entry of a round ran up to 20% slower)."""
    for _, run, _, _ in runs:
        run()
    samples: list[list[tuple]] = [[] for _ in runs]
    for r in range(repeats):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))  # no entry always first
        for i in order:
            _, run, lm, clip = runs[i]
            samples[i].append(_timed_run(run, lm, clip))
    return [_median_timing(label, got) for (label, *_), got in zip(runs, samples)]


def _with_clip(clip: ImageTextMatcher, run: Callable[[], list], **settings: Any) -> Callable[[], list]:
    """``run`` with some of ``clip``'s attributes changed for its duration."""
    def changed() -> list:
        before = {name: getattr(clip, name) for name in settings}
        for name, value in settings.items():
            setattr(clip, name, value)
        try:
            return run()
        finally:
            for name, value in before.items():
                setattr(clip, name, value)
    return changed


def bench_models(lm: LanguageModel, clip: ImageTextMatcher, name: str, batches: tuple[int, ...], tokens: int,
                 k: int = 45, alpha: float = 0.1, beta: float = 2.0, repeats: int = 3,
                 reference: bool = False) -> list[Timing]:
    """Every decoder at batch 1, MAGIC at every batch size, MAGIC's variants and the
    authors-style loop, timed in interleaved rounds; the reference loop once."""
    images = [Image.new("RGB", (224, 224), (40 + 30 * i % 200, 80, 220 - 10 * i % 200)) for i in range(max(batches))]
    common = dict(max_new_tokens=tokens, stop_at_eos=False)

    def decode(decoder: str, batch: int = 1, record: bool = True, **kw: Any) -> Callable[[], list]:
        def run() -> list:  # as the decoder functions run (no history for Back)
            if decoder == "magic":
                return Stepper(lm, "magic", clip=clip, image=images[:batch], k=k, alpha=alpha, beta=beta,
                               record=record, history=False, **common).run()
            if decoder == "contrastive":
                kw.update(k=k, alpha=alpha)
            return Stepper(lm, decoder, record=record, history=False, **common, **kw).run()
        return run

    runs = [
        (f"{name} greedy", decode("greedy"), lm, None),
        (f"{name} top-k sampling (k=40)", decode("top_k", k=40, seed=0), lm, None),
        (f"{name} nucleus sampling (p=0.95)", decode("nucleus", p=0.95, seed=0), lm, None),
        (f"{name} contrastive (k={k})", decode("contrastive"), lm, None),
        (f"{name} MAGIC (k={k})", decode("magic"), lm, clip),
        (f"{name} MAGIC, no trace", decode("magic", record=False), lm, clip),
        # the shared prefix encoded once per step, from scratch
        (f"{name} MAGIC, no CLIP reuse across steps", _with_clip(clip, decode("magic"), remember_prefixes=False),
         lm, clip),
        # every candidate text encoded in full (trimmed to the longest)
        (f"{name} MAGIC, no CLIP prefix sharing", _with_clip(clip, decode("magic"), share_prefix=False), lm, clip),
    ]
    runs += [(f"{name} MAGIC batch {b}", decode("magic", batch=b), lm, clip) for b in batches if b > 1]
    if max(batches) > 1:  # what the trace and the prefix sharing cost or save at the largest batch
        top = max(batches)
        runs.append((f"{name} MAGIC batch {top}, no trace", decode("magic", batch=top, record=False), lm, clip))
        runs.append((f"{name} MAGIC batch {top}, no CLIP prefix sharing",
                     _with_clip(clip, decode("magic", batch=top), share_prefix=False), lm, clip))
    runs.append((f"{name} authors-style loop", _as_generations(
        lambda: authors_style_magic(lm, clip, images[0], k=k, alpha=alpha, beta=beta, max_new_tokens=tokens)),
        lm, clip))
    out = time_decodes(runs, repeats)
    if reference:
        from ..reference import magic_reference

        out.append(time_decode(f"{name} reference loop (no cache, no batching)", _as_generations(
            lambda: magic_reference(lm, clip, images[0], k=k, alpha=alpha, beta=beta, max_new_tokens=tokens,
                                    stop_at_eos=False)), lm, clip, 1))
    return out


def _as_generations(run_ids: Callable[[], list[int]]) -> Callable[[], list]:
    from ..trace import Generation, Trace

    return lambda: [Generation("", run_ids(), Trace({}, [], []))]


@torch.no_grad()
def authors_style_magic(lm: LanguageModel, clip: ImageTextMatcher, image: Any, *, k: int, alpha: float, beta: float,
                        max_new_tokens: int, clip_text_max_len: int = 60) -> list[int]:
    """MAGIC done the way the paper's public code spends its time (our own re-creation of its
    costs, for comparison; same tokens as :class:`~magic_edu.decoding.Stepper`): at every step
    the KV cache is copied k times and the k candidates run as a batch, every candidate's whole
    text is decoded and CLIP-tokenised again, and CLIP encodes every text from scratch at its
    full context length. Runs every step (no stop at EOS)."""
    prefix = lm.prefix_ids(None)
    image_embedding = clip.embed_image(image).double()
    logits, hidden, cache = lm.forward(torch.tensor([prefix], device=lm.device))
    logits, context = logits[:, -1], hidden.double()
    generated: list[int] = []
    for _ in range(max_new_tokens):
        top_p, top_ids = torch.softmax(logits.double(), dim=-1).topk(k)  # (1, k)
        copies = [(key.repeat(k, 1, 1, 1), value.repeat(k, 1, 1, 1)) for key, value in cache]
        logits_k, hidden_k, cache_k = lm.forward(top_ids.view(k, 1), copies)
        h = F.normalize(hidden_k[:, -1].double(), dim=-1)
        penalty = (h @ F.normalize(context[0], dim=-1).T).max(dim=-1).values
        texts = [lm.decode((generated + [v])[-clip_text_max_len:]).split(lm.eos_token)[0] for v in top_ids[0].tolist()]
        text_embedding = F.normalize(clip.model.encode_text(clip.tokenizer(texts).to(clip.device)).double(), dim=-1)
        clip_score = torch.softmax(clip.logit_scale * (text_embedding @ image_embedding.to(clip.device)), dim=0)
        score = (1 - alpha) * top_p[0] - alpha * penalty.to(top_p.device) + beta * clip_score.to(top_p.device)
        best = int(score.argmax())
        generated.append(int(top_ids[0, best]))
        cache = [(key[best: best + 1], value[best: best + 1]) for key, value in cache_k]
        logits, context = logits_k[best: best + 1, -1], torch.cat([context, hidden_k[best: best + 1].double()], dim=1)
    return generated


def step_latency(lm: LanguageModel, clip: ImageTextMatcher, k: int, alpha: float, beta: float,
                 steps: int = 10) -> float:
    """Median ms of one interactive MAGIC step (Stepper.step with its trace record)."""
    s = Stepper(lm, "magic", clip=clip, image=Image.new("RGB", (96, 96), "white"), k=k, alpha=alpha, beta=beta,
                max_new_tokens=steps + 1, stop_at_eos=False)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        s.step()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


# -- work per step -------------------------------------------------------------------------------
@dataclass
class Work:
    """A decode's work, from its trace's cost counters: ``total`` over its ``steps`` steps (all rows of
    the batch together), and ``setup``, the work before the first step."""

    label: str
    steps: int
    total: Cost
    setup: Cost

    def per_step(self, name: str) -> float:
        """The mean of one of :class:`~magic_edu.costs.Cost`'s fields over the steps."""
        return getattr(self.total, name) / max(1, self.steps)


def work_per_step(lm: LanguageModel, clip: ImageTextMatcher, tokens: int, k: int = 45, alpha: float = 0.1,
                  beta: float = 2.0, num_beams: int = 4) -> list[Work]:
    """Every decoder's work on one caption of ``tokens`` tokens (no stop at EOS), as the steps' cost
    counters record it; MAGIC as the decoder functions run it (CLIP prefixes reused across steps)."""
    image = Image.new("RGB", (224, 224), (70, 80, 210))
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("greedy", "greedy", {}), ("top-k sampling (k=40)", "top_k", dict(k=40, seed=0)),
        ("nucleus sampling (p=0.95)", "nucleus", dict(p=0.95, seed=0)),
        ("typical sampling (mass=0.95)", "typical", dict(mass=0.95, seed=0)),
        (f"beam search ({num_beams} beams)", "beam", dict(num_beams=num_beams)),
        (f"contrastive (k={k})", "contrastive", dict(k=k, alpha=alpha)),
        (f"MAGIC (k={k})", "magic", dict(k=k, alpha=alpha, beta=beta, clip=clip, image=image)),
        (zerocap_label(), "zerocap", dict(clip=clip, image=image)),
    ]
    out = []
    for label, decoder, params in runs:
        trace = Stepper(lm, decoder, max_new_tokens=tokens, stop_at_eos=False, history=False, **params).run()[0].trace
        out.append(Work(label, len(trace), sum((r.cost for r in trace), Cost()), trace.setup_cost))
    return out


def format_work(works: list[Work]) -> str:
    """A table of the work per step (means over the steps) and before the first step."""
    lines = ["| decoder | LM forwards / step | LM tokens / step | backward passes / step | CLIP texts / step "
             "| CLIP text tokens / step | ms / step | before step 1: LM tokens, CLIP images |",
             "|---|---|---|---|---|---|---|---|"]
    for w in works:
        lines.append(f"| {w.label} | {w.per_step('lm_forwards'):.1f} | {w.per_step('lm_tokens'):.1f} "
                     f"| {w.per_step('lm_backwards'):.1f} | {w.per_step('clip_texts'):.1f} "
                     f"| {w.per_step('clip_text_tokens'):.1f} | {1000 * w.per_step('seconds'):.1f} "
                     f"| {w.setup.lm_tokens}, {w.setup.clip_images} |")
    return "\n".join(lines)


# -- MAGIC vs ZeroCap -----------------------------------------------------------------------------
VERSUS_TOY_IMAGES = 10  # held-out toy scenes MAGIC and ZeroCap both caption
VERSUS_TOKENS = 16  # tokens per toy caption in that comparison (a toy caption is 8-16 tokens)
PAPER_ZEROCAP_SPEEDUP = 27  # Su et al. 2022, abstract: MAGIC decodes "nearly 27 times" faster than ZeroCap


def zerocap_label() -> str:
    """ZeroCap's row label, with the settings that set its cost (the registry's defaults)."""
    d = {p.name: p.default for p in DECODERS["zerocap"].params}
    return (f"ZeroCap ({d['num_beams']} beam, {d['num_iterations']} iterations, "
            f"{d['candidates']} candidates)")


@dataclass
class Versus:
    """MAGIC and ZeroCap on the same images, each caption ``tokens`` long: mean seconds per caption
    and the work of one caption (the models' cost counters), each decoder with ``settings``."""

    label: str
    images: int
    tokens: int
    magic_s: float
    zerocap_s: float
    magic_work: Cost
    zerocap_work: Cost
    settings: dict[str, dict[str, Any]]

    @property
    def speedup(self) -> float:
        """How many times faster MAGIC writes a caption than ZeroCap."""
        return self.zerocap_s / self.magic_s


def _work(lm: LanguageModel, clip: ImageTextMatcher, run: Callable[[], Any]) -> tuple[float, Cost]:
    """(seconds, the two models' work) of one call of ``run``."""
    lm_before, clip_before = lm.cost.copy(), clip.cost.copy()
    synchronize(lm.device)
    t = time.perf_counter()
    run()
    synchronize(lm.device)
    seconds = time.perf_counter() - t
    work = (lm.cost - lm_before) + (clip.cost - clip_before)
    work.seconds = seconds
    return seconds, work


def magic_vs_zerocap(lm: LanguageModel, clip: ImageTextMatcher, images: list[Any], tokens: int, label: str,
                     magic: dict[str, Any], zerocap: dict[str, Any] | None = None) -> Versus:
    """Caption every image with MAGIC (settings ``magic``: k, alpha, beta, prompt) and ZeroCap
    (``zerocap``: any of its settings, the registry's defaults for the rest, its prompt "Image of
    a" unless given), one image at a time,
    the two alternately, each ``tokens`` tokens long (no stop at EOS, so both do the same number
    of steps); after one short warm-up of each. Neither records a trace."""
    zerocap = {"prompt": ZEROCAP_PROMPT, **(zerocap or {})}
    common = dict(max_new_tokens=tokens, stop_at_eos=False, record=False, history=False)

    def run(decoder: str, image: Any, settings: dict[str, Any], **kw: Any) -> Callable[[], Any]:
        return lambda: Stepper(lm, decoder, clip=clip, image=image, **settings, **{**common, **kw}).run()

    run("magic", images[0], magic, max_new_tokens=2)()
    run("zerocap", images[0], zerocap, max_new_tokens=2)()
    seconds = {"magic": 0.0, "zerocap": 0.0}
    work = {"magic": Cost(), "zerocap": Cost()}
    for image in images:
        for decoder, settings in (("magic", magic), ("zerocap", zerocap)):
            s, w = _work(lm, clip, run(decoder, image, settings))
            seconds[decoder] += s
            work[decoder] += w
    n = len(images)
    per_caption = {d: Cost(**{f: getattr(w, f) // n for f in COUNTS}, seconds=w.seconds / n) for d, w in work.items()}
    return Versus(label, n, tokens, seconds["magic"] / n, seconds["zerocap"] / n, per_caption["magic"],
                  per_caption["zerocap"], {"magic": dict(magic), "zerocap": zerocap})


def format_versus(v: Versus) -> list[str]:
    """The comparison as lines: time per caption, the speed-up beside the paper's, the work."""
    def work(c: Cost) -> str:
        return (f"{c.lm_forwards} LM forwards ({c.lm_tokens} tokens), {c.lm_backwards} backward passes, "
                f"{c.clip_texts} CLIP texts ({c.clip_text_tokens} tokens)")
    return [
        f"MAGIC vs ZeroCap, {v.label}: {v.images} images, {v.tokens} tokens each: MAGIC {1000 * v.magic_s:.0f} ms, "
        f"ZeroCap {1000 * v.zerocap_s:.0f} ms per caption: MAGIC {v.speedup:.1f}x faster "
        f"(the paper: nearly {PAPER_ZEROCAP_SPEEDUP}x, MSCOCO on a GPU)",
        f"  work per caption: MAGIC {work(v.magic_work)}; ZeroCap {work(v.zerocap_work)}",
    ]


# -- memory ------------------------------------------------------------------------------------
def _rss_peak_kib() -> tuple[int, int]:
    """(resident, peak resident) KiB of this process (Linux /proc)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _decode_memory_child(size: str, tokens: int, history: bool, device: str, out: Any) -> None:
    """In a fresh process: the peak memory (MiB above the loaded model) and seconds of one
    contrastive decode (k = 5, alpha = 0.6, no trace) of ``tokens`` tokens."""
    from ..decoding import Stepper
    from .random_models import gpt2_small, random_language_model

    torch.set_num_threads(1)
    lm = gpt2_small() if size == "paper-size" else random_language_model(n_positions=1024)
    lm.model.to(device)
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1024
    else:
        base = _rss_peak_kib()[0]
        with open("/proc/self/clear_refs", "w") as f:  # the peak starts again from here
            f.write("5")
    t = time.perf_counter()
    Stepper(lm, "contrastive", k=5, alpha=0.6, max_new_tokens=tokens, stop_at_eos=False, record=False,
            history=history).run()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 1024 if cuda else _rss_peak_kib()[1]
    out.put(((peak - base) / 1024, seconds))


def decode_memory(tokens: int, history: bool = False, size: str = "paper-size", device: str = "cpu"
                  ) -> tuple[float, float]:
    """(peak MiB above the loaded model, seconds) of a contrastive decode of ``tokens`` tokens on the
    GPT-2-small stand-in (``size="tiny"``: a tiny random GPT-2), measured in a fresh process so no
    earlier allocation hides in the figure; ``history=True`` as a Stepper that can go back keeps."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_decode_memory_child, args=(size, tokens, history, device, out))
    child.start()
    result = out.get(timeout=1800)
    child.join()
    return result


def step_timings(models: Any, image: Any = None, steps: int = 24) -> dict[str, float]:
    """Median milliseconds of one **Next** in a :class:`StepThrough` on ``models`` (MAGIC with the
    model set's defaults, the picker's default image unless ``image`` is given):

    * ``next_ms``: the whole click (decode step, text, table, one-step plot);
    * ``answer_ms``: the click without the plot (the text and the table update first);
    * ``decode_step_ms``: ``Stepper.step`` alone; ``plot_ms``: drawing the plot as a PNG alone.

    The course asks for under 200 ms per step on the toy models."""
    import statistics

    from ..views import plots
    from ..views.widgets import StepThrough, figure_png

    widget = StepThrough(models, image)
    if widget.stepper is None:
        raise MagicEduError("step_timings: the widget could not start a decode (see its message)")
    times: dict[str, list[float]] = {"next_ms": [], "answer_ms": [], "decode_step_ms": [], "plot_ms": []}

    def timed(key: str, action: Callable[[], Any]) -> None:
        start = time.perf_counter()
        action()
        times[key].append(1000 * (time.perf_counter() - start))

    while len(times["next_ms"]) < steps:
        if widget.stepper.done:
            widget.reset()
            continue
        timed("next_ms", widget.next_button.click)
        widget.back()
        widget.show_plot = False
        timed("answer_ms", widget.next_button.click)
        widget.show_plot = True
        widget.stepper.back()
        timed("decode_step_ms", widget.stepper.step)
        timed("plot_ms", lambda: figure_png(plots.plot_step(widget.trace, -1)))
    return {key: statistics.median(values) for key, values in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def format_table(timings: list[Timing]) -> str:
    lines = ["| run | ms / caption | ms / token | in LM | in CLIP | in models |", "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t.label} | {t.ms_per_caption:.1f} | {t.ms_per_token:.2f} | {100 * t.lm_s / t.seconds:.0f}% "
                     f"| {100 * t.clip_s / t.seconds:.0f}% | {100 * t.model_share:.0f}% |")
    return "\n".join(lines)


def summary(timings: list[Timing]) -> list[str]:
    """The ratios the issue asks for, from a list of one model set's timings."""
    name = timings[0].label.rsplit(" greedy", 1)[0]  # the model set's name, as bench_models labels it
    by = {t.label[len(name) + 1:]: t for t in timings}
    magic = next(t for key, t in by.items() if key.startswith("MAGIC (k="))
    contrastive = next(t for key, t in by.items() if key.startswith("contrastive"))
    lines = [
        f"MAGIC / contrastive time per caption: {magic.seconds / contrastive.seconds:.2f}x",
        f"trace recording overhead: {100 * (magic.seconds / by['MAGIC, no trace'].seconds - 1):+.1f}%",
        f"CLIP prefix sharing speed-up (within a step and across steps): "
        f"{by['MAGIC, no CLIP prefix sharing'].seconds / magic.seconds:.2f}x, of which reuse across steps "
        f"{by['MAGIC, no CLIP reuse across steps'].seconds / magic.seconds:.2f}x",
        f"MAGIC batch 1 time inside the two models' forwards: {100 * magic.model_share:.0f}%",
    ]
    outside = [(key, t) for key, t in by.items()
               if key.startswith("MAGIC (k=") or (key.startswith("MAGIC batch") and "," not in key)]
    lines.append("MAGIC time outside the models per step (text work, tokenisation, bookkeeping): "
                 + ", ".join(f"{'batch 1' if key.startswith('MAGIC (k=') else key[6:]} "
                             f"{1000 * (t.seconds - t.lm_s - t.clip_s) * t.captions / max(1, t.tokens):.1f} ms"
                             for key, t in outside))
    for key, t in by.items():
        base, _, variant = key.partition(", ")  # e.g. "MAGIC batch 16", "no trace"
        if base.startswith("MAGIC batch"):
            batch = base[len("MAGIC "):]
            if variant == "no CLIP prefix sharing":
                lines.append(f"CLIP prefix sharing speed-up at {batch}: {t.seconds / by[base].seconds:.2f}x")
            elif variant == "no trace":
                lines.append(f"trace recording overhead at {batch}: {100 * (by[base].seconds / t.seconds - 1):+.1f}%")
            else:
                lines.append(f"{key} throughput vs batch 1: {magic.ms_per_caption / t.ms_per_caption:.2f}x")
        if key.startswith("authors-style"):
            lines.append(f"fast MAGIC vs the authors-style loop: {t.ms_per_caption / magic.ms_per_caption:.2f}x faster")
        if key.startswith("reference"):
            lines.append(f"fast MAGIC vs the reference loop: {t.ms_per_caption / magic.ms_per_caption:.1f}x faster")
    return lines


def run_benchmarks(which: str = "all", device: str | None = None, repeats: int = 3, reference: bool = True,
                   print_fn: Callable[[str], None] = print, memory: bool = True) -> dict[str, list[Timing]]:
    """Benchmark the toy models and/or the paper-sized random ones; print tables and ratios."""
    from .random_models import clip_vit_b32, gpt2_small

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    print_fn(f"machine: {machine()}; device: {device}")
    results: dict[str, list[Timing]] = {}
    if which in ("all", "toy"):
        from ..presets import load_models

        models = load_models("toy", device=device)
        d = models.defaults
        timings = bench_models(models.lm, models.clip, "toy", (1, 16), d["max_new_tokens"], d["k"], d["alpha"],
                               d["beta"], repeats, reference)
        results["toy"] = timings
        print_fn(format_table(timings))
        for line in summary(timings):
            print_fn("  " + line)
        print_fn("work per step (cost counters, one caption):")
        print_fn(format_work(work_per_step(models.lm, models.clip, d["max_new_tokens"], d["k"], d["alpha"],
                                           d["beta"])))
        from ..toyworld import shapes

        scenes = [shapes.make_scene(shapes.HELD_OUT_SEED + i, n_objects=1).image for i in range(VERSUS_TOY_IMAGES)]
        for line in format_versus(magic_vs_zerocap(models.lm, models.clip, scenes, VERSUS_TOKENS, "toy world",
                                                   {n: d[n] for n in ("k", "alpha", "beta")}, {"prompt": None})):
            print_fn("  " + line)
        print_fn(f"  StepThrough step (Stepper.step + trace record): "
                 f"{step_latency(models.lm, models.clip, d['k'], d['alpha'], d['beta']):.1f} ms")
        try:
            widget = step_timings(models)
        except ImportError as err:  # a machine without ipywidgets (e.g. a bare GPU box)
            print_fn(f"  StepThrough widget: not measured ({err})")
        else:
            print_fn("  StepThrough widget, one Next click (ms): "
                     + ", ".join(f"{key} {ms:.0f}" for key, ms in widget.items()))
    if which in ("all", "paper-size"):
        lm, clip = gpt2_small(), clip_vit_b32()
        lm.model.to(device)
        clip.model.to(device)
        batches, tokens = ((1, 16), 16) if cuda else ((1, 4), 8)
        timings = bench_models(lm, clip, "GPT-2-small + ViT-B/32", batches, tokens, 45, 0.1, 2.0, repeats,
                               reference and not cuda)
        results["paper-size"] = timings
        print_fn(format_table(timings))
        for line in summary(timings):
            print_fn("  " + line)
        print_fn("work per step (cost counters, one caption):")
        print_fn(format_work(work_per_step(lm, clip, tokens)))
        # each as its paper runs it: MAGIC from the start token, ZeroCap after "Image of a"
        images = [Image.new("RGB", (224, 224), (40 + 60 * i, 90, 200 - 50 * i)) for i in range(2 if not cuda else 4)]
        for line in format_versus(magic_vs_zerocap(lm, clip, images, tokens, "GPT-2-small + ViT-B/32",
                                                   dict(k=45, alpha=0.1, beta=2.0))):
            print_fn("  " + line)
        if memory:
            for history in (False, True):
                figures = [(n, *decode_memory(n, history, device=device)) for n in (100, 300)]
                print_fn(f"  contrastive search (k=5, alpha=0.6, no trace{', history for Back' if history else ''}), "
                         "peak memory above the model, one thread: "
                         + ", ".join(f"{n} tokens {mib:.0f} MiB ({s:.1f} s)" for n, mib, s in figures))
    return results


def add_bench_command(subparsers: Any) -> None:
    """``magic-edu bench``: print the speed figures."""
    p = subparsers.add_parser("bench", help="print decoding speed figures (ms per token and caption, shares)")
    p.add_argument("--models", choices=["all", "toy", "paper-size"], default="all",
                   help="the toy world, GPT-2-small + ViT-B/32 architectures with random weights, or both")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is shown)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference loop")
    p.add_argument("--no-memory", action="store_true", help="skip the long decodes' peak memory (paper-size)")
    p.set_defaults(func=_run_bench_command)


def _run_bench_command(args: Any) -> int:
    if args.repeats < 1:
        raise MagicEduError(f"--repeats must be at least 1; got {args.repeats}")
    try:
        device = torch.device(args.device) if args.device is not None else None
    except RuntimeError:
        raise MagicEduError(f"--device must be a torch device such as cpu, cuda or cuda:1; got {args.device!r}"
                            ) from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise MagicEduError(f"--device {args.device}: no CUDA GPU on this machine; use --device cpu")
    run_benchmarks(args.models, args.device, args.repeats, not args.no_reference, memory=not args.no_memory)
    return 0
