"""The pairs part of `perfusion bench quality` (quality-pairs.*): two concepts, each trained alone, in one image.

Pairs of the run's instances (`pair_list`) are rendered together with prompts naming both ("a {a} and a {b} on
grass", several scenes, both orders) × the configured seeds, by each way of combining two concepts:

    perfusion-exact         Perfusion, both edits applied with C⁻¹-orthonormal inputs (PERFUSION.md §8)
    perfusion-approximate   Perfusion, the edits' terms summed (§8)
    ti                      Textual Inversion: two learned tokens in one prompt
    lora-<s>                both LoRAs applied together, each at scale s (diffusers' set_adapters weights)

and, as references, the base model with both supercategory words and the world's own pictures of the two instances
together (degraded like a model's samples: what the evaluator can recognise at best). The concepts are the per-instance concepts
of the other parts (trained once per run); each gets its own word here, myconcepta / myconceptb. A concept's word
is only a label: prompts reach the tokenizer with the supercategory word in its place and the concept's embedding
swapped in at those positions (text.py), so renaming needs no retraining and the toy tokenizer never sees it.

Every image is scored for fidelity to each instance's photos (the best-matching object of the image, as
evaluate.fidelity), alignment with the prompt with both words read as their supercategories, and whether each
concept is recognised (RECOGNISED), and whether objects of both asked kinds are found at all ("asked kinds": a
base model that cannot draw two asked objects caps every method). The goal of issue #4: both recognised in at
least GOAL of the images. scripts/pairs_diagnosis.py goes further (each concept alone, single-object prompts).

Library code: prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations as all_pairs

import numpy as np

from .quality import Bench, header, measured, reproduce

WORDS = ("myconcepta", "myconceptb")
GOAL = 0.7
RECOGNISED = ("a concept is recognised in an image when the image's object that best matches its instance's "
              "photos matches them strictly better than it matches any other of the toy world's 14 instances' "
              "photos: the instance-retrieval top-1 the evaluator is validated with (≥ 0.97 on degraded renders, "
              "docs/toyworld-evaluators.md), read per object. Both concepts can only be recognised in two distinct "
              "objects (the object recognised as A matches A better than B).")
SUMMARY = ("both_recognised", "recognised_a", "recognised_b", "asked_kinds", "fidelity_a", "fidelity_b", "alignment")
WORLD = "world (true renders)"  # the reference row of the world's own pictures of the pair


@dataclass(frozen=True)
class Combination:
    id: str
    method: str                 # whose per-instance concepts are combined
    label: str
    exact: bool = True          # Perfusion: exact or approximate (§8)
    scale: float | None = None  # LoRA: each adapter's scale


def combinations(cfg) -> list[Combination]:
    return [Combination("perfusion-exact", "perfusion", "Perfusion, exact (§8)"),
            Combination("perfusion-approximate", "perfusion", "Perfusion, approximate (§8)", exact=False),
            Combination("ti", "ti", "Textual Inversion, two tokens"),
            *[Combination(f"lora-{s:g}", "lora", f"LoRA, both at scale {s:g}", scale=s) for s in cfg.pair_lora_scales]]


def pair_list(names: list[str]) -> list[tuple[str, str]]:
    """The instances rendered together: every pair of two or three instances; consecutive pairs of four or more
    (n − 1 ≥ 3 pairs, each instance in one or two of them); a lone instance is paired with the first other
    reporting instance (the pairs part then trains that one's concepts too)."""
    from ..toyworld import world as tw

    if len(names) == 1:
        partner = next(i.name for i in tw.REPORTING_INSTANCES + tw.DEV_INSTANCES if i.name != names[0])
        return [(names[0], partner)]
    if len(names) <= 3:
        return list(all_pairs(names, 2))
    return list(zip(names, names[1:]))


def world_pairs(a: str, b: str, scenes: list[str], per_scene: int, seed: int = 0) -> list[list[np.ndarray]]:
    """The world's own pictures of instances a and b together, per_scene of them in each scene (returned per
    scene), degraded as a small model's samples are (evaluate.degrade, strength 1). Drawn in turn across the
    scenes from one random stream; a layout that drops one of the two for room is drawn again."""
    from ..toyworld import evaluate as ev
    from ..toyworld import world as tw

    ia, ib = tw.INSTANCES_BY_NAME[a], tw.INSTANCES_BY_NAME[b]
    rng = np.random.default_rng([seed, 7, sum(map(ord, a + b))])
    drawn: list[tuple[int, np.ndarray]] = []
    while len(drawn) < len(scenes) * per_scene:
        k = len(drawn) % len(scenes)
        im, sc = tw.render_instance_in(ia, scenes[k], others=[ib.obj(flip=bool(rng.random() < 0.5))], rng=rng)
        if {o.instance for o in sc.objs} == {a, b}:
            drawn.append((k, ev.degrade(im, seed=(seed, a, b, len(drawn)))))
    return [[im for j, im in drawn if j == k] for k in range(len(scenes))]


def scene_of(prompt: str) -> str:
    """The toy world scene a pair prompt ends with ("a {a} and a {b} on grass" → "on grass")."""
    from ..toyworld import world as tw

    return next(s for s in tw.SCENES if prompt.endswith(s))


def object_kinds(image: np.ndarray) -> list[str]:
    """The kind of each object the evaluator finds in an image (existence ≥ evaluate.MIN_EXISTENCE)."""
    from ..toyworld import evaluate as ev
    from ..toyworld import world as tw

    return [tw.KINDS[int(np.argmax(o.kind))] for o in ev.perceive(image).objects if o.existence >= ev.MIN_EXISTENCE]


def covers(found: list[str], kinds: tuple[str, ...]) -> bool:
    """Is there a found object for every asked kind (one object per entry of kinds: ("cat", "cat") needs two)?"""
    need = list(kinds)
    for k in found:
        if k in need:
            need.remove(k)
    return not need


def asked_kinds_found(image: np.ndarray, kinds: tuple[str, ...]) -> bool:
    """Does the evaluator find an object of every asked kind in the image?"""
    return covers(object_kinds(image), kinds)


def _renders(bench: Bench, combo: Combination, a: str, b: str) -> list[list[np.ndarray]]:
    from ..rendering import Applied

    concepts = [replace(bench.concept(n, combo.method), name=w) for n, w in zip((a, b), WORDS)]
    opts = {"exact": combo.exact}
    if combo.scale is not None:
        opts["scales"] = {w: combo.scale for w in WORDS}
    prompts = [p.format(a=WORDS[0], b=WORDS[1]) for p in bench.cfg.pair_prompts]
    with Applied(bench.base.pipe, concepts, bench.cov.C, **opts) as applied:
        return bench.images(bench.applied_call(applied), prompts)


def score_pair(images: list[list[np.ndarray]], captions: list[str], a: str, b: str) -> dict:
    """Recognition of each concept, fidelity to each instance, whether both asked kinds are drawn, and alignment
    of images[prompt][seed]."""
    from ..toyworld import evaluate as ev
    from ..toyworld import world as tw

    kinds = (tw.INSTANCES_BY_NAME[a].supercategory, tw.INSTANCES_BY_NAME[b].supercategory)

    per: dict[str, list[float]] = {k: [] for k in SUMMARY}
    for caption, ims in zip(captions, images):
        for im in ims:
            ra, rb = ev.recognition(im, a), ev.recognition(im, b)
            per["recognised_a"].append(float(ra["recognised"]))
            per["recognised_b"].append(float(rb["recognised"]))
            per["both_recognised"].append(float(ra["recognised"] and rb["recognised"]))
            per["asked_kinds"].append(float(asked_kinds_found(im, kinds)))
            per["fidelity_a"].append(ra["score"])
            per["fidelity_b"].append(rb["score"])
            per["alignment"].append(ev.alignment(im, caption))
    return {**{k: float(np.mean(v)) for k, v in per.items()}, "images": len(per["alignment"]),
            "per_image": {k: [round(x, 4) for x in v] for k, v in per.items()}}


def run_pairs(bench: Bench) -> dict:
    """Every pair by every combination; the pairs report's own fields."""
    from ..toyworld import world as tw

    cfg = bench.cfg
    pairs, combos = pair_list(bench.names), combinations(cfg)
    carried = carried_combinations(bench.reused_pairs, cfg, pairs, combos)
    results: dict[str, dict] = {}
    for pi, (a, b) in enumerate(pairs):
        stage = f"pair {a} + {b} ({pi + 1}/{len(pairs)})"
        sup = {n: tw.INSTANCES_BY_NAME[n].supercategory for n in (a, b)}
        captions = [p.format(a=sup[a], b=sup[b]) for p in cfg.pair_prompts]
        row = {WORLD: score_pair(world_pairs(a, b, [scene_of(p) for p in cfg.pair_prompts], cfg.seeds, cfg.seed),
                             captions, a, b),
               "base model": score_pair(bench.images(bench.base_call(), captions), captions, a, b)}
        for k, combo in enumerate(combos):
            bench.progress(stage, k, len(combos))
            if combo.id in carried:
                row[combo.id] = bench.reused_pairs["results"][f"{a}+{b}"][combo.id]
            else:
                row[combo.id] = score_pair(_renders(bench, combo, a, b), captions, a, b)
        bench.progress(stage, len(combos), len(combos))
        results[f"{a}+{b}"] = row
    ids = [WORLD, "base model", *[c.id for c in combos]]
    mean = {cid: {k: float(np.mean([r[cid][k] for r in results.values()])) for k in SUMMARY} for cid in ids}
    return {
        "pairs": [list(p) for p in pairs], "words": list(WORDS), "recognised": RECOGNISED,
        "combinations": [{"id": c.id, "method": c.method, "label": c.label, "exact": c.exact, "scale": c.scale}
                         for c in combos],
        "images_per_pair": len(cfg.pair_prompts) * cfg.seeds,
        "results": results, "mean": mean,
        "claim": {c.id: {"both_recognised": mean[c.id]["both_recognised"], "goal": GOAL,
                         "met": mean[c.id]["both_recognised"] >= GOAL} for c in combos},
        "carried_over": carried,
    }


def carried_combinations(prev: dict | None, cfg, pairs: list[tuple[str, str]], combos: list[Combination]) -> dict:
    """{combination id: where it comes from} of the combinations the pairs part copies from the reused pairs report
    `prev` (quality.load_reused_pairs) instead of rendering: those of methods this run does not measure (not in
    cfg.methods), when `prev` has them for every pair. The world's and the base model's rows are always made
    again (nothing is trained for them)."""
    if prev is None:
        return {}
    have = prev["results"]
    m = prev.get("machine", {})
    return {c.id: {"report": prev["path"], "measured": m.get("date"), "git_commit": m.get("git_commit")}
            for c in combos
            if c.method not in cfg.methods and all(c.id in have.get(f"{a}+{b}", {}) for a, b in pairs)}


# -- report -------------------------------------------------------------------------------------

def _row(label: str, r: dict, goal: str | None = None) -> str:
    kinds = "—" if "asked_kinds" not in r else f"{r['asked_kinds']:.0%}"   # reports before session 6 lack it
    cells = [f"{r['both_recognised']:.0%}"] + ([goal] if goal is not None else []) + [
        f"{r['recognised_a']:.0%}", f"{r['recognised_b']:.0%}", kinds, f"{r['fidelity_a']:.3f}",
        f"{r['fidelity_b']:.3f}", f"{r['alignment']:.3f}"]
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    c = report["config"]
    labels = {WORLD: "the world's own pictures of both (degraded): the evaluator's ceiling",
              "base model": "base model (supercategory words)", **{x["id"]: x["label"] for x in report["combinations"]}}
    L: list[str] = []
    a = L.append
    L += header("Two concepts in one image (toy world)", report)
    a(f"{measured(report)} Pairs (A + B): "
      f"{', '.join(' + '.join(p) for p in report['pairs'])}. Each concept was trained alone on its instance's "
      f"{c['photos']} photos ({c['steps']} steps; the concepts of the other parts, reused), given its own word "
      f"({' / '.join(report['words'])}), then applied together with the other; {len(c['pair_prompts'])} prompts × "
      f"{c['seeds']} seeds = {report['images_per_pair']} images per pair and combination.")
    a("")
    for cid, src in report.get("carried_over", {}).items():
        a(f"**{labels[cid]}** was not measured in this run: its rows are carried over from `{src['report']}` "
          f"(measured {src.get('measured') or 'earlier'}, commit {src.get('git_commit') or 'unknown'}) with the "
          "same pairs, prompts, seeds and settings (`--reuse`).")
        a("")
    a(f"**Recognised**: {report['recognised']}")
    a("")
    a(f"## Both concepts recognised (goal: ≥ {GOAL:.0%} of images), mean over pairs")
    a("")
    a("| combination | both recognised | goal | A recognised | B recognised | asked kinds found | fidelity A | fidelity B "
      "| alignment |")
    a("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cid, r in report["mean"].items():
        claim = report["claim"].get(cid)
        goal = "" if claim is None else ("met" if claim["met"] else "**missed**")
        a(_row(labels[cid], r, goal))
    a("")
    a("Asked kinds found: an object of each concept's supercategory is among the objects the evaluator finds (the "
      "base model's row says how often this model can draw the two asked objects at all). "
      "Fidelity: of the image's object that best matches each instance (0 when the image has no object). "
      "Alignment: with the prompt, both concept words read as their supercategories. The base model's row is how "
      "often a generic object of the right kind passes for the instance.")
    a("")
    a("## Per pair")
    a("")
    for pair, row in report["results"].items():
        a(f"### {pair.replace('+', ' + ')}")
        a("")
        a("| combination | both recognised | A recognised | B recognised | asked kinds found | fidelity A | fidelity B "
          "| alignment |")
        a("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for cid, r in row.items():
            a(_row(labels[cid], r))
        a("")
    a("## Prompts")
    a("")
    for p in c["pair_prompts"]:
        a(f"- {p.format(a='A', b='B')}")
    a("")
    a("## Reproduce")
    a("")
    a("```bash")
    a(reproduce(c, "pairs"))
    a("```")
    a("")
    return "\n".join(L)
