"""Cost of each robustness callback per test batch, relative to the plain test forward pass.

Model: the isometric MobileNetV3 of Table 3 (width 1, 200 classes) on a Tiny-ImageNet-shaped
batch (64×64, standardized random pixels), in eval mode. For each callback the work its
``on_test_batch_end`` does on one batch is timed against the plain forward pass of that batch, in
alternating rounds (the order flips every round, so that load drifts hit both alike); the cost is
the median of the per-round ratios. ``InferenceTimer`` only copies the batch per test batch; its
one-off cost at the end of the test epoch ((warm-up + repeats) × 1,000 images) is reported separately.

    flock /tmp/pdenets-cpu.lock python bench/bench_robustness.py --batch-size 8 --rounds 3 \
        --timer-images 100 --output bench/results_robustness.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from _common import check_output, positive_int
from tqdm import tqdm

from lightning_pdenets.architectures import mobilenetv3_isometric, odenet_mobilenet
from lightning_pdenets.callbacks import AdversarialEvaluation, InferenceTimer, OODEvaluation

MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--model", default="mobilenetv3", choices=["mobilenetv3", "odenet"])
    parser.add_argument(
        "--timer-images", type=positive_int, default=1000, help="InferenceTimer batch (the paper: 1,000)"
    )
    parser.add_argument("--output", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args()
    check_output(parser, args.output)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    factory = mobilenetv3_isometric if args.model == "mobilenetv3" else odenet_mobilenet
    model = factory(num_classes=200).eval()
    pixels = torch.rand(args.batch_size, 3, 64, 64)
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.randint(0, 200, (args.batch_size,))

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def adversarial(**kwargs) -> Callable[[], None]:
        callback = AdversarialEvaluation(mean=MEAN, std=STD, **kwargs)
        return lambda: callback.attack_batch(model, x, y)

    def ood(perturbation: str) -> Callable[[], None]:
        callback = OODEvaluation(perturbations=[perturbation], mean=MEAN, std=STD)
        return lambda: callback.evaluate_batch(model, x)

    timer = InferenceTimer()
    cases = {
        "AdversarialEvaluation, FGSM, 1 ε": adversarial(epsilons=["1/255"], attacks=["fgsm"]),
        "AdversarialEvaluation, PGD-10, 1 ε": adversarial(epsilons=["1/255"], attacks=["pgd"], pgd_steps=10),
        "AdversarialEvaluation, default (FGSM + PGD-10, 3 ε)": adversarial(),
        **{f"OODEvaluation, {p}": ood(p) for p in ("gaussian_noise", "center_crop", "rotation", "color_jitter")},
        "InferenceTimer (per batch: collect images)": lambda: timer.on_test_batch_end(None, None, None, (x, y), 0),
    }
    forward()  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    base_times: list[float] = []
    for round_index in tqdm(range(args.rounds), desc="rounds"):
        for name, work in cases.items():
            timer._images, timer._collected = [], 0
            if round_index % 2:
                t_case, t_base = seconds(work), seconds(forward)
            else:
                t_base, t_case = seconds(forward), seconds(work)
            ratios[name].append(t_case / t_base)
            base_times.append(t_base)
    base = statistics.median(base_times)
    n = args.timer_images
    one_thousand = torch.cat([x] * (-(-n // args.batch_size)))[:n]
    timing = InferenceTimer(batch_size=n, num_warmup=1, num_repeats=3)
    start = time.perf_counter()
    timed_passes = timing.time_model(model, one_thousand)
    t_epoch_end = time.perf_counter() - start

    lines = [
        f"# Robustness callbacks: cost per test batch ({datetime.date.today()})",
        "",
        f"Machine: 2-core CPU container (shared), {args.threads} torch threads. Model: isometric {args.model} "
        f"width 1 (Table 3), batch {args.batch_size} of 64×64 images, eval mode.",
        "",
        f"Command: `flock /tmp/pdenets-cpu.lock python bench/bench_robustness.py --model {args.model} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} --timer-images {n} --output ...`",
        "",
        f"Plain test forward pass of one batch: {base * 1e3:.0f} ms (median).",
        "",
        "| callback work on one test batch | × plain forward (median) | min–max over rounds |",
        "|---|---:|---:|",
    ]
    for name, values in ratios.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    lines += [
        "",
        f"InferenceTimer at the end of the test epoch: 1 warm-up + 3 timed passes on {n} images took "
        f"{t_epoch_end:.1f} s in all (median timed pass {statistics.median(timed_passes):.2f} s), once per test run.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
