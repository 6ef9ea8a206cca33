"""The baselines Perfusion is measured against, trained and applied with the same machinery.

Every method learns from the same photos (cached VAE latents, both flips), the same prompt templates and
the same concept word (written as its supercategory, its embedding swapped in by text.EmbeddingOverride),
and stores a safetensors concept file the registry and `render` handle like a Perfusion one
(`Concept.method`, `Concept.weights`). What differs is what is trained (recipes: docs/methods.md):

    ti                 Textual Inversion (Gal et al. 2022): the concept word's embedding only ("a S*").
    dreambooth         DreamBooth (Ruiz et al. 2023): every UNet weight, with prior preservation (the base
                       model's own renders of "a <super>" trained alongside, weight 1). The concept word is
                       a fixed identifier (a rare token's embedding, not trained) followed by the class noun:
                       "a [V] cat". Stored as weight deltas.
    lora               LoRA (Hu et al. 2021) on the UNet's attention projections (to_q, to_k, to_v,
                       to_out.0 of self- and cross-attention), rank 4, as diffusers' DreamBooth-LoRA
                       script does: "a [V] cat", [V] fixed. Render knob: the LoRA scale.
    custom-diffusion   Custom Diffusion (Kumari et al. 2023): cross-attention to_k / to_v weights and the
                       modifier token V*'s embedding (initialised from a rare token's), "a V* cat". Stored as
                       weight deltas.

Weights are applied by instance-level forward wrappers (LoRA, Custom Diffusion) or by adding deltas in
place (DreamBooth); `AppliedWeights.remove()` restores the UNet bit for bit in both cases.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import PerfusionError
from .patch import install_forward, restore_forwards

METHODS = ("perfusion", "ti", "dreambooth", "lora", "custom-diffusion")
BASELINES = METHODS[1:]
IDENTIFIER_TOKEN = "sks"  # DreamBooth's rare token (one token in CLIP's vocabulary)
EMBEDDING_INITS = ("supercategory", "identifier")


@dataclass
class MethodConfig:
    """One baseline's recipe. `recipe(method)` gives the defaults; fields say where they come from."""

    method: str
    steps: int = 400              # optimiser steps (the same budget as Perfusion's 400, for comparison)
    batch_size: int = 4
    lr: float = 5e-3              # learning rate of the trained weights
    lr_embedding: float = 5e-3    # learning rate of the embedding (ti, custom-diffusion)
    rank: int = 4                 # lora
    prior_weight: float = 1.0     # dreambooth: weight of the prior-preservation loss
    prior_images: int = 16        # dreambooth: base-model renders of "a <super>" (the paper uses 200)
    prior_steps: int = 30         # sampling steps for those renders
    class_noun: bool = False      # the prompt keeps the supercategory after the concept's token: "a [V] cat"
                                  # (DreamBooth, LoRA, Custom Diffusion); False: the token replaces it ("a S*")
    embedding_init: str = "supercategory"  # the token's embedding starts as: "supercategory" (TI, Perfusion) or
                                           # "identifier", a rare token's (DreamBooth's [V], Custom Diffusion's V*)
    seed: int = 0
    templates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def recipe(method: str, **overrides) -> MethodConfig:
    """The usual recipe of each method (its paper / the diffusers training script), as MethodConfig."""
    if method not in BASELINES:
        raise PerfusionError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    base = {
        # Gal et al.: embedding only, initialised from a word for the class, lr 5e-3 (their 0.005 base rate), AdamW
        "ti": dict(lr=5e-3, lr_embedding=5e-3),
        # Ruiz et al. / diffusers train_dreambooth.py: "a photo of sks dog", lr 5e-6, prior preservation weight 1
        "dreambooth": dict(lr=5e-6, lr_embedding=0.0, prior_weight=1.0, class_noun=True, embedding_init="identifier"),
        # diffusers train_dreambooth_lora.py: DreamBooth's prompts, rank 4, lr 1e-4
        "lora": dict(lr=1e-4, lr_embedding=0.0, rank=4, class_noun=True, embedding_init="identifier"),
        # Kumari et al.: "photo of a V* dog", V* initialised from a rare token; K/V lr 1e-5 (per-image rate 1e-5 ×
        # batch ~ 4e-5 here), the embedding trained alongside
        "custom-diffusion": dict(lr=4e-5, lr_embedding=1e-3, class_noun=True, embedding_init="identifier"),
    }[method]
    cfg = MethodConfig(method=method, **{**base, **overrides})
    if cfg.embedding_init not in EMBEDDING_INITS:
        raise PerfusionError(f"unknown embedding_init {cfg.embedding_init!r}; choose one of: {', '.join(EMBEDDING_INITS)}")
    return cfg


