"""`perfusion demo`: the whole job on the embedded toy model, offline, on a CPU, with numbers.

1. The user's photos: `photo_set(instance)` of a toy-world instance the base model never saw (by default
   `patchcat`, a white cat with a black eye patch and a gold star), written as PNG files.
2. Training: `perfusion train PHOTOS --super cat --name mycat` on `--model toyworld` (the library's Trainer,
   with the toy profile's recipe), into a temporary registry unless `keep` names the user's.
3. Rendering: each prompt ("a mycat on a beach", ...) at each gate bias β, `seeds` images each, and the base
   model's own renders of the same prompts with the supercategory ("a cat on a beach"), same seeds.
4. Scores (the toy world's evaluators, docs/toyworld-evaluators.md): fidelity, how close the rendered object
   is to the instance's photos; alignment, how well the image matches the prompt with the concept word read
   as its supercategory (as the paper measures prompt alignment). Means per bias, and for the base model.
5. A contact sheet PNG: the photos, then one row per prompt: base model, then each bias.

Library code: prints nothing; progress through callbacks. The CLI is `perfusion demo` (cli/demo.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PerfusionError

DEFAULT_PROMPTS = ("a {} on a beach", "a {} in the snow", "a {} and a red ball on grass")


@dataclass
class DemoConfig:
    instance: str = "patchcat"       # a development instance of the toy world (toyworld.DEV_INSTANCES)
    name: str = "mycat"              # the concept word
    photos: int = 6                  # photos in the set (4-8 is typical)
    steps: int | None = None         # training steps (None: the toyworld profile's, 400)
    biases: tuple[float, ...] = (0.55, 0.7, 0.85)  # gate biases β rendered from the one trained file
    prompts: tuple[str, ...] = DEFAULT_PROMPTS     # "{}" is the concept (or, for the base model, its supercategory)
    seeds: int = 2                   # images per prompt and bias (seeds seed, seed+1, ...)
    seed: int = 0                    # training seed and first render seed
    device: str = "cpu"              # the demo is meant for a CPU; "auto" takes a GPU where there is one
    render_steps: int | None = None  # sampling steps (None: the profile's, 30)


@dataclass
class DemoResult:
    config: dict
    out: str
    sheet: str
    photos_dir: str
    concept: dict                    # name, supercategory, size of the concept file, where it was kept (if kept)
    scores: list[dict]               # {"label", "beta" (None for the base model), "fidelity", "alignment"}
    per_image: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[str, int, int], None]
Events = Callable[[str], None]


def _quiet(*_) -> None:
    pass


def check_config(cfg: DemoConfig) -> None:
    from . import world as tw
    from ..registry import validate_name

    if cfg.instance not in tw.INSTANCES_BY_NAME:
        names = ", ".join(i.name for i in tw.INSTANCES)
        raise PerfusionError(f"unknown instance {cfg.instance!r}; choose one of: {names}")
    validate_name(cfg.name)
    if not 1 <= cfg.photos <= 12:
        raise PerfusionError(f"--photos must be between 1 and 12, got {cfg.photos}")
    if cfg.steps is not None and cfg.steps < 1:
        raise PerfusionError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.seeds < 1:
        raise PerfusionError(f"--seeds must be at least 1, got {cfg.seeds}")
    if not cfg.biases or any(not 0.0 <= b <= 1.0 for b in cfg.biases):
        raise PerfusionError(f"--bias values must be between 0 and 1, got {list(cfg.biases)}")
    bad = [p for p in cfg.prompts if p.count("{}") != 1]
    if not cfg.prompts or bad:
        raise PerfusionError(f"each prompt needs exactly one {{}} where the concept goes: {bad or 'none given'}")


def prepare_out(out: Path, force: bool) -> None:
    """The demo writes into `out`: refuse a non-empty folder (unless force) or a file."""
    if out.exists() and not out.is_dir():
        raise PerfusionError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PerfusionError(f"--out {out}: folder is not empty; pass --force or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerfusionError(f"cannot create {out}: {e.strerror or e}; pass another --out") from None


def write_photos(instance: str, n: int, folder: Path, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The instance's photo set as PNG files (photo-0.png, ...): what a user would train on."""
    from PIL import Image

    from . import world as tw

    images, captions = tw.photo_set(instance, n=n, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"photo-{i}.png")
    return images, captions


