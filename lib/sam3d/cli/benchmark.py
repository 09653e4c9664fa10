"""Interactive latency of the bare networks, beside medim's SAM-Med3D on the same input in the same run.

For each model and device it times, as the median (and min) of warm runs:

* encoder      image encoder on one 128^3 window (paid once per window: the first click)
* decode #1    prompt encoder + mask decoder for the first click: 1 positive click, zero mask input
* first click  encoder + decode #1
* next click   prompt encoder + mask decoder for a second click: 2 clicks, the previous low-res logits as mask
               input (README case B; what every later click costs while the embedding is cached)

Models: sam3d `sam_med3d_turbo` and `sam3d_small`, and medim 0.1.2 "SAM-Med3D" (the official network). The turbo
network and medim get the same random weights (medim's seeded initialisation) so their outputs can be compared;
the deviation is printed as a sanity check that both compute the same thing. Weights do not change timings.

    python scripts/benchmark.py --device cpu --threads 2 --out BENCHMARKS.md

prints a markdown table to stdout and, with --out, appends it to that file under a header with the command,
git commit, hardware, torch version and date. Timings belong here, never in pass/fail tests.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # medim builds with pretrained=False: nothing to download

import torch
from tqdm import tqdm

from sam3d.models import build_sam3d

from . import REPO
from .provenance import report_header

PRESETS = ("sam_med3d_turbo", "sam3d_small")
TIMED_CODE = ["lib/sam3d/models", "lib/sam3d/engine", "lib/sam3d/cli/benchmark.py"]  # what the timings depend on
FIRST_CLICK = [[66.0, 64.0, 64.0]]  # the conformance vectors' clicks (README case A / case B)
NEXT_CLICKS = [[66.0, 64.0, 64.0], [66.0, 29.0, 32.0]]


@dataclass
class Row:
    model: str
    device: str
    params_m: float
    times: dict[str, list[float]] = field(default_factory=dict)  # wall seconds per run, by measurement
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds per run (all threads)
    note: str = ""


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, runs: int, warmup: int, device: torch.device, desc: str) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `fn` over `runs` runs after `warmup` untimed ones (CUDA synchronised on
    both sides). CPU / wall near the thread count means the cores were ours; much less, that others used them."""
    wall, cpu = [], []
    with torch.inference_mode():
        for i in tqdm(range(warmup + runs), desc=desc, leave=False, file=sys.stderr, unit="run"):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if i >= warmup:
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    return wall, cpu


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------- models


def _prompts(device):
    first = (torch.tensor([FIRST_CLICK], device=device), torch.tensor([[1]], device=device))
    nxt = (torch.tensor([NEXT_CLICKS], device=device), torch.tensor([[1, 0]], device=device))
    return first, nxt


class Bare:
    """encode / decode callables for one network, ours or medim's, on one device."""

    def __init__(self, name: str, model: torch.nn.Module, medim: bool, device: torch.device) -> None:
        self.name, self.model, self.medim, self.device = name, model.to(device).eval(), medim, device
        self.low = 4 * model.prompt_encoder.image_embedding_size[0]  # low-res logits: 4x the token grid

    def encode(self, x):
        return self.model.image_encoder(x) if self.medim else self.model.encode_image(x)

    def decode(self, emb, points, mask_input):
        m = self.model
        if not self.medim:
            return m.decode(emb, points=points, mask_input=mask_input, multimask_output=False)
        sparse, dense = m.prompt_encoder(points=points, boxes=None, masks=mask_input)
        return m.mask_decoder(
            image_embeddings=emb,
            image_pe=m.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.model.parameters()) / 1e6


def build_models(presets, with_medim: bool) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, cpu model, is_medim). Turbo and medim share medim's seeded random weights."""
    out = []
    ref = None
    if with_medim:
        try:
            import medim
        except ImportError:
            print("medim not installed: its column is skipped", file=sys.stderr)
        else:
            torch.manual_seed(0)
            with contextlib.redirect_stdout(sys.stderr):  # medim prints progress; stdout is the report
                ref = medim.create_model("SAM-Med3D", pretrained=False).eval()
    for preset in presets:
        if preset == "sam_med3d_turbo" and ref is not None:
            with torch.device("meta"):
                model = build_sam3d(preset)
            model.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
        else:
            torch.manual_seed(0)
            model = build_sam3d(preset)
        out.append((f"sam3d {preset}", model.eval(), False))
        if preset == "sam_med3d_turbo" and ref is not None:
            out.append(("medim SAM-Med3D (official)", ref, True))
    return out


