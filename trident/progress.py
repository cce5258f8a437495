"""Progress bars of the engine and the benchmarks, on standard error.

What these commands print on standard output is their result (generated text, a table): a bar there would add to
it, and rich's bar writes a line even where its stream is not a terminal. Standard output written while a bar shows
goes where it was going (no redirection through the bar's console)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def progress_bar(*columns: str | ProgressColumn, transient: bool = False, disable: bool = False) -> Progress:
    """A rich Progress with ``columns`` (rich's default ones when none) drawn on standard error."""
    return Progress(*columns, console=Console(stderr=True), transient=transient, disable=disable,
                    redirect_stdout=False, redirect_stderr=False)
