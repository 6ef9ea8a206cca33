"""`perfusion bench quality`: Perfusion against its baselines on the toy world, as fidelity-vs-alignment curves,
its ablations, and several concepts in one image.

Three parts (`QualityConfig.parts`), each with its own report (Markdown + JSON, and a PNG plot), so that each can
be rerun alone:

    methods     quality.*            every method's curve (below)
    ablations   quality-ablations.*  Perfusion's design choices, one at a time (bench/ablations.py)
    pairs       quality-pairs.*      two concepts trained apart, rendered together (bench/pairs.py)

Methods: for every instance (default: the toy world's reporting set), every method trains one concept from the
same photo set on the bundled toy model; then every prompt (scenes, added objects, other objects' colours,
counts) is rendered with fixed seeds at each point of the method's natural knob:

    perfusion          the gate bias β (one trained file, PERFUSION.md §7)
    lora               the LoRA scale
    ti, dreambooth,    the number of training steps (snapshots of one run)
    custom-diffusion

Each image gets fidelity (the world's instance scorer against the instance's photos) and alignment (the
world's caption scorer against the prompt with the concept word read as its supercategory, as the paper
measures it). A curve is the mean (alignment, fidelity) of each knob value, per instance and averaged.
The report also gives file sizes, training times and the paper's claim checked here: at each baseline point,
is Perfusion's curve, read at the same alignment, at or above it?

A method's concept of an instance is trained once per run, by the first part that needs it, and reused by the
others (`Bench.concept`): the ablations compare with the methods part's Perfusion concept, the pairs combine the
per-instance concepts.

Library code: prints nothing; progress and messages through callbacks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PerfusionError

PROMPTS = (
    "a {} on a beach",                              # scenes
    "a {} in the snow",
    "a {} at night",
    "a {} in the desert",
    "a {} and a red ball on grass",                 # an added object
    "a {} and a blue car on the water",             # another object's colour
    "a {} and two yellow boxes on grass",           # counts
    "a {} and a green striped tree in the snow",    # another object's pattern
)
PAIR_PROMPTS = (                                    # {a}, {b}: the two concepts; several scenes, both orders
    "a {a} and a {b} on grass",
    "a {a} and a {b} on a beach",
    "a {a} and a {b} in the snow",
    "a {b} and a {a} at night",
)
METHOD_ORDER = ("perfusion", "ti", "dreambooth", "lora", "custom-diffusion")
PARTS = ("methods", "ablations", "pairs")
ABLATIONS = ("no-key-lock", "rome", "mask", "one-photo", "global-lock", "train-beta", "word-scope")  # ablations.py
COLOURS = {"perfusion": (214, 39, 40), "ti": (31, 119, 180), "dreambooth": (44, 160, 44), "lora": (255, 127, 14),
           "custom-diffusion": (148, 103, 189), "base model": (90, 90, 90)}
WORD = "myconcept"   # the concept word in prompts: a label only (text.py writes it as its supercategory word)


@dataclass
class QualityConfig:
    instances: str | tuple[str, ...] = "reporting"   # "reporting", "development", or instance names
    methods: tuple[str, ...] = METHOD_ORDER
    steps: int = 400                                 # training steps of every method
    photos: int = 6
    prompts: tuple[str, ...] = PROMPTS
    seeds: int = 2                                   # images per prompt and knob value
    biases: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)          # perfusion
    lora_scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)       # lora
    step_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)          # ti, dreambooth, custom-diffusion
    render_steps: int | None = None                  # sampling steps (None: the toy profile's, 30)
    seed: int = 0
    device: str = "cpu"
    quick: bool = False                              # CI: one instance, tiny settings (keeps the path alive)
    parts: tuple[str, ...] = PARTS                   # which reports to make
    ablations: tuple[str, ...] = ABLATIONS           # the ablations part's variants (bench/ablations.py)
    train_betas: tuple[float, ...] = (0.6, 0.9)      # ablation "train-beta": against TrainConfig's 0.75
    pair_prompts: tuple[str, ...] = PAIR_PROMPTS
    pair_lora_scales: tuple[float, ...] = (0.5, 1.0)  # pairs: both LoRAs at this scale each
    prior_images: int | None = None                  # DreamBooth's class images (None: its recipe's)
    prior_steps: int | None = None                   # ... and their sampling steps (None: its recipe's)
    reuse: str | None = None                         # a previous methods report (JSON): its methods not in `methods`
                                                     # are carried over, not retrained (see carry_over)

    @classmethod
    def quick_config(cls, **overrides) -> "QualityConfig":
        base = dict(instances=("hatcat",), steps=2, photos=4, prompts=PROMPTS[:1], seeds=1, biases=(0.5, 0.9),
                    lora_scales=(0.5, 1.0), step_fractions=(0.5, 1.0), render_steps=2, quick=True,
                    pair_prompts=PAIR_PROMPTS[:1], prior_images=2, prior_steps=2)
        return cls(**{**base, **overrides})


def instance_names(spec) -> list[str]:
    from ..toyworld import world as tw

    if spec == "reporting":
        return [i.name for i in tw.REPORTING_INSTANCES]
    if spec in ("development", "dev"):
        return [i.name for i in tw.DEV_INSTANCES]
    names = [spec] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if n not in tw.INSTANCES_BY_NAME]
    if bad:
        raise PerfusionError(f"unknown instance(s) {', '.join(bad)}; use reporting, development or names from "
                             "`perfusion toyworld instances`")
    return names


def development_config(names: str, **fields) -> QualityConfig:
    """The QualityConfig of a script that chooses a setting: `names` (comma-separated) must all be development
    instances, so that the reporting ones stay unseen until `perfusion bench quality` measures the choice. Fields
    given as None keep their defaults."""
    from ..toyworld import world as tw

    chosen = instance_names([n.strip() for n in names.split(",") if n.strip()])
    seen = sorted({i.name for i in tw.REPORTING_INSTANCES} & set(chosen))
    if seen:
        raise PerfusionError(f"{', '.join(seen)} are reporting instances: choose on development ones")
    return QualityConfig(instances=tuple(chosen), **{k: v for k, v in fields.items() if v is not None})


def _unknown(kind: str, given, known) -> None:
    bad = [x for x in given if x not in known]
    if bad:
        raise PerfusionError(f"unknown {kind}(s) {', '.join(bad)}; choose from {', '.join(known)}")


def check_config(cfg: QualityConfig) -> None:
    from ..methods import METHODS

    _unknown("method", cfg.methods, METHODS)
    _unknown("part", cfg.parts, PARTS)
    _unknown("ablation", cfg.ablations, ABLATIONS)
    if not cfg.parts:
        raise PerfusionError(f"--parts needs at least one of {', '.join(PARTS)}")
    if cfg.steps < 1 or cfg.seeds < 1 or cfg.photos < 1:
        raise PerfusionError("--steps, --seeds and --photos must be at least 1")
    if any(p.count("{}") != 1 for p in cfg.prompts):
        raise PerfusionError("each prompt needs exactly one {} for the concept")
    if any(p.count("{a}") != 1 or p.count("{b}") != 1 for p in cfg.pair_prompts):
        raise PerfusionError("each pair prompt needs exactly one {a} and one {b} for the two concepts")
    if not all(0.0 <= b <= 1.0 for b in cfg.train_betas):
        raise PerfusionError("training biases of the train-beta ablation must be between 0 and 1")
    instance_names(cfg.instances)


# settings that decide a method's numbers: a carried-over method must have been measured with the same ones
REUSE_MUST_MATCH = ("steps", "photos", "prompts", "seeds", "lora_scales", "step_fractions", "render_steps", "seed",
                    "prior_images", "prior_steps")


def load_reused(cfg: QualityConfig) -> dict:
    """The previous methods report cfg.reuse names, checked against cfg: it must cover cfg's instances with the
    same settings (REUSE_MUST_MATCH), else a PerfusionError says which differ."""
    path = Path(cfg.reuse)
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PerfusionError(f"--reuse {path}: cannot read it as a quality report ({e.__class__.__name__}); "
                             "give the quality.json of an earlier `perfusion bench quality` run") from None
    if not isinstance(prev, dict) or prev.get("part", "methods") != "methods" or "results" not in prev:
        raise PerfusionError(f"--reuse {path}: not a methods report (quality.json) of `perfusion bench quality`")
    now = asdict(cfg)
    prev_cfg = prev.get("config", {})
    differ = [k for k in REUSE_MUST_MATCH if k in prev_cfg and _plain(prev_cfg[k]) != _plain(now[k])]
    if differ:
        raise PerfusionError(f"--reuse {path}: measured with other {', '.join(differ)}; rerun those methods instead")
    missing = [n for n in instance_names(cfg.instances) if n not in prev["results"]]
    if missing:
        raise PerfusionError(f"--reuse {path}: has no results for {', '.join(missing)}")
    return prev


PAIRS_REUSE_MUST_MATCH = REUSE_MUST_MATCH + ("pair_prompts", "pair_lora_scales")


def load_reused_pairs(cfg: QualityConfig, prev: dict, say: Callable[[str], None]) -> dict | None:
    """The pairs report beside the reused methods report `prev` (load_reused): its combinations of the methods
    this run does not measure are carried over by the pairs part (pairs.run_pairs), so that re-measuring one
    method's recipe needs no other method's training. None, said through `say`, when there is none beside it;
    a PerfusionError when it was made with other settings."""
    path = Path(cfg.reuse).parent / (report_stem("pairs", bool(prev.get("config", {}).get("quick"))) + ".json")
    if not path.is_file():
        say(f"no {path.name} beside --reuse {cfg.reuse}: the pairs part measures every combination")
        return None
    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PerfusionError(f"--reuse: cannot read {path} as a pairs report ({e.__class__.__name__}); "
                             "move it away to measure every combination") from None
    if not isinstance(rep, dict) or rep.get("part") != "pairs" or "results" not in rep:
        raise PerfusionError(f"--reuse: {path} is not a pairs report of `perfusion bench quality`; move it away "
                             "to measure every combination")
    now, prev_cfg = asdict(cfg), rep.get("config", {})
    differ = [k for k in PAIRS_REUSE_MUST_MATCH if k in prev_cfg and _plain(prev_cfg[k]) != _plain(now[k])]
    if differ:
        raise PerfusionError(f"--reuse: {path} was measured with other {', '.join(differ)}; move it away to "
                             "measure every combination")
    rep["path"] = str(path)
    return rep


def _plain(x):
    return list(x) if isinstance(x, (list, tuple)) else x


def carry_over(prev: dict, cfg: QualityConfig, names: list[str], results: dict, sizes: dict, train_s: dict) -> dict:
    """Copy into this run's results every method of the reused report `prev` (load_reused) that this run does not
    measure itself (per instance curves, file sizes, training times); returns {method: where it came from}."""
    m = prev.get("machine", {})
    carried = {}
    for method in METHOD_ORDER:
        if method in cfg.methods or not all(method in prev["results"][n] for n in names):
            continue
        for n in names:
            results[n][method] = prev["results"][n][method]
        if method in prev.get("file_bytes", {}):
            sizes[method] = [prev["file_bytes"][method]]
        if method in prev.get("train_seconds", {}):
            train_s[method] = [prev["train_seconds"][method]]
        carried[method] = {"report": str(cfg.reuse), "measured": m.get("date"), "git_commit": m.get("git_commit"),
                           "perfusion": m.get("perfusion")}
    return carried


class Bench:
    """What the parts of one run share: the toy base model and its C, the render settings, each instance's
    photos, and every concept trained so far, kept in memory while a later part needs it."""

    def __init__(self, cfg: QualityConfig, progress: Callable[[str, int, int], None], say: Callable[[str], None]):
        from .. import covariance, models
        from ..edit import inverse_covariance

        self.cfg, self.progress, self.say = cfg, progress, say
        self.names = instance_names(cfg.instances)
        say("loading the toy base model")
        self.base = models.load("toyworld", device=cfg.device, dtype="fp32")
        self.cov = covariance.for_model(self.base)
        self.C_inv = inverse_covariance(self.cov.C)
        render = self.base.profile.render or {}
        self.kw = dict(height=self.base.resolution, width=self.base.resolution, output_type="np",
                       num_inference_steps=cfg.render_steps or int(render.get("steps", 30)),
                       guidance_scale=float(render.get("cfg", 4.0)))
        models.set_sampler(self.base.pipe, render.get("sampler", "ddim"))
        self.concepts: dict[tuple[str, str], object] = {}          # (instance, method) -> concept.Concept
        self.snapshots: dict[tuple[str, str], dict[int, object]] = {}  # ... -> {steps: Concept} (steps knob)
        self.train_seconds: dict[tuple[str, str], float] = {}
        self._photos: dict[str, object] = {}
        self._points: dict[tuple, dict] = {}    # (instance, key) -> a rendered point, for renders parts share
        # methods whose concepts later parts reuse: the ablations compare with Perfusion's, the pairs combine
        # Perfusion's, TI's and LoRA's; others (a toy DreamBooth concept is 26 MB) are dropped once rendered
        self.reused: dict | None = None  # the --reuse report (load_reused), set by run_quality
        self.reused_pairs: dict | None = None  # the pairs report beside it (load_reused_pairs), set by run_quality
        self.kept = ({"perfusion"} if {"ablations", "pairs"} & set(cfg.parts) else set()) | \
                    ({"ti", "lora"} if "pairs" in cfg.parts else set())

    # -- photos and concepts --------------------------------------------------------------------
    def photos(self, name: str):
        """The instance's photo set (cfg.photos photos), as `perfusion train` would read it from a folder."""
        if name not in self._photos:
            import tempfile

            from ..images import load_photos
            from ..toyworld.demo import write_photos

            with tempfile.TemporaryDirectory(prefix="perfusion-quality-") as d:
                write_photos(name, self.cfg.photos, Path(d), self.cfg.seed)
                self._photos[name] = load_photos(d, self.base.resolution)
        return self._photos[name]

    def train_perfusion(self, name: str, stage: str, photos: int | None = None, **overrides):
        """A Perfusion concept of `name` trained as `perfusion train` would (the toy profile's recipe) with the bench's
        steps, TrainConfig fields `overrides`, on the first `photos` photos (None: all)."""
        from ..images import PhotoSet
        from ..toyworld import world as tw
        from ..training import Trainer, config_for

        ps = self.photos(name)
        if photos is not None:
            ps = PhotoSet(pixels=ps.pixels[:photos], paths=ps.paths[:photos])
        cfg = config_for(self.base.profile.train, **{**dict(steps=self.cfg.steps, batch_size=4, grad_accum=1,
                                                             seed=self.cfg.seed, checkpoint_every=0), **overrides})
        trainer = Trainer(self.base, WORD, tw.INSTANCES_BY_NAME[name].supercategory, self.C_inv, cfg)
        return trainer.fit(ps, progress=lambda p: self.progress(stage, p.step, p.steps))

    def _train_baseline(self, name: str, method: str, stage: str):
        from ..methods import recipe, train_baseline
        from ..toyworld import world as tw

        cfg = self.cfg
        snaps: dict[int, object] = {}
        over = {k: v for k, v in (("prior_images", cfg.prior_images), ("prior_steps", cfg.prior_steps))
                if v is not None}
        mcfg = recipe(method, steps=cfg.steps, batch_size=4, seed=cfg.seed, **over)
        concept = train_baseline(self.base, WORD, tw.INSTANCES_BY_NAME[name].supercategory, self.photos(name), mcfg,
                                 progress=lambda p: self.progress(stage, p.step, p.steps),
                                 snapshots=tuple(self.step_knobs()), on_snapshot=snaps.__setitem__)
        snaps[cfg.steps] = concept
        return concept, snaps

    def step_knobs(self) -> list[int]:
        """The training steps at which the steps-knob methods are rendered."""
        return sorted({max(1, round(fr * self.cfg.steps)) for fr in self.cfg.step_fractions})

    def concept(self, name: str, method: str, stage: str | None = None):
        """`method`'s concept of instance `name` (word WORD), trained on first use."""
        key = (name, method)
        if key not in self.concepts:
            stage = stage or f"{name}: {method}"
            self.say(f"{stage}: training {self.cfg.steps} steps")
            t = time.perf_counter()
            if method == "perfusion":
                self.concepts[key] = self.train_perfusion(name, stage)
            else:
                self.concepts[key], self.snapshots[key] = self._train_baseline(name, method, stage)
            self.train_seconds[key] = time.perf_counter() - t
        return self.concepts[key]

    def release(self, name: str, method: str) -> None:
        """Drop the snapshots, and the concept unless a later part of the run needs it."""
        self.snapshots.pop((name, method), None)
        if method not in self.kept:
            self.concepts.pop((name, method), None)

    # -- rendering and scoring ------------------------------------------------------------------
    def images(self, call: Callable, prompts) -> list[list[np.ndarray]]:
        """Every prompt rendered with the fixed seeds by call(prompt, generators) -> float images in [0, 1];
        returns uint8 images, per prompt."""
        out = []
        for prompt in prompts:
            gens = [torch.Generator("cpu").manual_seed(self.cfg.seed + s) for s in range(self.cfg.seeds)]
            with torch.no_grad():
                arr = call(prompt, gens)
            out.append(list((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)))
        return out

    def base_call(self) -> Callable:
        return lambda p, g: self.base.pipe([p] * len(g), generator=g, **self.kw).images

    def applied_call(self, applied) -> Callable:
        return lambda p, g: applied([p] * len(g), generator=g, **self.kw).images

    def score(self, name: str, images: list[list[np.ndarray]]) -> dict:
        """Fidelity to instance `name` and alignment to each prompt of cfg.prompts (the concept read as its
        supercategory) of images[prompt][seed]: means and per-image values."""
        from ..toyworld import evaluate as ev
        from ..toyworld import world as tw

        sup = tw.INSTANCES_BY_NAME[name].supercategory
        fid, ali = [], []
        for template, ims in zip(self.cfg.prompts, images):
            for im in ims:
                fid.append(ev.fidelity(im, name))
                ali.append(ev.alignment(im, template.format(sup)))
        return {"fidelity": float(np.mean(fid)), "alignment": float(np.mean(ali)),
                "fidelity_per_image": [round(x, 4) for x in fid], "alignment_per_image": [round(x, 4) for x in ali]}

    def point(self, name: str, concepts: list, opts: dict, key: tuple | None = None) -> dict:
        """cfg.prompts rendered with `concepts` applied (rendering.Applied options `opts`), scored. A `key` names
        a render that several parts make (the same concept, options, prompts and seeds give the same images):
        it is made once."""
        from ..rendering import Applied

        if key is not None and (name, key) in self._points:
            return self._points[(name, key)]
        with Applied(self.base.pipe, concepts, self.cov.C, **opts) as applied:
            prompts = [p.format(WORD) for p in self.cfg.prompts]
            point = self.score(name, self.images(self.applied_call(applied), prompts))
        if key is not None:
            self._points[(name, key)] = point
        return point

    def base_point(self, name: str) -> dict:
        """The base model's own renders of cfg.prompts with the supercategory word: a reference point."""
        from ..toyworld import world as tw

        sup = tw.INSTANCES_BY_NAME[name].supercategory
        return self.score(name, self.images(self.base_call(), [p.format(sup) for p in self.cfg.prompts]))

    def info(self) -> dict:
        """What every part's report says about where and with what it ran."""
        from .speed import machine_info

        return {"config": {**asdict(self.cfg), "instances": self.names}, "machine": machine_info(self.base.device),
                "model": self.base.id}


