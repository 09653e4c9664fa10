"""What a recorded figure needs beside it: the commit it came from and the processor it ran on."""

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from . import REPO


def git_commit(paths: list[str]) -> str:
    """Short HEAD, flagged when `paths` (what the measurement runs) have uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", *paths], capture_output=True, text=True
        ).stdout.strip()
        return commit + (f" + uncommitted changes in {', '.join(paths)}" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """`model name` from /proc/cpuinfo, with the widest SIMD extension its flags list."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    simd = next(
        (label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), None
    )
    return f"{name} ({simd})" if simd else name


def command_line(name: str, argv: list[str] | None = None) -> str:
    """The command that started this run, to type again: `python scripts/<name>.py ARGS` when run through the
    script (its path relative to the project when inside it), `sam3d-<name> ARGS` through the entry point;
    `argv`, when main() was given its arguments, instead of the process's."""
    prog = Path(sys.argv[0])
    args = sys.argv[1:] if argv is None else list(argv)
    entry_point = f"sam3d-{name.replace('_', '-')}"
    if prog.name == entry_point:
        head = [entry_point]
    elif prog.suffix == ".py" and prog.stem == name:
        path = prog.resolve()
        head = ["python", str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(prog)]
    else:  # main() called from Python (a test, a notebook)
        head = ["python", f"scripts/{name}.py"]
    return " ".join([*head, *map(shlex.quote, args)])


def report_header(name: str, timed_code: list[str], gpu_name: str | None = None, argv: list[str] | None = None) -> str:
    """The markdown header of a measurement by the command `name`: date, command, commit (of `timed_code`),
    hardware, software, load."""
    import torch

    hw = f"{cpu_model()}, {os.cpu_count()} logical CPUs visible, torch.get_num_threads() = {torch.get_num_threads()}"
    if gpu_name:
        hw += f"; GPU {gpu_name} (CUDA {torch.version.cuda})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join(
        [
            f"## {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            "",
            f"* command: `{command_line(name, argv)}`",
            f"* commit: {git_commit(timed_code)}",
            f"* hardware: {hw}",
            f"* software: torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
            f"* 1-min load average before the run: {load:.2f}",
        ]
    )
