"""Train the toy world's base model: a small, standard diffusers StableDiffusionPipeline, from scratch.

Two phases within one time budget (library code: prints nothing; progress through a callback):

1. VAE: an `AutoencoderKL` (64×64×3 → 16×16×4) on world images, L1 + L2 + an edge (image-gradient) term +
   a small KL, lr warmup then cosine. Then PSNR on held-out sets (patterned objects, striped cars, the
   general distribution) and the latent scaling factor (1 / std of the latents) stored in its config.
2. Text encoder + UNet jointly, VAE frozen: ε-prediction DDPM loss (SD's scaled_linear betas
   0.00085–0.012, 1000 steps; min-SNR weighting), with `empty_prompt_p` of the captions emptied so the
   model supports classifier-free guidance. Optional EMA of the UNet *and* text-encoder weights (they are
   trained together, so they are averaged together).

`train_base` then writes a StableDiffusionPipeline folder in fp16 safetensors (`save_pipeline`), reloads it
with `StableDiffusionPipeline.from_pretrained` to check it, renders `samples.png` (world renders of held-out
captions next to the model's renders of the same captions), measures how much a word's encoding leaks
into the following tokens as Perfusion's gate sees it (`gate_leak`), and writes `README.md` and
`report.json` into the folder.

The tokenizer is the toy CLIP BPE tokenizer of the bundled toy model (8,514 tokens, 32 positions; first made for
toyworld-v0, whose world had fewer words); every
word of the world's vocabulary is one token except a few listed by `vocabulary_check`.

Resumable: a checkpoint (safetensors tensors + JSON metadata, no pickle) is written to
`OUT/.checkpoint/` every `checkpoint_minutes` and at the end of the VAE phase; `train_base(resume=True)`
continues from it. The checkpoint is removed once the pipeline is saved.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PerfusionError
from . import world as tw

MAX_BYTES = 40 * 1000 * 1000  # the saved weights must fit in 40 MB
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
SCHEDULER_CONFIG = dict(  # Stable Diffusion's DDIM configuration
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)
CHECKPOINT_DIR = ".checkpoint"


# ------------------------------------------------------------------------------------------------
# Recipe
# ------------------------------------------------------------------------------------------------


@dataclass
class BaseRecipe:
    """Everything that decides the trained model. `gpu()` and `cpu()` give the same architecture (the same
    kind of model) with different batches and schedules."""

    # --- shapes of the output model ---
    image_size: int = 64                            # world images are 64×64 RGB
    latent_channels: int = 8                        # latents 16×16×8: three VAE levels, 64 → 32 → 16 (v1 had 4
                                                    # and could not keep patterns: 24.7 dB; v2 28.1 dB)
    vae_channels: tuple[int, ...] = (48, 96, 96)    # AutoencoderKL block widths (~2.15M parameters)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    text_hidden: int = 256                          # CLIPTextModel width = the UNet's cross-attention dim
    text_layers: int = 2                            # fewer layers than toyworld-v0's 4: less mixing of a word
                                                    # into the following tokens (see gate_leak)
    text_heads: int = 4
    text_intermediate: int = 1024
    max_length: int = 32                            # token positions (the bundled tokenizer's length)
    unet_channels: tuple[int, ...] = (64, 128, 192)  # UNet2DConditionModel block widths (~12.9M parameters)
    unet_layers_per_block: int = 2
    unet_head_dim: int = 8                          # diffusers' `attention_head_dim` (acts as the head count)
    unet_norm_groups: int = 16

    # --- time budget ---
    vae_fraction: float = 0.45                      # share of the training minutes for the VAE; joint gets the rest
                                                    # (the predecessor's VAE needed ~80 s on one GPU for 26.6 dB)

    # --- phase 1: VAE ---
    vae_batch: int = 128
    vae_lr: float = 1e-3                            # peak lr (AdamW); warmup then cosine to vae_lr * min_lr_ratio
    vae_warmup: int = 100                           # warmup steps
    vae_steps: int | None = None                    # fixed step count (None: as many as the time share allows)
    vae_l1: float = 1.0                             # loss weights on images in [-1, 1]
    vae_l2: float = 1.0
    vae_edge: float = 0.5                           # L1 between image gradients (keeps stripes and dots sharp)
    vae_kl: float = 1e-5                            # × mean KL per latent element
    vae_eval_points: int = 6                        # PSNR measurements during the phase (the trend in the report)

    # --- phase 2: text encoder + UNet jointly ---
    joint_batch: int = 256
    unet_lr: float = 5e-4                           # peak lr (AdamW), warmup then cosine
    text_lr: float = 5e-4
    joint_warmup: int = 200
    joint_steps: int | None = None                  # fixed step count (None: the rest of the time budget)
    min_lr_ratio: float = 0.05                      # the cosine ends at lr * min_lr_ratio (both phases)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    empty_prompt_p: float = 0.1                     # captions replaced by "" (classifier-free guidance)
    min_snr_gamma: float | None = 5.0               # min-SNR loss weighting (None: plain MSE)
    ema_decay: float = 0.999                        # EMA of UNet + text encoder weights (0: off)

    # --- machine ---
    mixed_precision: bool = True                    # bf16 autocast on CUDA
    cpu_bf16_vae: bool = True                       # bf16 autocast for the VAE phase on CPUs with native bf16
                                                    # (AMX / AVX512-BF16: ~2x faster); CPU UNet steps stay fp32
                                                    # (bf16 was slower there)
    data_workers: int = -1                          # processes drawing world images (-1: auto; 0: in-process)
    replay_batches: int = 0                         # GPU-resident ring of recent batches, replayed (with new noise and
                                                    # timesteps) whenever the workers have no fresh batch ready, so the
                                                    # GPU never waits for the CPU-drawn world (0: off: every step waits
                                                    # for fresh data; a run is then reproducible and resumable exactly)
    cpu_threads: int = -1                           # torch threads on CPU (-1: the cores the 1-minute load average
                                                    # leaves free, at least 1: oversubscribed OpenMP threads were
                                                    # 3-4x slower than one thread on a busy 2-core machine)
    checkpoint_minutes: float = 3.0                 # resumable checkpoint interval (0: only at the VAE's end)
    log_every: int = 10                             # steps between progress reports (each syncs the device)
    seed: int = 0

    # --- evaluation and the sample grid ---
    eval_images: int = 256                          # per held-out PSNR set
    leak_captions: int = 1000                       # captions for the text-encoding covariance in gate_leak
    sample_prompts: int = 16
    sample_steps: int = 30                          # DDIM steps
    sample_cfg: float = 4.0

    @classmethod
    def gpu(cls, **overrides) -> "BaseRecipe":
        """For ≤ 10 minutes on one H100-class GPU: large batches, bf16 autocast, EMA (toyworld-v2's run 1).

        Large batches because the small model's step is launch-bound: on an H200 batch 1024 stepped at
        4–5 steps/s where batch 256 managed 6 (4,900 against 1,500 images/s; docs/toyworld.md)."""
        return dataclasses.replace(cls(vae_batch=256, joint_batch=1024, vae_warmup=100, joint_warmup=100,
                                       unet_lr=1e-3, text_lr=1e-3, ema_decay=0.999, log_every=10,
                                       replay_batches=64), **overrides)

    @classmethod
    def cpu(cls, **overrides) -> "BaseRecipe":
        """For a CPU run in the background (tens of minutes): the same model, small batches."""
        return dataclasses.replace(cls(vae_batch=16, joint_batch=32, vae_warmup=30, joint_warmup=50,
                                       vae_lr=1e-3, unet_lr=5e-4, text_lr=5e-4,
                                       ema_decay=0.995, data_workers=0, log_every=1, eval_images=128,
                                       leak_captions=500), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "BaseRecipe":
        if name not in ("gpu", "cpu"):
            raise PerfusionError(f"unknown preset {name!r}; presets: gpu, cpu")
        return getattr(cls, name)(**overrides)

    def with_overrides(self, values: dict[str, str]) -> "BaseRecipe":
        """A copy with fields set from strings ("vae_batch" -> "64"), typed by the current values."""
        names = {f.name for f in dataclasses.fields(self)}
        changes = {}
        for key, raw in values.items():
            if key not in names:
                raise PerfusionError(f"unknown recipe field {key!r}; fields: {', '.join(sorted(names))}")
            changes[key] = _parse_field(key, raw, BaseRecipe.__dataclass_fields__[key].default)
        return dataclasses.replace(self, **changes)


def _parse_field(key: str, raw: str, current):
    """Read a recipe field from a string, typed like the field's default."""
    raw = raw.strip()
    try:
        if raw.lower() in ("none", "null"):
            return None
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(current, tuple):
            return tuple(int(v) for v in raw.replace("(", "").replace(")", "").split(",") if v.strip())
        if isinstance(current, int) or key.endswith(("_steps", "_batch")):
            return int(raw)
        if isinstance(current, float) or current is None:
            return float(raw)
        return type(current)(raw)
    except ValueError:
        raise PerfusionError(f"recipe field {key}: cannot read {raw!r}") from None


@dataclass
class Progress:
    """A progress report. phase: "vae", "joint" or "finish"; elapsed/budget: seconds within the phase
    (budget None when the phase runs a fixed number of steps without a time limit)."""

    phase: str
    step: int
    steps: int | None
    elapsed: float
    budget: float | None
    loss: float = float("nan")
    lr: float = 0.0
    info: str = ""


ProgressFn = Callable[[Progress], None]


# ------------------------------------------------------------------------------------------------
# Tokenizer, models
# ------------------------------------------------------------------------------------------------


def bundled_model_dir() -> Path:
    """The bundled toy base model's folder (`--model toyworld`: the profile's path, whichever version ships)."""
    from .. import models
    from ..registry import bundled_dir

    return bundled_dir() / models.find_profile("toyworld").path


def tokenizer_dir() -> Path:
    """The toy CLIP BPE tokenizer: every toy base model, and the SD 1.5-shaped benchmark model, use it."""
    return bundled_model_dir() / "tokenizer"


def load_tokenizer(max_length: int = 32):
    """The toy CLIP BPE tokenizer (8,514 tokens), padded to max_length with <|endoftext|> like SD's."""
    from transformers import CLIPTokenizer

    path = tokenizer_dir()
    if not path.is_dir():
        raise PerfusionError(f"the toy tokenizer is missing: {path} (reinstall the package)")
    tok = CLIPTokenizer.from_pretrained(str(path))
    tok.model_max_length = max_length
    return tok


def world_vocabulary() -> list[str]:
    """Every word a base caption can use, plus the instance-only colour words."""
    words = set(tw.KINDS) | set(tw.PLURALS.values()) | set(tw.COLOURS) | set(tw.INSTANCE_COLOURS)
    words |= set(tw.PATTERNS) | set(tw.SIZES) | set(tw.NUMBERS.values()) | {"a", "an", "and"}
    for s in tw.SCENES:
        words |= set(s.split())
    return sorted(words)


def vocabulary_check(tokenizer) -> dict:
    """How each world word tokenizes. Returns {"pieces": {word: [tokens]}, "multi_piece": {word: [tokens]}}."""
    pieces = {w: tokenizer.convert_ids_to_tokens(tokenizer(w, add_special_tokens=False).input_ids)
              for w in world_vocabulary()}
    return {"pieces": pieces, "multi_piece": {w: p for w, p in pieces.items() if len(p) > 1}}


def build_models(recipe: BaseRecipe, vocab_size: int, bos: int, eos: int):
    """Fresh (vae, text_encoder, unet) of the recipe's shapes, in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    r = recipe
    n = len(r.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=r.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(r.vae_channels), layers_per_block=r.vae_layers_per_block,
        norm_num_groups=r.vae_norm_groups, sample_size=r.image_size, scaling_factor=1.0,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=r.text_hidden, intermediate_size=r.text_intermediate,
        num_hidden_layers=r.text_layers, num_attention_heads=r.text_heads, max_position_embeddings=r.max_length,
        hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, projection_dim=512,
    ))
    m = len(r.unet_channels)
    latent_size = r.image_size // 2 ** (n - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=r.latent_channels, out_channels=r.latent_channels,
        block_out_channels=tuple(r.unet_channels), layers_per_block=r.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1),
        cross_attention_dim=r.text_hidden, attention_head_dim=r.unet_head_dim, norm_num_groups=r.unet_norm_groups,
    )
    return vae, text_encoder, unet


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

STREAM_VAE, STREAM_JOINT = 1, 2
STREAM_EVAL_GENERAL, STREAM_EVAL_PATTERNED, STREAM_EVAL_CARS, STREAM_SAMPLES, STREAM_LEAK = 101, 102, 103, 104, 105


def _world_batch(args) -> tuple[np.ndarray, list[str]]:
    n, seed = args
    images, captions, _ = tw.sample(n, seed=seed)
    return images, captions


class Batches:
    """Endless training batches (images uint8 (B,64,64,3), captions): batch b of a stream is world seed
    (seed, stream, b), so a resumed run sees the same data. workers > 0 draws them in other processes."""

    def __init__(self, batch: int, seed: int, stream: int, start: int = 0, workers: int = 0, pool=None):
        self.batch, self.seed, self.stream, self.next = batch, seed, stream, start
        self.workers = workers
        self._pool, self._own_pool = pool, pool is None  # a shared pool (see worker_pool) outlives this
        self._pending: list = []
        self._queued = start

    def _args(self, b: int):
        return self.batch, (self.seed, self.stream, b)

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        return self

    def __next__(self):
        if self.workers <= 0:
            out = _world_batch(self._args(self.next))
            self.next += 1
            return out
        if self._pool is None:
            self._pool = worker_pool(self.workers)
        while len(self._pending) < 3 * self.workers:
            self._pending.append(self._pool.submit(_world_batch, self._args(self._queued)))
            self._queued += 1
        out = self._pending.pop(0).result()
        self.next += 1
        return out

    def poll(self):
        """The next batch if it is ready now (always, without workers), else None."""
        if self.workers <= 0:
            return next(self)
        if self._pool is None:
            self._pool = worker_pool(self.workers)
        while len(self._pending) < 3 * self.workers:
            self._pending.append(self._pool.submit(_world_batch, self._args(self._queued)))
            self._queued += 1
        return next(self) if self._pending[0].done() else None

    def close(self):
        for f in self._pending:
            f.cancel()
        if self._pool is not None and self._own_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._pending = []


class DeviceBatches:
    """Training batches on the device: (images uint8 (B,64,64,3), token ids (B,L) or None).

    Fresh world batches are moved to the device once (and tokenized once). With `replay` > 0 the last
    `replay` fresh batches stay on the device, and a step for which the workers have no fresh batch
    ready takes one of them at random instead of waiting: on a GPU the world's CPU renderer, not the
    model, set the pace (the first GPU run drew ~2,500 images/s with 12 processes while the VAE could
    have consumed several times more). Counts of fresh and replayed batches go into the report.
    """

    def __init__(self, source: Batches, device, tokenizer=None, max_length: int = 32, replay: int = 0,
                 seed: int = 0):
        self.source, self.device, self.tokenizer, self.max_length = source, device, tokenizer, max_length
        self.replay = replay
        self.buffer: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.slot = 0
        self.rng = np.random.default_rng(seed)
        self.fresh = self.replayed = 0

    def _put(self, images: np.ndarray, captions: list[str]):
        x = _to_device(images, self.device)
        ids = None
        if self.tokenizer is not None:
            ids = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device, non_blocking=True)
        if self.replay > 0:
            if len(self.buffer) < self.replay:
                self.buffer.append((x, ids))
            else:
                self.buffer[self.slot] = (x, ids)
                self.slot = (self.slot + 1) % self.replay
        self.fresh += 1
        return x, ids

    def __iter__(self):
        return self

    def __next__(self):
        if self.replay <= 0 or not self.buffer:
            return self._put(*next(self.source))
        got = self.source.poll()
        if got is not None:
            return self._put(*got)
        self.replayed += 1
        return self.buffer[int(self.rng.integers(len(self.buffer)))]

    @property
    def position(self) -> int:
        """Fresh batches consumed (where a resumed run continues the world's stream)."""
        return self.source.next

    def close(self):
        self.source.close()
        self.buffer = []


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) images -> float (B,3,H,W) in [-1, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Processes that draw world batches (spawned: safe beside CUDA and OpenMP threads)."""
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def general_set(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Held-out images of the base distribution (a world seed stream training never uses)."""
    images, captions, _ = tw.sample(n, seed=(seed, STREAM_EVAL_GENERAL, 0))
    return images, captions


def patterned_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out scenes in which one object (of one or two) is striped, spotted or checked, base colours only.
    Returns (images uint8 (n,64,64,3), masks bool (n,64,64) of the patterned object)."""
    rng = np.random.default_rng((seed, STREAM_EVAL_PATTERNED, 0))
    images = np.empty((n, tw.RES, tw.RES, 3), np.uint8)
    masks = np.zeros((n, tw.RES, tw.RES), bool)
    for i in range(n):
        sc = tw.sample_scene(rng, (1, 2))
        j = int(rng.integers(len(sc.objs)))
        o = sc.objs[j]
        pattern = tw.PATTERNS[1 + i % 3]
        ok = tw._PAIR_OK[o.colour]
        sc.objs[j] = dataclasses.replace(o, pattern=pattern, colour2=ok[int(rng.integers(len(ok)))])
        tw.draw(sc, out=images[i])
        masks[i] = tw.object_mask(sc) == j
    return images, masks


def striped_cars(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out single striped cars (medium or big) in random scenes: the predecessor's VAE test set kind."""
    rng = np.random.default_rng((seed, STREAM_EVAL_CARS, 0))
    images = np.empty((n, tw.RES, tw.RES, 3), np.uint8)
    masks = np.zeros((n, tw.RES, tw.RES), bool)
    colours = list(tw.COLOURS)
    for i in range(n):
        c = colours[int(rng.integers(len(colours)))]
        ok = tw._PAIR_OK[c]
        o = tw.Obj("car", c, "striped", ok[int(rng.integers(len(ok)))], size=("medium", "big")[i % 2],
                   flip=bool(rng.random() < 0.5), variant=int(rng.integers(128)))
        sc = tw.place(tw.Scene(tw.SCENES[int(rng.integers(len(tw.SCENES)))], [o],
                               int(rng.integers(tw.N_BACKGROUNDS)), bool(rng.random() < 0.5)), rng)
        tw.draw(sc, out=images[i])
        masks[i] = tw.object_mask(sc) == 0
    return images, masks


def _to_device(images: np.ndarray, device) -> torch.Tensor:
    """uint8 images (B,H,W,3) on the device as they are (pinned, asynchronous copy to a GPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 images (B,H,W,3) -> float (B,3,H,W) in [-1, 1] on the device."""
    return as_float(_to_device(images, device))


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, device="cpu", batch: int = 64) -> np.ndarray:
    """VAE round trip (posterior mode) of uint8 images, returned as uint8."""
    out = np.empty_like(images)
    dtype = next(vae.parameters()).dtype
    for s in range(0, len(images), batch):
        x = _to_tensor(images[s:s + batch], device).to(dtype)
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample.float().clamp(-1, 1)
        out[s:s + batch] = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


def psnr(a: np.ndarray, b: np.ndarray, masks: np.ndarray | None = None) -> float:
    """Mean per-image PSNR (dB, peak 255) of uint8 batches, over whole images or over each mask's pixels."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if masks is None:
        mse = d.reshape(len(d), -1).mean(1)
    else:
        m = masks[..., None].astype(np.float64)
        mse = (d * m).reshape(len(d), -1).sum(1) / np.maximum(m.reshape(len(m), -1).sum(1) * 3, 1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


# ------------------------------------------------------------------------------------------------
# How much a word's encoding leaks into the following tokens (Perfusion's gate, PERFUSION.md)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def gate_leak(text_encoder, tokenizer, device="cpu", n_captions: int = 1000, seed: int = 0) -> dict:
    """For held-out captions, with C = E[e eᵀ] over their real tokens and, for each object-kind word k,
    s_k(e) = eᵀC⁻¹e_k / e_kᵀC⁻¹e_k (the score Perfusion's gate thresholds at β≈0.7): the mean and 95th
    percentile of s over the real tokens after the word (EOS included), the fraction above 0.5, and the
    mean over the padding positions. Low is good: the gate then fires on the concept word only."""
    _, captions, _ = tw.sample(n_captions, seed=(seed, STREAM_LEAK, 0))
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    e = torch.cat([text_encoder(ids[s:s + 128].to(device))[0].double().cpu() for s in range(0, len(ids), 128)])
    eos = tokenizer.eos_token_id
    n_real = (ids != eos).sum(1) + 1  # BOS + words + the first EOS
    pos = torch.arange(ids.shape[1])[None]
    real = pos < n_real[:, None]
    x = e[real]
    C = x.T @ x / x.shape[0]
    Ci = torch.linalg.inv(C + 1e-6 * torch.eye(C.shape[0], dtype=C.dtype) * C.diagonal().mean())
    kind_ids = {tokenizer.convert_tokens_to_ids(k + "</w>") for k in tw.KINDS}
    after, pad = [], []
    for i in range(len(ids)):
        for k in range(1, int(n_real[i]) - 1):
            if int(ids[i, k]) not in kind_ids:
                continue
            v = Ci @ e[i, k]
            s = e[i] @ v / (e[i, k] @ v)
            after.append(s[k + 1:int(n_real[i])])
            pad.append(s[int(n_real[i]):])
    a = torch.cat(after) if after else torch.zeros(1, dtype=torch.float64)
    p = torch.cat(pad) if pad else torch.zeros(1, dtype=torch.float64)
    return {
        "following_mean": round(float(a.mean()), 4),
        "following_p95": round(float(a.quantile(0.95)), 4),
        "following_above_0.5": round(float((a > 0.5).double().mean()), 4),
        "padding_mean": round(float(p.mean()), 4) if p.numel() else None,
        "words": len(after),
    }


STREAM_COVARIANCE = 106


def world_covariance(pipe, n_captions: int = 4000, seed: int = 0) -> torch.Tensor:
    """C = E[e eᵀ] of the model's text encodings over held-out world captions (covariance.estimate): the
    statistics of what this model's UNet reads, for Perfusion's C⁻¹ metric. (float64 (d, d))"""
    from ..covariance import estimate

    _, captions, _ = tw.sample(n_captions, seed=(seed, STREAM_COVARIANCE, 0))
    return estimate(pipe, captions)


# ------------------------------------------------------------------------------------------------
# Schedules, EMA, checkpoints
# ------------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio as progress goes 0 → 1."""
    w = min(1.0, (step + 1) / max(warmup, 1))
    p = min(max(progress, 0.0), 1.0)
    return w * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of parameters (fp32), with the usual (1+t)/(10+t) warmup of the decay."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = decay
        self.params = list(params)
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach().float() for p in self.params], alpha=1 - d)

    @torch.no_grad()
    def copy_to(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def _optim_tensors(opt, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optim(opt, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / "state.safetensors")
    (folder / "state.json.tmp").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    os.replace(folder / "state.json.tmp", folder / "state.json")


def _load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return load_file(str(folder / "state.safetensors")), meta


def _prefixed(prefix: str, sd: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def _unprefixed(prefix: str, tensors: dict) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ------------------------------------------------------------------------------------------------
# Saving the pipeline
# ------------------------------------------------------------------------------------------------


def folder_weight_bytes(folder: Path) -> int:
    """Bytes of the pipeline's weight files (checkpoints and other files in the folder not counted)."""
    return sum(p.stat().st_size for part in PIPELINE_PARTS for p in (Path(folder) / part).glob("*.safetensors"))


@contextmanager
def quiet_libraries():
    """diffusers / transformers log warnings and progress bars while saving and loading; not ours to show."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dbar, tbar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])
        if dbar:
            dlog.enable_progress_bar()
        if tbar:
            tlog.enable_progress_bar()


def save_pipeline(out_dir, vae, text_encoder, unet, tokenizer, scaling_factor: float | None = None) -> int:
    """Write a standard StableDiffusionPipeline folder (fp16 safetensors, DDIM scheduler, no safety checker).
    The models passed in are not changed. Returns the bytes of weights; raises if over MAX_BYTES."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_libraries():
        parts = [copy.deepcopy(m).to("cpu", torch.float16).eval() for m in (vae, text_encoder, unet)]
    vae16, te16, unet16 = parts
    if scaling_factor is not None:
        vae16.register_to_config(scaling_factor=float(scaling_factor))
    pipe = StableDiffusionPipeline(
        vae=vae16, text_encoder=te16, tokenizer=tokenizer, unet=unet16, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for part in PIPELINE_PARTS:  # no stale files from an earlier save
        if (out / part).is_dir():
            shutil.rmtree(out / part)
    with quiet_libraries():
        pipe.save_pretrained(str(out), safe_serialization=True)
    for part in PIPELINE_PARTS:
        for f in (out / part).glob("*"):
            f.chmod(0o644)
    size = folder_weight_bytes(out)
    if size > MAX_BYTES:
        raise PerfusionError(f"the saved model is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit; "
                             "use a smaller recipe")
    return size


def load_pipeline(folder, device="cpu", dtype=torch.float32):
    from diffusers import StableDiffusionPipeline

    with quiet_libraries():
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def saved_dtypes(folder) -> dict[str, list[str]]:
    """{part: sorted dtype names} of the weights in a saved pipeline folder (all 'F16' when fp16)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(f for part in PIPELINE_PARTS for f in (Path(folder) / part).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out[f.parent.name] = sorted({str(h.get_slice(k).get_dtype()) for k in h.keys()})
    return out


@torch.no_grad()
def render_samples(pipe, captions: list[str], steps: int, cfg: float, seed: int, device="cpu") -> np.ndarray:
    """uint8 (n,64,64,3) renders of captions (fixed seed per image)."""
    out = []
    for s in range(0, len(captions), 16):
        chunk = captions[s:s + 16]
        gens = [torch.Generator("cpu").manual_seed(seed + s + i) for i in range(len(chunk))]
        res = pipe(chunk, height=64, width=64, num_inference_steps=steps, guidance_scale=cfg, generator=gens,
                   output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def sample_sheet(truth: np.ndarray, made: np.ndarray, cols: int = 8, scale: int = 2) -> np.ndarray:
    """Rows alternate: world renders of cols captions, then the model's renders of the same captions."""
    rows = []
    for s in range(0, len(truth), cols):
        rows += [truth[s:s + cols], made[s:s + cols]]
    stacked = []
    for r in rows:
        if len(r) < cols:
            r = np.concatenate([r, np.full((cols - len(r),) + r.shape[1:], 255, np.uint8)])
        stacked.append(r)
    return tw.grid(np.concatenate(stacked), cols, pad=2, scale=scale)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """models.pick_device's choice and checks, limited to what train-base supports (cuda or cpu)."""
    from .. import models

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps":
        raise PerfusionError(f"device {device!r}: train-base runs on cuda or cpu")
    return str(models.pick_device(device))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16; Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_threads(recipe: BaseRecipe) -> int:
    """The torch thread count for a CPU run (see BaseRecipe.cpu_threads)."""
    if recipe.cpu_threads > 0:
        return recipe.cpu_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _workers(recipe: BaseRecipe, device: str) -> int:
    if recipe.data_workers >= 0:
        return recipe.data_workers
    if not device.startswith("cuda"):
        return 0
    return max(1, min(12, (os.cpu_count() or 2) - 3))  # leave the main process and pinning threads a core or two


def _step_generator(device: str, seed: int, phase: int, step: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, phase, step]).generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return g


class _Clock:
    """Seconds spent in a phase, across resumed sessions."""

    def __init__(self, already: float = 0.0):
        self.already, self.t0 = already, time.perf_counter()

    def __call__(self) -> float:
        return self.already + time.perf_counter() - self.t0


def _phase_progress(step: int, steps: int | None, elapsed: float, budget: float | None) -> float:
    if steps:
        return step / steps
    return elapsed / budget if budget else 0.0


def _done(step: int, steps: int | None, elapsed: float, budget: float | None) -> bool:
    if steps is not None and step >= steps:
        return True
    return budget is not None and elapsed >= budget


def train_base(
    out_dir,
    minutes: float | None = 10.0,
    device: str = "auto",
    recipe: BaseRecipe | None = None,
    progress: ProgressFn | None = None,
    on_event: Callable[[str], None] | None = None,
    resume: bool = False,
    force: bool = False,
    keep_checkpoint: bool = False,
    init=None,
) -> dict:
    """Train VAE, then text encoder + UNet, within `minutes` of training time (evaluation, saving and the
    sample grid come after and are timed separately); write the pipeline folder. Returns the report.

    minutes None: no time limit (recipe.vae_steps and recipe.joint_steps must then be set). Explicit step
    counts set the schedules; the time budget still stops a phase early. On CPU the torch thread count is
    set for the run (BaseRecipe.cpu_threads) and restored afterwards.

    init: a pipeline folder saved by an earlier run of the same recipe's shapes; training starts from its
    weights (both phases still run: the VAE continues, then text encoder + UNet adapt to it).
    """
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    if not dev.startswith("cuda"):
        r = recipe or BaseRecipe.cpu()
        torch.set_num_threads(cpu_threads(r))
    try:
        return _train_base(out_dir, minutes, dev, recipe, progress, on_event, resume, force, keep_checkpoint, init)
    finally:
        torch.set_num_threads(threads)


def _train_base(
    out_dir,
    minutes: float | None = 10.0,
    device: str = "auto",
    recipe: BaseRecipe | None = None,
    progress: ProgressFn | None = None,
    on_event: Callable[[str], None] | None = None,
    resume: bool = False,
    force: bool = False,
    keep_checkpoint: bool = False,
    init=None,
) -> dict:
    t_start = time.perf_counter()
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    say = on_event or (lambda msg: None)
    prog = progress or (lambda p: None)
    device = resolve_device(device)
    recipe = recipe or (BaseRecipe.gpu() if device.startswith("cuda") else BaseRecipe.cpu())

    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    if resume and (ckpt_dir / "state.json").is_file():
        tensors, meta = _load_checkpoint(ckpt_dir)
        stored = meta["recipe"]
        recipe = BaseRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
        say(f"resuming from {ckpt_dir} (phase {meta['phase']}, step {meta['step']})")
    else:
        if out.exists() and not out.is_dir():
            raise PerfusionError(f"--out {out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            hint = " (it holds a checkpoint: pass --resume to continue)" if ckpt_dir.is_dir() else ""
            raise PerfusionError(f"--out {out}: folder is not empty{hint}; pass --force to overwrite")
        if ckpt_dir.is_dir():
            shutil.rmtree(ckpt_dir)
    if minutes is None and (recipe.vae_steps is None or recipe.joint_steps is None):
        raise PerfusionError("without a time budget, set both vae_steps and joint_steps")
    if minutes is not None and minutes <= 0:
        raise PerfusionError(f"--minutes must be positive, got {minutes}")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(recipe.seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    joint_bf16 = cuda and recipe.mixed_precision
    vae_bf16 = joint_bf16 or (not cuda and recipe.cpu_bf16_vae and cpu_has_bf16())
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=joint_bf16)
    vae_amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=vae_bf16)
    precision = {"vae": "bf16 autocast" if vae_bf16 else "fp32", "joint": "bf16 autocast" if joint_bf16 else "fp32"}
    workers = _workers(recipe, device)
    pool = worker_pool(workers) if workers > 0 else None
    if pool is not None:  # start the processes (and their background banks) while the models are built
        for i in range(workers):
            pool.submit(_world_batch, (2, (recipe.seed, 0, i)))
    try:
        return _run(out, ckpt_dir, minutes, device, recipe, tensors, meta, say, prog, t_start, cuda, amp, vae_amp,
                    precision, workers, pool, keep_checkpoint, init)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _run(out, ckpt_dir, minutes, device, recipe, tensors, meta, say, prog, t_start, cuda, amp, vae_amp, precision,
         workers, pool, keep_checkpoint, init=None) -> dict:
    tokenizer = load_tokenizer(recipe.max_length)
    vocab = vocabulary_check(tokenizer)
    vae, text_encoder, unet = build_models(recipe, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    if tensors:
        vae.load_state_dict(_unprefixed("vae", tensors))
        text_encoder.load_state_dict(_unprefixed("text", tensors))
        unet.load_state_dict(_unprefixed("unet", tensors))
    elif init is not None:
        load_weights(init, vae, text_encoder, unet)
        say(f"starting from the weights of {init}")
    vae.to(device)
    text_encoder.to(device)
    unet.to(device)

    total_budget = None if minutes is None else minutes * 60.0
    vae_budget = None if total_budget is None else total_budget * recipe.vae_fraction
    report: dict = meta.get("report") or {"vae": {"history": []}, "joint": {"loss_history": []}}
    if init is not None and not tensors:
        report["init"] = _init_record(init)
    last_ckpt = time.perf_counter()

    def checkpoint(phase: str, step: int, extra: dict[str, torch.Tensor], opt_meta: dict, clocks: dict,
                   data_position: int | None = None):
        t = dict(_prefixed("vae", vae.state_dict()), **_prefixed("text", text_encoder.state_dict()),
                 **_prefixed("unet", unet.state_dict()), **extra)
        _save_checkpoint(ckpt_dir, t, {"phase": phase, "step": step, "recipe": asdict(recipe), "optim": opt_meta,
                                       "clocks": clocks, "report": report, "minutes": minutes,
                                       "data_position": step if data_position is None else data_position})

    # ---------------------------------------------------------------- phase 1: VAE
    phase = meta.get("phase", "vae")
    vae_clock = _Clock(meta.get("clocks", {}).get("vae", 0.0))
    if phase == "vae":
        step = int(meta.get("step", 0))
        opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        if tensors and "optim" in meta:
            _load_optim(opt, tensors, meta["optim"], "opt_vae")
        evals, ev_imgs = _vae_eval_plan(recipe)
        while evals and evals[0] <= _phase_progress(step, recipe.vae_steps, vae_clock(), vae_budget):
            evals.pop(0)  # resumed: already measured
        data = DeviceBatches(
            Batches(recipe.vae_batch, recipe.seed, STREAM_VAE, start=int(meta.get("data_position", step)),
                    workers=workers, pool=pool),
            device, replay=recipe.replay_batches, seed=int(np.random.SeedSequence([recipe.seed, 1, step])
                                                           .generate_state(1)[0]))
        vae.train()
        running = torch.zeros((), device=device)
        n_run = 0
        say(f"VAE: batch {recipe.vae_batch}, {'%d steps' % recipe.vae_steps if recipe.vae_steps else ''}"
            f"{' within ' if recipe.vae_steps and vae_budget else ''}"
            f"{'%.0f s' % vae_budget if vae_budget else ''}, device {device}, {workers} data workers")
        try:
            while not _done(step, recipe.vae_steps, vae_clock(), vae_budget):
                images, _ = next(data)
                p = _phase_progress(step, recipe.vae_steps, vae_clock(), vae_budget)
                lr = recipe.vae_lr * lr_factor(step, recipe.vae_warmup, p, recipe.min_lr_ratio)
                for gr in opt.param_groups:
                    gr["lr"] = lr
                x = as_float(images)
                g = _step_generator(device, recipe.seed, 1, step)
                with vae_amp:
                    post = vae.encode(x).latent_dist
                    z = post.sample(generator=g)
                    y = vae.decode(z).sample.float()
                loss = _vae_loss(recipe, x, y, post)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), recipe.grad_clip)
                opt.step()
                step += 1
                running += loss.detach()
                n_run += 1
                if recipe.checkpoint_minutes and time.perf_counter() - last_ckpt > 60 * recipe.checkpoint_minutes:
                    ts, om = _optim_tensors(opt, "opt_vae")
                    checkpoint("vae", step, ts, om, {"vae": vae_clock()}, data.position)
                    last_ckpt = time.perf_counter()
                if step % recipe.log_every == 0 or step == 1:
                    lv = float(running) / n_run
                    running.zero_()
                    n_run = 0
                    prog(Progress("vae", step, recipe.vae_steps, vae_clock(), vae_budget, lv, lr,
                                  _last_psnr(report)))
                if evals and _phase_progress(step, recipe.vae_steps, vae_clock(), vae_budget) >= evals[0]:
                    evals.pop(0)
                    vae.eval()
                    v = psnr(ev_imgs[0], reconstruct(vae, ev_imgs[0], device), ev_imgs[1])
                    vae.train()
                    report["vae"]["history"].append([step, round(vae_clock(), 1), round(v, 2)])
        finally:
            data.close()
        vae.eval()
        report["vae"]["fresh_batches"] = report["vae"].get("fresh_batches", 0) + data.fresh
        report["vae"]["replayed_batches"] = report["vae"].get("replayed_batches", 0) + data.replayed
        report["vae"]["steps"] = step
        report["vae"]["images_seen"] = step * recipe.vae_batch
        report["vae"]["seconds"] = round(vae_clock(), 1)
        report["vae"]["steps_per_s"] = round(step / max(vae_clock(), 1e-9), 3)
        prog(Progress("vae", step, recipe.vae_steps, vae_clock(), vae_budget, float("nan"), 0.0, "evaluating"))
        # latent statistics -> scaling factor
        gen_imgs, _ = general_set(recipe.eval_images, recipe.seed)
        with torch.no_grad():
            zs = []
            for s in range(0, len(gen_imgs), 64):
                d = vae.encode(_to_tensor(gen_imgs[s:s + 64], device)).latent_dist
                zs.append(d.sample(generator=_step_generator(device, recipe.seed, 9, s)).float().cpu())
            zs = torch.cat(zs)
        report["vae"]["latent_mean"] = round(float(zs.mean()), 4)
        report["vae"]["latent_std"] = round(float(zs.std()), 4)
        report["vae"]["scaling_factor"] = float(1.0 / zs.std())
        phase, step = "joint", 0
        checkpoint("joint", 0, {}, {}, {"vae": vae_clock(), "joint": 0.0})
        last_ckpt = time.perf_counter()
        tensors, meta = {}, {}
    vae.eval().requires_grad_(False)
    scaling = float(report["vae"]["scaling_factor"])

    # ---------------------------------------------------------------- phase 2: text encoder + UNet
    from diffusers import DDPMScheduler

    vae_seconds = float(report["vae"]["seconds"])
    joint_budget = None if total_budget is None else max(total_budget - vae_seconds, 1.0)
    joint_clock = _Clock(meta.get("clocks", {}).get("joint", 0.0) if meta else 0.0)
    step = int(meta.get("step", 0)) if meta else 0
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    acp = noise_sched.alphas_cumprod.to(device)
    params = [{"params": list(unet.parameters()), "lr": recipe.unet_lr, "base": recipe.unet_lr},
              {"params": list(text_encoder.parameters()), "lr": recipe.text_lr, "base": recipe.text_lr}]
    opt = torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=recipe.weight_decay)
    ema = None
    if recipe.ema_decay > 0:
        ema = EMA(list(unet.parameters()) + list(text_encoder.parameters()), recipe.ema_decay)
    if tensors and meta.get("optim"):
        _load_optim(opt, tensors, meta["optim"], "opt_joint")
        if ema is not None:
            for i, s in enumerate(ema.shadow):
                s.copy_(tensors[f"ema.{i}"].to(s.device))
    unet.train()
    text_encoder.train()
    all_params = [p for gr in params for p in gr["params"]]
    data = DeviceBatches(
        Batches(recipe.joint_batch, recipe.seed, STREAM_JOINT,
                start=int(meta.get("data_position", step)) if meta else step, workers=workers, pool=pool),
        device, tokenizer, recipe.max_length, replay=recipe.replay_batches,
        seed=int(np.random.SeedSequence([recipe.seed, 2, step]).generate_state(1)[0]))
    empty_ids = tokenizer([""], padding="max_length", max_length=recipe.max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
    running = torch.zeros((), device=device)
    n_run = 0
    say(f"text encoder + UNet: batch {recipe.joint_batch}, "
        f"{'%d steps' % recipe.joint_steps if recipe.joint_steps else ''}"
        f"{' within ' if recipe.joint_steps and joint_budget else ''}"
        f"{'%.0f s' % joint_budget if joint_budget else ''}, EMA {recipe.ema_decay or 'off'}")
    try:
        while not _done(step, recipe.joint_steps, joint_clock(), joint_budget):
            images, ids = next(data)
            p = _phase_progress(step, recipe.joint_steps, joint_clock(), joint_budget)
            f = lr_factor(step, recipe.joint_warmup, p, recipe.min_lr_ratio)
            for gr in opt.param_groups:
                gr["lr"] = gr["base"] * f
            g = _step_generator(device, recipe.seed, 2, step)
            gc = _step_generator("cpu", recipe.seed, 2, step)
            drop = torch.rand(len(ids), generator=gc) < recipe.empty_prompt_p   # captions emptied for CFG
            ids = torch.where(drop.to(device)[:, None], empty_ids, ids)
            x = as_float(images)
            with torch.no_grad(), vae_amp:
                z = vae.encode(x).latent_dist.sample(generator=g).float() * scaling
            noise = torch.randn(z.shape, generator=g, device=device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),), generator=g, device=device)
            a = acp[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * z + (1 - a).sqrt() * noise
            with amp:
                enc = text_encoder(ids)[0]
                pred = unet(noisy, t, encoder_hidden_states=enc).sample
            err = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
            if recipe.min_snr_gamma:
                snr = acp[t] / (1 - acp[t])
                err = err * torch.clamp(snr, max=recipe.min_snr_gamma) / snr
            loss = err.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(all_params, recipe.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(step)
            step += 1
            running += loss.detach()
            n_run += 1
            if recipe.checkpoint_minutes and time.perf_counter() - last_ckpt > 60 * recipe.checkpoint_minutes:
                ts, om = _optim_tensors(opt, "opt_joint")
                if ema is not None:
                    ts.update({f"ema.{i}": s for i, s in enumerate(ema.shadow)})
                checkpoint("joint", step, ts, om, {"vae": vae_seconds, "joint": joint_clock()}, data.position)
                last_ckpt = time.perf_counter()
            if step % recipe.log_every == 0 or step == 1:
                lv = float(running) / n_run
                running.zero_()
                n_run = 0
                report["joint"]["loss_history"].append([step, round(joint_clock(), 1), round(lv, 5)])
                prog(Progress("joint", step, recipe.joint_steps, joint_clock(), joint_budget, lv,
                              opt.param_groups[0]["lr"]))
    finally:
        data.close()
    report["joint"]["fresh_batches"] = report["joint"].get("fresh_batches", 0) + data.fresh
    report["joint"]["replayed_batches"] = report["joint"].get("replayed_batches", 0) + data.replayed
    report["joint"]["steps"] = step
    report["joint"]["images_seen"] = step * recipe.joint_batch
    report["joint"]["seconds"] = round(joint_clock(), 1)
    report["joint"]["steps_per_s"] = round(step / max(joint_clock(), 1e-9), 3)
    hist = report["joint"]["loss_history"]
    tail = [h[2] for h in hist[-max(1, len(hist) // 10):]]
    report["joint"]["final_loss"] = round(float(np.mean(tail)), 5) if tail else None
    if ema is not None:
        ema.copy_to()
    unet.eval()
    text_encoder.eval()
    train_seconds = vae_seconds + joint_clock()

    # ---------------------------------------------------------------- finish: save, reload, evaluate
    t_fin = time.perf_counter()
    prog(Progress("finish", 0, 4, 0.0, None, info="saving"))
    size = save_pipeline(out, vae, text_encoder, unet, tokenizer, scaling)
    del vae, text_encoder, unet, opt, ema
    if cuda:
        torch.cuda.empty_cache()
    prog(Progress("finish", 1, 4, time.perf_counter() - t_fin, None, info="reloading"))
    pipe = load_pipeline(out, device)
    dtypes = saved_dtypes(out)
    prog(Progress("finish", 2, 4, time.perf_counter() - t_fin, None, info="measuring"))
    n_eval = recipe.eval_images
    gen_imgs, _ = general_set(n_eval, recipe.seed)
    pat_imgs, pat_masks = patterned_set(n_eval, recipe.seed)
    car_imgs, car_masks = striped_cars(max(8, n_eval // 4), recipe.seed)
    rec_pat = reconstruct(pipe.vae, pat_imgs, device)
    rec_car = reconstruct(pipe.vae, car_imgs, device)
    report["vae"].update({
        "psnr_general": round(psnr(gen_imgs, reconstruct(pipe.vae, gen_imgs, device)), 2),
        "psnr_patterned": round(psnr(pat_imgs, rec_pat), 2),
        "psnr_patterned_object": round(psnr(pat_imgs, rec_pat, pat_masks), 2),
        "psnr_striped_cars": round(psnr(car_imgs, rec_car), 2),
        "psnr_striped_cars_object": round(psnr(car_imgs, rec_car, car_masks), 2),
        "eval_images": n_eval,
        "goal_db": 26.0,
    })
    report["text_encoder"] = {"gate_leak": gate_leak(pipe.text_encoder, pipe.tokenizer, device,
                                                     recipe.leak_captions, recipe.seed),
                              "multi_piece_words": vocab["multi_piece"]}
    prog(Progress("finish", 3, 4, time.perf_counter() - t_fin, None, info="sampling"))
    truth, captions, _ = tw.sample(recipe.sample_prompts, seed=(recipe.seed, STREAM_SAMPLES, 0))
    made = render_samples(pipe, captions, recipe.sample_steps, recipe.sample_cfg, recipe.seed, device)
    from PIL import Image

    Image.fromarray(sample_sheet(truth, made)).save(out / "samples.png")
    (out / "samples.txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)), encoding="utf-8")
    recon_sheet = tw.grid(np.concatenate([pat_imgs[:8], rec_pat[:8], car_imgs[:8], rec_car[:8]]), 8, scale=2)
    Image.fromarray(recon_sheet).save(out / "reconstructions.png")
    prog(Progress("finish", 4, 4, time.perf_counter() - t_fin, None, info="done"))

    report.update({
        "format": "perfusion toyworld base model report v1",
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "minutes": minutes,
        "precision": precision,
        "recipe": asdict(recipe),
        "params": {"vae": param_count(pipe.vae), "text_encoder": param_count(pipe.text_encoder),
                   "unet": param_count(pipe.unet)},
        "weights_bytes": size,
        "weights_dtypes": dtypes,
        "time": {"train_s": round(train_seconds, 1), "finish_s": round(time.perf_counter() - t_fin, 1),
                 "session_s": round(time.perf_counter() - t_start, 1)},
        "samples": {"file": "samples.png", "captions": captions, "steps": recipe.sample_steps,
                    "cfg": recipe.sample_cfg,
                    "layout": "rows alternate: world renders of 8 captions, then the model's renders of them"},
        "reconstructions": "reconstructions.png (rows: patterned scenes, their VAE round trip, striped cars, "
                           "their round trip)",
    })
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(report), encoding="utf-8")
    if not keep_checkpoint and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir)
    return report


def load_weights(folder, vae, text_encoder, unet) -> None:
    """Copy the weights of a saved pipeline folder into fresh models of the same shapes (fp16 -> fp32)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for part, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        files = sorted((folder / part).glob("*.safetensors"))
        if not files:
            raise PerfusionError(f"--init {folder}: no {part}/*.safetensors (not a saved pipeline folder)")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        own = model.state_dict()
        bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state and not k.endswith("position_ids")]
        if bad or missing:
            raise PerfusionError(f"--init {folder}: its {part} does not match this recipe's shapes "
                                 f"({len(bad)} tensors differ, {len(missing)} missing); use the same recipe")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=False)


def _init_record(folder) -> dict:
    folder = Path(folder)
    rec = {"folder": str(folder)}
    try:
        r = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        rec.update({"train_s": r.get("time", {}).get("train_s"), "vae_steps": r.get("vae", {}).get("steps"),
                    "joint_steps": r.get("joint", {}).get("steps"), "device_name": r.get("device_name"),
                    "previous_init": r.get("init")})
    except (OSError, ValueError):
        pass
    return rec


def _vae_loss(r: BaseRecipe, x: torch.Tensor, y: torch.Tensor, post) -> torch.Tensor:
    d = y - x
    loss = r.vae_l1 * d.abs().mean() + r.vae_l2 * d.pow(2).mean()
    if r.vae_edge:
        gx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
        gy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
        loss = loss + r.vae_edge * (gx.abs().mean() + gy.abs().mean())
    if r.vae_kl:
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        loss = loss + r.vae_kl * kl.mean()
    return loss


def _vae_eval_plan(r: BaseRecipe):
    if r.vae_eval_points <= 0:
        return [], None
    imgs, masks = patterned_set(min(64, r.eval_images), r.seed + 1)
    return [(i + 1) / r.vae_eval_points for i in range(r.vae_eval_points)], (imgs, masks)


def _last_psnr(report: dict) -> str:
    h = report["vae"]["history"]
    return f"patterned-object PSNR {h[-1][2]:.1f} dB" if h else ""


def _init_line(report: dict) -> str:
    i = report.get("init")
    if not i:
        return ""
    prev = f" ({i['vae_steps']} VAE + {i['joint_steps']} joint steps, {i['train_s']:.0f} s on {i['device_name']})" \
        if i.get("train_s") is not None else ""
    return f"Continued from the weights of an earlier run{prev}: the steps above are this run's only.\n"


def _replay_line(report: dict) -> str:
    v, j = report["vae"], report["joint"]
    if not (v.get("replayed_batches") or j.get("replayed_batches")):
        return ""
    return (f"Fresh world batches / replayed ones (a step replays a recent batch with new noise when the CPU renderer "
            f"has none ready): VAE {v.get('fresh_batches', 0)} / {v.get('replayed_batches', 0)}, joint "
            f"{j.get('fresh_batches', 0)} / {j.get('replayed_batches', 0)}.\n")


def model_card(report: dict) -> str:
    """The README.md written into the model folder."""
    r, v, j = report["recipe"], report["vae"], report["joint"]
    p = report["params"]
    leak = report["text_encoder"]["gate_leak"]
    multi = report["text_encoder"]["multi_piece_words"]
    hist = ", ".join(f"{h[2]:.1f} dB @ {h[0]}" for h in v.get("history", [])) or "none"
    return f"""# toyworld base model (trained by `perfusion toyworld train-base`)

A complete `diffusers` `StableDiffusionPipeline` folder (fp16 safetensors, {report['weights_bytes'] / 1e6:.1f} MB of
weights), trained from scratch on the procedural toy world (`perfusion_cli/toyworld/world.py`). Load it like
any Stable Diffusion checkpoint and render at 64x64:

    StableDiffusionPipeline.from_pretrained(FOLDER, safety_checker=None)
    pipe("a red striped cat on a beach", height=64, width=64, num_inference_steps=30, guidance_scale=4)

## What it is
- tokenizer: the toy CLIP BPE tokenizer of toyworld-v0 and v1 (8,514 tokens, {r['max_length']} positions); words that
  are more than one token: {', '.join(f"{w} ({'+'.join(t)})" for w, t in multi.items()) or 'none'}
- text encoder: `CLIPTextModel`, hidden {r['text_hidden']}, {r['text_layers']} layers, {p['text_encoder'] / 1e6:.2f}M parameters
- VAE: `AutoencoderKL` 64x64x3 -> 16x16x{r['latent_channels']}, widths {tuple(r['vae_channels'])}, {p['vae'] / 1e6:.2f}M parameters,
  scaling factor {v['scaling_factor']:.4f} (1 / std of the latents; in its config)
- UNet: `UNet2DConditionModel`, widths {tuple(r['unet_channels'])}, cross-attention dim {r['text_hidden']}, {p['unet'] / 1e6:.2f}M parameters
- scheduler: DDIM, Stable Diffusion's betas (scaled_linear 0.00085-0.012, 1000 steps), epsilon prediction

## How it was trained
Device: {report['device_name']} ({report['device']}); training budget {report['minutes']} min; trained
{report['time']['train_s']:.0f} s (VAE {v['seconds']:.0f} s, joint {j['seconds']:.0f} s), then
{report['time']['finish_s']:.0f} s to save, check and evaluate.
1. VAE: {v['steps']} steps at batch {r['vae_batch']} (lr {r['vae_lr']} with {r['vae_warmup']} warmup steps, cosine),
   L1 + L2 + {r['vae_edge']} x edge + {r['vae_kl']} x KL.
2. Text encoder + UNet jointly, VAE frozen: {j['steps']} steps at batch {r['joint_batch']} (lr {r['unet_lr']} / {r['text_lr']},
   {r['joint_warmup']} warmup steps, cosine), {r['empty_prompt_p']:.0%} empty prompts (classifier-free guidance),
   min-SNR gamma {r['min_snr_gamma']}, EMA {r['ema_decay'] or 'off'}. Final loss {j['final_loss']}.
Precision: VAE phase {report['precision']['vae']}, joint phase {report['precision']['joint']}.
{_init_line(report)}{_replay_line(report)}
Seed {r['seed']}; the full recipe is in `report.json`.

## Measured
| VAE round trip (held out) | PSNR |
| --- | --- |
| general scenes | {v['psnr_general']:.2f} dB |
| scenes with a striped / spotted / checked object | {v['psnr_patterned']:.2f} dB |
| ... the patterned object's pixels only | {v['psnr_patterned_object']:.2f} dB |
| striped cars | {v['psnr_striped_cars']:.2f} dB |
| ... the car's pixels only | {v['psnr_striped_cars_object']:.2f} dB |

Goal: >= 26 dB on patterned objects. PSNR trend during VAE training (patterned-object pixels, 64 images): {hist}.
`reconstructions.png`: patterned scenes and their round trip, striped cars and theirs.

Gate leak of the text encoder (Perfusion's score s(e) = e^T C^-1 i / i^T C^-1 i of the tokens after an object
word, i = that word's encoding; the gate opens near s = 0.7): mean {leak['following_mean']}, 95th percentile
{leak['following_p95']}, share above 0.5 {leak['following_above_0.5']}; padding positions mean {leak['padding_mean']}.

## Samples
`samples.png`: rows alternate between world renders of 8 held-out captions and this model's renders of the
same captions ({report['samples']['steps']} DDIM steps, CFG {report['samples']['cfg']}); captions in `samples.txt`.
"""
