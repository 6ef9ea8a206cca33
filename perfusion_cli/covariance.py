"""C = E[e eᵀ], the uncentered covariance of a base model's text encodings (PERFUSION.md §3).

Where it comes from, in order:
  1. the bundled matrix named by the model's profile (SD 1.x: CLIP ViT-L/14 over ~100K LAION captions);
  2. the user registry's cache, keyed by the text encoder's fingerprint;
  3. an estimate over the prompt corpus shipped in registry/prompts/corpus.txt, then cached (2).
C belongs to the base model and never goes into a concept file; a concept records C's fingerprint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load_file, save

from .registry import Registry, bundled_dir
from .text import attention_mask, encode, quiet_diffusers


@dataclass
class Covariance:
    C: torch.Tensor      # (d, d) float64
    fingerprint: str     # 16 hex of sha256 of C in fp32: concepts used together must share it
    source: str          # "bundled:<file>" | "estimated:<n> prompts"

    @property
    def info(self) -> dict:
        return {"fingerprint": self.fingerprint, "source": self.source}


def fingerprint(C: torch.Tensor) -> str:
    return hashlib.sha256(C.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def corpus(limit: int | None = None) -> list[str]:
    lines = (bundled_dir() / "prompts" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    prompts = [p.strip() for p in lines if p.strip()]
    return prompts[:limit] if limit else prompts


@torch.no_grad()
def estimate(
    pipe, prompts: list[str], batch_size: int = 64, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """C over the real-token encodings (begin and end tokens included, padding excluded) of `prompts`,
    encoded exactly as the pipeline feeds its UNet. Returns (d, d) float64."""
    C, n = None, 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        with quiet_diffusers():
            e = encode(pipe, batch).embeds.double()            # (B, L, d)
        mask = attention_mask(pipe, batch).to(e.device)[:, : e.shape[1]]
        x = e[mask]                                            # (tokens, d)
        C = x.T @ x if C is None else C + x.T @ x
        n += x.shape[0]
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return (C / n).cpu()


def load_file_covariance(path) -> torch.Tensor:
    t = load_file(str(path))
    return t["covariance"].double()


def for_model(base, registry: Registry | None = None, progress=None) -> Covariance:
    """The covariance to use with a loaded BaseModel (see the module docstring for the order)."""
    if base.profile.covariance:
        path = bundled_dir() / base.profile.covariance
        C = load_file_covariance(path)
        return Covariance(C, fingerprint(C), f"bundled:{path.name}")
    registry = registry or Registry()
    cached = registry.covariance_path(base.text_fingerprint)
    if cached.is_file():
        C = load_file_covariance(cached)
        return Covariance(C, fingerprint(C), load_file_source(cached))
    prompts = corpus()
    C = estimate(base.pipe, prompts, progress=progress)
    source = f"estimated:{len(prompts)} prompts"
    registry.put_covariance(
        base.text_fingerprint,
        save({"covariance": C.float().contiguous()}, metadata={"source": source, "model": base.id}),
    )
    C = C.float().double()  # what the cache will give back next time, so fingerprints agree
    return Covariance(C, fingerprint(C), source)


def load_file_source(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("source", "cached")
