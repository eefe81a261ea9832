"""Write the tutorial notebooks of ``notebooks/`` from the cell sources below (outputs stripped).

Edit the cells here, then run ``python notebooks/_build_notebooks.py``; the ``.ipynb`` files are
generated, so their diffs stay reviewable. Every notebook reads ``PDENETS_NOTEBOOK_FAST=1`` (set by
``tests/test_notebooks.py``) to shrink its settings, and writes its logs into a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*non-interactive.*")
FAST = os.environ.get("PDENETS_NOTEBOOK_FAST", "0") == "1"  # tiny settings (what CI runs)
LOG_DIR = Path(tempfile.mkdtemp(prefix="pdenets_{name}_"))  # logs stay out of the repository
TRAINER_ARGS = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=LOG_DIR)
print("fast mode:", FAST, "| logs in", LOG_DIR)"""


def notebook(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        source = source.strip("\n")
        nb.cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{index:02d}"  # stable ids: regenerating gives an empty diff
    return nb


# ---------------------------------------------------------------------------------------------
QUICKSTART = [
    (
        "md",
        """
# 01 · Quickstart: train from Python and from a config, then read the logs

This notebook trains Chen et al.'s **RK-Net** (an ODE block solved with fixed-step RK4) on
scikit-learn's bundled handwritten digits (8×8 images, no download) twice:

1. from the Python API: a `LightningModule` from `lightning_pdenets.models`, a datamodule from
   `lightning_pdenets.data` and a plain `lightning.pytorch.Trainer`;
2. from the same YAML config that `pdenets fit --config configs/quickstart.yaml` uses.

Both write TensorBoard logs; we read the event files back and plot the learning curves.
""",
    ),
    ("code", SETUP.replace("{name}", "quickstart")),
    ("md", "## 1. From the Python API"),
    (
        "code",
        """
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.models import RKNetModule

EPOCHS = 2 if FAST else 15
WIDTH = 8 if FAST else 64  # the quickstart config's width

pl.seed_everything(0)
model = RKNetModule(in_channels=1, num_classes=10, network={"width": WIDTH, "num_downsamples": 1},
                    solver={"method": "rk4", "step_size": 0.25}, lr=3e-3, lr_scheduler="cosine")
data = DigitsDataModule(batch_size=64)
trainer = pl.Trainer(max_epochs=EPOCHS, logger=TensorBoardLogger(LOG_DIR, name="python_api"),
                     log_every_n_steps=5, **TRAINER_ARGS)
trainer.fit(model, datamodule=data)
api_result = trainer.test(model, datamodule=data, verbose=False)[0]
print(f"test accuracy (Python API): {api_result['test/acc_top1']:.3f}")
""",
    ),
    (
        "md",
        """
## 2. From a config file

`build_cli` is the function behind the `pdenets` command; the list holds the command-line
arguments. In a terminal the same run is
`pdenets fit --config configs/quickstart.yaml --trainer.max_epochs 2`. After `fit` the CLI tests the
best checkpoint.
""",
    ),
    (
        "code",
        """
from lightning_pdenets.cli import build_cli

# The notebooks live in <repository>/notebooks; PDENETS_REPO overrides the repository root.
REPO = Path(os.environ.get("PDENETS_REPO", Path.cwd().parent))
CONFIG = REPO / "configs" / "quickstart.yaml"
print(CONFIG.read_text())

cli = build_cli([
    "fit", "--config", str(CONFIG),
    "--trainer.max_epochs", str(EPOCHS),
    "--model.init_args.network.width", str(WIDTH),
    "--trainer.logger.init_args.save_dir", str(LOG_DIR),  # TensorBoard logs and checkpoints
    "--trainer.logger.init_args.name", "cli",
    "--trainer.enable_progress_bar", "false",
])
print(f"test accuracy (CLI): {float(cli.trainer.callback_metrics['test/acc_top1']):.3f}")
""",
    ),
    ("md", "## 3. Learning curves from the TensorBoard event files"),
    (
        "code",
        '''
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_dir, tag):
    """(steps, values) of one scalar tag in a TensorBoard run directory."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


runs = {"Python API": trainer.logger.log_dir, "CLI config": cli.trainer.logger.log_dir}
figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
for label, log_dir in runs.items():
    loss_ax.plot(*read_scalars(log_dir, "train/loss_step"), label=label)
    acc_ax.plot(*read_scalars(log_dir, "val/acc_top1"), marker="o", label=label)
loss_ax.set(xlabel="training step", ylabel="training loss", title="training loss")
acc_ax.set(xlabel="training step", ylabel="accuracy", title="validation top-1 accuracy")
for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
figure.tight_layout()
plt.show()
''',
    ),
    (
        "md",
        """
Run `tensorboard --logdir <log dir>` to browse the same curves interactively; every model of the
package logs `train/`, `val/` and `test/` `loss`, `acc_top1` and `acc_top5`; for ODE models the
`NFEMonitor` callback, which `pdenets` adds by default, logs `nfe_forward` and `nfe_backward`.
""",
    ),
]

# ---------------------------------------------------------------------------------------------
SOLVER_ROBUSTNESS = [
    (
        "md",
        """
# 02 · Solver robustness: *ResNet After All* on concentric spheres

Ott, Katiyar, Hennig & Tiemann (ICLR 2021) showed that a neural ODE trained with a coarse
fixed-step solver is not really an ODE: its accuracy collapses when it is *tested* with a finer
solver. On 2-D concentric spheres (labels 0, 1, 0 from the inside out) an exact ODE flow cannot
separate the classes (it is a homeomorphism of the plane), but a coarse Euler step can, by letting
trajectories cross.

We train `VectorODEClassifierModule` with Euler at several step sizes, test every model at every
step size, and plot the trajectories of a coarse model and of one trained with an adaptive solver
whose tolerance the `ToleranceAdaptation` callback tunes (`StepSizeAdaptation` does the same for
the step of a fixed-step solver).
""",
    ),
    ("code", SETUP.replace("{name}", "solver_robustness")),
    (
        "code",
        '''
from lightning_pdenets.callbacks import SolverSwapCheck, ToleranceAdaptation
from lightning_pdenets.data import ConcentricSpheresDataModule
from lightning_pdenets.models import VectorODEClassifierModule
from lightning_pdenets.protocols import find_ode_blocks

TRAIN_STEPS = [1.0, 0.25] if FAST else [1.0, 0.5, 0.25, 0.1]
TEST_STEPS = [1.0, 0.5, 0.25, 0.1, 0.05] if FAST else [1.0, 0.5, 0.25, 0.1, 0.05, 0.02]
EPOCHS = 12 if FAST else 30
data = ConcentricSpheresDataModule(dim=2, variant="ott", num_train=1000 if FAST else 2000, num_val=200,
                                   batch_size=32 if FAST else 64)
data.setup()
test_x, test_y = data.splits["test"].tensors


def train(step_size, callbacks=(), method="euler"):
    pl.seed_everything(0)
    model = VectorODEClassifierModule(input_dim=2, num_classes=2, network={"hidden_width": 32},
                                      solver={"method": method, "step_size": step_size}, lr=1e-2)
    pl.Trainer(max_epochs=EPOCHS, logger=False, callbacks=list(callbacks), **TRAINER_ARGS).fit(model, datamodule=data)
    return model.eval()


@torch.no_grad()
def accuracy_with_step(model, step_size):
    """Test accuracy with Euler at ``step_size``; the block's solver is changed through the ODE-block protocol."""
    (block,) = find_ode_blocks(model)
    trained = block.solver_settings()
    block.configure_solver(step_size=step_size, max_num_steps=max(trained["max_num_steps"], int(1 / step_size) + 1))
    accuracy = (model(test_x).argmax(dim=1) == test_y).float().mean().item()
    block.configure_solver(step_size=trained["step_size"], max_num_steps=trained["max_num_steps"])
    return accuracy


models = {h: train(h) for h in TRAIN_STEPS}
heatmap = torch.tensor([[accuracy_with_step(models[h], g) for g in TEST_STEPS] for h in TRAIN_STEPS])
''',
    ),
    ("md", "## Accuracy over train step × test step"),
    (
        "code",
        """
figure, ax = plt.subplots(figsize=(6, 3.5))
image = ax.imshow(heatmap, vmin=0.3, vmax=1.0, cmap="viridis")
ax.set_xticks(range(len(TEST_STEPS)), [f"{g:g}" for g in TEST_STEPS])
ax.set_yticks(range(len(TRAIN_STEPS)), [f"{h:g}" for h in TRAIN_STEPS])
ax.set(xlabel="test step size (Euler)", ylabel="train step size (Euler)", title="test accuracy")
for i in range(len(TRAIN_STEPS)):
    for j in range(len(TEST_STEPS)):
        ax.text(j, i, f"{heatmap[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
figure.colorbar(image)
figure.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        """
Each row is one trained model. The coarse models (top rows) lose accuracy to the right of their
training step: what they learned depends on the solver's error. `SolverSwapCheck` measures the
same thing during training and logs it (with a figure) to TensorBoard:
""",
    ),
    (
        "code",
        """
swap = SolverSwapCheck(solvers=["euler", "rk4", "dopri5"], step_factors=[0.25, 0.5, 1.0], tolerance_factors=[0.1, 1.0])
coarse = models[TRAIN_STEPS[0]]
pl.Trainer(logger=False, callbacks=[swap], **TRAINER_ARGS).test(coarse, datamodule=data, verbose=False)
result = swap.results["test"]
print(f"trained with euler h={result['train_step_size']:g}: accuracy {result['train_solver_acc']:.3f}, "
      f"largest drop under another solver {result['max_drop']:.3f}")
from IPython.display import display

display(SolverSwapCheck.figure(result))  # the figure TensorBoard receives
""",
    ),
    ("md", "## Trajectories: crossing under a coarse solver, none under an adapted one"),
    (
        "code",
        '''
adaptation = ToleranceAdaptation(interval=5, threshold=0.1, initial_tol=1e-4)
adapted = train(None, callbacks=[adaptation], method="dopri5")
(adapted_block,) = find_ode_blocks(adapted)
print(f"adapted dopri5 tolerance: {adapted_block.solver_settings()['rtol']:.2e}")


@torch.no_grad()
def trajectories(model, points, step_size=None, keep_every=1):
    """States along Euler steps of ``step_size`` (default: the model's own step), every ``keep_every``-th kept."""
    (block,) = find_ode_blocks(model)
    settings = block.solver_settings()
    h = step_size or settings["step_size"]
    t, states = settings["t0"], [points]
    while t < settings["t1"] - 1e-9:
        step = min(h, settings["t1"] - t)
        states.append(states[-1] + step * block.vector_field(torch.tensor(t), states[-1]))
        t += step
    return torch.stack(states[::keep_every] if (len(states) - 1) % keep_every == 0 else states)


def crossings(paths):
    """Number of pairs of trajectory segments (of different points) that intersect."""
    a, b = paths[:-1].reshape(-1, 2), paths[1:].reshape(-1, 2)  # segment i: a[i] -> b[i]
    owner = torch.arange(paths.shape[1]).repeat(paths.shape[0] - 1)

    def orient(p, q, r):  # sign of the cross product (q - p) x (r - p), broadcast over pairs
        return torch.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    p, q, r, s = a[:, None], b[:, None], a[None], b[None]
    hit = (orient(p, q, r) * orient(p, q, s) < 0) & (orient(r, s, p) * orient(r, s, q) < 0)
    hit &= owner[:, None] != owner[None]
    return int(hit.sum()) // 2


start = test_x[:60 if FAST else 120]
labels = test_y[: len(start)]
figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
panels = [(f"coarse: Euler h={TRAIN_STEPS[0]:g}", trajectories(coarse, start)),
          ("adapted: dopri5 with ToleranceAdaptation", trajectories(adapted, start, step_size=0.01, keep_every=10))]
for ax, (title, paths) in zip(axes, panels):
    for i in range(len(start)):
        ax.plot(paths[:, i, 0], paths[:, i, 1], color="C0" if labels[i] == 0 else "C3", alpha=0.6, linewidth=0.8)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], c=["C0" if y == 0 else "C3" for y in labels], s=8)
    ax.set_title(f"{title}\\n{crossings(paths)} crossing segment pairs", fontsize=10)
    ax.set_aspect("equal")
figure.tight_layout()
plt.show()
''',
    ),
    (
        "md",
        """
Under the coarse solver the trajectories of the two classes jump over each other (the straight
segments are single Euler steps). The adapted model is drawn with a much finer Euler step than it
was trained with: its trajectories are those of an ODE flow, which cannot cross in the plane (the
few crossings counted are chords of curves that run side by side), so what it learned does not
depend on the solver that evaluates it.
""",
    ),
]

# ---------------------------------------------------------------------------------------------
PRNET = [
    (
        "md",
        """
# 03 · PR-Net: a learned governing equation, and inference in one evaluation

Kim et al.'s PR-Net replaces the ODE block by a regression network h(d, t) = f(h(0), d, t; θ)
that is *trained* to obey a sparse PDE h_t = Σ α_ij h^i ∂^j h / ∂d^j (d = x, y). Here we train a
small PR-Net on the digits, print the learned equation, plot h(d, t) and the residual g of the
equation, and check that inference evaluates f exactly once. Last, the same `GoverningEquation`
identifies Burgers' equation from noisy samples.
""",
    ),
    ("code", SETUP.replace("{name}", "prnet")),
    (
        "code",
        """
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.models import ODENetModule, PRNetModule

pl.seed_everything(0)
data = DigitsDataModule(batch_size=64)
model = PRNetModule(in_channels=1, num_classes=10, network={"width": 8 if FAST else 16, "num_downsamples": 0}, image_size=8,
                    max_power=2, max_derivative_order=2, lr=3e-3, alpha=dict(lr=1e-2), l1_weight=1e-4,
                    governing_samples=8)
trainer = pl.Trainer(max_epochs=1 if FAST else 10, limit_train_batches=8 if FAST else 1.0,
                     logger=TensorBoardLogger(LOG_DIR, name="prnet"), log_every_n_steps=5, **TRAINER_ARGS)
trainer.fit(model, datamodule=data)
print(f"test accuracy: {trainer.test(model, datamodule=data, verbose=False)[0]['test/acc_top1']:.3f}")
""",
    ),
    ("md", "## The learned equation"),
    (
        "code",
        """
print(model.governing.equation())
coefficients = model.governing.coefficients()
print(f"{sum(v != 0.0 for v in coefficients.values())} of {len(coefficients)} library terms are non-zero")
""",
    ),
    (
        "md",
        """
## h(d, t) and the residual g

We evaluate the trained field on one test image, along the middle row of its feature map (the
coordinate x), for times t ∈ [0, T]; the residual g = h_t − Σ α (terms) uses exact derivatives.
""",
    ),
    (
        "code",
        '''
from lightning_pdenets.blocks.pde import coordinate_derivatives

block, governing = model.block, model.governing
height, width = block.spatial_size
data.setup("test")
image = data.test_dataloader().dataset[0][0][None]
times = torch.linspace(0.0, block.t_end, 21 if FAST else 41)
channel, row = 0, height // 2


def grid(t):
    """(1, 3, H, W) coordinates: x and y in [-1, 1] and the constant time t."""
    ys, xs = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy, torch.full_like(gx, float(t))])[None]


