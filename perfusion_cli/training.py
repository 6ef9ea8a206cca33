"""Learn a concept: photos → cached latents → the Perfusion training loop → ConceptTensors.

What is trained (PERFUSION.md §5): the concept token's embedding (one per text encoder) and o*_V in
every cross-attention layer. What is not: everything else. i* is an EMA of the concept's encoding,
o*_K = W_K i_super is locked (§4; `TrainConfig.lock_keys=False` trains it too: the paper's ablation).
The forward pass is the same gated rank-1 edit the renderer uses (patch.attach + edit.layer_edit), so
training and inference cannot disagree (the paper's point).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from . import patch as patching
from .concept import Concept, now
from .edit import ConceptTensors, concept_inputs
from .errors import PerfusionError
from .images import PhotoSet, load_masks
from .text import EmbeddingOverride, encode, rewrite, text_stack, word_ids, written_as

DEFAULT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}", "a rendition of the {}",
    "a photo of the nice {}", "a good photo of a {}", "a photo of the small {}", "a photo of the large {}",
]


@dataclass
class TrainConfig:
    steps: int = 400              # optimiser steps (§6)
    batch_size: int = 4           # images per forward pass
    grad_accum: int = 4           # forward passes per optimiser step: 4 × 4 = the paper's batch 16 (§6)
    lr_embedding: float = 6e-3    # AdamW learning rate of the token embedding (§6)
    embedding_max_ratio: float | None = None  # not in the paper, an experiment (library only): after each step,
                                  # scale the embedding back to at most this many times a typical word's norm (the
                                  # vocabulary's median row). On the toy world it did worse than a lower lr
                                  # (docs/benchmarks/README.md, "The embedding learning rate"); None: no limit
    lr_value: float = 3e-2        # AdamW learning rate of o*_V (§6)
    weight_decay: float = 0.0     # AdamW weight decay (targets and embeddings are not regularised)
    train_beta: float = 0.75      # gate bias during training (§6)
    train_tau: float = 0.1        # gate temperature during training (§6)
    render_beta: float = 0.7      # default gate bias stored for rendering (§7)
    render_tau: float = 0.15      # default gate temperature stored for rendering (§7)
    ema: float = 0.99             # i* ← ema·i* + (1 − ema)·mean e_concept (§5)
    flip: bool = True             # horizontal flips (both flips' latents are cached)
    mask: str = "none"            # none | attention | a folder of masks (§6: loss weighted by a soft mask)
    seed: int = 0
    checkpoint_every: int = 50    # steps between resumable checkpoints (0: never)
    validate_every: int = 0       # steps between validation renders (0: never)
    templates: list[str] = field(default_factory=list)  # "{}" is the concept; empty: the profile's or defaults
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    lock_keys: bool = True        # o*_K = W_K i_super, never trained (§4). False: the paper's ablation (worse):
                                  # o*_K starts there and is trained with o*_V's learning rate, in its AdamW group;
                                  # the concept file then stores the trained o*_K
    gate_scope: str = "prompt"    # where the edit acts while training: "prompt", every token whose encoding opens
                                  # the gate (§2, the paper); "word", only the concept word's tokens (§11c)
    class_noun: bool = False      # not the paper's (an experiment, §11d): the prompt keeps the supercategory after
                                  # the concept's token ("a <mycat> cat"), as DreamBooth's prompts do; False: the
                                  # token takes the word's place (the paper). Rendering follows what was trained
    compile: bool = False         # torch.compile the UNet: its first step compiles (~1 min on a GPU; inductor
                                  # caches it on disk for later runs), later steps run faster (bench speed --compile)
    compile_mode: str = "auto"    # torch.compile's mode: auto | default | max-autotune-no-cudagraphs |
                                  # max-autotune | reduce-overhead (the last two replay CUDA graphs on a GPU).
                                  # auto: reduce-overhead on CUDA (fastest measured, docs/benchmarks), else default


# TrainConfig fields added after checkpoints were first written: a checkpoint without one was made with this value
_CONFIG_ADDED = {"lock_keys": True, "embedding_max_ratio": None, "gate_scope": "prompt", "class_noun": False}


COMPILE_MODES = ("auto", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def training_autocast(device: torch.device, dtype: torch.dtype) -> dict:
    """torch.autocast arguments for a training step on a frozen model of this dtype: bf16 autocast for fp16 weights
    on CUDA (fp16's range is too narrow for unscaled gradients); bf16 and fp32 weights run natively, with no casts
    (bf16: as diffusers' textual-inversion script runs its frozen UNet). The trainable tensors stay fp32 always."""
    return dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and dtype == torch.float16)


# torch.compile modes that record the compiled UNet as CUDA graphs (on a CUDA device)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_compile_mode(mode: str, device: torch.device, gradient_checkpointing: bool = False) -> str:
    """The torch.compile mode `auto` stands for: CUDA graphs (reduce-overhead) on a CUDA device, where they took a
    compiled SD 1.5 step from ~130 to 116 ms (docs/benchmarks/README.md); inductor's default elsewhere, and with
    gradient checkpointing (CUDA graphs around recomputed activations were never measured). Others pass through."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and not gradient_checkpointing else "default"


def mark_step(compile_mode: str | None) -> None:
    """Tell torch a new training step begins, so a CUDA-graphed UNet may reuse the memory of the last step's
    outputs (their backward is done). Without it, cudagraph trees cannot tell a new step from a second forward in
    the same one. A no-op for eager and non-CUDA-graph modes."""
    if compile_mode in CUDAGRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def compiled_unet(unet: torch.nn.Module, mode: str = "default") -> Callable:
    """torch.compile of a UNet for training steps, the Perfusion wrappers included (patch.prime_stacked keeps
    them traceable: one graph, no recompiles from step to step). The module itself is not changed; dynamo's
    cache of the compiled code lives on for the next Trainer on the same UNet."""
    return torch.compile(unet, mode=mode, dynamic=False)


# TrainConfig fields a base model's profile may set in its `train:` section (registry/profiles/*.yaml): a recipe
# tuned for that model, used where the user gives no value (a command-line option always wins)
PROFILE_FIELDS = ("steps", "batch_size", "grad_accum", "lr_embedding", "lr_value", "train_beta", "train_tau",
                  "render_beta", "render_tau")


def config_for(profile_train: dict | None, **fields) -> TrainConfig:
    """TrainConfig from TrainConfig's defaults, then the profile's `train:` values, then `fields` (None values
    are left out: "not given")."""
    prof = {k: v for k, v in (profile_train or {}).items() if k in PROFILE_FIELDS}
    given = {k: v for k, v in fields.items() if v is not None}
    return TrainConfig(**{**prof, **given})


# A learned embedding this many times the norm of a typical word's is a sign the concept will bleed into the rest of
# a prompt: later tokens of a causal text encoder carry it, and the gate opens on them too (PERFUSION.md §11b)
INFLATED_EMBEDDING = 3.0


def typical_word_norms(pipe) -> list[float]:
    """Per text encoder, the median norm of its token-embedding table's rows: what a word's embedding measures."""
    return [float(enc.get_input_embeddings().weight.detach().float().norm(dim=1).median())
            for _, enc in text_stack(pipe)]


def embedding_norm_ratio(pipe, embeddings: list[torch.Tensor]) -> float:
    """max over text encoders of |learned embedding| / median |row| of that encoder's token-embedding table."""
    ratios = [float(e.detach().float().norm().cpu()) / t for t, e in zip(typical_word_norms(pipe), embeddings)]
    return round(max(ratios), 3) if ratios else 0.0


@torch.no_grad()
def limit_norms(embeddings, limits: list[float]) -> None:
    """Scale each embedding in place onto the ball of its limit's radius if it lies outside (a projection: the
    direction is kept); those inside are left as they are."""
    for e, r in zip(embeddings, limits):
        n = float(e.float().norm())
        if n > r:
            e.mul_(r / n)


@dataclass
class Progress:
    step: int
    steps: int
    loss: float


def check_config(cfg: TrainConfig) -> None:
    def bad(msg):
        raise PerfusionError(msg)

    if cfg.steps <= 0:
        bad(f"--steps must be a positive number of steps, got {cfg.steps}")
    if cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        bad("--batch-size and --grad-accum must be positive")
    if not (cfg.lr_embedding > 0 and cfg.lr_value > 0):
        bad("learning rates must be positive")
    if cfg.embedding_max_ratio is not None and not cfg.embedding_max_ratio > 0:
        bad(f"embedding_max_ratio must be a positive multiple of a word's norm, got {cfg.embedding_max_ratio}")
    for label, b in (("--train-beta", cfg.train_beta), ("--beta", cfg.render_beta)):
        if not (0.0 <= b <= 1.0):
            bad(f"{label} must be between 0 and 1 (a similarity threshold), got {b}")
    for label, t in (("--train-tau", cfg.train_tau), ("--tau", cfg.render_tau)):
        if not (0.0 < t <= 1.0):
            bad(f"{label} must be in (0, 1], got {t}")
    if cfg.gate_scope not in ("prompt", "word"):
        bad(f"--gate-scope {cfg.gate_scope!r} is not one of prompt, word")
    if cfg.compile_mode not in COMPILE_MODES:
        bad(f"--compile-mode {cfg.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if not (0.0 <= cfg.ema < 1.0):
        bad(f"EMA factor must be in [0, 1), got {cfg.ema}")
    for t in cfg.templates:
        if t.count("{}") != 1:
            bad(f"template {t!r} must contain exactly one {{}} where the concept goes")


@dataclass
class TrainState:
    """Everything that changes during training; checkpointed as safetensors (no pickle)."""

    embeddings: list[torch.nn.Parameter]       # one (d_k,) per text encoder, fp32
    value_targets: dict[str, torch.nn.Parameter]  # layer -> (m,) o*_V, fp32
    key_targets: dict[str, torch.Tensor]       # layer -> (m,) o*_K: locked; an nn.Parameter when lock_keys=False
    i_star: torch.Tensor                       # (d,) EMA of the concept's encodings
    i_super: torch.Tensor                      # (d,) the supercategory's encoding
    step: int = 0


class Trainer:
    """One concept's training run on a loaded base model (models.BaseModel)."""

    def __init__(self, base, name: str, supercategory: str, C_inv: torch.Tensor, cfg: TrainConfig):
        check_config(cfg)
        self.base, self.pipe = base, base.pipe
        self.name, self.super = name, supercategory
        self.words = {name: written_as(supercategory, cfg.class_noun)}   # what the pipeline reads for the name
        self.cfg = cfg
        self.device = base.device
        self.C_inv = C_inv.to(self.device)
        self.templates = cfg.templates or base.profile.templates or DEFAULT_TEMPLATES
        self.prompts = [t.format(name) for t in self.templates]
        self.rng = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.py_rng = random.Random(cfg.seed)
        for module in (self.pipe.unet, self.pipe.vae, *[enc for _, enc in text_stack(self.pipe)]):
            module.requires_grad_(False)
            module.eval()
        self.layers = patching.cross_attention_layers(self.pipe.unet)  # built once, used every step
        # the torch.compile mode this run uses (None: eager)
        self.compile_mode = (resolve_compile_mode(cfg.compile_mode, self.device, cfg.gradient_checkpointing)
                             if cfg.compile else None)
        self.unet = compiled_unet(self.pipe.unet, self.compile_mode) if self.compile_mode else self.pipe.unet
        self.autocast = training_autocast(self.device, base.dtype)

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def cache_latents(self, photos: PhotoSet) -> None:
        """VAE latents of every photo and its mirror image, computed once.

        The posterior mean is used, not a sample: SD's VAE has a tiny posterior std, but smaller VAEs
        (the toy model's std is ~0.65 against a latent std of ~0.9) would drown the photo in noise
        the UNet never saw in its own training.
        """
        vae = self.pipe.vae
        px = photos.pixels
        if self.cfg.flip:
            px = torch.cat([px, px.flip(-1)])
        means = [vae.encode(chunk.to(self.device, vae.dtype)).latent_dist.mean.float() for chunk in px.split(8)]
        self.lat_mean = torch.cat(means)
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.n_photos = photos.pixels.shape[0]
        self.masks = None

    def set_masks(self, masks: torch.Tensor | None) -> None:
        """(N, h, w) soft masks at latent size (flipped copies are made here), or None."""
        if masks is None:
            self.masks = None
            return
        m = masks.float().to(self.device)
        if self.cfg.flip:
            m = torch.cat([m, m.flip(-1)])
        m = 0.1 + 0.9 * m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)  # keep a little background
        self.masks = m / m.mean(dim=(1, 2), keepdim=True)  # normalised per image, not per row (§11)

    def mask_from_folder(self, folder: str | Path, photos: PhotoSet) -> torch.Tensor:
        return load_masks(folder, photos.paths, self.lat_mean.shape[-1])

    # -- model pieces ---------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        enc = encode(self.pipe, [rewrite(p, self.words) for p in prompts], self.device)
        return enc.embeds, enc.pooled

    def concept_mask(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) bool: where the concept sits in each prompt's tokens."""
        rows = []
        for p in prompts:
            idx = self.prompts.index(p)
            rows.append(self.slot_masks[idx])
        return torch.stack(rows).to(self.device)

    def unet_kwargs(self, pooled: torch.Tensor | None, batch: int) -> dict:
        if pooled is None or getattr(self.pipe.unet.config, "addition_embed_type", None) != "text_time":
            return {}
        r = self.base.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=self.device, dtype=pooled.dtype).repeat(batch, 1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    # -- the run --------------------------------------------------------------------------
    @torch.no_grad()
    def init_state(self) -> TrainState:
        """Embeddings from the supercategory word, i_super from a first batch, o*_K/o*_V = W i_super."""
        embeddings = []
        for tok, enc in text_stack(self.pipe):
            (sid,) = word_ids(tok, self.super)
            w = enc.get_input_embeddings().weight[sid].detach().float().clone()
            embeddings.append(torch.nn.Parameter(w))
        # The override is already installed with these same vectors, so this first batch reads the
        # supercategory's own embedding: its encodings at the concept's positions are i_super.
        first = self.prompts[: max(1, min(len(self.prompts), self.cfg.batch_size * self.cfg.grad_accum))]
        e, _ = self.encode(first)
        i_super = e.float()[self.concept_mask(first)].mean(0)
        key_targets, value_targets = {}, {}
        for name, attn in patching.cross_attention_layers(self.pipe.unet).items():
            wk = patching.projection_weight(attn.to_k).float()
            wv = patching.projection_weight(attn.to_v).float()
            key_targets[name] = (wk @ i_super).detach()
            if not self.cfg.lock_keys:   # the ablation: o*_K starts where key-locking would hold it
                key_targets[name] = torch.nn.Parameter(key_targets[name].clone())
            value_targets[name] = torch.nn.Parameter((wv @ i_super).detach().clone())
        return TrainState(embeddings, value_targets, key_targets, i_super.clone(), i_super.clone())

    def fit(
        self,
        photos: PhotoSet,
        progress: Callable[[Progress], None] | None = None,
        workdir: Path | None = None,
        resume: bool = False,
        validate: Callable[[int, ConceptTensors, list], None] | None = None,
    ) -> Concept:
        cfg, pipe, unet = self.cfg, self.pipe, self.pipe.unet
        self.cache_latents(photos)
        checkpointing = cfg.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing")
        if checkpointing:
            unet.enable_gradient_checkpointing()
        override = EmbeddingOverride(pipe)
        patch = patching.attach(unet)
        # W_K, W_V of every layer in float32, stacked: built once per run, not per step
        self.stacked_weights, self.stacked_slices = patching.stack_weights(unet, self.layers)
        try:
            for p in self.prompts:
                if override.add_prompt(p, self.words) == 0:
                    raise PerfusionError(f"template {p!r} loses the concept to truncation; shorten it")
            self.slot_masks = [s.mask for s in override.slots[0]]
            placeholder = [[enc.get_input_embeddings().weight[word_ids(tok, self.super)[0]].detach().float()
                            for tok, enc in text_stack(pipe)]]
            override.set_concepts(placeholder)
            state = self.init_state()
            override.set_concepts([list(state.embeddings)])
            if cfg.mask == "attention":
                self.set_masks(self.attention_masks(patch))
            elif cfg.mask not in ("none", "", None):
                self.set_masks(self.mask_from_folder(cfg.mask, photos))
            opt = torch.optim.AdamW(
                [
                    {"params": list(state.embeddings), "lr": cfg.lr_embedding},
                    {"params": self.target_params(state), "lr": cfg.lr_value},
                ],
                weight_decay=cfg.weight_decay,
            )
            ckpt = workdir / "checkpoint.safetensors" if workdir else None
            if resume and ckpt is not None and ckpt.is_file():
                self.load_checkpoint(ckpt, state, opt)
            loss_value = float("nan")
            limits = (None if cfg.embedding_max_ratio is None else
                      [cfg.embedding_max_ratio * t for t in typical_word_norms(pipe)])
            while state.step < cfg.steps:
                opt.zero_grad(set_to_none=True)
                total = torch.zeros((), device=self.device)
                for _ in range(cfg.grad_accum):
                    mark_step(self.compile_mode)
                    loss = self.micro_step(state, patch) / cfg.grad_accum
                    loss.backward()
                    total += loss.detach()  # stays on the device: one host sync per step, below
                opt.step()
                if limits is not None:
                    limit_norms(state.embeddings, limits)
                state.step += 1
                loss_value = float(total)
                if not math.isfinite(loss_value):
                    raise PerfusionError(
                        f"training diverged at step {state.step} (loss {loss_value}); lower the learning rates"
                    )
                if progress:
                    progress(Progress(state.step, cfg.steps, loss_value))
                if ckpt is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(ckpt, state, opt)
                if validate and cfg.validate_every and state.step % cfg.validate_every == 0:
                    patch.edits.clear()
                    patch.set_stacked(None)
                    validate(state.step, self.tensors(state), [e.detach().clone() for e in state.embeddings])
        finally:
            patch.remove()
            override.remove()
            if checkpointing:
                unet.disable_gradient_checkpointing()
        embeddings = [e.detach().float().cpu().clone() for e in state.embeddings]
        return Concept(
            name=self.name, supercategory=self.super, tensors=self.tensors(state), embeddings=embeddings,
            training={**{k: v for k, v in asdict(cfg).items() if k != "templates"},
                      "compile_mode": self.compile_mode or cfg.compile_mode,   # auto resolved
                      "templates": self.templates, "images": [p.name for p in photos.paths],
                      "final_loss": loss_value, "embedding_norm_ratio": embedding_norm_ratio(self.pipe, embeddings)},
            created=now(),
        )

    def target_params(self, state: TrainState) -> list[torch.nn.Parameter]:
        """The trained per-layer targets: o*_V, and o*_K too when keys are not locked (in this order: the
        optimiser's state is checkpointed by position)."""
        keys = [] if self.cfg.lock_keys else list(state.key_targets.values())
        return list(state.value_targets.values()) + keys

    def tensors(self, state: TrainState) -> ConceptTensors:
        return ConceptTensors(
            i_star=state.i_star.detach().cpu().clone(),
            key_targets={k: v.detach().float().cpu().clone() for k, v in state.key_targets.items()},
            value_targets={k: v.detach().float().cpu().clone() for k, v in state.value_targets.items()},
            beta=self.cfg.render_beta, tau=self.cfg.render_tau,
        )

    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        n = self.lat_mean.shape[0]
        idx = torch.randint(0, n, (self.cfg.batch_size,), generator=self.rng)
        lat = (self.lat_mean[idx] - self.shift) * self.scale
        prompts = [self.py_rng.choice(self.prompts) for _ in range(len(idx))]
        return lat, idx, prompts

    def micro_step(self, state: TrainState, patch: patching.Patch) -> torch.Tensor:
        """One forward pass: ε-prediction (or v-prediction) MSE through the edited UNet (§6)."""
        pipe, cfg, sched = self.pipe, self.cfg, self.pipe.scheduler
        lat, idx, prompts = self.sample_batch()
        noise = torch.randn(lat.shape, generator=self.rng).to(self.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=self.rng).to(self.device)
        noisy = sched.add_noise(lat, noise, t)
        with torch.autocast(**self.autocast):
            e, pooled = self.encode(prompts)
        m = self.concept_mask(prompts).to(e.dtype)[..., None]              # (B, L, 1), no host sync
        with torch.no_grad():  # i* ← ema·i* + (1 − ema)·mean of this batch's concept encodings (§5)
            e_c = (e.detach().float() * m).sum((0, 1)) / m.sum()
            state.i_star.mul_(cfg.ema).add_(e_c, alpha=1 - cfg.ema)
        inputs = concept_inputs(state.i_star[None], self.C_inv, [cfg.train_beta], [cfg.train_tau])
        # every layer's K and V edit as one (patch.StackedEdit): the same numbers as per-layer LayerEdits
        patch.set_stacked(patching.build_stacked(
            self.stacked_weights, self.stacked_slices, inputs, [state.key_targets], [state.value_targets]
        ))
        ehs = e.to(pipe.unet.dtype)
        with torch.autocast(**self.autocast):
            # outside the UNet's (possibly checkpointed) blocks; "word" scope: the edit at the concept's tokens only
            patch.prime_stacked(ehs, m if cfg.gate_scope == "word" else None)
            pred = self.unet(
                noisy.to(pipe.unet.dtype), t, encoder_hidden_states=ehs,
                **self.unet_kwargs(pooled, lat.shape[0]),
            ).sample.float()
        kind = sched.config.prediction_type
        target = sched.get_velocity(lat, noise, t) if kind == "v_prediction" else noise
        err = (pred - target.float()) ** 2
        if self.masks is not None:
            err = err * self.masks[idx].to(err.device)[:, None]
        return err.mean()

    @torch.no_grad()
    def attention_masks(self, patch: patching.Patch) -> torch.Tensor:
        """Soft foreground masks from the base model's own cross-attention to the supercategory word.

        Each photo is noised to the middle of the schedule and denoised once with the prompt
        "a photo of a <super>" (the first template); the attention probability of every latent pixel
        on the supercategory token is averaged over heads and layers (captured from to_q/to_k outputs,
        so any attention processor works) and scaled to [0, 1] per photo.
        """
        pipe, unet, sched = self.pipe, self.pipe.unet, self.pipe.scheduler
        n = self.n_photos
        h, w = self.lat_mean.shape[-2:]
        prompt = self.prompts[0]
        mask_row = self.slot_masks[0].to(self.device)
        layers = patching.cross_attention_layers(unet)
        captured: dict[str, dict[str, torch.Tensor]] = {k: {} for k in layers}
        handles = []
        for name, attn in layers.items():
            handles.append(attn.to_q.register_forward_hook(lambda m, a, o, n_=name: captured[n_].__setitem__("q", o)))
            handles.append(attn.to_k.register_forward_hook(lambda m, a, o, n_=name: captured[n_].__setitem__("k", o)))
        saved, saved_stacked = dict(patch.edits), patch.stacked
        patch.edits.clear()  # the base model's attention, unedited
        patch.set_stacked(None)
        try:
            lat = (self.lat_mean[:n] - self.shift) * self.scale
            noise = torch.randn(lat.shape, generator=self.rng).to(self.device)
            t = torch.full((n,), sched.config.num_train_timesteps // 2, device=self.device, dtype=torch.long)
            e, pooled = self.encode([prompt] * n)
            with torch.autocast(**self.autocast):
                unet(sched.add_noise(lat, noise, t).to(unet.dtype), t, encoder_hidden_states=e.to(unet.dtype),
                     **self.unet_kwargs(pooled, n))
            total = torch.zeros(n, h, w, device=self.device)
            for name, attn in layers.items():
                q, k = captured[name]["q"].float(), captured[name]["k"].float()
                heads = attn.heads
                B, N, _ = q.shape
                q = q.view(B, N, heads, -1).transpose(1, 2)
                k = k.view(B, k.shape[1], heads, -1).transpose(1, 2)
                probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (B, heads, N, L)
                a = probs[..., mask_row].sum(-1).mean(1)                    # (B, N)
                side = int(round(math.sqrt(N * h / w)))
                a = a.view(B, 1, side, N // side)
                total += F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            lo = total.amin(dim=(1, 2), keepdim=True)
            hi = total.amax(dim=(1, 2), keepdim=True)
            return ((total - lo) / (hi - lo).clamp_min(1e-8)).cpu()
        finally:
            for hd in handles:
                hd.remove()
            patch.edits.update(saved)
            patch.set_stacked(saved_stacked)

    # -- checkpoints (safetensors only) -------------------------------------------------------
    def save_checkpoint(self, path: Path, state: TrainState, opt: torch.optim.Optimizer) -> None:
        tensors = {f"embedding.{k}": e.detach() for k, e in enumerate(state.embeddings)}
        tensors.update({f"value.{n}": v.detach() for n, v in state.value_targets.items()})
        tensors.update({f"key.{n}": v.detach() for n, v in state.key_targets.items()})
        tensors["i_star"], tensors["i_super"] = state.i_star, state.i_super
        params = list(state.embeddings) + self.target_params(state)
        for i, p in enumerate(params):
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"opt.{i}.{key}"] = torch.as_tensor(st[key]).float()
        tensors["rng"] = self.rng.get_state()
        meta = {"step": str(state.step), "config": json.dumps(asdict(self.cfg)), "name": self.name,
                "supercategory": self.super, "py_rng": json.dumps(self.py_rng.getstate()[1])}
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def load_checkpoint(self, path: Path, state: TrainState, opt: torch.optim.Optimizer) -> None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            saved_cfg = json.loads(meta.get("config", "{}"))
            if meta.get("supercategory") != self.super:
                raise PerfusionError(f"checkpoint {path} is for --super {meta.get('supercategory')}; drop --resume")
            for key in ("batch_size", "grad_accum", "lr_embedding", "embedding_max_ratio", "lr_value", "flip", "seed",
                        "lock_keys", "gate_scope", "class_noun"):
                saved = saved_cfg.get(key, _CONFIG_ADDED.get(key))
                if saved != getattr(self.cfg, key):
                    raise PerfusionError(
                        f"checkpoint {path} was made with {key}={saved}, now {getattr(self.cfg, key)}; "
                        "use the same settings or drop --resume"
                    )
            g = lambda k: f.get_tensor(k).to(self.device)
            for k, e in enumerate(state.embeddings):
                e.data.copy_(g(f"embedding.{k}"))
            for n, v in state.value_targets.items():
                v.data.copy_(g(f"value.{n}"))
            for n, k in state.key_targets.items():
                k.data.copy_(g(f"key.{n}"))   # in place: a trained o*_K is the optimiser's parameter
            state.i_star.copy_(g("i_star"))
            state.i_super.copy_(g("i_super"))
            params = list(state.embeddings) + self.target_params(state)
            names = set(f.keys())
            for i, p in enumerate(params):
                if f"opt.{i}.exp_avg" in names:
                    opt.state[p] = {
                        "exp_avg": g(f"opt.{i}.exp_avg"),
                        "exp_avg_sq": g(f"opt.{i}.exp_avg_sq"),
                        "step": f.get_tensor(f"opt.{i}.step").float().reshape(()),
                    }
            self.rng.set_state(f.get_tensor("rng"))
            state.step = int(meta["step"])
            py = json.loads(meta.get("py_rng", "null"))
            if py is not None:
                self.py_rng.setstate((3, tuple(py), None))
