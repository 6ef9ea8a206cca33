"""`perfusion bench quality`: its quick mode end to end (what CI keeps alive) and the claim check's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from perfusion_cli.bench.quality import QualityConfig, dominance, instance_names
from perfusion_cli.cli import app
from perfusion_cli.errors import PerfusionError


def test_dominance_reads_perfusion_at_the_baselines_alignment():
    perf = [{"alignment": 0.5, "fidelity": 0.8}, {"alignment": 0.9, "fidelity": 0.4}]   # a straight curve
    other = [{"alignment": 0.7, "fidelity": 0.55},   # perfusion there: 0.6 -> at or above
             {"alignment": 0.6, "fidelity": 0.75},   # perfusion 0.7 -> below
             {"alignment": 0.95, "fidelity": 0.1}]   # outside perfusion's range: not matched
    r = dominance(perf, other)
    assert (r["matched"], r["at_or_above"], r["points"]) == (2, 1, 3) and r["share"] == pytest.approx(0.5)
    assert dominance(perf, [])["share"] is None


def test_instance_sets():
    from perfusion_cli.toyworld import world as tw

    assert instance_names("reporting") == [i.name for i in tw.REPORTING_INSTANCES] and len(tw.REPORTING_INSTANCES) >= 6
    assert instance_names(("hatcat", "tealcat")) == ["hatcat", "tealcat"]
    with pytest.raises(PerfusionError, match="unknown instance"):
        instance_names("nosuch")
    full = QualityConfig()
    assert len(full.prompts) >= 8 and len(full.biases) >= 5 and full.methods[0] == "perfusion"


QUICK_FILES = ["quality-quick.md", "quality-quick.json", "quality-quick.png",
               "quality-ablations-quick.md", "quality-ablations-quick.json", "quality-ablations-quick.png",
               "quality-pairs-quick.md", "quality-pairs-quick.json"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`perfusion bench quality --quick`, every part: (CLI result, written paths, {part: report})."""
    out = tmp_path_factory.mktemp("q")
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "-o", str(out)])
    assert r.exit_code == 0, r.output
    paths = [Path(p) for p in r.stdout.split()]
    reports = {js.name: json.loads(js.read_text()) for js in paths if js.suffix == ".json"}
    return r, paths, {rep["part"]: rep for rep in reports.values()}


def test_quick_run_writes_every_part(quick_run):
    r, paths, reports = quick_run
    assert [p.name for p in paths] == QUICK_FILES and all(p.is_file() for p in paths)
    assert set(reports) == {"methods", "ablations", "pairs"}
    for rep in reports.values():
        assert rep["config"]["quick"] is True and rep["config"]["parts"] == ["methods", "ablations", "pairs"]
        assert rep["total_s"] > 0 and rep["benchmark"] == "perfusion bench quality"
    for png in (p for p in paths if p.suffix == ".png"):
        img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(png))
        assert img.shape[2] == 3 and img.shape[0] > 300


def test_quick_methods_report(quick_run):
    r, paths, reports = quick_run
    report = reports["methods"]
    assert report["config"]["instances"] == ["hatcat"]
    res = report["results"]["hatcat"]
    assert set(res) == {"base model", "perfusion", "ti", "dreambooth", "lora", "custom-diffusion"}
    assert [p["knob"] for p in res["perfusion"]] == [0.5, 0.9] and [p["knob"] for p in res["lora"]] == [0.5, 1.0]
    assert [p["knob"] for p in res["ti"]] == [1, 2]                      # steps snapshots of one run
    for curve in res.values():
        for p in curve:
            assert 0 <= p["fidelity"] <= 1 and 0 <= p["alignment"] <= 1
    assert report["file_bytes"]["perfusion"] < report["file_bytes"]["lora"] < report["file_bytes"]["dreambooth"]
    assert set(report["claim_perfusion_at_or_above"]) == {"ti", "dreambooth", "lora", "custom-diffusion"}
    text = paths[0].read_text()
    assert "Quick mode" in text and "quality-quick.png" in text and "The paper's claim" in text
    assert "quality-ablations-quick.md" in text and "quality-pairs-quick.md" in text
    assert "Perfusion at or above ti" in r.stderr
    noise = report["claim_with_noise"]
    assert set(noise) == set(report["claim_perfusion_at_or_above"])
    for m, r_m in noise.items():   # as many matched points as the plain check; quick mode has 1 image: no SE
        assert len(r_m["matched"]) == report["claim_perfusion_at_or_above"][m]["matched"]
        assert all(x["verdict"] == "unknown (one image)" for x in r_m["matched"])
        assert r_m["other_beaten"] == r_m["perfusion_beaten"] == 0
    assert "with the noise of the renders" in text and "beyond the renders' noise" in r.stderr


