"""Tests of the procedural toy world (perfusion_cli.toyworld): determinism, shapes, vocabulary coverage,
caption truth (every caption parsed back and matched against its scene), scene distinctness, patterns,
instances (extras drawn, reserved colours never in the base distribution), photo sets, speed (printed)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from perfusion_cli import toyworld as tw
from perfusion_cli.toyworld.world import _with

N = 2000


@pytest.fixture(scope="module")
def base():
    t = time.perf_counter()
    tw.sample(8, seed=123)  # builds the background banks and common templates
    warm = time.perf_counter() - t
    t = time.perf_counter()
    imgs, caps, scenes = tw.sample(N, seed=0)
    dt = time.perf_counter() - t
    print(f"\ntoyworld: warm-up {warm:.2f} s, then {N / dt:,.0f} images/s on one core ({N} images in {dt:.2f} s)")
    return imgs, caps, scenes


# ------------------------------------------------------------------------------------------------
# A parser for the caption grammar, used to check captions against their scenes
# ------------------------------------------------------------------------------------------------

_NUM = {"a": 1, "an": 1, **{w: n for n, w in tw.world.NUMBERS.items()}}
_SINGULAR = {p: k for k, p in tw.PLURALS.items()} | {k: k for k in tw.KINDS}


def parse(caption: str):
    """caption -> (scene name or None, [dict(count, kind, size?, colour?, colour2?, pattern?)])."""
    scene = None
    for s in tw.SCENES:
        if caption.endswith(" " + s):
            scene, caption = s, caption[: -len(s) - 1]
    toks, i, phrases = caption.split(), 0, []
    while i < len(toks):
        if phrases:
            assert toks[i] == "and", caption
            i += 1
        assert toks[i] in _NUM, caption
        ph = {"count": _NUM[toks[i]]}
        i += 1
        if toks[i] in ("small", "big"):
            ph["size"] = toks[i]
            i += 1
        if toks[i] == "solid":
            ph["pattern"] = "solid"
            i += 1
            assert toks[i] in tw.COLOURS, caption  # "solid" is only said before a colour
        if toks[i] in tw.COLOURS:
            ph["colour"] = toks[i]
            i += 1
            if toks[i] == "and" and toks[i + 1] in tw.COLOURS:
                ph["colour2"] = toks[i + 1]
                i += 2
                assert toks[i] in tw.PATTERNS[1:], caption  # a second colour comes with its pattern
        if toks[i] in tw.PATTERNS[1:]:
            ph["pattern"] = toks[i]
            i += 1
        assert toks[i] in _SINGULAR, caption
        assert (toks[i] in tw.KINDS) == (ph["count"] == 1) or toks[i] == "fish", caption
        ph["kind"] = _SINGULAR[toks[i]]
        i += 1
        phrases.append(ph)
    return scene, phrases


def _matches(ph: dict, o: tw.Obj) -> bool:
    return all(getattr(o, k) == v for k, v in ph.items() if k != "count")


def check_caption(caption: str, scene: tw.Scene) -> None:
    """Every phrase is true of exactly `count` distinct objects and every object is described once."""
    name, phrases = parse(caption)
    assert name in (None, scene.name), (caption, scene)
    slots = [ph for ph in phrases for _ in range(ph["count"])]

    def assign(k: int, free: frozenset) -> bool:  # a perfect matching of phrase slots to objects
        if k == len(slots):
            return not free
        return any(assign(k + 1, free - {i}) for i in free if _matches(slots[k], scene.objs[i]))

    assert assign(0, frozenset(range(len(scene.objs)))), (caption, scene)


# ------------------------------------------------------------------------------------------------
# Base distribution
# ------------------------------------------------------------------------------------------------


def test_shapes_and_determinism():
    a_img, a_cap, a_sc = tw.sample(40, seed=7)
    b_img, b_cap, b_sc = tw.sample(40, seed=7)
    c_img, c_cap, _ = tw.sample(40, seed=8)
    assert a_img.shape == (40, 64, 64, 3) and a_img.dtype == np.uint8
    assert len(a_cap) == len(a_sc) == 40 and all(isinstance(c, str) and c for c in a_cap)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    for img, sc in zip(a_img, a_sc):  # draw() reproduces the batch
        assert np.array_equal(tw.draw(sc), img)
    m = tw.object_mask(a_sc[0])
    assert m.shape == (64, 64) and m.min() >= -1 and m.max() < len(a_sc[0].objs)


def test_vocabulary_covered(base):
    _, caps, _ = base
    text = " ".join(caps)
    words = set(text.split())
    for w in [*tw.KINDS, *tw.COLOURS, *tw.PATTERNS, "small", "big", "two", "three"]:
        assert w in words, w
    for s in tw.SCENES:
        assert " " + s in text, s
    assert {tw.PLURALS[k] for k in tw.KINDS} & words
    assert not words & set(tw.INSTANCE_COLOURS)
    assert "medium" not in words
    assert not words - ({*tw.KINDS, *tw.PLURALS.values(), *tw.COLOURS, *tw.PATTERNS, "small", "big", "and", "a",
                         "an", *tw.world.NUMBERS.values()} | {w for s in tw.SCENES for w in s.split()})


def test_captions_are_true(base):
    _, caps, scenes = base
    for c, s in zip(caps, scenes):
        check_caption(c, s)
    n_objs = [len(s.objs) for s in scenes]
    assert set(n_objs) == {1, 2, 3}


def test_objects_visible_and_inside(base):
    _, _, scenes = base
    for s in scenes[:500]:
        assert min(tw.visible_fraction(s)) >= tw.world.MIN_VISIBLE
        for o in s.objs:
            w, _ = tw.object_size(o)
            assert 0 <= o.x - w // 2 and o.x + w // 2 <= 64
    # objects of many kinds, sizes, positions actually occur
    objs = [o for s in scenes for o in s.objs]
    assert {o.kind for o in objs} == set(tw.KINDS) and {o.size for o in objs} == set(tw.SIZES)
    assert {tw.position_of(o) for o in objs} == set(tw.POSITIONS)
    assert {o.pattern for o in objs} == set(tw.PATTERNS) and {o.flip for o in objs} == {True, False}


def test_scenes_differ(base):
    imgs, _, scenes = base
    means = {}
    for name in tw.SCENES:
        sel = [i for i, s in enumerate(scenes) if s.name == name]
        assert len(sel) > 100
        # background pixels only, top half (sky) and bottom half (ground) separately
        bg = np.stack([tw.object_mask(scenes[i]) < 0 for i in sel])
        x = imgs[sel].astype(np.float32)
        top = (x[:, :32] * bg[:, :32, :, None]).sum((0, 1, 2)) / bg[:, :32].sum()
        bottom = (x[:, 40:] * bg[:, 40:, :, None]).sum((0, 1, 2)) / bg[:, 40:].sum()
        means[name] = np.r_[top, bottom]
        # more than two flat colours: lots of distinct colours in the background
        assert len(np.unique(tw.background(name, 3).reshape(-1, 3), axis=0)) > 200
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            d = np.linalg.norm(means[names[i]] - means[names[j]])
            assert d > 25, (names[i], names[j], d)


def test_patterns_show_both_colours(base):
    imgs, _, scenes = base
    checked = 0
    for img, s in zip(imgs, scenes):
        m = tw.object_mask(s)
        for i, o in enumerate(s.objs):
            if o.pattern == "solid":
                continue
            px = img[m == i].astype(np.float32)
            c1, c2 = tw.rgb(o.colour), tw.rgb(o.colour2)
            near1 = (np.linalg.norm(px - c1, axis=1) < 30).sum()
            near2 = (np.linalg.norm(px - c2, axis=1) < 30).sum()
            assert near1 >= 5 and near2 >= 5, (o, near1, near2)
            checked += 1
    assert checked > 300
    # a solid object has no second colour
    o = tw.Obj("cat", "red", size="big", x=32, y=60)
    img = tw.draw(tw.Scene("on grass", [o]))
    px = img[tw.object_mask(tw.Scene("on grass", [o])) == 0].astype(np.float32)
    assert (np.linalg.norm(px - tw.rgb("red"), axis=1) < 30).mean() > 0.5


def test_twins_are_counted():
    scene = tw.Scene("on grass", [tw.Obj("ball", "red", x=16, y=55), tw.Obj("ball", "red", x=48, y=57, flip=True)])
    caps = {tw.caption(scene, np.random.default_rng(i)) for i in range(60)}
    assert any(c.startswith("two red balls") for c in caps)
    assert not any(" a " in f" {c} " and "ball" in c and "two" not in c for c in caps)
    for c in caps:
        check_caption(c, scene)


def test_validation():
    with pytest.raises(ValueError):
        tw.Obj("unicorn", "red")
    with pytest.raises(ValueError):
        tw.Obj("cat", "red", "striped")  # striped needs a second colour
    with pytest.raises(ValueError):
        tw.Obj("car", "red", extras=(("hat", "blue"),))  # a car has no hat
    with pytest.raises(ValueError):
        tw.draw(tw.Scene("on grass", [tw.Obj("cat", "red")]))  # unplaced


# ------------------------------------------------------------------------------------------------
# Instances
# ------------------------------------------------------------------------------------------------


def test_instance_lists():
    assert len(tw.DEV_INSTANCES) >= 6 and len(tw.REPORTING_INSTANCES) >= 6
    names = [i.name for i in tw.INSTANCES]
    assert len(set(names)) == len(names)
    assert not {i.name for i in tw.DEV_INSTANCES} & {i.name for i in tw.REPORTING_INSTANCES}
    for split in (tw.DEV_INSTANCES, tw.REPORTING_INSTANCES):
        supers = [i.supercategory for i in split]
        assert "cat" in supers and "dog" in supers and set(supers) - {"cat", "dog"}
    for inst in tw.INSTANCES:
        assert inst.supercategory == inst.spec.kind and inst.spec.instance == inst.name
        # not in the base distribution: an instance-only colour or an extra (usually both)
        assert inst.spec.extras or inst.spec.colour in tw.INSTANCE_COLOURS


def test_base_never_makes_instance_looks(base):
    imgs, _, scenes = base
    for s in scenes:
        for o in s.objs:
            assert o.extras == () and o.instance is None
            assert o.colour in tw.COLOURS and (o.colour2 is None or o.colour2 in tw.COLOURS)
    px = imgs[::4].reshape(-1, 3).astype(np.float32)
    for name, c in tw.INSTANCE_COLOURS.items():
        d = np.linalg.norm(px - np.array(c, np.float32), axis=1)
        assert (d < 15).sum() == 0, name


def test_instances_render_their_extras():
    for inst in tw.INSTANCES:
        obj = inst.obj(size="big", x=32, y=60)
        full = tw.draw(tw.Scene("on grass", [obj])).astype(np.float32)
        mask = tw.object_mask(tw.Scene("on grass", [obj])) == 0
        for feat, _ in obj.extras:
            less = _with(obj, extras=tuple(e for e in obj.extras if e[0] != feat))
            img = tw.draw(tw.Scene("on grass", [less])).astype(np.float32)
            changed = (np.abs(full - img).max(-1) > 30).sum()
            assert changed >= 3, (inst.name, feat, changed)
        if inst.spec.colour in tw.INSTANCE_COLOURS:  # the reserved body colour is really drawn
            d = np.linalg.norm(full[mask] - tw.rgb(inst.spec.colour), axis=1)
            assert (d < 15).sum() > 50, inst.name


def test_photo_set():
    for inst in tw.INSTANCES:
        imgs, caps = tw.photo_set(inst, n=6, seed=0)
        assert imgs.shape == (6, 64, 64, 3) and imgs.dtype == np.uint8 and len(caps) == 6
        assert len({im.tobytes() for im in imgs}) == 6
        assert len(set(caps)) == 6  # six different scenes
        for c in caps:
            scene, phrases = parse(c)
            assert scene is not None and phrases == [{"count": 1, "kind": inst.supercategory}]
        again, caps2 = tw.photo_set(inst, n=6, seed=0)
        assert np.array_equal(imgs, again) and caps == caps2
        other, _ = tw.photo_set(inst, n=6, seed=1)
        assert not np.array_equal(imgs, other)
    imgs, caps = tw.photo_set(tw.DEV_INSTANCES[0].name, n=8)
    assert imgs.shape[0] == 8 and len({im.tobytes() for im in imgs}) == 8


def test_render_instance_in():
    inst = tw.REPORTING_INSTANCES[0]
    others = [tw.Obj("ball", "red"), tw.Obj("dog", "blue", "striped", "white", size="small")]
    img, scene = tw.render_instance_in(inst, "on a beach", others, rng=3)
    assert img.shape == (64, 64, 3) and scene.name == "on a beach"
    idx = [i for i, o in enumerate(scene.objs) if o.instance == inst.name]
    assert len(idx) == 1
    assert tw.visible_fraction(scene)[idx[0]] >= tw.world.MIN_VISIBLE
    assert np.array_equal(tw.draw(scene), img)
    cap = tw.caption(scene, np.random.default_rng(0), concept_words={inst.name: inst.name}, p_scene=1.0)
    assert inst.name in cap.split() and cap.endswith("on a beach")
    plain = tw.caption(scene, np.random.default_rng(0), p_scene=1.0)
    assert inst.name not in plain and inst.supercategory in plain.replace("cats", "cat").split()
    img2, scene2 = tw.render_instance_in(inst, "on a beach", others, rng=3)
    assert np.array_equal(img, img2) and scene == scene2
    # a placed companion keeps its place
    fixed = tw.Obj("tree", "green", x=52, y=50)
    _, sc = tw.render_instance_in(inst, "at night", [fixed], rng=0)
    assert fixed in sc.objs
