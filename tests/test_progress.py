"""Progress bars stay off standard output, where commands print their results, and write nothing where standard
error is not a terminal (rich's own default console writes a line to standard output even when it is not a
terminal: the first GPU runs of `generate` printed one per CUDA-graph capture, one per rank; on standard error the
same line came before a command's error message)."""

from __future__ import annotations

from rich.progress import BarColumn, TextColumn

from trident.progress import progress_bar


def test_a_bar_writes_nothing_to_standard_output(capfd) -> None:
    for transient in (True, False):
        with progress_bar(TextColumn("work"), BarColumn(), transient=transient) as bar:
            task = bar.add_task("work", total=3)
            for _ in range(3):
                bar.advance(task)
            print("result", flush=True)  # a command's own output while the bar shows reaches stdout unchanged
    out, err = capfd.readouterr()
    assert out == "result\nresult\n"
    assert err == ""  # the captured standard error is not a terminal
