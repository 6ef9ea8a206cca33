"""`perfusion bench speed`: what Perfusion costs, each number beside the floor it cannot go below.

Everything runs on one loaded pipeline in one process, through the library's public pieces as a
user would call them (models.load, training.Trainer.fit, rendering.Applied, patch.apply,
concept.to_bytes and concept.load):

training   ms per micro-step of the real training loop (`training.Trainer.fit`: micro_step + backward +
           AdamW step, with the loop's own float(loss) sync), timed as the interval between two
           progress callbacks, against the *floor step*: the same frozen UNet and text encoder,
           batch, dtype and autocast, forward and backward to the text encoder's input embeddings
           only (every weight frozen, no Perfusion hooks). Ratio, peak memory, and the projected
           wall time of a full concept (400 steps × batch 16).
rendering  seconds per image of `Applied` (what `perfusion render` calls) with 1 and with 3
           concepts against the plain diffusers pipeline: same sampler, steps, CFG, size and seed.
concept    file size (fp16 as stored, fp32 with --fp32) and `concept.load` time.
apply      `patch.apply` / `Patch.remove` and `Applied(...)` / `Applied.remove` times.

Repeats are interleaved (train round, floor round, train round, …; plain, 1 concept, 3 concepts,
rotated each round) and medians reported, so a noisy machine hurts every side alike.

Scales: "toy" is the bundled toyworld model (real weights, 64 px, any machine). "sd15" is the
Stable Diffusion 1.5 architecture built from its configuration with random weights (built offline;
speed does not depend on the values): meant for a GPU, allowed on a CPU with minimal repeats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__
from .. import models
from .. import patch as patching
from ..errors import PerfusionError

SCALES = ("toy", "sd15")
TRAIN_NAME, TRAIN_SUPER = "benchcat", "cat"      # concept word (not in the vocabulary) and supercategory
RENDER_SUPERS = ("cat", "dog", "box")            # one-token words of both tokenizers used here
FULL_STEPS, FULL_BATCH = 400, 16                 # a full concept (PERFUSION.md §6)
GOAL_TRAIN, GOAL_RENDER = 1.10, 1.00             # the goals: step ≤ 1.10× floor, render ≤ 1.00× plain
GOAL_FULL_S = 45.0                               # a full SD 1.5 concept on one H100-class GPU
GOAL_LOW_MEMORY_BYTES = 8 * 2 ** 30              # --low-memory fits a GPU of 8 GiB

Progress = Callable[[str, int, int], None]
Events = Callable[[str], None]


def _quiet(*_) -> None:
    pass


# -- settings ---------------------------------------------------------------------------------

# Per scale (and, for sd15, per kind of device): what `None` in SpeedConfig becomes.
_DEFAULTS = {
    "toy": dict(repeats=8, warmup=1, train_batch=4, train_steps=5, render_steps=20, cfg=4.0, io_repeats=20, photos=4,
                extra_variants=True, full=False, low_memory=True),
    "sd15-accelerator": dict(repeats=5, warmup=2, train_batch=16, train_steps=5, render_steps=50, cfg=7.5,
                             io_repeats=20, photos=8, extra_variants=True, full=True, low_memory=True),
    "sd15-cpu": dict(repeats=1, warmup=0, train_batch=1, train_steps=1, render_steps=2, cfg=7.5, io_repeats=3,
                     photos=1, extra_variants=False, full=False, low_memory=False),
}


@dataclass
class SpeedConfig:
    """What to measure. `None` means the scale's default (see `resolved`)."""

    scale: str = "toy"                 # toy | sd15
    device: str = "auto"               # auto | cuda | mps | cpu
    dtype: str = "auto"                # auto (renders fp16 on CUDA/MPS, trains as `perfusion train`: bf16 on
                                       # CUDA; fp32 on CPU) | fp32 | fp16 | bf16 (the given one for both)
    repeats: int | None = None         # interleaved rounds: training (train + floor) and rendering (3 variants)
    warmup: int | None = None          # discarded steps per training round; discarded render rounds
    train_batch: int | None = None     # images per training micro-step (and per floor step)
    train_steps: int | None = None     # timed steps per training round, for each side
    render_steps: int | None = None    # sampling steps per image
    cfg: float | None = None           # classifier-free guidance scale
    io_repeats: int | None = None      # repeats of concept load and apply/remove
    photos: int | None = None          # random "photos" whose latents training caches
    threads: int | None = None         # torch CPU threads during the run (None: torch's default)
    extra_variants: bool | None = None  # also time "no concept, K/V cache" and "1 concept, no K/V cache"
    full: bool | None = None           # also train one full concept (400 steps, `perfusion train`'s batch) for real
    full_steps: int | None = None      # steps of that concept (None: the profile's, 400)
    low_memory: bool | None = None     # also time `perfusion train --low-memory` steps (gradient checkpointing)
    compile: str | None = None         # also time `perfusion train --compile` (this torch.compile mode) against
                                       # the floor with the same compiled UNet; None: not
    sampler: str = "ddim"
    seed: int = 0

    def resolved(self, device: torch.device) -> "SpeedConfig":
        if self.scale not in SCALES:
            raise PerfusionError(f"unknown scale {self.scale!r}; use {' or '.join(SCALES)}")
        key = self.scale if self.scale == "toy" else ("sd15-cpu" if device.type == "cpu" else "sd15-accelerator")
        d = _DEFAULTS[key]
        out = dataclasses.replace(self, **{k: (getattr(self, k) if getattr(self, k) is not None else v)
                                           for k, v in d.items()})
        for k in ("repeats", "train_batch", "train_steps", "render_steps", "io_repeats", "photos"):
            if getattr(out, k) < 1:
                raise PerfusionError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(out, k)}")
        if out.full_steps is not None and out.full_steps < 1:
            raise PerfusionError(f"--full-steps must be at least 1, got {out.full_steps}")
        if out.threads is not None and out.threads < 1:
            raise PerfusionError(f"--threads must be at least 1, got {out.threads}")
        if out.warmup < 0:
            raise PerfusionError(f"--warmup must be ≥ 0, got {out.warmup}")
        if out.cfg < 0:
            raise PerfusionError(f"--cfg must be ≥ 0, got {out.cfg}")
        if out.compile is not None:
            from ..training import COMPILE_MODES, resolve_compile_mode

            if out.compile not in COMPILE_MODES:
                raise PerfusionError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {out.compile!r}")
            out.compile = resolve_compile_mode(out.compile, device)   # auto: what `train --compile` would use
        if out.sampler not in models.SAMPLERS:
            raise PerfusionError(f"unknown sampler {out.sampler!r}; choose one of {', '.join(models.SAMPLERS)}")
        return out

    def command(self) -> str:
        """The command line that reproduces these (resolved) settings."""
        parts = ["perfusion bench speed", f"--scale {self.scale}", f"--device {self.device}"]
        if self.dtype != "auto":
            parts.append(f"--dtype {self.dtype}")
        if self.threads is not None:
            parts.append(f"--threads {self.threads}")
        for k in ("repeats", "warmup", "train_batch", "train_steps", "render_steps", "io_repeats"):
            parts.append(f"--{k.replace('_', '-')} {getattr(self, k)}")
        for k in ("full", "low_memory"):
            parts.append(f"--{'' if getattr(self, k) else 'no-'}{k.replace('_', '-')}")
        if self.full and self.full_steps:
            parts.append(f"--full-steps {self.full_steps}")
        if self.compile:
            parts.append(f"--compile {self.compile}")
        return " ".join(parts)


# -- results ----------------------------------------------------------------------------------

