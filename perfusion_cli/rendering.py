"""Prompts → images with concepts: apply concepts to a pipeline, sample, write PNGs with metadata.

`Applied` is the Python entry point: concepts applied to any diffusers pipeline, called like the
pipeline, with prompts that name the concepts ("mycat on a beach"). `remove()` (or leaving a `with`
block) restores the pipeline exactly.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import PngImagePlugin

from . import patch as patching
from .concept import Concept
from .errors import PerfusionError
from .text import EmbeddingOverride, encode, rewrite


# Where a Perfusion concept's edit acts (PERFUSION.md §11c): "prompt", on every token whose encoding opens its gate
# (the paper); "word", only on the concept word's own tokens
SCOPES = ("prompt", "word")


@dataclass
class Gate:
    beta: float
    tau: float
    rome: bool = False   # replace the gate σ((s − β)/τ) by s(e): plain ROME, an ablation (PERFUSION.md §2)
    scope: str = "prompt"  # one of SCOPES


def concept_scope(concept: Concept) -> str:
    """The scope a Perfusion concept renders with by default: the one it was trained with (older files: "prompt")."""
    return (concept.training or {}).get("gate_scope", "prompt")


def default_gate(concept: Concept) -> Gate:
    """A Perfusion concept's stored gate: its default β, τ and the scope it was trained with."""
    return Gate(concept.tensors.beta, concept.tensors.tau, scope=concept_scope(concept))


