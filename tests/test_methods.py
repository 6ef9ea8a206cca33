"""The baselines (methods.py) on the toy model: each trains (a few steps), round-trips through a concept file,
changes renders when applied, and leaves the pipeline bit-identical when removed. Not a quality test."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from perfusion_cli import concept as concept_io
from perfusion_cli import methods
from perfusion_cli.concept import ConceptSet
from perfusion_cli.errors import PerfusionError
from perfusion_cli.images import load_photos
from perfusion_cli.rendering import Applied


def _render(call, prompt):
    out = call(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def trained(toy_base, tmp_path_factory):
    from conftest import draw_photos

    photos = load_photos(draw_photos(tmp_path_factory.mktemp("m") / "photos"), toy_base.resolution)
    out = {}
    for m in methods.BASELINES:
        cfg = methods.recipe(m, steps=2, batch_size=2, prior_images=2, prior_steps=2)
        out[m] = methods.train_baseline(toy_base, "mything", "house", photos, cfg)
    return out


def test_recipes_are_documented_and_checked():
    assert methods.recipe("lora").rank == 4 and methods.recipe("dreambooth").prior_weight == 1.0
    assert methods.recipe("ti").lr_embedding > 0 and methods.recipe("lora").lr_embedding == 0
    # DreamBooth ("a sks dog"), its LoRA variant and Custom Diffusion ("a V* dog", V* from a rare token) keep the
    # class noun after their token; Textual Inversion's S* (from the class word) replaces it
    for m in ("dreambooth", "lora", "custom-diffusion"):
        assert methods.recipe(m).class_noun and methods.recipe(m).embedding_init == "identifier"
    assert not methods.recipe("ti").class_noun and methods.recipe("ti").embedding_init == "supercategory"
    with pytest.raises(PerfusionError, match="unknown method"):
        methods.recipe("hypernetwork")
    with pytest.raises(PerfusionError, match="embedding_init"):
        methods.recipe("ti", embedding_init="random")


def test_training_prompts_keep_the_class_noun(toy_base, tmp_path, monkeypatch):
    """The texts a baseline trains on are written as its recipe says: "a [V] house" (the pipeline reads "house
    house", the first one's embedding swapped) with the class noun, "a S*" (one "house") without; the prior
    preservation prompts are the plain "a house"."""
    from conftest import draw_photos

    from perfusion_cli import text

    photos = load_photos(draw_photos(tmp_path / "photos"), toy_base.resolution)
    seen: list[str] = []
    real = text.encode
    monkeypatch.setattr(text, "encode", lambda pipe, prompts, device=None: (seen.extend(prompts), real(pipe, prompts, device))[1])
    for class_noun in (True, False):
        seen.clear()
        cfg = methods.recipe("dreambooth", steps=1, batch_size=2, prior_images=1, prior_steps=1, class_noun=class_noun,
                             templates=["a photo of a {}"])
        c = methods.train_baseline(toy_base, "mything", "house", photos, cfg)
        assert c.training["class_noun"] is class_noun
        assert c.written_as == ("house house" if class_noun else "house")
        assert seen[:2] == ["a photo of a " + c.written_as] * 2 and seen[2:] == ["a house"]


def test_each_method_stores_what_it_trains(trained, toy_base):
    unet = toy_base.pipe.unet
    kv = methods.kv_modules(unet)
    lora = methods.lora_modules(unet)
    assert set(trained["ti"].weights) == set()
    assert {k.split(":", 1)[1] for k in trained["custom-diffusion"].weights} == set(kv)
    assert {k.split(":", 1)[1] for k in trained["lora"].weights} == set(lora)
    assert all(w.shape[0] == 4 for k, w in trained["lora"].weights.items() if k.startswith("lora_down:"))
    assert len(trained["dreambooth"].weights) == len(list(unet.parameters()))
    for m, c in trained.items():
        assert c.method == m and c.tensors is None and len(c.embeddings) == 1
        assert np.isfinite(c.training["final_loss"])
    # the embedding moves only where the method trains it
    sup = toy_base.pipe.text_encoder.get_input_embeddings().weight[
        toy_base.pipe.tokenizer("house", add_special_tokens=False).input_ids[0]].float()
    assert not torch.equal(trained["ti"].embeddings[0], sup)
    assert not torch.equal(trained["lora"].embeddings[0], sup)  # the fixed identifier, not the supercategory
    torch.testing.assert_close(trained["lora"].embeddings[0], trained["dreambooth"].embeddings[0])
    # Custom Diffusion's V* starts from the same rare token and trains
    ident = methods.identifier_embedding(toy_base.pipe.tokenizer, toy_base.pipe.text_encoder)
    assert not torch.equal(trained["custom-diffusion"].embeddings[0], ident)
    torch.testing.assert_close(trained["custom-diffusion"].embeddings[0], ident, atol=0.05, rtol=0)
    assert {m: c.written_as for m, c in trained.items()} == {
        "ti": "house", "dreambooth": "house house", "lora": "house house", "custom-diffusion": "house house"}
    # DreamBooth restored the loaded model's weights after training
    assert any(w.abs().max() > 0 for w in trained["dreambooth"].weights.values())


@pytest.mark.parametrize("method", methods.BASELINES)
def test_file_round_trip_apply_and_exact_removal(trained, toy_base, method, tmp_path):
    c = trained[method]
    cs = ConceptSet(name="mything", concepts=[c], base_model={"id": toy_base.id}, covariance={})
    path = tmp_path / "mything.safetensors"
    path.write_bytes(concept_io.to_bytes(cs, torch.float32))
    back = concept_io.load(path).concepts[0]
    assert back.method == method and back.tensors is None and back.weights.keys() == c.weights.keys()
    for k in c.weights:
        torch.testing.assert_close(back.weights[k], c.weights[k])
    meta = concept_io.read_metadata(path)
    assert meta["concepts"][0]["method"] == method and meta["layers"] == []

    pipe = toy_base.pipe
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _render(pipe, "a house on grass")
    with Applied(pipe, [back], None) as applied:
        edited = _render(applied, "a mything on grass")
    assert not np.array_equal(plain, edited)
    assert np.array_equal(_render(pipe, "a house on grass"), plain)
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())


@pytest.mark.parametrize("method", ["lora", "dreambooth", "custom-diffusion"])
def test_scale_zero_is_the_embedding_alone_and_scale_moves_the_render(trained, toy_base, method):
    """--scale s multiplies a baseline's weight change (LoRA's scale; ΔW for Custom Diffusion and DreamBooth):
    at 0 only its token embedding acts, between 0 and 1 the render lies between, and the UNet is restored."""
    from perfusion_cli.concept import Concept

    c = trained[method]
    pipe = toy_base.pipe
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    renders = {}
    for s in (0.0, 0.5, 1.0):
        with Applied(pipe, [c], None, scales={"mything": s}) as a:
            renders[s] = _render(a, "a mything on grass")
    emb_only = Concept(name="mything", supercategory="house", tensors=None, embeddings=c.embeddings, method="ti",
                       training={"class_noun": c.training["class_noun"]})   # written alike: "a [V] house"
    with Applied(pipe, [emb_only], None) as a:
        ident = _render(a, "a mything on grass")
    np.testing.assert_allclose(renders[0.0], ident, atol=1e-5)
    with Applied(pipe, [c], None) as a:
        np.testing.assert_array_equal(_render(a, "a mything on grass"), renders[1.0])   # 1 = as trained
    assert not np.array_equal(renders[0.5], renders[1.0]) and not np.allclose(renders[0.5], renders[0.0], atol=1e-5)
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_lora_scale_zero_is_the_identifier_alone(trained, toy_base):
    c = trained["lora"]
    pipe = toy_base.pipe
    with Applied(pipe, [c], None, scales={"mything": 0.0}) as a0:
        zero = _render(a0, "a mything on grass")
    from perfusion_cli.concept import Concept

    emb_only = Concept(name="mything", supercategory="house", tensors=None, embeddings=c.embeddings, method="ti",
                       training={"class_noun": True})
    with Applied(pipe, [emb_only], None) as a:
        ident = _render(a, "a mything on grass")
    np.testing.assert_allclose(zero, ident, atol=1e-5)
    # ... which differs from the identifier without its class noun (the old prompt form: "a [V] on grass")
    with Applied(pipe, [replace(emb_only, training={})], None) as a:
        assert not np.allclose(_render(a, "a mything on grass"), zero, atol=1e-3)


def test_weights_for_another_unet_are_refused(trained, toy_base):
    bad = {"delta:no.such.module": torch.zeros(2, 2)}
    with pytest.raises(PerfusionError, match="lacks"):
        methods.apply_weights(toy_base.pipe.unet, "custom-diffusion", bad)
    assert not any("forward" in m.__dict__ for m in toy_base.pipe.unet.modules())
    with pytest.raises(PerfusionError, match="another base model"):
        methods.apply_weights(toy_base.pipe.unet, "dreambooth", {"unet:conv_in.weight": torch.zeros(1)})


def test_cli_trains_lists_inspects_and_renders_a_baseline(photos, tmp_path):
    import json

    from typer.testing import CliRunner

    from perfusion_cli.cli import app

    run = lambda *a: CliRunner().invoke(app, list(a))
    r = run("train", str(photos), "--super", "house", "--name", "myhouse", "--model", "toyworld", "--method", "lora",
            "--steps", "2", "--batch-size", "2", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["metadata"]["concepts"][0]["method"] == "lora"
    info = json.loads(run("inspect", "myhouse", "--json").stdout)
    assert info["concepts"][0]["method"] == "lora" and info["concepts"][0]["gate"] is None
    assert info["concepts"][0]["training"]["rank"] == 4 and info["layers"] == []
    assert info["concepts"][0]["training"]["class_noun"] is True
    shown = run("inspect", "myhouse")
    assert shown.exit_code == 0 and 'read by the model as: "a myhouse house"' in shown.stdout
    out = tmp_path / "r"
    r = run("render", "a myhouse on grass", "-n", "1", "--seed", "1", "--steps", "2", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    used = json.loads(r.stdout)[0]["concepts"][0]
    assert used["method"] == "lora" and used["beta"] is None and used["scale"] == 1.0
    for scale, want in (("0.5", 0.5), ("myhouse=0.25", 0.25)):
        r = run("render", "a myhouse on grass", "-n", "1", "--seed", "1", "--steps", "2", "-o", str(out),
                "--scale", scale, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)[0]["concepts"][0]["scale"] == want
    for args, msg in (
        (["render", "a myhouse on grass", "--bias", "myhouse=0.5", "-o", str(out)], "has no gate"),
        (["render", "a myhouse on grass", "--scale", "myhouse=5", "-o", str(out)], "--scale"),
        (["render", "a myhouse on grass", "--scale", "other=0.5", "-o", str(out)], "which no prompt uses"),
        (["render", "a house on grass", "--scale", "0.5", "-o", str(out)], "no prompt names a LoRA"),
        (["render", "a myhouse on grass", "--scale", "x", "-o", str(out)], "expected a number"),
        (["combine", "myhouse", "myhouse", "--name", "two"], ""),
        (["train", str(photos), "--super", "house", "--name", "other", "--model", "toyworld", "--method", "hyper"],
         "unknown --method"),
        (["train", str(photos), "--super", "house", "--name", "other", "--model", "toyworld", "--method", "ti",
          "--mask", "attention"], "Perfusion options"),
        (["train", str(photos), "--super", "house", "--name", "other", "--model", "toyworld", "--lr", "0.1"],
         "--lr is for baselines"),
    ):
        bad = run(*args)
        assert bad.exit_code != 0 and msg in bad.stderr and "Traceback" not in bad.output, (args, bad.output)


def test_snapshots_and_an_interrupted_dreambooth_leaves_the_model_as_it_was(toy_base, photos):
    photo_set = load_photos(photos, toy_base.resolution)
    seen = {}
    cfg = methods.recipe("ti", steps=3, batch_size=2)
    final = methods.train_baseline(toy_base, "mything", "house", photo_set, cfg, snapshots=(1, 2),
                                   on_snapshot=lambda step, c: seen.__setitem__(step, c))
    assert sorted(seen) == [1, 2] and seen[1].training["steps_done"] == 1 and final.training["steps_done"] == 3
    assert not torch.equal(seen[1].embeddings[0], final.embeddings[0])

    state = {k: v.clone() for k, v in toy_base.pipe.unet.state_dict().items()}

    def stop(p):
        if p.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        methods.train_baseline(toy_base, "mything", "house", photo_set,
                               methods.recipe("dreambooth", steps=3, batch_size=2, prior_images=0, lr=1e-3),
                               progress=stop)
    after = toy_base.pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in toy_base.pipe.unet.parameters())


def test_cli_class_noun_overrides_the_recipe(photos):
    """`train --class-noun/--no-class-noun` sets how the concept word is written, for a baseline (against its
    recipe) and for Perfusion (the paper: off); `inspect --json` shows what was trained."""
    import json

    from typer.testing import CliRunner

    from perfusion_cli.cli import app

    run = lambda *a: CliRunner().invoke(app, list(a))
    for name, extra, want in (("lorahouse", ["--method", "lora", "--no-class-noun"], False),
                              ("perfhouse", ["--class-noun", "--batch-size", "2", "--grad-accum", "1"], True),
                              ("plainhouse", ["--batch-size", "2", "--grad-accum", "1"], False)):
        r = run("train", str(photos), "--super", "house", "--name", name, "--model", "toyworld", "--steps", "1", *extra)
        assert r.exit_code == 0, r.output
        info = json.loads(run("inspect", name, "--json").stdout)
        assert info["concepts"][0]["training"]["class_noun"] is want, (name, info["concepts"][0]["training"])
