"""``tritonorm compare``: tiny end-to-end runs (table, JSON, CSV, PNG), the CIFAR-10 loader on
generated batches in the real pickle format, the summary statistics, and clear errors."""

import csv
import json
import pickle
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import tritonorm  # noqa: E402
from tritonorm._dispatch import resolve_backend  # noqa: E402
from tritonorm.cli import compare as compare_cli  # noqa: E402
from tritonorm.cli import main  # noqa: E402
from tritonorm.cli.compare import Run, summarize  # noqa: E402
from tritonorm.cli.data import CIFAR_TEST, CIFAR_TRAIN, load_cifar10  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PER_BATCH = 4


def write_batch(path, data, labels, protocol=2):
    """A CIFAR-10 batch file as the dataset ships it: a pickled dict with bytes keys."""
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"generated", b"data": data, b"labels": labels,
                     b"filenames": [b"x.png"] * len(labels)}, f, protocol=protocol)


@pytest.fixture
def cifar(tmp_path):
    """A CIFAR-10 directory of 6 batches of PER_BATCH random images; returns it and the raw arrays."""
    rng = np.random.default_rng(0)
    raw = {}
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, PER_BATCH).tolist()
        write_batch(tmp_path / name, data, labels)
        raw[name] = data, labels
    return tmp_path, raw


