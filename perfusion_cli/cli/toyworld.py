"""`perfusion toyworld train-base --out DIR`: train the toy world's base model (a StableDiffusionPipeline)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import device_option, emit_json, event, fail, guarded, progress_bar, say

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
                     resume=resume, force=force)
    v = report["vae"]
    say(f"VAE PSNR: patterned {v['psnr_patterned']:.2f} dB (object pixels {v['psnr_patterned_object']:.2f}), "
        f"general {v['psnr_general']:.2f} dB; joint {report['joint']['steps']} steps; "
        f"{report['weights_bytes'] / 1e6:.1f} MB; samples in {out / 'samples.png'}")
    if json_out:
        emit_json(report)
    else:
        typer.echo(str(out))
