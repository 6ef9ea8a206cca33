"""The concept file: size at Stable Diffusion 1.5 widths, round trip, metadata, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from perfusion_cli import patch as P
from perfusion_cli.concept import Concept, ConceptSet, load, read_metadata, to_bytes
from perfusion_cli.edit import ConceptTensors
from perfusion_cli.errors import ConceptFileError

# Stable Diffusion 1.5's UNet configuration (the architecture only; no weights are needed).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def concept_for(widths, d=768, seed=0, name="mycat") -> Concept:
    g = torch.Generator().manual_seed(seed)
    t = ConceptTensors(
        i_star=torch.randn(d, generator=g),
        key_targets={n: torch.randn(w, generator=g) for n, w in widths},
        value_targets={n: torch.randn(w, generator=g) for n, w in widths},
    )
    return Concept(name=name, supercategory="cat", tensors=t, embeddings=[torch.randn(d, generator=g)],
                   training={"steps": 400, "batch_size": 4, "grad_accum": 4, "templates": ["a photo of a {}"] * 20})


def concept_set(concepts, kind="concept") -> ConceptSet:
    return ConceptSet(name=concepts[0].name if kind == "concept" else "pair", concepts=concepts, kind=kind,
                      base_model={"id": "sd15", "fingerprint": "0123456789abcdef", "family": "sd1"},
                      covariance={"fingerprint": "fedcba9876543210", "source": "bundled:clip.safetensors"})


@pytest.fixture(scope="module")
def sd15_widths():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return P.layer_widths(unet)


def test_sd15_concept_fits_60kb_in_fp16(sd15_widths, tmp_path):
    """PERFUSION.md §9: 16 layers, widths summing to 12,480; an fp16 concept ≤ 60 KB (fp32 ~100 KB)."""
    assert len(sd15_widths) == 16
    assert sum(w for _, w in sd15_widths) == 12480
    cs = concept_set([concept_for(sd15_widths)])
    fp16, fp32 = to_bytes(cs, torch.float16), to_bytes(cs, torch.float32)
    print(f"SD 1.5 concept: fp16 {len(fp16)} bytes, fp32 {len(fp32)} bytes")
    assert len(fp16) <= 60 * 1024
    assert 100_000 <= len(fp32) <= 110 * 1024
    (tmp_path / "c.safetensors").write_bytes(fp16)
    back = load(tmp_path / "c.safetensors").concepts[0]
    assert back.layers == list(sd15_widths)


def test_round_trip_and_metadata(tmp_path):
    widths = [("a.attn2", 3), ("b.attn2", 5)]
    c = concept_for(widths, d=4)
    path = tmp_path / "mycat.safetensors"
    path.write_bytes(to_bytes(concept_set([c]), torch.float32))
    meta = read_metadata(path)
    assert meta["format"] == "perfusion-concept" and meta["format_version"] == "1"
    assert meta["layers"] == widths
    assert meta["concepts"][0]["supercategory"] == "cat"
    assert meta["concepts"][0]["gate"] == {"beta": 0.7, "tau": 0.15}
    assert meta["base_model"]["fingerprint"] == "0123456789abcdef"
    for key in ("created", "tool_version", "name", "kind"):
        assert meta[key]
    back = load(path).concepts[0]
    for n, _ in widths:
        assert torch.equal(back.tensors.value_targets[n], c.tensors.value_targets[n])
        assert torch.equal(back.tensors.key_targets[n], c.tensors.key_targets[n])
    assert torch.equal(back.tensors.i_star, c.tensors.i_star)
    assert torch.equal(back.embeddings[0], c.embeddings[0])
    with safe_open(str(path), framework="pt") as f:   # every value in the header is a plain string
        assert all(isinstance(v, str) for v in f.metadata().values())
        json.loads(f.metadata()["concepts"])


def test_combination_holds_members_in_order(tmp_path):
    widths = [("a.attn2", 3)]
    a, b = concept_for(widths, d=4, seed=1, name="mycat"), concept_for(widths, d=4, seed=2, name="mydog")
    path = tmp_path / "pair.safetensors"
    path.write_bytes(to_bytes(concept_set([a, b], kind="combination")))
    cs = load(path)
    assert cs.kind == "combination" and [c.name for c in cs.concepts] == ["mycat", "mydog"]
    torch.testing.assert_close(cs.concepts[1].tensors.i_star, b.tensors.i_star, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-a-concept", "pickle"])
def test_damaged_files_raise_concept_file_error(tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    good = to_bytes(concept_set([concept_for([("a.attn2", 3)], d=4)]))
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "not-a-concept":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    else:
        import pickle

        path.write_bytes(pickle.dumps({"i_star": [0.0]}))
    with pytest.raises(ConceptFileError):
        load(path)
