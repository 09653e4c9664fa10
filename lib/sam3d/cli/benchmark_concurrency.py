"""Click and /info latency under concurrent annotators: p50/p95 for 1, 4 and 16 annotators clicking at once.

    python scripts/benchmark_concurrency.py --data ../shared/data/totalseg_ct --annotators 1 4 16 --clicks 5 \\
        --out runs/benchmark_concurrency

Starts the sam3d app under `monailabel start_server` (the app's defaults, changed with `--conf KEY VALUE`) on a
datastore of copies of the case's image, one per annotator of each round, so that every annotator starts on an
image of its own as after `/activelearning`. Or targets a running server (`--url`, `--image ID`: every
annotator then clicks on that one image). Each simulated annotator clicks `--clicks` times on its structure of
the case's label (`center` protocol, sam3d.data.clicks: each click follows the last answer), sending every click
so far as Slicer does, and waits `--think` seconds between clicks. A click refused with 429 is sent again after
its Retry-After; a click's latency is the annotator's wait, from the first try until the mask is back. A prober
asks `/info` every `--probe` seconds meanwhile. A server that requires the API token gets it from
`SAM3D_API_TOKEN` (README "Security"), the server this script starts too.

Writes to `--out`: `concurrency.md` (the run's provenance and one row per number of annotators: clicks, 429s,
errors, p50/p95 of a click and of /info), `concurrency.csv` (every sample) and `concurrency.png`.
"""

import argparse
import csv
import gzip
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from sam3d.monailabel.api_client import auth_headers

from . import REPO
from .provenance import report_header

TIMED_CODE = [
    "lib/sam3d/monailabel",
    "lib/sam3d/engine",
    "apps/sam3d",
    "configs",
    "lib/sam3d/cli/benchmark_concurrency.py",
]
DEFAULT_LABELS = "spleen,kidney_right,kidney_left,liver,stomach,pancreas"


class Samples:
    """Latency samples of one round, recorded from many threads."""

    def __init__(self):
        self.rows, self.refused, self.errors = [], 0, []
        self._lock = threading.Lock()

    def add(self, kind: str, seconds: float, annotators: int):
        with self._lock:
            self.rows.append({"annotators": annotators, "kind": kind, "seconds": seconds})

    def add_refused(self):
        with self._lock:
            self.refused += 1

    def add_error(self, message: str):
        with self._lock:
            self.errors.append(message)

    def seconds(self, kind: str) -> list[float]:
        return [r["seconds"] for r in self.rows if r["kind"] == kind]


def click(url: str, image_id: str, params: dict, samples: Samples) -> np.ndarray:
    """One click as the annotator meets it: sent again after each 429's Retry-After; the returned mask."""
    while True:
        r = requests.post(
            f"{url}/infer/sam3d_point",
            params={"image": image_id, "output": "image"},
            files={"params": (None, json.dumps(params))},
            headers=auth_headers(),
            timeout=600,
        )
        if r.status_code != 429:
            r.raise_for_status()
            return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj) > 0
        samples.add_refused()
        time.sleep(float(r.headers.get("Retry-After", 1)))


def annotate(url, image_id, gt, spacing, name, args, seed, samples, n, progress):
    """One simulated annotator: `args.clicks` clicks on one structure, each after the last answer."""
    from sam3d.data.clicks import ClickSimulator

    sim = ClickSimulator("center", seed=seed, spacing=spacing)
    points, pred = {"foreground": [], "background": []}, None
    try:
        for it in range(1, args.clicks + 1):
            prompt = sim.next(gt, pred, it)
            for p, positive in prompt.points:
                points["foreground" if positive else "background"].append([int(v) for v in p])
            t = time.perf_counter()
            pred = click(url, image_id, {**points, "label": name}, samples)
            samples.add("click", time.perf_counter() - t, n)
            progress.update()
            time.sleep(args.think)
    except requests.RequestException as e:  # the round goes on; the table counts it
        samples.add_error(f"{image_id}: {e}")


def probe_info(url: str, every: float, stop: threading.Event, samples: Samples, n: int):
    while not stop.is_set():
        t = time.perf_counter()
        try:
            requests.get(f"{url}/info/", headers=auth_headers(), timeout=600).raise_for_status()
            samples.add("info", time.perf_counter() - t, n)
        except requests.RequestException as e:
            samples.add_error(f"/info: {e}")
        stop.wait(every)


def run_round(url, n, image_ids, targets, loaded, args) -> Samples:
    """`n` annotators at once, each on image_ids[i] and structure targets[i % len]; /info probed meanwhile."""
    from tqdm import tqdm

    samples, stop = Samples(), threading.Event()
    prober = threading.Thread(target=probe_info, args=(url, args.probe, stop, samples, n), daemon=True)
    prober.start()
    with tqdm(total=n * args.clicks, desc=f"{n} annotator(s)", unit="click") as progress:
        workers = []
        for i in range(n):
            value, name = targets[i % len(targets)]
            workers.append(
                threading.Thread(
                    target=annotate,
                    args=(
                        url,
                        image_ids[i],
                        loaded.label == value,
                        loaded.spacing,
                        name,
                        args,
                        i,
                        samples,
                        n,
                        progress,
                    ),
                )
            )
            workers[-1].start()
        for w in workers:
            w.join()
    stop.set()
    prober.join()
    return samples


