"""Notebook sources: clean papermill templates whose parameters match their declarations and
that refuse bad parameters before any work. (tests/test_book.py runs every notebook end to end
under the tiny profile.)"""

import subprocess
import sys

import nbformat
import papermill
import pytest

from delving.params import NOTEBOOKS_DIR, check_value, notebooks, spec_for

NOTEBOOKS = notebooks()
PAPERMILL = [sys.executable, "-m", "papermill"]


def test_there_are_notebooks():
    assert "01_variance" in NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_source_is_a_clean_template(name):
    nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), "commit without outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with a title"
    following = nb.cells[nb.cells.index(tagged[0]) + 1]
    assert f'check("{name}", globals())' in following.source, "validation right after the parameters"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_match_the_declaration_and_are_documented(name):
    inferred = papermill.inspect_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"))
    spec = spec_for(name)
    assert list(inferred) == list(spec), "the parameters cell and params.SPECS name the same parameters, in order"
    for pname, info in inferred.items():
        assert info["inferred_type_name"] != "None", f"{pname} needs a type annotation"
        assert info["help"], f"{pname} needs a comment"
        default = eval(info["default"])  # literal defaults only
        check_value(pname, default, spec[pname], check_paths=False)


def test_help_notebook_documents_the_parameters():
    out = subprocess.run(PAPERMILL + ["--help-notebook", str(NOTEBOOKS_DIR / "01_variance.ipynb")],
                         capture_output=True, text=True, check=True).stdout
    assert "depth: int" in out and "weight layers" in out


def _bad_run(name, tmp_path, *args):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / "sentinel").write_text("an earlier good run")
    env_cmd = ["env", f"DELVING_RESULTS={results}"]
    proc = subprocess.run(env_cmd + PAPERMILL + [str(NOTEBOOKS_DIR / f"{name}.ipynb"), str(tmp_path / "o.ipynb"),
                                                 "--no-progress-bar", *args], capture_output=True, text=True)
    assert sorted(p.name for p in results.iterdir()) == ["sentinel"], "nothing written before validation"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["-p", "depth", "-3"], ["'depth'", "-3", ">= 2"]),
    (["-p", "depth", "ten"], ["'depth'", "'ten'", "an integer"]),
    (["-p", "schemes", '["he-fan-in", "lecun"]'], ["'schemes'", "lecun", "he-fan-out"]),
    (["-p", "dept", "5"], ["unknown parameter", "'dept'"]),
])
def test_bad_parameter_fails_before_any_work_with_a_clear_message(tmp_path, args, fragments):
    proc = _bad_run("01_variance", tmp_path, *args)
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in proc.stderr + proc.stdout, (fragment, proc.stderr[-2000:])


@pytest.mark.slow
def test_book_command_refuses_a_bad_profile_before_running_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "delving.book", "--profile", "no-such-profile", "--no-build"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "profile 'no-such-profile' does not exist" in proc.stderr and "cpu" in proc.stderr
