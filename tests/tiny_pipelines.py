"""Tiny, randomly initialised but architecturally faithful diffusers pipelines.

Used by the test-suite to exercise Perfusion code paths (cross-attention
``attn2`` layers, text encoders, tokenizers, schedulers) for the three model
families we support without downloading any weights:

* ``"sd1"``  -- Stable Diffusion 1.x: OpenAI-CLIP text encoder (quick_gelu),
  conv-projection transformers, DDIM epsilon scheduler.
* ``"sd2"``  -- Stable Diffusion 2.x: OpenCLIP-style text encoder (gelu, pads
  with ``"!"``), per-block head counts, linear projections, v-prediction.
* ``"sdxl"`` -- SDXL: two text encoders whose penultimate hidden states are
  concatenated, ``text_time`` added conditioning, Euler scheduler.

Everything is float32 on CPU. Call :func:`tiny_pipeline`.
"""

from __future__ import annotations


import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from perfusion_cli.toyworld.base import tokenizer_dir
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

TOKENIZER_DIR = tokenizer_dir()   # the bundled toy model's (whichever version ships)

KINDS = ("sd1", "sd2", "sdxl")

# Width of the encoder hidden states fed to the UNet's cross-attention (attn2).
TEXT_WIDTH = {"sd1": 32, "sd2": 48, "sdxl": 96}

# Latent (UNet) side length; the VAE below downsamples by 2, so images are 32x32.
LATENT_SIZE = 16
VAE_SCALE_FACTOR = 2
IMAGE_SIZE = LATENT_SIZE * VAE_SCALE_FACTOR  # 32

# Longer than the tokenizer's model_max_length (32), as in real CLIP (77).
MAX_POSITION_EMBEDDINGS = 77


# --------------------------------------------------------------------------- tokenizers


def _tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    kwargs = {}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **kwargs)
    if pad_token is not None:
        vocab = tok.get_vocab()
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary of {TOKENIZER_DIR}")
        if tok.pad_token_id != vocab[pad_token]:
            raise ValueError(f"pad token {pad_token!r} did not take effect (pad_token_id={tok.pad_token_id})")
    if tok.model_max_length > MAX_POSITION_EMBEDDINGS:
        raise ValueError(f"tokenizer model_max_length {tok.model_max_length} > {MAX_POSITION_EMBEDDINGS}")
    return tok


# --------------------------------------------------------------------------- text encoders


def _text_config(tok: CLIPTokenizer, *, hidden_size: int, hidden_act: str, intermediate_size: int,
                 projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,  # pooled output is taken at the first EOS
        pad_token_id=tok.pad_token_id,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


# --------------------------------------------------------------------------- VAE / schedulers


def _vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


_SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


# --------------------------------------------------------------------------- families


def _sd1(seed: int) -> StableDiffusionPipeline:
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH["sd1"],
        attention_head_dim=8,  # SD 1.x: a single int (diffusers uses it as the head *count*)
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = _vae(scaling_factor=0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_config(tokenizer, hidden_size=TEXT_WIDTH["sd1"], hidden_act="quick_gelu", intermediate_size=37)
    )
    scheduler = DDIMScheduler(**_SD_SCHEDULER, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _sd2(seed: int) -> StableDiffusionPipeline:
    tokenizer = _tokenizer(pad_token="!")  # SD 2.x's OpenCLIP tokenizer pads with "!"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH["sd2"],
        attention_head_dim=(2, 4),  # SD 2.x: per-block head counts (e.g. [5, 10, 20, 20])
        use_linear_projection=True,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = _vae(scaling_factor=0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_config(tokenizer, hidden_size=TEXT_WIDTH["sd2"], hidden_act="gelu", intermediate_size=4 * 48)
    )
    scheduler = DDIMScheduler(**_SD_SCHEDULER, prediction_type="v_prediction")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


SDXL_TIME_EMBED_DIM = 8
SDXL_POOLED_DIM = 32  # text_encoder_2 projection_dim


def _sdxl(seed: int) -> StableDiffusionXLPipeline:
    tokenizer = _tokenizer()  # CLIP ViT-L tokenizer pads with <|endoftext|>
    tokenizer_2 = _tokenizer(pad_token="!")  # OpenCLIP bigG tokenizer pads with "!"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # SDXL: no attention in the highest-resolution block.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TEXT_WIDTH["sdxl"],
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # 6 micro-conditioning ints (orig size, crop, target size) + pooled text embeds
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = _vae(scaling_factor=0.13025)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_config(tokenizer, hidden_size=32, hidden_act="quick_gelu", intermediate_size=37)
    )
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_size=64, hidden_act="gelu", intermediate_size=4 * 64,
                     projection_dim=SDXL_POOLED_DIM)
    )
    assert text_encoder.config.hidden_size + text_encoder_2.config.hidden_size == TEXT_WIDTH["sdxl"]
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # as stable-diffusion-xl-base-1.0
        add_watermarker=False,
    )


_BUILDERS = {"sd1": _sd1, "sd2": _sd2, "sdxl": _sdxl}


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of family ``kind`` ("sd1", "sd2" or "sdxl").

    Native output size is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (32x32); the text width seen by
    the UNet's cross-attention is ``TEXT_WIDTH[kind]``.
    """
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}") from None
    pipe = builder(seed)  # components are created on CPU in float32 already
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
