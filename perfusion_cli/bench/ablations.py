"""The ablations part of `perfusion bench quality` (quality-ablations.*): what each of Perfusion's design choices
is worth on the toy world.

Each variant changes one thing against the plain Perfusion concept of the same instance (the one the methods
part trains; reused, not retrained) and is rendered at its concept's default gate bias (the stored β, 0.7) with
the same prompts and seeds as the main curves: one (alignment, fidelity) point per instance, compared with the
plain concept's point at that bias, and with the plain concept's whole bias curve (cfg.biases; the methods part's
renders, shared), since a variant that only slides along that curve trades alignment for fidelity, like a
change of bias, while one off the curve gains or loses on both.

    ablation      what changes                                                        cost per instance
    no-key-lock   o*_K trained too, from W_K i_super (TrainConfig.lock_keys=False, §4)  one training
    rome          the gate σ((s − β)/τ) replaced by s(e): ROME's closed form (§2)        renders only
    mask          the loss weighted by the model's own attention mask of the object (§6) one training
    one-photo     trained on 1 photo instead of all of them                              one training
    global-lock   global instead of local key-locking at render (§4)                     renders only
    train-beta    the gate bias while training, each of cfg.train_betas (TrainConfig:    one training each
                  0.75, §6)
    word-scope    the edit confined to the concept word's tokens (§11c, not the paper's): renders only, and
                  at render on the plain concept, and trained that way too               one training

(§: PERFUSION.md.) Library code: prints nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import PerfusionError
from .quality import WORD, Bench, draw_curves, header, measured, perfusion_key, reproduce

# what each ablation changes, and what PERFUSION.md says to expect ("" where it says nothing)
ABOUT = {
    "no-key-lock": ("o*_K trained too, from W_K i_super", "worse (the paper's ablation of key-locking, §4)"),
    "rome": ("gate replaced by s(e): plain ROME", ""),
    "mask": ("loss weighted by the attention mask", "better text alignment (§6, the paper's ablation)"),
    "one-photo": ("trained on 1 photo", ""),
    "global-lock": ("global key-locking at render", "more varied scenes; suits a lower bias, 0.4-0.6 (§4)"),
    "train-beta": ("gate bias while training", ""),
    "word-scope": ("edit only at the concept word's tokens", ""),
}
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207))
REFERENCE = "perfusion"   # the plain concept's point, in results and mean


@dataclass(frozen=True)
class Variant:
    id: str                 # "rome", "train-beta-0.6"
    ablation: str           # its entry of quality.ABLATIONS
    label: str              # for tables and the plot (ASCII: the plot's font has no Greek)
    train: dict | None      # TrainConfig overrides of its own training; None: render-time only, on the plain concept
    photos: int | None = None   # photos it trains on (None: all)
    render: dict = field(default_factory=dict)  # what changes at render: {"rome": True}, {"global_lock": True},
                                                # {"scope": "word"}


def variants(cfg) -> list[Variant]:
    """The variants of cfg.ablations, in that order."""
    made = {
        "no-key-lock": lambda: [Variant("no-key-lock", "no-key-lock", "keys trained (no key-lock)",
                                        {"lock_keys": False})],
        "rome": lambda: [Variant("rome", "rome", "plain ROME (no gate)", None, render={"rome": True})],
        "mask": lambda: [Variant("mask", "mask", "attention mask", {"mask": "attention"})],
        "one-photo": lambda: [Variant("one-photo", "one-photo", "1 photo", {}, photos=1)],
        "global-lock": lambda: [Variant("global-lock", "global-lock", "global locking", None,
                                        render={"global_lock": True})],
        "train-beta": lambda: [Variant(f"train-beta-{b:g}", "train-beta", f"training beta {b:g}", {"train_beta": b})
                               for b in cfg.train_betas],
        "word-scope": lambda: [Variant("word-scope-render", "word-scope", "word scope at render", None,
                                       render={"scope": "word"}),
                               Variant("word-scope", "word-scope", "word scope, trained so", {"gate_scope": "word"},
                                       render={"scope": "word"})],
    }
    return [v for a in cfg.ablations for v in made[a]()]


def _options(concept, rome: bool = False, global_lock: bool = False, beta: float | None = None,
             scope: str = "prompt") -> dict:
    """rendering.Applied options: the concept at its default gate (or bias `beta`; plain ROME with `rome`; the edit
    at the concept word's tokens only with scope "word")."""
    from ..rendering import Gate

    t = concept.tensors
    return {"gates": {WORD: Gate(t.beta if beta is None else beta, t.tau, rome=rome, scope=scope)},
            "global_lock": global_lock}


def _axes(point: dict) -> dict:
    return {"alignment": point["alignment"], "fidelity": point["fidelity"]}


def off_curve(curve: list[dict], point: dict) -> float | None:
    """The point's fidelity minus the curve's at the point's alignment (linear interpolation along the curve
    sorted by alignment); None where the point's alignment lies outside the curve's range."""
    pts = sorted((p["alignment"], p["fidelity"]) for p in curve)
    if not pts or not pts[0][0] <= point["alignment"] <= pts[-1][0]:
        return None
    return point["fidelity"] - float(np.interp(point["alignment"], [p[0] for p in pts], [p[1] for p in pts]))


def paired_se(results: dict, vid: str) -> dict:
    """Standard error of the variant's Δ on each axis: the variant and the plain concept render the same prompts
    with the same seeds, so Δ is the mean of per-image differences (over every instance's images), and its
    standard error is their standard deviation over √n. |Δ| under 2 SE is within the noise of the renders."""
    out = {}
    for axis in ("alignment", "fidelity"):
        d = np.concatenate([np.subtract(r[vid][f"{axis}_per_image"], r[REFERENCE][f"{axis}_per_image"])
                            for r in results.values()])
        out[axis] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return out


def run_ablations(bench: Bench) -> dict:
    """Every variant on every instance; the ablations report's own fields."""
    cfg = bench.cfg
    vs = variants(cfg)
    results: dict[str, dict] = {}
    train_s: dict[str, list[float]] = {v.id: [] for v in vs if v.train is not None}
    curves: dict[str, list[dict]] = {}
    for ii, name in enumerate(bench.names):
        stage = f"{name} ({ii + 1}/{len(bench.names)}): ablations"
        plain = bench.concept(name, "perfusion", f"{name} ({ii + 1}/{len(bench.names)}): perfusion")
        gate = {"beta": float(plain.tensors.beta), "tau": float(plain.tensors.tau)}
        row = {REFERENCE: bench.point(name, [plain], _options(plain), perfusion_key(gate["beta"], gate["tau"]))}
        curves[name] = [{"knob": b, **_axes(bench.point(name, [plain], _options(plain, beta=b),
                                                        perfusion_key(b, gate["tau"])))} for b in cfg.biases]
        for k, v in enumerate(vs):
            bench.progress(stage, k, len(vs))
            concept = plain
            if v.train is not None:
                bench.say(f"{stage}: training '{v.label}' ({cfg.steps} steps)")
                t0 = time.perf_counter()
                concept = bench.train_perfusion(name, f"{stage}: {v.id}", photos=v.photos, **v.train)
                train_s[v.id].append(time.perf_counter() - t0)
            row[v.id] = bench.point(name, [concept], _options(concept, **v.render))
        bench.progress(stage, len(vs), len(vs))
        results[name] = row
    return {
        "variants": [{"id": v.id, "ablation": v.ablation, "label": v.label, "what": ABOUT[v.ablation][0],
                      "expected": ABOUT[v.ablation][1], "trained": v.train is not None, "train_config": v.train,
                      "photos": v.photos, "render": v.render} for v in vs],
        "reference": gate,   # the plain concept's default gate, at which every point is rendered
        "images_per_point": len(cfg.prompts) * cfg.seeds,
        "results": results, "bias_curves": curves,
        **summarise(results, curves, [v.id for v in vs], cfg.biases),
        "train_seconds": {vid: float(np.mean(s)) for vid, s in train_s.items() if s},
        "reference_train_seconds": float(np.mean([bench.train_seconds[(n, "perfusion")] for n in bench.names])),
    }


def summarise(results: dict, curves: dict, ids: list[str], biases) -> dict:
    """What the report derives from the per-instance points: means over instances, the mean bias curve, each
    variant's Δ (with its paired standard error) and its distance off that curve."""
    mean = {vid: {axis: float(np.mean([r[vid][axis] for r in results.values()])) for axis in ("alignment", "fidelity")}
            for vid in (REFERENCE, *ids)}
    mean_curve = [{"knob": b, **{axis: float(np.mean([c[k][axis] for c in curves.values()]))
                                 for axis in ("alignment", "fidelity")}} for k, b in enumerate(biases)]
    return {
        "mean": mean, "mean_bias_curve": mean_curve,
        "off_curve": {vid: off_curve(mean_curve, mean[vid]) for vid in ids},
        "delta": {vid: {axis: mean[vid][axis] - mean[REFERENCE][axis] for axis in ("alignment", "fidelity")}
                  for vid in ids},
        "delta_se": {vid: paired_se(results, vid) for vid in ids},
    }


MERGE_SAME = ("methods", "steps", "photos", "prompts", "seeds", "biases", "render_steps", "seed", "device", "quick",
              "ablations", "train_betas")


def merge(reports: list[dict]) -> dict:
    """One ablations report from several runs of the same settings on different instances (each instance's points
    depend only on its own seeded training and renders, so this is the report one run of all of them makes).
    Training seconds are averaged over instances; the minutes are summed; the machine is the first run's."""
    first = reports[0]
    for r in reports[1:]:
        diff = [k for k in MERGE_SAME if r["config"].get(k) != first["config"].get(k)]
        if diff or r["model"] != first["model"]:
            raise PerfusionError(f"ablations reports differ in {', '.join(diff) or 'model'}; only runs of the same "
                                 "settings merge")
    names = [n for r in reports for n in r["results"]]
    if len(set(names)) != len(names):
        raise PerfusionError(f"an instance is in two reports ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    results = {n: p for r in reports for n, p in r["results"].items()}
    curves = {n: c for r in reports for n, c in r["bias_curves"].items()}
    ids = [v["id"] for v in first["variants"]]

    def per_instance(get) -> float:
        return float(sum(get(r) * len(r["results"]) for r in reports) / len(names))

    return {
        **first, "results": results, "bias_curves": curves,
        **summarise(results, curves, ids, first["config"]["biases"]),
        "train_seconds": {vid: per_instance(lambda r: r["train_seconds"][vid]) for vid in first["train_seconds"]},
        "reference_train_seconds": per_instance(lambda r: r["reference_train_seconds"]),
        "config": {**first["config"], "instances": names},
        "total_s": float(sum(r["total_s"] for r in reports)),
        "merged_from": [m for r in reports for m in r.get("merged_from") or
                        [{"instances": list(r["results"]), "date": r["machine"].get("date"), "total_s": r["total_s"]}]],
    }


JOIN_TOLERANCE = 0.02  # largest per-image score difference of the plain concept's renders that two runs may show


def join_variants(reports: list[dict], tolerance: float = JOIN_TOLERANCE) -> dict:
    """One ablations report from runs of different ablations on the same instances (an ablation added later joins
    the report instead of rerunning all the others). Allowed only where the runs rendered the same plain concepts:
    every instance's reference point must agree image by image within `tolerance` (the same code, recipe and seeds
    train the same concept; CPU float arithmetic still differs in the last bits between runs, which moved single
    scores by up to 0.008 when two runs of the toy concepts were compared). The first report's reference points are
    kept. Settings other than the ablations must be the same."""
    first = reports[0]
    worst = 0.0
    same = [k for k in MERGE_SAME if k not in ("ablations", "train_betas")]
    ids: list[str] = []
    for r in reports:
        diff = [k for k in same if r["config"].get(k) != first["config"].get(k)]
        if diff or r["model"] != first["model"]:
            raise PerfusionError(f"ablations reports differ in {', '.join(diff) or 'model'}; only runs of the same "
                                 "settings join")
        if set(r["results"]) != set(first["results"]):
            raise PerfusionError("ablations reports to join must cover the same instances (merge joins instances)")
        for n, row in r["results"].items():
            ref, ref0 = row[REFERENCE], first["results"][n][REFERENCE]
            gap = max(float(np.max(np.abs(np.subtract(ref[f"{ax}_per_image"], ref0[f"{ax}_per_image"]))))
                      for ax in ("alignment", "fidelity"))
            if gap > tolerance:
                raise PerfusionError(f"the plain concept of {n} renders differently in the reports to join (a score "
                                     f"moved {gap:.3f}; other code or recipe?): rerun every ablation together")
            worst = max(worst, gap)
        twice = [v["id"] for v in r["variants"] if v["id"] in ids]
        if twice:
            raise PerfusionError(f"variant(s) {', '.join(twice)} are in two reports")
        ids += [v["id"] for v in r["variants"]]
    names = list(first["results"])
    results = {n: {**{k: v for r in reports for k, v in r["results"][n].items()},
                   REFERENCE: first["results"][n][REFERENCE]} for n in names}
    ablations = list(dict.fromkeys(a for r in reports for a in r["config"]["ablations"]))
    betas = next((r["config"]["train_betas"] for r in reports if "train-beta" in r["config"]["ablations"]),
                 first["config"]["train_betas"])
    return {
        **first, "results": results,
        "variants": [v for r in reports for v in r["variants"]],
        **summarise(results, first["bias_curves"], ids, first["config"]["biases"]),
        "train_seconds": {k: v for r in reports for k, v in r["train_seconds"].items()},
        "config": {**first["config"], "ablations": ablations, "train_betas": betas},
        "total_s": float(sum(r["total_s"] for r in reports)),
        "joined_reference_gap": max(worst, first.get("joined_reference_gap", 0.0)),
        "joined_from": [j for r in reports for j in r.get("joined_from") or
                        [{"ablations": r["config"]["ablations"], "date": r["machine"].get("date"),
                          "total_s": r["total_s"]}]],
    }


# -- report -------------------------------------------------------------------------------------

def plot(report: dict) -> np.ndarray:
    """The plain concept's point and each variant's (mean over instances), a line from the one to the other, and
    the plain concept's bias curve (labelled with β)."""
    labels = {v["id"]: v["label"] for v in report["variants"]}
    curves = {"perfusion (plain)": [{**report["mean"][REFERENCE], "knob": None}]}
    curves.update({labels[vid]: [{**pt, "knob": None}] for vid, pt in report["mean"].items() if vid != REFERENCE})
    curves["plain, bias curve"] = report["mean_bias_curve"]
    colours = {"perfusion (plain)": (214, 39, 40), "plain, bias curve": (240, 170, 170)}
    colours.update({lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels.values())})
    return draw_curves(curves, colours, links=tuple(("perfusion (plain)", lab) for lab in labels.values()))


def markdown(report: dict) -> str:
    c, ref = report["config"], report["reference"]
    L: list[str] = []
    a = L.append
    L += header("Ablations of Perfusion (toy world)", report)
    merged = ""
    if report.get("merged_from"):   # ablations.merge: runs of the same settings on different instances
        runs = "; ".join(f"{', '.join(m['instances'])}: {m['date']}" for m in report["merged_from"])
        merged = f" Measured in {len(report['merged_from'])} runs of the same settings, merged ({runs})."
    if report.get("joined_from"):   # ablations.join_variants: runs of other ablations on the same instances
        runs = "; ".join(f"{', '.join(j['ablations'])}: {j['date']}" for j in report["joined_from"])
        merged += (f" Its ablations were run in {len(report['joined_from'])} runs on the same instances and joined "
                   f"({runs}): the plain concepts' renders agree image by image within "
                   f"{report.get('joined_reference_gap', 0.0):.3f} in score between the runs.")
    a(f"{measured(report)}{merged} Instances: {', '.join(c['instances'])}. Each "
      "variant changes one thing against the plain Perfusion concept of the same instance (trained once, shared "
      f"with the methods part) and is rendered at its concept's default gate (β {ref['beta']:g}, "
      f"τ {ref['tau']:g}), {len(c['prompts'])} prompts × {c['seeds']} seeds = {report['images_per_point']} "
      f"images per point, the prompts and seeds of the main curves; trained variants train {c['steps']} steps like "
      "the plain concept.")
    a("")
    a("![ablations: fidelity against alignment](quality-ablations.png)")
    a("")
    a("## Mean over instances")
    a("")
    a("| variant | what changes | alignment | fidelity | Δ alignment | Δ fidelity | off the bias curve | "
      "cost per instance | PERFUSION.md expects |")
    a("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    r0 = report["mean"][REFERENCE]
    a(f"| perfusion (plain) | — | {r0['alignment']:.3f} | {r0['fidelity']:.3f} | | | | "
      f"{report['reference_train_seconds']:.0f} s training | |")
    se = report.get("delta_se") or {v["id"]: paired_se(report["results"], v["id"]) for v in report["variants"]}

    def with_se(d: float, e: float) -> str:
        if not np.isfinite(e):  # one image per point (--quick): no spread to measure
            return f"{d:+.3f}"
        return f"{d:+.3f} ± {e:.3f}" + ("" if abs(d) >= 2 * e else " (noise)")

    for v in report["variants"]:
        pt, dl, off = report["mean"][v["id"]], report["delta"][v["id"]], report["off_curve"][v["id"]]
        e = se[v["id"]]
        cost = f"{report['train_seconds'][v['id']]:.0f} s training" if v["trained"] else "renders only"
        a(f"| {v['label']} | {v['what']} | {pt['alignment']:.3f} | {pt['fidelity']:.3f} | "
          f"{with_se(dl['alignment'], e['alignment'])} | {with_se(dl['fidelity'], e['fidelity'])} | "
          f"{'outside' if off is None else f'{off:+.3f}'} | {cost} | {v['expected']} |")
    a("")
    curve = "; ".join(f"{p['knob']:g}: {p['alignment']:.3f}, {p['fidelity']:.3f}" for p in report["mean_bias_curve"])
    a("Δ: the variant minus the plain concept at its default gate (higher is better on both axes), ± its standard "
      "error over the paired images (same prompts and seeds; 'noise': |Δ| under 2 standard errors). Off the bias "
      "curve: the variant's fidelity minus the plain concept's bias curve's at the variant's alignment (interpolated; "
      "'outside' when no bias reaches that alignment): near 0 the variant only moved along the curve, a trade like a "
      f"change of β; above 0 it is better, below 0 worse. The plain bias curve (β: alignment, fidelity): {curve}.")
    a("")
    a("## Per instance (alignment, fidelity)")
    a("")
    names = list(report["results"])
    a("| variant | " + " | ".join(names) + " |")
    a("| --- |" + " --- |" * len(names))
    for vid, label in [(REFERENCE, "perfusion (plain)")] + [(v["id"], v["label"]) for v in report["variants"]]:
        cells = [f"{report['results'][n][vid]['alignment']:.3f}, {report['results'][n][vid]['fidelity']:.3f}"
                 for n in names]
        a(f"| {label} | " + " | ".join(cells) + " |")
    a("")
    a("## Reproduce")
    a("")
    a("```bash")
    a(reproduce(c, "ablations") + f" --ablations {','.join(c['ablations'])}")
    a("```")
    a("")
    return "\n".join(L)
