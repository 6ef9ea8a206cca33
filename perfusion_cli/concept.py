"""The concept file: safetensors tensors + versioned string metadata. Never pickle.

One file holds one concept, or several (a combination made by `perfusion combine`). Layout:

tensors (member j = 0, 1, ...; fp16 by default, fp32 on request):
    {j}.embedding.{k}   (d_k,)   the concept token's word embedding for text encoder k (SDXL has 2)
    {j}.i_star          (d,)     concept input i*, EMA of its encodings (PERFUSION.md §5)
    {j}.key_targets     (Σm,)    o*_K of every edited layer, concatenated in `layers` order (§4)
    {j}.value_targets   (Σm,)    o*_V likewise (§5)
Concatenating the per-layer targets keeps the safetensors header small: an SD 1.5 concept is
~55 KB in fp16 instead of ~60 KB with 32 separate tensors.

A baseline concept (methods.py: ti, dreambooth, lora, custom-diffusion; member record "method") has
its embeddings and, instead of i*/targets, its method's weights as {j}.w.<key> (keys as Concept.weights:
"lora_down:<module>", "lora_up:<module>", "delta:<module>", "unet:<parameter>"); its record has no gate.

__metadata__ (all strings; nested values are JSON):
    format "perfusion-concept", format_version "1", kind "concept" | "combination", name,
    base_model {id, fingerprint, family}, covariance {fingerprint, source},
    layers [[name, width], ...], exact (combination: exact or approximate §8),
    concepts [{name, token, supercategory, gate {beta, tau}, training {...}, created}, ...],
    created, tool_version
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from . import __version__
from .edit import ConceptTensors
from .errors import ConceptFileError

FORMAT = "perfusion-concept"
FORMAT_VERSION = 1


@dataclass
class Concept:
    """One learned concept with everything needed to use it, minus the base model."""

    name: str                      # the word that stands for it in prompts, e.g. "mycat"
    supercategory: str             # the single-token word it is locked to, e.g. "cat"
    tensors: ConceptTensors | None  # i*, o*_K, o*_V, default β/τ (None for a baseline method)
    embeddings: list[torch.Tensor]  # one (d_k,) token embedding per text encoder
    training: dict = field(default_factory=dict)  # the settings it was trained with
    created: str = ""
    method: str = "perfusion"      # or a baseline of methods.py
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # a baseline's weights (methods.apply_weights)

    @property
    def layers(self) -> list[tuple[str, int]]:
        if self.tensors is None:
            return []
        return [(n, int(t.numel())) for n, t in self.tensors.value_targets.items()]

    @property
    def is_perfusion(self) -> bool:
        return self.method == "perfusion"

    @property
    def written_as(self) -> str:
        """The words the concept's name becomes in the prompt the pipeline reads (text.written_as): its
        supercategory, kept after the concept's token for a concept trained so ("a [V] cat": DreamBooth's,
        LoRA's and Custom Diffusion's recipes, Perfusion's class_noun experiment)."""
        from .text import written_as

        return written_as(self.supercategory, bool(self.training.get("class_noun", False)))


@dataclass
class ConceptSet:
    """What a concept file holds: one concept, or a combination of several."""

    name: str
    concepts: list[Concept]
    base_model: dict               # {"id", "fingerprint", "family"}
    covariance: dict               # {"fingerprint", "source"}
    kind: str = "concept"          # "concept" | "combination"
    exact: bool = True             # combination: exact (C⁻¹-orthonormal) or approximate (§8)
    created: str = ""
    tool_version: str = __version__


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def to_bytes(cs: ConceptSet, dtype: torch.dtype = torch.float16) -> bytes:
    """Serialise a concept set (the caller writes the bytes atomically: see registry.put)."""
    if not cs.concepts:
        raise ValueError("a concept file needs at least one concept")
    perf = [c for c in cs.concepts if c.is_perfusion]
    layers = perf[0].layers if perf else []
    tensors: dict[str, torch.Tensor] = {}
    members = []
    for j, c in enumerate(cs.concepts):
        for k, emb in enumerate(c.embeddings):
            tensors[f"{j}.embedding.{k}"] = emb.detach().reshape(-1)
        if not c.is_perfusion:
            for key, w in c.weights.items():
                tensors[f"{j}.w.{key}"] = w.detach()
            members.append({"name": c.name, "token": c.name, "supercategory": c.supercategory, "method": c.method,
                            "training": c.training, "created": c.created or now()})
            continue
        if c.layers != layers:
            raise ValueError(f"concept {c.name!r} has other layers than {perf[0].name!r}")
        t = c.tensors
        tensors[f"{j}.i_star"] = t.i_star.detach().reshape(-1)
        tensors[f"{j}.key_targets"] = torch.cat([t.key_targets[n].detach().reshape(-1) for n, _ in layers])
        tensors[f"{j}.value_targets"] = torch.cat([t.value_targets[n].detach().reshape(-1) for n, _ in layers])
        members.append({
            "name": c.name,
            "token": c.name,
            "supercategory": c.supercategory,
            "gate": {"beta": float(t.beta), "tau": float(t.tau)},
            "training": c.training,
            "created": c.created or now(),
        })
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": cs.kind,
        "name": cs.name,
        "base_model": json.dumps(cs.base_model),
        "covariance": json.dumps(cs.covariance),
        "layers": json.dumps([[n, w] for n, w in layers]),
        "exact": json.dumps(cs.exact),
        "concepts": json.dumps(members),
        "created": cs.created or now(),
        "tool_version": cs.tool_version,
    }
    return save(tensors, metadata=meta)