def compare(args, tmp_path, capsys):
    """Run ``tritonorm compare ARGS`` on DEVICE, out in tmp_path/out; returns the exit status, stdout, stderr."""
    status = main(["compare", *args, "--device", DEVICE, "--out", str(tmp_path / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("model, norms", [
    ([], ["bn", "l1", "enorm"]),
    (["--mlp", "2", "--width", "16"], ["equinorm", "bounded_wn", "enorm_bn"]),
], ids=["cnn", "mlp"])
def test_end_to_end_writes_table_json_csv_png(tmp_path, capsys, model, norms):
    epochs, seeds = 2, 2
    status, out, err = compare([*model, "--norms", ",".join(norms), "--epochs", str(epochs), "--seeds", str(seeds),
                                "--limit-batches", "3"], tmp_path, capsys)
    assert status == 0, err
    assert "test acc" in out and "IQR" in out
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert {"settings", "versions", "device", "backend", "dataset", "model", "rows"} <= doc.keys()
    assert doc["settings"]["epochs"] == epochs and doc["settings"]["norms"] == norms
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["backend"] == resolve_backend("auto", torch.zeros(1, device=DEVICE))
    assert [row["norm"] for row in doc["rows"]] == norms
    for row in doc["rows"]:
        assert row["label"] in out
        assert len(row["runs"]) == seeds and all(len(r["epoch_seconds"]) == epochs for r in row["runs"])
        assert len(row["curve"]["median"]) == epochs
        assert row["test_accuracy_q25"] <= row["test_accuracy_median"] <= row["test_accuracy_q75"]
        assert row["seconds_per_epoch"] > 0 and np.isfinite(row["train_loss"])
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["norm"] for r in rows] == norms
    assert float(rows[0]["test_accuracy_median"]) == pytest.approx(doc["rows"][0]["test_accuracy_median"])
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == PNG_SIGNATURE


def test_backend_reaches_the_layers_and_enorm(tmp_path, capsys, monkeypatch):
    trainers, init = [], compare_cli.Trainer.__init__

    def recording_init(self, *args):
        init(self, *args)
        trainers.append(self)

    monkeypatch.setattr(compare_cli.Trainer, "__init__", recording_init)
    status, out, err = compare(["--backend", "triton", "--norms", "topk,enorm", "--mlp", "1", "--width", "12",
                                "--batch-size", "16", "--epochs", "1", "--seeds", "1", "--limit-batches", "2"],
                               tmp_path, capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["backend"] == "triton"
    topk, enorm = trainers
    layers = [m for m in topk.net.modules() if isinstance(m, tritonorm.TopkBatchNorm1d)]
    assert len(layers) == 2 and all(m.backend == "triton" for m in layers)
    assert enorm.enorm.backend == "triton"


def test_batch_size_larger_than_the_data(tmp_path, capsys):
    status, _, err = compare(["--batch-size", "5000"], tmp_path, capsys)
    assert_clear_error(status, err, "--batch-size 5000", "1347 training images")


def test_diverged_run_is_counted_and_json_stays_strict(tmp_path, capsys):
    status, out, err = compare(["--norms", "none", "--lr", "1e9", "--epochs", "3", "--seeds", "1",
                                "--limit-batches", "3"], tmp_path, capsys)
    assert status == 0, err
    assert "1/1" in out
    text = (tmp_path / "out" / "compare.json").read_text()
    row = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))["rows"][0]
    assert row["diverged"] == 1 and row["train_loss"] is None
    assert len(row["curve"]["median"]) == 3 and len(row["runs"][0]["epoch_seconds"]) < 3


def test_cifar10_loader_reads_the_pickle_format(cifar):
    root, raw = cifar
    data = load_cifar10(root)
    assert data.x_train.shape == (5 * PER_BATCH, 3, 32, 32) and data.x_test.shape == (PER_BATCH, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    first, labels = raw[CIFAR_TRAIN[0]]
    # row layout: 1024 red, then green, then blue values, each plane row-major
    assert data.x_train[1, 2, 3, 4] == pytest.approx(first[1, 2 * 1024 + 3 * 32 + 4] / 255)
    torch.testing.assert_close(data.x_train[:PER_BATCH].flatten(1), torch.from_numpy(first / 255).float())
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    assert data.y_train[:PER_BATCH].tolist() == labels
    assert data.y_test.tolist() == raw[CIFAR_TEST][1]


def test_cifar10_loader_finds_the_subdirectory_and_protocol_5(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        write_batch(sub / name, np.full((2, 3072), 255, np.uint8), np.array([9, 0]), protocol=5)
    data = load_cifar10(tmp_path)
    assert data.x_test.shape == (2, 3, 32, 32) and bool((data.x_test == 1).all())
    assert data.y_train.tolist() == [9, 0] * 5


def test_cli_trains_on_cifar10(cifar, tmp_path, capsys):
    root, _ = cifar
    status, out, err = compare(["--cifar10", str(root), "--norms", "none", "--epochs", "1", "--seeds", "1",
                                "--batch-size", "4", "--limit-batches", "2"], tmp_path, capsys)
    assert status == 0, err
    assert "cifar10: 20 train / 4 test images of 3 x 32 x 32" in out


def assert_clear_error(status, err, *words):
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_missing_directory(tmp_path, capsys):
    status, _, err = compare(["--cifar10", str(tmp_path / "nowhere")], tmp_path, capsys)
    assert_clear_error(status, err, str(tmp_path / "nowhere"), "no such directory")


def test_missing_batch_file(cifar, tmp_path, capsys):
    root, _ = cifar
    (root / "data_batch_3").unlink()
    (root / CIFAR_TEST).unlink()
    status, _, err = compare(["--cifar10", str(root)], tmp_path, capsys)
    assert_clear_error(status, err, str(root), "missing data_batch_3, test_batch")


class Evil:
    def __reduce__(self):
        return (print, ("pickle ran code",))


@pytest.mark.parametrize("content, words", [
    (b"not a pickle", ["cannot unpickle"]),
    (pickle.dumps({b"data": Evil(), b"labels": [0]}), ["refused global builtins.print"]),
    (pickle.dumps([1, 2]), ["expected a dict"]),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), ["uint8", "float32"]),
    (pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}), ["(2, 1024)"]),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), ["labels", "0..9"]),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), ["labels", "2 integers"]),
], ids=["garbage", "code", "list", "dtype", "shape", "label-range", "label-count"])
def test_malformed_batch(cifar, tmp_path, capsys, content, words):
    root, _ = cifar
    (root / "data_batch_2").write_bytes(content)
    status, out, err = compare(["--cifar10", str(root)], tmp_path, capsys)
    assert_clear_error(status, err, str(root / "data_batch_2"), "not a CIFAR-10 batch", *words)
    assert "pickle ran code" not in out + err


