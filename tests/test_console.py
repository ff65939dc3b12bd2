"""Tables print whole in logs: output to a file or a pipe is never cut to "…" (issue #21 item 5)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from rich.table import Table

from facetool.console import _LogConsole

CELLS = [f"/a/rather/long/path/to/value{i}.h5" for i in range(8)]


def _wide_table() -> Table:
    t = Table(title="wide")
    for i in range(8):
        t.add_column(f"column number {i}")
    t.add_row(*CELLS)
    return t


def test_table_to_a_file_prints_whole_and_other_output_keeps_the_width():
    buf = io.StringIO()
    c = _LogConsole(file=buf, width=80)
    c.print(_wide_table())
    c.print("x" * 10)
    out = buf.getvalue()
    assert "…" not in out
    assert all(cell in out for cell in CELLS)
    assert c.width == 80  # widened for the table only


def test_terminal_output_behaves_as_rich():
    buf = io.StringIO()
    c = _LogConsole(file=buf, width=80, force_terminal=True, color_system=None)
    c.print(_wide_table())
    assert max(len(line) for line in buf.getvalue().splitlines()) <= 80


def test_piped_stdout_of_a_fresh_process_prints_whole_tables():
    """The module-level console, in a fresh process whose stdout is a pipe, with and without COLUMNS."""
    code = ("from rich.table import Table\nfrom facetool.console import console\nt = Table()\n"
            + "".join(f"t.add_column('c{i}')\n" for i in range(8))
            + f"t.add_row(*{CELLS!r})\nconsole.print(t)\n")
    for columns in (None, "40"):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        if columns:
            env["COLUMNS"] = columns
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        assert "…" not in out and all(cell in out for cell in CELLS), out
