"""``tritonorm compare``: train one model with each normalization on real data and compare.

The model is a small CNN (three 3x3 convolutions of 16, 32 and 64 channels, strides 1, 2, 2,
each followed by the normalization and a ReLU, then global average pooling and a linear
layer) or, with ``--mlp DEPTH``, the deep MLP of the ENorm reproducibility study
("Reproducibility of Equi-normalization of neural networks"): a flatten, a linear layer to
WIDTH units, DEPTH intermediate WIDTH x WIDTH layers and a linear output layer, ReLU after
each hidden layer, no biases, He initialisation.  ``--resnet`` trains a small residual CNN
instead (``resnet``: a basic block per width, ENorm balancing the pairs inside each branch).

Each normalization changes only the hidden layers (the output layer stays plain): ``bn``
nn.BatchNorm2d (1d for the MLP) after each hidden weight layer; ``l1``, ``linf``, ``topk``
(k = 10) tritonorm's batch norms there; ``equinorm`` each weight layer and its norm replaced
by an EquiNorm layer; ``bounded_wn`` no norm layer, each hidden weight parametrized with
bounded weight norm (rho: its initial mean channel norm); ``none`` no normalization;
``enorm`` no norm layer and an ENorm cycle (c = 1.2) after every optimizer step;
``enorm_bn`` BatchNorm and ENorm.  A CNN convolution has a bias exactly when no norm layer
follows it.

Training: SGD with the learning rate decayed linearly to 0 over the run (as in the study);
the CNN with momentum 0.9 and weight decay 5e-4, the MLP without momentum and with weight
decay 1e-3 (the study's).  The last incomplete batch of each epoch is dropped.  Inputs are
images in [0, 1] (EquiNorm assumes positive inputs); ``--standardize`` subtracts the training
set's per-channel mean and divides by its per-channel std instead, as the ENorm study does
(with a warning when EquiNorm is among the norms: its first layer then sees inputs of both
signs).  A run whose training loss stops being finite is stopped and counted as diverged; its
later epochs keep its last test accuracy.

Precision: ``--dtype float16|bfloat16`` puts the whole model (parameters, activations,
gradients, optimizer state) and the inputs in that dtype (tritonorm's layers still accumulate
their statistics in fp32; the cross-entropy is taken on the logits cast to fp32);
``--amp bf16|fp16`` keeps float32 parameters and runs the forward under ``torch.autocast``,
with a ``torch.amp.GradScaler`` for fp16 (a step whose gradients overflow is skipped, as the
scaler does; only a non-finite training loss counts as divergence); ``--compile`` trains and
evaluates through ``torch.compile`` of the model (ENorm and bounded weight norm still act on
the model's own parameters).

Reports, per normalization, over the seeds: the final training loss (median; a diverged run
counts as +inf), the final test accuracy (median and interquartile range, as the EquiNorm
paper, "Controlling covariate shift using equilibrium normalization of weights", reports),
and the time per training epoch (median over epochs and seeds); writes them to compare.json
(with the settings, versions, device and every run's curves), compare.csv and compare.png
(test accuracy per epoch, median line with an interquartile band).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import tritonorm
from tritonorm._dispatch import BACKENDS, resolve_backend

from .data import DataError, Dataset, load_cifar10, load_digits

NORMS = ("bn", "l1", "linf", "topk", "equinorm", "bounded_wn", "none", "enorm", "enorm_bn")
NORM_LAYERS = ("bn", "l1", "linf", "topk", "enorm_bn")  # the norms that put a layer after each weight
ENORM_C = 1.2
TOPK = 10
CNN_CHANNELS = (16, 32, 64)
CNN_STRIDES = (1, 2, 2)
CLASSES = 10
EVAL_CHUNK = 1000
EXTRA_HINT = "pip install 'tritonorm[compare]'"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Recipe:
    """The optimizer settings of one architecture."""

    momentum: float
    weight_decay: float


RECIPES = {"cnn": Recipe(momentum=0.9, weight_decay=5e-4), "mlp": Recipe(momentum=0.0, weight_decay=1e-3)}


def label(norm: str, mlp: bool) -> str:
    """The display name of ``norm``: the layer class where there is one."""
    d = "1d" if mlp else "2d"
    names = {"bn": f"BatchNorm{d}", "l1": f"L1BatchNorm{d}", "linf": f"LinfBatchNorm{d}", "topk": f"TopkBatchNorm{d}",
             "equinorm": "EquiNormLinear" if mlp else "EquiNormConv2d", "bounded_wn": "bounded weight norm",
             "none": "none", "enorm": "ENorm", "enorm_bn": f"ENorm + BatchNorm{d}"}
    return names[norm]


def norm_layer(norm: str, channels: int, mlp: bool, backend: str) -> nn.Module:
    """The norm layer that ``norm`` puts after a hidden weight layer."""
    d = "1d" if mlp else "2d"
    if norm in ("bn", "enorm_bn"):
        return getattr(nn, f"BatchNorm{d}")(channels)
    kind = {"l1": "L1", "linf": "Linf", "topk": "Topk"}[norm]
    options = {"k": TOPK} if norm == "topk" else {}
    return getattr(tritonorm, f"{kind}BatchNorm{d}")(channels, backend=backend, **options)


def he_linear(n_in: int, n_out: int) -> nn.Linear:
    """A bias-free linear layer with He initialisation (the study's MLP layers)."""
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return layer


def hidden(norm: str, n_in: int, n_out: int, mlp: bool, backend: str, stride: int = 1) -> list[nn.Module]:
    """One hidden layer: the weight layer (bounded for ``bounded_wn``), its norm layer if
    ``norm`` has one, a ReLU."""
    if norm == "equinorm":
        layer: nn.Module = (tritonorm.EquiNormLinear(n_in, n_out, backend=backend) if mlp else
                            tritonorm.EquiNormConv2d(n_in, n_out, 3, stride=stride, padding=1, backend=backend))
        return [layer, nn.ReLU()]
    has_norm = norm in NORM_LAYERS
    layer = he_linear(n_in, n_out) if mlp else nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=not has_norm)
    if norm == "bounded_wn":
        tritonorm.bounded_weight_norm(layer, backend=backend)
    return [layer, *([norm_layer(norm, n_out, mlp, backend)] if has_norm else []), nn.ReLU()]


