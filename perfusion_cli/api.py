"""The library API: what the CLI calls, usable from Python without it.

    from perfusion_cli import api
    entry = api.train("./photos", name="mycat", supercategory="cat", model="toyworld")
    written = api.render(["mycat on a beach"], out="renders", gates={"mycat": api.Gate(0.7, 0.15)})

    applied = api.apply(pipe, ["mycat"])          # any diffusers pipeline you loaded yourself
    image = applied("mycat on a beach", num_inference_steps=30).images[0]
    applied.remove()                              # the pipeline is exactly as before

Messages for the user go to `on_event(str)`, progress to `progress(...)`; nothing is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import concept as concept_io
from . import covariance as cov_mod
from . import models
from .concept import Concept, ConceptSet
from .errors import PerfusionError
from .images import load_photos
from .registry import Entry, Registry, validate_name
from .rendering import (SCOPES, Applied, Gate, RenderSettings, Written, check_settings, concept_scope, plan,
                        process_share, render_jobs, shard)
from .text import check_concept_word, check_supercategory, find_concepts
from .training import INFLATED_EMBEDDING, Progress, Trainer, TrainConfig

Events = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- concepts by name or path ----------------------------------------------------------------

def load_concept_set(name_or_path: str | Path, registry: Registry | None = None) -> tuple[ConceptSet, Path]:
    """A registry name ("mycat") or a path to a .safetensors concept file."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        return concept_io.load(p), p
    entry = (registry or Registry()).get(str(name_or_path))
    if entry.error:
        raise PerfusionError(f"concept {entry.name!r} is damaged ({entry.error}); `perfusion rm {entry.name}` it")
    return concept_io.load(entry.path), entry.path


def apply(pipe, concepts: list[str | Path | Concept], gates: dict[str, Gate] | None = None,
          exact: bool = True, global_lock: bool = False, check_model: bool = True,
          registry: Registry | None = None, cache: bool = True) -> Applied:
    """Apply concepts (registry names, file paths, or Concept objects) to a loaded diffusers pipeline.

    The covariance is the one perfusion uses for that pipeline's text encoder (bundled, cached or
    estimated once). With check_model, a concept trained on another base model is refused.
    """
    members: list[Concept] = []
    model_fp = models.model_fingerprint(pipe) if check_model else None
    for c in concepts:
        if isinstance(c, Concept):
            members.append(c)
            continue
        cs, path = load_concept_set(c, registry)
        if check_model and cs.base_model.get("fingerprint") != model_fp:
            raise PerfusionError(
                f"concept {cs.name!r} was trained on {cs.base_model.get('id')} (fingerprint "
                f"{cs.base_model.get('fingerprint')}), not on this pipeline ({model_fp})"
            )
        members.extend(cs.concepts)
    base = models.BaseModel(pipe=pipe, id="pipeline", profile=models.profile_for_text_encoder(pipe)
                            or models.generic_profile(pipe), device=pipe.device, dtype=pipe.unet.dtype)
    C = cov_mod.for_model(base, registry).C
    return Applied(pipe, members, C, gates=gates, exact=exact, global_lock=global_lock, cache=cache)


# -- train ------------------------------------------------------------------------------------

