"""Base models: profiles (registry/profiles/*.yaml), loading, fingerprints, device and dtype.

`--model` accepts a profile name or alias ("toyworld", "sd15"), a hub id, a local diffusers folder, or
one .safetensors/.ckpt checkpoint (diffusers' from_single_file). Loading is diffusers' own
`from_pretrained`, so the toy model runs exactly the code path a real checkpoint does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from .errors import ModelError
from .registry import bundled_dir

DEFAULT_MODEL = "sd15"


@dataclass
class Profile:
    name: str
    family: str = "sd1"                     # sd1 | sd2 | sdxl
    resolution: int = 512                   # training and default render size (px)
    hub_id: str | None = None
    path: str | None = None                 # bundled model folder, relative to the bundled registry
    aliases: list[str] = field(default_factory=list)
    covariance: str | None = None           # bundled covariance file, relative to the bundled registry
    text_encoder: dict = field(default_factory=dict)  # config values identifying the text encoder
    text_fingerprints: list[str] = field(default_factory=list)  # models.text_fingerprint values it covers
    render: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    templates: list[str] = field(default_factory=list)
    description: str = ""


@lru_cache(maxsize=1)
def profiles() -> dict[str, Profile]:
    out = {}
    for f in sorted((bundled_dir() / "profiles").glob("*.yaml")):
        d = yaml.safe_load(f.read_text())
        out[d["name"]] = Profile(**d)
    return out


def find_profile(model: str) -> Profile | None:
    for p in profiles().values():
        if model == p.name or model in p.aliases or model == p.hub_id:
            return p
    return None


def profile_for_text_encoder(pipe) -> Profile | None:
    """The profile of a pipeline loaded by the user: by text-encoder fingerprint, else by configuration."""
    fp = text_fingerprint(pipe)
    for p in profiles().values():
        if fp in p.text_fingerprints:
            return p
    cfg = pipe.text_encoder.config
    for p in profiles().values():
        if p.text_encoder and getattr(pipe, "text_encoder_2", None) is None and all(
            getattr(cfg, k, None) == v for k, v in p.text_encoder.items()
        ):
            return p
    return None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}; use auto, cuda, mps or cpu")
    return torch.device(device)


def train_batch(train: dict, device: torch.device, memory_gib: float | None = None,
                low_memory: bool = False) -> tuple[int, int]:
    """(batch_size, grad_accum) for a profile's `train` settings on a device.

    The optimiser sees batch_size × grad_accum images per step either way (the profile's product,
    16 for SD: PERFUSION.md §6); what changes is how many go through the UNet at once. One pass of
    16 costs far less than four of 4 (§12: 136.6 ms against 4 × 83.5 ms at SD 1.5 scale, the small
    batches being launch-bound), so on a CUDA device the largest micro-batch whose memory the
    profile's `cuda_batch` table ({min GiB of device memory: micro-batch}) allows is used. With
    low_memory (gradient checkpointing) or on CPU / MPS, the profile's own batch_size."""
    batch, accum = int(train.get("batch_size", 4)), int(train.get("grad_accum", 4))
    images = batch * accum
    if low_memory or device.type != "cuda":
        return batch, accum
    if memory_gib is None:
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    for need, b in sorted(((float(k), int(v)) for k, v in (train.get("cuda_batch") or {}).items()), reverse=True):
        if memory_gib >= need and b > batch and images % b == 0:
            return b, images // b
    return batch, accum


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(dtype: str, device: torch.device, training: bool = False) -> torch.dtype:
    """The frozen model's dtype. auto: fp16 on CUDA/MPS and fp32 on a CPU for rendering; for training on a CUDA GPU
    with bf16 support, bf16 (the Trainer then runs every op in bf16, no autocast: on an H200 an SD 1.5 step took
    130 ms against 156 ms as fp16 weights under bf16 autocast, 13.9 GiB against 19.2; docs/benchmarks/README.md)."""
    if dtype == "auto":
        if training and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


def with_dtype(base: "BaseModel", dtype: torch.dtype) -> "BaseModel":
    """The same pipeline converted in place to `dtype` (its weights rounded), as a BaseModel that says so."""
    if dtype != base.dtype:
        base.pipe.to(dtype=dtype)
    return dataclasses.replace(base, dtype=dtype)


@dataclass
class BaseModel:
    pipe: object                 # a diffusers pipeline (StableDiffusionPipeline, ...XLPipeline)
    id: str                      # what the user named, resolved (profile name, hub id, or path)
    profile: Profile             # its profile (a generic one when none matches)
    device: torch.device
    dtype: torch.dtype

    @property
    def family(self) -> str:
        return "sdxl" if getattr(self.pipe, "text_encoder_2", None) is not None else self.profile.family

    @property
    def resolution(self) -> int:
        return self.profile.resolution

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.pipe)

    @property
    def text_fingerprint(self) -> str:
        return text_fingerprint(self.pipe)


def _hash_tensors(h, named) -> None:
    for name, t in named:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())


def text_fingerprint(pipe) -> str:
    """sha256 (16 hex) of the text encoder(s)' weights in fp16: what the covariance depends on.

    Values are hashed in fp16 so that an fp16 and an fp32 load of the same weights agree.
    """
    cached = getattr(pipe, "_perfusion_text_fp", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for key in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, key, None)
        if enc is not None:
            _hash_tensors(h, sorted(enc.state_dict().items()))
    fp = h.hexdigest()[:16]
    pipe._perfusion_text_fp = fp
    return fp