def cnn(norm: str, in_channels: int, backend: str) -> nn.Sequential:
    """The small CNN with ``norm``."""
    layers, c_in = [], in_channels
    for c_out, stride in zip(CNN_CHANNELS, CNN_STRIDES, strict=True):
        layers += hidden(norm, c_in, c_out, False, backend, stride)
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, CLASSES))


def mlp(norm: str, in_features: int, depth: int, width: int, backend: str) -> nn.Sequential:
    """The study's MLP with ``depth`` intermediate layers of ``width`` units and ``norm``."""
    layers = [nn.Flatten(), *hidden(norm, in_features, width, True, backend)]
    for _ in range(depth):
        layers += hidden(norm, width, width, True, backend)
    return nn.Sequential(*layers, he_linear(width, CLASSES))


class ResidualBlock(nn.Module):
    """A basic block with ``norm``: two 3x3 hidden layers (the second without its ReLU)
    added to the input, or to a 3x3 downsample layer's output where the shape changes,
    then a ReLU."""

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int, backend: str):
        super().__init__()
        self.branch = nn.Sequential(*hidden(norm, c_in, c_out, False, backend, stride),
                                    *hidden(norm, c_out, c_out, False, backend)[:-1])
        self.downsample = (nn.Sequential(*hidden(norm, c_in, c_out, False, backend, stride)[:-1])
                           if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.branch(x) + self.downsample(x))


def resnet(norm: str, in_channels: int, backend: str) -> nn.Sequential:
    """The small residual CNN (``--resnet``) with ``norm``: a 3x3 hidden layer of 16
    channels, one residual block per width of the CNN (strides 1, 2, 2), global average
    pooling and a linear layer.  ENorm balances the pairs inside each block's branch."""
    layers: list[nn.Module] = hidden(norm, in_channels, CNN_CHANNELS[0], False, backend)
    c_in = CNN_CHANNELS[0]
    for c_out, stride in zip(CNN_CHANNELS, CNN_STRIDES, strict=True):
        layers.append(ResidualBlock(norm, c_in, c_out, stride, backend))
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, CLASSES))


def build(norm: str, args: argparse.Namespace, sample: Tensor) -> nn.Sequential:
    """The model of ``args`` (CNN, residual CNN or MLP) with ``norm``, for inputs shaped like ``sample``."""
    if args.mlp:
        return mlp(norm, sample[0].numel(), args.mlp, args.width, args.backend)
    if args.resnet:
        return resnet(norm, sample.shape[1], args.backend)
    return cnn(norm, sample.shape[1], args.backend)


