"""The ``repskip`` group: its consoles, how errors and signals end a command, and the small
option parsers every command shares. The commands live in the modules beside this one, one per
stage."""
from __future__ import annotations

import sys
import warnings

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from .. import __version__
from ..errors import RepskipError
from ..outputs import Terminated, exit_cleanly_on_signals

# Logs and pipes get a wide console, so tables are not cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class _Cli(click.Group):
    """Turns RepskipError into ``error: ...`` and exit code 1, with no traceback."""

    def invoke(self, ctx):
        warnings.showwarning = _one_line_warnings
        exit_cleanly_on_signals()  # SIGTERM / SIGHUP unwind like Ctrl-C: no half-written output
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        try:
            return super().invoke(ctx)
        except RepskipError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            ctx.exit(1)
        except Terminated as exc:
            err_console.print(f"[red]terminated ({exc}): nothing half-written was left[/]")
            ctx.exit(143)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted: nothing half-written was left[/]")
            ctx.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="repskip")
def main() -> None:
    """Measure how much each decoder layer changes the representation, turn that into a skip
    recipe, and physically remove the skipped layers.

    MODEL is a local checkpoint folder or a Hugging Face Hub id.
    """


def spread_options(command):
    """--device-map, --max-memory and --offload-folder: inference on a model spread by
    accelerate over the device and disk (repskip.engine.offload.spread_folder)."""
    for option in reversed([
        click.option("--device-map", default=None, help="Spread a model too big for one device, e.g. auto (HF "
                                                        "decoders)."),
        click.option("--max-memory", default=None, metavar="SIZE",
                     help="With --device-map: memory the model may take on the device (e.g. 12GB); the rest waits "
                          "on disk."),
        click.option("--offload-folder", type=click.Path(path_type=Path), default=None,
                     help="With --device-map: where what does not fit waits (a fresh folder inside it, removed "
                          "afterwards) [default: the system's temporary folder]."),
    ]):
        command = option(command)
    return command


def trust_remote_code_option(command):
    """--trust-remote-code for a command that opens checkpoints: their own modeling code
    (auto_map) runs only with it, as in transformers."""
    import functools

    @click.option("--trust-remote-code", is_flag=True,
                  help="Run the modeling code a checkpoint ships (auto_map), as transformers' trust_remote_code does. "
                       "Only for code you trust: it runs with your permissions.")
    @functools.wraps(command)
    def wrapper(*args, trust_remote_code: bool, **kwargs):
        from ..pipeline import trusting_remote_code

        with trusting_remote_code(trust_remote_code):
            return command(*args, **kwargs)

    return wrapper


def _float_list(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RepskipError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _key_values(pairs: tuple[str, ...], option: str = "--sampler-setting") -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RepskipError(f"{option} takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