def model_fingerprint(pipe) -> str:
    """sha256 (16 hex) of what a concept depends on: the text encoder(s) and every to_k/to_v."""
    cached = getattr(pipe, "_perfusion_model_fp", None)
    if cached:
        return cached
    from .patch import cross_attention_layers, projection_weight

    h = hashlib.sha256(text_fingerprint(pipe).encode())
    for name, attn in cross_attention_layers(pipe.unet).items():
        _hash_tensors(h, [(name + ".k", projection_weight(attn.to_k)), (name + ".v", projection_weight(attn.to_v))])
    fp = h.hexdigest()[:16]
    pipe._perfusion_model_fp = fp
    return fp


def resolve(model: str) -> tuple[str, Profile | None, str]:
    """(what to load: folder, file or hub id; its profile; the id recorded in concept files)."""
    model = model.strip()
    prof = find_profile(model)
    if prof is not None:
        if prof.path:
            return str(bundled_dir() / prof.path), prof, prof.name
        return prof.hub_id, prof, prof.name
    return model, None, model


def load(
    model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", scheduler: str | None = None,
    training: bool = False,
) -> BaseModel:
    """Load a base model as a diffusers pipeline on the chosen device, progress bars off. training: dtype auto
    is the training dtype (pick_dtype), for a Trainer."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, training=training)
    source, prof, model_id = resolve(model)
    path = Path(source).expanduser()
    kw = _dtype_kwarg(dt)
    try:
        if path.suffix in (".safetensors", ".ckpt") and path.is_file():
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kw)
        elif path.exists():
            if not (path / "model_index.json").is_file():
                raise ModelError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
            pipe = DiffusionPipeline.from_pretrained(str(path), safety_checker=None, **_sc(path), **kw)
            model_id = model_id if prof else str(path.resolve())
        elif "/" in source and not source.startswith((".", "/", "~")):
            pipe = DiffusionPipeline.from_pretrained(source, **kw)
        else:
            raise ModelError(
                f"model {model!r} is neither a profile ({', '.join(profiles())}), an existing folder or "
                "file, nor a hub id (owner/name)"
            )
    except ModelError:
        raise
    except Exception as e:  # hub, network and format errors all arrive here
        offline = any(s in type(e).__name__ + str(e) for s in (
            "Offline", "offline", "LocalEntryNotFound", "ConnectionError", "Connection", "resolve", "MaxRetry",
        ))
        why = "not found locally and the hub cannot be reached (offline?)" if offline else _first(e)
        raise ModelError(
            f"cannot load model {model!r}: {why}. Download it first (huggingface-cli download {source}) "
            "or pass a local diffusers folder with --model; --model toyworld works offline"
        ) from e
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ModelError(f"model {model!r} has no UNet/text encoder; perfusion needs a Stable Diffusion-style pipeline")
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # renders of personal concepts trip it often; the user is the judge
    if prof is None:
        prof = profile_for_text_encoder(pipe) or generic_profile(pipe)
    if scheduler:
        set_sampler(pipe, scheduler)
    return BaseModel(pipe=pipe, id=model_id, profile=prof, device=dev, dtype=dt)


def use_channels_last(pipe, enabled: bool = True) -> None:
    """The UNet's convolution weights in channels-last (NHWC) memory format, or back to NCHW.

    A layout, not a cast: values are unchanged, and Linear layers (to_k/to_v, which Perfusion edits) are
    2-D, so unaffected. Often recommended for convolution speed on CUDA, but not used by default: on an
    H200 the SD 1.5 floor step (bf16 autocast, batch 16) took 171 ms channels-last against 162 ms NCHW
    (docs/benchmarks/speed-sd15-nvidia-h200.md). `perfusion bench speed` times the floor step in the
    layout the product does not use, so a later card or library can change the decision on evidence.
    """
    pipe.unet.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def is_channels_last(pipe) -> bool:
    w = pipe.unet.conv_in.weight
    return w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def _dtype_kwarg(dt: torch.dtype) -> dict:
    """Newer diffusers name it `dtype` (and deprecate `torch_dtype`); older releases only know the latter."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dt} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dt}


def _sc(path: Path) -> dict:
    idx = json.loads((path / "model_index.json").read_text())
    return {"requires_safety_checker": False} if "requires_safety_checker" in idx else {}


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def generic_profile(pipe) -> Profile:
    """A profile read off a pipeline no bundled profile covers: family, resolution and nothing else
    (models.load and api.apply use it for user-loaded pipelines)."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    res = int(pipe.unet.config.sample_size) * vae_scale
    family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else (
        "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1")
    return Profile(name="custom", family=family, resolution=res)


SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


def set_sampler(pipe, name: str) -> None:
    import diffusers

    if name not in SAMPLERS:
        raise ModelError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = getattr(diffusers, SAMPLERS[name])
    if type(pipe.scheduler) is not cls:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


def sampler_name(pipe) -> str:
    cls = type(pipe.scheduler).__name__
    return next((k for k, v in SAMPLERS.items() if v == cls), cls)
