"""The `perfusion` command: one Typer app; each command group lives in its own module."""

from __future__ import annotations

import typer

from .. import __version__
from .common import state

app = typer.Typer(
    name="perfusion",
    help="Personalize text-to-image diffusion models with Perfusion (key-locked rank-1 editing).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"perfusion {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    model: str = typer.Option(None, "--model", help="Default base model: profile (toyworld, sd15, sd21, sdxl), hub id, folder or .safetensors file.", envvar="PERFUSION_MODEL"),
    device: str = typer.Option("auto", "--device", help="auto, cuda, mps or cpu."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress or messages on stderr (errors still)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks.", envvar="PERFUSION_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    state.model, state.device, state.quiet, state.debug = model, device, quiet, debug
    if not debug:
        _silence_libraries()


def _silence_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except Exception:
        pass


from . import bench, concepts, demo, render, toyworld, train  # noqa: E402  (register the commands)


def main() -> None:
    app()