model.eval()
surface, residual = [], []
with torch.no_grad():
    h0 = model.network.stem(image)
for t in times:
    derivatives = coordinate_derivatives(lambda c: block.field(h0, c), grid(t), block.axes,
                                         dict(governing.max_derivative_order), coordinate_dim=1, time=True)
    g = governing.residual(derivatives.u_t, governing.library(derivatives))
    surface.append(derivatives.u[0, channel, row].detach())
    residual.append(g[0, channel, row].detach())
surface, residual = torch.stack(surface), torch.stack(residual)

xs = torch.linspace(-1, 1, width)
T, X = torch.meshgrid(times, xs, indexing="ij")
figure = plt.figure(figsize=(11, 4))
ax = figure.add_subplot(1, 2, 1, projection="3d")
ax.plot_surface(X.numpy(), T.numpy(), surface.numpy(), cmap="viridis")
ax.set(xlabel="x", ylabel="t", zlabel="h", title=f"h(x, t), channel {channel}, middle row")
ax = figure.add_subplot(1, 2, 2)
image_plot = ax.imshow(residual.numpy(), aspect="auto", origin="lower", cmap="coolwarm",
                       extent=[-1, 1, float(times[0]), float(times[-1])])
ax.set(xlabel="x", ylabel="t", title="residual g = h_t − Σ α·terms")
figure.colorbar(image_plot)
figure.tight_layout()
plt.show()
print(f"mean |g| over the plot: {residual.abs().mean():.4f}")
''',
    ),
    (
        "md",
        """
## Inference needs a single evaluation

At test time PR-Net evaluates f once, at the learned query set; an ODE-Net calls its vector field
once per solver stage and step. We count calls with forward hooks (plain PyTorch).
""",
    ),
    (
        "code",
        """
def count_calls(module, run):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        run()
    handle.remove()
    return len(calls)


batch = torch.stack([data.test_dataloader().dataset[i][0] for i in range(16)])
prnet_calls = count_calls(model.block.field, lambda: model(batch))
odenet = ODENetModule(solver=dict(method="dopri5", adjoint=False), in_channels=1,
                      network={"width": 8, "num_downsamples": 0}).eval()
odenet_calls = count_calls(odenet.network.feature.field, lambda: odenet(batch))
print(f"evaluations of the network f for one batch: PR-Net {prnet_calls}, ODE-Net (dopri5) {odenet_calls}")
""",
    ),
    (
        "md",
        """
## `GoverningEquation` on its own: identify a PDE from noisy samples

The same term library and sparse fit identify equations from data (PDE-FIND, Rudy et al. 2017).
We sample the Cole–Hopf solution of Burgers' equation h_t = −h h_x + 0.1 h_xx on a 256 × 101 grid,
add 1% multiplicative noise, build the 16-term library from Savitzky–Golay derivatives and fit
it with sequential thresholding at 0.05 (normalized units): the two true terms remain.
""",
    ),
    (
        "code",
        """
from lightning_pdenets.blocks import GoverningEquation

x = torch.linspace(-4, 4, 257, dtype=torch.float64)[:-1]
t = torch.linspace(0, 4, 101, dtype=torch.float64)
X, T = torch.meshgrid(x, t, indexing="ij")
kernel = 4 * torch.exp(-X**2 / (0.4 * (T + 0.5))) / torch.sqrt(0.4 * torch.pi * (T + 0.5))
h = X / (T + 0.5) * kernel / (1 + kernel)  # Cole-Hopf solution, nu = 0.1
noisy = h * (1 + 0.01 * torch.randn(h.shape, dtype=torch.float64))
equation = GoverningEquation(axes=("x",), max_power=3, max_derivative_order=3)
library, h_t = equation.library_from_samples(noisy, spacing=(x[1] - x[0], t[1] - t[0]))
fit = equation.fit_coefficients(library, h_t, threshold=0.05)
print(equation, f"  (true: h_t = -1 h h_x + 0.1 h_xx; Lasso converged in {fit.steps} steps)")
""",
    ),
]

# ---------------------------------------------------------------------------------------------
PDE_CNN = [
    (
        "md",
        """
# 04 · PDE-motivated CNNs: smoothing, energy preservation, reversibility

Ruthotto & Haber (2020) build CNN blocks from PDEs with the symmetric layer
F_sym(θ, Y) = −K(θ)ᵀ σ(K(θ) Y + b):

* the **parabolic** block Y' = F_sym(θ, Y) is a (nonlinear) diffusion: it smooths feature maps and
  decreases the energy E(Y) = ½‖K Y + b‖² for σ = identity;
* the **Hamiltonian** block Y' = F_sym(θ¹, Z), Z' = −F_sym(θ², Y) conserves
  H = ½‖K¹ Z + b¹‖² + ½‖K² Y + b²‖² (time-constant weights), and its Verlet steps are exactly
  invertible: inputs can be recomputed from outputs (a memory-free backward pass).
""",
    ),
    ("code", SETUP.replace("{name}", "pde_cnn")),
    (
        "code",
        """
import torch.nn.functional as F

from lightning_pdenets.blocks import HamiltonianBlock, ParabolicBlock
from lightning_pdenets.data import DigitsDataModule

STEPS = 20 if FAST else 60
data = DigitsDataModule(batch_size=16, normalize=False)
data.setup("test")
images = torch.stack([data.test_dataloader().dataset[i][0] for i in range(8)])  # (8, 1, 8, 8) digits
images = F.interpolate(images, scale_factor=4, mode="nearest")  # 32x32: room to see smoothing
images = images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))  # noisy input
""",
    ),
    (
        "md",
        """
## Parabolic smoothing over time

A parabolic block with one channel, σ = identity, no normalization, time-constant weights and the
kernel K set to a discrete Laplacian: F_sym(Y) = −Kᵀ K Y is a fourth-order diffusion, stable for
δ_t‖K‖² ≤ 2 (‖K‖ = 8).
""",
    ),
    (
        "code",
        """
parabolic = ParabolicBlock(channels=1, num_steps=STEPS, step_size=0.02, num_control_points=1,
                           norm="none", activation="identity")
laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
(layer,) = parabolic.layers
with torch.no_grad():
    layer.kernel.control_points.copy_(laplacian.view(1, 1, 1, 3, 3))


def parabolic_energy(y):
    return 0.5 * F.conv2d(y, laplacian.view(1, 1, 3, 3), padding=1).pow(2).sum(dim=(1, 2, 3)).mean()


states = [images]
with torch.no_grad():
    for step in range(STEPS):
        states.append(parabolic.step(step, (states[-1],))[0])
    parabolic_energies = torch.stack([parabolic_energy(y) for y in states])

shown = [0, STEPS // 4, STEPS // 2, STEPS]
figure, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.8))
for ax, step in zip(axes, shown):
    ax.imshow(states[step][0, 0], cmap="gray")
    ax.set_title(f"t = {step * parabolic.step_size:.2f}")
    ax.axis("off")
figure.suptitle("parabolic block: a noisy digit diffuses over time")
figure.tight_layout()
plt.show()
""",
    ),
    ("md", "## Energy: decreasing under the parabolic block, conserved by the Hamiltonian block"),
    (
        "code",
        """
torch.manual_seed(0)
hamiltonian = HamiltonianBlock(channels=4, num_steps=STEPS, step_size=0.05, num_control_points=1,
                               norm="none", activation="identity")
features = torch.randn(8, 4, 16, 16)


def hamiltonian_energy(state):
    y, z = state
    total = 0.0
    for layer, u in ((hamiltonian.layers[0], z), (hamiltonian.layers[1], y)):
        kernel, shift = layer.kernel.at_step(0, 1), layer.shift.at_step(0, 1).view(1, -1, 1, 1)
        total = total + 0.5 * (F.conv2d(u, kernel, padding=1) + shift).pow(2).sum(dim=(1, 2, 3)).mean()
    return total


state = hamiltonian.initial_state(features)
with torch.no_grad():
    hamiltonian_energies = [hamiltonian_energy(state)]
    for step in range(STEPS):
        state = hamiltonian.step(step, state)
        hamiltonian_energies.append(hamiltonian_energy(state))
hamiltonian_energies = torch.stack(hamiltonian_energies)

figure, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(parabolic_energies / parabolic_energies[0], label="parabolic (diffusion)")
ax.plot(hamiltonian_energies / hamiltonian_energies[0], label="Hamiltonian (Verlet)")
ax.set(xlabel="time step", ylabel="energy / initial energy", title="energy of the features over time")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
drift = (hamiltonian_energies / hamiltonian_energies[0] - 1).abs().max()
print(f"parabolic energy: {parabolic_energies[0]:.1f} -> {parabolic_energies[-1]:.1f}; "
      f"largest relative drift of the Hamiltonian energy: {drift:.2e}")
""",
    ),
    (
        "md",
        """
## Reversibility

The Hamiltonian block (with its trained, time-dependent weights too) can be run backwards from its
output to recover its input up to round-off; `reversible=True` uses this to backpropagate without
storing the intermediate states.
""",
    ),
    (
        "code",
        """
block = HamiltonianBlock(channels=4, num_steps=STEPS, step_size=0.1)  # instance norm, ReLU, one weight per step
with torch.no_grad():
    output_state = block.integrate(block.initial_state(features))
    recovered = block.output(block.reverse(output_state))
print(f"max |input - reversed(output)| = {(recovered - features).abs().max():.2e} "
      f"(features of size {features.abs().max():.1f})")

reversible = HamiltonianBlock(channels=4, num_steps=STEPS, step_size=0.1, reversible=True)
reversible.load_state_dict(block.state_dict())
x = features.clone().requires_grad_(True)
reversible(x).pow(2).sum().backward()
x_plain = features.clone().requires_grad_(True)
block(x_plain).pow(2).sum().backward()
print(f"reversible backward matches plain autograd: max |grad difference| = {(x.grad - x_plain.grad).abs().max():.2e}")
""",
    ),
]

# ---------------------------------------------------------------------------------------------
ROBUSTNESS = [
    (
        "md",
        """
# 05 · Robustness: adversarial and out-of-distribution accuracy against ε

We train a ResNet, an ODE-Net and a PR-Net (tiny, on the bundled digits), then measure

* accuracy under FGSM and PGD attacks for growing ε (in pixel units) with `AdversarialEvaluation`;
* accuracy under additive Gaussian noise of growing standard deviation, and under the PR-Net
  paper's four perturbations, with `OODEvaluation`.

Both callbacks also run inside `trainer.test` (see the last cell), logging scalars and figures to
TensorBoard; here we call their batch-level methods directly to sweep ε.
""",
    ),
    ("code", SETUP.replace("{name}", "robustness")),
    (
        "code",
        """
from lightning_pdenets.callbacks import PERTURBATIONS, AdversarialEvaluation, OODEvaluation
from lightning_pdenets.data import DigitsDataModule
from lightning_pdenets.models import ODENetModule, PRNetModule, ResNetModule

EPOCHS = 1 if FAST else 10
WIDTH = 8 if FAST else 16
TRAIN_BATCHES = 6 if FAST else 1.0  # fast mode only checks that everything runs
network = {"width": WIDTH, "num_downsamples": 1}
common = dict(in_channels=1, num_classes=10, lr=3e-3)
factories = {
    "ResNet": lambda: ResNetModule(network={**network, "num_blocks": 2}, **common),
    "ODE-Net": lambda: ODENetModule(network=network, solver=dict(method="dopri5", rtol=1e-2, atol=1e-2, adjoint=False),
                                    **common),
    "PR-Net": lambda: PRNetModule(network=network, image_size=8, max_power=1, max_derivative_order=1,
                                  governing_samples=8, **common),
}
data = DigitsDataModule(batch_size=128)
models = {}
for name, factory in factories.items():
    pl.seed_everything(0)
    models[name] = factory()
    trainer = pl.Trainer(max_epochs=EPOCHS, limit_train_batches=TRAIN_BATCHES, limit_val_batches=2, logger=False,
                         **TRAINER_ARGS)
    trainer.fit(models[name], datamodule=data)
    models[name].eval()

data.setup("test")
x, y = next(iter(data.test_dataloader()))
x, y = (x[:48], y[:48]) if FAST else (x, y)
""",
    ),
    ("md", "## Adversarial accuracy against ε"),
    (
        "code",
        """
EPSILONS = ["4/255", "32/255"] if FAST else ["1/255", "2/255", "4/255", "8/255", "16/255", "32/255", "64/255"]
attack = AdversarialEvaluation(epsilons=EPSILONS, attacks=["fgsm", "pgd"], pgd_steps=2 if FAST else 10,
                               mean=data.mean, std=data.std)


def accuracy(logits):
    return (logits.argmax(dim=1) == y).float().mean().item()


figure, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
for name, model in models.items():
    outputs = attack.attack_batch(model, x, y)
    for ax, kind in zip(axes, ("fgsm", "pgd")):
        curve = [accuracy(outputs["clean"])] + [accuracy(outputs[key]) for key in outputs if key.startswith(kind)]
        ax.plot([0.0] + [e * 255 for e in attack.epsilons], curve, marker="o", label=name)
for ax, kind in zip(axes, ("FGSM", "PGD")):
    ax.set(xlabel="ε (× 1/255)", title=f"{kind} accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
axes[0].set_ylabel("top-1 accuracy")
axes[0].legend()
figure.tight_layout()
plt.show()
""",
    ),
    ("md", "## Out-of-distribution accuracy: Gaussian noise of growing strength, and the four perturbations"),
    (
        "code",
        """
NOISE_STDS = [0.1, 0.4] if FAST else [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6]
figure, (noise_ax, bar_ax) = plt.subplots(1, 2, figsize=(11, 3.5))
for index, (name, model) in enumerate(models.items()):
    clean = accuracy(model(x).detach())
    noisy = [accuracy(OODEvaluation(["gaussian_noise"], noise_std=s, mean=data.mean, std=data.std)
                      .evaluate_batch(model, x)["gaussian_noise"]) for s in NOISE_STDS]
    noise_ax.plot([0.0] + NOISE_STDS, [clean] + noisy, marker="o", label=name)
    perturbed = OODEvaluation(crop_size=7, reference_size=8, mean=data.mean, std=data.std).evaluate_batch(model, x)
    bar_ax.bar([i + 0.25 * index for i in range(len(PERTURBATIONS))], [accuracy(perturbed[p]) for p in PERTURBATIONS],
               width=0.25, label=name)
noise_ax.set(xlabel="noise standard deviation ε (pixels)", ylabel="top-1 accuracy", title="Gaussian noise", ylim=(0, 1))
noise_ax.grid(alpha=0.3)
noise_ax.legend()
bar_ax.set_xticks([i + 0.25 for i in range(len(PERTURBATIONS))], PERTURBATIONS, fontsize=8)
bar_ax.set(ylabel="top-1 accuracy", title="PR-Net paper's perturbations", ylim=(0, 1))
figure.tight_layout()
plt.show()
""",
    ),
    ("md", "## The same measurements as callbacks in `trainer.test` (scalars and figures in TensorBoard)"),
    (
        "code",
        """
from lightning.pytorch.loggers import TensorBoardLogger

callbacks = [AdversarialEvaluation(epsilons=["1/255", "8/255"], pgd_steps=2, num_batches=1),
             OODEvaluation(crop_size=7, reference_size=8, num_batches=1)]
tester = pl.Trainer(logger=TensorBoardLogger(LOG_DIR, name="robustness"), callbacks=callbacks, limit_test_batches=1,
                    **TRAINER_ARGS)
results = tester.test(models["ResNet"], datamodule=data, verbose=False)[0]
for key in sorted(results):
    if key.startswith(("adv/", "ood/")) and key.endswith("top1"):
        print(f"{key:32s} {results[key]:.3f}")
""",
    ),
]


NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_solver_robustness": SOLVER_ROBUSTNESS,
    "03_prnet_governing_equation": PRNET,
    "04_pde_cnn_dynamics": PDE_CNN,
    "05_robustness": ROBUSTNESS,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(notebook(name, cells), HERE / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
