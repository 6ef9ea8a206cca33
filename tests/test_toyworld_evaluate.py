"""Tests of the toy world's evaluators (perfusion_cli.toyworld.evaluate): alignment (toy CLIP-T) and
fidelity (toy CLIP-I) against ground truth.

The retrieval thresholds below are set from the full validation run reported in
docs/toyworld-evaluators.md (validate() with its defaults: 300 images, 168 instance renders, seed 0)
minus a margin for the much smaller sample used here (a few standard errors): they catch an evaluator
that stopped telling the truth apart, not a point of accuracy.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from perfusion_cli import toyworld as tw
from perfusion_cli.toyworld import evaluate as ev

# Full run (docs/toyworld-evaluators.md), minus a margin for a 40-image / 28-render sample.
CAPTION_TOP1_CLEAN_MIN = 0.80
CAPTION_TOP1_DEGRADED_MIN = 0.70
INSTANCE_TOP1_CLEAN_MIN = 0.85
INSTANCE_TOP1_DEGRADED_MIN = 0.80


def scene_image(name: str, *objs: tw.Obj, seed: int = 0) -> np.ndarray:
    """A held-out-background render of objects in a scene."""
    sc = tw.place(tw.Scene(name, list(objs), bg=40, bg_flip=False), np.random.default_rng(seed))
    return tw.draw(sc)


@pytest.fixture(scope="module")
def small_validation():
    t = time.perf_counter()
    r = ev.validate(n_images=40, seed=1, degrade=True, instance_renders_per=2)
    r["wall"] = time.perf_counter() - t
    print(f"\nsmall validation in {r['wall']:.1f} s: " + ", ".join(
        f"{k} {r[k]:.3f}" for k in ("caption_top1_clean", "caption_top1_degraded",
                                     "instance_top1_clean", "instance_top1_degraded")))
    return r


# ------------------------------------------------------------------------------------------------
# Retrieval against ground truth
# ------------------------------------------------------------------------------------------------


def test_validation_report_shape(small_validation):
    r = small_validation
    assert r["n_images"] == 40 and r["seed"] == 1 and r["n_candidates"] == 32
    assert r["n_instance_images"] == 2 * len(tw.INSTANCES)
    for key in ("caption_top1_clean", "caption_top1_degraded", "instance_top1_clean", "instance_top1_degraded"):
        assert 0.0 <= r[key] <= 1.0
    assert set(r["caption_pairwise_clean"]) == set(ev.CHANGES) | {"random"}


def test_caption_retrieval(small_validation):
    r = small_validation
    assert r["caption_top1_clean"] >= CAPTION_TOP1_CLEAN_MIN, r
    assert r["caption_top1_degraded"] >= CAPTION_TOP1_DEGRADED_MIN, r
    # every kind of one-attribute change is caught far above chance (0.5 for a pair)
    for tag in ("clean", "degraded"):
        for change, acc in r[f"caption_pairwise_{tag}"].items():
            assert acc >= 0.8, (tag, change, acc)


def test_instance_retrieval(small_validation):
    r = small_validation
    assert r["instance_top1_clean"] >= INSTANCE_TOP1_CLEAN_MIN, r
    assert r["instance_top1_degraded"] >= INSTANCE_TOP1_DEGRADED_MIN, r


# ------------------------------------------------------------------------------------------------
# Alignment: single clauses
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def red_ball_on_grass():
    return scene_image("on grass", tw.Obj("ball", "red", size="big"))


def test_alignment_range_and_details(red_ball_on_grass):
    d = ev.alignment_details(red_ball_on_grass, "a big red ball on grass")
    assert 0.0 <= d["score"] <= 1.0 and d["score"] > 0.9, d
    clauses = {c["clause"] for c in d["clauses"]}
    assert clauses == {"scene", "kind", "colour", "size", "count", "nothing else"}
    assert d["score"] == pytest.approx(np.mean([c["score"] for c in d["clauses"]]))
    assert ev.alignment(red_ball_on_grass, "a big red ball on grass") == pytest.approx(d["score"])
    assert [o["kind"] for o in d["objects"]] == ["ball"]


def test_scene_swap_lowers_alignment(red_ball_on_grass):
    good = ev.alignment(red_ball_on_grass, "a red ball on grass")
    for other in ("in the snow", "at night", "on the water", "in the desert", "on a beach"):
        assert ev.alignment(red_ball_on_grass, f"a red ball {other}") < good - 0.15, other


def test_wrong_colour_lowers_alignment(red_ball_on_grass):
    good = ev.alignment(red_ball_on_grass, "a red ball on grass")
    for colour in ("blue", "green", "white", "black", "purple"):
        assert ev.alignment(red_ball_on_grass, f"a {colour} ball on grass") < good - 0.15, colour


def test_wrong_kind_count_pattern_lower_alignment(red_ball_on_grass):
    good = ev.alignment(red_ball_on_grass, "a red ball on grass")
    for caption in ("a red car on grass", "two red balls on grass", "a red striped ball on grass",
                    "a red ball and a dog on grass", "a small red ball on grass"):
        assert ev.alignment(red_ball_on_grass, caption) < good - 0.08, caption


def test_alignment_counts_twins_and_reads_patterns():
    img = scene_image("in the snow", tw.Obj("dog", "black", variant=3), tw.Obj("dog", "black", flip=True),
                      tw.Obj("box", "yellow", "striped", "blue", variant=9), seed=3)
    good = ev.alignment(img, "two black dogs and a yellow and blue striped box in the snow")
    assert good > 0.85
    for caption in ("a black dog and a yellow and blue striped box in the snow",
                    "three black dogs and a yellow and blue striped box in the snow",
                    "two black dogs and a yellow and blue checked box in the snow",
                    "two black dogs and a yellow and blue spotted box in the snow",
                    "two black dogs in the snow"):
        assert ev.alignment(img, caption) < good - 0.05, caption


def test_alignment_with_concept_words():
    img, _ = tw.render_instance_in("tealcat", "on a beach", rng=4)
    good = ev.alignment(img, "a mycat on a beach", concepts={"mycat": "tealcat"})
    assert good > 0.85
    assert ev.alignment(img, "a mycat in the snow", concepts={"mycat": "tealcat"}) < good - 0.15
    assert ev.alignment(img, "a mydog on a beach", concepts={"mydog": tw.INSTANCES_BY_NAME["spotdog"]}) < good - 0.1


def test_parse_caption_grammar_and_errors():
    imgs, caps, scenes = tw.sample(200, seed=11)
    for cap, sc in zip(caps, scenes):
        claim = ev.parse_caption(cap)
        assert claim.text() == cap
        assert ev.claim_is_true(claim, sc), cap
    c = ev.parse_caption("Two small red and white striped dogs and a teal ball on the water.")
    assert c.scene == "on the water" and [p.count for p in c.phrases] == [2, 1]
    assert c.phrases[0] == ev.Phrase(2, "dog", "red", "white", "striped", "small")
    for bad in ("", "a", "a purple", "red ball", "a red unicorn on grass", "a red ball and", "a ball the dog"):
        with pytest.raises(ValueError):
            ev.parse_caption(bad)
    with pytest.raises(ValueError):
        ev.alignment(np.zeros((32, 32, 3), np.uint8), "a red ball")


def test_distractors_are_false_and_distinct():
    rng = np.random.default_rng(0)
    for img, cap, sc in ev.validation_scenes(15, seed=3):
        truth = ev.parse_caption(cap)
        ds = ev.distractors(truth, sc, rng)
        assert len(ds) == 31 and len({c.text() for _, c in ds} | {cap}) == 32
        assert not any(ev.claim_is_true(c, sc) for _, c in ds)
        assert {ch for ch, _ in ds} <= set(ev.CHANGES) | {"random"}


# ------------------------------------------------------------------------------------------------
# Fidelity
# ------------------------------------------------------------------------------------------------


def test_different_instance_lowers_fidelity():
    for name, scene in (("tealcat", "on grass"), ("spotdog", "in the snow"), ("racecar", "in the desert")):
        img, _ = tw.render_instance_in(name, scene, others=[tw.Obj("tree", "green")], rng=7)
        own = ev.fidelity(img, name)
        assert 0.0 <= own <= 1.0 and own > 0.75, (name, own)
        for other in tw.INSTANCES:
            if other.name != name:
                assert ev.fidelity(img, other) < own, (name, other.name)


def test_fidelity_details_and_references():
    img, _ = tw.render_instance_in("giftbox", "at night", rng=2)
    d = ev.fidelity_details(img, "giftbox")
    assert set(d) == {"score", "kind", "colours", "layout", "signature", "object"}
    assert d["object"]["kind"] == "box"
    refs, _ = tw.photo_set("giftbox")
    assert ev.fidelity(img, "giftbox", reference_images=refs) == pytest.approx(d["score"], abs=1e-6)
    base = scene_image("at night", tw.Obj("box", "purple"))  # a plain purple box: no gold ribbon
    assert ev.fidelity(base, "giftbox") < d["score"] - 0.05
    empty = tw.background("on grass", 40)
    assert ev.fidelity(empty, "giftbox") == 0.0
    with pytest.raises(ValueError):
        ev.fidelity(img, "nosuchinstance")


def test_recognition_of_two_instances_in_one_image():
    """recognition(): each of two instances in one render is recognised (in its own object), a third instance of
    the same kind is not; the score is fidelity's; an empty scene recognises nothing."""
    for a, b, scene in (("hatcat", "spotdog", "on grass"), ("hatcat", "scarfcat", "in the snow"),
                        ("giftbox", "fruittree", "on a beach")):
        img, _ = tw.render_instance_in(a, scene, others=[tw.INSTANCES_BY_NAME[b].spec], rng=1)
        for name in (a, b):
            r = ev.recognition(img, name)
            assert r["recognised"] and r["margin"] > 0.05, (a, b, name, r)
            assert r["score"] == pytest.approx(ev.fidelity(img, name))
        r = ev.recognition(img, "tealcat")
        assert not r["recognised"] and r["best_other"] in (a, b), r
    # with only the two instances as candidates, a cat is still told from the other cat
    img, _ = tw.render_instance_in("hatcat", "at night", rng=2)
    assert ev.recognition(img, "hatcat", candidates=["scarfcat"])["recognised"]
    assert not ev.recognition(img, "scarfcat", candidates=["hatcat"])["recognised"]
    empty = tw.draw(tw.Scene("on grass", [], bg=40, bg_flip=False))
    assert ev.recognition(empty, "hatcat") == {"recognised": False, "score": 0.0, "best_other": None, "margin": None}
    with pytest.raises(ValueError, match="unknown instance"):
        ev.recognition(img, "nosuch")


# ------------------------------------------------------------------------------------------------
# Degradation, determinism, silence (speed: docs/toyworld-evaluators.md, not a test)
# ------------------------------------------------------------------------------------------------


def test_degrade_is_deterministic_and_mild(red_ball_on_grass):
    a = ev.degrade(red_ball_on_grass, seed=5)
    b = ev.degrade(red_ball_on_grass, seed=5)
    c = ev.degrade(red_ball_on_grass, seed=6)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    diff = np.abs(a.astype(int) - red_ball_on_grass.astype(int)).mean()
    assert 1 < diff < 25
    batch = ev.degrade(np.stack([red_ball_on_grass] * 3), seed=5)
    assert batch.shape == (3, 64, 64, 3)


def test_pure_and_silent(red_ball_on_grass, capsys):
    before = red_ball_on_grass.copy()
    s1 = ev.alignment(red_ball_on_grass, "a red ball on grass")
    s2 = ev.alignment(red_ball_on_grass, "a red ball on grass")
    f = ev.fidelity(red_ball_on_grass, "beachball")
    assert s1 == s2 and 0.0 <= f <= 1.0
    assert np.array_equal(before, red_ball_on_grass)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""

