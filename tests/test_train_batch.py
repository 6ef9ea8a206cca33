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