def _unit(x) -> bool:
    return bool(np.isfinite(x)) and 0.0 <= x <= 1.0


def test_quick_ablations_report(quick_run):
    from perfusion_cli.bench.ablations import ABOUT
    from perfusion_cli.bench.quality import ABLATIONS

    r, paths, reports = quick_run
    rep = reports["ablations"]
    ids = ["no-key-lock", "rome", "mask", "one-photo", "global-lock", "train-beta-0.6", "train-beta-0.9",
           "word-scope-render", "word-scope"]
    assert [v["id"] for v in rep["variants"]] == ids and set(ABOUT) == set(ABLATIONS)
    untrained = {"rome", "global-lock", "word-scope-render"}
    assert {v["id"] for v in rep["variants"] if not v["trained"]} == untrained
    assert set(rep["train_seconds"]) == set(ids) - untrained
    row = rep["results"]["hatcat"]
    assert set(row) == {"perfusion", *ids}
    for pt in row.values():
        assert len(pt["fidelity_per_image"]) == rep["images_per_point"] == 1
        assert _unit(pt["fidelity"]) and _unit(pt["alignment"])
    for vid in ids:
        assert np.isfinite(rep["delta"][vid]["fidelity"]) and np.isfinite(rep["delta"][vid]["alignment"])
    # every point at the plain concept's default gate; its bias curve is the methods part's Perfusion curve (the
    # same concept at the same biases: reused, and its renders shared)
    assert rep["reference"] == {"beta": 0.7, "tau": 0.15}
    assert [(p["knob"], p["fidelity"]) for p in rep["bias_curves"]["hatcat"]] == \
        [(p["knob"], p["fidelity"]) for p in reports["methods"]["results"]["hatcat"]["perfusion"]]
    # the gate ablation changes the images: plain ROME is not the gated edit
    assert row["rome"]["fidelity_per_image"] != row["perfusion"]["fidelity_per_image"] or \
        row["rome"]["alignment_per_image"] != row["perfusion"]["alignment_per_image"]
    text = paths[3].read_text()
    assert "quality-ablations-quick.png" in text and "plain ROME" in text and "off the bias curve" in text
    assert "ablation rome:" in r.stderr
    assert set(rep["delta_se"]) == set(ids)   # one image per point: no spread (nan), and the table says nothing of it
    assert "(noise)" not in text


def test_paired_se_closed_form():
    """Δ's standard error pools the per-image differences of every instance: here 1, 2 (instance x) and 3, 4 (y),
    whose sample standard deviation is √(5/3), over √4."""
    from perfusion_cli.bench.ablations import REFERENCE, paired_se

    def pt(al, fi):
        return {"alignment_per_image": al, "fidelity_per_image": fi}

    results = {"x": {REFERENCE: pt([0.0, 0.0], [0.5, 0.5]), "v": pt([1.0, 2.0], [0.5, 0.5])},
               "y": {REFERENCE: pt([1.0, 1.0], [0.2, 0.4]), "v": pt([4.0, 5.0], [0.2, 0.4])}}
    se = paired_se(results, "v")
    assert se["alignment"] == pytest.approx(np.sqrt(5 / 3) / 2)
    assert se["fidelity"] == 0.0


