"""The `perfusion` command end to end on the bundled toy model (CPU, 64x64).

Rules under test: data on stdout, messages and progress on stderr; `--json` where a script parses
output; bad input gets a one-line `error:` on stderr naming the problem and what to do, a non-zero
exit, no traceback (unless --debug), and the registry is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import draw_photos
from perfusion_cli import __version__
from perfusion_cli.cli import app

TOY = ["--model", "toyworld"]
FAST_TRAIN = ["--steps", "2", "--batch-size", "2", "--grad-accum", "1", *TOY]
FAST_RENDER = ["--steps", "2", "--cfg", "1"]  # cfg 1: no classifier-free guidance, half the UNet work
COMMANDS = ["train", "render", "list", "inspect", "combine", "rm", "export", "import"]


def cli(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def stdout_lines(result) -> list[str]:
    return [ln for ln in result.stdout.splitlines() if ln.strip()]


def registry_files(home: Path) -> dict[str, bytes]:
    """Every file (hidden ones too) under PERFUSION_HOME/concepts, with its bytes."""
    folder = home / "concepts"
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def registry_unchanged(home: Path):
    before = registry_files(home)
    yield
    assert registry_files(home) == before, "a failed command changed the registry"


def assert_clean_error(result, *phrases: str) -> str:
    """Non-zero exit, nothing on stdout, no traceback, and the last stderr line is the one `error:`."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line at the end:\n{result.stderr}"
    for phrase in phrases:
        assert phrase.lower() in errors[0].lower(), f"{phrase!r} not in {errors[0]!r}"
    return errors[0]


def png_text(path) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)


# ----------------------------------------------------------------------------- concept files


def variant(data: bytes, name: str, seed: int = 1, fingerprint: str | None = None) -> bytes:
    """The trained concept re-serialised as another concept: renamed, i* and embedding perturbed
    (so an exact combination with the original is well-posed), optionally another base model."""
    import torch

    from perfusion_cli import concept

    tmp = Path(os.environ["PERFUSION_HOME"]) / f"variant-{name}.safetensors"
    tmp.write_bytes(data)
    cs = concept.load(tmp)
    tmp.unlink()
    g = torch.Generator().manual_seed(seed)
    c = cs.concepts[0]
    c.name = cs.name = name
    c.tensors.i_star = c.tensors.i_star + 0.5 * c.tensors.i_star.norm() * torch.randn(
        c.tensors.i_star.shape, generator=g) / c.tensors.i_star.numel() ** 0.5
    c.embeddings = [e + 0.1 * torch.randn(e.shape, generator=g) for e in c.embeddings]
    if fingerprint is not None:
        cs.base_model = {**cs.base_model, "fingerprint": fingerprint, "id": "other-model"}
    return concept.to_bytes(cs)


@pytest.fixture
def two_concepts(registry_with_concept, trained_toy_concept):
    registry_with_concept.put("mybox2", variant(trained_toy_concept, "mybox2"))
    return registry_with_concept


@pytest.fixture
def foreign_concept(registry_with_concept, trained_toy_concept):
    """'alien': a concept whose base-model fingerprint is not the toy model's."""
    registry_with_concept.put("alien", variant(trained_toy_concept, "alien", seed=2, fingerprint="0123456789abcdef"))
    return registry_with_concept


# ============================================================================= A. happy path


def test_version_and_help():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"perfusion {__version__}"
    r = cli("--help")
    assert r.exit_code == 0 and all(c in r.stdout for c in COMMANDS)
    for command in COMMANDS:
        r = cli(command, "--help")
        assert r.exit_code == 0, (command, r.output)
        assert "Usage" in r.stdout


