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

from facetool import distributed as fd
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
    if fd.sharded():
        return _build_sharded(out, items, process, writer_kwargs=writer_kwargs, overwrite=overwrite, resume=resume,
                              workers=workers, initial_counters=initial_counters,
                              drop_empty_identities=drop_empty_identities, extra_attrs=extra_attrs)
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


def _build_sharded(out: str | Path, items: Sequence[Any], process: Callable[[Any], Record | str], *,
                   writer_kwargs: dict[str, Any], overwrite: bool, resume: bool, workers: int,
                   initial_counters: dict[str, int] | None, drop_empty_identities: bool,
                   extra_attrs: dict | None, chunk: int = 64) -> tuple[Path, dict[str, int]] | None:
    """:func:`build_store` under ``torchrun``: in rounds of ``world x chunk`` items each rank processes its
    chunk (:func:`facetool.distributed.map_sharded`), and rank 0, the only writer, appends the results in
    item order, checkpointing after every item (so ``--resume`` works as in one process) — the store one
    process writes, in bounded memory. The other ranks return None."""
    writer = StoreWriter(out, overwrite=overwrite, resume=resume, **writer_kwargs) if fd.is_main() else None
    try:
        start = fd.all_gather_object(writer.cursor if writer is not None and writer.resumed else 0)[0]
        counters: Counter[str] = Counter(writer.counters if writer is not None and writer.resumed
                                         else (initial_counters or {}))
        chunk = max(1, min(chunk, -(-(len(items) - start) // fd.world_size())))  # small jobs: every rank works
        step = chunk * fd.world_size()
        for r0 in range(start, len(items), step):
            r1 = min(len(items), r0 + step)
            done = fd.map_sharded(r1, lambda idx: list(_ordered_map(process, items[int(idx[0]): int(idx[-1]) + 1],
                                                                    0, workers)),
                                  batch_size=chunk, start=r0, pad=False)
            if writer is None:
                continue
            for i, results in enumerate((r for part in done for r in part), start=r0):
                for res in results if isinstance(results, list) else [results]:
                    if isinstance(res, str):
                        counters[res] += 1
                    else:
                        writer.append(res)
                writer.checkpoint(i + 1, dict(counters))
    except BaseException:
        if writer is not None:
            writer.abort(keep=True)
        raise
    if writer is None:
        return None
    path = writer.finalize(extra_attrs={"counters": dict(counters), **(extra_attrs or {})},
                           drop_empty_identities=drop_empty_identities)
    return path, dict(counters)
