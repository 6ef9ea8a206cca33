"""How `perfusion train` splits the profile's 16 images per step into micro-batches (models.train_batch)."""

import pytest
import torch

from perfusion_cli import models
from perfusion_cli.cli.train import _batch

SD15 = models.find_profile("sd15").train
SDXL = models.find_profile("sdxl").train
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("gib, expected", [(141, (16, 1)), (80, (16, 1)), (40, (16, 1)), (39.5, (8, 2)),
                                           (23.6, (8, 2)), (16, (4, 4)), (8, (4, 4))])
def test_sd15_micro_batch_grows_with_gpu_memory(gib, expected):
    assert models.train_batch(SD15, CUDA, memory_gib=gib) == expected


def test_images_per_step_never_change():
    for prof in (SD15, SDXL, models.find_profile("sd21").train, models.find_profile("toyworld").train):
        images = prof["batch_size"] * prof["grad_accum"]
        for gib in (4, 12, 24, 48, 80, 141):
            b, a = models.train_batch(prof, CUDA, memory_gib=gib)
            assert b * a == images and b >= prof["batch_size"], (prof, gib)


def test_cpu_and_low_memory_keep_the_profile_batch():
    assert models.train_batch(SD15, CPU) == (4, 4)
    assert models.train_batch(SD15, torch.device("mps")) == (4, 4)
    assert models.train_batch(SD15, CUDA, memory_gib=141, low_memory=True) == (4, 4)
    assert models.train_batch(SDXL, CUDA, memory_gib=141) == (16, 1)
    assert models.train_batch(SDXL, CUDA, memory_gib=60) == (8, 2)
    assert models.train_batch({}, CUDA, memory_gib=141) == (4, 4)  # no table: the defaults


def test_cli_explicit_values_win():
    assert _batch(SD15, 2, 3, "cpu", False) == (2, 3)
    assert _batch(SD15, 8, None, "cpu", False) == (8, 2)   # the profile's 16 images per step kept
    assert _batch(SD15, None, 16, "cpu", False) == (1, 16)
    assert _batch(SD15, None, None, "cpu", False) == (4, 4)
    assert _batch(SD15, None, None, "no-such-device", False) == (4, 4)  # reported later, where the model loads


def test_config_for_layers_defaults_profile_and_given_values():
    """TrainConfig's defaults, then the profile's `train:` values it knows, then what the caller gave (None: not given)."""
    from perfusion_cli.training import TrainConfig, config_for

    prof = {"steps": 300, "batch_size": 2, "grad_accum": 8, "lr_embedding": 1e-3, "not_a_field": 1}
    cfg = config_for(prof, lr_embedding=None, lr_value=0.05, seed=7)
    assert (cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.lr_embedding) == (300, 2, 8, 1e-3)
    assert (cfg.lr_value, cfg.seed) == (0.05, 7)
    assert config_for(prof, lr_embedding=4e-3).lr_embedding == 4e-3
    assert config_for(None) == TrainConfig() and config_for({}, steps=None) == TrainConfig()


def test_the_toy_profile_recipe_reaches_api_train_without_a_config(photos, perfusion_home, monkeypatch):
    """api.train with no TrainConfig trains with the model's profile recipe (here the toy's embedding lr, which
    differs from the paper's 6e-3, so the check means something). The Trainer is replaced by one that only
    records its config."""
    from perfusion_cli import api

    seen = []

    class Recorder:
        def __init__(self, base, name, supercategory, C_inv, cfg):
            seen.append(cfg)
            raise KeyboardInterrupt  # stop here: nothing is trained or written

    monkeypatch.setattr(api, "Trainer", Recorder)
    prof = models.find_profile("toyworld").train
    with pytest.raises(KeyboardInterrupt):
        api.train(photos, name="myprofiled", supercategory="box", model="toyworld", device="cpu")
    assert seen[0].lr_embedding == prof["lr_embedding"] != 6e-3 and seen[0].steps == prof["steps"]
    assert not (perfusion_home / "concepts" / "myprofiled.safetensors").exists()
