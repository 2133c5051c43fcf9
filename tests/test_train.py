"""delving.train: one run end to end, weight-decay groups, exact resume, divergence, config checks.

Tiny settings throughout (widths 1/16-1/8, a few hundred Fashion-MNIST images, small held-out
subsets) so the whole file runs in well under a minute on two cores."""

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from delving import results
from delving.models import build_model
from delving.train import (ConfigError, TrainConfig, _plateau_step, load_checkpoint, main, make_model,
                           param_groups, topk_errors, train)

# threads=1: these models are too small to gain from a second thread, and on a busy two-core
# machine two threads wait on each other (several times slower).
TINY = dict(model="small14", width=1 / 16, train_subset=512, eval_subset=256, test_subset=256,
            batch_size=64, evals_per_epoch=2, epochs=2, device="cpu", threads=1)


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path / "results"))
    threads = torch.get_num_threads()
    yield tmp_path / "results"
    torch.set_num_threads(threads)  # train(threads=1) sets it for the process


def test_a_run_records_metrics_and_gradient_norms_and_learns():
    # Overfit 256 images: no dropout, He init; the training loss has to drop clearly.
    config = TrainConfig(**{**TINY, "width": 1 / 8, "train_subset": 256, "batch_size": 32, "epochs": 6,
                            "evals_per_epoch": 1, "dropout": 0.0, "init": "he-fan-in",
                            "grad_norm_every": 5, "grad_norm_first": 3, "experiment": "smoke"})
    record = train(config, progress=False)

    assert record.finished and record.status == "completed"
    assert record.params == config.to_dict()
    m = record.metrics
    assert list(m["epoch"]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # epoch 0 = the untrained network
    assert list(m["step"]) == [0, 8, 16, 24, 32, 40, 48]
    for column in ("eval_top1", "eval_top5", "test_top1", "test_top5"):
        values = m[column].dropna()
        assert len(values) and values.between(0, 1).all(), column
    assert (m["eval_top5"] <= m["eval_top1"]).all()
    assert m["test_top1"].iloc[1:].notna().all()  # every epoch end has the held-out numbers
    loss = m["train_loss"].dropna().to_numpy()
    assert loss[-1] < 0.8 * loss[0], f"training loss did not drop: {loss}"
    assert m["eval_top1"].iloc[-1] < 0.85  # better than chance (0.9)

    g = record.table("grad_norms")
    layers = [name for name, _ in make_model(config, in_channels=1, input_size=28, num_classes=10).weight_layers()]
    assert sorted(set(g["step"])) == [1, 2, 3, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert list(g[g["step"] == 1]["layer"]) == layers and layers[0] == "conv1" and layers[-1] == "fc3"
    assert (g["grad_norm"] > 0).all() and (g["weight_norm"] > 0).all()

    s = record.summary
    assert s["steps"] == 48 and s["final_test_top1"] == m["test_top1"].iloc[-1]
    assert s["best_test_top1"] == m["test_top1"].min() and s["images_per_s"] > 0
    assert results.find_runs("smoke")[0].dir == record.dir


def test_param_groups_keep_decay_off_biases_and_prelu():
    model = build_model("small14", activation="prelu-channel-wise", num_classes=10, in_channels=1,
                        input_size=28, width=1 / 16)
    groups = param_groups(model, 5e-4)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in model.parameters())  # every parameter, once
    for module in model.modules():
        if isinstance(module, nn.PReLU):
            assert decay[id(module.weight)] == 0.0
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert decay[id(module.weight)] == 5e-4
            assert decay[id(module.bias)] == 0.0


def test_topk_errors():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    assert topk_errors(logits, torch.tensor([5, 5])) == [0.5, 0.5]  # 2nd: label 5 ranks last
    assert topk_errors(logits, torch.tensor([5, 1])) == [0.5, 0.0]


def _kill_at_step(n):
    """An optimizer pre-hook that interrupts training at the n-th update, as a kill would."""
    calls = {"n": 0}

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt(f"killed at step {n}")

    return register_optimizer_step_pre_hook(hook)


def _comparable(record):
    return record.metrics.drop(columns=["images_per_s"]), record.table("grad_norms")


@pytest.mark.parametrize("checkpoint_every", [None, 0])
def test_a_killed_run_resumes_to_identical_numbers_and_weights(checkpoint_every):
    # Dropout and augmentation on, so the RNG state and the data stream have to be restored too.
    base = dict(TINY, augment=True, grad_norm_every=3, grad_norm_first=2, lr_steps=[1], experiment="resume")
    a = train(TrainConfig(**base), progress=False)
    assert list(a.metrics["lr"]) == pytest.approx([0.01] * 3 + [0.001] * 2)  # divided by 10 at epoch 1

    # checkpoint_every None: checkpoints at steps 4, 8, 12 (the evaluations), the kill at 14 resumes
    # from step 12, mid-epoch. checkpoint_every 0: epoch ends only, so the row logged at step 12
    # is on disk but the checkpoint is from step 8: resume truncates it and does it again.
    config = TrainConfig(**base, checkpoint_every=checkpoint_every)
    handle = _kill_at_step(14)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, progress=False)
    finally:
        handle.remove()
    killed = [r for r in results.find_runs("resume", finished=False) if not r.finished]
    assert len(killed) == 1 and list(killed[0].metrics["step"]) == [0, 4, 8, 12]
    b = train(config, resume="auto", progress=False)

    assert b.dir == killed[0].dir and b.status == "completed"
    (ma, ga), (mb, gb) = _comparable(a), _comparable(b)
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(ga, gb)
    wa = torch.load(a.dir / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b.dir / "checkpoint.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b.summary["steps"] == a.summary["steps"] == 16

    # A checkpoint of another configuration is refused, naming the file.
    other = TrainConfig(**{**base, "model": "deep30"})
    model = make_model(other, in_channels=1, input_size=28, num_classes=10)
    with pytest.raises(ValueError, match="checkpoint.pt.*model='small14' there, 'deep30' here"):
        load_checkpoint(b.dir / "checkpoint.pt", other, model)


def test_divergence_ends_the_run_without_an_exception():
    config = TrainConfig(**{**TINY, "model": "deep30", "train_subset": 256, "batch_size": 32,
                            "init": "fixed", "init_std": 1.0, "experiment": "diverge"})
    record = train(config, progress=False)
    assert record.status == "diverged"
    n = record.summary["diverged_at_step"]
    assert n >= 1 and f"diverged at step {n}" in record.summary["message"]
    assert record.summary["steps"] == n - 1


def test_plateau_divides_lr_by_10_after_patience_epochs_without_improvement():
    config = TrainConfig(lr_schedule="plateau", patience=2)
    state = {"lr": 0.01, "best_test_top1": math.inf, "bad_epochs": 0, "lr_drops": 0}
    lrs = []
    for error in [0.5, 0.4, 0.45, 0.4, 0.39, 0.39, 0.39, 0.39, 0.39, 0.39, 0.39]:
        _plateau_step(config, state, error)
        lrs.append(state["lr"])
    # 0.4 is not beaten twice: drop; 0.39 is a new best, then not beaten twice: drop; then no more (two at most)
    assert lrs == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001] * 5)


