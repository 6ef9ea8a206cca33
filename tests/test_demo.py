"""`perfusion demo` and `perfusion toyworld score|instances` on the bundled toy model (tiny settings: a few
training steps and one render step; what is checked is the machinery and the files, not the quality)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from perfusion_cli.cli import app
from perfusion_cli.errors import PerfusionError
from perfusion_cli.registry import Registry
from perfusion_cli.toyworld import world as tw
from perfusion_cli.toyworld.demo import DemoConfig, run_demo

TINY = dict(steps=2, seeds=1, biases=(0.5, 0.9), prompts=("a {} on a beach",), render_steps=2, photos=4)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    calls, events = [], []
    result = run_demo(out, DemoConfig(**TINY), progress=lambda *a: calls.append(a), on_event=events.append)
    return out, result, calls, events


def test_demo_writes_photos_sheet_and_scores(demo_run):
    out, result, calls, events = demo_run
    photos = sorted((out / "photos").glob("*.png"))
    assert [p.name for p in photos] == [f"photo-{i}.png" for i in range(4)]
    want, _ = tw.photo_set("patchcat", n=4)
    assert np.array_equal(np.asarray(Image.open(photos[0])), want[0])   # the instance's own photo set
    assert [s["label"] for s in result.scores] == ["base model", "bias 0.5", "bias 0.9"]
    for s in result.scores:
        assert 0.0 <= s["fidelity"] <= 1.0 and 0.0 <= s["alignment"] <= 1.0 and s["images"] == 1
    assert len(result.per_image) == 3
    assert result.per_image[0]["prompt"] == "a cat on a beach" and result.per_image[1]["prompt"] == "a mycat on a beach"
    sheet = np.asarray(Image.open(out / "demo.png"))
    assert sheet.shape[0] > 2 * 128 and sheet.shape[1] > 3 * 128   # photos row + one prompt row, 3 columns at 2x
    saved = json.loads((out / "demo.json").read_text())
    assert saved["scores"] == json.loads(json.dumps(result.scores)) and saved["config"]["steps"] == 2
    assert result.concept["bytes"] > 1000 and result.concept["kept"] is None
    assert ("training", 2, 2) in calls and ("rendering", 3, 3) in calls
    assert any("patchcat" in e for e in events)
    assert set(result.seconds) >= {"training", "rendering", "total"}


def test_demo_leaves_the_registry_alone_unless_kept(demo_run, tmp_path):
    assert [e.name for e in Registry().entries() if e.source == "user"] == []
    reg = Registry()
    result = run_demo(tmp_path / "kept", DemoConfig(**{**TINY, "biases": (0.7,)}), keep=reg)
    entry = reg.get("mycat")
    assert result.concept["kept"] == str(entry.path) and entry.supercategory == "cat"
    with pytest.raises(PerfusionError, match="already exists"):
        run_demo(tmp_path / "again", DemoConfig(**TINY), keep=reg)


@pytest.mark.parametrize("change, message", [
    ({"instance": "nosuchcat"}, "unknown instance"),
    ({"name": "My Cat"}, "name"),
    ({"biases": (1.5,)}, "between 0 and 1"),
    ({"prompts": ("no placeholder",)}, "exactly one {}"),
    ({"seeds": 0}, "--seeds"),
])
def test_demo_refuses_bad_settings(tmp_path, change, message):
    with pytest.raises(PerfusionError, match=message):
        run_demo(tmp_path / "x", DemoConfig(**{**TINY, **change}))
    assert not (tmp_path / "x").exists()   # refused before anything is written


def test_cli_demo_prints_a_table_and_refuses_a_full_folder(tmp_path):
    out = tmp_path / "d"
    args = ["demo", "-o", str(out), "--steps", "2", "--seeds", "1", "--bias", "0.6", "--prompt", "a {} in the snow",
            "--photos", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["fidelity", "alignment"] and lines[1].startswith("base model")
    assert lines[2].startswith("bias 0.6") and len(lines) == 3
    assert "contact sheet" in r.stderr and (out / "demo.png").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "not empty" in again.stderr and "Traceback" not in again.output
    bad = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "e"), "--bias", "mycat=0.5"])
    assert bad.exit_code != 0 and "plain numbers" in bad.stderr


def test_cli_score_and_instances(tmp_path):
    images, _ = tw.photo_set("hatcat", n=2)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    r = CliRunner().invoke(app, ["toyworld", "score", str(tmp_path), "--instance", "hatcat",
                                 "--prompt", "a hatcat on grass"])
    assert r.exit_code == 0, r.output
    rows = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert rows[0] == ["image", "alignment", "fidelity"] and len(rows) == 3
    assert all(float(row[2]) > 0.9 for row in rows[1:])   # its own photos are faithful to it
    r = CliRunner().invoke(app, ["toyworld", "score", str(tmp_path / "0.png"), "--prompt", "a mycat on grass",
                                 "--concept", "mycat=cat", "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)[0]
    assert 0 <= rec["alignment"] <= 1 and "clauses" in rec["alignment_details"] and "fidelity" not in rec
    for args, msg in ((["--prompt", "a mycat on grass"], "--concept NAME=KIND"), ([], "nothing to score"),
                      (["--instance", "nope"], "unknown instance"), (["--concept", "x=dragon", "--prompt", "a x"], "KIND")):
        bad = CliRunner().invoke(app, ["toyworld", "score", str(tmp_path), *args])
        assert bad.exit_code != 0 and msg in bad.stderr and "Traceback" not in bad.output, (args, bad.output)
    r = CliRunner().invoke(app, ["toyworld", "instances", "--json"])
    listed = json.loads(r.stdout)
    assert {i["name"] for i in listed} == {i.name for i in tw.INSTANCES}
    assert {i["set"] for i in listed} == {"development", "reporting"}