def bench_bare(bare: Bare, x: torch.Tensor, args) -> tuple[Row, dict]:
    dev = bare.device
    first, nxt = _prompts(dev)
    zeros = torch.zeros(1, 1, bare.low, bare.low, bare.low, device=dev)
    row = Row(bare.name, str(dev), bare.params_m)
    with torch.inference_mode():
        emb = bare.encode(x)
        low1, _ = bare.decode(emb, first, zeros)
        low2, _ = bare.decode(emb, nxt, low1)
    tag = f"{bare.name} [{dev}]"
    runs = {
        "encoder": (lambda: bare.encode(x), args.runs, "encoder"),
        "decode1": (lambda: bare.decode(emb, first, zeros), args.decode_runs, "first-click decode"),
        "next": (lambda: bare.decode(emb, nxt, low1), args.decode_runs, "next-click decode"),
    }
    for key, (fn, n, desc) in runs.items():
        row.times[key], row.cpu[key] = time_runs(fn, n, args.warmup, dev, f"{tag} {desc}")
    notes = []
    if dev.type == "cpu":
        notes.append(f"encoder {statistics.median(row.cpu['encoder']):.1f} CPU-s/run")
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            bare.encode(x)
        notes.append(f"encoder {fc.get_total_flops() / 1e9:.1f} GFLOP")
    row.note = ", ".join(notes)
    return row, {"emb": emb, "low1": low1, "low2": low2}


# ---------------------------------------------------------------------------------------------- engine


ENGINE_IMAGE = REPO.parent / "shared" / "data" / "totalseg_ct" / "image.nii.gz"
ENGINE_CLICK, ENGINE_NEXT = [60, 50, 56], [64, 50, 52]  # liver of the TotalSegmentator example CT


def _engine_model(preset: str):
    """The shipped weights where they exist (the default model), else random ones: timings do not depend on them."""
    from sam3d.engine import LoadedModel, load_model

    shipped = REPO / "models" / f"{preset}.safetensors"
    if shipped.is_file():
        return load_model({"preset": preset, "checkpoint": str(shipped)}), "shipped weights"
    torch.manual_seed(0)
    return LoadedModel(build_sam3d(preset).eval(), None, None, preset), "random weights"


def bench_engine(args, device: torch.device) -> list[str]:
    """Latency through `sam3d.engine.InteractiveEngine`: a NIfTI path and clicks in, a mask on the image grid out.

    * first click: a fresh engine (nothing cached): load + resample the image, normalise and encode the window,
      decode, upsample, resample the mask onto the image grid;
    * next click: one more click on the same image and label (embedding cached, previous mask fed back).
    One window per click (max_windows=1) so that the figure is per window, whatever the weights make of the image.
    """
    from sam3d.engine import EngineConfig, InteractiveEngine

    if not ENGINE_IMAGE.is_file():
        print(f"engine latency: skipped ({ENGINE_IMAGE} not found)", file=sys.stderr)
        return []
    rows = []
    for preset in args.presets:
        loaded, weights = _engine_model(preset)
        first, nxt, parts = [], [], {}
        for _ in tqdm(range(args.warmup + args.runs), desc=f"engine {preset} {device}", leave=False):
            engine = InteractiveEngine(loaded, EngineConfig(max_windows=1), device=str(device))
            t = time.perf_counter()
            res = engine.segment(str(ENGINE_IMAGE), [ENGINE_CLICK], [], label="liver")
            first.append(time.perf_counter() - t)
            for k, v in res.timings.items():
                parts.setdefault(k, []).append(v)
            t = time.perf_counter()
            res = engine.segment(str(ENGINE_IMAGE), [ENGINE_CLICK, ENGINE_NEXT], [], label="liver")
            nxt.append(time.perf_counter() - t)
            assert res.info["embedding_cached"]
        first, nxt = first[args.warmup :], nxt[args.warmup :]
        split = ", ".join(
            f"{k} {statistics.median(v[args.warmup :]) * 1e3:.0f} ms" for k, v in parts.items() if k != "total"
        )
        rows.append(f"| engine {preset} ({weights}) | {device} | {_ms(first)} | {_ms(nxt)} | {split} |")
        loaded.model.cpu()
    return rows