# -- where the weights go --------------------------------------------------------------------------

def lora_modules(unet: nn.Module) -> dict[str, nn.Linear]:
    """Attention projections LoRA adapts: to_q, to_k, to_v, to_out.0 of every attention block."""
    out = {}
    for name, m in unet.named_modules():
        if hasattr(m, "to_q") and hasattr(m, "to_k") and hasattr(m, "to_v") and hasattr(m, "to_out"):
            for sub, proj in (("to_q", m.to_q), ("to_k", m.to_k), ("to_v", m.to_v), ("to_out.0", m.to_out[0])):
                if isinstance(proj, nn.Linear):
                    out[f"{name}.{sub}"] = proj
    return out


def kv_modules(unet: nn.Module) -> dict[str, nn.Linear]:
    """Cross-attention to_k / to_v (what Custom Diffusion trains and Perfusion edits)."""
    from .patch import cross_attention_layers

    out = {}
    for name, attn in cross_attention_layers(unet).items():
        out[f"{name}.to_k"], out[f"{name}.to_v"] = attn.to_k, attn.to_v
    return out


class AppliedWeights:
    """A baseline's weights on a UNet, each scaled by `scale` (1: as trained; 0: no effect), the LoRA scale and
    its analogue for the others. lora: {module: (down (r, in), up (out, r))};
    deltas: {module: ΔW (out, in)} added through wrappers; unet_deltas: {parameter: Δ} added in place.
    `remove()` restores the UNet exactly (wrappers deleted; in-place parameters copied back)."""

    def __init__(self, unet: nn.Module, lora: dict | None = None, deltas: dict | None = None,
                 unet_deltas: dict | None = None, scale: float = 1.0):
        self.unet, self.scale = unet, scale
        self.wrapped: list[tuple[nn.Module, object]] = []
        self.saved: dict[str, Tensor] = {}
        modules = dict(unet.named_modules())
        try:
            for name, (down, up) in (lora or {}).items():
                self._wrap(self._module(modules, name), lambda x, d=down, u=up: (x @ d.to(x).T) @ u.to(x).T * self.scale)
            for name, dw in (deltas or {}).items():
                self._wrap(self._module(modules, name), lambda x, d=dw: (x @ d.to(x).T) * self.scale)
            if unet_deltas:
                params = dict(unet.named_parameters())
                for name, d in unet_deltas.items():
                    if name not in params or params[name].shape != d.shape:
                        raise PerfusionError(f"the concept's UNet weights do not fit this UNet ({name}); "
                                             "was it trained on another base model?")
                with torch.no_grad():
                    for name, d in unet_deltas.items():
                        p = params[name]
                        self.saved[name] = p.detach().clone()
                        p.add_(d.to(p.device, p.dtype), alpha=scale)
        except Exception:
            self.remove()
            raise

    @staticmethod
    def _module(modules: dict, name: str) -> nn.Module:
        m = modules.get(name)
        if m is None:
            raise PerfusionError(f"the concept adapts {name}, which this UNet lacks; was it trained on another "
                                 "base model?")
        return m

    def _wrap(self, module: nn.Module, extra: Callable[[Tensor], Tensor]) -> None:
        inner = module.forward

        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            return inner(x, *args, **kwargs) + extra(x)

        install_forward(module, forward, self.wrapped)

    def remove(self) -> None:
        restore_forwards(self.wrapped)
        if self.saved:
            params = dict(self.unet.named_parameters())
            with torch.no_grad():
                for name, w in self.saved.items():
                    params[name].copy_(w)
            self.saved.clear()


def apply_weights(unet: nn.Module, method: str, weights: dict[str, Tensor], scale: float = 1.0) -> AppliedWeights:
    """Put a baseline concept's stored weights on a UNet (see Concept.weights for the key layout)."""
    lora, deltas, unet_deltas = {}, {}, {}
    for key, t in weights.items():
        kind, _, rest = key.partition(":")
        if kind == "lora_down":
            lora.setdefault(rest, [None, None])[0] = t
        elif kind == "lora_up":
            lora.setdefault(rest, [None, None])[1] = t
        elif kind == "delta":
            deltas[rest] = t
        elif kind == "unet":
            unet_deltas[rest] = t
        else:
            raise PerfusionError(f"unknown weight {key!r} in a {method} concept")
    if any(d is None or u is None for d, u in lora.values()):
        raise PerfusionError(f"a {method} concept has a LoRA half without the other")
    return AppliedWeights(unet, {k: tuple(v) for k, v in lora.items()}, deltas, unet_deltas, scale)


