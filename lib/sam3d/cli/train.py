"""Train a model from a recipe: `python scripts/train.py --config configs/train/<recipe>.yaml [key.path=value ...]`.

Several processes: `torchrun --nproc-per-node N scripts/train.py --config ...` (NCCL on GPUs, gloo on CPU), or
the same command with `--nproc-per-node N` (the processes are spawned through ignite.distributed). The global
batch (`train.batch_size`) is the same however many processes run it. Re-running a finished or interrupted
recipe resumes from `<output>/state.pt`. `model.init_checkpoint` and `auto.sam_checkpoint` take a path or the
name of published weights installed by `bash scripts/setup.sh fetch NAME` (sam_med3d_turbo, sam_vit_b).
"""

import argparse
import json
import os
import sys

from . import REPO


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML (configs/train/...)")
    ap.add_argument("overrides", nargs="*", help="key.path=value (YAML value), e.g. train.steps=10 output=runs/x")
    ap.add_argument("--nproc-per-node", type=int, default=None, help="spawn this many processes (without torchrun)")
    ap.add_argument("--backend", default="auto", help="auto (nccl with CUDA, else gloo), nccl, gloo or none")
    ap.add_argument("--root", default=str(REPO), help="relative paths of the recipe resolve against this folder")
    args = ap.parse_args(argv)

    import torch
    from ignite import distributed as idist

    from sam3d.engine.weights_registry import resolve_recipe
    from sam3d.training import load_recipe, train

    # model.init_checkpoint / auto.sam_checkpoint may name published weights (`bash scripts/setup.sh fetch NAME`)
    recipe = resolve_recipe(load_recipe(args.config, args.overrides))
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    under_torchrun = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    nproc = args.nproc_per_node if not under_torchrun else None
    if backend == "none" or (not under_torchrun and (nproc or 1) == 1):
        backend, nproc = None, None
    result = {}

    def run(local_rank):
        out = train(local_rank, recipe, args.root)
        if idist.get_rank() == 0:
            result.update(out)
            print(json.dumps(out, default=str))

    with idist.Parallel(backend=backend, nproc_per_node=nproc) as parallel:
        parallel.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