class Applied:
    """Concepts applied to a diffusers pipeline (Stable Diffusion 1.x/2.x/XL).

    concepts:     the concepts (concept.Concept), each usable by its name in prompts
    C:            the base model's text-encoding covariance (d, d) (covariance.for_model)
    gates:        per-concept β/τ overrides by name (Gate.rome: plain ROME instead of the gate, an
                  ablation; Gate.scope: "word" confines the edit to the concept word's tokens); others use
                  the concept's stored defaults
    exact:        exact (C⁻¹-orthonormal) or approximate multi-concept edit (PERFUSION.md §8)
    global_lock:  K path reads the prompt with supercategory words in place of concepts (§4)
    cache:        compute each layer's edited K/V once per call and reuse it at every denoising step
    scales:       weight-based baselines' strength by name (methods.AppliedWeights)
    C_inv:        edit.inverse_covariance(C), when the caller has it already (a render job's concept groups)
    """

    def __init__(self, pipe, concepts: list[Concept], C: torch.Tensor | None, gates: dict[str, Gate] | None = None,
                 exact: bool = True, global_lock: bool = False, cache: bool = True,
                 scales: dict[str, float] | None = None, C_inv: torch.Tensor | None = None):
        from .edit import inverse_covariance
        from .methods import apply_weights

        self.pipe, self.concepts, self.global_lock = pipe, list(concepts), global_lock
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise PerfusionError(f"two concepts share a name: {names}")
        gates, scales = gates or {}, scales or {}
        perf = [c for c in self.concepts if c.is_perfusion]
        self.perf = [c.name for c in perf]
        self.gates = {c.name: gates.get(c.name, default_gate(c)) for c in perf}
        for n, g in self.gates.items():
            if g.scope not in SCOPES:
                raise PerfusionError(f"unknown gate scope {g.scope!r} for {n}; choose one of {', '.join(SCOPES)}")
        self.supers = {c.name: c.written_as for c in self.concepts}   # name -> words the pipeline reads
        # Baselines' weights go on first, so that the K/V cache below memoises their outputs too.
        self.weights = []
        try:
            for c in self.concepts:
                if not c.is_perfusion:
                    self.weights.append(apply_weights(pipe.unet, c.method, c.weights, scales.get(c.name, 1.0)))
            if perf:
                self.patch = patching.apply(
                    pipe.unet, [c.tensors for c in perf], inverse_covariance(C) if C_inv is None else C_inv, exact=exact,
                    betas=[self.gates[c.name].beta for c in perf], taus=[self.gates[c.name].tau for c in perf],
                    labels=[c.name for c in perf], cache=cache,
                    linear_gates=[self.gates[c.name].rome for c in perf],
                    scoped=[self.gates[c.name].scope == "word" for c in perf],
                )
            else:
                self.patch = patching.attach(pipe.unet, cache=cache)
        except ValueError as e:
            self._remove_weights()
            raise PerfusionError(f"{e}; was it trained on another base model?") from None
        except Exception:
            self._remove_weights()
            raise
        self.override = EmbeddingOverride(pipe)
        self.override.set_concepts([c.embeddings for c in self.concepts])

    def _remove_weights(self) -> None:
        for w in reversed(self.weights):
            w.remove()
        self.weights = []

    def prepare(self, prompts: list[str]) -> list[str]:
        """Register prompts that name concepts; returns them as the pipeline must be given them."""
        self.override.clear_prompts()
        self.patch.key_swaps.clear()
        self.patch.scopes.clear()
        self.patch.clear_cache()
        rewritten = []
        for p in prompts:
            self.override.add_prompt(p, self.supers)
            rewritten.append(rewrite(p, self.supers))
        scoped = self.patch.scope_default is not None
        if self.global_lock or scoped:
            with torch.no_grad():
                unique = list(dict.fromkeys(rewritten))
                e_concept = encode(self.pipe, unique).embeds
                if self.global_lock:
                    slots, self.override.slots = self.override.slots, [[] for _ in self.override.slots]
                    e_super = encode(self.pipe, unique).embeds
                    self.override.slots = slots
                    self.patch.key_swaps.extend(patching.KeySwap(c, s) for c, s in zip(e_concept, e_super))
            if scoped:
                self.patch.scopes.extend(patching.TokenScope(e, self.token_scope(p)) for e, p in zip(e_concept, unique))
        return rewritten

    def token_scope(self, rewritten: str) -> torch.Tensor:
        """(L, n) scope of a registered prompt (as rewritten for the pipeline) over the Perfusion concepts: a
        "prompt"-scoped concept's column is 1 everywhere, a "word"-scoped one's is 1 at its word's tokens (in any
        of the pipeline's tokenizers: SDXL's two tokenize alike but need not)."""
        from .text import token_rows

        names = [c.name for c in self.concepts]
        length = len(token_rows(self.override.stack[0][0], rewritten))
        cols = []
        for n in self.perf:
            col = torch.zeros(length, dtype=torch.bool)
            if self.gates[n].scope != "word":
                col[:] = True
            for k, (tok, _) in enumerate(self.override.stack):
                ids = token_rows(tok, rewritten)
                for slot in self.override.slots[k]:
                    if slot.concept == names.index(n) and slot.ids.shape == ids.shape and bool((slot.ids == ids).all()):
                        col |= slot.mask
            cols.append(col.float())
        return torch.stack(cols, -1)

    def __call__(self, prompt: str | list[str], **kwargs):
        """Run the pipeline on `prompt` (which may name the concepts); kwargs go to the pipeline."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        try:
            return self.pipe(prompt=self.prepare(prompts), **kwargs)
        finally:
            self.patch.clear_cache()  # drop the cached K/V (and the references they hold)

    def remove(self) -> None:
        self.patch.remove()
        self.override.remove()
        self._remove_weights()

    def __enter__(self) -> "Applied":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# -- the CLI's render job -------------------------------------------------------------------

@dataclass
class RenderSettings:
    steps: int = 30
    cfg: float = 7.5
    negative: str = ""
    height: int = 512
    width: int = 512
    sampler: str = "ddim"
    n: int = 1                     # images per prompt
    seed: int | None = None        # image i of the run gets seed + i; None: a random base seed
    batch_size: int = 4            # images per pipeline call
    global_lock: bool = False
    exact: bool = True
    name_template: str = "{index:04d}-{slug}-{seed}.png"


@dataclass
class Job:
    prompt: str
    concepts: list[str]            # names of the concepts this prompt uses
    seed: int
    index: int                     # position in the run
    image: int                     # position among this prompt's images
    prompt_index: int = 0          # position of the prompt in the run


@dataclass
class Written:
    path: str
    prompt: str
    seed: int
    concepts: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def check_settings(s: RenderSettings, partial: bool = False) -> None:
    """Raise PerfusionError for a bad setting. partial: 0/None/"" mean "not set yet" (profile default)."""
    from .models import SAMPLERS

    if s.steps <= 0 and not (partial and s.steps == 0):
        raise PerfusionError(f"--steps must be positive, got {s.steps}")
    if s.n <= 0:
        raise PerfusionError(f"-n must be positive, got {s.n}")
    if s.batch_size <= 0:
        raise PerfusionError(f"--batch-size must be positive, got {s.batch_size}")
    if s.cfg is not None and s.cfg < 0:
        raise PerfusionError(f"--cfg must be ≥ 0, got {s.cfg}")
    if s.sampler and s.sampler not in SAMPLERS:
        raise PerfusionError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    for label, v in (("--height", s.height), ("--width", s.width)):
        if partial and v == 0:
            continue
        if v <= 0 or v % 8:
            raise PerfusionError(f"{label} must be a positive multiple of 8, got {v}")
    try:
        s.name_template.format(index=0, seed=0, slug="x", image=0, prompt_index=0)
    except (KeyError, IndexError, ValueError) as e:
        raise PerfusionError(
            f"--name-template {s.name_template!r} is invalid ({e}); fields: index, seed, slug, image, prompt_index"
        ) from None


def plan(prompts: list[str], settings: RenderSettings, concept_names) -> list[Job]:
    from .text import find_concepts

    base = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
    jobs = []
    for p_i, p in enumerate(prompts):
        names = find_concepts(p, concept_names)
        for k in range(settings.n):
            i = len(jobs)
            jobs.append(Job(prompt=p, concepts=names, seed=base + i, index=i, image=k, prompt_index=p_i))
    return jobs


def process_share() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process in a data-parallel launch (accelerate launch,
    torchrun), read from the environment they set; (0, 1, 0) when run alone."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", env.get("PROCESS_INDEX", "0")) or 0)
    local = int(env.get("LOCAL_RANK", env.get("LOCAL_PROCESS_INDEX", str(rank))) or 0)
    return (rank, world, local) if world > 1 else (0, 1, 0)


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This process's share: every world-th job. Seeds were fixed by `plan` before sharding, so the
    images are those of a single-process run."""
    return [j for j in jobs if j.index % world == rank]


