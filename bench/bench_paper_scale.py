"""Tables of issue 18 from the trained MNIST checkpoints of ``configs/mnist/{resnet,rknet,odenet,prnet}.yaml``.

Each table is regenerated from the checkpoints alone (no training):

* ``accuracy``: parameters, test accuracy on the 10,000 MNIST test images, and the trained ODE-Net's forward NFE;
* ``inference``: time to classify 1,000 test images (Kim et al.'s Table 2 metric), models interleaved round by
  round so that load drifts hit all alike;
* ``equation``: PR-Net's learned governing equation, its exact zeros, and L_G on test features against its value
  for the same network at initialization (``seed_everything`` of the config);
* ``curves``: validation accuracy per epoch of each run, read from its TensorBoard events (a figure);
* ``robustness``: top-1 accuracy under FGSM, L∞ PGD and the gradient-free L∞ SPSA at ε = 0.05/0.1/0.2/0.3 pixel
  units, the robust accuracy (a test image counts only if no attack fools it), the gradient-masking flag, the
  white-box attacks again with gradients through a fixed-step stand-in solver for adaptive-solver models, and the
  four out-of-distribution perturbations (Kim et al.'s Tables 3 and 4), all through the framework's
  ``AdversarialEvaluation`` and ``OODEvaluation`` callbacks on the first ``--robust-images`` test images
  (SPSA on the first ``--spsa-images``).

    python bench/bench_paper_scale.py --data-dir ../shared/data \\
        --checkpoint resnet=bench/checkpoints/mnist/resnet.ckpt --curve resnet=bench/logs/mnist/resnet ... \\
        --tables accuracy inference equation curves --output bench/results_paper_scale.md

BENCHMARKS.md ("MNIST at paper scale") gives the full command of each table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    check_output,
    load_model,
    missing_data_exits,
    named_checkpoints,
    named_path,
    positive_int,
)

from lightning_pdenets.callbacks import AdversarialEvaluation, NFEMonitor, OODEvaluation  # noqa: E402
from lightning_pdenets.callbacks.ood import PERTURBATIONS  # noqa: E402
from lightning_pdenets.data import MNISTDataModule  # noqa: E402
from lightning_pdenets.protocols import find_ode_blocks  # noqa: E402
from lightning_pdenets.solvers import SOLVERS  # noqa: E402

NAMES = ("resnet", "rknet", "odenet", "prnet", "prnet_seed1")
EPSILONS = (0.05, 0.1, 0.2, 0.3)
"""Attack budgets in pixel units (issue 18; Madry et al.'s MNIST budget is 0.3)."""


def test_images(data_dir: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = MNISTDataModule(data_dir=data_dir, download=False)
    data.setup("test")
    loader = torch.utils.data.DataLoader(data.test_set, batch_size=count)
    return next(iter(loader))


def accuracy_table(models: dict[str, pl.LightningModule], data_dir: str) -> list[str]:
    lines = ["| model | parameters | test accuracy (10,000 images) | forward NFE per test batch |", "|---|---|---|---|"]
    for name, model in models.items():
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[NFEMonitor()],
        )
        result = trainer.test(
            model, datamodule=MNISTDataModule(data_dir=data_dir, download=False, batch_size=128), verbose=False
        )[0]
        nfe = f"{result['test/nfe_forward']:.1f}" if "test/nfe_forward" in result else "—"
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"| {name} | {params:,} | {result['test/acc_top1']:.4f} | {nfe} |")
    return lines


def inference_table(models: dict[str, pl.LightningModule], images: torch.Tensor, rounds: int) -> list[str]:
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(images)  # warm-up
        for round_index in range(rounds):
            order = list(models)[round_index % len(models) :] + list(models)[: round_index % len(models)]
            for name in order:
                start = time.perf_counter()
                models[name](images)
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    lines = ["| model | 1,000 images (median) | min–max | vs ResNet | vs ODE-Net |", "|---|---|---|---|---|"]
    for name, values in seconds.items():
        relative = [
            f"{median[name] / median[other]:.2f}×" if other in median else "—" for other in ("resnet", "odenet")
        ]
        lines.append(
            f"| {name} | {median[name] * 1e3:.0f} ms | {min(values) * 1e3:.0f}–{max(values) * 1e3:.0f} ms | "
            f"{relative[0]} | {relative[1]} |"
        )
    if "prnet" in median and "odenet" in median:
        lines.append("")
        lines.append(
            f"PR-Net is {median['odenet'] / median['prnet']:.1f}× faster than the trained ODE-Net "
            f"(target ≥ 4×) and {median.get('resnet', float('nan')) / median['prnet']:.2f}× as fast as ResNet "
            f"(target > 1×)."
        )
    return lines


