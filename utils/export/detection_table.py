"""The table of targets of a run: one row per detection, written as each image or frame comes.

    with DetectionTable("results/flight/detections.csv") as table:      # or .jsonl; refuses to overwrite
        table.write(detections, source="flight.mp4", frame=12, time=0.48)
    rows = read_table("results/flight/detections.csv")                 # typed dicts, TABLE_COLUMNS as keys

``.csv`` gives CSV with a header line; ``.jsonl`` gives JSON Lines (one JSON object per line, the same keys and
values): a run that stops early still leaves a valid file, and it streams in as well as out
(``pandas.read_json(path, lines=True)``). ``frame`` and ``time_s`` are empty (CSV) or null (JSON) for still
images; images or frames without any detection add no row.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from utils.export.detections import Detection
from utils.io.images import refuse_to_replace

TABLE_COLUMNS = ("source", "frame", "time_s", "id", "x", "y", "x0", "y0", "x1", "y1", "area", "peak", "mean",
                 "threshold")
TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
DECIMALS = {"x": 3, "y": 3, "time_s": 6, "peak": 6, "mean": 6, "threshold": 6}  # digits after the point
_INTEGER_COLUMNS = ("frame", "id", "x0", "y0", "x1", "y1", "area")


def _rounded(column: str, value: float | None) -> float | None:
    if value is None:
        return None
    return round(float(value), DECIMALS[column])


def table_rows(detections: Iterable[Detection], source: str, frame: int | None = None,
               time: float | None = None) -> list[dict[str, Any]]:
    """One row (a dict with the keys ``TABLE_COLUMNS``) per detection, floats rounded to ``DECIMALS``."""
    if time is not None and not math.isfinite(time):
        raise ValueError(f"{source}: time must be a finite number of seconds or None, got {time}")
    rows = []
    for d in detections:
        row: dict[str, Any] = {"source": str(source), "frame": None if frame is None else int(frame),
                               "time_s": _rounded("time_s", time)}
        for key, value in asdict(d).items():
            row[key] = _rounded(key, value) if key in DECIMALS else int(value)
        rows.append(row)
    return rows


def _csv_cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in DECIMALS:
        return f"{value:.{DECIMALS[column]}f}"
    return str(value)


class DetectionTable:
    """One table of detections for a whole run, written row by row (constant memory).

    Args:
        path: ``.csv`` (CSV with a header line) or ``.jsonl`` (JSON Lines); its folder is created.
        overwrite: replace an existing file; without it an existing file is an error that names it.
        append: go on writing an existing table (an interrupted export's), after its rows.

    Use as a context manager (the file is closed, and complete, on leaving it), or call ``close()``.
    ``rows`` counts the rows written so far.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, append: bool = False) -> None:
        self.path = Path(path)
        self.format = TABLE_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"{self.path}: a detection table is a .csv or a .jsonl (JSON Lines) file; "
                             f"choose one of these suffixes")
        append = append and self.path.is_file() and self.path.stat().st_size > 0
        if not append:
            refuse_to_replace(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w" if overwrite else "x", newline="", encoding="utf-8")
        self._csv = None
        if self.format == "csv":
            self._csv = csv.writer(self._file, lineterminator="\n")
            if not append:
                self._csv.writerow(TABLE_COLUMNS)
            self._file.flush()
        self.rows = 0

    def write(self, detections: Iterable[Detection], source: str, frame: int | None = None,
              time: float | None = None) -> int:
        """Append the detections of one image or frame and flush; returns the number of rows written.

        Args:
            source: the image file or video (its name or path, as the caller wants it shown).
            frame: the frame index in the video or sequence; None for a still image.
            time: seconds from the start of the video; None when unknown or for a still image.
        """
        if self._file.closed:
            raise ValueError(f"{self.path}: the table is closed; open a new DetectionTable to write more")
        rows = table_rows(detections, source, frame, time)
        for row in rows:
            if self._csv is not None:
                self._csv.writerow([_csv_cell(column, row[column]) for column in TABLE_COLUMNS])
            else:
                self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.rows += len(rows)
        return len(rows)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> DetectionTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a table ``DetectionTable`` wrote (.csv or .jsonl) as dicts with typed values: ``source`` str,
    integer columns int, the others float; empty cells (CSV) and nulls (JSON) as None."""
    path = Path(path)
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: not a detection table (expected a .csv or .jsonl file)")
    with open(path, newline="", encoding="utf-8") as file:
        if kind == "jsonl":
            raw = [json.loads(line) for line in file if line.strip()]
        else:
            reader = csv.DictReader(file)
            if tuple(reader.fieldnames or ()) != TABLE_COLUMNS:
                raise ValueError(f"{path}: expected the columns {','.join(TABLE_COLUMNS)}, "
                                 f"found {','.join(reader.fieldnames or [])}")
            raw = [{k: (v if v != "" else None) for k, v in row.items()} for row in reader]
    rows = []
    for row in raw:
        typed: dict[str, Any] = {}
        for column in TABLE_COLUMNS:
            value = row.get(column)
            if value is None or column == "source":
                typed[column] = value
            elif column in _INTEGER_COLUMNS:
                typed[column] = int(value)
            else:
                typed[column] = float(value)
        rows.append(typed)
    return rows