def test_train_prints_the_concept_path(photos, perfusion_home):
    r = cli("train", photos, "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    path = Path(lines[0])
    assert path.is_file() and path == perfusion_home / "concepts" / "mybox.safetensors"
    assert "learned 'mybox'" in r.stderr  # messages go to stderr
    assert "Traceback" not in r.output


def test_list_and_inspect(registry_with_concept, perfusion_home):
    r = cli("list")
    assert r.exit_code == 0 and "mybox" in r.stdout

    r = cli("list", "-q")
    assert r.exit_code == 0 and r.stdout.splitlines() == ["mybox"]

    r = cli("list", "--json")
    assert r.exit_code == 0
    (rec,) = [e for e in json.loads(r.stdout) if e["name"] == "mybox"]
    assert rec["supercategory"] == "box" and rec["base_model"] == "toyworld"
    assert rec["size"] == (perfusion_home / "concepts" / "mybox.safetensors").stat().st_size
    assert rec["created"] and rec["error"] is None and rec["kind"] == "concept"

    r = cli("inspect", "mybox")
    assert r.exit_code == 0, r.output
    for section in ("identity", "base model", "layers", "concept mybox"):
        assert section in r.stdout
    assert "gate defaults" in r.stdout

    r = cli("inspect", "mybox", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert {"identity", "base_model", "layers", "concepts"} <= set(rec)
    assert rec["identity"]["name"] == "mybox" and rec["base_model"]["id"] == "toyworld"
    (c,) = rec["concepts"]
    assert c["supercategory"] == "box" and set(c["gate"]) == {"beta", "tau"}
    assert 0 <= c["gate"]["beta"] <= 1 and 0 < c["gate"]["tau"] <= 1
    assert rec["layers"] and all(layer["width"] > 0 for layer in rec["layers"])


def test_render_writes_pngs_with_metadata(registry_with_concept, tmp_path):
    out = tmp_path / "out"
    r = cli("render", "a mybox on a beach", "--steps", "2", "-n", "2", "--seed", "5", "-o", out)
    assert r.exit_code == 0, r.output
    paths = [Path(p) for p in stdout_lines(r)]
    assert len(paths) == 2 and all(p.is_file() and p.parent == out for p in paths)
    for path, seed in zip(paths, (5, 6)):
        text = png_text(path)
        assert f"Seed: {seed}" in text["parameters"]
        assert "Perfusion: mybox" in text["parameters"]
        rec = json.loads(text["perfusion"])
        assert rec["seed"] == seed and rec["prompt"] == "a mybox on a beach"
        assert [c["name"] for c in rec["concepts"]] == ["mybox"]
    assert "wrote 2 image(s)" in r.stderr


def test_render_prompts_file(registry_with_concept, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na mybox on grass\n\na box in the snow\n")
    r = cli("render", "--prompts", prompts, *FAST_RENDER, "--seed", "1", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    paths = stdout_lines(r)
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    first, second = (json.loads(png_text(p)["perfusion"]) for p in paths)
    assert first["prompt"] == "a mybox on grass" and first["concepts"][0]["name"] == "mybox"
    assert second["prompt"] == "a box in the snow" and second["concepts"] == []  # no concept it does not name
    assert "Perfusion:" not in png_text(paths[1])["parameters"]


def test_a_render_job_inverts_the_covariance_once(two_concepts, tmp_path, monkeypatch):
    """Prompts naming different concepts are rendered in separate concept groups; C⁻¹ is the same for all of
    them, so the job computes it once, and every group's images are still edited."""
    from perfusion_cli import edit

    calls = []
    real = edit.inverse_covariance
    monkeypatch.setattr(edit, "inverse_covariance", lambda C, *a, **k: calls.append(1) or real(C, *a, **k))
    r = cli("render", "--prompts", "-", *FAST_RENDER, "--seed", "3", "--json", "-o", tmp_path / "o",
            input="a mybox at night\na mybox2 on grass\na box on a beach\n")
    assert r.exit_code == 0, r.output
    assert [[c["name"] for c in rec["concepts"]] for rec in json.loads(r.stdout)] == [["mybox"], ["mybox2"], []]
    assert len(calls) == 1


def test_render_prompts_from_stdin_json_named_bias(registry_with_concept, tmp_path):
    r = cli("render", "--prompts", "-", *FAST_RENDER, "--seed", "3", "--bias", "mybox=0.5", "--json",
            "-o", tmp_path / "o", input="a mybox at night\na box on a beach\n")
    assert r.exit_code == 0, r.output
    first, second = json.loads(r.stdout)
    assert all(Path(rec["path"]).is_file() for rec in (first, second))
    assert first["prompt"] == "a mybox at night" and first["seed"] == 3
    assert first["concepts"][0]["name"] == "mybox" and first["concepts"][0]["beta"] == 0.5
    assert second["prompt"] == "a box on a beach" and second["seed"] == 4 and second["concepts"] == []


def test_render_without_prompt(registry_with_concept):
    assert_clean_error(cli("render", *TOY), "no prompt given", "--prompts")
    assert_clean_error(cli("render", "--prompts", "-", *TOY, input="# only a comment\n\n"), "no prompt given")


def test_render_json_bias_and_name_template(registry_with_concept, tmp_path):
    out = tmp_path / "o"
    r = cli("render", "a mybox on grass", *FAST_RENDER, "-n", "2", "--seed", "7", "--bias", "0.6", "--json",
            "--name-template", "{index}-{seed}.png", "-o", out)
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    assert isinstance(records, list) and len(records) == 2
    for i, rec in enumerate(records):
        assert {"seed", "prompt", "path", "concepts"} <= set(rec)
        assert rec["seed"] == 7 + i and rec["prompt"] == "a mybox on grass"
        assert Path(rec["path"]) == out / f"{i}-{7 + i}.png" and Path(rec["path"]).is_file()
        assert rec["concepts"][0]["name"] == "mybox" and rec["concepts"][0]["beta"] == 0.6


def test_combine_dry_run_then_real_then_render(two_concepts, perfusion_home, tmp_path):
    with registry_unchanged(perfusion_home):
        r = cli("combine", "mybox", "mybox2", "--name", "pair", "--dry-run")
        assert r.exit_code == 0, r.output
    assert r.stdout == "" and "nothing written" in r.stderr and "mybox, mybox2" in r.stderr

    r = cli("combine", "mybox", "mybox2", "--name", "pair")
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip()) == perfusion_home / "concepts" / "pair.safetensors"
    (rec,) = [e for e in json.loads(cli("list", "--json").stdout) if e["name"] == "pair"]
    assert rec["kind"] == "combination" and rec["members"] == ["mybox", "mybox2"] and rec["error"] is None
    assert "combines" in cli("list").stdout

    r = cli("render", "pair on grass", *FAST_RENDER, "--seed", "2", "--json", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.stdout)
    assert rec["prompt"] == "mybox and mybox2 on grass"
    assert [c["name"] for c in rec["concepts"]] == ["mybox", "mybox2"]


def test_export_rm_import_round_trip(registry_with_concept, perfusion_home, tmp_path, trained_toy_concept):
    dest = tmp_path / "shared"
    dest.mkdir()
    r = cli("export", "mybox", dest)
    assert r.exit_code == 0, r.output
    exported = dest / "mybox.safetensors"
    assert Path(r.stdout.strip()) == exported and exported.read_bytes() == trained_toy_concept

    r = cli("rm", "mybox")
    assert r.exit_code == 0 and r.stdout == "" and "removed mybox" in r.stderr
    assert_clean_error(cli("rm", "mybox"), "no concept named 'mybox'")
    assert cli("list", "-q").stdout == ""

    r = cli("import", exported)
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip()).read_bytes() == trained_toy_concept
    assert cli("list", "-q").stdout.splitlines() == ["mybox"]

    r = cli("import", exported, "--name", "other")  # another name: the concept's word is renamed too
    assert r.exit_code == 0, r.output
    assert json.loads(cli("inspect", "other", "--json").stdout)["concepts"][0]["name"] == "other"


# ============================================================================= B. bad input


@pytest.fixture
def unchanged(perfusion_home):
    with registry_unchanged(perfusion_home):
        yield


def test_train_missing_folder(tmp_path, unchanged):
    r = cli("train", tmp_path / "nope", "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert_clean_error(r, "does not exist")


def test_train_empty_folder(tmp_path, unchanged):
    (tmp_path / "empty").mkdir()
    r = cli("train", tmp_path / "empty", "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert_clean_error(r, "is empty", "photos")


def test_train_folder_without_images(tmp_path, unchanged):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "photo.heic.zip").write_bytes(b"PK\x03\x04")
    r = cli("train", folder, "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert_clean_error(r, "no images", ".png")


def test_train_json_skips_a_corrupt_image_with_a_warning(photos, perfusion_home):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    r = cli("train", photos, "--super", "box", "--name", "mybox", "--steps", "1", "--batch-size", "2",
            "--grad-accum", "1", "--json", *TOY)
    assert r.exit_code == 0, r.output
    assert "warning" in r.stderr and "broken.jpg" in r.stderr
    rec = json.loads(r.stdout)
    assert {"name", "path", "size", "metadata"} <= set(rec)
    assert rec["name"] == "mybox" and Path(rec["path"]).is_file() and rec["size"] == Path(rec["path"]).stat().st_size
    assert rec["metadata"]["base_model"]["id"] == "toyworld"
    assert rec["metadata"]["concepts"][0]["supercategory"] == "box"
    assert "broken.jpg" not in " ".join(rec["metadata"]["concepts"][0]["training"].get("images", []))


def test_train_all_images_corrupt(tmp_path, unchanged):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage " * i)
    r = cli("train", folder, "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert_clean_error(r, "could be read")


def test_train_images_too_small(tmp_path, unchanged):
    draw_photos(tmp_path / "tiny", n=4, size=16)
    r = cli("train", tmp_path / "tiny", "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert_clean_error(r, "too small", "16x16")


@pytest.mark.parametrize("word, phrases", [
    ("zqxwv", ["tokens", "try:"]),          # made-up word: several tokens
    ("teddy bear", ["tokens", "try:"]),      # two words: several tokens, with a suggestion
    ("c@t!", ["one plain word"]),           # garbage
    ("", ["empty"]),
])
def test_train_bad_supercategory(photos, unchanged, word, phrases):
    r = cli("train", photos, "--super", word, "--name", "mybox", *FAST_TRAIN)
    assert_clean_error(r, "supercategory", *phrases)


def test_train_two_word_supercategory_suggests_one_of_them(photos, unchanged):
    r = cli("train", photos, "--super", "teddy bear", "--name", "mybox", *FAST_TRAIN)
    line = assert_clean_error(r, "supercategory")
    assert "bear" in line.replace("'teddy bear'", ""), line  # a suggestion, not just the input echoed


@pytest.mark.parametrize("name, phrase", [
    ("../x", "path separator"),
    ("a/b", "path separator"),
    ("", "empty"),
    ("x" * 60, "limit is 40"),
    ("Cat", "lowercase"),
    ("box", "already a word"),
])
def test_train_bad_names(photos, unchanged, name, phrase):
    r = cli("train", photos, "--super", "box", "--name", name, *FAST_TRAIN)
    assert_clean_error(r, phrase)


def test_train_no_key_lock_trains_the_keys(photos, perfusion_home):
    """--no-key-lock (the paper's ablation): recorded in the concept, and its o*_K is not the locked one."""
    from perfusion_cli import concept

    r = cli("train", photos, "--super", "box", "--name", "mylocked", "--seed", "1", "--fp32", *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    r = cli("train", photos, "--super", "box", "--name", "myunlocked", "--seed", "1", "--fp32", "--no-key-lock",
            "--json", *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["metadata"]["concepts"][0]["training"]["lock_keys"] is False
    locked = concept.load(perfusion_home / "concepts" / "mylocked.safetensors").concepts[0]
    unlocked = concept.load(rec["path"]).concepts[0]
    assert locked.training["lock_keys"] is True
    gap = max(float((unlocked.tensors.key_targets[n] - k).abs().max()) for n, k in locked.tensors.key_targets.items())
    assert gap > 1e-4, "the unlocked run's o*_K should have moved from W_K i_super"
    assert "--no-key-lock" in cli("train", "--help").stdout


def test_train_records_the_profile_recipe_and_warns_of_an_inflated_embedding(photos, perfusion_home):
    """No --lr-embedding: the toy profile's (registry/profiles/toyworld.yaml) is used and recorded, with the learned
    embedding's norm against a typical word's; a learning rate that inflates it gets a warning that names the fix."""
    import yaml

    from perfusion_cli import models

    prof = yaml.safe_load((models.bundled_dir() / "profiles" / "toyworld.yaml").read_text())
    r = cli("train", photos, "--super", "box", "--name", "myrecipe", "--json", *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)["metadata"]["concepts"][0]["training"]
    assert t["lr_embedding"] == prof["train"]["lr_embedding"] and t["lr_value"] == 3e-2
    assert 0.5 < t["embedding_norm_ratio"] < 3.0 and "warning" not in r.stderr
    assert "embedding_norm_ratio" in cli("inspect", "myrecipe").stdout

    r = cli("train", photos, "--super", "box", "--name", "myinflated", "--lr-embedding", "0.5", "--json", *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)["metadata"]["concepts"][0]["training"]
    assert t["lr_embedding"] == 0.5 and t["embedding_norm_ratio"] > 3.0
    assert "warning: the learned embedding is" in r.stderr and "lower --lr-embedding" in r.stderr


def test_word_scope_is_trained_stored_and_rendered(photos, perfusion_home, tmp_path):
    """train --gate-scope word: the concept records it, inspect shows it, render uses it by default (JSON and PNG
    metadata say so) and --gate-scope NAME=prompt overrides it."""
    r = cli("train", photos, "--super", "box", "--name", "myword", "--gate-scope", "word", "--json", *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metadata"]["concepts"][0]["training"]["gate_scope"] == "word"
    assert "scope word" in cli("inspect", "myword").stdout
    r = cli("render", "a myword on grass", *FAST_RENDER, "--seed", "1", "--json", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.stdout)
    assert rec["concepts"][0]["scope"] == "word"
    assert "Perfusion word scope: myword" in png_text(rec["path"])["parameters"]
    r = cli("render", "a myword on grass", *FAST_RENDER, "--seed", "1", "--json", "--gate-scope", "myword=prompt",
            "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    (rec2,) = json.loads(r.stdout)
    assert rec2["concepts"][0]["scope"] == "prompt"
    assert "word scope" not in png_text(rec2["path"])["parameters"]
    a, b = (np.asarray(Image.open(x["path"])) for x in (rec, rec2))
    assert (a != b).any(), "the scope changes the render"


def test_train_no_key_lock_is_a_perfusion_option(photos, unchanged):
    r = cli("train", photos, "--super", "box", "--name", "mybox", "--method", "ti", "--no-key-lock", *FAST_TRAIN)
    assert_clean_error(r, "--no-key-lock", "Perfusion options")
    r = cli("train", photos, "--super", "box", "--name", "mybox", "--method", "ti", "--gate-scope", "word", *FAST_TRAIN)
    assert_clean_error(r, "--gate-scope", "Perfusion options")


def test_train_existing_name_needs_force(registry_with_concept, photos, perfusion_home):
    with registry_unchanged(perfusion_home):
        r = cli("train", photos, "--super", "box", "--name", "mybox", *FAST_TRAIN)
        assert_clean_error(r, "already exists", "--force")
    before = (perfusion_home / "concepts" / "mybox.safetensors").read_bytes()
    r = cli("train", photos, "--super", "box", "--name", "mybox", "--force", "--steps", "1", "--batch-size", "2",
            "--grad-accum", "1", "--seed", "9", *TOY)
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip()).read_bytes() != before


def test_render_concept_of_another_base_model(foreign_concept, tmp_path, unchanged):
    r = cli("render", "an alien on grass", *FAST_RENDER, *TOY, "-o", tmp_path / "o")
    assert_clean_error(r, "'alien'", "other-model", "toyworld")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_damaged_concept_file(registry_with_concept, perfusion_home, trained_toy_concept, tmp_path):
    (perfusion_home / "concepts" / "broken.safetensors").write_bytes(trained_toy_concept[: len(trained_toy_concept) // 2])
    with registry_unchanged(perfusion_home):
        r = cli("list")
        assert r.exit_code == 0, r.output
        assert "DAMAGED" in r.stdout and "broken" in r.stdout and "mybox" in r.stdout
        r = cli("list", "--json")
        assert r.exit_code == 0
        by_name = {e["name"]: e for e in json.loads(r.stdout)}
        assert by_name["broken"]["error"] and by_name["mybox"]["error"] is None
        assert "broken" in cli("list", "-q").stdout
        r = cli("render", "a broken box", *FAST_RENDER, "-o", tmp_path / "o")
        assert_clean_error(r, "'broken'", "damaged")
        assert_clean_error(cli("inspect", "broken"), "damaged")


@pytest.mark.parametrize("args, phrase", [
    (["train", "PHOTOS", "--super", "box", "--name", "fresh", *TOY, "--steps", "0"], "--steps"),
    (["train", "PHOTOS", "--super", "box", "--name", "fresh", *TOY, "--steps", "-3"], "--steps"),
    (["train", "PHOTOS", "--super", "box", "--name", "fresh", *TOY, "--train-beta", "2"], "--train-beta"),
    (["render", "a mybox", *TOY, "--steps", "0"], "--steps"),
    (["render", "a mybox", *TOY, "--steps", "-3"], "--steps"),
    (["render", "a mybox", *TOY, "--bias", "1.5"], "--bias"),
    (["render", "a mybox", *TOY, "--bias", "abc"], "--bias"),
    (["render", "a mybox", *TOY, "--temperature", "0"], "--temperature"),
    (["render", "a mybox", *TOY, "--scale", "mybox=0.5"], "use --bias for a Perfusion concept"),
    (["render", "a mybox", *TOY, "--scale", "0.5"], "Perfusion concepts take --bias"),
    (["render", "a mybox", *TOY, "--scale", "-1"], "--scale"),
    (["render", "a mybox", *TOY, "--gate-scope", "tokens"], "--gate-scope"),
    (["render", "a mybox", *TOY, "--gate-scope", "other=word"], "which no prompt uses"),
    (["train", "PHOTOS", "--super", "box", "--name", "fresh", *TOY, "--gate-scope", "all"], "--gate-scope"),
])
def test_invalid_numbers(registry_with_concept, perfusion_home, photos, tmp_path, args, phrase):
    args = [str(photos) if a == "PHOTOS" else a for a in args]
    if args[0] == "render":
        args += ["-o", str(tmp_path / "o")]
    with registry_unchanged(perfusion_home):
        assert_clean_error(cli(*args), phrase)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_render_output_dir_not_writable(registry_with_concept, tmp_path, unchanged):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    r = cli("render", "a mybox", *FAST_RENDER, "-o", tmp_path / "file.txt" / "sub")
    assert_clean_error(r, "not writable", "-o")


def test_disk_full_on_concept_write(photos, perfusion_home, monkeypatch):
    from perfusion_cli import registry

    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).parent.name == "concepts":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(registry.os, "replace", replace)
    with registry_unchanged(perfusion_home):
        r = cli("train", photos, "--super", "box", "--name", "mybox", "--steps", "1", "--batch-size", "2",
                "--grad-accum", "1", *TOY)
        assert_clean_error(r, "disk full", "free space")
    assert not (perfusion_home / "concepts").exists() or not any((perfusion_home / "concepts").iterdir())


def test_debug_shows_the_traceback(tmp_path):
    from perfusion_cli.errors import PerfusionError

    r = cli("--debug", "train", tmp_path / "nope", "--super", "box", "--name", "mybox", *FAST_TRAIN)
    assert r.exit_code != 0
    assert isinstance(r.exception, PerfusionError) and "does not exist" in str(r.exception)
    assert r.exc_info is not None and r.exc_info[2] is not None  # the traceback travels with it
    # and the next command without --debug is back to one line
    assert_clean_error(cli("train", tmp_path / "nope", "--super", "box", "--name", "mybox", *FAST_TRAIN),
                       "does not exist")


def test_model_unreachable_offline(tmp_path, unchanged):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    t = time.monotonic()
    r = cli("render", "a box", "--model", "some-org/some-model", *FAST_RENDER, "-o", tmp_path / "o")
    assert time.monotonic() - t < 30
    assert_clean_error(r, "some-org/some-model", "offline", "--model toyworld")


def test_unknown_sampler(tmp_path, unchanged):
    r = cli("render", "a box", *TOY, *FAST_RENDER, "--sampler", "warp-drive", "-o", tmp_path / "o")
    assert_clean_error(r, "unknown sampler", "ddim")


def test_combine_refuses_different_base_models(foreign_concept, perfusion_home):
    with registry_unchanged(perfusion_home):
        r = cli("combine", "mybox", "alien", "--name", "pair")
        assert_clean_error(r, "'mybox'", "'alien'", "different base models")
        r = cli("combine", "mybox", "alien", "--name", "pair", "--dry-run")
        assert_clean_error(r, "different base models")


def test_train_compile_runs_the_steps_through_torch_compile(photos, perfusion_home, monkeypatch):
    """--compile: the UNet of every training step is training.compiled_unet's (here torch.compile with the
    aot_eager backend: the same tracing, no code generation, seconds instead of minutes on a CPU)."""
    import torch
    import torch._dynamo
    from perfusion_cli import training

    modes = []

    def aot_eager(unet, mode):
        modes.append(mode)
        return torch.compile(unet, backend="aot_eager", dynamic=False)

    monkeypatch.setattr(training, "compiled_unet", aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        r = cli("train", photos, "--super", "box", "--name", "mycompiled", "--compile", "--json", *FAST_TRAIN)
        assert r.exit_code == 0, r.output
        assert modes == ["default"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1   # the UNet, traced once
        assert json.loads(r.stdout)["metadata"]["concepts"][0]["training"]["compile"] is True
        assert "compiles the UNet" in r.stderr
        # --compile-mode names the mode and implies --compile; `auto` on a CPU is inductor's default (above)
        r = cli("train", photos, "--super", "box", "--name", "mycompiled2", "--compile-mode",
                "max-autotune-no-cudagraphs", "--json", *FAST_TRAIN)
        assert r.exit_code == 0, r.output
        assert modes == ["default", "max-autotune-no-cudagraphs"]
        assert json.loads(r.stdout)["metadata"]["concepts"][0]["training"]["compile_mode"] == "max-autotune-no-cudagraphs"
        r = cli("train", photos, "--super", "box", "--name", "mycompiled3", "--compile-mode", "fastest", *FAST_TRAIN)
        assert_clean_error(r, "--compile-mode 'fastest'", "auto, default")
    finally:
        torch._dynamo.reset()


def test_train_compile_is_a_perfusion_option(photos, unchanged):
    r = cli("train", photos, "--super", "box", "--name", "mybox", "--method", "lora", "--compile", *FAST_TRAIN)
    assert_clean_error(r, "--compile", "Perfusion options")