def train(
    images: str | Path,
    name: str,
    supercategory: str,
    model: str = models.DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    config: TrainConfig | None = None,
    force: bool = False,
    fp32: bool = False,
    resume: bool = False,
    registry: Registry | None = None,
    progress: Callable[[Progress], None] | None = None,
    on_event: Events = _quiet,
    method: str = "perfusion",
    method_config=None,
) -> Entry:
    """Train a concept from a folder of photos and store it in the registry under `name`.

    method: "perfusion" (config: TrainConfig), or a baseline of methods.py (method_config: a
    methods.MethodConfig; default methods.recipe(method) with config's steps, batch size, seed, templates).
    """
    reg = registry or Registry()
    validate_name(name)
    if not force and (reg.user_path(name).exists() or reg.bundled_path(name).exists()):
        raise PerfusionError(f"concept {name!r} already exists; use --force to overwrite or choose another --name")
    from .training import check_config, config_for

    _, prof, _ = models.resolve(model)
    cfg = config or config_for(prof.train if prof else None)   # no config: the model's recipe (its profile)
    check_config(cfg)
    photos = load_photos(images, prof.resolution) if prof else None  # fail fast, before loading a model
    on_event(f"loading base model {model}")
    # Perfusion trains in bf16 on a CUDA GPU that has it (models.pick_dtype); the baselines keep the render dtype
    # (fp16 under bf16 autocast): their bf16 paths were never measured
    base = models.load(model, device=device, dtype=dtype, training=method == "perfusion")
    if photos is None:
        photos = load_photos(images, base.resolution)
    for s in photos.skipped:
        on_event(f"warning: skipped unreadable image {s}")
    on_event(f"{len(photos.paths)} photos at {base.resolution}px")
    supercategory = check_supercategory(base.pipe, supercategory)
    check_concept_word(base.pipe, name)
    cov = cov_mod.for_model(base, reg)
    on_event(f"text-encoder covariance: {cov.source}")
    if method != "perfusion":
        from . import methods

        mcfg = method_config or methods.recipe(method, steps=cfg.steps, batch_size=cfg.batch_size * cfg.grad_accum,
                                               seed=cfg.seed, templates=list(cfg.templates))
        on_event(f"method {method}: {mcfg.steps} steps, lr {mcfg.lr:g}" + (f", embedding lr {mcfg.lr_embedding:g}"
                                                                          if mcfg.lr_embedding else ""))
        concept = methods.train_baseline(base, name, supercategory, photos, mcfg, progress=progress, on_event=on_event)
        cs = ConceptSet(name=name, concepts=[concept],
                        base_model={"id": base.id, "fingerprint": base.fingerprint, "family": base.family},
                        covariance=cov.info)
        return reg.put(name, concept_io.to_bytes(cs, torch.float32 if fp32 else torch.float16), force=force)
    trainer = Trainer(base, name, supercategory, _inverse(cov.C), cfg)
    workdir = reg.root / "runs" / name

    validate = None
    if cfg.validate_every:
        validate = _validator(base, name, supercategory, cov.C, workdir, on_event)
    concept = trainer.fit(photos, progress=progress, workdir=workdir, resume=resume, validate=validate)
    ratio = concept.training.get("embedding_norm_ratio", 0.0)
    if ratio > INFLATED_EMBEDDING:
        on_event(f"warning: the learned embedding is {ratio:.1f}x a typical word's norm; the concept may bleed into "
                 f"the rest of prompts (lower --lr-embedding than {cfg.lr_embedding:g}; PERFUSION.md §11b)")
    cs = ConceptSet(
        name=name, concepts=[concept],
        base_model={"id": base.id, "fingerprint": base.fingerprint, "family": base.family},
        covariance=cov.info,
    )
    entry = reg.put(name, concept_io.to_bytes(cs, torch.float32 if fp32 else torch.float16), force=force)
    (workdir / "checkpoint.safetensors").unlink(missing_ok=True)
    return entry


def _inverse(C):
    from .edit import inverse_covariance

    return inverse_covariance(C)


def _validator(base, name, supercategory, C, workdir: Path, on_event: Events):
    from .rendering import png_bytes, write_atomic

    prompts = [f"a {name}", f"a {name} on a beach", f"a {name} in the snow"]

    def validate(step: int, tensors, embeddings) -> None:
        c = Concept(name=name, supercategory=supercategory, tensors=tensors, embeddings=embeddings)
        folder = workdir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        s = base.profile.render
        with Applied(base.pipe, [c], C) as applied, torch.no_grad():
            images = applied(
                prompts, num_inference_steps=int(s.get("steps", 30)), guidance_scale=float(s.get("cfg", 7.5)),
                height=base.resolution, width=base.resolution,
                generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
            ).images
        from PIL import Image

        w = images[0].width
        sheet = Image.new("RGB", (w * len(images), images[0].height))
        for i, im in enumerate(images):
            sheet.paste(im, (i * w, 0))
        path = folder / f"step-{step:05d}.png"
        write_atomic(path, png_bytes(sheet, " | ".join(prompts), {"step": step, "prompts": prompts}))
        on_event(f"validation renders: {path}")

    return validate


# -- render -----------------------------------------------------------------------------------

@dataclass
class Resolved:
    prompts: list[str]               # with combination names expanded to their members
    concepts: dict[str, Concept]     # every concept named by some prompt
    sets: dict[str, ConceptSet]      # by registry entry name
    hashes: dict[str, str]           # concept name -> sha256 of the file it came from
    exact: bool


def resolve_prompts(prompts: list[str], registry: Registry, on_event: Events = _quiet) -> Resolved:
    """Find registry entries named in the prompts; expand combinations ("pets" -> "mycat and mydog")."""
    entries = {e.name: e for e in registry.entries() if not getattr(e, "shadowed", False)}
    out_prompts, concepts, sets, hashes, exact = [], {}, {}, {}, True
    for p in prompts:
        for name in find_concepts(p, entries):
            e = entries[name]
            if e.error:
                raise PerfusionError(f"concept {name!r} is damaged ({e.error}); `perfusion rm {name}` and retrain it")
            if name not in sets:
                sets[name] = concept_io.load(e.path)
            cs = sets[name]
            if cs.kind == "combination":
                from .text import rewrite

                p = rewrite(p, {name: " and ".join(c.name for c in cs.concepts)})
                exact = exact and cs.exact
            for c in cs.concepts:
                if c.name in concepts and concepts[c.name] is not c and hashes[c.name] != e.sha256:
                    on_event(f"note: {c.name!r} comes from {name!r} here")
                concepts[c.name] = c
                hashes[c.name] = e.sha256
        out_prompts.append(p)
    return Resolved(out_prompts, concepts, sets, hashes, exact)