def governing_loss(model: pl.LightningModule, images: torch.Tensor) -> float:
    """L_G of ``model``'s PDE block on the stem features of ``images``."""
    with torch.no_grad():
        h0 = model.network.stem(images)
        derivatives = model.block.derivatives(h0, dict(model.governing.max_derivative_order))
        library = model.governing.library(derivatives)
        return float(model.governing.governing_loss(derivatives.u_t, library))


def equation_table(model: pl.LightningModule, images: torch.Tensor, seed: int) -> list[str]:
    hparams = dict(model.hparams)
    pl.seed_everything(seed, verbose=False)
    initial = type(model)(**{k: v for k, v in hparams.items() if not k.startswith("_")}).eval()
    alpha = model.governing.alpha.detach()
    return [
        f"Equation: `{model.governing.equation()}`",
        "",
        f"Exact zeros: {int((alpha == 0).sum())} of {alpha.numel()} coefficients.",
        "",
        f"L_G on {len(images)} test images: {governing_loss(model, images):.4g} trained, "
        f"{governing_loss(initial, images):.4g} at initialization (seed {seed}).",
    ]


def equation_comparison(first: pl.LightningModule, second: pl.LightningModule) -> list[str]:
    """PR-Net's learned coefficients of two seeds side by side, and how alike they are (issue 18, item 3)."""
    a, b = (dict(model.governing.coefficients()) for model in (first, second))
    va, vb = torch.tensor(list(a.values())), torch.tensor(list(b.values()))
    cosine = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
    support_a, support_b = {k for k, v in a.items() if v != 0}, {k for k, v in b.items() if v != 0}
    common = support_a & support_b
    same_sign = sum((a[k] > 0) == (b[k] > 0) for k in common)
    relative = float((va - vb).norm() / max(va.norm(), vb.norm()))
    top = {seed: sorted(c, key=lambda k: -abs(c[k]))[:3] for seed, c in (("seed 0", a), ("seed 1", b))}
    lines = ["| term | α, seed 0 | α, seed 1 |", "|---|---|---|"]
    lines += [f"| {term} | {a[term] + 0.0:.4g} | {b[term] + 0.0:.4g} |" for term in a]  # + 0.0: no "-0"
    return [
        *lines,
        "",
        f"Cosine similarity of the two α vectors {cosine:.3f}; ‖α₀ − α₁‖ / max ‖α‖ = {relative:.3f}; non-zero terms "
        f"{len(support_a)} and {len(support_b)}, {len(common)} in both (Jaccard {len(common) / max(1, len(support_a | support_b)):.2f}), "
        f"{same_sign} of them with the same sign; largest three terms: seed 0 {', '.join(top['seed 0'])}; "
        f"seed 1 {', '.join(top['seed 1'])}.",
    ]


