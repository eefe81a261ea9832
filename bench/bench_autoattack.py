"""AutoAttack (standard, L∞) on the trained MNIST checkpoints, through ``AdversarialEvaluation`` (issue 30, item 2).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020: APGD-CE, APGD-T, FAB-T (100 iterations each) and Square (5,000 queries), each stage on the images the
earlier ones left correctly classified, through torchattacks 3.5.1 (the ``autoattack`` extra). Huang et al.
(MSML 2022): adaptive solvers can mask gradients, so ODE-Net is also attacked with the gradient-based stages
differentiating a fixed-step stand-in (``--gradient-solver``), the attacked model keeping its dopri5.

The images are the first ``--images`` MNIST test images, in the order of ``MNISTDataModule``'s test loader: the
same 1,000 as the FGSM/PGD/SPSA rows of BENCHMARKS.md ("Robustness of the trained models"). Batches are attacked
in order, every ε per batch, and each (batch, ε) is appended to ``--raw`` (JSON lines) as soon as it is done, so a
partial run still gives rows on the first N images; a rerun skips the (batch, ε) already in ``--raw``. ``--shard K/N``
attacks only the batches whose index is K modulo N, so N processes (one per core) can append to the same ``--raw``.

``--existing`` runs FGSM and PGD-20 (the earlier rows' attacks and settings) on the same images instead, so that
the gap is measured image for image; ``--pgd-steps 100`` with it gives PGD-100. The report's masking flag is the
callback's AutoAttack rule (Square lowers the accuracy the gradient-based stages left; ``masking_margin`` 0).

    nice -n 19 env OMP_NUM_THREADS=1 python bench/bench_autoattack.py --data-dir ../shared/data \\
        --checkpoint resnet=bench/checkpoints/mnist/resnet.ckpt --images 50 --raw bench/logs/autoattack/resnet.jsonl
    python bench/bench_autoattack.py --report bench/logs/autoattack/*.jsonl --output bench/results_autoattack.md

BENCHMARKS.md ("AutoAttack-grade robustness (issue 30, item 2)") lists every command that made its table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import (  # noqa: E402
    MODEL_CLASSES,
    check_output,
    load_model,
    missing_data_exits,
    named_checkpoints,
    positive_int,
)

from lightning_pdenets.callbacks import AdversarialEvaluation  # noqa: E402
from lightning_pdenets.data import MNISTDataModule  # noqa: E402

EPSILONS = (0.1, 0.2, 0.3)
STAGES = ("autoattack-apgd-ce", "autoattack-apgd-t", "autoattack-fab-t", "autoattack")
EXISTING = {
    # BENCHMARKS.md, "Robustness of the trained models (item 4)", robust (min over FGSM, PGD-20 and SPSA) top-1
    # accuracy on the same first 1,000 test images (SPSA on the first 50), 2026-11-29.
    "resnet": {0.1: 0.5730, 0.2: 0.0030, 0.3: 0.0000},
    "rknet": {0.1: 0.5440, 0.2: 0.0100, 0.3: 0.0000},
    "odenet": {0.1: 0.5140, 0.2: 0.0100, 0.3: 0.0000},
    "prnet": {0.1: 0.5410, 0.2: 0.0010, 0.3: 0.0000},
}
EXISTING_STAND_IN = {"odenet": {0.1: 0.5100, 0.2: 0.0100, 0.3: 0.0000}}  # PGD through the rk4 stand-in, same table


def test_batches(data_dir: str, images: int, batch_size: int):
    data = MNISTDataModule(data_dir=data_dir, download=False, batch_size=batch_size)
    data.setup("test")
    loader = torch.utils.data.DataLoader(data.test_set, batch_size=batch_size, shuffle=False)
    seen = 0
    for x, y in loader:
        if seen >= images:
            return
        x, y = x[: images - seen], y[: images - seen]
        seen += len(y)
        yield x, y
    return


def shard_spec(text: str) -> tuple[int, int]:
    """``K/N`` → (K, N) with 0 ≤ K < N."""
    shard, _, shards = text.partition("/")
    try:
        shard_index, shard_count = int(shard), int(shards)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 0/2; got {text!r}") from None
    if not 0 <= shard_index < shard_count:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N; got {text!r}")
    return shard_index, shard_count


def run(args: argparse.Namespace) -> None:
    ((name, checkpoint),) = args.checkpoints.items()
    path = str(checkpoint)
    model = load_model(checkpoint)
    data = MNISTDataModule(data_dir=args.data_dir, download=False)
    stats = (tuple(data.mean), tuple(data.std))  # the inputs' normalization: ε is in pixel units
    suite = ("existing" if args.pgd_steps == 20 else f"pgd{args.pgd_steps}") if args.existing else "autoattack"
    # --existing: FGSM and PGD-20 exactly as BENCHMARKS' earlier rows (bench_paper_scale.py: 20 steps of 2.5·ε/20
    # from a random start, seed = batch index, batches of 50), on the same images as the AutoAttack rows
    callback = AdversarialEvaluation(
        epsilons=list(args.epsilons),
        attacks=["fgsm", "pgd"] if args.existing else ["autoattack"],
        mean=stats[0],
        std=stats[1],
        pgd_steps=args.pgd_steps,
        autoattack_steps=args.steps,
        autoattack_queries=args.queries,
        gradient_solver=args.gradient_solver,
        log_figure=False,
    )
    keys = ("fgsm", "pgd", "robust") if args.existing else STAGES
    raw = Path(args.raw)
    raw.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if raw.exists():
        for line in raw.read_text().splitlines():
            record = json.loads(line)
            done.add((record["batch"], record["epsilon"]))
    solver = "own" if args.gradient_solver is None else json.dumps(args.gradient_solver, sort_keys=True)
    shard, shards = args.shard
    for batch, (x, y) in enumerate(test_batches(args.data_dir, args.images, args.batch_size)):
        if batch % shards != shard:
            continue
        for epsilon in args.epsilons:
            if (batch, epsilon) in done:
                continue
            callback.epsilons = [epsilon]
            start = time.perf_counter()
            outputs = callback.attack_batch(model, x, y, seed=batch)
            seconds = time.perf_counter() - start
            label = f"eps{round(epsilon * 255, 4):g}"
            correct = {"clean": (outputs["clean"].argmax(1) == y)}
            correct.update({key: outputs[f"{key}_{label}"].argmax(1) == y for key in keys})
            final = correct[keys[-1]]
            record = {
                "suite": suite,
                "model": name,
                "checkpoint": path,
                "gradient_solver": solver,
                "batch": batch,
                "epsilon": epsilon,
                "images": len(y),
                "first_image": batch * args.batch_size,
                "steps": args.steps,
                "queries": args.queries,
                "seconds": round(seconds, 2),
                "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.node()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s)",
                **{f"correct_{key}": int(value.sum()) for key, value in correct.items()},
                "robust_images": [int(i) for i in (final.nonzero().flatten() + batch * args.batch_size)],
            }
            with raw.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(
                f"{name} [{suite}, {solver}] batch {batch} ε={epsilon:g}: clean {record['correct_clean']}/{len(y)}, "
                f"{keys[-1]} {int(final.sum())} ({seconds:.0f} s)",
                flush=True,
            )


def coverage(images: set[int]) -> str:
    """``1000 (first)`` for the first N test images, ``740 (of the first 1000)`` where sharded runs left gaps."""
    if images == set(range(len(images))):
        return f"{len(images)} (first)"
    return f"{len(images)} (of the first {max(images) + 1})"


def report(paths: list[str]) -> str:
    """Markdown table: per model, gradient route and ε, AutoAttack's stages against FGSM/PGD on the same images."""
    records = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    cells: dict[tuple[str, str, str, float], dict] = {}
    for record in records:
        key = (record.get("suite", "autoattack"), record["model"], record["gradient_solver"], record["epsilon"])
        cell = cells.setdefault(key, defaultdict(float, robust_images=set(), images_seen=set(), utc=[], settings=set()))
        cell["images"] += record["images"]
        cell["images_seen"].update(range(record["first_image"], record["first_image"] + record["images"]))
        cell["robust_images"].update(record["robust_images"])
        cell["seconds"] += record["seconds"]
        cell["utc"].append(record["utc"])
        cell["settings"].add((record["steps"], record["queries"], record["machine"]))
        for field, value in record.items():
            if field.startswith("correct_"):
                cell[field[len("correct_") :]] += value
    lines = [
        "| model | gradients through | ε | images | clean | FGSM / PGD-20 (best existing, same images) | APGD-CE "
        "| + APGD-T | + FAB-T | **AutoAttack** (+ Square) | gap: existing − AutoAttack | Square's gain (masking flag) "
        "| existing on 1,000 (earlier table) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for (suite, model, solver, epsilon), cell in sorted(
        cells.items(), key=lambda item: (item[0][1], item[0][2], item[0][3])
    ):
        if suite != "autoattack":
            continue
        n = cell["images"]
        acc = {field: cell[field] / n for field in ("clean", *STAGES)}
        existing = cells.get(("existing", model, solver, epsilon)) or cells.get(("existing", model, "own", epsilon))
        if existing is not None and existing["images_seen"] >= cell["images_seen"]:
            # restrict the existing attacks to the AutoAttack images
            robust_existing = {i for i in existing["robust_images"] if i in cell["images_seen"]}
            best = len(robust_existing) / n
            same = f"{best:.4f}"
            gap = f"{(best - acc['autoattack']) * 100:+.1f} pp"
            missed = cell["robust_images"] - robust_existing
            if missed:
                notes.append(
                    f"{model} ({solver}) ε={epsilon:g}: {len(missed)} image(s) AutoAttack left robust were "
                    f"fooled by FGSM/PGD: {sorted(missed)}"
                )
        else:
            same, gap = "—", "—"
        square = acc["autoattack-fab-t"] - acc["autoattack"]
        # {"adjoint": false} differentiates the model's own dopri5 by backpropagation: the own-solver figure applies
        own_forward = solver == "own" or set(json.loads(solver)) <= {"adjoint"}
        earlier = (EXISTING if own_forward else EXISTING_STAND_IN).get(model, {}).get(epsilon)
        through = "own solver" if solver == "own" else f"`{solver}`"
        lines.append(
            f"| {model} | {through} | {epsilon:g} | {coverage(cell['images_seen'])} | {acc['clean']:.4f} | {same} | "
            f"{acc['autoattack-apgd-ce']:.4f} | {acc['autoattack-apgd-t']:.4f} | {acc['autoattack-fab-t']:.4f} | "
            f"**{acc['autoattack']:.4f}** | {gap} | {square * 100:.1f} pp ({'raised' if square > 0 else 'not raised'}) | "
            f"{'—' if earlier is None else f'{earlier:.4f}'} |"
        )
    lines += ["", "Runs (UTC span of the recorded batches; attack time summed over batches):", ""]
    for (suite, model, solver, epsilon), cell in sorted(
        cells.items(), key=lambda item: (item[0][1], item[0][2], item[0][0], item[0][3])
    ):
        what = {"existing": "FGSM + PGD-20"}.get(suite, suite.upper())
        settings = "; ".join(
            f"{what if suite != 'autoattack' else f'{s} iterations, {q} Square queries'}, {m}"
            for s, q, m in sorted(cell["settings"])
        )
        lines.append(
            f"- {suite}, {model}, gradients through {solver}, ε={epsilon:g}: {min(cell['utc'])} – "
            f"{max(cell['utc'])}, {cell['seconds'] / 60:.1f} min ({settings})"
        )
    if notes:
        lines += ["", "Images robust to AutoAttack but fooled by an existing attack:", ""] + [f"- {n}" for n in notes]
    lines += paired_comparison(cells)
    return "\n".join(lines) + "\n"


