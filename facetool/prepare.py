"""The one streaming loop that turns a planned list of inputs into a face store.

Every ``prepare`` source (synthetic, IMDb-Face, folders, IJB, ...) builds a list of items and a
``process(item) -> Record | str`` function (a string is a skip reason, counted); ``process`` may also
return a list of them (e.g. one item per identity, the resume unit). The loop streams
results into :class:`~facetool.store.StoreWriter` in bounded memory, shows progress, and resumes an
interrupted run from the last flushed item.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from facetool.errors import FacetoolError
from facetool.store import Record, StoreWriter


def _progress(total: int, label: str, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from facetool.console import err_console

    p = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, disable=not err_console.is_terminal,
    )
    task = p.add_task(label, total=total, completed=start)
    return p, task


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], start: int, workers: int, chunk: int = 64) -> Iterator[Any]:
    if workers <= 1:
        for i in range(start, len(items)):
            yield fn(items[i])
        return
    with ThreadPoolExecutor(workers) as ex:  # OpenCV and ONNX Runtime release the GIL
        for c0 in range(start, len(items), chunk):
            yield from ex.map(fn, items[c0 : c0 + chunk])


def build_store(
    out: str | Path,
    items: Sequence[Any],
    process: Callable[[Any], Record | str],
    *,
    writer_kwargs: dict[str, Any],
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    label: str = "prepare",
    initial_counters: dict[str, int] | None = None,
    drop_empty_identities: bool = True,
    extra_attrs: dict | None = None,
) -> tuple[Path, dict[str, int]]:
    """Run ``process`` over ``items`` and write the store. Returns (path, skip counters).
    ``process(item)`` returns a Record, a skip reason (str) or a list of those."""
    if workers < 1:
        raise FacetoolError(f"--workers must be >= 1 (threads), got {workers}")
    writer = StoreWriter(out, overwrite=overwrite, resume=resume, **writer_kwargs)
    start = writer.cursor if writer.resumed else 0
    counters: Counter[str] = Counter(writer.counters if writer.resumed else (initial_counters or {}))
    prog, task = _progress(len(items), label, start)
    try:
        with prog:
            for i, results in enumerate(_ordered_map(process, items, start, workers), start=start):
                for res in results if isinstance(results, list) else [results]:
                    if isinstance(res, str):
                        counters[res] += 1
                    else:
                        writer.append(res)
                writer.checkpoint(i + 1, dict(counters))
                prog.advance(task)
    except BaseException:
        writer.abort(keep=True)
        raise
    path = writer.finalize(extra_attrs={"counters": dict(counters), **(extra_attrs or {})},
                           drop_empty_identities=drop_empty_identities)
    return path, dict(counters)