def test_quick_pairs_report(quick_run):
    from perfusion_cli.bench.pairs import GOAL, WORLD

    r, paths, reports = quick_run
    rep = reports["pairs"]
    assert rep["pairs"] == [["hatcat", "scarfcat"]]      # a lone instance gets the first other reporting instance
    combos = ["perfusion-exact", "perfusion-approximate", "ti", "lora-0.5", "lora-1"]
    assert [c["id"] for c in rep["combinations"]] == combos
    row = rep["results"]["hatcat+scarfcat"]
    assert set(row) == {WORLD, "base model", *combos}
    for cid, res in row.items():
        assert res["images"] == rep["images_per_pair"] == 1
        for key in ("both_recognised", "recognised_a", "recognised_b", "asked_kinds", "fidelity_a", "fidelity_b",
                    "alignment"):
            assert _unit(res[key]), (cid, key, res[key])
        assert res["both_recognised"] <= min(res["recognised_a"], res["recognised_b"])
    assert set(rep["claim"]) == set(combos)
    for c in rep["claim"].values():
        assert c["goal"] == GOAL and c["met"] == (c["both_recognised"] >= GOAL)
    # the two Perfusion combinations are different edits (exact vs approximate), so their images differ
    ex, ap = row["perfusion-exact"]["per_image"], row["perfusion-approximate"]["per_image"]
    assert (ex["fidelity_a"], ex["fidelity_b"]) != (ap["fidelity_a"], ap["fidelity_b"])
    text = paths[6].read_text()
    assert "Recognised" in text and ("met" in text or "missed" in text) and "hatcat + scarfcat" in text
    # the reference of the world's own picture of both: the evaluator recognises both, and finds both kinds (cats)
    assert row[WORLD]["both_recognised"] == 1.0 and row[WORLD]["asked_kinds"] == 1.0
    assert WORLD not in rep["claim"] and "the evaluator's ceiling" in text and "asked kinds found" in text
    assert "pairs, perfusion-exact: both concepts recognised in" in r.stderr


