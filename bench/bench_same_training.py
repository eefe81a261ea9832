"""Does a refactor change training? Train each config for N steps in this tree and in an earlier revision, compare weights.

Each config is built by the real CLI of each tree (from that tree's own copy of the config file), seeded by the
config, and trained for ``--steps`` optimizer steps (at most one epoch; ``--steps 0``: not at all, which needs no
data), one process per tree with one thread; the table says whether the final weights are bitwise identical, with
the last training loss of each. The earlier revision is checked out in a temporary git worktree, removed afterwards.

    python bench/bench_same_training.py --rev 844906d --steps 30 --data-dir ../shared/data \
        --configs configs/quickstart.yaml configs/mnist/rknet.yaml configs/mnist/odenet.yaml configs/mnist/prnet.yaml
    python bench/bench_same_training.py --rev 844906d --steps 0 --configs configs/*.yaml configs/*/*.yaml configs/*/*/*.yaml
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import check_output, non_negative_int

REPO = Path(__file__).resolve().parents[1]


def worker(configs: list[str], steps: int, data_dir: str | None) -> None:
    """Train each config for ``steps`` steps (0: build only) with the ``lightning_pdenets`` on ``sys.path``.

    Prints one JSON line per config: the hash of the final weights, the last training loss and the steps taken.
    """
    import torch

    torch.set_num_threads(1)
    from lightning_pdenets.cli import build_cli

    for config in configs:
        args = [
            "--config",
            config,
            "--trainer.max_steps",
            str(max(steps, 1)),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
        ]
        if data_dir and _takes_data_dir(config):
            args += ["--data.init_args.data_dir", data_dir, "--data.init_args.download", "false"]
        try:
            cli = build_cli(args, run=False)
            if steps > 0:
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        except (Exception, SystemExit) as error:  # reported in the table, the other configs go on
            print(json.dumps({"config": config, "error": f"{type(error).__name__}: {error}".splitlines()[0]}))
            continue
        digest = hashlib.sha1()
        for key, value in cli.model.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
        loss = cli.trainer.callback_metrics.get("train/loss_step")
        print(
            json.dumps(
                {
                    "config": config,
                    "hash": digest.hexdigest(),
                    "loss": None if loss is None else float(loss),
                    "steps": cli.trainer.global_step,
                    "parameters": sum(p.numel() for p in cli.model.parameters()),
                }
            ),
            flush=True,
        )


def _takes_data_dir(config: str) -> bool:
    """Whether the config's datamodule reads files (and so takes ``data_dir``)."""
    class_path = (yaml.safe_load(Path(config).read_text()).get("data") or {}).get("class_path", "")
    module, _, name = class_path.rpartition(".")  # not the package's import_class: older trees lack it
    return bool(module) and "data_dir" in inspect.signature(getattr(importlib.import_module(module), name)).parameters


def run_in(tree: Path, configs: list[str], steps: int, data_dir: str | None) -> dict[str, dict]:
    """The worker's records of ``configs`` in ``tree`` (one process), by config path relative to the tree."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--steps",
        str(steps),
        "--worker",
        *[str(tree / config) for config in configs],
    ]
    if data_dir:
        command += ["--data-dir", data_dir]
    with tempfile.TemporaryDirectory() as logs:  # the runs' logs and checkpoints land here, outside both trees
        result = subprocess.run(command, cwd=logs, env=environment, capture_output=True, text=True)
    records = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records[str(Path(record["config"]).relative_to(tree))] = record
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="the earlier git revision to compare with")
    parser.add_argument("--configs", nargs="+")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # configs, in the tree on PYTHONPATH
    parser.add_argument(
        "--steps",
        type=non_negative_int,
        default=30,
        help="optimizer steps per config, at most one epoch; 0: "
        "compare the weights at initialization only (no data needed)",
    )
    parser.add_argument("--data-dir", default=None, help="for configs of real datasets (absolute or relative to here)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    check_output(parser, args.output)
    if args.worker:
        worker(args.worker, args.steps, args.data_dir)
        return
    if not args.rev or not args.configs:
        parser.error("--rev and --configs are required")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    args.configs = [c for c in args.configs if "model" in (yaml.safe_load(Path(c).read_text()) or {})]  # not presets
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        earlier = Path(scratch) / "earlier"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(earlier), args.rev], cwd=REPO, check=True, capture_output=True
        )
        try:
            before = run_in(earlier, args.configs, args.steps, data_dir)
            after = run_in(REPO, args.configs, args.steps, data_dir)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=REPO, capture_output=True)
    for config in args.configs:
        old, new = before.get(config, {"error": "no record"}), after.get(config, {"error": "no record"})
        same = "hash" in old and old.get("hash") == new.get("hash")
        rows.append(
            f"| {config} | {old.get('parameters', '-')} | {old.get('steps', '-')} | "
            f"{old.get('loss', old.get('error'))} | {new.get('loss', new.get('error'))} | "
            f"{'**yes**' if same else 'no'} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"### Same {'training' if args.steps else 'weights at initialization'} before and after ({datetime.date.today()}, {args.rev} vs {head}{' + working tree' if dirty else ''})",
            "",
            f"Machine: {os.cpu_count()} CPU cores visible, {platform.python_implementation()} {platform.python_version()}, "
            f"1 thread per process; seed of each config; "
            + (
                f"up to {args.steps} optimizer steps per config (one epoch at most)."
                if args.steps
                else "weights at initialization (no training)."
            ),
            "",
            f"Command: `python bench/bench_same_training.py --rev {args.rev} --steps {args.steps}"
            f"{' --data-dir ' + args.data_dir if args.data_dir else ''} --configs {' '.join(args.configs)}`",
            "",
            "| config | parameters | steps | last training loss before | after | weights bitwise identical |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