def epoch_curve(source: Path, tag: str = "val/acc_top1") -> list[float]:
    """The scalar ``tag`` per epoch from a run's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    events_files = sorted(source.glob("events.out.tfevents.*"))  # a resumed run writes a second file
    if not events_files:
        raise SystemExit(
            f"bench_paper_scale.py: error: no TensorBoard logs (events.out.tfevents.*) in {str(source)!r}; "
            "give the run's log folder with --curve NAME=PATH"
        )
    for events_file in events_files:
        events = EventAccumulator(str(events_file))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            epochs = {p.step: p.value for p in events.Scalars("epoch")}
            for point in events.Scalars(tag):
                values[int(epochs.get(point.step, len(values)))] = point.value
    return [values[epoch] for epoch in sorted(values)]


def curves_figure(sources: dict[str, Path], output: Path) -> list[str]:
    """Validation accuracy per epoch of every run, and the validation forward NFE per epoch of the ODE models."""
    from matplotlib import pyplot as plt

    figure, (accuracy_axis, nfe_axis) = plt.subplots(1, 2, figsize=(11, 4))
    lines = [
        "| model | best val accuracy | epoch | validation accuracy per epoch | validation forward NFE per epoch |",
        "|---|---|---|---|---|",
    ]
    for index, (name, source) in enumerate(sources.items()):
        values = epoch_curve(source)
        if not values:
            raise SystemExit(
                f"bench_paper_scale.py: error: the TensorBoard logs in {str(source)!r} hold no val/acc_top1; give "
                "the run's log folder with --curve NAME=PATH"
            )
        nfe = epoch_curve(source, "val/nfe_forward")
        accuracy_axis.plot(range(1, len(values) + 1), values, marker="o", label=name, color=f"C{index}")
        if nfe:
            nfe_axis.plot(range(1, len(nfe) + 1), nfe, marker="o", label=name, color=f"C{index}")
        best = max(range(len(values)), key=values.__getitem__)
        lines.append(
            f"| {name} | {values[best]:.4f} | {best + 1} | {', '.join(f'{v:.4f}' for v in values)} | "
            f"{', '.join(f'{v:.1f}' for v in nfe) or '—'} |"
        )
    accuracy_axis.set(
        xlabel="epoch", ylabel="validation accuracy", title="MNIST, configs/mnist/*.yaml", ylim=(0.9, 1.0)
    )
    nfe_axis.set(xlabel="epoch", ylabel="forward NFE per validation batch", title="ODE blocks' function evaluations")
    for axis in (accuracy_axis, nfe_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    return [*lines, "", f"Figure: `{output.relative_to(REPO)}`"]


def _eps(epsilon: float) -> str:
    return f"eps{round(epsilon * 255, 4):g}"  # AdversarialEvaluation's metric label


def uses_adaptive_solver(model: pl.LightningModule) -> bool:
    return any(SOLVERS[block.solver_settings()["method"]].adaptive for block in find_ode_blocks(model))


def robustness_test(
    model: pl.LightningModule,
    data_dir: str,
    images: int,
    spsa_images: int,
    pgd_steps: int,
    gradient_solver: dict | None,
) -> dict[str, float]:
    """One ``trainer.test`` over the first ``images`` test images with the attacks (and, without a stand-in, OOD).

    Batches hold ``spsa_images`` images, so that SPSA attacks exactly the first batch.
    """
    batch_size = spsa_images
    batches = -(-images // batch_size)
    attacks = ["fgsm", "pgd"] if gradient_solver else ["fgsm", "pgd", "spsa"]
    callbacks: list[pl.Callback] = [
        AdversarialEvaluation(
            epsilons=EPSILONS,
            attacks=attacks,
            pgd_steps=pgd_steps,
            num_batches=batches,
            log_figure=False,
            spsa_num_batches=1,
            gradient_solver=gradient_solver,
        )
    ]
    if not gradient_solver:
        callbacks.append(OODEvaluation(num_batches=batches))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_test_batches=batches,
    )
    data = MNISTDataModule(data_dir=data_dir, download=False, batch_size=batch_size)
    return trainer.test(model, datamodule=data, verbose=False)[0]


def robustness_tables(
    models: dict[str, pl.LightningModule],
    data_dir: str,
    images: int,
    spsa_images: int,
    pgd_steps: int,
    gradient_solver: dict,
) -> list[str]:
    """Adversarial (Table 4 format) and out-of-distribution (Table 3 format) top-1 accuracy per model."""
    header = " | ".join(f"ε={e:g}" for e in EPSILONS)
    rule = "|---|" + "---|" * len(EPSILONS)
    tables = {
        attack: [f"| {attack} | {header} |", rule]
        for attack in (
            "FGSM",
            "PGD",
            "SPSA",
            "robust (min over attacks)",
            "FGSM, stand-in gradients",
            "PGD, stand-in gradients",
        )
    }
    ood = [f"| model | clean | {' | '.join(PERTURBATIONS)} |", "|---|---|" + "---|" * len(PERTURBATIONS)]
    masking: list[str] = []
    for name, model in models.items():
        result = robustness_test(model, data_dir, images, spsa_images, pgd_steps, None)
        for attack, key in (
            ("FGSM", "fgsm"),
            ("PGD", "pgd"),
            ("SPSA", "spsa"),
            ("robust (min over attacks)", "robust"),
        ):
            tables[attack].append(
                f"| {name} | " + " | ".join(f"{result[f'adv/{key}_{_eps(e)}/top1']:.4f}" for e in EPSILONS) + " |"
            )
        flagged = [f"{e:g}" for e in EPSILONS if result.get(f"adv/gradient_masking_{_eps(e)}", 0.0) > 0]
        masking.append(f"{name}: {'flagged at ε = ' + ', '.join(flagged) if flagged else 'not flagged'}")
        ood.append(
            f"| {name} | {result['adv/clean/top1']:.4f} | "
            + " | ".join(f"{result[f'ood/{p}/top1']:.4f}" for p in PERTURBATIONS)
            + " |"
        )
        if uses_adaptive_solver(model):
            stand_in = robustness_test(model, data_dir, images, spsa_images, pgd_steps, gradient_solver)
            for attack, key in (("FGSM, stand-in gradients", "fgsm"), ("PGD, stand-in gradients", "pgd")):
                tables[attack].append(
                    f"| {name} | " + " | ".join(f"{stand_in[f'adv/{key}_{_eps(e)}/top1']:.4f}" for e in EPSILONS) + " |"
                )
    lines = [
        f"Adversarial top-1 accuracy on the first {images} test images (SPSA: first {spsa_images}; PGD "
        f"{pgd_steps} steps of 2.5·ε/{pgd_steps} from a random start; SPSA 20 Adam steps, 64 samples, δ = 0.01). "
        f"Stand-in: white-box gradients through `{json.dumps(gradient_solver)}`, the attacked model keeping "
        f"its own solver (adaptive-solver models only).",
        "",
    ]
    for rows in tables.values():
        if len(rows) > 2:
            lines += [*rows, ""]
    lines += [
        "Gradient masking (an SPSA accuracy below every white-box one at the same ε): " + "; ".join(masking),
        "",
        f"Out-of-distribution top-1 accuracy on the same {images} images (Kim et al.'s perturbations: N(0, 0.1) "
        f"noise, 24×24 centre crop resized to 28×28, rotation up to 30°, brightness/contrast jitter 0.2):",
        "",
    ]
    return lines + ood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"a trained checkpoint per model, NAME one of {NAMES}",
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["accuracy", "inference", "equation", "curves"],
        choices=["accuracy", "inference", "equation", "curves", "robustness"],
    )
    parser.add_argument(
        "--curve",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a run's TensorBoard folder; default: the folder of the checkpoint's run",
    )
    parser.add_argument("--robust-images", type=positive_int, default=1000, help="test images attacked and perturbed")
    parser.add_argument("--spsa-images", type=positive_int, default=100, help="of those, the ones SPSA also attacks")
    parser.add_argument("--pgd-steps", type=positive_int, default=20)
    parser.add_argument(
        "--gradient-solver",
        type=json.loads,
        default={"method": "rk4", "step_size": 0.1},
        help="JSON solver settings of the stand-in for white-box gradients of adaptive-solver models",
    )
    parser.add_argument("--rounds", type=positive_int, default=11)
    parser.add_argument("--seed", type=int, default=0, help="the config's seed_everything (the initialization)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    check_output(parser, args.output)
    # every table but the curves is measured on the checkpoints' models: without one, it would be a bare header
    if not args.checkpoint and set(args.tables) - {"curves"}:
        parser.error(
            f"--tables {' '.join(t for t in args.tables if t != 'curves')} need the models: give --checkpoint NAME=PATH"
        )
    if "curves" in args.tables and not args.checkpoint and not args.curve:
        parser.error("--tables curves needs runs: give --curve NAME=PATH (or --checkpoint NAME=PATH)")
    torch.set_num_threads(args.threads)
    paths = named_checkpoints(parser, "--checkpoint", args.checkpoint, NAMES)
    curves = {
        **{name: path.parent.parent for name, path in paths.items()},
        **dict(named_path(parser, "--curve", item, NAMES) for item in args.curve),
    }
    if "equation" in args.tables and not {"prnet", "prnet_seed1"} & set(paths):
        parser.error("--tables equation needs a PR-Net: give --checkpoint prnet=PATH (or prnet_seed1=PATH)")
    if "curves" in args.tables:  # checked before the work: the figure is only written once every run has a curve
        for name, folder in curves.items():
            if not any(folder.glob("events.out.tfevents.*")):
                parser.error(
                    f"no TensorBoard logs (events.out.tfevents.*) for {name} in {str(folder)!r}; give the run's log "
                    f"folder with --curve {name}=PATH"
                )
    models = {name: load_model(path) for name, path in paths.items()}
    with missing_data_exits(args.data_dir):
        images = test_images(args.data_dir, 1000)[0] if {"inference", "equation"} & set(args.tables) else None
        main_tables(args, models, curves, images)


def main_tables(
    args: argparse.Namespace,
    models: dict[str, pl.LightningModule],
    curves: dict[str, Path],
    images: torch.Tensor | None,
) -> None:
    sections: list[str] = [
        f"### MNIST at paper scale, from the trained checkpoints ({datetime.date.today()})",
        "",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s).",
        "",
        f"Command: `python bench/bench_paper_scale.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    if "accuracy" in args.tables:
        sections += [*accuracy_table(models, args.data_dir), ""]
    if "inference" in args.tables:
        sections += [*inference_table(models, images, args.rounds), ""]
    if "equation" in args.tables:
        for name, seed in (("prnet", args.seed), ("prnet_seed1", 1)):
            if name in models:
                sections += [f"{name}:", "", *equation_table(models[name], images[:256], seed), ""]
        if "prnet" in models and "prnet_seed1" in models:
            sections += [*equation_comparison(models["prnet"], models["prnet_seed1"]), ""]
    if "curves" in args.tables:
        sections += [*curves_figure(curves, REPO / "bench" / "mnist_paper_scale_val_accuracy.png"), ""]
    if "robustness" in args.tables:
        sections += [
            *robustness_tables(
                models, args.data_dir, args.robust_images, args.spsa_images, args.pgd_steps, args.gradient_solver
            ),
            "",
        ]
    text = "\n".join(sections)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