def test_a_part_alone_writes_only_its_files(tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--parts", "ablations", "--ablations",
                                 "rome,global-lock", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(QUICK_FILES[3:6])
    rep = json.loads((out / "quality-ablations-quick.json").read_text())
    assert [v["id"] for v in rep["variants"]] == ["rome", "global-lock"] and rep["train_seconds"] == {}


def test_reuse_carries_over_the_methods_not_rerun(quick_run, tmp_path):
    """--methods perfusion --reuse the quick run's quality.json: perfusion is measured again, the other four methods
    are the earlier run's numbers, say so, and enter the claim check; other settings are refused."""
    from test_cli import assert_clean_error

    _, paths, reports = quick_run
    prev_path = next(p for p in paths if p.name == "quality-quick.json")
    prev = reports["methods"]
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--parts", "methods", "--methods", "perfusion",
                                 "--reuse", str(prev_path), "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "q" / "quality-quick.json").read_text())
    assert rep["config"]["methods"] == ["perfusion"]
    assert set(rep["carried_over"]) == {"ti", "dreambooth", "lora", "custom-diffusion"}
    for m in rep["carried_over"]:
        assert rep["results"]["hatcat"][m] == prev["results"]["hatcat"][m]
        assert rep["file_bytes"][m] == prev["file_bytes"][m]
    assert set(rep["claim_perfusion_at_or_above"]) == {"ti", "dreambooth", "lora", "custom-diffusion"}
    # perfusion itself was measured again: same settings and seeds, so the same numbers
    assert [p["knob"] for p in rep["results"]["hatcat"]["perfusion"]] == [0.5, 0.9]
    text = (tmp_path / "q" / "quality-quick.md").read_text()
    assert "was not measured in this run" in text and f"--reuse {prev_path}" in text

    # the full settings against a quick report: refused, naming the first setting that differs
    r = CliRunner().invoke(app, ["bench", "quality", "--instances", "hatcat", "--parts", "methods", "--methods",
                                 "perfusion", "--reuse", str(prev_path), "-o", str(tmp_path / "y")])
    assert_clean_error(r, "measured with other steps")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--methods", "perfusion", "--reuse", str(bad),
                                 "-o", str(tmp_path / "z")])
    assert_clean_error(r, "not a methods report")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_reuse_carries_over_the_pairs_of_the_methods_not_rerun(quick_run, tmp_path):
    """--parts methods,pairs --methods lora --reuse: the pairs report beside the reused methods report gives the
    Perfusion and TI combinations (nothing of theirs is trained again), LoRA's are rendered anew, the world and
    base rows are made again; the report says which rows are carried; a pairs report of other settings is refused,
    and without one beside --reuse every combination is measured."""
    import shutil

    from test_cli import assert_clean_error

    _, paths, reports = quick_run
    prev_path = next(p for p in paths if p.name == "quality-quick.json")
    prev = reports["pairs"]
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--parts", "methods,pairs", "--methods", "lora",
                                 "--reuse", str(prev_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "perfusion: training" not in r.stderr and "ti: training" not in r.stderr   # carried, not retrained
    rep = json.loads((out / "quality-pairs-quick.json").read_text())
    assert set(rep["carried_over"]) == {"perfusion-exact", "perfusion-approximate", "ti"}
    pair = next(iter(rep["results"]))
    for cid in rep["carried_over"]:
        assert rep["results"][pair][cid] == prev["results"][pair][cid]
        assert rep["mean"][cid] == pytest.approx(prev["mean"][cid])
    lora = [c["id"] for c in rep["combinations"] if c["method"] == "lora"]
    assert lora and all(cid in rep["results"][pair] and cid not in rep["carried_over"] for cid in lora)
    text = (out / "quality-pairs-quick.md").read_text()
    assert "Textual Inversion, two tokens** was not measured in this run" in text
    assert f"--methods lora --reuse {prev_path} --parts pairs" in text

    # a pairs report beside it made with other settings: refused before anything is trained
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(prev_path, other / prev_path.name)
    bad = {**prev, "config": {**prev["config"], "pair_prompts": ["a {a} and a {b} in space"]}}
    (other / "quality-pairs-quick.json").write_text(json.dumps(bad))
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--parts", "methods,pairs", "--methods", "lora",
                                 "--reuse", str(other / prev_path.name), "-o", str(tmp_path / "y")])
    assert_clean_error(r, "measured with other pair_prompts")
    assert not (tmp_path / "y").exists()

    # none beside it: said, and every combination measured
    (other / "quality-pairs-quick.json").unlink()
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--parts", "pairs", "--methods", "lora",
                                 "--reuse", str(other / prev_path.name), "-o", str(tmp_path / "z")])
    assert r.exit_code == 0, r.output
    assert "the pairs part measures every combination" in r.stderr
    rep = json.loads((tmp_path / "z" / "quality-pairs-quick.json").read_text())
    assert rep["carried_over"] == {} and "perfusion: training" in r.stderr