# -- training --------------------------------------------------------------------------------------

def identifier_embedding(tokenizer, encoder, seed: int = 0) -> Tensor:
    """DreamBooth's identifier: the embedding of a rare token ("sks") when it is one token, else a fixed
    random vector with the embedding table's typical norm."""
    ids = tokenizer(IDENTIFIER_TOKEN, add_special_tokens=False).input_ids
    table = encoder.get_input_embeddings().weight.detach().float()
    if len(ids) == 1:
        return table[ids[0]].clone()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(table.shape[1], generator=g)
    return (v / v.norm() * table.norm(dim=1).median()).to(table.device)


def train_baseline(base, name: str, supercategory: str, photos, cfg: MethodConfig,
                   progress: Callable | None = None, on_event: Callable[[str], None] | None = None,
                   snapshots: tuple[int, ...] = (), on_snapshot: Callable | None = None):
    """Train one baseline concept on a loaded base model; returns a concept.Concept (method, weights).
    snapshots: steps at which on_snapshot(step, concept) receives the concept as it is then (the
    "number of steps" knob of the quality benchmark, from one run)."""
    from .concept import Concept, now
    from .text import EmbeddingOverride, encode, rewrite, text_stack, word_ids, written_as
    from .training import Progress, TrainConfig, Trainer

    say = on_event or (lambda m: None)
    pipe, unet, device = base.pipe, base.pipe.unet, base.device
    if cfg.method == "dreambooth" and unet.dtype != torch.float32:
        raise PerfusionError("DreamBooth trains the UNet's own weights, which need float32 here: load the model "
                             "with --dtype fp32")
    # the data pipeline of Perfusion's trainer: cached latents (both flips), templates, batches
    shared = Trainer(base, name, supercategory, torch.eye(1),
                     TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=1, seed=cfg.seed,
                                 templates=list(cfg.templates)))
    shared.cache_latents(photos)
    templates = shared.templates
    prompts = [t.format(name) for t in templates]
    words = {name: written_as(supercategory, cfg.class_noun)}   # what the pipeline reads for the concept word
    stack = text_stack(pipe)
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)

    trains_embedding = cfg.method in ("ti", "custom-diffusion")
    if cfg.embedding_init == "identifier":   # a rare token's: DreamBooth's [V], Custom Diffusion's V*
        initial = [identifier_embedding(tok, enc, cfg.seed) for tok, enc in stack]
    else:                                   # the supercategory word's, as Perfusion's
        initial = [enc.get_input_embeddings().weight[word_ids(tok, supercategory)[0]].detach().float().clone()
                   for tok, enc in stack]
    embeddings = [nn.Parameter(e.detach().float().clone()) if trains_embedding else e.detach() for e in initial]

    params: list[dict] = []
    if trains_embedding:
        params.append({"params": list(embeddings), "lr": cfg.lr_embedding})
    lora: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    deltas: dict[str, nn.Parameter] = {}
    dreambooth_params: dict[str, nn.Parameter] = {}
    if cfg.method == "lora":
        for mname, lin in lora_modules(unet).items():
            down = torch.randn(cfg.rank, lin.in_features, generator=rng) / math.sqrt(lin.in_features)
            up = torch.zeros(lin.out_features, cfg.rank)    # B = 0: training starts from the base model
            lora[mname] = (nn.Parameter(down.to(device)), nn.Parameter(up.to(device)))
        params.append({"params": [p for pair in lora.values() for p in pair], "lr": cfg.lr})
    elif cfg.method == "custom-diffusion":
        deltas = {k: nn.Parameter(torch.zeros_like(m.weight, dtype=torch.float32)) for k, m in kv_modules(unet).items()}
        params.append({"params": list(deltas.values()), "lr": cfg.lr})
    elif cfg.method == "dreambooth":
        original = {k: p.detach().clone() for k, p in unet.named_parameters()}
        dreambooth_params = dict(unet.named_parameters())
        params.append({"params": list(dreambooth_params.values()), "lr": cfg.lr})

    prior_lat = None
    if cfg.method == "dreambooth" and cfg.prior_weight > 0 and cfg.prior_images > 0:
        say(f"prior preservation: rendering {cfg.prior_images} images of 'a {supercategory}' with the base model")
        prior_lat = _prior_latents(base, supercategory, cfg)

    def _concept(step: int, loss_value: float):
        """The concept as trained so far (copies: training may go on)."""
        weights: dict[str, Tensor] = {}
        for k, (d, u) in lora.items():
            weights[f"lora_down:{k}"] = d.detach().float().cpu().clone()
            weights[f"lora_up:{k}"] = u.detach().float().cpu().clone()
        for k, d in deltas.items():
            weights[f"delta:{k}"] = d.detach().float().cpu().clone()
        for k, p in dreambooth_params.items():
            weights[f"unet:{k}"] = (p.detach().float() - original[k].float()).cpu()
        return Concept(
            name=name, supercategory=supercategory, tensors=None,
            embeddings=[e.detach().float().cpu().clone() for e in embeddings],
            training={**cfg.to_dict(), "steps_done": step, "templates": templates,
                      "images": [p.name for p in photos.paths], "final_loss": loss_value},
            created=now(), method=cfg.method, weights=weights,
        )

    opt = torch.optim.AdamW(params, weight_decay=0.0 if cfg.method != "dreambooth" else 1e-2)
    override = EmbeddingOverride(pipe)
    applied = None
    if cfg.method == "dreambooth":
        unet.requires_grad_(True)
        unet.train()
    try:
        for p in prompts:
            override.add_prompt(p, words)
        override.set_concepts([list(embeddings)])
        if lora:
            applied = AppliedWeights(unet, lora={k: v for k, v in lora.items()})
        elif deltas:
            applied = AppliedWeights(unet, deltas=dict(deltas))
        sched = pipe.scheduler
        loss_value = float("nan")
        for step in range(1, cfg.steps + 1):
            lat, _, batch_prompts = shared.sample_batch()
            noise = torch.randn(lat.shape, generator=rng).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=rng).to(device)
            texts = [rewrite(p, words) for p in batch_prompts]
            if prior_lat is not None:
                k = min(len(prior_lat), lat.shape[0])
                pick = torch.randint(0, len(prior_lat), (k,), generator=rng)
                lat = torch.cat([lat, prior_lat[pick]])
                noise = torch.cat([noise, torch.randn(prior_lat[pick].shape, generator=rng).to(device)])
                t = torch.cat([t, torch.randint(0, sched.config.num_train_timesteps, (k,), generator=rng).to(device)])
                texts = texts + [f"a {supercategory}"] * k
            noisy = sched.add_noise(lat, noise, t)
            with torch.autocast(**shared.autocast):
                e = encode(pipe, texts, device).embeds
                pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=e.to(unet.dtype),
                            **shared.unet_kwargs(None, lat.shape[0])).sample.float()
            target = sched.get_velocity(lat, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            err = (pred - target.float()).pow(2).mean(dim=(1, 2, 3))
            n = len(batch_prompts)
            loss = err[:n].mean() + (cfg.prior_weight * err[n:].mean() if prior_lat is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise PerfusionError(f"{cfg.method} training diverged at step {step}; lower its learning rate")
            if progress:
                progress(Progress(step, cfg.steps, loss_value))
            if on_snapshot and step in snapshots and step != cfg.steps:
                on_snapshot(step, _concept(step, loss_value))
    except BaseException:
        if cfg.method == "dreambooth":   # never leave the loaded model half fine-tuned
            with torch.no_grad():
                for k, p in dreambooth_params.items():
                    p.copy_(original[k])
        raise
    finally:
        override.remove()
        if applied is not None:
            applied.remove()
        if cfg.method == "dreambooth":
            unet.requires_grad_(False)
            unet.eval()

    concept = _concept(cfg.steps, loss_value)
    if cfg.method == "dreambooth":
        with torch.no_grad():
            for k, p in dreambooth_params.items():
                p.copy_(original[k])   # the loaded base model is left as it was
    return concept


@torch.no_grad()
def _prior_latents(base, supercategory: str, cfg: MethodConfig) -> Tensor:
    """VAE latents (scaled) of the base model's own renders of "a <super>": DreamBooth's class images."""
    pipe = base.pipe
    R = base.resolution
    gens = [torch.Generator("cpu").manual_seed(10_000 + cfg.seed + i) for i in range(cfg.prior_images)]
    out = []
    for s in range(0, cfg.prior_images, 8):
        res = pipe([f"a {supercategory}"] * len(gens[s:s + 8]), generator=gens[s:s + 8], height=R, width=R,
                   num_inference_steps=cfg.prior_steps, output_type="latent")
        out.append(res.images.float())
    return torch.cat(out)