@pytest.mark.parametrize("out", ["file.txt", "file.txt/out"], ids=["is-a-file", "under-a-file"])
def test_unusable_out_fails_before_loading_data(tmp_path, capsys, monkeypatch, out):
    (tmp_path / "file.txt").write_text("keep")
    monkeypatch.setattr(compare_cli, "load", lambda args: pytest.fail("loaded the data"))
    status = main(["compare", "--device", DEVICE, "--out", str(tmp_path / out), "--no-progress"])
    assert_clear_error(status, capsys.readouterr().err,
                       f"--out {tmp_path / out}: {tmp_path / 'file.txt'} is not a directory")
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_unknown_norm(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--norms", "bn,batchnorm", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown norm 'batchnorm'" in err and "enorm_bn" in err
    assert not (tmp_path / "compare.json").exists()


def test_missing_scikit_learn_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    status, _, err = compare([], tmp_path, capsys)
    assert_clear_error(status, err, "scikit-learn", "tritonorm[compare]")


def test_summary_median_quartiles_and_divergence():
    runs = [Run(seed, train_loss=[1.0, loss], test_accuracy=[0.5, acc], epoch_seconds=[t, t])
            for seed, (loss, acc, t) in enumerate([(0.1, 0.9, 1.0), (0.3, 0.7, 2.0), (0.2, 0.8, 3.0), (0.4, 0.6, 4.0)])]
    runs.append(Run(4, train_loss=[float("nan")], test_accuracy=[0.1, 0.1], epoch_seconds=[5.0], diverged=True))
    row = summarize("none", False, runs)
    assert row["train_loss"] == pytest.approx(0.3)  # the diverged run counts as the worst loss
    assert row["test_accuracy_median"] == pytest.approx(0.7)
    assert (row["test_accuracy_q25"], row["test_accuracy_q75"]) == pytest.approx((0.6, 0.8))
    assert row["seconds_per_epoch"] == pytest.approx(3.0) and row["diverged"] == 1
    assert row["curve"]["median"] == pytest.approx([0.5, 0.7])


def test_resnet_trains_with_enorm(tmp_path, capsys):
    """``--resnet``: the residual CNN, with ENorm balancing the pairs inside its blocks."""
    status, out, err = compare(["--resnet", "--norms", "enorm,enorm_bn", "--epochs", "1", "--seeds", "1",
                                "--limit-batches", "2", "--backend", "torch"], tmp_path, capsys)
    assert status == 0, err
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert doc["model"].startswith("residual CNN") and [r["norm"] for r in doc["rows"]] == ["enorm", "enorm_bn"]
    assert all(np.isfinite(r["train_loss"]) for r in doc["rows"])


def test_resnet_enorm_finds_every_block():
    net = compare_cli.resnet("enorm", 1, "torch")
    enorm = tritonorm.ENorm.from_model(net, residual=True)
    assert len(enorm.branches) == 3 and enorm.pairs == 3 and enorm.layers == []


@pytest.fixture
def trainers(monkeypatch):
    """The Trainers the runs build, in order, each with the output of its model's last forward."""
    built, init = [], compare_cli.Trainer.__init__

    def recording_init(self, *args):
        init(self, *args)
        self.seen = {}

        def hook(module, inputs, output):
            self.seen.update(output_dtype=output.dtype, autocast=torch.is_autocast_enabled(DEVICE),
                             autocast_dtype=torch.get_autocast_dtype(DEVICE))

        self.net.register_forward_hook(hook)
        built.append(self)

    monkeypatch.setattr(compare_cli.Trainer, "__init__", recording_init)
    return built


TINY = ["--mlp", "1", "--width", "8", "--batch-size", "16", "--epochs", "1", "--seeds", "1", "--limit-batches", "2"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_puts_the_model_and_activations_in_it(tmp_path, capsys, trainers, dtype):
    status, out, err = compare([*TINY, "--norms", "l1,equinorm", "--dtype", dtype], tmp_path, capsys)
    assert status == 0, err
    assert f"; {dtype}, inputs in [0, 1];" in out
    for trainer in trainers:
        assert {p.dtype for p in trainer.net.parameters()} == {getattr(torch, dtype)}
        assert trainer.seen["output_dtype"] == getattr(torch, dtype) and not trainer.seen["autocast"]
        assert trainer.scaler is None
    l1 = [m for m in trainers[0].net.modules() if isinstance(m, tritonorm.L1BatchNorm1d)]
    assert l1 and all(m.running_mean.dtype == getattr(torch, dtype) for m in l1)
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert doc["settings"]["dtype"] == dtype
    assert doc["precision"] == {"dtype": dtype, "amp": None, "grad_scaler": False, "compile": False,
                                "inputs": "[0, 1]"}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_autocasts_and_scales_fp16(tmp_path, capsys, trainers, monkeypatch, amp):
    steps, scaler_step = [], torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step",
                        lambda self, *a, **k: steps.append(1) or scaler_step(self, *a, **k))
    status, out, err = compare([*TINY, "--norms", "topk", "--amp", amp], tmp_path, capsys)
    assert status == 0, err
    (trainer,) = trainers
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert {p.dtype for p in trainer.net.parameters()} == {torch.float32}
    assert trainer.seen["autocast"] and trainer.seen["autocast_dtype"] == low
    assert trainer.seen["output_dtype"] == low  # the output layer is a Linear: autocast runs it in low precision
    assert (trainer.scaler is not None) == (amp == "fp16") and len(steps) == (2 if amp == "fp16" else 0)
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert doc["precision"]["amp"] == amp and doc["precision"]["grad_scaler"] == (amp == "fp16")
    assert f"; float32, autocast {amp}" in out and ("with a gradient scaler" in out) == (amp == "fp16")


def test_compile_trains_and_evaluates_through_torch_compile(tmp_path, capsys, trainers, monkeypatch):
    calls = []

    def fake_compile(model, **options):
        def compiled(x):
            calls.append(model.training)
            return model(x)
        return compiled

    resets = []
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(calls)))
    status, out, err = compare([*TINY, "--norms", "enorm,none", "--seeds", "2", "--compile"], tmp_path, capsys)
    assert status == 0, err
    assert calls == [True, True, False] * 4  # per run: two training batches, one evaluation chunk
    assert resets == [0, 3, 6, 9]  # Dynamo starts afresh for each model (else its recompile limit is hit)
    assert trainers[0].enorm is not None and ", compiled," in out
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["precision"]["compile"] is True


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_with_a_low_precision_dtype_is_refused(tmp_path, capsys, monkeypatch, dtype):
    monkeypatch.setattr(compare_cli, "load", lambda args: pytest.fail("loaded the data"))
    status, _, err = compare(["--amp", "fp16", "--dtype", dtype], tmp_path, capsys)
    assert_clear_error(status, err, "--amp fp16 needs --dtype float32", f"got --dtype {dtype}")


