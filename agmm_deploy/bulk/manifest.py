"""``OUT/manifest.parquet``: one row per input of the run, and what makes a rerun resume.

Columns: path, output (the mask, relative to OUT), status (ok | failed | skipped), error (the sentence; empty
when ok), height, width, inputs (model inputs used), one ``fraction_<class>`` per class (pixel fractions of the
mask), model (file name), precision.

While a run goes, its rows are flushed every 2 s into ``OUT/.manifest-parts/`` (each part written
atomically); the end of the run merges them into ``manifest.parquet``. A driver killed mid-run so loses at
most the rows since the last flush, and a rerun finds the rest: an input whose row is ``ok`` for the same model
and whose files exist is complete and skipped.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from agmm_deploy.atomic import atomic_write
from agmm_deploy.bulk.inputs import Input
from agmm_deploy.bulk.stages import OK, ModelInfo, mask_path, overlay_path

MANIFEST_NAME = "manifest.parquet"
PARTS_NAME = ".manifest-parts"


def manifest_columns(info: ModelInfo) -> list[str]:
    return ["path", "output", "status", "error", "height", "width", "inputs", *info.fraction_columns(), "model",
            "precision"]


def manifest_row(entry: Input, info: ModelInfo, fields: dict) -> dict:
    """A full row: ``fields`` (status, error, height, width, inputs, fractions where known) completed."""
    row = dict(path=entry.path, output=f"{entry.key}.png", error="", height=0, width=0, inputs=0,
               model=info.name, precision=info.precision, **dict.fromkeys(info.fraction_columns(), 0.0))
    row.update(fields)
    return row


def _schema(info: ModelInfo):
    import pyarrow as pa

    types = dict(path=pa.string(), output=pa.string(), status=pa.string(), error=pa.string(), height=pa.int32(),
                 width=pa.int32(), inputs=pa.int32(), model=pa.string(), precision=pa.string())
    return pa.schema([(name, types.get(name, pa.float32())) for name in manifest_columns(info)])


def _write_table(path: Path, rows: list[dict], info: ModelInfo) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema(info))
    atomic_write(path, lambda f: pq.write_table(table, f))


def read_rows(out: Path) -> list[dict]:
    """The rows of the manifest and of any parts a killed run left, later rows last."""
    import pyarrow.parquet as pq

    files = [out / MANIFEST_NAME] + sorted((out / PARTS_NAME).glob("part-*.parquet"))
    rows: list[dict] = []
    for path in files:
        if path.is_file():
            try:
                rows += pq.read_table(path).to_pylist()
            except Exception:  # a manifest from another tool or version: nothing to resume from it
                continue
    return rows


def completed_rows(out: Path, inputs: list[Input], info: ModelInfo, with_overlay: bool) -> dict[str, dict]:
    """The rows, by path, of the inputs a previous run finished with this model: status ok and files present."""
    wanted = {entry.path: entry for entry in inputs}
    done: dict[str, dict] = {}
    for row in read_rows(out):
        entry = wanted.get(row.get("path"))
        if entry is None or row.get("output") != f"{entry.key}.png":
            continue
        if (row.get("status") == OK and row.get("model") == info.name and row.get("precision") == info.precision
                and mask_path(out, entry.key).is_file()
                and (not with_overlay or overlay_path(out, entry.key).is_file())):
            done[entry.path] = row
        else:
            done.pop(entry.path, None)  # a later row (a failure, another model) supersedes an earlier ok
    return done


class ManifestWriter:
    """Collects a run's rows, flushes them as parts every ``flush_s`` seconds, merges them at ``close``."""

    def __init__(self, out: Path, info: ModelInfo, kept: list[dict], flush_s: float = 2.0) -> None:
        self.out, self.info, self.flush_s = out, info, flush_s
        self.kept = kept  # rows of complete inputs carried over from earlier runs
        self.rows: list[dict] = []
        self._pending: list[dict] = []
        self._flushed = time.monotonic()
        self._tag = f"{int(time.time() * 1000):013d}-{os.getpid()}"
        self._parts = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._pending.append(row)
        if time.monotonic() - self._flushed >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Writes the rows since the last flush as a part; on a full disk they wait for the next flush."""
        if self._pending:
            try:
                _write_table(self.out / PARTS_NAME / f"part-{self._tag}-{self._parts:06d}.parquet",
                             self._pending, self.info)
            except OSError:
                return  # close() writes every row again, and says so if it cannot
            self._parts += 1
            self._pending = []
        self._flushed = time.monotonic()

    def close(self, order: list[Input]) -> Path:
        """Writes ``manifest.parquet`` with one row per input of ``order``, in that order; removes the parts.

        Raises:
            OSError: the manifest could not be written (the parts stay for a rerun).
        """
        by_path = {row["path"]: row for row in self.kept}
        by_path.update({row["path"]: row for row in self.rows})
        rows = [by_path[entry.path] for entry in order if entry.path in by_path]
        path = self.out / MANIFEST_NAME
        _write_table(path, rows, self.info)
        shutil.rmtree(self.out / PARTS_NAME, ignore_errors=True)
        return path