@dataclass
class Timing:
    """Samples of one measurement, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "n": len(self.samples),
                "samples_s": [round(s, 6) for s in self.samples]}


@dataclass
class SpeedResult:
    """Everything `run_speed` measured; `to_dict()` is the JSON report."""

    scale: str
    device: str                  # cpu | cuda | mps
    device_label: str            # file-name part: cpu, mps, or the GPU's name (e.g. nvidia-h100-80gb-hbm3)
    dtype: str
    model: str                   # what was loaded or built
    random_weights: bool
    machine: dict
    settings: dict
    command: str
    memory_method: str
    training: dict
    rendering: dict
    concept_file: dict
    apply: dict
    notes: list[str] = field(default_factory=list)
    total_s: float = 0.0

    def to_dict(self) -> dict:
        return {"benchmark": "perfusion bench speed", "format_version": 1, **asdict(self)}


# -- the machine ------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except Exception:
            pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    """The checkout's commit, read from .git without running git (None for an installed wheel)."""
    try:
        git = Path(__file__).resolve().parents[2] / ".git"
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(None, 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except (OSError, IndexError):
        pass
    return None


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_times() -> tuple[float, float, float] | None:
    """(wall, CPU seconds busy on the whole machine, CPU seconds of this process) where /proc/stat exists."""
    try:
        import resource

        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]     # all but idle and iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime
    except (OSError, ValueError, IndexError, ImportError):
        return None