def perfusion_key(beta: float, tau: float) -> tuple:
    """Bench.point key of the plain Perfusion concept rendered at (β, τ): the methods part's curve and the
    ablations' reference point and bias curve share these renders."""
    return ("perfusion", float(beta), float(tau))


def run_quality(config: QualityConfig | None = None, progress: Callable[[str, int, int], None] | None = None,
                on_event: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run the configured parts (cfg.parts, in PARTS order); returns {part: its report (JSON-ready dict)}."""
    from . import ablations, pairs

    cfg = config or QualityConfig()
    check_config(cfg)
    reused = load_reused(cfg) if cfg.reuse is not None else None   # checked before the model loads
    bench = Bench(cfg, progress or (lambda *a: None), on_event or (lambda m: None))
    bench.reused = reused
    if reused is not None and "pairs" in cfg.parts:
        bench.reused_pairs = load_reused_pairs(cfg, reused, bench.say)
    runners = {"methods": run_methods, "ablations": ablations.run_ablations, "pairs": pairs.run_pairs}
    reports = {}
    for part in PARTS:
        if part in cfg.parts:
            t = time.perf_counter()
            reports[part] = {"benchmark": "perfusion bench quality", "part": part, "format_version": 1,
                             **runners[part](bench), **bench.info()}
            # this part's own time: concepts an earlier part of the run trained are not counted again
            reports[part]["total_s"] = time.perf_counter() - t
    return reports


# -- part 1: methods ----------------------------------------------------------------------------

def _knob_points(bench: Bench, name: str, method: str, concept) -> list[tuple]:
    """(knob value, concept, Applied options, Bench.point key) of each point of the method's curve."""
    from ..rendering import Gate

    cfg = bench.cfg
    if method == "perfusion":
        tau = concept.tensors.tau
        return [(b, concept, {"gates": {WORD: Gate(b, tau)}}, perfusion_key(b, tau)) for b in cfg.biases]
    if method == "lora":
        return [(sc, concept, {"scales": {WORD: sc}}, None) for sc in cfg.lora_scales]
    snaps = bench.snapshots[(name, method)]
    return [(s, snaps[s], {}, None) for s in bench.step_knobs()]


def run_methods(bench: Bench) -> dict:
    """Every method's curve on every instance (the module docstring): the methods report's own fields."""
    from ..concept import ConceptSet, to_bytes

    cfg = bench.cfg
    results: dict[str, dict] = {}
    sizes: dict[str, list[int]] = {m: [] for m in cfg.methods}
    train_s: dict[str, list[float]] = {m: [] for m in cfg.methods}
    for ii, name in enumerate(bench.names):
        inst = {"base model": [{"knob": None, **_means(bench.base_point(name))}]}
        for method in cfg.methods:
            stage = f"{name} ({ii + 1}/{len(bench.names)}): {method}"
            concept = bench.concept(name, method, stage)
            train_s[method].append(bench.train_seconds[(name, method)])
            cs = ConceptSet(name=WORD, concepts=[concept], base_model={"id": bench.base.id},
                            covariance=bench.cov.info)
            sizes[method].append(len(to_bytes(cs, torch.float16)))
            points = _knob_points(bench, name, method, concept)
            curve = []
            for k, (knob, c, opts, key) in enumerate(points):
                bench.progress(f"{stage}: rendering", k, len(points))
                curve.append({"knob": knob, **bench.point(name, [c], opts, key)})
            bench.progress(f"{stage}: rendering", len(points), len(points))
            inst[method] = curve
            bench.release(name, method)
        results[name] = inst
    carried = carry_over(bench.reused, cfg, bench.names, results, sizes, train_s) if bench.reused else {}
    methods = [m for m in METHOD_ORDER if m in cfg.methods or m in carried]   # cfg.methods ⊆ METHOD_ORDER
    return {
        "knobs": {"perfusion": "gate bias", "lora": "LoRA scale", "ti": "training steps",
                  "dreambooth": "training steps", "custom-diffusion": "training steps"},
        "images_per_point": len(cfg.prompts) * cfg.seeds,
        "results": results, **derived(results, methods),
        "file_bytes": {m: int(np.mean(v)) for m, v in sizes.items() if v},
        "train_seconds": {m: float(np.mean(v)) for m, v in train_s.items() if v},
        "carried_over": carried,
    }


def derived(results: dict, methods) -> dict:
    """What the methods report computes from its per-instance results: the mean curves and the claim checks.
    Also how a report written before a check existed gets it (scripts/rewrite_reports.py)."""
    mean = _mean_curves(results, methods)
    claim = {m: dominance(mean["perfusion"], mean[m]) for m in methods if m != "perfusion" and "perfusion" in mean}
    return {"mean": mean, "claim_perfusion_at_or_above": claim,
            "claim_per_instance": {n: {m: dominance(r["perfusion"], r[m]) for m in methods if m != "perfusion"}
                                   for n, r in results.items() if "perfusion" in r},
            "claim_with_noise": {m: noise_check(results, m) for m in claim}}


def _means(point: dict) -> dict:
    return {"fidelity": point["fidelity"], "alignment": point["alignment"]}


def _mean_curves(results: dict, methods) -> dict:
    out = {}
    for m in ("base model", *methods):
        curves = [r[m] for r in results.values() if m in r]
        if not curves:
            continue
        out[m] = [{"knob": curves[0][k]["knob"],
                   "fidelity": float(np.mean([c[k]["fidelity"] for c in curves])),
                   "alignment": float(np.mean([c[k]["alignment"] for c in curves]))}
                  for k in range(len(curves[0]))]
    return out


def dominance(perfusion: list[dict], other: list[dict]) -> dict:
    """At each of `other`'s points, Perfusion's fidelity at the same alignment (linear interpolation along
    its curve sorted by alignment; points outside Perfusion's alignment range are not matched): how many
    matched points Perfusion is at or above, of how many matched."""
    pts = sorted((p["alignment"], p["fidelity"]) for p in perfusion)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    matched = above = 0
    for q in other:
        if not xs or q["alignment"] < xs[0] or q["alignment"] > xs[-1]:
            continue
        matched += 1
        if float(np.interp(q["alignment"], xs, ys)) >= q["fidelity"]:
            above += 1
    return {"matched": matched, "at_or_above": above, "share": (above / matched) if matched else None,
            "points": len(other)}


def pareto(perfusion: list[dict], other: list[dict]) -> dict:
    """Who beats whom on both axes: a point beats another if it is at least as aligned and at least as
    faithful (and not identical). Counts the other method's points beaten by some Perfusion point, and
    Perfusion's points beaten by some point of the other method."""
    def beats(p, q):
        return (p["alignment"] >= q["alignment"] and p["fidelity"] >= q["fidelity"]
                and (p["alignment"], p["fidelity"]) != (q["alignment"], q["fidelity"]))

    return {"other_beaten": sum(any(beats(p, q) for p in perfusion) for q in other), "other_points": len(other),
            "perfusion_beaten": sum(any(beats(q, p) for q in other) for p in perfusion),
            "perfusion_points": len(perfusion)}


def _per_image(results: dict, method: str, k: int, axis: str) -> np.ndarray:
    """The method's k-th point's scores on `axis`, image by image, every instance's images in turn. Every method
    renders the same prompts with the same seeds in the same order, so image i is the same prompt and seed for
    every method and point: differences between two points are paired."""
    return np.concatenate([np.asarray(r[method][k][f"{axis}_per_image"], dtype=float) for r in results.values()])


def _gap(d: np.ndarray) -> tuple[float, float]:
    """Mean of paired per-image differences and its standard error (their standard deviation over √n)."""
    return float(d.mean()), (float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"))


NOISE_SE = 2.0   # a difference under 2 standard errors is within the noise of the renders


def noise_check(results: dict, other: str, perfusion: str = "perfusion") -> dict | None:
    """The claim check and the Pareto counts again, with the renders' noise (None where a point lacks per-image
    scores, as in reports older than them).

    Matched points: at a baseline point q whose mean alignment lies inside Perfusion's mean curve, Perfusion's
    fidelity is read by linear interpolation between the two bracketing points a, b with weight w (as
    `dominance` reads it); image by image that is (1 − w)·f_a,i + w·f_b,i − f_q,i, whose mean is the gap and whose
    standard error says whether it is more than noise. w is held fixed: the SE counts the renders' noise, not the
    noise in where q's alignment falls, nor the choice of instances.

    Pareto beyond noise: q beats p when its mean is at least p's on both axes and more than `NOISE_SE` standard
    errors of the paired differences ahead on at least one. With one image per point there is no SE: gaps are
    "unknown (one image)" and nothing beats anything beyond noise."""
    n_p = len(next(iter(results.values()))[perfusion])
    n_q = len(next(iter(results.values()))[other])
    try:
        P = {ax: [_per_image(results, perfusion, k, ax) for k in range(n_p)] for ax in ("alignment", "fidelity")}
        Q = {ax: [_per_image(results, other, k, ax) for k in range(n_q)] for ax in ("alignment", "fidelity")}
    except KeyError:
        return None
    order = sorted(range(n_p), key=lambda k: P["alignment"][k].mean())
    xs = [P["alignment"][k].mean() for k in order]
    matched = []
    for j in range(n_q):
        a = Q["alignment"][j].mean()
        if not xs or a < xs[0] or a > xs[-1]:
            continue
        i = min(int(np.searchsorted(xs, a, side="right")) - 1, len(xs) - 2) if len(xs) > 1 else 0
        lo, hi = order[i], order[min(i + 1, len(order) - 1)]
        span = xs[min(i + 1, len(xs) - 1)] - xs[i]
        w = (a - xs[i]) / span if span > 0 else 0.0
        delta, se = _gap((1 - w) * P["fidelity"][lo] + w * P["fidelity"][hi] - Q["fidelity"][j])
        verdict = ("unknown (one image)" if not np.isfinite(se) else "ahead" if delta > NOISE_SE * se
                   else "behind" if delta < -NOISE_SE * se else "within noise")
        matched.append({"knob": next(iter(results.values()))[other][j]["knob"], "alignment": float(a),
                        "fidelity_gap": delta, "se": se, "verdict": verdict})

    def beats(A, ka, B, kb) -> bool:   # A's point ka beats B's point kb beyond noise
        gaps = [_gap(A[ax][ka] - B[ax][kb]) for ax in ("alignment", "fidelity")]
        return all(d >= 0 for d, _ in gaps) and any(d > NOISE_SE * se for d, se in gaps)

    return {"matched": matched, "points": n_q,
            "not_behind": sum(m["verdict"] != "behind" for m in matched),
            "other_beaten": sum(any(beats(P, kp, Q, kq) for kp in range(n_p)) for kq in range(n_q)),
            "perfusion_beaten": sum(any(beats(Q, kq, P, kp) for kq in range(n_q)) for kp in range(n_p)),
            "perfusion_points": n_p}


# -- report -------------------------------------------------------------------------------------

def plot(report: dict, size: tuple[int, int] = (760, 560)) -> np.ndarray:
    """Fidelity (y) against alignment (x): one curve per method (mean over instances), the base model's
    point, axes with ticks; drawn with PIL (no plotting library needed)."""
    return draw_curves(report["mean"], COLOURS, size)


def draw_curves(curves: dict[str, list[dict]], colours: dict[str, tuple], size: tuple[int, int] = (760, 560),
                links: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    """Fidelity (y) against alignment (x) of named curves (lists of {"alignment", "fidelity", "knob"}; a
    one-point curve is a point), each in its colour and in the legend; `links` (from, to) draws a thin line
    from the first point of one curve to the first of another (an ablation from its reference)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, W - 170, 30, H - 50
    pts = [p for curve in curves.values() for p in curve]
    xa = [p["alignment"] for p in pts]
    ya = [p["fidelity"] for p in pts]
    x0, x1 = max(0.0, min(xa) - 0.05), min(1.0, max(xa) + 0.05)
    y0, y1 = max(0.0, min(ya) - 0.05), min(1.0, max(ya) + 0.05)
    if x1 - x0 < 1e-6:
        x0, x1 = x0 - 0.05, x1 + 0.05
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.05, y1 + 0.05
    X = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
    Y = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for k in range(6):
        vx, vy = x0 + k * (x1 - x0) / 5, y0 + k * (y1 - y0) / 5
        d.line([X(vx), bottom, X(vx), bottom + 4], fill=(0, 0, 0))
        d.text((X(vx) - 12, bottom + 8), f"{vx:.2f}", fill=(0, 0, 0), font=font)
        d.line([left - 4, Y(vy), left, Y(vy)], fill=(0, 0, 0))
        d.text((left - 40, Y(vy) - 6), f"{vy:.2f}", fill=(0, 0, 0), font=font)
        d.line([X(vx), top, X(vx), bottom], fill=(235, 235, 235))
        d.line([left, Y(vy), right, Y(vy)], fill=(235, 235, 235))
    d.text(((left + right) // 2 - 80, H - 22), "alignment (prompt, concept read as its class)", fill=(0, 0, 0),
           font=font)
    d.text((8, top - 22), "fidelity (to the instance's photos)", fill=(0, 0, 0), font=font)
    for a, b in links:
        pa, pb = curves[a][0], curves[b][0]
        d.line([X(pa["alignment"]), Y(pa["fidelity"]), X(pb["alignment"]), Y(pb["fidelity"])],
               fill=colours.get(b, (0, 0, 0)), width=1)
    for m, curve in reversed(curves.items()):   # the first curve drawn last: on top where points coincide
        col = colours.get(m, (0, 0, 0))
        xy = sorted(((X(p["alignment"]), Y(p["fidelity"]), p["knob"]) for p in curve), key=lambda t: t[:2])
        if len(xy) > 1:
            d.line([(x, y) for x, y, _ in xy], fill=col, width=2)
        for x, y, knob in xy:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
            if isinstance(knob, (int, float)):
                d.text((x + 5, y - 12), f"{knob:g}", fill=col, font=font)
    for k, m in enumerate(curves):
        ly = top + 16 * k
        d.line([right + 15, ly + 6, right + 35, ly + 6], fill=colours.get(m, (0, 0, 0)), width=3)
        d.text((right + 40, ly), m, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def header(title: str, report: dict) -> list[str]:
    """The opening lines every part's report shares: title, and the quick-mode warning where it applies."""
    lines = [f"# {title}", ""]
    if report["config"].get("quick"):
        lines += ["**Quick mode** (CI): tiny settings, to keep the code path alive. The numbers mean nothing.", ""]
    return lines


def measured(report: dict) -> str:
    """"Measured <date> on <machine>, <minutes> for this part, with the bundled toy model <id>." (every part)"""
    m = report["machine"]
    return (f"Measured {m['date']} on {m.get('cpu')} ({m.get('cpu_cores')} cores"
            + (f", {m['accelerator']['name']}" if m.get("accelerator") else "")
            + f"), {report['total_s'] / 60:.1f} min for this part, with the bundled toy model `{report['model']}` "
            "(docs/toyworld.md).")


def markdown(report: dict) -> str:
    c = report["config"]
    L: list[str] = []
    a = L.append
    L += header("Quality: Perfusion against Textual Inversion, DreamBooth, LoRA and Custom Diffusion (toy world)",
                report)
    a(f"{measured(report)} Instances: "
      f"{', '.join(c['instances'])}; {len(c['prompts'])} prompts × {c['seeds']} seeds = "
      f"{report['images_per_point']} images per point; every method trained {c['steps']} steps on the same "
      f"{c['photos']} photos (recipes: docs/methods.md).")
    for meth, src in report.get("carried_over", {}).items():
        a("")
        a(f"**{meth}** was not measured in this run: its curves, file size and training time are carried over from "
          f"`{src['report']}` (measured {src.get('measured')}, perfusion {src.get('perfusion')}"
          + (f", commit {src['git_commit']}" if src.get("git_commit") else "")
          + ") with the same instances, prompts, seeds and settings (`--reuse`).")
    a("")
    a("![fidelity against alignment](quality.png)")
    a("")
    a("## Mean over instances")
    a("")
    a("| method | knob | points (knob: alignment, fidelity) | file | training |")
    a("| --- | --- | --- | ---: | ---: |")
    for meth, curve in report["mean"].items():
        knob = report["knobs"].get(meth, "")
        pts = "; ".join((f"{p['knob']:g}: " if p["knob"] is not None else "")
                        + f"{p['alignment']:.3f}, {p['fidelity']:.3f}" for p in curve)
        size = report["file_bytes"].get(meth)
        ts = report["train_seconds"].get(meth)
        a(f"| {meth} | {knob} | {pts} | {_bytes(size) if size else ''} | {f'{ts:.0f} s' if ts else ''} |")
    a("")
    a("## The paper's claim, checked")
    a("")
    a("Perfusion's curve at or beyond each baseline's: at every baseline point whose alignment lies within the "
      "range Perfusion's curve spans, is Perfusion's fidelity (interpolated at that alignment) at least the "
      "baseline's? Goal: at ≥ 80% of matched points.")
    a("")
    a("| baseline | matched points | Perfusion at or above | share | goal met | Pareto: its points beaten by Perfusion "
      "| Pareto: Perfusion's points beaten by it |")
    a("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for meth, r in report["claim_perfusion_at_or_above"].items():
        share = r["share"]
        pr = pareto(report["mean"]["perfusion"], report["mean"][meth])
        a(f"| {meth} | {r['matched']} of {r['points']} | {r['at_or_above']} | "
          f"{'' if share is None else f'{share:.0%}'} | {'' if share is None else ('yes' if share >= 0.8 else '**no**')} "
          f"| {pr['other_beaten']} of {pr['other_points']} | {pr['perfusion_beaten']} of {pr['perfusion_points']} |")
    a("")
    a("Pareto columns: a point beats another when it is at least as aligned and at least as faithful. "
      "Where Perfusion's curve spans a narrow band of alignment, few baseline points are matched and these "
      "columns are the fairer summary.")
    a("")
    noise = {m: report.get("claim_with_noise", {}).get(m) or noise_check(report["results"], m)
             for m in report["claim_perfusion_at_or_above"]}
    if all(noise.values()):
        a("### The same, with the noise of the renders")
        a("")
        a("Every method renders the same prompts with the same seeds, so the gap between two points is the mean of "
          "per-image differences over every instance's images, and its standard error (SE) is their standard "
          f"deviation over √n. A gap under {NOISE_SE:g} SE is within the noise of the renders. The SE counts only "
          "that noise: the instances are held fixed, and so is where the baseline's alignment falls on Perfusion's "
          "curve.")
        a("")
        a("| baseline | matched points: Perfusion's fidelity − the baseline's, at its alignment | Perfusion not behind "
          "beyond noise | Pareto beyond noise: its points beaten by Perfusion | Perfusion's points beaten by it |")
        a("| --- | --- | ---: | ---: | ---: |")
        for meth, r in noise.items():
            gaps = "; ".join(f"{m['knob']:g}: {m['fidelity_gap']:+.3f} ± {m['se']:.3f} ({m['verdict']})"
                             for m in r["matched"]) or "none matched"
            not_behind = f"{r['not_behind']} of {len(r['matched'])}" if r["matched"] else ""
            a(f"| {meth} | {gaps} | {not_behind} | {r['other_beaten']} of {r['points']} "
              f"| {r['perfusion_beaten']} of {r['perfusion_points']} |")
        a("")
    a("## Per instance")
    a("")
    for name, inst in report["results"].items():
        a(f"### {name}")
        a("")
        a("| method | points (knob: alignment, fidelity) |")
        a("| --- | --- |")
        for meth, curve in inst.items():
            pts = "; ".join((f"{p['knob']:g}: " if p["knob"] is not None else "")
                            + f"{p['alignment']:.3f}, {p['fidelity']:.3f}" for p in curve)
            a(f"| {meth} | {pts} |")
        a("")
    others = [f"[{label}]({report_stem(part, c.get('quick'))}.md)" for part, label in
              (("ablations", "ablations"), ("pairs", "several concepts in one image")) if part in c.get("parts", ())]
    if others:
        a("Other parts of this benchmark: " + ", ".join(others) + ".")
        a("")
    a("## Reproduce")
    a("")
    a("```bash")
    a(reproduce(c, "methods"))
    a("```")
    a("")
    return "\n".join(L)


def reproduce(config: dict, part: str) -> str:
    """The command that makes this part's report again."""
    where = " --quick" if config.get("quick") else f" --instances {','.join(config['instances'])}"
    subset = list(config.get("methods", METHOD_ORDER)) != list(METHOD_ORDER)
    # the pairs part reads --methods only to know which combinations a --reuse carries over
    if subset and (part == "methods" or (part == "pairs" and config.get("reuse"))):
        where += f" --methods {','.join(config['methods'])}"
        if config.get("reuse"):
            where += f" --reuse {config['reuse']}"
    return f"perfusion bench quality{where} --parts {part}"


def report_stem(part: str, quick: bool) -> str:
    """File name (without suffix) of a part's report: quality, quality-ablations, quality-pairs (+ -quick)."""
    return ("quality" if part == "methods" else f"quality-{part}") + ("-quick" if quick else "")


def _bytes(n: int) -> str:
    for unit, k in (("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def write_reports(report: dict, out) -> tuple[Path, ...]:
    """Write one part's report as <stem>.json, .md and (methods, ablations) .png; returns the paths written."""
    from PIL import Image

    from ..rendering import write_atomic
    from . import ablations, pairs

    part = report.get("part", "methods")
    text_of, plot_of = {"methods": (markdown, plot), "ablations": (ablations.markdown, ablations.plot),
                        "pairs": (pairs.markdown, None)}[part]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerfusionError(f"cannot create {out}: {e.strerror or e}; pass another --out") from None
    stem = report_stem(part, report["config"].get("quick"))
    md, js, png = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"
    write_atomic(js, (json.dumps(report, indent=1, default=str) + "\n").encode())
    # the Markdown names the plain file names; a quick run's files are *-quick
    write_atomic(md, markdown_text(text_of(report), report).encode())
    if plot_of is None:
        return md, js
    import io

    buf = io.BytesIO()
    Image.fromarray(plot_of(report)).save(buf, format="PNG")
    write_atomic(png, buf.getvalue())
    return md, js, png


def markdown_text(text: str, report: dict) -> str:
    part, quick = report.get("part", "methods"), report["config"].get("quick")
    return text.replace(f"]({report_stem(part, False)}.png)", f"]({report_stem(part, quick)}.png)")


def write_all(reports: dict[str, dict], out) -> list[Path]:
    """Every part's report (run_quality's result) into folder `out`; the paths written, in order."""
    return [p for part in PARTS if part in reports for p in write_reports(reports[part], out)]


def summary_lines(reports: dict[str, dict]) -> list[str]:
    """One line per headline result, for the person at the terminal."""
    lines = []
    for m, r in reports.get("methods", {}).get("claim_perfusion_at_or_above", {}).items():
        share = "n/a" if r["share"] is None else f"{r['share']:.0%}"
        lines.append(f"Perfusion at or above {m} at {r['at_or_above']} of {r['matched']} matched points ({share})")
        nz = reports["methods"].get("claim_with_noise", {}).get(m)
        if nz:
            lines.append(f"  beyond the renders' noise: Perfusion's points beaten by {m}: {nz['perfusion_beaten']} "
                         f"of {nz['perfusion_points']}; {m}'s beaten by Perfusion: {nz['other_beaten']} of {nz['points']}")
    for vid, dl in reports.get("ablations", {}).get("delta", {}).items():
        lines.append(f"ablation {vid}: alignment {dl['alignment']:+.3f}, fidelity {dl['fidelity']:+.3f} "
                     "against plain Perfusion")
    for combo, r in reports.get("pairs", {}).get("claim", {}).items():
        lines.append(f"pairs, {combo}: both concepts recognised in {r['both_recognised']:.0%} of images "
                     f"(goal ≥ {r['goal']:.0%}: {'met' if r['met'] else 'missed'})")
    return lines
