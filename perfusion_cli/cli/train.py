"""`perfusion train IMAGES --super WORD --name NAME`."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import device_option, emit_json, event, fail, guarded, model_option, progress_bar, say


@app.command()
@guarded
def train(
    images: Path = typer.Argument(..., help="Folder of 4-8 photos of the concept (jpg, png, webp, bmp)."),
    super_: str = typer.Option(..., "--super", help="Supercategory: one word the model knows, e.g. cat."),
    name: str = typer.Option(..., "--name", help="The new word for the concept, e.g. mycat."),
    model: str = typer.Option(None, "--model", help="Base model (default: sd15). --model toyworld runs offline."),
    steps: int = typer.Option(None, "--steps", help="Optimiser steps [profile, else 400]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward pass [the largest the GPU's memory allows for the profile's 16 images per step; else the profile's, else 4]."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Forward passes per step [the profile's images per step / --batch-size]."),
    lr_embedding: float = typer.Option(None, "--lr-embedding", help="Learning rate of the token embedding [the profile's, else 6e-3]."),
    lr_value: float = typer.Option(None, "--lr-value", help="Learning rate of the value targets o*_V [the profile's, else 3e-2]."),
    train_beta: float = typer.Option(None, "--train-beta", help="Gate bias β while training [the profile's, else 0.75]."),
    train_tau: float = typer.Option(None, "--train-tau", help="Gate temperature τ while training [the profile's, else 0.1]."),
    beta: float = typer.Option(None, "--beta", help="Default render bias stored in the concept [the profile's, else 0.7]."),
    tau: float = typer.Option(None, "--tau", help="Default render temperature stored in the concept [the profile's, else 0.15]."),
    mask: str = typer.Option("none", "--mask", help="none, attention (from the model's own cross-attention), or a folder of masks."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Horizontal flip augmentation."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    device: str = typer.Option(None, "--device", help="auto, cuda, mps or cpu."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16 for the frozen model [auto: bf16 on a CUDA GPU that has it, run without autocast; fp16 runs under bf16 autocast; fp32 on a CPU]."),
    template: list[str] = typer.Option(None, "--template", help="Training prompt with {} for the concept (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from this name's last checkpoint."),
    validate_every: int = typer.Option(0, "--validate-every", help="Write sample renders every N steps (0: never)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Save a resumable checkpoint every N steps."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Gradient checkpointing in the UNet: less GPU memory, slower."),
    no_key_lock: bool = typer.Option(False, "--no-key-lock", help="Train the key targets o*_K too instead of locking them to the supercategory's: the paper's ablation, which does worse (PERFUSION.md §4); for comparisons only."),
    gate_scope: str = typer.Option("prompt", "--gate-scope", help="Where the edit acts while training, and by default at render: prompt (every token whose encoding opens the gate: the paper) or word (only the concept's own word; β then does little). See docs/benchmarks/README.md."),
    class_noun: bool = typer.Option(None, "--class-noun/--no-class-noun", help="Keep the supercategory after the concept's token in the prompts the model reads (\"a mycat cat\"), as DreamBooth, LoRA and Custom Diffusion do [their recipes: on; Perfusion (the paper) and TI: off]. Renders follow what was trained. For Perfusion an experiment, not the paper (PERFUSION.md §11d)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the UNet: the first step compiles it (about two minutes on a GPU, cached on disk for later runs), the others run faster. Pays on a GPU for full-length training (docs/benchmarks)."),
    compile_mode: str = typer.Option(None, "--compile-mode", help="torch.compile mode for --compile (implies it): auto (CUDA graphs, reduce-overhead, on a CUDA GPU without --low-memory; else default), default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs [auto]."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing concept of that name."),
    fp32: bool = typer.Option(False, "--fp32", help="Store the concept in fp32 (default fp16)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON record instead of the path."),
    method: str = typer.Option("perfusion", "--method", help="perfusion, or a baseline to compare with: ti, "
                               "dreambooth, lora, custom-diffusion (their usual recipes; docs/methods.md)."),
    lr: float = typer.Option(None, "--lr", help="Baselines: learning rate of the trained weights [the method's recipe]."),
):
    """Learn a concept from photos and store it in the registry."""
    from .. import api, models
    from ..training import config_for

    model = model_option(model) or models.DEFAULT_MODEL
    prof = models.find_profile(model)
    t = prof.train if prof else {}
    batch_size, grad_accum = _batch(t, batch_size, grad_accum, device_option(device), low_memory)
    if compile_mode is not None:
        compile_ = True
    cfg = config_for(
        t, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        lr_embedding=lr_embedding, lr_value=lr_value, train_beta=train_beta, train_tau=train_tau,
        render_beta=beta, render_tau=tau, flip=flip, mask=mask, seed=seed,
        checkpoint_every=checkpoint_every, validate_every=validate_every, templates=list(template or []),
        gradient_checkpointing=low_memory, lock_keys=not no_key_lock, compile=compile_,
        gate_scope=gate_scope.strip().lower(), class_noun=class_noun,
        compile_mode=compile_mode.strip().lower() if compile_mode else None,
    )
    method = method.strip().lower()
    method_config = None
    if method != "perfusion":
        from .. import methods

        if method not in methods.BASELINES:
            fail(f"unknown --method {method!r}; choose one of: {', '.join(methods.METHODS)}")
        if resume or mask != "none" or low_memory or no_key_lock or compile_ or gate_scope.strip().lower() != "prompt":
            fail(f"--resume, --mask, --low-memory, --no-key-lock, --gate-scope and --compile(-mode) are Perfusion "
                 f"options; --method {method} does not take them")
        over = {k: v for k, v in (("steps", steps), ("lr", lr), ("class_noun", class_noun)) if v is not None}
        if batch_size is not None:
            over["batch_size"] = batch_size
        method_config = methods.recipe(method, seed=seed, templates=list(template or []), **over)
    elif lr is not None:
        fail("--lr is for baselines; Perfusion takes --lr-embedding and --lr-value")
    if compile_ and method == "perfusion":
        say("--compile: the first step compiles the UNet (about two minutes on a GPU, longer on a CPU)")
    with progress_bar() as bar:
        tasks = []  # the bar appears with the first step, not before an early error

        def on_progress(p):
            if not tasks:
                tasks.append(bar.add_task("training", total=p.steps, completed=p.step - 1, info=""))
            bar.update(tasks[0], completed=p.step, info=f"loss {p.loss:.4f}")

        entry = api.train(
            images, name=name, supercategory=super_, model=model, device=device_option(device), dtype=dtype,
            config=cfg, force=force, fp32=fp32, resume=resume, progress=on_progress, on_event=event,
            method=method, method_config=method_config,
        )
    say(f"learned {name!r} ({entry.size / 1024:.1f} KB)")
    if json_out:
        emit_json({"name": entry.name, "path": str(entry.path), "size": entry.size, "sha256": entry.sha256,
                   "metadata": entry.meta})
    else:
        typer.echo(str(entry.path))


def _batch(train: dict, batch_size: int | None, grad_accum: int | None, device: str,
           low_memory: bool) -> tuple[int, int]:
    """The micro-batch and accumulation: explicit values win; otherwise models.train_batch (large
    micro-batches on big GPUs), keeping the profile's images per optimiser step."""
    from .. import models

    if batch_size is not None and grad_accum is not None:
        return batch_size, grad_accum
    images = int(train.get("batch_size", 4)) * int(train.get("grad_accum", 4))
    if batch_size is not None:
        return batch_size, max(1, images // max(batch_size, 1))
    if grad_accum is not None:
        return max(1, images // max(grad_accum, 1)), grad_accum
    try:
        dev = models.pick_device(device)
    except Exception:  # an unusable --device is reported where the model is loaded, with its own message
        return int(train.get("batch_size", 4)), int(train.get("grad_accum", 4))
    return models.train_batch(train, dev, low_memory=low_memory)