def slug(prompt: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def png_bytes(image, parameters: str, record: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("perfusion", json.dumps(record))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def a1111_parameters(job: Job, s: RenderSettings, model: dict, concepts: list[dict]) -> str:
    lines = [job.prompt]
    if s.negative:
        lines.append(f"Negative prompt: {s.negative}")
    fields = [
        f"Steps: {s.steps}", f"Sampler: {s.sampler}", f"CFG scale: {s.cfg}", f"Seed: {job.seed}",
        f"Size: {s.width}x{s.height}", f"Model: {model['id']}", f"Model hash: {model['fingerprint']}",
    ]
    if concepts:
        fields.append("Perfusion: " + ", ".join(
            f"{c['name']}:{c['beta']}:{c['tau']}:{c['sha256'][:12]}" if c.get("beta") is not None else
            f"{c['name']}:{c.get('method')}:{c['sha256'][:12]}" for c in concepts))
        fields.append(f"Perfusion lock: {'global' if s.global_lock else 'local'}")
        word = [c["name"] for c in concepts if c.get("scope") == "word"]
        if word:
            fields.append(f"Perfusion word scope: {' '.join(word)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".perfusion-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PerfusionError(f"output folder {out} is not writable ({e.strerror or e}); pass another -o DIR") from None


def _write_error(e: OSError, path: Path) -> PerfusionError:
    if e.errno == 28:
        return PerfusionError(f"disk full while writing {path}; free space and rerun")
    return PerfusionError(f"cannot write {path}: {e.strerror or e}")


def write_new(out: Path, name: str, data: bytes) -> Path:
    """Write `data` under `name` in `out` without ever replacing a file: if the name is taken (an
    earlier run, or another process of a data-parallel render), add -1, -2, … The bytes go to a
    temporary file first and are published with a hard link, which fails instead of clobbering."""
    path = out / name
    if path.suffix.lower() != ".png":
        path = path.with_suffix(path.suffix + ".png")
    tmp = out / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        stem, k, candidate = path.stem, 1, path
        while True:
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                candidate = path.with_name(f"{stem}-{k}.png")
                k += 1
            except OSError as e:
                if e.errno not in (1, 18, 38, 95):  # EPERM, EXDEV, ENOSYS, EOPNOTSUPP: no hard links here
                    raise
                while candidate.exists():
                    candidate = path.with_name(f"{stem}-{k}.png")
                    k += 1
                os.replace(tmp, candidate)
                return candidate
    except OSError as e:
        raise _write_error(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(e, path) from None


def render_jobs(
    pipe,
    jobs: list[Job],
    concepts: dict[str, Concept],
    C: torch.Tensor,
    settings: RenderSettings,
    out: Path,
    model: dict,
    hashes: dict[str, str],
    gates: dict[str, Gate] | None = None,
    progress: Callable[[int, int], None] | None = None,
    scales: dict[str, float] | None = None,
) -> list[Written]:
    """Render `jobs`, grouping those that use the same concepts into pipeline batches.

    Concepts are applied per group only, so a prompt never carries a concept it does not name.
    `scales`: weight-based baselines' strength by name (LoRA scale; 1 = as trained). `progress(done, total)`
    counts denoising steps over all batches.
    """
    from .models import set_sampler

    check_settings(settings)
    check_output_dir(out)
    set_sampler(pipe, settings.sampler)
    gates = gates or {}
    written: list[Written] = []
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.concepts), []).append(job)
    import math

    total_steps = settings.steps * sum(math.ceil(len(g) / settings.batch_size) for g in groups.values())
    done_steps = 0

    def step_done(pipe_, i, t, callback_kwargs):
        nonlocal done_steps
        done_steps += 1
        if progress:
            progress(min(done_steps, total_steps), total_steps)
        return callback_kwargs

    from .edit import inverse_covariance

    C_inv = None
    if C is not None and any(concepts[n].is_perfusion for names in groups for n in names):
        C_inv = inverse_covariance(C)   # once per job, not once per concept group
    for names, group in groups.items():
        applied = Applied(pipe, [concepts[n] for n in names], C, gates, settings.exact, settings.global_lock,
                          scales=scales, C_inv=C_inv) if names else None
        plain = None if names else patching.attach(pipe.unet, cache=True)  # the K/V cache alone
        try:
            for start in range(0, len(group), settings.batch_size):
                batch = group[start:start + settings.batch_size]
                prompts = [j.prompt for j in batch]
                kwargs = dict(
                    num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                    height=settings.height, width=settings.width,
                    negative_prompt=[settings.negative] * len(batch) if settings.negative else None,
                    generator=[torch.Generator(device="cpu").manual_seed(j.seed) for j in batch],
                    callback_on_step_end=step_done,
                )
                with torch.no_grad():
                    if applied:
                        result = applied(prompts, **kwargs)
                    else:
                        result = pipe(prompt=prompts, **kwargs)
                        plain.clear_cache()
                for job, image in zip(batch, result.images):
                    used = [{
                        "name": n,
                        "method": concepts[n].method,
                        "beta": (applied.gates[n].beta if applied and n in applied.gates else None),
                        "tau": (applied.gates[n].tau if applied and n in applied.gates else None),
                        "scope": (applied.gates[n].scope if applied and n in applied.gates else None),
                        "scale": (None if concepts[n].is_perfusion or not concepts[n].weights
                                  else (scales or {}).get(n, 1.0)),
                        "sha256": hashes.get(n, ""),
                    } for n in job.concepts]
                    record = asdict(Written(path="", prompt=job.prompt, seed=job.seed, concepts=used,
                                            settings={**asdict(settings), "seed": job.seed, "model": model}))
                    name = settings.name_template.format(
                        index=job.index, seed=job.seed, slug=slug(job.prompt), image=job.image,
                        prompt_index=job.prompt_index,
                    )
                    embedded = {k: v for k, v in record.items() if k != "path"}
                    path = write_new(out, name, png_bytes(image, a1111_parameters(job, settings, model, used), embedded))
                    record["path"] = str(path)
                    written.append(Written(**record))
        finally:
            if applied:
                applied.remove()
            if plain:
                plain.remove()
    return written