def engine_table(rows: list[str], args) -> str:
    if not rows:
        return ""
    return "\n".join(
        [
            "",
            f"Through the engine (`{ENGINE_IMAGE.relative_to(REPO.parent)}`, 122x101x112 at 3 mm -> 243x201x223 at "
            "1.5 mm), median (min) of "
            f"{args.runs} runs after {args.warmup} warm-up:",
            "",
            "| engine | device | **first click** (nothing cached) | **next click** (embedding cached) "
            "| first click split |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------- report


def _ms(ts: list[float]) -> str:
    med, lo = statistics.median(ts) * 1e3, min(ts) * 1e3
    if med >= 1000:
        return f"{med / 1e3:.2f} s ({lo / 1e3:.2f})"
    return f"{med:.1f} ms ({lo:.1f})"


def _first_click(row: Row) -> str:
    total = statistics.median(row.times["encoder"]) + statistics.median(row.times["decode1"])
    return f"{total:.2f} s" if total >= 1 else f"{total * 1e3:.0f} ms"


def markdown_table(rows: list[Row], args) -> str:
    lines = [
        "| model | device | params | encoder | decode, 1st click | **first click** | **next click** | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.device} | {r.params_m:.1f} M | {_ms(r.times['encoder'])} | {_ms(r.times['decode1'])}"
            f" | {_first_click(r)} | {_ms(r.times['next'])} | {r.note} |"
        )
    lines.append("")
    lines.append(
        f"Median (min) of {args.runs} encoder runs and {args.decode_runs} decoder runs, after {args.warmup} warm-up "
        "run(s); float32, batch 1, 128^3 window. First click = median encoder + median first-click decode."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cpu, and cuda when available (default)"
    )
    p.add_argument("--runs", type=int, default=7, help="timed encoder runs (default 7)")
    p.add_argument("--decode-runs", type=int, default=50, help="timed decoder runs (default 50)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--no-medim", action="store_true", help="skip medim's SAM-Med3D")
    p.add_argument("--no-engine", action="store_true", help="skip the engine (image in, mask out) latency")
    p.add_argument("--flops", action="store_true", help="also count encoder FLOPs (one extra forward each)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file (BENCHMARKS.md)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    else:
        devices = [torch.device(args.device)]
    gpu = next((torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"), None)
    head = report_header("benchmark", TIMED_CODE, gpu)

    models = build_models(args.presets, with_medim=not args.no_medim)
    x_cpu = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    rows: list[Row] = []
    engine_rows: list[str] = []
    for dev in devices:
        x = x_cpu.to(dev)
        outputs = {}
        for name, model, is_medim in models:
            row, outputs[name] = bench_bare(Bare(name, model, is_medim, dev), x, args)
            rows.append(row)
            model.cpu()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        ours, ref = outputs.get("sam3d sam_med3d_turbo"), outputs.get("medim SAM-Med3D (official)")
        if ours and ref:
            dev_rels = {k: rel(ours[k], ref[k]) for k in ours}
            note = "same outputs as medim: max rel " + ", ".join(f"{k} {v:.1e}" for k, v in dev_rels.items())
            for r in rows:
                if r.model == "sam3d sam_med3d_turbo" and r.device == str(dev):
                    r.note = "; ".join(filter(None, [r.note, note]))
        if not args.no_engine:
            engine_rows.extend(bench_engine(args, dev))

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report = (
        head
        + f"\n* 1-min load average after the run: {load_after:.2f}\n\n"
        + markdown_table(rows, args)
        + "\n"
        + engine_table(engine_rows, args)
    )
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + report)
        print(f"appended to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