def _cpu_of_others(start) -> float | None:
    """Average number of cores other processes kept busy since `start` (a _cpu_times() value)."""
    end = _cpu_times()
    if start is None or end is None or end[0] <= start[0]:
        return None
    return round(max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])), 2)


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Where a benchmark ran: CPU, cores, memory, OS, library versions, accelerator, date."""
    import diffusers
    import transformers

    device = torch.device(device)
    info = {
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "perfusion": __version__,
        "git_commit": _git_commit(),
        "device": device.type,
        "accelerator": None,
        "load_average": _load_average(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["accelerator"] = {"name": props.name, "memory_bytes": props.total_memory,
                               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                               "cudnn": torch.backends.cudnn.version()}
    elif device.type == "mps":
        info["accelerator"] = {"name": "Apple MPS"}
    return info


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"
    return device.type


# -- measuring --------------------------------------------------------------------------------

def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


class PeakMemory:
    """Peak memory of a stretch of work: `reset()` at its start, `read()` at its end.

    CUDA: torch.cuda.max_memory_allocated (live tensors: weights, activations, gradients; not the
    caching allocator's reserve). Elsewhere: the process's resident set size, sampled every 5 ms
    from /proc/self/statm by a background thread (it includes Python, every loaded model and the
    allocator's caches; freed memory is often kept by the allocator). Without /proc: ru_maxrss, the
    process's lifetime maximum.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.cuda = device.type == "cuda"
        self._statm = Path("/proc/self/statm")
        self.proc = not self.cuda and self._statm.exists()
        self._page = os.sysconf("SC_PAGE_SIZE") if self.proc else 0
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._thread = None
        if self.proc:
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self._thread.start()

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated (tensors only; weights included)"
        if self.proc:
            return "process RSS, peak sampled every 5 ms from /proc/self/statm (everything the process holds)"
        return "process lifetime max RSS (resource.getrusage ru_maxrss; cannot be reset per measurement)"

    def _rss(self) -> int:
        if self.proc:
            return int(self._statm.read_text().split()[1]) * self._page
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            r = self._rss()
            if r > self._peak:
                self._peak = r

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self._rss()

    def read(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            # what the caching allocator held at its peak: the memory the card must really have (less the
            # CUDA context's few hundred MB)
            return {"peak_bytes": int(peak), "delta_bytes": int(max(0, peak - self._base)),
                    "reserved_bytes": int(torch.cuda.max_memory_reserved())}
        peak = max(self._peak, self._rss())
        return {"peak_bytes": int(peak), "delta_bytes": int(max(0, peak - self._base))}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)


def _max_peak(reads: list[dict]) -> dict:
    out = {"peak_bytes": max(r["peak_bytes"] for r in reads), "delta_bytes": max(r["delta_bytes"] for r in reads)}
    if all("reserved_bytes" in r for r in reads):
        out["reserved_bytes"] = max(r["reserved_bytes"] for r in reads)
    return out


# -- the sd15 scale: SD 1.5's architecture with random weights --------------------------------

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
)
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
# CLIP ViT-L/14's text tower, but for the vocabulary (see build_sd15).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def build_sd15(device: str = "auto", dtype: str = "auto", seed: int = 0) -> models.BaseModel:
    """A StableDiffusionPipeline with SD 1.5's architecture and random weights, built offline.

    UNet, VAE, scheduler and text encoder are SD 1.5's configurations. The tokenizer is the bundled
    toy model's (CLIP BPE, 8514 entries) with model_max_length 77, so the text encoder's vocab_size
    is 8514 instead of CLIP's 49408: only the embedding table is smaller (a row lookup; no change in
    compute). Random weights are for timing only.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..toyworld.base import tokenizer_dir

    dev = models.pick_device(device)
    dt = models.pick_dtype(dtype, dev)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir()), model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **CLIP_L_TEXT,
    ))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**SD_VAE)
    for m in (text_encoder, unet, vae):
        m.to(dev, dt)
        m.eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sd15 = models.find_profile("sd15")
    profile = dataclasses.replace(
        sd15, name="sd15-random", hub_id=None, aliases=[], covariance=None, text_encoder={},
        description="Stable Diffusion 1.5 architecture, random weights (benchmark only)",
    )
    return models.BaseModel(pipe=pipe, id="sd15-random", profile=profile, device=dev, dtype=dt)


def _load(scale: str, device: str, dtype: str, seed: int) -> models.BaseModel:
    if scale == "toy":
        return models.load("toyworld", device=device, dtype=dtype)
    return build_sd15(device, dtype, seed)


def _covariance(base: models.BaseModel) -> tuple[torch.Tensor, str]:
    """C for the pipeline, without writing to any registry: bundled, else estimated here."""
    from .. import covariance as cov_mod

    if base.profile.covariance:
        cov = cov_mod.for_model(base)
        return cov.C, cov.source
    # the values of C do not change the timings; a CPU gets a smaller (still ridge-regularised) estimate
    prompts = cov_mod.corpus(limit=32 if base.device.type == "cpu" else 256)
    return cov_mod.estimate(base.pipe, prompts, batch_size=32), f"estimated:{len(prompts)} prompts (benchmark)"


# -- concepts with the right shapes -----------------------------------------------------------

@torch.no_grad()
def random_concepts(base: models.BaseModel, supers=RENDER_SUPERS, seed: int = 0) -> list:
    """One concept per supercategory word, shaped for this UNet and text encoder(s).

    i* is the encoding of the word in "a photo of a <word>" (so the gates open where the concept
    sits, as with a trained concept), o*_K = W_K i* (locked, §4), o*_V = W_V i* plus 10% noise, and
    the token embedding is the word's plus 10% noise. Named "bench<word>".
    """
    from ..concept import Concept, now
    from ..edit import ConceptTensors
    from ..text import encode, text_stack, token_rows, word_ids

    pipe = base.pipe
    g = torch.Generator().manual_seed(seed)
    layers = patching.cross_attention_layers(pipe.unet)
    out = []
    for sup in supers:
        ids_of = [word_ids(tok, sup) for tok, _ in text_stack(pipe)]
        if any(len(i) != 1 for i in ids_of):
            raise PerfusionError(f"benchmark word {sup!r} is not one token for this tokenizer")
        prompt = f"a photo of a {sup}"
        e = encode(pipe, [prompt]).embeds[0].float().cpu()                    # (L, d)
        pos = int((token_rows(pipe.tokenizer, prompt) == ids_of[0][0]).nonzero()[0, 0])
        i_star = e[pos].clone()
        keys, values = {}, {}
        for name, attn in layers.items():
            wk = patching.projection_weight(attn.to_k).detach().float().cpu()
            wv = patching.projection_weight(attn.to_v).detach().float().cpu()
            keys[name] = wk @ i_star
            v = wv @ i_star
            values[name] = v + 0.1 * v.std() * torch.randn(v.shape, generator=g)
        embeddings = []
        for (tok, enc), (wid,) in zip(text_stack(pipe), ids_of):
            w = enc.get_input_embeddings().weight[wid].detach().float().cpu()
            embeddings.append(w + 0.1 * w.std() * torch.randn(w.shape, generator=g))
        out.append(Concept(name=f"bench{sup}", supercategory=sup,
                           tensors=ConceptTensors(i_star=i_star, key_targets=keys, value_targets=values),
                           embeddings=embeddings, training={"benchmark": "random concept"}, created=now()))
    return out


# -- the floor of a training step -------------------------------------------------------------

class FloorStep:
    """Frozen UNet + text encoder, forward and backward to the text encoder's input embeddings.

    The gradient's only leaf is the token-embedding output (detached and set to require grad by a
    forward hook, so the text encoder's own forward runs unchanged); no weight requires grad; no
    Perfusion hook is installed. Latents are fixed random tensors of the training shape, noise and
    timesteps are drawn on the device, prompts are tokenized once: the least a Perfusion step must do.
    """

    def __init__(self, base: models.BaseModel, prompts: list[str], batch: int, autocast: dict, seed: int = 0,
                 compile_mode: str | None = None):
        from ..training import compiled_unet, mark_step

        pipe = base.pipe
        self.pipe, self.unet, self.enc, self.sched = pipe, pipe.unet, pipe.text_encoder, pipe.scheduler
        # with compile_mode: the UNet compiled as `perfusion train --compile` compiles it (training.compiled_unet)
        self.unet_call = compiled_unet(pipe.unet, compile_mode) if compile_mode else pipe.unet
        self.mark_step = lambda: mark_step(compile_mode)   # as Trainer.fit does before each micro-step
        self.device, self.autocast, self.batch = base.device, dict(autocast), batch
        for m in (self.unet, self.enc):
            m.requires_grad_(False)
        gen_device = "cpu" if self.device.type == "mps" else self.device
        self.g = torch.Generator(device=gen_device).manual_seed(seed)
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        tok = pipe.tokenizer
        self.ids = tok(rows, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        side = base.resolution // pipe.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, side, side)
        self.lat = torch.randn(shape, generator=self.g, device=gen_device).to(self.device)
        self.T = int(self.sched.config.num_train_timesteps)
        self.leaves: list[torch.Tensor] = []

    def _leaf(self, module, args, out):
        x = out.detach().requires_grad_(True)
        self.leaves = [x]
        return x

    def __call__(self) -> torch.Tensor:
        self.mark_step()
        gd = self.g.device
        noise = torch.randn(self.lat.shape, generator=self.g, device=gd).to(self.device)
        t = torch.randint(0, self.T, (self.batch,), generator=self.g, device=gd).to(self.device)
        noisy = self.sched.add_noise(self.lat, noise, t)
        hook = self.enc.get_input_embeddings().register_forward_hook(self._leaf)
        try:
            with torch.autocast(**self.autocast):
                e = self.enc(self.ids)[0]
                pred = self.unet_call(noisy.to(self.unet.dtype), t, encoder_hidden_states=e.to(self.unet.dtype)).sample
        finally:
            hook.remove()
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        return loss.detach()


def floor_step(base: models.BaseModel, prompts: list[str], batch: int, autocast: dict | None = None,
               seed: int = 0, compile_mode: str | None = None) -> FloorStep:
    """A callable running one floor step (see FloorStep); autocast as the Trainer's by default."""
    if autocast is None:
        from ..training import training_autocast

        autocast = training_autocast(base.device, base.dtype)
    return FloorStep(base, prompts, batch, autocast, seed, compile_mode)


# -- the measurements -------------------------------------------------------------------------

def _photos(base, cfg: SpeedConfig):
    from ..images import PhotoSet

    R = base.resolution
    g = torch.Generator().manual_seed(cfg.seed)
    return PhotoSet(pixels=torch.rand(cfg.photos, 3, R, R, generator=g) * 2 - 1,
                    paths=[Path(f"bench-{i}.png") for i in range(cfg.photos)])


def _bench_training(base, C_inv, cfg: SpeedConfig, mem: PeakMemory, sync, tick) -> tuple[dict, object]:
    from ..text import rewrite
    from ..training import Trainer, TrainConfig

    R = base.resolution
    photos = _photos(base, cfg)
    n_fit = 1 + cfg.warmup + cfg.train_steps   # step 1 carries the setup; then warm-up; then timed steps
    tcfg = TrainConfig(steps=n_fit, batch_size=cfg.train_batch, grad_accum=1, checkpoint_every=0,
                       validate_every=0, mask="none", seed=cfg.seed)
    steps, floors, setups, train_mem, floor_mem, paired = [], [], [], [], [], []
    concept, floor, autocast, templates = None, None, None, None
    channels_last = models.is_channels_last(base.pipe)
    floors_other: list[float] = []   # the floor with the UNet in the other memory layout
    for _ in range(cfg.repeats):
        trainer = Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, tcfg)
        autocast, templates = trainer.autocast, trainer.templates
        stamps: list[float] = []

        def on_step(p):
            sync()
            stamps.append(time.perf_counter())
            if p.step == 1 + cfg.warmup:
                mem.reset()   # the peak of the timed steps only (not VAE encoding or setup)
            tick()

        t0 = time.perf_counter()
        concept = trainer.fit(photos, progress=on_step)
        train_mem.append(mem.read())
        intervals = [b - a for a, b in zip(stamps, stamps[1:])]
        steps += intervals[cfg.warmup:]
        round_steps = intervals[cfg.warmup:]
        setups.append(stamps[0] - t0)
        if floor is None:
            floor = floor_step(base, [rewrite(p, {TRAIN_NAME: TRAIN_SUPER}) for p in trainer.prompts],
                               cfg.train_batch, autocast, cfg.seed)
        round_floors = []
        for k in range(cfg.warmup + cfg.train_steps):
            if k == cfg.warmup:
                mem.reset()
            t = time.perf_counter()
            floor()
            sync()
            if k >= cfg.warmup:
                round_floors.append(time.perf_counter() - t)
            tick()
        floor_mem.append(mem.read())
        floors += round_floors
        # the same floor with the UNet in the layout the product does not use (models.use_channels_last)
        models.use_channels_last(base.pipe, not channels_last)
        try:
            for k in range(cfg.warmup + cfg.train_steps):
                t = time.perf_counter()
                floor()
                sync()
                if k >= cfg.warmup:
                    floors_other.append(time.perf_counter() - t)
        finally:
            models.use_channels_last(base.pipe, channels_last)
        paired.append(statistics.median(round_steps) / statistics.median(round_floors))
    step_t, floor_t = Timing(steps), Timing(floors)
    setup = max(0.0, statistics.median(setups) - step_t.median)
    ops = _bench_ops(base, C_inv, floor, cfg)
    micro = FULL_BATCH / cfg.train_batch
    prof = base.profile.train or {}
    p_steps, p_batch, p_accum = (int(prof.get("steps", 400)), int(prof.get("batch_size", 4)),
                                 int(prof.get("grad_accum", 4)))
    p_micro = p_steps * p_accum * p_batch / cfg.train_batch
    result = {
        "batch": cfg.train_batch,
        "resolution": R,
        "latent_size": R // base.pipe.vae_scale_factor,
        "dtype": str(base.dtype).replace("torch.", ""),
        "autocast": (str(autocast["dtype"]).replace("torch.", "") if autocast and autocast.get("enabled") else None),
        "templates": len(templates or []),
        "step": step_t.to_dict(),
        "floor": floor_t.to_dict(),
        "ratio": step_t.median / floor_t.median,
        "ratio_of_min": step_t.min / floor_t.min,
        # each round's median step over the same round's median floor step, then the median of those:
        # insensitive to the machine's load drifting between rounds
        "ratio_paired": statistics.median(paired),
        "ratios_per_round": paired,
        "goal": GOAL_TRAIN,
        "meets_goal": step_t.median / floor_t.median <= GOAL_TRAIN,
        "peak_memory": {"step": _max_peak(train_mem), "floor": _max_peak(floor_mem)},
        "channels_last": channels_last,   # the UNet's memory layout in both timed steps
        # the floor step with the UNet in the other layout (channels-last if the above is False)
        "floor_other_layout": Timing(floors_other).to_dict(),
        "operations": ops,
        "setup_s": setup,
        "full_concept": {
            "steps": FULL_STEPS, "batch": FULL_BATCH, "micro_steps": FULL_STEPS * micro,
            "projected_s": setup + FULL_STEPS * micro * step_t.median,
            "floor_projected_s": FULL_STEPS * micro * floor_t.median,
        },
        # the profile's own recipe, where its micro-batch is the one timed here (per-image cost depends on batch)
        "profile_default": None if p_batch != cfg.train_batch else {
            "steps": p_steps, "batch_size": p_batch, "grad_accum": p_accum,
            "projected_s": setup + p_micro * step_t.median,
        },
    }
    return result, concept