def read_metadata(path: str | Path) -> dict:
    """The decoded metadata of a concept file (JSON fields parsed), reading only its header.

    Raises ConceptFileError for a missing, truncated or foreign file.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            keys = list(f.keys())
    except FileNotFoundError:
        raise ConceptFileError(f"no concept file at {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ConceptFileError(
            f"{path} is not a readable concept file ({first_line(e)}); re-export or retrain it"
        ) from None
    if raw.get("format") != FORMAT:
        raise ConceptFileError(f"{path} is a safetensors file but not a Perfusion concept (no format={FORMAT!r})")
    try:
        version = int(raw.get("format_version", "0"))
    except ValueError:
        raise ConceptFileError(f"{path} has an unreadable format_version {raw.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ConceptFileError(
            f"{path} has concept format version {version}; this perfusion reads up to {FORMAT_VERSION}: upgrade perfusion"
        )
    try:
        meta = dict(raw)
        for k in ("base_model", "covariance", "layers", "exact", "concepts"):
            meta[k] = json.loads(raw[k])
        meta["layers"] = [(str(n), int(w)) for n, w in meta["layers"]]
        if len({n for n, _ in meta["layers"]}) != len(meta["layers"]):
            raise ValueError("duplicate layer names")
        if not isinstance(meta["concepts"], list) or not all(
            isinstance(m, dict) and {"name", "supercategory"} <= set(m)
            and ("gate" in m or m.get("method", "perfusion") != "perfusion") for m in meta["concepts"]
        ):
            raise ValueError("'concepts' is not a list of concept records")
        if not isinstance(meta["base_model"], dict) or not isinstance(meta["covariance"], dict):
            raise ValueError("'base_model'/'covariance' are not records")
        meta["exact"] = meta["exact"] is True
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ConceptFileError(f"{path} has damaged metadata ({first_line(e)}); re-export or retrain it") from None
    meta["tensor_names"] = keys
    return meta


def load(path: str | Path, device: str | torch.device = "cpu") -> ConceptSet:
    """Read and check a concept file; tensors come back in float32."""
    path = Path(path)
    meta = read_metadata(path)
    layers = meta["layers"]
    total = sum(w for _, w in layers)
    concepts = []
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = set(f.keys())
            for j, m in enumerate(meta["concepts"]):
                get = lambda k: f.get_tensor(f"{j}.{k}").float()
                n_emb = sum(1 for k in names if k.startswith(f"{j}.embedding."))
                method = m.get("method", "perfusion")
                if method != "perfusion":
                    prefix = f"{j}.w."
                    concepts.append(Concept(
                        name=m["name"], supercategory=m["supercategory"], tensors=None,
                        embeddings=[get(f"embedding.{k}") for k in range(n_emb)], training=m.get("training", {}),
                        created=m.get("created", ""), method=method,
                        weights={k[len(prefix):]: f.get_tensor(k).float() for k in names if k.startswith(prefix)},
                    ))
                    continue
                i_star = get("i_star")
                K, V = get("key_targets"), get("value_targets")
                if K.numel() != total or V.numel() != total:
                    raise ConceptFileError(
                        f"{path}: targets of {m['name']!r} have {K.numel()} values, layers need {total}"
                    )
                embeddings = [get(f"embedding.{k}") for k in range(n_emb)]
                tensors = ConceptTensors(
                    i_star=i_star,
                    key_targets=dict(zip([n for n, _ in layers], K.split([w for _, w in layers]))),
                    value_targets=dict(zip([n for n, _ in layers], V.split([w for _, w in layers]))),
                    beta=float(m["gate"]["beta"]),
                    tau=float(m["gate"]["tau"]),
                )
                concepts.append(Concept(
                    name=m["name"], supercategory=m["supercategory"], tensors=tensors,
                    embeddings=embeddings, training=m.get("training", {}), created=m.get("created", ""),
                ))
    except ConceptFileError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ConceptFileError(f"{path} is damaged ({first_line(e)}); re-export or retrain it") from None
    if not concepts:
        raise ConceptFileError(f"{path} holds no concept")
    return ConceptSet(
        name=meta["name"], concepts=concepts, base_model=meta["base_model"],
        covariance=meta["covariance"], kind=meta.get("kind", "concept"), exact=bool(meta["exact"]),
        created=meta.get("created", ""), tool_version=meta.get("tool_version", ""),
    )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
