import numpy as np
import pytest
import torch

from tiny_pipelines import IMAGE_SIZE, KINDS, TEXT_WIDTH, tiny_pipeline

PROMPT = "a photo of a dog on the beach"


@pytest.fixture(scope="module", params=KINDS)
def kind_and_pipe(request):
    return request.param, tiny_pipeline(request.param, seed=0)


def _attn2_layers(unet):
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]


def test_renders_native_size_image(kind_and_pipe):
    kind, pipe = kind_and_pipe
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="np")
    images = out.images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.std() > 1e-3, f"{kind}: rendered image is (nearly) constant"

    pil = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert pil.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_seeded_build_is_deterministic(kind_and_pipe):
    kind, pipe = kind_and_pipe
    other = tiny_pipeline(kind, seed=0)
    for name in ("unet", "text_encoder"):
        a = dict(getattr(pipe, name).named_parameters())
        b = dict(getattr(other, name).named_parameters())
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_attn2_width(kind_and_pipe):
    kind, pipe = kind_and_pipe
    width = TEXT_WIDTH[kind]
    layers = _attn2_layers(pipe.unet)
    assert len(layers) >= 2
    for name, attn in layers:
        assert attn.to_k.in_features == width, name
        assert attn.to_v.in_features == width, name
    assert pipe.unet.config.cross_attention_dim == width


def test_encode_prompt_width(kind_and_pipe):
    kind, pipe = kind_and_pipe
    width = TEXT_WIDTH[kind]
    seq = pipe.tokenizer.model_max_length
    with torch.no_grad():
        if kind == "sdxl":
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
            assert neg_pooled.shape == pooled.shape
        else:
            embeds, neg = pipe.encode_prompt(
                PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
            )
    assert embeds.shape == (1, seq, width)
    assert neg.shape == embeds.shape
    assert embeds.dtype == torch.float32


def test_sd2_and_sdxl_pad_with_exclamation():
    for kind, attr in (("sd2", "tokenizer"), ("sdxl", "tokenizer_2")):
        tok = getattr(tiny_pipeline(kind), attr)
        assert tok.pad_token == "!"
        ids = tok("a dog", padding="max_length", max_length=tok.model_max_length).input_ids
        assert ids[-1] == tok.convert_tokens_to_ids("!")
    assert tiny_pipeline("sdxl").tokenizer.pad_token == "<|endoftext|>"
