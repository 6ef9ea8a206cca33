"""The Python API a user calls without the CLI, on the bundled toy model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import perfusion_cli as pf
from perfusion_cli.concept import load, to_bytes


def render(pipe_or_applied, prompt, seed=0):
    with torch.no_grad():
        return pipe_or_applied(prompt, num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
                               generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_apply_by_name_renders_and_removes_exactly(toy_base, registry_with_concept):
    pipe = toy_base.pipe
    plain = render(pipe, ["a box on grass"])
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pf.apply(pipe, ["mybox"]) as applied:
        with_concept = render(applied, "a mybox on grass")
    assert with_concept.shape == (1, 64, 64, 3)
    assert not (with_concept == plain).all(), "naming the concept changes the image"
    assert torch.equal(torch.as_tensor(render(pipe, ["a box on grass"])), torch.as_tensor(plain))
    assert all(torch.equal(state[k], v) for k, v in pipe.unet.state_dict().items())
    for m in list(pipe.unet.modules()) + list(pipe.text_encoder.modules()):
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_apply_refuses_concept_of_another_model(toy_base, trained_toy_concept, tmp_path):
    path = tmp_path / "mybox.safetensors"
    path.write_bytes(trained_toy_concept)
    cs = load(path)
    cs.base_model["fingerprint"] = "0000000000000000"
    other = tmp_path / "other.safetensors"
    other.write_bytes(to_bytes(cs))
    with pytest.raises(pf.PerfusionError, match="trained on"):
        pf.apply(toy_base.pipe, [other])
    with pf.apply(toy_base.pipe, [other], check_model=False) as applied:   # explicit override works
        assert render(applied, "a mybox").shape == (1, 64, 64, 3)


def test_global_lock_and_bias_change_the_render(toy_base, registry_with_concept):
    pipe = toy_base.pipe
    with pf.apply(pipe, ["mybox"]) as a:
        local = render(a, "a mybox on a beach")
    with pf.apply(pipe, ["mybox"], global_lock=True) as a:
        glob = render(a, "a mybox on a beach")
    with pf.apply(pipe, ["mybox"], gates={"mybox": pf.Gate(0.2, 0.15)}) as a:
        low_bias = render(a, "a mybox on a beach")
    assert not (glob == local).all()
    assert not (low_bias == local).all()


def test_validate_every_writes_sample_renders(photos, perfusion_home):
    entry = pf.train(photos, name="mybox", supercategory="box", model="toyworld", device="cpu",
                     config=pf.TrainConfig(steps=2, batch_size=2, grad_accum=1, validate_every=1,
                                           checkpoint_every=0))
    sheets = sorted((perfusion_home / "runs" / "mybox" / "validation").glob("step-*.png"))
    assert [p.name for p in sheets] == ["step-00001.png", "step-00002.png"]
    assert entry.path.is_file()


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "perfusion_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"perfusion {pf.__version__}"


def test_apply_uses_the_bundled_covariance_of_a_known_model(toy_base, monkeypatch):
    """A pipeline the user loaded is matched to its profile by fingerprint: no re-estimation."""
    from perfusion_cli import covariance, models

    assert models.profile_for_text_encoder(toy_base.pipe).name == "toyworld"
    monkeypatch.setattr(covariance, "estimate", lambda *a, **k: pytest.fail("must not estimate"))
    base = models.BaseModel(pipe=toy_base.pipe, id="x", profile=models.profile_for_text_encoder(toy_base.pipe),
                            device=toy_base.device, dtype=toy_base.dtype)
    assert covariance.for_model(base).source.startswith("bundled:")


def test_kv_cache_does_not_change_renders(toy_base, registry_with_concept):
    """The render cache (default) gives the same pixels as recomputing K/V at every step."""
    from perfusion_cli.api import load_concept_set
    from perfusion_cli.covariance import for_model
    from perfusion_cli.rendering import Applied

    cs, _ = load_concept_set("mybox")
    C = for_model(toy_base).C
    out = {}
    for cache in (False, True):
        with Applied(toy_base.pipe, cs.concepts, C, cache=cache, global_lock=True) as a:
            out[cache] = render(a, ["a mybox on grass", "a red ball"], seed=3)
    assert (out[True] == out[False]).all()


@pytest.mark.parametrize("method, dtype, want", [("perfusion", "auto", "bf16"), ("ti", "auto", "fp16"),
                                                  ("perfusion", "fp16", "fp16")])
def test_train_loads_the_model_in_bf16_on_a_cuda_gpu(photos, perfusion_home, monkeypatch, method, dtype, want):
    """api.train's dtype `auto` is the training dtype: bf16 on a CUDA GPU with bf16 (Perfusion runs it natively);
    the baselines keep the render dtype; a dtype the user names is kept. (A CUDA device is faked up to the load.)"""
    import torch
    from perfusion_cli import api, models
    from perfusion_cli.errors import PerfusionError

    asked = []

    real_pick = models.pick_dtype

    def load(model, device="auto", dtype="auto", training=False, **kw):   # the dtype models.load would pick
        dt = real_pick(dtype, torch.device("cuda"), training=training)
        asked.append({v: k for k, v in models.DTYPES.items()}[dt])
        raise PerfusionError("stop here")

    monkeypatch.setattr(models, "pick_device", lambda device="auto": torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(models, "load", load)
    with pytest.raises(PerfusionError, match="stop here"):
        api.train(photos, "mycat", "box", model="toyworld", dtype=dtype, method=method)
    assert asked == [want]