def render(
    prompts: list[str],
    out: str | Path = ".",
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    settings: RenderSettings | None = None,
    gates: dict[str, Gate] | None = None,
    beta: float | None = None,
    tau: float | None = None,
    registry: Registry | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_event: Events = _quiet,
    defaults_from_profile: bool = True,
    scale: float | None = None,
    scales: dict[str, float] | None = None,
    scope: str | None = None,
) -> list[Written]:
    """Render prompts (which may name concepts) to PNG files in `out`; returns what was written.

    `beta`/`tau`/`scope` set every concept's gate (scope: rendering.SCOPES; a concept's default is the scope it was
    trained with); `gates` set single concepts (they win). `scale`/`scales` do the
    same for the strength of weight-based baselines (LoRA, DreamBooth, Custom Diffusion; 1 = as trained).
    Without `model`, the base model is the one the named concepts were trained on.
    """
    reg = registry or Registry()
    prompts = [p for p in (q.strip() for q in prompts) if p]
    if not prompts:
        raise PerfusionError("no prompt given; pass a prompt, or --prompts FILE (one prompt per line)")
    settings = settings or RenderSettings()
    check_settings(settings, partial=True)
    if dtype not in ("auto", *models.DTYPES):
        raise PerfusionError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    res = resolve_prompts(prompts, reg, on_event)
    models_used = {cs.base_model.get("id") for cs in res.sets.values()}
    if model is None:
        if len(models_used) > 1:
            raise PerfusionError(f"the prompts use concepts of different base models ({', '.join(sorted(models_used))}); pass --model")
        model = next(iter(models_used)) if models_used else models.DEFAULT_MODEL
    for b in ([beta] if beta is not None else []) + [g.beta for g in (gates or {}).values()]:
        if not 0.0 <= b <= 1.0:
            raise PerfusionError(f"--bias must be between 0 and 1, got {b}")
    for t in ([tau] if tau is not None else []) + [g.tau for g in (gates or {}).values()]:
        if not 0.0 < t <= 1.0:
            raise PerfusionError(f"--temperature must be in (0, 1], got {t}")
    for sc in ([scope] if scope is not None else []) + [g.scope for g in (gates or {}).values()]:
        if sc not in SCOPES:
            raise PerfusionError(f"--gate-scope {sc!r} is not one of {', '.join(SCOPES)}")
    unknown = set(gates or {}) - set(res.concepts)
    if unknown:
        raise PerfusionError(f"--bias/--temperature name {', '.join(sorted(unknown))}, which no prompt uses")
    all_scales = weight_scales(res.concepts, scale, scales)
    rank, world, local_rank = process_share()
    if world > 1:
        if settings.seed is None:
            raise PerfusionError("pass --seed when rendering with several processes, so that they share one seed plan")
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    on_event(f"loading base model {model}")
    base = models.load(model, device=device, dtype=dtype)
    fp = base.fingerprint
    for name, cs in res.sets.items():
        if cs.base_model.get("fingerprint") != fp:
            raise PerfusionError(
                f"concept {name!r} was trained on {cs.base_model.get('id')} (fingerprint {cs.base_model.get('fingerprint')}); "
                f"--model {model} is {base.id} ({fp}): render it with --model {cs.base_model.get('id')}"
            )
    if defaults_from_profile:
        s = base.profile.render
        settings.steps = settings.steps or int(s.get("steps", 50))
        settings.cfg = settings.cfg if settings.cfg is not None else float(s.get("cfg", 7.5))
        settings.sampler = settings.sampler or s.get("sampler", "ddim")
        settings.height = settings.height or base.resolution
        settings.width = settings.width or base.resolution
    settings.exact = settings.exact and res.exact
    C = None
    if res.concepts:
        cov = cov_mod.for_model(base, reg)
        C = cov.C
        for name, cs in res.sets.items():
            if any(c.is_perfusion for c in cs.concepts) and cs.covariance.get("fingerprint") != cov.fingerprint:
                on_event(f"warning: {name!r} was trained with covariance {cs.covariance.get('fingerprint')}, "
                         f"rendering with {cov.fingerprint} ({cov.source})")
    all_gates = {}
    for n, c in res.concepts.items():
        if not c.is_perfusion:
            continue  # a baseline method's concept has no gate
        g = Gate(c.tensors.beta if beta is None else beta, c.tensors.tau if tau is None else tau,
                 scope=concept_scope(c) if scope is None else scope)
        all_gates[n] = (gates or {}).get(n, g)
    jobs = plan(res.prompts, settings, res.concepts)
    if world > 1:
        jobs = shard(jobs, rank, world)
        on_event(f"process {rank + 1} of {world}: {len(jobs)} image(s)")
    model_info = {"id": base.id, "fingerprint": fp}
    return render_jobs(base.pipe, jobs, res.concepts, C, settings, Path(out), model_info, res.hashes,
                       all_gates, progress, all_scales)


