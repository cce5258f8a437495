"""Progress bars of the engine and the benchmarks, on standard error, and only where it is a terminal.

What these commands print on standard output is their result (generated text, a table): a bar there would add to
it, and rich's bar writes a line even where its stream is not a terminal (a log file, a pipe, a test's capture),
so there it draws nothing. Standard output written while a bar shows goes where it was going (no redirection
through the bar's console)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def progress_bar(*columns: str | ProgressColumn, transient: bool = False, disable: bool = False) -> Progress:
    """A rich Progress with ``columns`` (rich's default ones when none) drawn on standard error, disabled where
    standard error is not a terminal."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=transient, disable=disable or not console.is_terminal,
                    redirect_stdout=False, redirect_stderr=False)
