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
import delving.train as train_module
from delving.data import InMemoryBatches
from delving.train import (ConfigError, EpochSampler, RankShard, TrainConfig, _plateau_step, build_parser,
                           config_argv, evaluate, load_checkpoint, main, make_model, param_groups, topk_errors,
                           torchrun_command, train)
from test_imagefolder import make_folder

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


@pytest.mark.parametrize("activation", ["prelu-shared", "prelu-channel-wise"])
def test_param_groups_keep_decay_off_biases_and_prelu(activation):
    # The model train() builds (make_model: built and initialised), for both kinds of PReLU.
    model = make_model(TrainConfig(**{**TINY, "activation": activation}), in_channels=1, input_size=28, num_classes=10)
    groups = param_groups(model, 5e-4)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in model.parameters())  # every parameter, once
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 13 and all(decay[id(m.weight)] == 0.0 for m in prelus)  # after 11 convs, fc1, fc2
    assert all(m.weight.numel() == 1 for m in prelus) == (activation == "prelu-shared")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert decay[id(module.weight)] == 5e-4
            assert decay[id(module.bias)] == 0.0


@pytest.mark.parametrize("activation", ["prelu-shared", "prelu-channel-wise"])
def test_prelu_steps_are_momentum_sgd_without_decay_or_clipping(activation, monkeypatch):
    """Inside a real training run with weight decay on, each update of a is exactly Eq. 4 (momentum
    on the gradient alone); a conv weight's update does include the decay; nothing changes a between
    updates (no clipping or projection)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    built = []
    monkeypatch.setattr(train_module, "make_model", lambda *a, **k: built.append(make_model(*a, **k)) or built[-1])
    lr, mu, wd = 0.01, 0.9, 0.05  # a decay this large would move a by 1.25e-4 a step: far above rounding
    seen = {"a": [], "w": []}

    def pre(optimizer, args, kwargs):
        model = built[-1]
        a = [m.weight for m in model.modules() if isinstance(m, nn.PReLU)]
        w = model.features.conv21.weight
        seen["a"].append([(p.detach().clone(), p.grad.clone()) for p in a])
        seen["w"].append((w.detach().clone(), w.grad.clone()))

    def post(optimizer, args, kwargs):
        model = built[-1]
        seen["a"][-1] = [(before, grad, p.detach().clone()) for (before, grad), p
                         in zip(seen["a"][-1], [m.weight for m in model.modules() if isinstance(m, nn.PReLU)])]
        seen["w"][-1] = (*seen["w"][-1], model.features.conv21.weight.detach().clone())

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        config = TrainConfig(**{**TINY, "activation": activation, "train_subset": 256, "epochs": 1, "lr": lr,
                                "momentum": mu, "weight_decay": wd, "dropout": 0.0, "experiment": "eq4"})
        record = train(config, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert record.status == "completed" and len(seen["a"]) == 4
    buffers, wbuf = None, None
    for k, (layers, (w0, wg, w1)) in enumerate(zip(seen["a"], seen["w"])):
        grads = [g for _, g, _ in layers]
        buffers = grads if buffers is None else [mu * b + g for b, g in zip(buffers, grads)]
        for (a0, g, a1), b in zip(layers, buffers):
            torch.testing.assert_close(a1, a0 - lr * b, rtol=0, atol=1e-7)  # Eq. 4, no decay term
            assert not torch.allclose(a1, a0 - lr * (b + wd * a0), rtol=0, atol=1e-6)
        wg = wg + wd * w0  # conv weights are decayed
        wbuf = wg if wbuf is None else mu * wbuf + wg
        torch.testing.assert_close(w1, w0 - lr * wbuf, rtol=0, atol=1e-7)
        if k + 1 < len(seen["a"]):  # nothing touches a between two updates
            assert all(torch.equal(a1, nxt[0]) for (_, _, a1), nxt in zip(layers, seen["a"][k + 1]))
    assert any((a1 != a0).any() for a0, _, a1 in seen["a"][-1])  # a did move


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


# --- the image-folder and synthetic data sets, the distributed pieces -----------------------------

def _folder_config(folder, **kw):
    return TrainConfig(**{**TINY, "dataset": "imagefolder", "data_dir": str(folder), "input_size": 32,
                          "scale_range": [36, 40], "eval_resize": 36, "eval_views": "ten", "num_workers": 0,
                          "train_subset": None, "eval_subset": 4, "test_subset": None, "batch_size": 8,
                          "activation": "prelu-channel-wise", "augment": True, "experiment": "folder", **kw})


def test_an_image_folder_run_trains_and_tests_by_ten_views(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=8)  # 3 classes: 24 training, 6 val images
    record = train(_folder_config(folder), progress=False)
    assert record.status == "completed" and record.summary["steps"] == 6  # 24 // 8 a epoch, 2 epochs
    m = record.metrics
    assert list(m["step"]) == [0, 2, 3, 5, 6]  # evals_per_epoch 2 of 3 steps: after 2 and 3
    tested = m.dropna(subset=["test_top1"])
    assert list(tested["step"]) == [3, 6]
    assert all(abs(v * 6 - round(v * 6)) < 1e-9 for v in tested["test_top1"])  # errors over the 6 val images
    assert all(abs(v * 4 - round(v * 4)) < 1e-9 for v in m["eval_top1"])  # the 4-image centre-crop subset
    ckpt = torch.load(record.dir / "checkpoint.pt", weights_only=True)["model"]
    assert ckpt["classifier.fc3.weight"].shape[0] == 3 and ckpt["features.conv1.weight"].shape[1] == 3
    assert set(record.table("prelu")["step"]) == {0, 2, 3, 5, 6}


@pytest.mark.parametrize("data_dir", ["missing", "empty", "no-val"])
def test_a_missing_or_empty_data_folder_is_refused_before_any_record(tmp_path, results_dir, data_dir, capsys):
    folder = tmp_path / data_dir
    if data_dir != "missing":
        folder.mkdir()
    if data_dir == "no-val":
        make_folder(folder, splits=("train",))
    with pytest.raises(ConfigError, match=r"TrainConfig\.data_dir: got .*" + data_dir) as e:
        train(_folder_config(folder), progress=False)
    assert e.value.field == "data_dir" and ("val" in str(e.value) or data_dir != "no-val")
    with pytest.raises(ConfigError, match=r"TrainConfig\.data_dir: got None"):
        TrainConfig(dataset="imagefolder")
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset", "imagefolder", "--data-dir", str(folder), "--device", "cpu", "--no-progress"])
    assert exit_.value.code == 2 and "argument --data-dir" in capsys.readouterr().err
    assert not results_dir.exists()


def test_synthetic_data_is_random_images_of_the_given_size():
    config = TrainConfig(**{**TINY, "dataset": "synthetic", "input_size": 16, "train_subset": 64, "eval_subset": 32,
                            "test_subset": 32, "batch_size": 32, "epochs": 1, "experiment": "synthetic"})
    record = train(config, progress=False)
    assert record.status == "completed" and record.summary["steps"] == 2
    ckpt = torch.load(record.dir / "checkpoint.pt", weights_only=True)["model"]
    assert ckpt["classifier.fc3.weight"].shape[0] == 1000 and ckpt["features.conv1.weight"].shape[1] == 3


def test_ten_view_scores_average_the_softmax_over_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x, y = torch.randn(6, 10, 3, 4, 4), torch.randint(0, 5, (6,))
    probs = model(x.flatten(0, 1)).softmax(1).view(6, 10, 5).mean(1)
    assert evaluate(model, [(x, y)]) == topk_errors(probs, y, (1, 5))
    assert evaluate(model, [(x[:, 0], y)]) == topk_errors(model(x[:, 0]), y, (1, 5))


def test_each_rank_gets_its_part_of_every_global_batch():
    # Image folders: EpochSampler; in-memory sets: RankShard. The parts of the ranks, in order,
    # are the single-process batch, for every epoch and from any start batch.
    batch = lambda s: [list(s)[i:i + 8] for i in range(0, len(s), 8)]
    for epoch, start in ((0, 0), (3, 2)):
        single = EpochSampler(50, 8, seed=5)
        parts = [EpochSampler(50, 8, seed=5, rank=r, world=2) for r in range(2)]
        for s in (single, *parts):
            s.set_epoch(epoch, start)
        whole = batch(single)
        assert len(whole) == 6 - start and len(single) == 8 * (6 - start)  # 50 // 8 = 6 batches, partial dropped
        halves = [[list(p)[i:i + 4] for i in range(0, len(p), 4)] for p in parts]
        assert [h0 + h1 for h0, h1 in zip(*halves)] == whole
    images, labels = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8), torch.arange(40)
    batches = InMemoryBatches(images, labels, batch_size=16, shuffle=True, augment=True, drop_last=True, seed=1,
                              mean=torch.zeros(1), std=torch.ones(1))
    shards = [RankShard(batches, r, 2) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(batches.epoch(1, start=1), shards[0].epoch(1, start=1),
                                          shards[1].epoch(1, start=1)):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert len(shards[0]) == 2 and shards[1].images is batches.images


def test_config_argv_gives_the_config_back_and_builds_the_torchrun_command(tmp_path):
    config = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), scale_range=[256, 256], lr_steps=[30, 60],
                         train_subset=None, test_subset=500, width=1 / 3, bf16=True, channels_last=False,
                         eval_views="center", num_workers=0, experiment="argv")
    args = build_parser().parse_args(config_argv(config))
    assert TrainConfig.from_dict({k: getattr(args, k) for k in config.to_dict()}) == config
    assert TrainConfig.from_dict({k: getattr(build_parser().parse_args(config_argv(TrainConfig())), k)
                                  for k in config.to_dict()}) == TrainConfig()
    cmd = torchrun_command(config, 4)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[cmd.index("-m") + 1] == "delving.train"
    assert "--no-progress" in cmd and "--standalone" in cmd


def test_batch_size_must_split_evenly_over_the_processes(monkeypatch):
    # train() reads torchrun's environment; a group that exists already is used as it is.
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"TrainConfig\.batch_size: got 33.*multiple of the 2 processes"):
        train(TrainConfig(**{**TINY, "batch_size": 33}), progress=False)
