"""Run records: every experiment's results, written atomically, read back by the book.

A run lives in `results/<experiment>/<run-id>/` (root: $DELVING_RESULTS or `<project>/results`):

    params.json      the parameters the run was started with
    provenance.json  git commit and dirty flag, package versions, CPU/GPU, device, seed,
                     start time (wall time is added by `finish`)
    metrics.csv      one row per evaluation (per epoch, or several per epoch)
    <table>.csv      any other table the run logs (gradient norms, coefficients, ...)
    summary.json     written last: status ("completed" | "diverged"), final numbers, wall time
    checkpoint.pt    the training state, for resume

Every file is written to a temporary name in the same directory and renamed into place, so a
reader (or a kill) never sees half a file. A run directory is created with mkdir(exist_ok=False)
under a unique id, so two runs started at once never share one. Notebooks and the book read
results only through `load_run` / `find_runs` / `latest_run`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import platform
import secrets
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "papermill", "jupyter-book", "delving")


def results_root() -> Path:
    return Path(os.environ.get("DELVING_RESULTS", PROJECT_ROOT / "results"))


# --- atomic files -------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: a kill during a save leaves the previous file intact."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# --- provenance ---------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(*, device: str, seed: int | None) -> dict[str, Any]:
    """Where, when and with what a run was made."""
    import torch

    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "packages": versions,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": device,
        "seed": seed,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- writing a run ------------------------------------------------------------------------

class RunInUse(RuntimeError):
    """Another live process has this run open for writing."""


class Run:
    """An open run record: created by `start_run`, reopened by `open_run` to resume.

    The process holding a Run holds an exclusive lock on `<run>/.lock` (flock: the kernel drops
    it when the process exits or is killed), so two processes never write one run: a second
    `open_run` of a live run raises RunInUse, and a killed run's lock is free to resume."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._lock = open(self.dir / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RunInUse(f"run {self.dir} is being written by another live process") from None
        self.experiment = self.dir.parent.name
        self.run_id = self.dir.name
        self._tables: dict[str, list[dict[str, Any]]] = {}
        for csv_path in self.dir.glob("*.csv"):  # reopened: keep appending to what is there
            with open(csv_path, newline="") as f:
                self._tables[csv_path.stem] = [dict(r) for r in csv.DictReader(f)]
        self._t0 = time.time() - float(self._read_json("provenance.json").get("wall_time_s") or 0.0)

    def close(self) -> None:
        """Release the run without finishing it (it stays resumable)."""
        self._lock.close()

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def params(self) -> dict[str, Any]:
        return self._read_json("params.json")

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def log(self, row: dict[str, Any], table: str = "metrics") -> None:
        """Append a row to `<table>.csv` (rewritten atomically, so a kill loses at most this row)."""
        rows = self._tables.setdefault(table, [])
        rows.append(dict(row))
        self._write_table(table, rows)

    def truncate(self, table: str, keep: int) -> None:
        """Keep the first `keep` rows of a table: on resume, drop rows logged after the checkpoint."""
        rows = self._tables.get(table, [])[:keep]
        self._tables[table] = rows
        self._write_table(table, rows)

    def rows(self, table: str = "metrics") -> list[dict[str, Any]]:
        return list(self._tables.get(table, []))

    def write_table(self, table: str, rows: Iterable[dict[str, Any]] | pd.DataFrame) -> None:
        """Replace a whole table."""
        rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(r) for r in rows]
        self._tables[table] = rows
        self._write_table(table, rows)

    def _write_table(self, table: str, rows: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.dir / f"{table}.csv", buffer.getvalue())

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.dir / f"{name}.json", obj)

    def finish(self, summary: dict[str, Any], status: str = "completed") -> "Record":
        """Write summary.json last: a run without it is unfinished (killed, or still running)."""
        wall = time.time() - self._t0
        prov = self._read_json("provenance.json")
        prov["wall_time_s"] = wall
        prov["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.dir / "provenance.json", prov)
        atomic_write_json(self.dir / "summary.json", {"status": status, "wall_time_s": wall, **summary})
        self.close()
        return load_run(self.dir)

    def save_elapsed(self) -> None:
        """Record the wall time so far, so that a resumed run's wall time counts both parts."""
        prov = self._read_json("provenance.json")
        prov["wall_time_s"] = time.time() - self._t0
        atomic_write_json(self.dir / "provenance.json", prov)


def new_run_id() -> str:
    """Sorts by start time (to the microsecond), so `find_runs` lists runs oldest first even when
    one process starts several in the same second; pid and random suffix keep concurrent ones apart."""
    now = time.time()
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}-{os.getpid()}-{secrets.token_hex(3)}"