@pytest.mark.parametrize("args, phrase", [
    (["--methods", "perfusion,hyper"], "unknown method"),
    (["--parts", "methods,nosuch"], "unknown part"),
    (["--parts", ","], "needs at least one"),
    (["--ablations", "rome,sideways"], "unknown ablation"),
    (["--instances", "nosuch"], "unknown instance"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, phrase):
    from test_cli import assert_clean_error

    r = CliRunner().invoke(app, ["bench", "quality", "--quick", *args, "-o", str(tmp_path / "q")])
    assert_clean_error(r, phrase)
    assert not (tmp_path / "q").exists()


def test_pair_lists_and_variants():
    from perfusion_cli.bench.ablations import off_curve, variants
    from perfusion_cli.bench.pairs import pair_list

    assert pair_list(["a", "b"]) == [("a", "b")]
    assert pair_list(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    four = pair_list(["a", "b", "c", "d"])
    assert four == [("a", "b"), ("b", "c"), ("c", "d")] and len(pair_list(list("abcdefg"))) == 6
    assert pair_list(["scarfcat"]) == [("scarfcat", "hatcat")]
    vs = variants(QualityConfig(ablations=("train-beta", "one-photo"), train_betas=(0.5,)))
    assert [(v.id, v.train, v.photos) for v in vs] == [("train-beta-0.5", {"train_beta": 0.5}, None),
                                                      ("one-photo", {}, 1)]
    curve = [{"alignment": 0.5, "fidelity": 0.8}, {"alignment": 0.9, "fidelity": 0.4}]
    assert off_curve(curve, {"alignment": 0.7, "fidelity": 0.65}) == pytest.approx(0.05)
    assert off_curve(curve, {"alignment": 0.95, "fidelity": 0.65}) is None


def test_pareto_counts_points_beaten_on_both_axes():
    from perfusion_cli.bench.quality import pareto

    perf = [{"alignment": 0.6, "fidelity": 0.6}, {"alignment": 0.7, "fidelity": 0.4}]
    other = [{"alignment": 0.65, "fidelity": 0.65},   # beats perfusion's first point
             {"alignment": 0.5, "fidelity": 0.3}]     # beaten by both of perfusion's
    r = pareto(perf, other)
    assert (r["other_beaten"], r["other_points"], r["perfusion_beaten"], r["perfusion_points"]) == (1, 2, 1, 2)
    assert pareto(perf, perf)["other_beaten"] == 0   # a point does not beat itself


def test_world_pairs_and_asked_kinds():
    """The pairs report's references: the world's own pictures of both instances, per scene, and the check that an
    object of every asked kind is found (true of such a picture, false of an empty scene or of a third kind)."""
    from perfusion_cli.bench.pairs import asked_kinds_found, scene_of, world_pairs
    from perfusion_cli.toyworld import world as tw

    assert scene_of("a {a} and a {b} on a beach") == "on a beach"
    groups = world_pairs("hatcat", "spotdog", ["on grass", "at night"], 2)
    assert [len(g) for g in groups] == [2, 2]
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for g in groups for im in g)
    assert all(asked_kinds_found(im, ("cat", "dog")) for g in groups for im in g)
    assert not asked_kinds_found(groups[0][0], ("cat", "dog", "car"))
    assert not asked_kinds_found(tw.background("on grass"), ("cat",))   # uint8, no object


def test_merged_ablations_equal_one_run_of_all_instances():
    """merge() of two runs on different instances gives what summarise() gives on all the instances at once, with
    training seconds averaged per instance; runs of different settings, or sharing an instance, do not merge."""
    from perfusion_cli.bench.ablations import REFERENCE, merge, summarise

    def pt(al, fi):
        return {"alignment": float(np.mean(al)), "fidelity": float(np.mean(fi)),
                "alignment_per_image": al, "fidelity_per_image": fi}

    def run(names, offset, seconds):
        results = {n: {REFERENCE: pt([0.5 + offset, 0.6], [0.4, 0.5]), "v": pt([0.7, 0.2 + offset], [0.3, 0.9])}
                   for n in names}
        curves = {n: [{"knob": b, "alignment": 0.5 + b / 10, "fidelity": 0.6 - b / 5 + offset} for b in (0.5, 0.9)]
                  for n in names}
        cfg = {**QualityConfig().__dict__, "instances": names, "biases": [0.5, 0.9]}
        return {"part": "ablations", "variants": [{"id": "v"}], "results": results, "bias_curves": curves,
                **summarise(results, curves, ["v"], [0.5, 0.9]), "train_seconds": {"v": seconds},
                "reference_train_seconds": seconds / 2, "config": cfg, "model": "toy",
                "machine": {"date": f"d{offset}"}, "total_s": 60.0}

    a, b = run(["x"], 0.0, 10.0), run(["y", "z"], 0.1, 40.0)
    m = merge([a, b])
    whole = summarise({**a["results"], **b["results"]}, {**a["bias_curves"], **b["bias_curves"]}, ["v"], [0.5, 0.9])
    for key in ("mean", "mean_bias_curve", "off_curve", "delta", "delta_se"):
        assert m[key] == whole[key], key
    assert m["config"]["instances"] == ["x", "y", "z"] and m["total_s"] == 120.0
    assert m["train_seconds"]["v"] == pytest.approx((10 + 2 * 40) / 3) and len(m["merged_from"]) == 2
    assert len(merge([m, run(["w"], 0.3, 1.0)])["merged_from"]) == 3   # a merged report merges on
    with pytest.raises(PerfusionError, match="differ in seeds"):
        merge([a, {**b, "config": {**b["config"], "seeds": 9}}])
    with pytest.raises(PerfusionError, match="an instance is in two reports"):
        merge([a, run(["x"], 0.2, 1.0)])


def test_joined_ablations_add_variants_of_the_same_instances():
    """join_variants() of runs of different ablations on the same instances gives what summarise() gives on all the
    variants at once; runs whose plain concepts render differently, or of other instances, do not join."""
    from perfusion_cli.bench.ablations import REFERENCE, join_variants, summarise

    def pt(al, fi):
        return {"alignment": float(np.mean(al)), "fidelity": float(np.mean(fi)),
                "alignment_per_image": al, "fidelity_per_image": fi}

    curves = {n: [{"knob": b, "alignment": 0.5 + b / 10, "fidelity": 0.6 - b / 5} for b in (0.5, 0.9)] for n in "xy"}

    def run(vid, offset, ablation, ref=(0.5, 0.6), names="xy"):
        results = {n: {REFERENCE: pt(list(ref), [0.4, 0.5]), vid: pt([0.7, 0.2 + offset], [0.3, 0.9 - offset])}
                   for n in names}
        cfg = {**QualityConfig().__dict__, "instances": list(names), "biases": [0.5, 0.9], "ablations": [ablation]}
        return {"part": "ablations", "variants": [{"id": vid}], "results": results,
                "bias_curves": {n: curves[n] for n in names}, **summarise(results, curves, [vid], [0.5, 0.9]),
                "train_seconds": {vid: 10.0 + offset}, "reference_train_seconds": 5.0, "config": cfg, "model": "toy",
                "machine": {"date": f"d{offset}"}, "total_s": 60.0}

    a, b = run("rome", 0.0, "rome"), run("word-scope", 0.1, "word-scope")
    j = join_variants([a, b])
    whole = summarise({n: {**a["results"][n], **b["results"][n]} for n in "xy"}, curves, ["rome", "word-scope"],
                      [0.5, 0.9])
    for key in ("mean", "mean_bias_curve", "off_curve", "delta", "delta_se"):
        assert j[key] == whole[key], key
    assert [v["id"] for v in j["variants"]] == ["rome", "word-scope"]
    assert j["config"]["ablations"] == ["rome", "word-scope"] and j["total_s"] == 120.0
    assert set(j["train_seconds"]) == {"rome", "word-scope"} and len(j["joined_from"]) == 2
    with pytest.raises(PerfusionError, match="renders differently"):
        join_variants([a, run("word-scope", 0.1, "word-scope", ref=(0.5, 0.65))])
    # float noise between runs (a score moved by 0.005) joins, keeping the first run's reference
    near = join_variants([a, run("word-scope", 0.1, "word-scope", ref=(0.505, 0.6))])
    assert near["results"]["x"][REFERENCE] == a["results"]["x"][REFERENCE]
    assert near["joined_reference_gap"] == pytest.approx(0.005)
    with pytest.raises(PerfusionError, match="same instances"):
        join_variants([a, run("word-scope", 0.1, "word-scope", names="x")])
    with pytest.raises(PerfusionError, match="in two reports"):
        join_variants([a, run("rome", 0.1, "rome")])
    with pytest.raises(PerfusionError, match="differ in seeds"):
        join_variants([a, {**b, "config": {**b["config"], "seeds": 9}}])


def test_covers_counts_each_asked_object():
    from perfusion_cli.bench.pairs import covers

    assert covers(["cat", "dog", "tree"], ("cat", "dog")) and covers(["cat", "cat"], ("cat", "cat"))
    assert not covers(["cat"], ("cat", "cat")) and not covers([], ("ball",)) and covers([], ())


def _point(knob, align, fid):
    return {"knob": knob, "alignment": float(np.mean(align)), "fidelity": float(np.mean(fid)),
            "alignment_per_image": list(map(float, align)), "fidelity_per_image": list(map(float, fid))}


def test_noise_check_gap_is_the_interpolated_claim_with_its_paired_standard_error():
    """The matched gap equals `dominance`'s interpolated reading (np.interp on the mean curves) minus the baseline's
    fidelity, and its SE is the sample standard deviation of the per-image gaps over √n, computed here by hand."""
    from perfusion_cli.bench.quality import _mean_curves, noise_check

    rng = np.random.default_rng(0)
    results = {}
    for name in ("one", "two"):   # two instances, 8 images each
        base = rng.uniform(0.3, 0.7, 8)
        results[name] = {
            "perfusion": [_point(0.5, base * 0 + 0.60 + rng.normal(0, .01, 8), base + 0.2),
                          _point(0.9, base * 0 + 0.70 + rng.normal(0, .01, 8), base + rng.normal(0, .05, 8))],
            "other": [_point(100, np.full(8, 0.64), base + 0.05 + rng.normal(0, .02, 8)),
                      _point(200, np.full(8, 0.95), base)]}   # outside perfusion's alignment range
    r = noise_check(results, "other")
    mean = _mean_curves(results, ["perfusion", "other"])
    pa = sorted((p["alignment"], p["fidelity"]) for p in mean["perfusion"])
    q = mean["other"][0]
    expected = np.interp(q["alignment"], [x for x, _ in pa], [y for _, y in pa]) - q["fidelity"]
    assert len(r["matched"]) == 1 and r["points"] == 2
    m = r["matched"][0]
    assert m["knob"] == 100 and m["fidelity_gap"] == pytest.approx(expected, abs=1e-12)
    a_lo, a_hi = (np.concatenate([results[n]["perfusion"][k]["alignment_per_image"] for n in results]).mean()
                  for k in (0, 1))
    w = (q["alignment"] - a_lo) / (a_hi - a_lo)
    per = [(1 - w) * f0 + w * f1 - fq for n in results for f0, f1, fq in
           zip(results[n]["perfusion"][0]["fidelity_per_image"], results[n]["perfusion"][1]["fidelity_per_image"],
               results[n]["other"][0]["fidelity_per_image"])]
    assert m["se"] == pytest.approx(np.std(per, ddof=1) / np.sqrt(16), rel=1e-9)
    assert m["verdict"] == ("ahead" if m["fidelity_gap"] > 2 * m["se"] else
                            "behind" if m["fidelity_gap"] < -2 * m["se"] else "within noise")


def test_noise_check_pareto_counts_only_wins_beyond_noise():
    from perfusion_cli.bench.quality import noise_check, pareto

    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.2, 16)
    results = {"one": {
        # perfusion's first point is ahead of the other's first by 0.005 on both axes with per-image noise of 0.2:
        # a Pareto win on the means, not beyond noise; its second point is behind the other's second by 0.1 on
        # fidelity with identical per-image offsets (SE 0): beaten beyond noise
        "perfusion": [_point(0.5, 0.6 + noise, 0.6 + noise), _point(0.9, np.full(16, 0.7), 0.3 + noise)],
        "other": [_point(1, 0.595 + noise[::-1], 0.595 + noise[::-1]), _point(2, np.full(16, 0.7), 0.4 + noise)]}}
    r = noise_check(results, "other")
    plain = pareto(results["one"]["perfusion"], results["one"]["other"])
    assert plain["other_beaten"] >= 1                           # the means alone count the first point as beaten
    assert (r["other_beaten"], r["perfusion_beaten"]) == (0, 1)
    older = {"one": {"perfusion": [{"knob": 0.5, "alignment": 0.6, "fidelity": 0.6}], "other": []}}
    assert noise_check(older, "other") is None                  # reports without per-image scores: no check
