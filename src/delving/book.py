"""Build the book: check a parameter profile, execute every notebook with papermill, run Jupyter Book.

    python -m delving.book --profile cpu                 # what `make book` runs
    python -m delving.book --profile tiny --only 01_variance --no-build

The profile is checked in full before any notebook runs. Each notebook executes into a
temporary file beside its destination in `book/` and is renamed into place only if it ran to
the end, so a failed run never overwrites the last good chapter (the failed notebook is kept
as `book/<name>.failed.ipynb` for inspection).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from delving.params import NOTEBOOKS_DIR, PROJECT_ROOT, ParameterError, check_profile, notebooks, profile_file

BOOK_DIR = PROJECT_ROOT / "book"


class NotebookFailed(RuntimeError):
    pass


def execute_notebook(name: str, profile: str, *, output_dir: Path = BOOK_DIR, progress: bool = True,
                     extra_parameters: dict | None = None) -> Path:
    """Run notebooks/<name>.ipynb under a profile into <output_dir>/<name>.ipynb (atomically)."""
    import papermill

    source = NOTEBOOKS_DIR / f"{name}.ipynb"
    params_path = profile_file(profile, name)
    parameters = (yaml.safe_load(params_path.read_text()) or {}) if params_path else {}
    parameters.update(extra_parameters or {})
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{name}.ipynb"
    partial = output_dir / f".{name}.{os.getpid()}.partial.ipynb"
    try:
        papermill.execute_notebook(str(source), str(partial), parameters=parameters, cwd=str(PROJECT_ROOT),
                                   progress_bar=progress, kernel_name="python3", language="python")
    except papermill.PapermillExecutionError as e:
        failed = output_dir / f"{name}.failed.ipynb"
        os.replace(partial, failed)
        raise NotebookFailed(f"{name} failed ({e.ename}: {e.evalue}); the executed notebook is in {failed}; "
                             f"{final.name} was left as it was") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    (output_dir / f"{name}.failed.ipynb").unlink(missing_ok=True)
    return final


def build_html(book_dir: Path = BOOK_DIR, output_root: Path = PROJECT_ROOT, *,
               warnings_as_errors: bool = True) -> Path:
    """Jupyter Book 1.x over `book_dir` with the root _config.yml; HTML goes to
    `output_root/_build/html`. Returns the index page."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(book_dir), "--config", str(PROJECT_ROOT / "_config.yml"),
           "--toc", str(Path(book_dir).resolve() / "_toc.yml"), "--path-output", str(output_root)]
    if warnings_as_errors:
        cmd += ["-W", "-n", "--keep-going"]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}); see the messages above")
    return Path(output_root) / "_build" / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m delving.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help="directory under params/ (default: cpu)")
    parser.add_argument("--only", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--no-build", action="store_true", help="execute notebooks only")
    parser.add_argument("--no-execute", action="store_true", help="build HTML from the notebooks already in book/")
    parser.add_argument("--check", action="store_true", help="only validate the profile, then exit")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        check_profile(args.profile)
        names = notebooks()
        if args.only:
            unknown = sorted(set(args.only) - set(names))
            if unknown:
                raise ParameterError(f"--only: unknown notebook(s) {', '.join(unknown)}; notebooks: {', '.join(names)}")
            names = [n for n in names if n in args.only]
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"profile {args.profile!r}: valid for {', '.join(names)}")
        return 0
    try:
        if not args.no_execute:
            for name in names:
                t = time.time()
                print(f"== {name} (profile {args.profile})", flush=True)
                execute_notebook(name, args.profile)
                print(f"== {name}: {time.time() - t:.1f} s", flush=True)
        if not args.no_build:
            index = build_html()
            print(f"Book: {index}")
    except (NotebookFailed, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wall time: {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