def start_run(experiment: str, params: dict[str, Any], *, device: str = "cpu",
              seed: int | None = None, root: Path | None = None) -> Run:
    """Create a fresh run directory (never an existing one) with its params and provenance."""
    base = Path(root or results_root()) / experiment
    base.mkdir(parents=True, exist_ok=True)
    while True:
        directory = base / new_run_id()
        try:
            directory.mkdir(exist_ok=False)
            break
        except FileExistsError:  # same second, same pid, same random suffix: draw again
            continue
    atomic_write_json(directory / "params.json", params)
    atomic_write_json(directory / "provenance.json", provenance(device=device, seed=seed))
    return Run(directory)


def open_run(directory: Path) -> Run:
    """Reopen an unfinished run to resume it."""
    directory = Path(directory)
    if not (directory / "params.json").is_file():
        raise FileNotFoundError(f"{directory} is not a run directory (no params.json)")
    return Run(directory)


# --- reading runs ---------------------------------------------------------------------------

@dataclass
class Record:
    """A run as the book reads it."""

    dir: Path
    params: dict[str, Any]
    provenance: dict[str, Any]
    summary: dict[str, Any] | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return self.dir.parent.name

    @property
    def run_id(self) -> str:
        return self.dir.name

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        return self.summary["status"] if self.summary else "unfinished"

    @property
    def metrics(self) -> pd.DataFrame:
        return self.tables.get("metrics", pd.DataFrame())

    def table(self, name: str) -> pd.DataFrame:
        return self.tables.get(name, pd.DataFrame())


def load_run(directory: Path) -> Record:
    directory = Path(directory)
    read = lambda n: json.loads((directory / n).read_text()) if (directory / n).exists() else None
    tables = {}
    for p in sorted(directory.glob("*.csv")):
        try:
            tables[p.stem] = pd.read_csv(p)
        except pd.errors.EmptyDataError:
            tables[p.stem] = pd.DataFrame()
    return Record(directory, read("params.json") or {}, read("provenance.json") or {},
                  read("summary.json"), tables)


def find_runs(experiment: str, *, finished: bool = True, root: Path | None = None,
              **param_filters: Any) -> list[Record]:
    """Runs of an experiment, oldest first, whose params match every filter given."""
    base = Path(root or results_root()) / experiment
    runs = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not (d / "params.json").is_file():
            continue
        record = load_run(d)
        if finished and not record.finished:
            continue
        if all(record.params.get(k) == v for k, v in param_filters.items()):
            runs.append(record)
    return runs


def latest_run(experiment: str, **param_filters: Any) -> Record:
    runs = find_runs(experiment, **param_filters)
    if not runs:
        raise LookupError(f"no finished run of {experiment!r} with {param_filters or 'any params'} "
                          f"under {results_root()}")
    return runs[-1]


def provenance_table(records: Iterable[Record]) -> pd.DataFrame:
    """One row per run: what a chapter shows at its end (parameters are shown beside it)."""
    rows = []
    for r in records:
        p = r.provenance
        rows.append({
            "experiment": r.experiment, "run": r.run_id, "status": r.status,
            "commit": (p.get("git_commit") or "?")[:10] + ("+dirty" if p.get("git_dirty") else ""),
            "torch": (p.get("packages") or {}).get("torch"), "python": p.get("python"),
            "device": p.get("device"), "hardware": p.get("gpu") or f"{p.get('cpu')} ({p.get('torch_threads')} threads)",
            "seed": p.get("seed"), "started": p.get("start_time"),
            "wall time (s)": round(float(p.get("wall_time_s") or float("nan")), 1),
        })
    return pd.DataFrame(rows)


def record_findings(chapter: str, params: dict[str, Any], findings: dict[str, Any],
                    runs: Iterable[Record] = ()) -> Record:
    """A chapter's measured verdict inputs, as a run of experiment `findings-<chapter>`.

    The scorecard reads the newest one of each chapter (`latest_findings`); `runs` names the
    run records the numbers came from, so every figure on the scorecard traces back to a run."""
    run = start_run(f"findings-{chapter}", params, device=str(params.get("device", "cpu")), seed=params.get("seed"))
    return run.finish({"findings": findings, "source_runs": [str(r.dir) for r in runs]})


def latest_findings(chapter: str) -> Record | None:
    runs = find_runs(f"findings-{chapter}")
    return runs[-1] if runs else None
