"""`perfusion demo`: train and render a concept on the embedded toy model, offline, and score it."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import device_option, emit_json, event, guarded, parse_named, progress_bar, say, stage_progress


@app.command()
@guarded
def demo(
    out: Path = typer.Option(Path("perfusion-demo"), "-o", "--out", help="Folder for the photos, the contact sheet (demo.png) and demo.json."),
    instance: str = typer.Option("patchcat", "--instance", help="The toy-world instance to learn (see `perfusion toyworld instances`)."),
    name: str = typer.Option("mycat", "--name", help="The concept word."),
    bias: list[str] = typer.Option(None, "--bias", help="Gate biases β to render (repeatable) [0.55 0.7 0.85]."),
    prompt: list[str] = typer.Option(None, "--prompt", help="Prompt with {} for the concept (repeatable) [three scenes]."),
    steps: int = typer.Option(None, "--steps", help="Training steps [the toy profile's, 400]."),
    seeds: int = typer.Option(2, "--seeds", help="Images per prompt and bias."),
    photos: int = typer.Option(6, "--photos", help="Photos in the instance's photo set."),
    seed: int = typer.Option(0, "--seed", help="Random seed (training, first render seed)."),
    device: str = typer.Option(None, "--device", help="cpu (default: the demo is sized for a CPU), auto, cuda or mps."),
    keep: bool = typer.Option(False, "--keep", help="Also store the concept in your registry as NAME."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out; with --keep, overwrite NAME."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of the table."),
):
    """Learn a toy-world cat from 6 photos, render it at three biases beside the base model, and score it."""
    from ..registry import Registry
    from ..toyworld.demo import DEFAULT_PROMPTS, DemoConfig, run_demo

    biases = []
    for b in bias or []:
        glob, named = parse_named([b], "--bias", 0.0, 1.0)
        if named:
            from .common import fail

            fail(f"--bias {b!r}: the demo takes plain numbers")
        biases.append(glob)
    dev = device or ("cpu" if device_option(None) == "auto" else device_option(None))
    cfg = DemoConfig(instance=instance, name=name.strip().lower(), photos=photos, steps=steps,
                     biases=tuple(biases) or DemoConfig.biases, prompts=tuple(prompt or DEFAULT_PROMPTS),
                     seeds=seeds, seed=seed, device=dev)
    with progress_bar() as bar:
        on_progress = stage_progress(bar)
        result = run_demo(out, cfg, progress=on_progress, on_event=event, keep=Registry() if keep else None,
                          force=force)
    if json_out:
        emit_json(result.to_dict())
        return
    typer.echo(f"{'':<12} {'fidelity':>9} {'alignment':>10}")
    for s in result.scores:
        typer.echo(f"{s['label']:<12} {s['fidelity']:>9.3f} {s['alignment']:>10.3f}")
    say(f"fidelity: how close the rendered {result.concept['supercategory']} is to the photos; alignment: how well "
        f"the image matches the prompt (concept read as {result.concept['supercategory']!r}); both 0-1, "
        f"{cfg.seeds * len(cfg.prompts)} images each")
    say(f"contact sheet: {result.sheet}  ({result.seconds['total']:.0f} s: training {result.seconds['training']:.0f} s, "
        f"rendering {result.seconds['rendering']:.0f} s)")