def test_unknown_dtype_and_amp(tmp_path, capsys):
    for flag, value in (("--dtype", "float64"), ("--amp", "fp8")):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", flag, value, "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_standardize_uses_the_training_set_per_channel(cifar):
    root, _ = cifar
    data = compare_cli.standardize(load_cifar10(root))
    x = data.x_train.transpose(0, 1).flatten(1)
    torch.testing.assert_close(x.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(1), torch.ones(3), atol=1e-5, rtol=0)
    raw = load_cifar10(root)
    mean, std = raw.x_train.mean((0, 2, 3), keepdim=True), raw.x_train.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.x_test, (raw.x_test - mean) / std)  # the test split with the training statistics


@pytest.mark.parametrize("norms, warned", [("none,equinorm", True), ("none", False)])
def test_standardize_runs_and_warns_for_equinorm(tmp_path, capsys, trainers, monkeypatch, norms, warned):
    seen = []
    monkeypatch.setattr(compare_cli, "standardize", lambda data: seen.append(data) or data._replace(
        x_train=data.x_train - 0.5, x_test=data.x_test - 0.5))
    status, out, err = compare([*TINY, "--norms", norms, "--standardize"], tmp_path, capsys)
    assert status == 0, err
    assert len(seen) == 1 and "inputs standardized" in out
    assert ("EquiNorm assumes positive inputs" in err) == warned
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["precision"]["inputs"] == \
        "standardized per channel"


def test_mlp_and_resnet_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--mlp", "2", "--resnet", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
