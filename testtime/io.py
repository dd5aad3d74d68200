"""Files every method writes: atomic files and folders, result tables (markdown + JSON), figures.

- `atomic_write(path, write)` / `atomic_write_text(path, text)`: a temporary file in the same
  folder, renamed into place, so a crash never leaves a half-written file a later run would trust.
- `atomic_folder(target, build)`: the same for a folder (a converted model, a cache), with a
  completion marker written last.
- `format_table(results, n)`: accuracies as a markdown table with binomial standard errors.
- `write_results(folder, stem, table, payload)`: `<stem>.md` and `<stem>.json` side by side.
- `new_figure(...)` / `save_figure(fig, path)`: matplotlib without pyplot (the user's global
  backend is left alone), one look for every plot of the project.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

COMPLETE_MARKER = ".complete"  # written last inside a folder built by `atomic_folder`


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results readable by their owner only
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_folder(target: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_folder)` and move the result to `target` only once it is complete.

    A folder without the completion marker (a crash midway) is never trusted: it is removed and
    rebuilt. When another process finishes the same folder first, its result is kept.
    """
    target = Path(target)
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy over n problems (NaN for n = 0)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n > 0 else float("nan")


def format_table(results: dict[str, float], n_problems: int, metric: str = "accuracy") -> str:
    """A markdown table of accuracies with the binomial standard error over `n_problems`."""
    lines = [f"| decoding | {metric} (n={n_problems}) | ± s.e. |", "|---|---:|---:|"]
    for name, value in results.items():
        lines.append(f"| {name} | {value:.3f} | {standard_error(value, n_problems):.3f} |")
    return "\n".join(lines)


def write_results(folder: str | os.PathLike, stem: str, table: str, payload: dict) -> list[Path]:
    """`<folder>/<stem>.md` (the table) and `<folder>/<stem>.json` (the payload), atomically."""
    folder = Path(folder)
    return [atomic_write_text(folder / f"{stem}.md", table.rstrip("\n") + "\n"),
            atomic_write_text(folder / f"{stem}.json", json.dumps(payload, indent=2, default=str) + "\n")]


def new_figure(ncols: int = 1, panels: int | None = None, panel_size: tuple[float, float] = (5.5, 4.5)):
    """(figure, [axes]) with `panels` axes (default `ncols`), `ncols` a row, on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ncols if panels is None else panels
    nrows = max(1, math.ceil(panels / max(ncols, 1)))
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(panels)]


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a figure as PNG (tight bounding box), atomically; returns the path."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), mode="wb")
