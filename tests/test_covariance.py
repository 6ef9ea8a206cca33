"""C = E[e eᵀ] (PERFUSION.md §3): the bundled SD 1.x matrix, estimation, caching by fingerprint."""

from __future__ import annotations

import torch

from perfusion_cli import covariance, models
from perfusion_cli.registry import Registry, bundled_dir
from tiny_pipelines import tiny_pipeline


def test_bundled_sd1_covariance_is_spd_768():
    path = bundled_dir() / models.find_profile("sd15").covariance
    C = covariance.load_file_covariance(path)
    assert C.shape == (768, 768)
    torch.testing.assert_close(C, C.T)
    ev = torch.linalg.eigvalsh(C)
    assert ev.min() > 0.5 and ev.max() / ev.min() < 1e4        # README: eigenvalues 1.13 … 4434


def test_estimate_equals_mean_outer_product_over_real_tokens():
    """Independent check: stack the non-padding encodings by hand and average e eᵀ."""
    pipe = tiny_pipeline("sd1")
    prompts = ["a red cat", "a photo of a big dog on the beach at night", "two boxes"]
    C = covariance.estimate(pipe, prompts, batch_size=2)
    rows = []
    with torch.no_grad():
        for p in prompts:
            e = pipe.encode_prompt(p, "cpu", 1, False)[0][0].double()
            n = len(pipe.tokenizer(p).input_ids)                     # begin + words + end
            rows.append(e[:n])
    X = torch.cat(rows)
    torch.testing.assert_close(C, X.T @ X / X.shape[0])


def test_for_model_estimates_once_then_uses_the_cache(tmp_path):
    pipe = tiny_pipeline("sd2")
    base = models.BaseModel(pipe=pipe, id="tiny", profile=models.generic_profile(pipe),
                            device=torch.device("cpu"), dtype=torch.float32)
    reg = Registry(tmp_path / "home")
    calls = []
    first = covariance.for_model(base, reg, progress=lambda done, total: calls.append(done))
    assert calls and first.source.startswith("estimated:")
    cached = reg.covariance_path(base.text_fingerprint)
    assert cached.is_file()
    calls.clear()
    second = covariance.for_model(base, reg, progress=lambda done, total: calls.append(done))
    assert not calls, "the second call must read the cache, not re-estimate"
    assert second.fingerprint == first.fingerprint
    torch.testing.assert_close(second.C, first.C)


def test_text_fingerprint_ignores_dtype_and_sees_weights():
    pipe = tiny_pipeline("sd1")
    fp = models.text_fingerprint(pipe)
    other = tiny_pipeline("sd1")
    other.text_encoder.half()
    assert models.text_fingerprint(other) == fp                  # fp16 load of the same weights
    changed = tiny_pipeline("sd1")
    with torch.no_grad():
        changed.text_encoder.get_input_embeddings().weight[5, 0] += 1.0
    assert models.text_fingerprint(changed) != fp
