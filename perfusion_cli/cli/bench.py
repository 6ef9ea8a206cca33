"""`perfusion bench speed`: a benchmark (not a test) written as a Markdown + JSON report."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import device_option, emit_json, event, guarded, progress_bar, say, stage_progress

bench_app = typer.Typer(
    help="Benchmarks (not tests): measure what Perfusion costs and write a report.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("speed")
@guarded
def speed(
    scale: str = typer.Option("toy", "--scale", help="toy (the bundled toy model, runs anywhere) or sd15 (SD 1.5's architecture, random weights; for a GPU)."),
    out: Path = typer.Option(Path("docs/benchmarks"), "-o", "--out", help="Folder for speed-<scale>-<device>.md and .json."),
    repeats: int = typer.Option(None, "--repeats", help="Interleaved rounds of training and rendering (default: toy 8; sd15: 5 on a GPU, 1 on a CPU)."),
    warmup: int = typer.Option(None, "--warmup", help="Discarded steps per training round and discarded render rounds (default: per scale)."),
    train_batch: int = typer.Option(None, "--train-batch", help="Images per training micro-step (default: toy 4; sd15: 16 on a GPU, 1 on a CPU)."),
    train_steps: int = typer.Option(None, "--train-steps", help="Timed training steps per round and side (default: per scale)."),
    render_steps: int = typer.Option(None, "--render-steps", help="Sampling steps per image (default: toy 20; sd15: 50 on a GPU, 2 on a CPU)."),
    io_repeats: int = typer.Option(None, "--io-repeats", help="Repeats of concept load and apply/remove (default: per scale)."),
    full: bool = typer.Option(None, "--full/--no-full", help="Also train one full concept for real (400 steps, `perfusion train`'s batch on this device) [sd15 on a GPU: on]."),
    full_steps: int = typer.Option(None, "--full-steps", help="Steps of that full concept [the profile's, 400]."),
    low_memory: bool = typer.Option(None, "--low-memory/--no-low-memory", help="Also time `train --low-memory` steps and their peak memory [on, except sd15 on a CPU]."),
    compile_: str = typer.Option(None, "--compile", help="Also time `perfusion train --compile` with this torch.compile mode (auto: what `train --compile` uses here; default, reduce-overhead, max-autotune-no-cudagraphs, ...) against the floor with the same compiled UNet, and what compiling costs [off]."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads during the run (default: torch's own); 1 steadies timings on a shared machine."),
    device: str = typer.Option(None, "--device", help="auto, cuda, mps or cpu."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (renders in fp16 on a GPU, trains in bf16 on a CUDA GPU that has it; fp32 on a CPU), fp32, fp16 or bf16 (both)."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report (with the written paths) on stdout instead of the paths."),
):
    """Time training and rendering against their floors; write <out>/speed-<scale>-<device>.md and .json."""
    from ..bench import SpeedConfig, run_speed, write_reports

    config = SpeedConfig(
        scale=scale.strip().lower(), device=device_option(device), dtype=dtype, repeats=repeats, warmup=warmup,
        train_batch=train_batch, train_steps=train_steps, render_steps=render_steps, io_repeats=io_repeats,
        threads=threads, full=full, full_steps=full_steps, low_memory=low_memory,
        compile=compile_.strip().lower() if compile_ else None,
    )
    with progress_bar() as bar:
        on_progress = stage_progress(bar)
        result = run_speed(config, progress=on_progress, on_event=event)
    md, js = write_reports(result, out)
    tr, rd = result.training, result.rendering["variants"]
    if tr.get("compiled"):
        cm = tr["compiled"]
        say(f"compiled ({cm['mode']}): train step {cm['ratio']:.2f}× the compiled floor, which is "
            f"{cm['floor_speedup_over_eager']:.2f}× as fast as the eager one; compiling took {cm['compile_s']['train']:.0f} s")
    say(f"train step {tr['ratio']:.2f}× the floor; render {rd['1 concept']['ratio']:.2f}× (1 concept), "
        f"{rd['3 concepts']['ratio']:.2f}× (3 concepts) the plain pipeline")
    if json_out:  # one parseable document: the report with the paths it was written to
        emit_json({"written": {"markdown": str(md), "json": str(js)}, **result.to_dict()})
    else:
        typer.echo(str(md))
        typer.echo(str(js))


@bench_app.command("quality")
@guarded
def quality(
    instances: str = typer.Option("reporting", "--instances", help="reporting, development, or instance names (comma-separated)."),
    methods: str = typer.Option(",".join(("perfusion", "ti", "dreambooth", "lora", "custom-diffusion")), "--methods", help="Methods to compare (comma-separated)."),
    parts: str = typer.Option(None, "--parts", help="Parts to run (comma-separated) [all]: methods (every method's curve: quality.*), ablations (Perfusion's design choices: quality-ablations.*), pairs (two concepts in one image: quality-pairs.*). Each writes its own files; a part trains the concepts it needs."),
    ablations: str = typer.Option(None, "--ablations", help="The ablations part's variants (comma-separated) [all]: no-key-lock, rome, mask, one-photo, global-lock, train-beta, word-scope."),
    steps: int = typer.Option(400, "--steps", help="Training steps of every method."),
    seeds: int = typer.Option(2, "--seeds", help="Images per prompt and knob value."),
    quick: bool = typer.Option(False, "--quick", help="One instance, tiny settings (CI: keeps the code path alive; the numbers mean nothing)."),
    out: Path = typer.Option(Path("docs/benchmarks"), "-o", "--out", help="Folder for the reports: quality.*, quality-ablations.*, quality-pairs.* (*-quick.* with --quick)."),
    device: str = typer.Option("cpu", "--device", help="cpu (the toy world is sized for it), auto, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON reports ({part: report}) on stdout instead of the paths."),
    reuse: Path = typer.Option(None, "--reuse", help="A previous quality.json: the methods it has and --methods leaves out are carried over into the new methods report (same instances, prompts, seeds and steps required), e.g. to re-measure one method after changing its recipe; the pairs part likewise carries over those methods' combinations from the quality-pairs.json beside it."),
):
    """Perfusion against TI, DreamBooth, LoRA and Custom Diffusion on the toy world (fidelity vs alignment), its
    ablations, and two concepts in one image."""
    from ..bench.quality import QualityConfig, run_quality, summary_lines, write_all

    names = _names(instances)
    spec = names[0] if len(names) == 1 and names[0] in ("reporting", "development", "dev") else names
    over = {"methods": _names(methods, lower=True)}
    if reuse is not None:
        over["reuse"] = str(reuse)
    if parts is not None:
        over["parts"] = _names(parts, lower=True)
    if ablations is not None:
        over["ablations"] = _names(ablations, lower=True)
    if quick:
        if instances != "reporting":
            over["instances"] = spec
        cfg = QualityConfig.quick_config(device=device, **over)
    else:
        cfg = QualityConfig(instances=spec, steps=steps, seeds=seeds, device=device, **over)
    with progress_bar() as bar:
        on_progress = stage_progress(bar)
        reports = run_quality(cfg, progress=on_progress, on_event=event)
    paths = write_all(reports, out)
    for line in summary_lines(reports):
        say(line)
    if json_out:
        emit_json({"written": [str(p) for p in paths], **reports})
    else:
        for p in paths:
            typer.echo(str(p))


def _names(value: str, lower: bool = False) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple((n.strip().lower() if lower else n.strip()) for n in value.split(",") if n.strip())