def run_demo(out, config: DemoConfig | None = None, progress: Progress | None = None, on_event: Events = _quiet,
             keep=None, force: bool = False) -> DemoResult:
    """Run the demo into folder `out` (see the module docstring). keep: a registry.Registry to store the
    trained concept in (None: a temporary registry inside `out`, removed afterwards)."""
    from .. import covariance, models
    from ..concept import ConceptSet, to_bytes
    from ..edit import inverse_covariance
    from ..images import load_photos
    from ..rendering import Applied, Gate
    from ..training import Trainer, config_for
    from . import evaluate as ev
    from . import world as tw

    cfg = config or DemoConfig()
    check_config(cfg)
    progress = progress or _quiet
    out = Path(out)
    if keep is not None and not force and (keep.user_path(cfg.name).exists() or keep.bundled_path(cfg.name).exists()):
        raise PerfusionError(f"concept {cfg.name!r} already exists in your registry; pass --force or another --name")
    prepare_out(out, force)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    instance = tw.INSTANCES_BY_NAME[cfg.instance]
    sup = instance.supercategory
    photos_dir = out / "photos"
    on_event(f"photos: {cfg.photos} of {instance.name!r} ({instance.description}) in {photos_dir}")
    photo_images, _ = write_photos(instance.name, cfg.photos, photos_dir, cfg.seed)

    on_event("loading the toy base model")
    base = models.load("toyworld", device=cfg.device, dtype="fp32")
    cov = covariance.for_model(base, keep)
    seconds["setup"] = time.perf_counter() - t0

    tcfg = config_for(base.profile.train, steps=cfg.steps or None, seed=cfg.seed, checkpoint_every=0)
    steps = tcfg.steps
    on_event(f"training {cfg.name!r} (--super {sup}): {steps} steps")
    t = time.perf_counter()
    trainer = Trainer(base, cfg.name, sup, inverse_covariance(cov.C), tcfg)
    concept = trainer.fit(load_photos(photos_dir, base.resolution),
                          progress=lambda p: progress("training", p.step, p.steps))
    seconds["training"] = time.perf_counter() - t
    cs = ConceptSet(name=cfg.name, concepts=[concept],
                    base_model={"id": base.id, "fingerprint": base.fingerprint, "family": base.family},
                    covariance=cov.info)
    data = to_bytes(cs, torch.float16)
    concept_info = {"name": cfg.name, "supercategory": sup, "bytes": len(data), "final_loss":
                    concept.training.get("final_loss"), "kept": None}
    if keep is not None:
        entry = keep.put(cfg.name, data, force=force)
        concept_info["kept"] = str(entry.path)
        on_event(f"kept {cfg.name!r} in your registry: {entry.path}")

    # -- renders: base model (supercategory) and the concept at each bias, same seeds
    render = base.profile.render or {}
    kw = dict(height=base.resolution, width=base.resolution, output_type="np",
              num_inference_steps=cfg.render_steps or int(render.get("steps", 30)),
              guidance_scale=float(render.get("cfg", 4.0)))
    models.set_sampler(base.pipe, render.get("sampler", "ddim"))
    columns: list[tuple[str, float | None]] = [("base model", None)] + [(f"bias {b:g}", b) for b in cfg.biases]
    total = len(columns) * len(cfg.prompts) * cfg.seeds
    done = 0
    t = time.perf_counter()
    images: dict[tuple[int, int], list[np.ndarray]] = {}   # (column, prompt) -> images over seeds
    for ci, (label, beta) in enumerate(columns):
        applied = None
        if beta is not None:
            applied = Applied(base.pipe, [concept], cov.C, gates={cfg.name: Gate(beta, concept.tensors.tau)})
        try:
            for pi, template in enumerate(cfg.prompts):
                prompt = template.format(sup if beta is None else cfg.name)
                gens = [torch.Generator("cpu").manual_seed(cfg.seed + s) for s in range(cfg.seeds)]
                with torch.no_grad():
                    call = applied if applied is not None else base.pipe
                    res = call([prompt] * cfg.seeds, generator=gens, **kw)
                images[ci, pi] = list((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
                done += cfg.seeds
                progress("rendering", done, total)
        finally:
            if applied is not None:
                applied.remove()
    seconds["rendering"] = time.perf_counter() - t

    # -- scores
    t = time.perf_counter()
    per_image, scores = [], []
    for ci, (label, beta) in enumerate(columns):
        fid, ali = [], []
        for pi, template in enumerate(cfg.prompts):
            caption = template.format(sup)
            for s, im in enumerate(images[ci, pi]):
                f, a = ev.fidelity(im, instance), ev.alignment(im, caption)
                fid.append(f)
                ali.append(a)
                per_image.append({"label": label, "beta": beta, "prompt": template.format(sup if beta is None else
                                                                                             cfg.name),
                                  "seed": cfg.seed + s, "fidelity": round(f, 4), "alignment": round(a, 4)})
        scores.append({"label": label, "beta": beta, "fidelity": float(np.mean(fid)), "alignment": float(np.mean(ali)),
                       "images": len(fid)})
    seconds["scoring"] = time.perf_counter() - t

    sheet = out / "demo.png"
    from PIL import Image

    Image.fromarray(contact_sheet(photo_images, images, columns, cfg, sup, scores)).save(sheet)
    seconds["total"] = time.perf_counter() - t0
    result = DemoResult(config={**asdict(cfg), "steps": steps}, out=str(out), sheet=str(sheet),
                        photos_dir=str(photos_dir), concept=concept_info, scores=scores, per_image=per_image,
                        seconds={k: round(v, 2) for k, v in seconds.items()})
    (out / "demo.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def contact_sheet(photos: np.ndarray, images: dict, columns, cfg: DemoConfig, sup: str, scores: list[dict],
                  scale: int = 2) -> np.ndarray:
    """Photos on top; then one row per prompt: the base model's renders, then each bias's (seeds side by side);
    column titles with the mean fidelity / alignment of each column."""
    from PIL import Image, ImageDraw, ImageFont

    res = photos.shape[1] * scale
    pad, title_h, label_w = 6, 30, 150
    per = cfg.seeds
    col_w = per * res + (per - 1) * 2
    width = label_w + len(columns) * (col_w + pad) + pad
    n_photo_rows = 1
    height = title_h + (n_photo_rows + len(cfg.prompts)) * (res + pad) + pad + title_h
    sheet = Image.new("RGB", (max(width, label_w + len(photos) * (res + 2) + pad), height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()

    def paste(im: np.ndarray, x: int, y: int) -> None:
        sheet.paste(Image.fromarray(im.repeat(scale, 0).repeat(scale, 1)), (x, y))

    draw.text((pad, pad), f"photos of the instance ({cfg.name} = this {sup})", fill="black", font=font)
    y = title_h
    draw.text((pad, y + res // 2), "photos", fill="black", font=font)
    for i, im in enumerate(photos):
        paste(im, label_w + i * (res + 2), y)
    y += res + pad
    for ci, (label, _) in enumerate(columns):
        s = scores[ci]
        x = label_w + ci * (col_w + pad)
        draw.text((x, y), label, fill="black", font=font)
        draw.text((x, y + 12), f"fid {s['fidelity']:.2f} align {s['alignment']:.2f}", fill="black", font=font)
    y += title_h
    for pi, template in enumerate(cfg.prompts):
        draw.text((pad, y + res // 2 - 6), _wrap(template.format(cfg.name), 22), fill="black", font=font)
        for ci in range(len(columns)):
            x = label_w + ci * (col_w + pad)
            for s, im in enumerate(images[ci, pi]):
                paste(im, x + s * (res + 2), y)
        y += res + pad
    return np.asarray(sheet)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])
