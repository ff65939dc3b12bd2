"""The two rich consoles every part of facetool prints through: ``console`` (results, stdout) and
``err_console`` (progress, notes and errors, stderr). The CLI, the training loop and ``prepare`` share
them, so progress bars and tables never interleave.

Output that goes to a file or a pipe is a log: rich would render it 80 columns wide and cut table cells
to "…". Here a table printed to a non-terminal gets the width it needs (``COLUMNS`` or 80 at least), so
every table prints whole in logs; a terminal behaves as rich always did."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

WIDEST_LOG = 1000  # a cap, so a pathological cell cannot make a single line of megabytes


class _LogConsole(Console):
    """A Console that widens itself for the tables it prints when its output is not a terminal."""

    def _needs_width(self, objects: tuple[Any, ...]) -> int:
        if self.is_terminal or self.is_jupyter:
            return 0
        need = 0
        for obj in objects:
            if isinstance(obj, Table):
                need = max(need, Measurement.get(self, self.options.update(width=WIDEST_LOG), obj).maximum)
        return min(need, WIDEST_LOG)

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 - rich's name
        need = self._needs_width(objects)
        if need <= self.width:
            super().print(*objects, **kwargs)
            return
        saved = self._width
        self.width = need
        try:
            super().print(*objects, **kwargs)
        finally:
            self._width = saved


console = _LogConsole()
err_console = _LogConsole(stderr=True)