@dataclass
class Run:
    """One seed's training: per epoch, the mean training loss, test accuracy, seconds."""

    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    diverged: bool = False


def evaluate(net: nn.Module, x: Tensor, y: Tensor, forward: Callable[[Tensor], Tensor] | None = None) -> float:
    """Accuracy of ``net`` in eval mode on (x, y), in chunks, through ``forward`` (default:
    ``net``); leaves it in training mode."""
    net.eval()
    with torch.no_grad():
        chunks = zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK), strict=True)
        correct = sum(int(((forward or net)(xs).argmax(1) == ys).sum()) for xs, ys in chunks)
    net.train()
    return correct / len(y)


def batches_per_epoch(n: int, args: argparse.Namespace) -> int:
    """The number of full batches of n samples, at most ``--limit-batches``."""
    return min(n // args.batch_size, args.limit_batches or n)


def batches(n: int, args: argparse.Namespace, generator: torch.Generator) -> Tensor:
    """A shuffled epoch of full batches of indices, one batch per row."""
    order = torch.randperm(n, generator=generator)
    return order[: batches_per_epoch(n, args) * args.batch_size].view(-1, args.batch_size)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model (in ``--dtype``, compiled for ``--compile``), its SGD optimizer with the linear
    learning-rate decay, its ENorm, and the autocast and gradient scaler of ``--amp``."""

    def __init__(self, norm: str, args: argparse.Namespace, sample: Tensor, steps: int):
        self.net = build(norm, args, sample).to(args.device, DTYPES[args.dtype])
        if args.compile:
            # each model is a new nn.Sequential with the same forward: without a reset, Dynamo's
            # recompile limit for that code is reached after a few runs and the rest run eager
            torch._dynamo.reset()
        self.model: Callable[[Tensor], Tensor] = torch.compile(self.net) if args.compile else self.net
        self.device_type = torch.device(args.device).type
        self.amp_dtype = AMP_DTYPES[args.amp] if args.amp else None
        self.scaler = torch.amp.GradScaler(self.device_type) if args.amp == "fp16" else None
        recipe = RECIPES["mlp" if args.mlp else "cnn"]
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr, momentum=recipe.momentum,
                                         weight_decay=recipe.weight_decay)
        self.enorm = (tritonorm.ENorm.from_model(self.net, self.optimizer, allow_batchnorm=norm == "enorm_bn",
                                                 residual=args.resnet, c=ENORM_C, backend=args.backend)
                      if norm in ("enorm", "enorm_bn") else None)
        self.lr, self.steps, self.step_count = args.lr, steps, 0

    def autocast(self) -> torch.autocast:
        """The autocast context of ``--amp`` (disabled without it)."""
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def forward(self, x: Tensor) -> Tensor:
        """The model's logits on ``x`` (cast to the model's dtype), under ``--amp``'s autocast."""
        with self.autocast():
            return self.model(x.to(self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (``--dtype``)."""
        return next(self.net.parameters()).dtype

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step (then the ENorm cycle) on the batch; returns the detached loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * (1 - self.step_count / self.steps)
        loss = nn.functional.cross_entropy(self.forward(x).float(), y)
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.enorm is not None:
            self.enorm.step()
        self.step_count += 1
        return loss.detach()

    def epoch(self, data: Dataset, order: Tensor) -> float:
        """One pass over the batches of ``order``; returns the mean training loss."""
        total = sum(self.step(data.x_train[rows], data.y_train[rows]) for rows in order.to(data.x_train.device))
        return float(total) / len(order)


def train(norm: str, seed: int, args: argparse.Namespace, data: Dataset, progress) -> Run:
    """Train the model with ``norm`` from ``seed`` for ``--epochs``; one progress tick per epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    steps = args.epochs * batches_per_epoch(len(data.x_train), args)
    trainer, run = Trainer(norm, args, data.x_train[:2], steps), Run(seed)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        loss = trainer.epoch(data, batches(len(data.x_train), args, generator))
        sync(args.device)
        run.epoch_seconds.append(time.perf_counter() - start)
        run.train_loss.append(loss)
        run.test_accuracy.append(evaluate(trainer.net, data.x_test, data.y_test, trainer.forward))
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3g}", acc=f"{run.test_accuracy[-1]:.3f}")
        if not math.isfinite(loss):
            run.diverged = True
            progress.update(args.epochs - epoch - 1)
            break
    run.test_accuracy += run.test_accuracy[-1:] * (args.epochs - len(run.test_accuracy))
    return run


def summarize(norm: str, mlp: bool, runs: list[Run]) -> dict:
    """The table row of one normalization, its curves (median and quartiles per epoch) and runs."""
    final_acc = np.array([r.test_accuracy[-1] for r in runs])
    final_loss = np.nan_to_num(np.array([r.train_loss[-1] for r in runs]), nan=np.inf)
    curves = np.array([r.test_accuracy for r in runs])
    q25, median, q75 = np.percentile(final_acc, [25, 50, 75])
    return {
        "norm": norm,
        "label": label(norm, mlp),
        "train_loss": float(np.median(final_loss)),
        "test_accuracy_median": float(median),
        "test_accuracy_q25": float(q25),
        "test_accuracy_q75": float(q75),
        "seconds_per_epoch": float(np.median([s for r in runs for s in r.epoch_seconds])),
        "diverged": sum(r.diverged for r in runs),
        "seeds": len(runs),
        "curve": dict(zip(("q25", "median", "q75"), np.percentile(curves, [25, 50, 75], axis=0).tolist(), strict=True)),
        "runs": [asdict(r) for r in runs],
    }


COLUMNS = ("norm", "train loss", "test acc", "IQR", "s/epoch", "diverged")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    """The printed cells of each row: accuracies in percent, the IQR as 'q25-q75'."""
    return [(r["label"], f"{r['train_loss']:.4f}", f"{100 * r['test_accuracy_median']:.2f}",
             f"{100 * r['test_accuracy_q25']:.2f}-{100 * r['test_accuracy_q75']:.2f}",
             f"{r['seconds_per_epoch']:.3f}", f"{r['diverged']}/{r['seeds']}") for r in rows]


def format_table(rows: list[dict]) -> str:
    """The table as aligned text: the name left, the numbers right."""
    cells = [COLUMNS, *table_rows(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     for row in cells)


def write_csv(path: Path, rows: list[dict]) -> None:
    """One line per normalization, the table's numbers unrounded."""
    keys = ("norm", "label", "train_loss", "test_accuracy_median", "test_accuracy_q25", "test_accuracy_q75",
            "seconds_per_epoch", "diverged", "seeds")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Test accuracy per epoch: per normalization, the median line and the interquartile band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        epochs = np.arange(1, len(row["curve"]["median"]) + 1)
        (line,) = ax.plot(epochs, 100 * np.array(row["curve"]["median"]), label=row["label"])
        ax.fill_between(epochs, 100 * np.array(row["curve"]["q25"]), 100 * np.array(row["curve"]["q75"]),
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax.set_title(title, fontsize="medium")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def versions() -> dict[str, str | None]:
    """Versions of the software that ran the comparison."""
    out = {"python": platform.python_version(), "tritonorm": tritonorm.__version__, "torch": torch.__version__,
           "numpy": np.__version__}
    for name in ("triton", "sklearn", "matplotlib"):
        module = sys.modules.get(name)
        out[name] = getattr(module, "__version__", None)
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def model_name(args: argparse.Namespace) -> str:
    """A short description of the model."""
    if args.mlp:
        return f"MLP, {args.mlp} intermediate layers of {args.width} units"
    if args.resnet:
        return f"residual CNN, basic blocks of {'-'.join(map(str, CNN_CHANNELS))} channels"
    return f"CNN, 3x3 convolutions of {'-'.join(map(str, CNN_CHANNELS))} channels"


def precision(args: argparse.Namespace) -> dict:
    """The numeric settings of the run: dtype, autocast, gradient scaler, compile, inputs."""
    return {"dtype": args.dtype, "amp": args.amp, "grad_scaler": args.amp == "fp16", "compile": args.compile,
            "inputs": "standardized per channel" if args.standardize else "[0, 1]"}


def precision_name(args: argparse.Namespace) -> str:
    """The numeric settings in a few words, for the header and the plot."""
    words = [args.dtype + (f", autocast {args.amp}" + (" with a gradient scaler" if args.amp == "fp16" else "")
                           if args.amp else "")]
    if args.compile:
        words.append("compiled")
    words.append("inputs standardized" if args.standardize else "inputs in [0, 1]")
    return ", ".join(words)


def report(args: argparse.Namespace, data: Dataset, backend: str, rows: list[dict]) -> dict:
    """The JSON document: settings, versions, device, dataset, model, precision and rows."""
    settings = {k: v for k, v in vars(args).items() if k != "run"}
    settings.update(out=str(args.out), device=str(args.device), cifar10=args.cifar10 and str(args.cifar10))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "versions": versions(),
        "device": device_name(args.device),
        "backend": backend,
        "dataset": data.describe(),
        "model": model_name(args),
        "precision": precision(args),
        "precision_name": precision_name(args),
        "rows": rows,
    }


def finite_or_null(value):
    """``value`` with every infinite or NaN float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_outputs(out: Path, doc: dict) -> list[Path]:
    """compare.json, compare.csv and compare.png in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"compare.{ext}" for ext in ("json", "csv", "png")]
    paths[0].write_text(json.dumps(finite_or_null(doc), indent=1, allow_nan=False) + "\n")
    write_csv(paths[1], doc["rows"])
    plot(paths[2], doc["rows"], f"{doc['dataset']}\n{doc['model']}; {doc['precision_name']}")
    return paths


def missing_extras(args: argparse.Namespace) -> list[str]:
    """The packages of the ``compare`` extra that this run needs and cannot import."""
    names = ["matplotlib", "tqdm", *([] if args.cifar10 else ["sklearn"])]
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append("scikit-learn" if name == "sklearn" else name)
    return missing


def standardize(data: Dataset) -> Dataset:
    """``data`` with both splits' images less the training images' per-channel mean, divided by
    their per-channel std (the ENorm study's inputs)."""
    dims = (0, *range(2, data.x_train.dim()))
    mean = data.x_train.mean(dims, keepdim=True)
    std = data.x_train.std(dims, keepdim=True)
    return data._replace(x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std)


def load(args: argparse.Namespace) -> Dataset:
    """The dataset of ``args`` on ``args.device``, standardized for ``--standardize``."""
    data = load_cifar10(args.cifar10) if args.cifar10 else load_digits()
    if args.standardize:
        data = standardize(data)
    return Dataset(data.name, *(t.to(args.device) for t in data[1:]))


def compare(args: argparse.Namespace, data: Dataset) -> list[dict]:
    """Train every normalization from every seed, behind one progress bar; the table rows."""
    from tqdm import tqdm

    hide = args.no_progress or not sys.stderr.isatty()
    rows = []
    with tqdm(total=len(args.norms) * args.seeds * args.epochs, unit="epoch", file=sys.stderr, disable=hide,
              dynamic_ncols=True) as progress:
        for norm in args.norms:
            runs = []
            for seed in range(args.seeds):
                progress.set_description(f"{norm} seed {seed}")
                runs.append(train(norm, seed, args, data, progress))
            rows.append(summarize(norm, bool(args.mlp), runs))
    return rows


class SetupError(Exception):
    """What the run cannot start with; the message is one line for the user."""


def check_out(out: Path) -> None:
    """Raise SetupError unless ``out`` is a directory that can be written, or can be created in
    one; creates nothing (write_outputs does, after training)."""
    existing = next(path for path in (out, *out.parents) if os.path.lexists(path))
    if not existing.is_dir():
        raise SetupError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(f"--out {out}: cannot write in {existing}")


STANDARDIZE_WARNING = ("warning: --standardize gives EquiNorm's first layer inputs of both signs; EquiNorm "
                       "assumes positive inputs (its mass-conserving normalization), so its row is outside the "
                       "paper's setting")


def check_precision(args: argparse.Namespace) -> None:
    """Raise SetupError for --amp with a --dtype other than float32 (autocast casts float32
    parameters; a model already in low precision has nothing for it to do, and a gradient
    scaler refuses half-precision gradients)."""
    if args.amp and args.dtype != "float32":
        raise SetupError(f"--amp {args.amp} needs --dtype float32 (autocast runs a float32 model in low "
                         f"precision), got --dtype {args.dtype}")


def prepare(args: argparse.Namespace) -> tuple[Dataset, str]:
    """The dataset on the device and the backend that runs tritonorm's layers; raises
    SetupError or DataError when the precision settings, the output directory, the extras,
    the data, the batch size or the backend fail."""
    check_precision(args)
    check_out(args.out)
    missing = missing_extras(args)
    if missing:
        raise SetupError(f"needs {', '.join(missing)} (the 'compare' extra): {EXTRA_HINT}")
    data = load(args)
    if args.batch_size > len(data.x_train):
        raise SetupError(f"--batch-size {args.batch_size} is more than the {len(data.x_train)} training images")
    try:
        return data, resolve_backend(args.backend, data.x_train)
    except RuntimeError as err:
        raise SetupError(f"--backend {args.backend}: {err}") from None


def run(args: argparse.Namespace) -> int:
    """Train, print the table, write the files; 2 with a one-line error if the run cannot start."""
    try:
        data, backend = prepare(args)
    except (SetupError, DataError) as err:
        print(f"tritonorm compare: error: {err}", file=sys.stderr)
        return 2
    if args.standardize and "equinorm" in args.norms:
        print(f"tritonorm compare: {STANDARDIZE_WARNING}", file=sys.stderr)
    print(f"{data.describe()}; {model_name(args)}; {args.epochs} epochs x {args.seeds} seeds, batch "
          f"{args.batch_size}, lr {args.lr}; {precision_name(args)}; device {args.device} "
          f"({device_name(args.device)}), backend {backend}", flush=True)
    rows = compare(args, data)
    print(format_table(rows))
    paths = write_outputs(args.out, report(args, data, backend, rows))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def norm_list(text: str) -> list[str]:
    """argparse type: comma-separated names from NORMS, in the given order, no repeats."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in NORMS]
    if unknown or not names:
        what = f"unknown norm {', '.join(map(repr, unknown))}" if unknown else "no norm given"
        raise argparse.ArgumentTypeError(f"{what}; choose from {', '.join(NORMS)}")
    return list(dict.fromkeys(names))


def device(text: str) -> torch.device:
    """argparse type: a torch device; CUDA only where it is available."""
    try:
        value = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available")
    return value


def _option(parser: argparse.ArgumentParser, flag: str, kind: Callable, default, help: str) -> None:
    """Add ``flag`` with its type and default, the default shown in the help."""
    parser.add_argument(flag, type=kind, default=default, help=f"{help} (default: {default})")


def add_parser(subparsers) -> None:
    """Register ``compare`` and its options."""
    parser = subparsers.add_parser("compare", help=__doc__.split("\n")[0].split(": ", 1)[1], description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", type=norm_list, default=list(NORMS), metavar="A,B,...",
                        help=f"the normalizations to train, comma-separated (default: all: {','.join(NORMS)})")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--mlp", type=positive_int, metavar="DEPTH",
                       help="train the study's deep MLP with DEPTH intermediate layers instead of the CNN")
    model.add_argument("--resnet", action="store_true",
                       help="train a small residual CNN (a basic block per width) instead of the CNN; ENorm "
                            "balances the pairs inside each block")
    _option(parser, "--width", positive_int, 500, "the MLP's hidden width")
    parser.add_argument("--cifar10", type=Path, metavar="DIR",
                        help="train on CIFAR-10 from the python batches in DIR (default: scikit-learn's digits)")
    _option(parser, "--epochs", positive_int, 30, "training epochs")
    _option(parser, "--seeds", positive_int, 5, "seeds 0..SEEDS-1 per normalization")
    _option(parser, "--batch-size", positive_int, 64, "batch size")
    _option(parser, "--lr", positive_float, 0.05, "initial learning rate, decayed linearly to 0")
    _option(parser, "--device", device, "cuda" if torch.cuda.is_available() else "cpu", "torch device")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="tritonorm's backend (default: auto)")
    _option(parser, "--out", Path, Path("tritonorm-compare"), "directory for compare.json, .csv and .png")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="the dtype of the whole model, its activations and the inputs; tritonorm's layers "
                        "accumulate statistics in fp32 (default: float32)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES),
                        help="autocast the forward to this dtype (float32 parameters; fp16 adds a gradient scaler); "
                        "needs --dtype float32")
    parser.add_argument("--compile", action="store_true", help="train and evaluate through torch.compile(model)")
    parser.add_argument("--standardize", action="store_true",
                        help="standardize the inputs by the training set's per-channel mean and std, as the ENorm "
                        "study does (default: values in [0, 1]; EquiNorm assumes positive inputs and is warned)")
    parser.add_argument("--limit-batches", type=positive_int, metavar="N",
                        help="at most N training batches per epoch (for quick runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is "
                        "not a terminal)")
    parser.set_defaults(run=run)
