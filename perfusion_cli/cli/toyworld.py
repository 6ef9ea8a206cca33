"""`perfusion toyworld train-base --out DIR`: train the toy world's base model (a StableDiffusionPipeline)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import device_option, emit_json, event, fail, guarded, progress_bar, say, warn

toyworld_app = typer.Typer(
    help="The procedural toy world (64x64 scenes) and its small base model.",
    no_args_is_help=True,
)
app.add_typer(toyworld_app, name="toyworld")

DEFAULT_MINUTES = {"gpu": 8.0, "cpu": 45.0}


def _parse_sets(values: list[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        if not sep or not key.strip():
            fail(f"--set {v!r}: expected FIELD=VALUE, e.g. --set joint_batch=64")
        out[key.strip()] = val
    return out


@toyworld_app.command("train-base")
@guarded
def train_base(
    out: Path = typer.Option(..., "--out", help="Folder for the model (a StableDiffusionPipeline, fp16)."),
    minutes: float = typer.Option(None, "--minutes", help="Training time budget in minutes (VAE + joint; saving "
                                  "and evaluation come after) [gpu preset 8, cpu preset 45]."),
    device: str = typer.Option(None, "--device", help="auto, cuda or cpu."),
    preset: str = typer.Option("auto", "--preset", help="auto (gpu on CUDA, else cpu), gpu or cpu."),
    seed: int = typer.Option(0, "--seed", help="Random seed (world data, initialisation, noise)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe field, FIELD=VALUE (repeatable), "
                                   "e.g. --set joint_batch=64 --set vae_steps=500."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT/.checkpoint."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT folder."),
    init: Path = typer.Option(None, "--init", help="Start from the weights of a model folder this command saved "
                              "(same recipe shapes): continue training it."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of the folder."),
):
    """Train the toy world's base model (VAE, then text encoder + UNet) and save it as a pipeline folder."""
    from ..toyworld.base import BaseRecipe, resolve_device
    from ..toyworld.base import train_base as run

    if preset not in ("auto", "gpu", "cpu"):
        fail(f"--preset {preset!r}: expected auto, gpu or cpu")
    if minutes is not None and minutes <= 0:
        fail(f"--minutes must be positive, got {minutes}")
    dev = resolve_device(device_option(device))
    name = preset if preset != "auto" else ("gpu" if dev.startswith("cuda") else "cpu")
    recipe = BaseRecipe.preset(name, seed=seed).with_overrides(_parse_sets(set_))
    if minutes is None:
        minutes = DEFAULT_MINUTES[name]

    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def on_progress(p):
            if p.phase not in tasks:
                for t in tasks.values():  # the previous phase is over
                    bar.update(t, completed=bar.tasks[t].total)
                label = {"vae": "VAE", "joint": "text+UNet", "finish": "finishing"}[p.phase]
                total = p.steps if p.steps else (round(p.budget) if p.budget else None)
                tasks[p.phase] = bar.add_task(label, total=total, info="")
            t = tasks[p.phase]
            if p.phase == "finish":
                bar.update(t, completed=p.step, info=p.info)
                return
            done = p.step if p.steps else min(round(p.elapsed), round(p.budget or p.elapsed))
            info = f"step {p.step}  loss {p.loss:.4f}" if p.loss == p.loss else f"step {p.step}"
            if p.info:
                info += f"  {p.info}"
            bar.update(t, completed=done, info=info)

        report = run(out, minutes=minutes, device=dev, recipe=recipe, progress=on_progress, on_event=event,
                     resume=resume, force=force, init=init)
    v = report["vae"]
    say(f"VAE PSNR: patterned {v['psnr_patterned']:.2f} dB (object pixels {v['psnr_patterned_object']:.2f}), "
        f"general {v['psnr_general']:.2f} dB; joint {report['joint']['steps']} steps; "
        f"{report['weights_bytes'] / 1e6:.1f} MB; samples in {out / 'samples.png'}")
    if json_out:
        emit_json(report)
    else:
        typer.echo(str(out))


@toyworld_app.command("instances")
@guarded
def instances(json_out: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the toy world's instances (objects the base model never saw): name, supercategory, set, look."""
    from ..toyworld import world as tw

    rows = [{"name": i.name, "supercategory": i.supercategory,
             "set": "development" if i in tw.DEV_INSTANCES else "reporting", "description": i.description}
            for i in tw.INSTANCES]
    if json_out:
        emit_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['name']:<12} {r['supercategory']:<6} {r['set']:<12} {r['description']}")


@toyworld_app.command("score")
@guarded
def score(
    images: list[Path] = typer.Argument(..., help="PNG files or folders of them (64x64 toy-world images)."),
    prompt: str = typer.Option(None, "--prompt", help="Caption to score alignment against, e.g. 'a mycat on a beach'."),
    instance: str = typer.Option(None, "--instance", help="Toy-world instance to score fidelity against (its photo set)."),
    concept: list[str] = typer.Option(None, "--concept", help="NAME=KIND: a concept word in --prompt and its kind, "
                                      "e.g. mycat=cat (with --instance, its name and kind are known already)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (one record per image, with the workings)."),
):
    """Score images with the toy world's evaluators: alignment to --prompt, fidelity to --instance."""
    from ..images import list_images
    from ..toyworld import evaluate as ev
    from ..toyworld import world as tw

    if prompt is None and instance is None:
        fail("nothing to score against: pass --prompt CAPTION and/or --instance NAME")
    if instance is not None and instance not in tw.INSTANCES_BY_NAME:
        fail(f"unknown instance {instance!r}; see `perfusion toyworld instances`")
    concepts = {}
    for c in concept or []:
        word, sep, kind = c.partition("=")
        word, kind = word.strip().lower(), kind.strip().lower()
        if not sep or not word or kind not in tw.KINDS:
            fail(f"--concept {c!r}: expected NAME=KIND with KIND one of {', '.join(tw.KINDS)}")
        concepts[word] = kind
    if instance is not None:
        concepts.setdefault(instance, tw.INSTANCES_BY_NAME[instance].supercategory)
    files = []
    for p in images:
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            fail(f"{p}: no such file or folder")
    if not files:
        fail("no images found in the folders given")
    records = []
    for f in files:
        image = _read_64(f)
        rec = {"image": str(f)}
        if prompt is not None:
            try:
                d = ev.alignment_details(image, prompt, concepts or None)
            except ValueError as e:
                hint = "; name concept words with --concept NAME=KIND" if "unknown object word" in str(e) else ""
                fail(f"--prompt: {e}{hint}")
            rec["alignment"] = round(d["score"], 4)
            if json_out:
                rec["alignment_details"] = d
        if instance is not None:
            d = ev.fidelity_details(image, instance)
            rec["fidelity"] = round(d["score"], 4)
            if json_out:
                rec["fidelity_details"] = d
        records.append(rec)
    if json_out:
        emit_json(records)
        return
    cols = [k for k in ("alignment", "fidelity") if k in records[0]]
    typer.echo("\t".join(["image", *cols]))
    for r in records:
        typer.echo("\t".join([r["image"], *(f"{r[k]:.3f}" for k in cols)]))
    if len(records) > 1:
        say("mean: " + ", ".join(f"{k} {sum(r[k] for r in records) / len(records):.3f}" for k in cols))


def _read_64(path: Path):
    """An image as uint8 (64, 64, 3): the evaluators' size (others are resized, with a warning)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (64, 64):
                warn(f"{path}: {im.size[0]}x{im.size[1]}, resized to 64x64 (the toy world's size)")
                im = im.resize((64, 64), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        fail(f"{path}: not a readable image ({type(e).__name__}); pass PNG or JPEG files")
