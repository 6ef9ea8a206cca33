"""Registry commands: list, inspect, combine, rm, export, import."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import emit_json, fail, guarded, parse_named, say


def _registry():
    from ..registry import Registry

    return Registry()


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"


def entry_record(e) -> dict:
    return {
        "name": e.name, "kind": e.kind, "source": e.source, "path": str(e.path), "size": e.size,
        "supercategory": e.supercategory, "base_model": e.base_model_id, "created": e.created,
        "members": [m.get("name") for m in e.members], "shadowed": getattr(e, "shadowed", False),
        "error": e.error,
    }


@app.command("list")
@guarded
def list_(
    json_out: bool = typer.Option(False, "--json", help="JSON array of entries."),
    names_only: bool = typer.Option(False, "-q", "--names", help="Names only, one per line."),
):
    """List concepts in the registry (yours and the bundled ones). Damaged files are flagged."""
    entries = _registry().entries()
    if json_out:
        emit_json([entry_record(e) for e in entries])
        return
    if names_only:
        for e in entries:
            if not getattr(e, "shadowed", False):
                typer.echo(e.name)
        return
    if not entries:
        say("no concepts yet: `perfusion train PHOTOS --super WORD --name NAME` makes one")
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("name", "supercategory", "base model", "size", "created", "status"):
        table.add_column(col)
    for e in entries:
        status = f"DAMAGED: {e.error}" if e.error else ("shadowed" if getattr(e, "shadowed", False) else e.source)
        if e.kind == "combination" and not e.error:
            status += f" (combines {', '.join(m.get('name') for m in e.members)})"
        table.add_row(e.name, e.supercategory or "-", e.base_model_id or "-", _size(e.size),
                      (e.created or "-")[:19], status, style="red" if e.error else None)
    Console(highlight=False, soft_wrap=True).print(table)


@app.command()
@guarded
def inspect(
    name: str = typer.Argument(..., help="Concept name, or a path to a concept file."),
    json_out: bool = typer.Option(False, "--json", help="JSON record."),
):
    """Show a concept: identity, base model, layers, gate defaults, training."""
    from ..concept import read_metadata

    p = Path(name)
    if p.suffix == ".safetensors" or p.exists():
        path, size, source = p, p.stat().st_size if p.exists() else 0, "file"
    else:
        e = _registry().get(name)
        if e.error:
            fail(f"concept {name!r} is damaged: {e.error}")
        path, size, source = e.path, e.size, e.source
    meta = read_metadata(path)
    from ..concept import file_sha256

    record = {
        "identity": {"name": meta["name"], "kind": meta["kind"], "path": str(path), "source": source,
                     "size": size, "sha256": file_sha256(path), "format_version": meta["format_version"],
                     "tool_version": meta.get("tool_version"), "created": meta.get("created")},
        "base_model": meta["base_model"],
        "covariance": meta["covariance"],
        "layers": [{"name": n, "width": w} for n, w in meta["layers"]],
        "concepts": [{"name": c["name"], "token": c.get("token"), "supercategory": c["supercategory"],
                      "method": c.get("method", "perfusion"), "gate": c.get("gate"),
                      "training": c.get("training", {}), "created": c.get("created")}
                     for c in meta["concepts"]],
        "exact": meta["exact"],
    }
    if json_out:
        emit_json(record)
        return
    out = Console(highlight=False, soft_wrap=True)
    i = record["identity"]
    out.print(f"[bold]identity[/]\n  name {i['name']}  ({i['kind']}, {source})\n  file {i['path']}  "
              f"{_size(size)}  sha256 {i['sha256'][:16]}\n  created {i['created']}  perfusion {i['tool_version']}  "
              f"format v{i['format_version']}")
    bm = record["base_model"]
    out.print(f"[bold]base model[/]\n  {bm.get('id')}  fingerprint {bm.get('fingerprint')}  family {bm.get('family')}\n"
              f"  covariance {record['covariance'].get('fingerprint')} ({record['covariance'].get('source')})")
    widths = [w for _, w in meta["layers"]]
    if widths:
        out.print(f"[bold]layers[/]\n  {len(widths)} cross-attention layers, widths {min(widths)}-{max(widths)}, "
                  f"{sum(widths)} outputs each for K and V")
    for c in record["concepts"]:
        g = c["gate"]
        scope = c["training"].get("gate_scope", "prompt")
        noun = bool(c["training"].get("class_noun"))
        knob = (f"  gate defaults: bias {g['beta']}  temperature {g['tau']}  scope {scope}" if g else
                f"  method {c['method']} (a baseline: no gate; docs/methods.md)")
        if noun or not g:   # how the pipeline reads the name (text.written_as): the token alone, or before its noun
            written = f"{c['name']} {c['supercategory']}" if noun else c["name"]
            knob += f"\n  read by the model as: \"a {written}\" (the concept's token{' before the class noun' * noun})"
        out.print(f"[bold]concept {c['name']}[/]\n  supercategory {c['supercategory']}\n{knob}")
        t = c["training"]
        if t:
            keys = ("method", "steps", "batch_size", "grad_accum", "lr", "lr_embedding", "lr_value", "rank",
                    "prior_weight", "prior_images", "train_beta", "train_tau", "mask", "flip", "seed", "final_loss",
                    "embedding_norm_ratio")
            out.print("  training: " + ", ".join(f"{k} {t[k]}" for k in keys if k in t))
            if t.get("images"):
                out.print(f"  images: {', '.join(t['images'])}")
    if meta["kind"] == "combination":
        out.print(f"[bold]combination[/]\n  {'exact' if meta['exact'] else 'approximate'} (PERFUSION.md §8)")


@app.command()
@guarded
def combine(
    names: list[str] = typer.Argument(..., help="Two or more concepts (names or files)."),
    name: str = typer.Option(..., "--name", help="Name of the combined entry; in a prompt it stands for all members."),
    approximate: bool = typer.Option(False, "--approximate", help="Store as an approximate (summed) combination."),
    bias: list[str] = typer.Option(None, "--bias", help="Per-member gate bias NAME=VALUE (repeatable)."),
    temperature: list[str] = typer.Option(None, "--temperature", help="Per-member temperature NAME=VALUE."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and report; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing entry."),
    json_out: bool = typer.Option(False, "--json", help="JSON record."),
):
    """Combine concepts into one entry (same base model and covariance required)."""
    from .. import api
    from ..rendering import Gate

    g_beta, n_beta = parse_named(bias, "--bias", 0.0, 1.0)
    g_tau, n_tau = parse_named(temperature, "--temperature", 0.0, 1.0, lo_open=True)
    if g_beta is not None or g_tau is not None:
        fail("combine takes per-member values only: --bias NAME=VALUE")
    gates = {}
    if n_beta or n_tau:
        reg = _registry()
        for m in set(n_beta) | set(n_tau):
            cs, _ = api.load_concept_set(m, reg) if m in names else (None, None)
            if cs is None:
                fail(f"--bias/--temperature names {m!r}, which is not among {', '.join(names)}")
            c = cs.concepts[0]
            if not c.is_perfusion:
                fail(f"{m!r} is a {c.method} concept: combine joins Perfusion concepts only")
            gates[m] = Gate(n_beta.get(m, c.tensors.beta), n_tau.get(m, c.tensors.tau))
    cs, entry, nbytes = api.combine(names, name, exact=not approximate, gates=gates, dry_run=dry_run, force=force)
    record = {"name": name, "members": [{"name": c.name, "supercategory": c.supercategory,
                                         "beta": c.tensors.beta, "tau": c.tensors.tau} for c in cs.concepts],
              "exact": cs.exact, "base_model": cs.base_model, "size": nbytes, "dry_run": dry_run,
              "path": str(entry.path) if entry else None}
    if json_out:
        emit_json(record)
    elif dry_run:
        say(f"would write {name!r}: {', '.join(c.name for c in cs.concepts)} "
            f"({'exact' if cs.exact else 'approximate'}, {_size(nbytes)}); nothing written")
    else:
        typer.echo(str(entry.path))


@app.command()
@guarded
def rm(names: list[str] = typer.Argument(..., help="Concepts to remove from your registry.")):
    """Remove concepts from your registry (bundled ones are read-only)."""
    reg = _registry()
    for n in names:
        reg.get(n)  # a clear error before anything is removed
    for n in names:
        path = reg.remove(n)
        say(f"removed {n} ({path})")


@app.command()
@guarded
def export(
    name: str = typer.Argument(..., help="Concept to export."),
    dest: Path = typer.Argument(..., help="A folder, or a .safetensors file path."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
):
    """Copy a concept out of the registry (to share it)."""
    typer.echo(str(_registry().export(name, dest, force=force)))


@app.command("import")
@guarded
def import_(
    file: Path = typer.Argument(..., help="A .safetensors concept file."),
    name: str = typer.Option(None, "--name", help="Store under another name."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing concept."),
):
    """Add a concept file to the registry (checked first; nothing is unpickled)."""
    entry = _registry().import_file(file, name=name, force=force)
    typer.echo(str(entry.path))
