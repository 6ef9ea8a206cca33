"""`perfusion bench quality`: Perfusion against its baselines on the toy world, as fidelity-vs-alignment curves.

For every instance (default: the toy world's reporting set), every method trains one concept from the same
photo set on the bundled toy model; then every prompt (scenes, added objects, other objects' colours,
counts) is rendered with fixed seeds at each point of the method's natural knob:

    perfusion          the gate bias β (one trained file, PERFUSION.md §7)
    lora               the LoRA scale
    ti, dreambooth,    the number of training steps (snapshots of one run)
    custom-diffusion

Each image gets fidelity (the world's instance scorer against the instance's photos) and alignment (the
world's caption scorer against the prompt with the concept word read as its supercategory, as the paper
measures it). A curve is the mean (alignment, fidelity) of each knob value, per instance and averaged.
The report (Markdown + JSON + a PNG plot) also gives file sizes, training times and the paper's claim
checked here: at each baseline point, is Perfusion's curve, read at the same alignment, at or above it?

Library code: prints nothing; progress and messages through callbacks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
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
METHOD_ORDER = ("perfusion", "ti", "dreambooth", "lora", "custom-diffusion")
COLOURS = {"perfusion": (214, 39, 40), "ti": (31, 119, 180), "dreambooth": (44, 160, 44), "lora": (255, 127, 14),
           "custom-diffusion": (148, 103, 189), "base model": (90, 90, 90)}


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

    @classmethod
    def quick_config(cls, **overrides) -> "QualityConfig":
        base = dict(instances=("hatcat",), steps=2, photos=4, prompts=PROMPTS[:1], seeds=1, biases=(0.5, 0.9),
                    lora_scales=(0.5, 1.0), step_fractions=(0.5, 1.0), render_steps=2, quick=True)
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


def check_config(cfg: QualityConfig) -> None:
    from ..methods import METHODS

    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise PerfusionError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if cfg.steps < 1 or cfg.seeds < 1 or cfg.photos < 1:
        raise PerfusionError("--steps, --seeds and --photos must be at least 1")
    if any(p.count("{}") != 1 for p in cfg.prompts):
        raise PerfusionError("each prompt needs exactly one {} for the concept")
    instance_names(cfg.instances)


def run_quality(config: QualityConfig | None = None, progress: Callable[[str, int, int], None] | None = None,
                on_event: Callable[[str], None] | None = None) -> dict:
    """Train, render and score everything; returns the report (JSON-ready dict)."""
    from .. import covariance, models
    from ..edit import inverse_covariance
    from ..images import load_photos
    from ..methods import recipe, train_baseline
    from ..rendering import Applied, Gate
    from ..toyworld import evaluate as ev
    from ..toyworld import world as tw
    from ..toyworld.demo import write_photos
    from ..training import TrainConfig, Trainer
    from ..concept import ConceptSet, to_bytes
    from .speed import machine_info

    cfg = config or QualityConfig()
    check_config(cfg)
    progress = progress or (lambda *a: None)
    say = on_event or (lambda m: None)
    names = instance_names(cfg.instances)
    t_start = time.perf_counter()
    say("loading the toy base model")
    base = models.load("toyworld", device=cfg.device, dtype="fp32")
    cov = covariance.for_model(base)
    C_inv = inverse_covariance(cov.C)
    render = base.profile.render or {}
    kw = dict(height=base.resolution, width=base.resolution, output_type="np",
              num_inference_steps=cfg.render_steps or int(render.get("steps", 30)),
              guidance_scale=float(render.get("cfg", 4.0)))
    models.set_sampler(base.pipe, render.get("sampler", "ddim"))
    word = "myconcept"   # the concept word in prompts (a new word for the toy tokenizer)
    n_prompts = len(cfg.prompts)

    def render_scores(call, instance, sup, prompt_word) -> tuple[list[float], list[float]]:
        """Render every prompt (the concept written as prompt_word) with fixed seeds; score each image."""
        fid, ali = [], []
        for template in cfg.prompts:
            gens = [torch.Generator("cpu").manual_seed(cfg.seed + s) for s in range(cfg.seeds)]
            with torch.no_grad():
                out = call(template.format(prompt_word), gens)
            for im in (np.clip(out, 0, 1) * 255).round().astype(np.uint8):
                fid.append(ev.fidelity(im, instance))
                ali.append(ev.alignment(im, template.format(sup)))
        return fid, ali

    results: dict[str, dict] = {}
    sizes: dict[str, list[int]] = {m: [] for m in cfg.methods}
    train_s: dict[str, list[float]] = {m: [] for m in cfg.methods}
    import tempfile

    for ii, name in enumerate(names):
        instance = tw.INSTANCES_BY_NAME[name]
        sup = instance.supercategory
        with tempfile.TemporaryDirectory(prefix="perfusion-quality-") as d:
            write_photos(name, cfg.photos, Path(d), cfg.seed)
            photos = load_photos(d, base.resolution)
        inst: dict[str, list[dict]] = {}
        # the base model's own renders of the prompts with the supercategory: a reference point
        f, a = render_scores(lambda p, g: base.pipe([p] * len(g), generator=g, **kw).images, instance, sup, sup)
        inst["base model"] = [{"knob": None, "fidelity": float(np.mean(f)), "alignment": float(np.mean(a))}]
        for mi, method in enumerate(cfg.methods):
            stage = f"{name} ({ii + 1}/{len(names)}): {method}"
            say(f"{stage}: training {cfg.steps} steps")
            t = time.perf_counter()
            points: list[tuple[float | None, object, dict]] = []   # (knob value, concept, gates/scales)
            if method == "perfusion":
                tr = Trainer(base, word, sup, C_inv, TrainConfig(steps=cfg.steps, batch_size=4, grad_accum=1,
                                                                  seed=cfg.seed, checkpoint_every=0))
                concept = tr.fit(photos, progress=lambda p: progress(stage, p.step, p.steps))
                points = [(b, concept, {"gates": {word: Gate(b, concept.tensors.tau)}}) for b in cfg.biases]
            else:
                snaps: dict[int, object] = {}
                want = sorted({max(1, round(fr * cfg.steps)) for fr in cfg.step_fractions})
                mcfg = recipe(method, steps=cfg.steps, batch_size=4, seed=cfg.seed)
                concept = train_baseline(base, word, sup, photos, mcfg,
                                         progress=lambda p: progress(stage, p.step, p.steps),
                                         snapshots=tuple(want), on_snapshot=lambda s, c: snaps.__setitem__(s, c))
                snaps[cfg.steps] = concept
                if method == "lora":
                    points = [(sc, concept, {"scales": {word: sc}}) for sc in cfg.lora_scales]
                else:
                    points = [(s, snaps[s], {}) for s in want]
            train_s[method].append(time.perf_counter() - t)
            cs = ConceptSet(name=word, concepts=[concept], base_model={"id": base.id}, covariance=cov.info)
            sizes[method].append(len(to_bytes(cs, torch.float16)))
            curve = []
            for k, (knob, c, opts) in enumerate(points):
                progress(f"{stage}: rendering", k, len(points))
                with Applied(base.pipe, [c], cov.C, **opts) as applied:
                    f, a = render_scores(lambda p, g: applied([p] * len(g), generator=g, **kw).images, instance, sup,
                                         word)
                curve.append({"knob": knob, "fidelity": float(np.mean(f)), "alignment": float(np.mean(a)),
                              "fidelity_per_image": [round(x, 4) for x in f],
                              "alignment_per_image": [round(x, 4) for x in a]})
            progress(f"{stage}: rendering", len(points), len(points))
            inst[method] = curve
        results[name] = inst

    mean = _mean_curves(results, cfg.methods)
    claim = {m: dominance(mean["perfusion"], mean[m]) for m in cfg.methods if m != "perfusion" and "perfusion" in mean}
    per_instance_claim = {n: {m: dominance(r["perfusion"], r[m]) for m in cfg.methods if m != "perfusion"}
                          for n, r in results.items() if "perfusion" in r}
    return {
        "benchmark": "perfusion bench quality", "format_version": 1,
        "config": {**asdict(cfg), "instances": names},
        "knobs": {"perfusion": "gate bias", "lora": "LoRA scale", "ti": "training steps",
                  "dreambooth": "training steps", "custom-diffusion": "training steps"},
        "images_per_point": n_prompts * cfg.seeds,
        "results": results, "mean": mean, "claim_perfusion_at_or_above": claim,
        "claim_per_instance": per_instance_claim,
        "file_bytes": {m: int(np.mean(v)) for m, v in sizes.items() if v},
        "train_seconds": {m: float(np.mean(v)) for m, v in train_s.items() if v},
        "machine": machine_info(base.device), "model": base.id, "total_s": time.perf_counter() - t_start,
    }


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


# -- report -------------------------------------------------------------------------------------

def plot(report: dict, size: tuple[int, int] = (760, 560)) -> np.ndarray:
    """Fidelity (y) against alignment (x): one curve per method (mean over instances), the base model's
    point, axes with ticks; drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, W - 170, 30, H - 50
    pts = [p for curve in report["mean"].values() for p in curve]
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
    ly = top
    for m, curve in report["mean"].items():
        col = COLOURS.get(m, (0, 0, 0))
        xy = sorted((X(p["alignment"]), Y(p["fidelity"]), p["knob"]) for p in curve)
        if len(xy) > 1:
            d.line([(x, y) for x, y, _ in xy], fill=col, width=2)
        for x, y, knob in xy:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
            if knob is not None:
                d.text((x + 5, y - 12), f"{knob:g}", fill=col, font=font)
        d.line([right + 15, ly + 6, right + 35, ly + 6], fill=col, width=3)
        d.text((right + 40, ly), m, fill=(0, 0, 0), font=font)
        ly += 16
    return np.asarray(img)


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    L = []
    a = L.append
    a("# Quality: Perfusion against Textual Inversion, DreamBooth, LoRA and Custom Diffusion (toy world)")
    a("")
    if c.get("quick"):
        a("**Quick mode** (CI): one instance and tiny settings, to keep the code path alive. The numbers mean "
          "nothing.")
        a("")
    a(f"Measured {m['date']} on {m.get('cpu')} ({m.get('cpu_cores')} cores"
      + (f", {m['accelerator']['name']}" if m.get("accelerator") else "") + f"), {report['total_s'] / 60:.1f} min "
      f"in all, with the bundled toy model `{report['model']}` (docs/toyworld.md). Instances: "
      f"{', '.join(c['instances'])}; {len(c['prompts'])} prompts × {c['seeds']} seeds = "
      f"{report['images_per_point']} images per point; every method trained {c['steps']} steps on the same "
      f"{c['photos']} photos (recipes: docs/methods.md).")
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
    a("## Reproduce")
    a("")
    a("```bash")
    a("perfusion bench quality" + (" --quick" if c.get("quick") else f" --instances {','.join(c['instances'])}"))
    a("```")
    a("")
    return "\n".join(L)


def _bytes(n: int) -> str:
    for unit, k in (("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def write_reports(report: dict, out) -> tuple[Path, Path, Path]:
    from PIL import Image

    from ..rendering import write_atomic

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerfusionError(f"cannot create {out}: {e.strerror or e}; pass another --out") from None
    stem = "quality-quick" if report["config"].get("quick") else "quality"
    md, js, png = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"
    write_atomic(js, (json.dumps(report, indent=1, default=str) + "\n").encode())
    text = markdown(report).replace("](quality.png)", f"]({png.name})")
    write_atomic(md, text.encode())
    import io

    buf = io.BytesIO()
    Image.fromarray(plot(report)).save(buf, format="PNG")
    write_atomic(png, buf.getvalue())
    return md, js, png