def _bench_full(base, C_inv, cfg: SpeedConfig, mem: PeakMemory, sync, tick, compile_mode: str | None = None) -> dict:
    """One whole concept as `perfusion train` would learn it on this device with default settings:
    400 steps of 16 images, the micro-batch from models.train_batch; wall time from constructing the
    Trainer (latent caching, init) to the returned concept, model already loaded. With compile_mode:
    `perfusion train --compile`, the UNet already compiled by the rounds before (in this process)."""
    from ..training import Trainer, TrainConfig

    prof = base.profile.train or {}
    steps = cfg.full_steps or int(prof.get("steps", FULL_STEPS))
    batch, accum = models.train_batch(prof, base.device)
    tcfg = TrainConfig(steps=steps, batch_size=batch, grad_accum=accum, checkpoint_every=0, validate_every=0,
                       mask="none", seed=cfg.seed, compile=compile_mode is not None,
                       compile_mode=compile_mode or "default")
    photos = _photos(base, cfg)
    sync()
    mem.reset()
    t0 = time.perf_counter()
    trainer = Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, tcfg)
    concept = trainer.fit(photos, progress=lambda p: tick())
    sync()
    wall = time.perf_counter() - t0
    return {"steps": steps, "batch_size": batch, "grad_accum": accum, "images_per_step": batch * accum,
            "wall_s": wall, "peak_memory": mem.read(), "final_loss": concept.training.get("final_loss"),
            "goal_s": GOAL_FULL_S if base.device.type == "cuda" else None}


def _bench_compiled(base, C_inv, cfg: SpeedConfig, mem: PeakMemory, sync, tick, eager_floor_s: float) -> dict:
    """`perfusion train --compile` (TrainConfig.compile, mode cfg.compile) against the floor step with its UNet
    compiled the same way (training.compiled_unet), interleaved in rounds as the eager measurement; what
    compiling costs (the first round's first call less a later round's, for each side); and the speed-up of
    the compiled floor over the eager one measured before in this run."""
    from ..text import rewrite
    from ..training import Trainer, TrainConfig

    photos = _photos(base, cfg)
    n_fit = 1 + cfg.warmup + cfg.train_steps
    tcfg = TrainConfig(steps=n_fit, batch_size=cfg.train_batch, grad_accum=1, checkpoint_every=0,
                       validate_every=0, mask="none", seed=cfg.seed, compile=True, compile_mode=cfg.compile)
    steps, floors, firsts, floor_firsts, paired, train_mem, floor_mem = [], [], [], [], [], [], []
    floor = None
    for _ in range(cfg.repeats):
        trainer = Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, tcfg)
        stamps: list[float] = []

        def on_step(p):
            sync()
            stamps.append(time.perf_counter())
            if p.step == 1 + cfg.warmup:
                mem.reset()
            tick()

        t0 = time.perf_counter()
        trainer.fit(photos, progress=on_step)
        train_mem.append(mem.read())
        firsts.append(stamps[0] - t0)          # set-up and the first step (which compiles, in round 1)
        round_steps = [b - a for a, b in zip(stamps, stamps[1:])][cfg.warmup:]
        steps += round_steps
        if floor is None:
            floor = floor_step(base, [rewrite(p, {TRAIN_NAME: TRAIN_SUPER}) for p in trainer.prompts],
                               cfg.train_batch, trainer.autocast, cfg.seed, compile_mode=cfg.compile)
        round_floors = []
        for k in range(1 + cfg.warmup + cfg.train_steps):
            if k == 1 + cfg.warmup:
                mem.reset()
            t = time.perf_counter()
            floor()
            sync()
            if k == 0:
                floor_firsts.append(time.perf_counter() - t)
            elif k > cfg.warmup:
                round_floors.append(time.perf_counter() - t)
            tick()
        floor_mem.append(mem.read())
        floors += round_floors
        paired.append(statistics.median(round_steps) / statistics.median(round_floors))
    step_t, floor_t = Timing(steps), Timing(floors)
    # a first call once compiled: later rounds' first calls; with one round, a timed step stands in (the set-up
    # before a first step is milliseconds)
    later = lambda xs, one_step: statistics.median(xs[1:]) if len(xs) > 1 else one_step
    return {
        "mode": cfg.compile,
        "step": step_t.to_dict(),
        "floor": floor_t.to_dict(),
        "ratio": step_t.median / floor_t.median,
        "ratio_paired": statistics.median(paired),
        "ratios_per_round": paired,
        "meets_goal": step_t.median / floor_t.median <= GOAL_TRAIN,
        "floor_speedup_over_eager": eager_floor_s / floor_t.median,
        # the first call's extra time in round 1 over later rounds' first calls: compiling (cold in this process;
        # torch's on-disk caches make a later process's compile shorter)
        "compile_s": {"train": firsts[0] - later(firsts, step_t.median),
                      "floor": floor_firsts[0] - later(floor_firsts, floor_t.median)},
        "first_call_s": {"train": firsts, "floor": floor_firsts},
        "peak_memory": {"step": _max_peak(train_mem), "floor": _max_peak(floor_mem)},
        "full_concept_projected_s": later(firsts, step_t.median) - step_t.median + FULL_STEPS * FULL_BATCH / cfg.train_batch * step_t.median,
    }


def _bench_low_memory(base, C_inv, cfg: SpeedConfig, mem: PeakMemory, sync, tick) -> dict:
    """`perfusion train --low-memory`: gradient checkpointing at the profile's own micro-batch
    (models.train_batch with low_memory); ms per micro-step and peak memory."""
    from ..training import Trainer, TrainConfig

    batch, _ = models.train_batch(base.profile.train or {}, base.device, low_memory=True)
    n_fit = 1 + cfg.warmup + cfg.train_steps
    tcfg = TrainConfig(steps=n_fit, batch_size=batch, grad_accum=1, checkpoint_every=0, validate_every=0,
                       mask="none", seed=cfg.seed, gradient_checkpointing=True)
    stamps: list[float] = []

    def on_step(p):
        sync()
        stamps.append(time.perf_counter())
        if p.step == 1 + cfg.warmup:
            mem.reset()
        tick()

    if base.device.type == "cuda":
        # the caching allocator still holds the blocks of the batch-16 rounds; give them back so that the
        # reserve read below is this mode's own (the first GPU report read 19.7 GiB here for that reason)
        torch.cuda.empty_cache()
    mem.reset()
    Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, tcfg).fit(_photos(base, cfg), progress=on_step)
    peak = mem.read()
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][cfg.warmup:]
    held = peak.get("reserved_bytes", peak["peak_bytes"])
    return {"batch": batch, "step": Timing(intervals or [float("nan")]).to_dict(), "peak_memory": peak,
            "goal_bytes": GOAL_LOW_MEMORY_BYTES if base.device.type == "cuda" else None,
            "meets_goal": (held <= GOAL_LOW_MEMORY_BYTES) if base.device.type == "cuda" else None}


