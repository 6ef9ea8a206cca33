"""`perfusion render PROMPT...` (or --prompts FILE / -): images with concepts, paths on stdout."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import typer

from . import app
from .common import (device_option, emit_json, event, fail, guarded, model_option, parse_choice, parse_named,
                     progress_bar, say)


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    out = list(prompt or [])
    if prompts_file:
        if prompts_file == "-":
            text = sys.stdin.read()
        else:
            p = Path(prompts_file)
            if not p.is_file():
                fail(f"--prompts {prompts_file}: no such file")
            text = p.read_text(encoding="utf-8")
        out += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return out


@app.command()
@guarded
def render(
    prompt: list[str] = typer.Argument(None, help="Prompt(s); concepts are recognised by name, e.g. \"mycat on a beach\"."),
    prompts_file: str = typer.Option(None, "--prompts", help="File with one prompt per line, or - for stdin."),
    bias: list[str] = typer.Option(None, "--bias", help="Gate bias β in [0,1]: global, or NAME=VALUE (repeatable). Lower: more concept."),
    temperature: list[str] = typer.Option(None, "--temperature", help="Gate temperature τ: global or NAME=VALUE."),
    scale: list[str] = typer.Option(None, "--scale", help="Strength of LoRA / DreamBooth / Custom Diffusion concepts (1 = as trained): global or NAME=VALUE, 0-4."),
    gate_scope: list[str] = typer.Option(None, "--gate-scope", help="Where a concept's edit acts: prompt (every token whose encoding opens its gate: the paper) or word (only the concept's own word): global or NAME=SCOPE [the scope it was trained with]."),
    global_lock: bool = typer.Option(False, "--global-lock", help="Keys read the whole prompt with supercategory words (try --bias 0.4-0.6)."),
    approximate: bool = typer.Option(False, "--approximate", help="Sum concepts' edits instead of the exact orthogonal combination."),
    n: int = typer.Option(1, "-n", "--images", help="Images per prompt."),
    seed: int = typer.Option(None, "--seed", help="Seed of the first image; image i gets seed+i (random if unset)."),
    steps: int = typer.Option(None, "--steps", help="Sampling steps [profile]."),
    cfg: float = typer.Option(None, "--cfg", help="Classifier-free guidance scale [profile]."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    height: int = typer.Option(None, "--height", help="Image height in px [model resolution]."),
    width: int = typer.Option(None, "--width", help="Image width in px [model resolution]."),
    sampler: str = typer.Option(None, "--sampler", help="ddim, euler, euler-a, dpm++, pndm, lms, ddpm [profile]."),
    out: Path = typer.Option(Path("."), "-o", "--out", help="Output folder."),
    name_template: str = typer.Option("{index:04d}-{slug}-{seed}.png", "--name-template", help="File name; fields {index} {seed} {slug} {image} {prompt_index}."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per pipeline call."),
    model: str = typer.Option(None, "--model", help="Base model [the concepts' own]."),
    device: str = typer.Option(None, "--device", help="auto, cuda, mps or cpu."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON record of every image instead of paths."),
):
    """Render prompts; concepts named in a prompt are applied. Prints each written path."""
    from .. import api
    from ..rendering import SCOPES, Gate, RenderSettings, concept_scope

    prompts = read_prompts(prompt, prompts_file)
    if not prompts:
        fail("no prompt given; pass a prompt, or --prompts FILE (one prompt per line, - for stdin)")
    for label, value in (("--steps", steps), ("--height", height), ("--width", width)):
        if value is not None and value <= 0:  # 0 would otherwise mean "the profile's default" below
            fail(f"{label} must be positive, got {value}")
    g_beta, n_beta = parse_named(bias, "--bias", 0.0, 1.0)
    g_tau, n_tau = parse_named(temperature, "--temperature", 0.0, 1.0, lo_open=True)
    g_scale, n_scale = parse_named(scale, "--scale", *api.SCALE_RANGE)
    g_scope, n_scope = parse_choice(gate_scope, "--gate-scope", SCOPES)
    gates = {}
    settings = RenderSettings(
        steps=steps or 0, cfg=cfg, negative=negative, height=height or 0, width=width or 0,
        sampler=sampler or "", n=n, seed=seed, batch_size=batch_size, global_lock=global_lock,
        exact=not approximate, name_template=name_template,
    )
    from ..registry import Registry

    reg = Registry()
    res = api.resolve_prompts(prompts, reg)
    for name in set(n_beta) | set(n_tau) | set(n_scope):
        c = res.concepts.get(name)
        if c is None:
            fail(f"--bias/--temperature/--gate-scope name {name!r}, which no prompt uses (prompts use: "
                 f"{', '.join(res.concepts) or 'no concept'})")
        if not c.is_perfusion:
            fail(f"--bias/--temperature/--gate-scope {name!r}: a {c.method} concept has no gate (Perfusion concepts only)")
        gates[name] = Gate(
            n_beta.get(name, g_beta if g_beta is not None else c.tensors.beta),
            n_tau.get(name, g_tau if g_tau is not None else c.tensors.tau),
            scope=n_scope.get(name, g_scope if g_scope is not None else concept_scope(c)),
        )
    with progress_bar() as bar:
        tasks = []  # the bar appears with the first batch, not before an early error

        def on_progress(done, total):
            if not tasks:
                tasks.append(bar.add_task("rendering", total=total, info="steps"))
            bar.update(tasks[0], completed=done, total=total)

        written = api.render(
            prompts, out=out, model=model_option(model), device=device_option(device), dtype=dtype,
            settings=settings, gates=gates, beta=g_beta, tau=g_tau, registry=reg,
            progress=on_progress, on_event=event, scale=g_scale, scales=n_scale, scope=g_scope,
        )
    from ..rendering import process_share

    if json_out and process_share()[1] > 1:  # several processes: one JSON record per line (JSON Lines)
        for w in written:
            typer.echo(json.dumps(asdict(w), default=str))
    elif json_out:
        emit_json([asdict(w) for w in written])
    else:
        for w in written:
            typer.echo(w.path)
    say(f"wrote {len(written)} image(s) to {out}")