def _paired_row(label: str, a: dict, b: dict) -> str | None:
    """One table row: two AutoAttack runs image for image on the images both attacked, with an exact two-sided
    sign test on the images only one of them leaves robust; None when neither leaves any."""
    from scipy.stats import binomtest

    common = a["images_seen"] & b["images_seen"]
    robust_a, robust_b = a["robust_images"] & common, b["robust_images"] & common
    if not robust_a | robust_b:
        return None  # both at 0: nothing to compare
    only_a, only_b = len(robust_a - robust_b), len(robust_b - robust_a)
    p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return (
        f"| {label} | {len(common)} | {len(robust_a) / len(common):.4f} / {len(robust_b) / len(common):.4f} | "
        f"{only_a} / {only_b} | {p:.2g} |"
    )


def paired_comparison(cells: dict) -> list[str]:
    """Per ε, every pair of models image for image on the images both were attacked on (each model's AutoAttack run
    that covers the most images); then every pair of gradient routes of one model (the masking check)."""
    lines: list[str] = []
    header = ["| {} | images | accuracy | survive only for the first / second | p |", "|---|---|---|---|---|"]
    for epsilon in sorted({key[3] for key in cells}):
        runs = {
            (model, solver): cell
            for (suite, model, solver, eps), cell in cells.items()
            if suite == "autoattack" and eps == epsilon
        }
        widest: dict[str, tuple[str, dict]] = {}
        for (model, solver), cell in runs.items():
            if model not in widest or len(cell["images_seen"]) > len(widest[model][1]["images_seen"]):
                widest[model] = (solver, cell)
        models = sorted(widest)
        rows = [
            _paired_row(
                f"{first} ({widest[first][0]}) vs {second} ({widest[second][0]})", widest[first][1], widest[second][1]
            )
            for index, first in enumerate(models)
            for second in models[index + 1 :]
        ]
        routes = [
            _paired_row(f"{model}: {first} vs {second}", runs[model, first], runs[model, second])
            for model in models
            for index, first in enumerate(sorted(s for m, s in runs if m == model))
            for second in sorted(s for m, s in runs if m == model)[index + 1 :]
        ]
        for kept, text, what in (
            ([r for r in rows if r], "models (gradients through)", "the images both models were attacked on"),
            (
                [r for r in routes if r],
                "model: gradients through",
                "the images both gradient routes of one model "
                "were attacked on (the attacked model keeps its own solver; a route that masks gradients leaves more "
                "images robust)",
            ),
        ):
            if kept:
                lines += [
                    "",
                    f"Paired, ε={epsilon:g}: AutoAttack accuracy on {what}, the images only one run leaves robust, "
                    "and the exact two-sided sign test on those:",
                    "",
                    header[0].format(text),
                    header[1],
                    *kept,
                ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--checkpoint", metavar="NAME=PATH", help=f"the model to attack, NAME one of {', '.join(MODEL_CLASSES)}"
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--images", type=positive_int, default=1000, help="the first N MNIST test images")
    parser.add_argument("--batch-size", type=positive_int, default=50)
    parser.add_argument(
        "--steps", type=positive_int, default=100, help="APGD-CE/APGD-T/FAB-T iterations (Croce & Hein: 100)"
    )
    parser.add_argument("--queries", type=positive_int, default=5000, help="Square queries (Croce & Hein: 5,000)")
    parser.add_argument(
        "--gradient-solver",
        type=json.loads,
        default=None,
        help='JSON stand-in solver for the gradient-based stages, e.g. \'{"method": "rk4", "step_size": 0.1}\'',
    )
    parser.add_argument(
        "--existing",
        action="store_true",
        help="run FGSM and PGD-20 (the earlier rows' attacks) instead of AutoAttack, on the same images",
    )
    parser.add_argument(
        "--pgd-steps",
        type=positive_int,
        default=20,
        help="with --existing: PGD iterations (20: the earlier rows; other values are recorded as pgd<N>)",
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument(
        "--shard",
        type=shard_spec,
        default=(0, 1),
        metavar="K/N",
        help="attack only the batches whose index is K modulo N (one process per core)",
    )
    parser.add_argument("--raw", help="JSON-lines file the per-batch results are appended to")
    parser.add_argument("--report", nargs="+", metavar="RAW", help="write the Markdown table from these raw files")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    check_output(parser, args.output)
    torch.set_num_threads(args.threads)
    if args.report:
        for path in args.report:
            if not Path(path).is_file():
                parser.error(f"--report {path!r}: no such file")
        if not any(line.strip() for path in args.report for line in Path(path).read_text().splitlines()):
            parser.error(f"--report {' '.join(args.report)}: no records to report (the files are empty)")
        text = report(args.report)
        print(text)
        if args.output:
            # the hand-written header (date, machine, which runs) above the table survives regeneration
            old = args.output.read_text() if args.output.exists() else ""
            header = old[: old.find("| model |")] if "| model |" in old else ""
            args.output.write_text(header + text)
        return
    if not args.checkpoint or not args.raw:
        parser.error("give --checkpoint NAME=PATH and --raw FILE (or --report RAW ...)")
    args.checkpoints = named_checkpoints(parser, "--checkpoint", [args.checkpoint])
    with missing_data_exits(args.data_dir):
        run(args)


if __name__ == "__main__":
    main()
