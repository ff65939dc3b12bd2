"""The two rich consoles every part of facetool prints through: ``console`` (results, stdout) and
``err_console`` (progress, notes and errors, stderr). The CLI, the training loop and ``prepare`` share
them, so progress bars and tables never interleave."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
