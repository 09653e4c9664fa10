"""Compare trained variants of a model on held-out targets under several click protocols (an ablation).

    python scripts/ablation.py --config configs/ablations/segsam3d.yaml --train --out runs/ablation_segsam3d/eval

--train first trains every variant whose run has not ended (scripts/train.py; an interrupted run resumes), so one
command is one whole experiment. Writes OUT/results.csv (rows of scripts/evaluate.py plus `set` and `protocol`),
OUT/summary.md (Dice and HD95 after the spec's `report_clicks`, per set, protocol and variant) and one
OUT/dice_<protocol>.png per protocol the spec's `plots` names. Spec format: sam3d.evaluation.ablation.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from sam3d.evaluation.ablation import load_spec, run_ablation, train_missing, write_ablation

from . import REPO
from .provenance import command_line, cpu_model, git_commit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="ablation spec YAML (configs/ablations/...)")
    ap.add_argument("overrides", nargs="*", help="key.path=value, e.g. clicks=3")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--train", action="store_true", help="train the variants whose run has not ended first")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (evaluation)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    spec = load_spec(args.config, args.overrides)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    trained = train_missing(spec, REPO) if args.train else []
    rows = run_ablation(spec, REPO, device=args.device, progress=not args.quiet)
    import torch

    meta = {
        "command": command_line("ablation", argv),
        "commit": git_commit(["lib/sam3d", "configs"]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
        f"device {args.device}",
        "trained in this run": ", ".join(trained) or "none (existing checkpoints)",
        "wall time": f"{time.perf_counter() - t0:.0f} s",
    }
    paths = write_ablation(rows, Path(args.out), spec, meta)
    print(f"{len(rows)} rows -> " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
