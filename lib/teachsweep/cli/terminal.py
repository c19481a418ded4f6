"""Where the command line writes: a console as wide as the terminal, paths kept whole, one-line errors."""

from __future__ import annotations

import shutil
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from teachsweep.verdict import wrap_lines


def terminal_width() -> int:
    """COLUMNS, else the terminal's width; 100 where the output is no terminal (a pipe, a log file)."""
    return shutil.get_terminal_size((100, 24)).columns


console = Console(width=terminal_width())


def print_paths(text: str) -> None:
    """Text wrapped at spaces to the terminal, where a path or URL longer than a line stays whole on its own line
    (rich would fold it, and a folded path can neither be clicked nor copied)."""
    console.print(
        "\n".join(wrap_lines(text.splitlines(), console.width)), soft_wrap=True, highlight=False, markup=False
    )


def fail(message: str, exit_code: int = 2) -> NoReturn:
    """One line on stderr, then exit (2: bad input); the message is plain text (a path like `lot[v2].yaml` keeps
    its brackets)."""
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code)
