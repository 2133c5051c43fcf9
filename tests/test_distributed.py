"""Multi-process training: `torchrun --nproc_per_node 2 -m delving.train ...` (DDP over gloo on the CPU)
against the same run in one process.

Each global batch is split over the ranks, so with dropout off and a deterministic data path the
two runs take the same steps on the same images; gradients averaged by all-reduce differ from the
single-process sums only in float rounding."""

import pandas as pd
import pytest
import torch

from delving import results
from delving.train import TrainConfig, train, train_torchrun
from test_imagefolder import make_folder

COMMON = dict(model="small14", width=1 / 16, activation="prelu-channel-wise", init="he-fan-in", dropout=0.0,
              epochs=2, evals_per_epoch=1, device="cpu", threads=1, grad_norm_every=2, grad_norm_first=1)


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path / "results"))  # torchrun's processes inherit it
    threads = torch.get_num_threads()
    yield tmp_path / "results"
    torch.set_num_threads(threads)


def _weights(record):
    return torch.load(record.dir / "checkpoint.pt", weights_only=True)["model"]


def _compare(single, ddp, *, errors_atol):
    assert single.status == ddp.status == "completed"
    assert ddp.summary["steps"] == single.summary["steps"] and ddp.params == single.params
    a, b = single.metrics, ddp.metrics
    assert list(a["step"]) == list(b["step"])
    pd.testing.assert_series_equal(a["train_loss"], b["train_loss"], rtol=1e-4)
    for column in ("eval_top1", "eval_top5", "test_top1", "test_top5"):
        pd.testing.assert_series_equal(a[column], b[column], atol=errors_atol, rtol=0)
    wa, wb = _weights(single), _weights(ddp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)  # weights ~0.01-1
    pd.testing.assert_frame_equal(single.table("prelu"), ddp.table("prelu"), rtol=1e-3, atol=1e-4)
    # only rank 0 wrote: one run directory each
    assert len(results.find_runs(single.experiment, finished=False)) == 2


@pytest.mark.timeout(120)
def test_torchrun_on_in_memory_data_matches_one_process():
    # Synthetic uint8 images made by every process from the same seed; flips and shifts on, since
    # every rank draws the global batch's augmentation and keeps its half.
    config = TrainConfig(**COMMON, dataset="synthetic", input_size=16, train_subset=256, eval_subset=64,
                         test_subset=96, batch_size=32, augment=True, lr=0.005, experiment="ddp-memory")
    single = train(config, progress=False)
    ddp = train_torchrun(config, 2, timeout=100)
    _compare(single, ddp, errors_atol=1.5 / 64)  # at most one image's prediction flipped by rounding


@pytest.mark.timeout(120)
def test_torchrun_on_an_image_folder_matches_one_process(tmp_path):
    # Square 48x48 JPEGs and scale_range [32, 32]: each training view is the whole image resized,
    # so the decoding path is deterministic and the two runs see identical batches. The test set
    # (6 images, 10 views) does not split evenly over the ranks: 3 + 3 here, the eval subset 5 = 3 + 2.
    folder = make_folder(tmp_path / "data", per_class=8, size=(48, 48))
    config = TrainConfig(**COMMON, dataset="imagefolder", data_dir=str(folder), input_size=32, scale_range=[32, 32],
                         eval_resize=40, eval_views="ten", num_workers=0, eval_subset=5, batch_size=8, lr=0.01,
                         experiment="ddp-folder")
    single = train(config, progress=False)
    ddp = train_torchrun(config, 2, timeout=100)
    assert single.summary["steps"] == 6
    _compare(single, ddp, errors_atol=1.5 / 5)
    columns = ["eval_top1", "eval_top5"]  # the untrained network: identical weights, so identical counts
    assert single.metrics.iloc[0][columns].tolist() == ddp.metrics.iloc[0][columns].tolist()


def test_a_failing_torchrun_says_why(monkeypatch):
    # The launcher's error path, without starting torch: a command that fails as a rank would.
    import sys

    import delving.train as train_module

    fail = [sys.executable, "-c",
            "import sys; print('argument --batch-size: not a multiple', file=sys.stderr); sys.exit(1)"]
    monkeypatch.setattr(train_module, "torchrun_command", lambda *a, **k: fail)
    config = TrainConfig(**COMMON, dataset="synthetic", experiment="ddp-fail")
    with pytest.raises(RuntimeError, match=r"(?s)torchrun exited with 1.*--batch-size: not a multiple"):
        train_torchrun(config, 2, timeout=30)