SCALE_RANGE = (0.0, 4.0)   # a LoRA scale above ~2 only overdrives the weights; 0 removes the concept's effect


def weight_scales(concepts: dict, scale: float | None, scales: dict[str, float] | None) -> dict[str, float]:
    """Per-concept strength of the weight-based baselines named in the prompts (`--scale`), checked: a
    Perfusion concept's knob is its gate (--bias), Textual Inversion has no weights to scale."""
    scales = dict(scales or {})
    for v in ([scale] if scale is not None else []) + list(scales.values()):
        if not SCALE_RANGE[0] <= v <= SCALE_RANGE[1]:
            raise PerfusionError(f"--scale must be between {SCALE_RANGE[0]:g} and {SCALE_RANGE[1]:g}, got {v:g}")
    scalable = {n for n, c in concepts.items() if not c.is_perfusion and c.weights}
    for n in scales:
        c = concepts.get(n)
        if c is None:
            raise PerfusionError(f"--scale name {n!r}, which no prompt uses (prompts use: "
                                 f"{', '.join(concepts) or 'no concept'})")
        if n not in scalable:
            hint = "use --bias for a Perfusion concept" if c.is_perfusion else "it has no weights to scale"
            raise PerfusionError(f"--scale {n!r}: a {c.method} concept has no scale ({hint})")
    if scale is not None and not scalable:
        raise PerfusionError("--scale: no prompt names a LoRA, DreamBooth or Custom Diffusion concept "
                             "(Perfusion concepts take --bias)")
    return {n: scales.get(n, 1.0 if scale is None else scale) for n in scalable}


# -- combine ----------------------------------------------------------------------------------

def combine(names: list[str], name: str, exact: bool = True, gates: dict[str, Gate] | None = None,
            dry_run: bool = False, force: bool = False, registry: Registry | None = None
            ) -> tuple[ConceptSet, Entry | None, int]:
    """One registry entry holding several concepts. Returns (set, entry or None on dry run, bytes)."""
    reg = registry or Registry()
    validate_name(name)
    if len(names) < 2:
        raise PerfusionError("combine needs at least two concepts")
    sets = []
    for n in names:
        cs, _ = load_concept_set(n, reg)
        sets.append((n, cs))
    ref_name, ref = sets[0]
    for n, cs in sets[1:]:
        if cs.base_model.get("fingerprint") != ref.base_model.get("fingerprint"):
            raise PerfusionError(
                f"cannot combine {ref_name!r} ({ref.base_model.get('id')}, {ref.base_model.get('fingerprint')}) with "
                f"{n!r} ({cs.base_model.get('id')}, {cs.base_model.get('fingerprint')}): different base models"
            )
        if cs.covariance.get("fingerprint") != ref.covariance.get("fingerprint"):
            raise PerfusionError(
                f"cannot combine {ref_name!r} and {n!r}: trained with different covariances "
                f"({ref.covariance.get('fingerprint')} vs {cs.covariance.get('fingerprint')})"
            )
    members: list[Concept] = []
    for _, cs in sets:
        for c in cs.concepts:
            if not c.is_perfusion:
                raise PerfusionError(f"{c.name!r} is a {c.method} concept: combine joins Perfusion concepts only "
                                     "(render a baseline's concept alone)")
            if any(m.name == c.name for m in members):
                raise PerfusionError(f"concept {c.name!r} appears twice in the combination")
            members.append(c)
    if name in {m.name for m in members}:
        raise PerfusionError(f"the combination cannot be named like its member {name!r}; choose another --name")
    for g_name, g in (gates or {}).items():
        m = next((m for m in members if m.name == g_name), None)
        if m is None:
            raise PerfusionError(f"--bias names {g_name!r}, which is not in the combination")
        m.tensors.beta, m.tensors.tau = g.beta, g.tau
    out = ConceptSet(name=name, concepts=members, base_model=ref.base_model, covariance=ref.covariance,
                     kind="combination", exact=exact)
    data = concept_io.to_bytes(out)
    if dry_run:
        return out, None, len(data)
    return out, reg.put(name, data, force=force), len(data)
