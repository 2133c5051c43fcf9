"""Run records: atomic files, provenance, unique run directories, reading back."""

import json
import multiprocessing as mp
import os

import pandas as pd
import pytest

from delving import results


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path))
    return tmp_path


def test_run_writes_params_metrics_summary_and_provenance(results_dir):
    run = results.start_run("exp", {"lr": 0.01, "model": "deep30"}, device="cpu", seed=3)
    run.log({"epoch": 1, "top1": 0.5})
    run.log({"epoch": 2, "top1": 0.4, "top5": 0.1})  # a new column appears later
    run.log({"step": 1, "layer": "conv1", "grad_norm": 0.2}, table="grad_norms")
    record = run.finish({"final_top1": 0.4})
    assert record.dir.parent == results_dir / "exp"
    assert json.loads((record.dir / "params.json").read_text()) == {"lr": 0.01, "model": "deep30"}
    assert list(record.metrics["top1"]) == [0.5, 0.4]
    assert pd.isna(record.metrics["top5"][0]) and record.metrics["top5"][1] == 0.1
    assert record.table("grad_norms")["layer"].tolist() == ["conv1"]
    assert record.summary["status"] == "completed" and record.summary["final_top1"] == 0.4
    prov = record.provenance
    for key in ("git_commit", "git_dirty", "packages", "cpu", "device", "seed", "start_time", "wall_time_s"):
        assert key in prov, key
    assert prov["seed"] == 3 and prov["packages"]["torch"].startswith("2.14")
    assert not list(record.dir.glob(".*tmp")), "no temporary file is left behind"


def test_unfinished_runs_are_not_found_and_filters_match(results_dir):
    a = results.start_run("exp", {"init": "he"})
    b = results.start_run("exp", {"init": "xavier"})
    assert results.find_runs("exp") == []
    a.finish({})
    b.finish({})
    assert [r.params["init"] for r in results.find_runs("exp")] == ["he", "xavier"]
    assert results.latest_run("exp", init="xavier").params["init"] == "xavier"
    with pytest.raises(LookupError, match="no finished run of 'exp'"):
        results.latest_run("exp", init="glorot")


def test_reopened_run_keeps_and_truncates_rows(results_dir):
    run = results.start_run("exp", {})
    for i in range(5):
        run.log({"step": i})
    run.close()
    again = results.open_run(run.dir)
    assert [int(r["step"]) for r in again.rows()] == [0, 1, 2, 3, 4]
    again.truncate("metrics", 3)
    again.log({"step": 99})
    assert results.load_run(run.dir).metrics["step"].tolist() == [0, 1, 2, 99]


def test_atomic_write_keeps_old_content_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    results.atomic_write_json(path, {"good": 1})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        results.atomic_write_json(path, {"bad": Unserialisable()})
    assert json.loads(path.read_text()) == {"good": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def _start(root):
    os.environ["DELVING_RESULTS"] = root
    return str(results.start_run("exp", {"pid": os.getpid()}).dir)


def test_concurrent_runs_get_distinct_directories(results_dir):
    with mp.get_context("spawn").Pool(4) as pool:
        dirs = pool.map(_start, [str(results_dir)] * 8)
    assert len(set(dirs)) == 8


def _hold_run(directory, ready, release):
    run = results.open_run(directory)
    ready.set()
    release.wait(30)


def test_a_run_open_in_a_live_process_cannot_be_opened_again_until_it_dies(results_dir):
    run = results.start_run("exp", {})
    with pytest.raises(results.RunInUse, match="another live process"):
        results.open_run(run.dir)
    run.finish({})
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    unfinished = results.start_run("exp", {"b": 1})
    directory = unfinished.dir
    unfinished.close()  # hand it over, as if this process had been killed
    holder = ctx.Process(target=_hold_run, args=(directory, ready, release))
    holder.start()
    assert ready.wait(60)
    with pytest.raises(results.RunInUse):
        results.open_run(directory)
    holder.kill()  # SIGKILL: the kernel drops its lock
    holder.join()
    assert results.open_run(directory).dir == directory