def count_ops(fn: Callable[[], object]) -> int:
    """Tensor operations (ATen operator calls, views included) that fn dispatches, backward passes included.

    On a GPU each non-view operation is a kernel launch, and a launch-bound step (SD 1.5 at small batches,
    PERFUSION.md §12) costs about its launches: this count is the noise-free part of a step's overhead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def _bench_ops(base, C_inv, floor, cfg: SpeedConfig) -> dict:
    """Operations per training step (the difference between fits of 3 and 1 steps, over 2) and per floor step."""
    from ..training import Trainer, TrainConfig

    photos = _photos(base, cfg)

    def fit(steps: int):
        tcfg = TrainConfig(steps=steps, batch_size=cfg.train_batch, grad_accum=1, checkpoint_every=0,
                           validate_every=0, mask="none", seed=cfg.seed)
        return lambda: Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, tcfg).fit(photos)

    step = (count_ops(fit(3)) - count_ops(fit(1))) / 2
    floor_ops = count_ops(floor)
    return {"step": step, "floor": floor_ops, "extra": step - floor_ops, "ratio": step / floor_ops}


def _bench_render(base, C, concepts, cfg: SpeedConfig, mem: PeakMemory, sync, tick) -> dict:
    import numpy as np

    from ..rendering import Applied
    from ..text import rewrite

    pipe, R = base.pipe, base.resolution
    models.set_sampler(pipe, cfg.sampler)
    supers = {c.name: c.written_as for c in concepts}
    one = f"a photo of a {concepts[0].name} on a beach"
    three = f"a photo of a {concepts[0].name}, a {concepts[1].name} and a {concepts[2].name} on a beach"
    # (label, concepts or None, prompt, options): "plain" is diffusers alone, nothing of perfusion attached
    variants = [
        ("plain", None, rewrite(one, supers), {}),
        ("1 concept", concepts[:1], one, {}),
        ("3 concepts", concepts[:3], three, {}),
    ]
    if cfg.extra_variants:
        variants += [
            ("no concept, K/V cache", None, rewrite(one, supers), {"cache_only": True}),
            ("1 concept, no K/V cache", concepts[:1], one, {"cache": False}),
        ]
    times = {v[0]: [] for v in variants}
    peaks = {v[0]: [] for v in variants}
    firsts: dict[str, np.ndarray] = {}
    for r in range(cfg.warmup + cfg.repeats):
        k = r % len(variants)
        for label, members, prompt, opts in variants[k:] + variants[:k]:   # interleaved, rotated per round
            seed = cfg.seed + max(0, r - cfg.warmup)
            kwargs = dict(num_inference_steps=cfg.render_steps, guidance_scale=cfg.cfg, height=R, width=R,
                          generator=torch.Generator(device="cpu").manual_seed(seed))
            applied = Applied(pipe, members, C, cache=opts.get("cache", True)) if members else None
            # `perfusion render` renders concept-free prompts with the K/V cache alone (rendering.render_jobs)
            plain = patching.attach(pipe.unet, cache=True) if opts.get("cache_only") else None
            try:
                sync()
                mem.reset()
                t = time.perf_counter()
                with torch.no_grad():
                    images = applied([prompt], **kwargs).images if applied else pipe(prompt=[prompt], **kwargs).images
                sync()
                dt = time.perf_counter() - t
                peak = mem.read()
            finally:
                if applied is not None:
                    applied.remove()
                if plain is not None:
                    plain.remove()
            if r >= cfg.warmup:
                times[label].append(dt)
                peaks[label].append(peak)
                if r == cfg.warmup:
                    firsts[label] = np.asarray(images[0], dtype=np.float32)
            tick()
    ref = Timing(times["plain"])
    out = {"size": R, "steps": cfg.render_steps, "cfg": cfg.cfg, "sampler": cfg.sampler, "images_per_call": 1,
           "prompts": {v[0]: v[2] for v in variants}, "variants": {}}
    for label, members, _, _ in variants:
        t = Timing(times[label])
        pairs = [a / b for a, b in zip(times[label], times["plain"])]   # same round, same seed
        out["variants"][label] = {
            "per_image": t.to_dict(),
            "ratio": t.median / ref.median,
            "ratio_paired": statistics.median(pairs),
            "ratio_of_min": t.min / ref.min,
            "peak_memory": _max_peak(peaks[label]),
            # mean |Δpixel| (0-255) against the plain image of the same seed: is the edit acting?
            "pixel_change_vs_plain": float(np.nan_to_num(np.abs(firsts[label] - firsts["plain"])).mean()),
        }
        if label in ("1 concept", "3 concepts"):
            out["variants"][label]["meets_goal"] = t.median / ref.median <= GOAL_RENDER
    out["goal"] = GOAL_RENDER
    return out


def _bench_concept_file(base, concept, cov_source: str, C, cfg: SpeedConfig, tick) -> dict:
    from .. import concept as concept_io
    from ..concept import ConceptSet
    from ..covariance import fingerprint

    cs = ConceptSet(name=TRAIN_NAME, concepts=[concept],
                    base_model={"id": base.id, "fingerprint": base.fingerprint, "family": base.family},
                    covariance={"fingerprint": fingerprint(C), "source": cov_source})
    t = time.perf_counter()
    data = concept_io.to_bytes(cs, torch.float16)
    to_bytes_s = time.perf_counter() - t
    data32 = concept_io.to_bytes(cs, torch.float32)
    loads = []
    with tempfile.TemporaryDirectory(prefix="perfusion-bench-") as d:
        path = Path(d) / f"{TRAIN_NAME}.safetensors"
        path.write_bytes(data)
        file_size = path.stat().st_size
        for _ in range(cfg.io_repeats):
            t = time.perf_counter()
            loaded = concept_io.load(path)
            loads.append(time.perf_counter() - t)
            tick()
    widths = [w for _, w in concept.layers]
    values = sum(e.numel() for e in concept.embeddings) + concept.tensors.i_star.numel() + 2 * sum(widths)
    return {
        "size_bytes": file_size,
        "size_bytes_fp32": len(data32),
        "bytes_from_to_bytes": len(data),
        "tensor_values": values,
        "layers": len(widths),
        "to_bytes": Timing([to_bytes_s]).to_dict(),
        "load": Timing(loads).to_dict(),
        "loaded_concepts": len(loaded.concepts),
    }


def _bench_apply(base, C, concepts, cfg: SpeedConfig, sync, tick) -> dict:
    from ..edit import inverse_covariance
    from ..rendering import Applied

    pipe, unet = base.pipe, base.pipe.unet
    C_inv = inverse_covariance(C)
    out = {}
    for n in (1, 3):
        members = concepts[:n]
        rec = {k: [] for k in ("patch_apply", "patch_remove", "applied", "applied_remove")}
        for _ in range(cfg.io_repeats):
            sync()
            t = time.perf_counter()
            p = patching.apply(unet, [c.tensors for c in members], C_inv)
            sync()
            rec["patch_apply"].append(time.perf_counter() - t)
            t = time.perf_counter()
            p.remove()
            rec["patch_remove"].append(time.perf_counter() - t)
            tick()
            t = time.perf_counter()
            a = Applied(pipe, members, C)
            sync()
            rec["applied"].append(time.perf_counter() - t)
            t = time.perf_counter()
            a.remove()
            rec["applied_remove"].append(time.perf_counter() - t)
            tick()
        out[f"{n} concept{'s' if n > 1 else ''}"] = {k: Timing(v).to_dict() for k, v in rec.items()}
    out["hooks_left"] = _leftovers(pipe)
    return out


def _leftovers(pipe) -> int:
    """Hooks and instance-level forward wrappers still on the UNet or text encoder (0 when all removed)."""
    n = 0
    for module in (pipe.unet, pipe.text_encoder):
        for m in module.modules():
            n += len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
    return n


def run_speed(config: SpeedConfig | None = None, progress: Progress | None = None,
              on_event: Events = _quiet) -> SpeedResult:
    """Run every measurement of `perfusion bench speed` and return them (nothing is written)."""
    config = config or SpeedConfig()
    threads = torch.get_num_threads()
    if config.threads is not None and config.threads >= 1:
        torch.set_num_threads(config.threads)
    try:
        return _run_speed(config, progress, on_event, threads)
    finally:
        torch.set_num_threads(threads)   # a library call leaves torch as it found it


def _run_speed(config: SpeedConfig, progress: Progress | None, on_event: Events, torch_default: int) -> SpeedResult:
    from ..edit import inverse_covariance

    if config.scale not in SCALES:
        raise PerfusionError(f"unknown scale {config.scale!r}; use {' or '.join(SCALES)}")
    dev = models.pick_device(config.device)
    cfg = config.resolved(dev)
    cfg = dataclasses.replace(cfg, device=config.device if config.device != "auto" else dev.type)
    progress = progress or _quiet
    notes: list[str] = []
    if cfg.scale == "sd15" and dev.type == "cpu":
        on_event("warning: --scale sd15 on a CPU is slow (minutes per step of SD 1.5 at 512 px); "
                 "minimal repeats unless you pass more")
        notes.append("SD 1.5 scale on a CPU: minimal repeats (single samples); the numbers are indicative only.")
    t_start = time.perf_counter()
    load_at_start = _load_average()
    cpu_at_start = _cpu_times()
    sync = _sync(dev)

    progress("model", 0, 1)
    on_event("building SD 1.5 (random weights)" if cfg.scale == "sd15" else "loading the toy model")
    base = _load(cfg.scale, cfg.device, cfg.dtype, cfg.seed)
    C, cov_source = _covariance(base)
    C_inv = inverse_covariance(C)
    concepts = random_concepts(base, RENDER_SUPERS, cfg.seed)
    progress("model", 1, 1)

    mem = PeakMemory(dev)
    try:
        n_train = cfg.repeats * ((1 + cfg.warmup + cfg.train_steps) + (cfg.warmup + cfg.train_steps))
        done = {"n": 0}

        def ticker(stage: str, total: int):
            done["n"] = 0
            progress(stage, 0, total)

            def tick():
                done["n"] += 1
                progress(stage, done["n"], total)

            return tick

        # training runs in `perfusion train`'s dtype (bf16 on a CUDA GPU with --dtype auto), rendering in render's
        render_dtype, train_dtype = base.dtype, models.pick_dtype(cfg.dtype, dev, training=True)
        base = models.with_dtype(base, train_dtype)
        training, trained = _bench_training(base, C_inv, cfg, mem, sync, ticker("training", n_train))
        if cfg.low_memory:
            training["low_memory"] = _bench_low_memory(base, C_inv, cfg, mem, sync,
                                                       ticker("low-memory training", 1 + cfg.warmup + cfg.train_steps))
        if cfg.full:
            training["full_concept"]["measured"] = _bench_full(base, C_inv, cfg, mem, sync,
                                                               ticker("full concept", cfg.full_steps or FULL_STEPS))
        if cfg.compile:
            n_c = cfg.repeats * 2 * (1 + cfg.warmup + cfg.train_steps)
            try:
                compiled = _bench_compiled(base, C_inv, cfg, mem, sync,
                                           ticker(f"compiled training ({cfg.compile})", n_c),
                                           training["floor"]["median_s"])
                if cfg.full:
                    compiled["full_concept"] = _bench_full(
                        base, C_inv, cfg, mem, sync, ticker("full concept, compiled", cfg.full_steps or FULL_STEPS),
                        compile_mode=cfg.compile)
            except Exception as e:   # a machine without a working compiler toolchain: report it, keep the rest
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
                on_event(f"warning: compiled training failed ({reason}); the report says so")
                compiled = {"mode": cfg.compile, "error": reason}
            training["compiled"] = compiled
        base = models.with_dtype(base, render_dtype)   # random or toy weights: the rounding changes no timing
        rendering = _bench_render(base, C, concepts, cfg, mem, sync,
                                  ticker("rendering", (cfg.warmup + cfg.repeats) * (5 if cfg.extra_variants else 3)))
        concept_file = _bench_concept_file(base, trained, cov_source, C, cfg, ticker("concept file", cfg.io_repeats))
        apply = _bench_apply(base, C, concepts, cfg, sync, ticker("apply/remove", 2 * 2 * cfg.io_repeats))
        memory_method = mem.method
    finally:
        mem.close()

    if cfg.scale == "sd15":
        notes.append(
            "Random weights: the SD 1.5 UNet, VAE and CLIP ViT-L/14 text encoder are built from their "
            "configurations with random values; the numbers are timings only (speed does not depend on the values)."
        )
        notes.append(
            "Tokenizer: the bundled toy model's CLIP BPE tokenizer (8514 entries) with model_max_length 77; the "
            "text encoder's vocab_size is set to 8514 instead of CLIP's 49408 (a smaller embedding table; "
            "same compute). The covariance C is estimated from a few corpus prompts on this random encoder "
            "(256 on a GPU, 32 on a CPU): its values do not change the timings."
        )
    else:
        notes.append(
            "toyworld is the bundled 64 px toy model (real weights, UNet 64-128-192 channels, 4-layer 256-wide text "
            "encoder). Fixed per-call costs weigh far more here than at SD 1.5 scale: these ratios show where "
            "overhead sits, not what an SD 1.5 user sees."
        )
    if cfg.threads is not None:
        notes.append(f"torch ran with {cfg.threads} CPU thread(s) (--threads), not its default of {torch_default}.")
    notes.append(
        "Training step: the interval between consecutive progress callbacks of Trainer.fit (batch "
        f"{cfg.train_batch}, grad_accum 1): sampling a batch, encoding the prompts with the concept embedding, "
        "the i* EMA, rebuilding the edits, the edited UNet forward, backward, the AdamW step and the loop's "
        "float(loss). The device is synchronised at every timestamp."
    )
    notes.append(
        "Floor step: the same UNet, text encoder, batch, dtype and autocast; prompts tokenized once; noise and "
        "timesteps drawn on the device; gradients only for the text encoder's input embeddings; no hooks of "
        "Perfusion; synchronised after backward."
    )
    notes.append(
        "Rendering: one image per pipeline call, timed from the call to the decoded PIL image (prompt encoding, "
        "every denoising step with CFG, VAE decode), with Applied constructed and removed outside the timing "
        "(its cost is under 'apply and remove'). Random concepts with i* = the supercategory word's encoding, so "
        "the gates open at the concept's tokens as with a trained concept."
    )
    training["note"] = "ratio = median(step) / median(floor); goal ≤ 1.10"
    label = device_label(dev)
    machine = machine_info(dev)
    machine["load_average_at_start"] = load_at_start
    others = _cpu_of_others(cpu_at_start)
    machine["other_processes_cores"] = others
    cores = machine["cpu_cores"] or 1
    if others is not None and others > 0.1 * cores:
        notes.append(
            f"Other processes used {others:.2f} of the {cores} CPU cores on average during this run: timings are "
            "noisier than on an idle machine; the ratios (interleaved, medians) suffer less than absolute times."
        )
    return SpeedResult(
        scale=cfg.scale, device=dev.type, device_label=label, dtype=str(base.dtype).replace("torch.", ""),
        model=base.id, random_weights=cfg.scale == "sd15", machine=machine,
        settings={k: v for k, v in asdict(cfg).items()}, command=cfg.command(), memory_method=memory_method,
        training=training, rendering=rendering, concept_file=concept_file, apply=apply, notes=notes,
        total_s=time.perf_counter() - t_start,
    )


# -- the report -------------------------------------------------------------------------------

def _ms(s: float) -> str:
    ms = s * 1000
    return f"{ms:.0f}" if ms >= 100 else (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}")


def _secs(s: float) -> str:
    if s >= 7200:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _span(t: dict, fmt=_ms) -> str:
    return f"{fmt(t['min_s'])}–{fmt(t['max_s'])}"


def _mem(m: dict, cuda: bool) -> str:
    return _bytes(m["peak_bytes"]) if cuda else f"{_bytes(m['peak_bytes'])} (+{_bytes(m['delta_bytes'])})"


def markdown(result: SpeedResult | dict) -> str:
    """The Markdown report of a result (or of its JSON dict)."""
    r = result.to_dict() if isinstance(result, SpeedResult) else result
    m, tr, rd, cf, ap = r["machine"], r["training"], r["rendering"], r["concept_file"], r["apply"]
    cuda = r["device"] == "cuda"
    acc = m.get("accelerator") or {}
    where = acc.get("name") or f"{m['cpu']} ({m['cpu_cores']} cores)"
    mem_head = "peak memory" if cuda else "peak RSS (rise during it)"
    ok = lambda b: "meets" if b else "misses"
    L = []
    a = L.append
    a(f"# Speed: Perfusion at {r['scale']} scale on {where}")
    a("")
    if r["random_weights"]:
        a("**Random weights.** This run uses the Stable Diffusion 1.5 architecture built from its configuration "
          "with random values: its numbers are timings only, not images or quality.")
        a("")
    a(f"Measured {m['date']} with `{r['command']}` ({_secs(r['total_s'])} in all). "
      "Each number is the median of interleaved repeats; the range is min–max.")
    a("")
    a("## What was measured")
    a("")
    a("- **Training**: one micro-step of `perfusion train`'s real loop (`Trainer.fit`) against the *floor step*: "
      "the same frozen UNet and text encoder, batch, dtype and autocast, forward and backward to the text "
      "encoder's input embeddings only (no weight trained, no Perfusion hook). A full concept is 400 steps × "
      "batch 16.")
    a("- **Rendering**: seconds per image of `render` (`Applied`) with 1 and with 3 concepts in the prompt against "
      "the plain diffusers pipeline with the same sampler, steps, CFG, size and seed.")
    a("- **Concept file**: its size and `concept.load` time; **apply/remove**: `patch.apply`/`Patch.remove` and "
      "`Applied(...)`/`Applied.remove()` on the loaded pipeline.")
    a("")
    a("## Machine")
    a("")
    a("| | |")
    a("| --- | --- |")
    a(f"| CPU | {m['cpu']}, {m['cpu_cores']} cores (torch used {m['torch_threads']} thread"
      f"{'s' if m['torch_threads'] != 1 else ''}) |")
    a(f"| memory | {_bytes(m['memory_bytes'])} |")
    if acc:
        extra = f", {_bytes(acc['memory_bytes'])}, CUDA {acc.get('cuda')}" if cuda else ""
        a(f"| accelerator | {acc['name']}{extra} |")
    else:
        a("| accelerator | none (CPU) |")
    a(f"| software | Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
      f"transformers {m['transformers']}, perfusion {m['perfusion']}"
      + (f" (commit {m['git_commit']})" if m.get("git_commit") else "") + " |")
    a(f"| OS | {m['os']} |")
    if m.get("load_average"):
        start = m.get("load_average_at_start") or m["load_average"]
        a(f"| load average (1 min) | {start[0]:.2f} at the start, {m['load_average'][0]:.2f} at the end |")
    if m.get("other_processes_cores") is not None:
        a(f"| other processes | {m['other_processes_cores']:.2f} cores busy on average during the run |")
    train_dt = (f", training in {tr['dtype']}" if tr.get("dtype", r["dtype"]) != r["dtype"] else "")
    a(f"| model | {r['model']}, {r['dtype']}{train_dt}"
      + (f", training autocast {tr['autocast']}" if tr.get("autocast") else ", no autocast")
      + f", device {r['device']} |")
    a("")
    a("## Training")
    a("")
    a(f"Batch {tr['batch']} at {tr['resolution']} px (latents {tr['latent_size']}×{tr['latent_size']}), "
      f"{r['settings']['repeats']} round(s) × {r['settings']['train_steps']} timed step(s) per side "
      f"({r['settings']['warmup']} warm-up step(s) per round discarded).")
    a("")
    a(f"| | ms per step | range | {mem_head} |")
    a("| --- | ---: | ---: | ---: |")
    a(f"| `perfusion train` step | {_ms(tr['step']['median_s'])} | {_span(tr['step'])} | "
      f"{_mem(tr['peak_memory']['step'], cuda)} |")
    a(f"| floor step | {_ms(tr['floor']['median_s'])} | {_span(tr['floor'])} | "
      f"{_mem(tr['peak_memory']['floor'], cuda)} |")
    a(f"| **ratio** | **{tr['ratio']:.2f}×** | paired {tr['ratio_paired']:.2f}×, of minima "
      f"{tr['ratio_of_min']:.2f}× | |")
    a("")
    other = tr.get("floor_other_layout") or tr.get("floor_nchw")   # (the first H200 report's key)
    if other:
        used, alt = ("channels-last", "NCHW") if tr.get("channels_last") else ("NCHW", "channels-last")
        r_alt = other["median_s"] / tr["floor"]["median_s"]
        a(f"Memory layout: both steps ran with the UNet in {used} layout. The same floor step in {alt} layout "
          f"(`models.use_channels_last`): {_ms(other['median_s'])} ms ({_span(other)}), {r_alt:.2f}× the "
          f"{used} floor: {alt} is **{'faster' if r_alt < 1 else 'slower'}** here.")
        a("")
    if tr.get("operations"):
        o = tr["operations"]
        a(f"Tensor operations per step (ATen calls, forward and backward, views included; on a GPU the non-view "
          f"ones are kernel launches, which bound a small step): `perfusion train` {o['step']:.0f}, floor "
          f"{o['floor']}: **{o['extra']:+.0f}** ({o['ratio']:.2f}×). Unlike times, these counts do not vary "
          "from run to run.")
        a("")
    fc, pd = tr["full_concept"], tr["profile_default"]
    a(f"Goal ≤ {tr['goal']:.2f}× the floor: **{ok(tr['meets_goal'])}** it (by the ratio of medians; “paired” is the "
      "median over rounds of each round's own ratio, which a load drifting between rounds does not skew).")
    a("")
    a(f"A full concept (400 steps × batch 16 = {fc['micro_steps']:.0f} micro-steps of batch {tr['batch']}) "
      f"projects to **{_secs(fc['projected_s'])}** (setup {_secs(tr['setup_s'])} included; "
      f"the floor: {_secs(fc['floor_projected_s'])})."
      + (f" The profile's own recipe ({pd['steps']} steps × batch {pd['batch_size']} × {pd['grad_accum']} "
         f"accumulation) projects to {_secs(pd['projected_s'])}." if pd else ""))
    a("")
    fm = fc.get("measured")
    if fm:
        goal = (f" Goal ≤ {fm['goal_s']:.0f} s: **{ok(fm['wall_s'] <= fm['goal_s'])}** it." if fm.get("goal_s") else "")
        a(f"**Measured**: one full concept trained for real with `perfusion train`'s defaults on this device "
          f"({fm['steps']} steps × {fm['batch_size']} images × {fm['grad_accum']} accumulation): "
          f"**{_secs(fm['wall_s'])}** from constructing the trainer to the learned concept (photo latents, set-up "
          f"and every step; the model already loaded), peak memory {_mem(fm['peak_memory'], cuda)}"
          + (f", allocator reserve {_bytes(fm['peak_memory']['reserved_bytes'])}"
             if fm["peak_memory"].get("reserved_bytes") else "") + f".{goal}")
        a("")
    lm = tr.get("low_memory")
    if lm:
        held = lm["peak_memory"].get("reserved_bytes")
        a(f"**Low memory** (`perfusion train --low-memory`: gradient checkpointing, micro-batch {lm['batch']}): "
          f"{_ms(lm['step']['median_s'])} ms per micro-step ({_span(lm['step'])}), peak memory "
          f"{_mem(lm['peak_memory'], cuda)}" + (f", allocator reserve {_bytes(held)}" if held else "")
          + (f". Goal: fits {_bytes(lm['goal_bytes'])}: **{ok(lm['meets_goal'])}** it (by the reserve)."
             if lm.get("goal_bytes") else "."))
        a("")
    cm = tr.get("compiled")
    if cm:
        _compiled_section(a, cm, cuda, mem_head, ok)
    a("## Rendering")
    a("")
    a(f"One {rd['size']}×{rd['size']} image per call, {rd['sampler']}, {rd['steps']} steps, CFG {rd['cfg']}, "
      f"{r['settings']['repeats']} repeat(s) per variant ({r['settings']['warmup']} warm-up round(s) discarded).")
    a("")
    a(f"| prompt | s per image | range | ratio to plain | paired | of minima | {mem_head} |")
    a("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, v in rd["variants"].items():
        a(f"| {label}: “{rd['prompts'][label]}” | {v['per_image']['median_s']:.3f} | "
          f"{_span(v['per_image'], lambda s: f'{s:.3f}')} | {v['ratio']:.2f}× | {v['ratio_paired']:.2f}× | "
          f"{v['ratio_of_min']:.2f}× | {_mem(v['peak_memory'], cuda)} |")
    a("")
    for label, v in rd["variants"].items():
        if "meets_goal" in v:
            a(f"- {label}: goal ≤ {rd['goal']:.2f}× plain: **{ok(v['meets_goal'])}** it by the ratio of medians "
              f"(paired {v['ratio_paired']:.2f}×, of minima {v['ratio_of_min']:.2f}×; "
              f"mean pixel change against the plain image of the same seed: {v['pixel_change_vs_plain']:.1f}/255).")
    a("- “paired”: the median over rounds of this variant's time over the plain render's in the same round "
      "(same seed, minutes apart at most).")
    if "no concept, K/V cache" in rd["variants"]:
        a("- “no concept, K/V cache” is what `perfusion render` does for a prompt without concepts (the K/V cache "
          "alone); “1 concept, no K/V cache” is `Applied(..., cache=False)`: the edit recomputed at every step.")
    a("")
    a("## Concept file")
    a("")
    a("| | |")
    a("| --- | ---: |")
    a(f"| size (fp16, as stored) | {cf['size_bytes']:,} bytes ({_bytes(cf['size_bytes'])}) |")
    a(f"| size (fp32, `--fp32`) | {cf['size_bytes_fp32']:,} bytes |")
    a(f"| values stored | {cf['tensor_values']:,} ({cf['layers']} layers) |")
    a(f"| `concept.load` | {_ms(cf['load']['median_s'])} ms ({_span(cf['load'])}) |")
    a(f"| `concept.to_bytes` | {_ms(cf['to_bytes']['median_s'])} ms |")
    a("")
    a("## Apply and remove on the loaded pipeline")
    a("")
    a("| concepts | `patch.apply` | `Patch.remove` | `Applied(...)` | `Applied.remove()` |")
    a("| --- | ---: | ---: | ---: | ---: |")
    for label in ("1 concept", "3 concepts"):
        x = ap[label]
        a(f"| {label} | " + " | ".join(f"{_ms(x[k]['median_s'])} ms" for k in
                                       ("patch_apply", "patch_remove", "applied", "applied_remove")) + " |")
    a("")
    a(f"(medians of {r['settings']['io_repeats']}; `Applied` adds C⁻¹ and the embedding override to `patch.apply`; "
      f"hooks left on the pipeline afterwards: {ap['hooks_left']}.)")
    a("")
    a("## Notes")
    a("")
    for n in r["notes"]:
        a(f"- {n}")
    a(f"- Memory: {r['memory_method']}." + ("" if cuda else " The rise is over the RSS at the measurement's start; "
                                             "on a CPU the allocator keeps freed memory, so repeats show little rise."))
    a("")
    a("## Reproduce")
    a("")
    a("```bash")
    a(r["command"])
    a("```")
    a("")
    a(f"The raw numbers (every sample) are in `{report_stem(r['scale'], r['device_label'])}.json` beside this file.")
    a("")
    return "\n".join(L)


def _compiled_section(a, cm: dict, cuda: bool, mem_head: str, ok) -> None:
    from ..training import CUDAGRAPH_MODES
    a(f"### Compiled (`perfusion train --compile`, torch.compile mode `{cm['mode']}`)")
    a("")
    if cm.get("error"):
        a(f"**Failed** on this machine: `{cm['error']}`. Nothing compiled was timed.")
        a("")
        return
    a("The same rounds with the UNet compiled (`training.compiled_unet`), the floor step's UNet compiled the "
      "same way: does Perfusion's overhead survive compilation, and what does compiling buy?")
    a("")
    a(f"| | ms per step | range | {mem_head} |")
    a("| --- | ---: | ---: | ---: |")
    a(f"| `perfusion train --compile` step | {_ms(cm['step']['median_s'])} | {_span(cm['step'])} | "
      f"{_mem(cm['peak_memory']['step'], cuda)} |")
    a(f"| compiled floor step | {_ms(cm['floor']['median_s'])} | {_span(cm['floor'])} | "
      f"{_mem(cm['peak_memory']['floor'], cuda)} |")
    a(f"| **ratio** | **{cm['ratio']:.2f}×** | paired {cm['ratio_paired']:.2f}× | |")
    a("")
    if cuda and cm["mode"] in CUDAGRAPH_MODES:
        a(f"Mode `{cm['mode']}` replays CUDA graphs, whose activations live in a private memory pool allocated "
          "when a graph is recorded: the peak-memory column counts what was allocated after its reset, which "
          "may leave that pool out. Read memory from the eager rows (and `--low-memory`'s), not these.")
        a("")
    cs = cm["compile_s"]
    a(f"Goal ≤ {GOAL_TRAIN:.2f}× the (compiled) floor: **{ok(cm['meets_goal'])}** it. The compiled floor is "
      f"**{cm['floor_speedup_over_eager']:.2f}×** as fast as the eager floor above. Compiling cost "
      f"{_secs(cs['train'])} (training step) and {_secs(cs['floor'])} (floor) in this process, the first time "
      "(torch keeps compiled kernels on disk, so a later process compiles faster). A full concept projects to "
      f"**{_secs(cm['full_concept_projected_s'])}** once compiled.")
    a("")
    fm = cm.get("full_concept")
    if fm:
        goal = (f" Goal ≤ {fm['goal_s']:.0f} s: **{ok(fm['wall_s'] <= fm['goal_s'])}** it with the UNet already "
                f"compiled; a first run in a fresh process adds the compile: "
                f"{_secs(fm['wall_s'] + cs['train'])}." if fm.get("goal_s") else "")
        a(f"**Measured**: one full concept with `--compile` ({fm['steps']} steps × {fm['batch_size']} images × "
          f"{fm['grad_accum']} accumulation), the UNet compiled by the rounds above: **{_secs(fm['wall_s'])}**, peak "
          f"memory {_mem(fm['peak_memory'], cuda)}.{goal}")
        a("")


def report_stem(scale: str, label: str) -> str:
    return f"speed-{scale}-{label}"


def report_paths(result: SpeedResult, out: str | Path) -> tuple[Path, Path]:
    stem = report_stem(result.scale, result.device_label)
    out = Path(out)
    return out / f"{stem}.md", out / f"{stem}.json"


def write_reports(result: SpeedResult, out: str | Path) -> tuple[Path, Path]:
    """Write `<out>/speed-<scale>-<device>.md` and `.json` atomically; returns their paths."""
    from ..rendering import write_atomic

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerfusionError(f"cannot create {out}: {e.strerror or e}; pass another --out") from None
    md, js = report_paths(result, out)
    write_atomic(js, (json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n").encode())
    write_atomic(md, markdown(result).encode())
    return md, js


def _json_default(x):
    return str(x)   # torch dtypes/devices and paths, should any reach the report
