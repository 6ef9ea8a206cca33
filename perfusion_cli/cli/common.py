"""What every command shares: the stderr console, error handling, option parsing, global state."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import PerfusionError

err = Console(stderr=True, highlight=False)


@dataclass
class State:
    debug: bool = False
    quiet: bool = False
    model: str | None = None
    device: str = "auto"


state = State(debug=bool(os.environ.get("PERFUSION_DEBUG")))


def say(msg: str) -> None:
    """A message for the person at the terminal (stderr), unless --quiet."""
    if not state.quiet:
        err.print(msg, markup=False, soft_wrap=True)


def warn(msg: str) -> None:
    err.print(msg if msg.startswith("warning") else f"warning: {msg}", markup=False, style="yellow", soft_wrap=True)


def event(msg: str) -> None:
    (warn if msg.startswith("warning") else say)(msg)


def fail(msg: str, code: int = 2) -> None:
    err.print(f"error: {msg}", markup=False, style="bold red", soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code)


def guarded(fn):
    """Turn library errors into one stderr line and a non-zero exit (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PerfusionError as e:
            if state.debug:
                raise
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted", style="red")
            raise typer.Exit(130)
        except typer.Exit:
            raise
        except Exception as e:  # an unexpected failure: still one line, unless --debug
            if state.debug:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(f"{type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)

    return wrapper


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, disable=state.quiet, transient=transient,
    )


def stage_progress(bar: Progress):
    """A (stage, done, total) progress callback for library code that reports several stages: each stage
    gets its own line in `bar`."""
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, info="")
        bar.update(tasks[stage], completed=done, total=total)

    return on_progress


def split_named(values: list[str] | None, convert) -> tuple[object, dict[str, object]]:
    """['X', 'mycat=Y'] -> (convert('X') or None, {'mycat': convert('Y')}): an option given globally and per name.
    `convert(text, given)` checks one value (given: the whole argument, for its error message)."""
    glob, named = None, {}
    for v in values or []:
        name, _, text = v.rpartition("=")
        x = convert(text, v)
        if name:
            named[name.strip().lower()] = x
        else:
            glob = x
    return glob, named


def parse_named(values: list[str] | None, label: str, lo: float, hi: float, lo_open: bool = False):
    """['0.7', 'mycat=0.6'] -> (global value or None, {name: value}); range-checked."""
    def number(text: str, given: str) -> float:
        try:
            x = float(text)
        except ValueError:
            fail(f"{label} {given!r}: expected a number or NAME=NUMBER")
        if not ((lo < x if lo_open else lo <= x) and x <= hi):
            fail(f"{label} {given!r}: must be {'>' if lo_open else '≥'} {lo} and ≤ {hi}")
        return x

    return split_named(values, number)


def parse_choice(values: list[str] | None, label: str, choices) -> tuple[str | None, dict[str, str]]:
    """['word', 'mycat=prompt'] -> (global value or None, {name: value}); each value one of `choices`."""
    def choice(text: str, given: str) -> str:
        if text.strip().lower() not in choices:
            fail(f"{label} {given!r}: expected {' or '.join(choices)}, or NAME={choices[0]}")
        return text.strip().lower()

    return split_named(values, choice)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def model_option(model: str | None) -> str | None:
    return model or state.model or os.environ.get("PERFUSION_MODEL") or None


def device_option(device: str | None) -> str:
    return device or state.device
