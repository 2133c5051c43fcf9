"""Interrupted runs, bad input, untrusted files, concurrent runs: each ends in a clear message or
a correct recovery, never a lost result."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from delving import results
from delving.params import PROJECT_ROOT

pytestmark = pytest.mark.slow
TRAIN = [sys.executable, "-m", "delving.train", "--experiment", "kill", "--model", "small14", "--width", "0.0625",
         "--train-subset", "1024", "--eval-subset", "128", "--test-subset", "128", "--epochs", "2",
         "--batch-size", "32", "--evals-per-epoch", "4", "--augment", "--threads", "1", "--device", "cpu",
         "--no-progress", "--seed", "3"]
TIMING = ["images_per_s"]  # wall-clock columns differ between any two runs


def _env(root):
    return {**os.environ, "DELVING_RESULTS": str(root)}


def _run_dirs(root):
    base = root / "kill"
    return sorted(base.iterdir()) if base.is_dir() else []


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(TRAIN, env=_env(whole), check=True, capture_output=True, timeout=300)
    (reference,) = _run_dirs(whole)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(TRAIN, env=_env(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a mid-epoch checkpoint (the 2nd evaluation of epoch 0)
        dirs = _run_dirs(killed)
        metrics = dirs[0] / "metrics.csv" if dirs else None
        if metrics and metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = _run_dirs(killed)
    assert not (run_dir / "summary.json").exists(), "killed before the end"
    assert (run_dir / "checkpoint.pt").exists()

    subprocess.run(TRAIN + ["--resume", "auto"], env=_env(killed), check=True, capture_output=True, timeout=300)
    assert _run_dirs(killed) == [run_dir], "resumed the same run, started no new one"
    a, b = results.load_run(reference), results.load_run(run_dir)
    assert b.summary["status"] == "completed"
    pd.testing.assert_frame_equal(a.metrics.drop(columns=TIMING), b.metrics.drop(columns=TIMING))
    pd.testing.assert_frame_equal(a.table("grad_norms"), b.table("grad_norms"))
    wa = torch.load(reference / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "bit-identical weights on CPU"


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    results.atomic_torch_save({"step": torch.tensor(1)}, path)

    real_fdopen = os.fdopen

    class HalfFile:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):  # the process dies after half the bytes are on disk
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdopen", HalfFile)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_torch_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(torch.load(path, weights_only=True)["step"]) == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"], "no temporary left behind"


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    from delving.train import TrainConfig, load_checkpoint, make_model

    config = TrainConfig(model="small14", width=0.0625)
    model = make_model(config, in_channels=1, input_size=28, num_classes=10)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(Exception) as e:
        load_checkpoint(path, config, model)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("args, fragment", [
    (["--init", "lecun"], "--init"),
    (["--epochs", "-1"], "epochs"),
    (["--lr", "fast"], "--lr"),
    (["--depht", "3"], "--depht"),
])
def test_train_cli_refuses_bad_arguments_before_any_record(tmp_path, args, fragment):
    proc = subprocess.run(TRAIN + args, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr[-1000:]
    assert not _run_dirs(tmp_path)


def test_make_book_refuses_a_bad_profile_before_touching_anything(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (PROJECT_ROOT / "book").glob("*.ipynb")}
    proc = subprocess.run(["make", "-s", "book", "PROFILE=no-such-profile"], cwd=PROJECT_ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "profile 'no-such-profile' does not exist" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (PROJECT_ROOT / "book").glob("*.ipynb")} == before
    assert not any(tmp_path.iterdir())


def test_two_runs_started_at_once_keep_separate_records(tmp_path):
    quick = TRAIN + ["--epochs", "1", "--max-steps", "6"]  # a later option wins in argparse
    procs = [subprocess.Popen(quick, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 2 and len(_run_dirs(tmp_path)) == 2
    for d in _run_dirs(tmp_path):
        record = results.load_run(d)
        assert record.finished and record.metrics["step"].is_monotonic_increasing


def test_two_processes_resuming_the_same_killed_run_never_share_it(tmp_path, monkeypatch):
    """Two papermill processes of one chapter both ask for resume="auto": one takes the killed
    run, the other starts its own, and neither writes into the other's record."""
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path))  # never into the project's own results/
    killed = results.start_run("kill", {"x": 1})
    killed.close()  # as if its process had been killed
    from delving.train import TrainConfig, open_or_start_run

    config = TrainConfig(experiment="kill")
    results.atomic_write_json(killed.dir / "params.json", config.to_dict())
    first = open_or_start_run(config, "auto", torch.device("cpu"))
    second = open_or_start_run(config, "auto", torch.device("cpu"))
    assert first.dir == killed.dir and second.dir != killed.dir
