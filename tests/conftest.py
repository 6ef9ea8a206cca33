"""Shared fixtures. Every test gets its own PERFUSION_HOME: the real user registry is never touched."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from perfusion_cli.toyworld.base import bundled_model_dir

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = bundled_model_dir()   # the folder `--model toyworld` resolves to
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the network


@pytest.fixture(scope="session")
def covariance_cache(tmp_path_factory) -> Path:
    """One covariance cache for the whole session: estimating the toy model's C takes seconds."""
    return tmp_path_factory.mktemp("covariances")


@pytest.fixture(autouse=True)
def perfusion_home(tmp_path, monkeypatch, covariance_cache):
    home = tmp_path / "perfusion-home"
    home.mkdir()
    (home / "covariances").symlink_to(covariance_cache, target_is_directory=True)
    monkeypatch.setenv("PERFUSION_HOME", str(home))
    monkeypatch.delenv("PERFUSION_MODEL", raising=False)
    return home


def draw_photos(folder: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """A toy 'photo set': a teal box with a yellow lid on varied grounds, like the toy world's scenes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    k = size / 64
    for i in range(n):
        im = Image.new("RGB", (size, size), (135, 190, 235))
        d = ImageDraw.Draw(im)
        d.rectangle([0, 38 * k, size, size], fill=rng.choice([(80, 160, 70), (230, 210, 150), (240, 240, 245)]))
        x, y, s = rng.randint(8, 30) * k, rng.randint(20, 30) * k, rng.randint(16, 24) * k
        d.rectangle([x, y, x + s, y + s], fill=(20, 170, 160))
        d.rectangle([x, y, x + s, y + s / 3], fill=(250, 220, 40))
        if i % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im.save(folder / f"photo{i}.png")
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    return draw_photos(tmp_path / "photos")


@pytest.fixture(scope="session")
def toy_base():
    """The bundled toy model, loaded once (read-only use: tests must remove what they apply)."""
    from perfusion_cli import models

    return models.load("toyworld", device="cpu")


@pytest.fixture(scope="session")
def trained_toy_concept(tmp_path_factory, covariance_cache):
    """A concept trained for a few steps on the toy model, as file bytes (cheap; not a quality test)."""
    import torch

    from perfusion_cli import api
    from perfusion_cli.registry import Registry
    from perfusion_cli.training import TrainConfig

    root = tmp_path_factory.mktemp("trained")
    (root / "home").mkdir()
    (root / "home" / "covariances").symlink_to(covariance_cache, target_is_directory=True)
    reg = Registry(root / "home")
    folder = draw_photos(root / "photos")
    entry = api.train(folder, name="mybox", supercategory="box", model="toyworld", device="cpu",
                      config=TrainConfig(steps=3, batch_size=2, grad_accum=1, checkpoint_every=0), registry=reg)
    return entry.path.read_bytes()


@pytest.fixture
def registry_with_concept(trained_toy_concept, perfusion_home):
    """The user registry (PERFUSION_HOME) holding the trained 'mybox' concept."""
    from perfusion_cli.registry import Registry

    reg = Registry()
    reg.put("mybox", trained_toy_concept)
    return reg