@pytest.mark.parametrize("field, value", [("model", "resnet"), ("lr", -1.0), ("epochs", 0),
                                          ("lr_steps", [3, 2]), ("bf16", "yes"), ("train_subset", 0)])
def test_config_errors_name_the_field(field, value, results_dir):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}: got {value!r}".replace("[", r"\[")) as e:
        TrainConfig(**{field: value})
    assert e.value.field == field
    assert not results_dir.exists()  # refused before any run record


def test_cli_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--lr-steps" in capsys.readouterr().out
    for argv, option in ([["--model", "resnet"], "--model"], [["--epochs", "0"], "--epochs"],
                         [["--lr", "fast"], "--lr"], [["--resume", "/nonexistent"], "--resume"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert f"argument {option}" in capsys.readouterr().err


def test_cli_runs_and_prints_the_run_directory(capsys):
    main(["--model", "small14", "--width", "0.0625", "--train-subset", "64", "--eval-subset", "64",
          "--test-subset", "64", "--batch-size", "32", "--epochs", "1", "--evals-per-epoch", "1",
          "--device", "cpu", "--threads", "1", "--no-progress", "--experiment", "cli"])
    out = capsys.readouterr().out.strip().splitlines()
    record = results.load_run(out[-1])
    assert record.status == "completed" and record.params["train_subset"] == 64
    assert not math.isnan(record.summary["final_test_top1"])