def percentiles(values: list[float]) -> str:
    if not values:
        return "- | -"
    return f"{np.percentile(values, 50):.3f} | {np.percentile(values, 95):.3f}"


def write_report(rounds: dict[int, Samples], header: str, args, out: Path) -> str:
    table = [
        "| annotators | clicks | 429s | errors | click p50 (s) | click p95 (s) | /info p50 (s) | /info p95 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, s in rounds.items():
        table.append(
            f"| {n} | {len(s.seconds('click'))} | {s.refused} | {len(s.errors)} | "
            f"{percentiles(s.seconds('click'))} | {percentiles(s.seconds('info'))} |"
        )
    settings = (
        f"case `{args.data}`, {args.clicks} clicks per annotator (`center` protocol), {args.think} s between "
        f"clicks, /info every {args.probe} s; server {args.url or 'started by this script'}"
        + (f" with --conf {' '.join(f'{k} {v}' for k, v in args.conf)}" if args.conf else "")
    )
    report = "\n".join([header, "", settings, "", *table, ""])
    (out / "concurrency.md").write_text(report)
    with open(out / "concurrency.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["annotators", "kind", "seconds"])
        writer.writeheader()
        for s in rounds.values():
            writer.writerows(s.rows)
    plot(rounds, out / "concurrency.png")
    return report


def plot(rounds: dict[int, Samples], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = list(rounds)
    for kind, label in (("click", "click"), ("info", "/info")):
        for q, style in ((50, "-o"), (95, "--o")):
            ys = [np.percentile(v, q) if (v := rounds[n].seconds(kind)) else np.nan for n in ns]
            ax.plot(ns, ys, style, label=f"{label} p{q}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_yscale("log")
    ax.set_xlabel("concurrent annotators")
    ax.set_ylabel("latency (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def datastore_of_copies(image: Path, folder: Path, annotators: list[int]) -> dict[int, list[str]]:
    """One copy of `image` per annotator of each round (an image of its own each): round -> image ids."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {n: [f"n{n:02d}_a{i:02d}" for i in range(n)] for n in annotators}
    for image_id in (i for round_ids in ids.values() for i in round_ids):
        shutil.copy(image, folder / f"{image_id}{''.join(image.suffixes)}")
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "totalseg_ct"),
        help="one case folder (image.nii.gz + label.*)",
    )
    ap.add_argument("--labels", default=DEFAULT_LABELS, help="structures to click on, values or names")
    ap.add_argument("--annotators", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--clicks", type=int, default=5, help="clicks per annotator")
    ap.add_argument("--think", type=float, default=2.0, help="seconds an annotator looks before the next click")
    ap.add_argument("--probe", type=float, default=0.5, help="seconds between /info requests")
    ap.add_argument("--url", help="a running server instead of starting one")
    ap.add_argument("--image", help="with --url: the datastore image id every annotator clicks on")
    ap.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="the started server's --conf (e.g. device cpu, limits.infer_threads 2)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "benchmark_concurrency")
    args = ap.parse_args(argv)
    if args.url and not args.image:
        ap.error("--url needs --image: the image id the annotators click on")

    from sam3d.data.cases import find_cases, load_case, parse_label_selection
    from sam3d.monailabel.local_server import running_server

    case = find_cases(args.data)[0]
    loaded = load_case(case)
    values = parse_label_selection(args.labels, case.names) or loaded.values()
    targets = [(v, case.label_name(v)) for v in values if (loaded.label == v).any()]
    args.out.mkdir(parents=True, exist_ok=True)
    header = report_header("benchmark_concurrency", TIMED_CODE)  # the load average before the server starts

    def run_all(url, ids) -> dict[int, Samples]:
        return {n: run_round(url, n, ids[n], targets, loaded, args) for n in args.annotators}

    if args.url:
        rounds = run_all(args.url.rstrip("/"), {n: [args.image] * n for n in args.annotators})
    else:
        with tempfile.TemporaryDirectory(prefix="sam3d_concurrency_") as tmp:
            ids = datastore_of_copies(case.image, Path(tmp) / "studies", args.annotators)
            with running_server(Path(tmp), Path(tmp) / "studies", args.conf) as (url, _, log):
                print(f"server at {url}, log {log}")
                rounds = run_all(url, ids)
    print(write_report(rounds, header, args, args.out))
    for n, s in rounds.items():
        for error in s.errors:
            print(f"{n} annotators: error {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
