"""Ask a sam3d server to fine-tune its model on the labels saved so far (for cron), optionally wait, print the result.

    python scripts/retrain.py --server http://127.0.0.1:8000 --wait
    python scripts/retrain.py --server URL --wait --param epochs=2 --param promote=always

The server queues the request behind a running training and merges it with one already waiting, so running this
from cron while a training goes on never starts two. Exit status: 0 when the run finished (or, without --wait,
was accepted), 1 when it failed or was stopped, 2 when the server refused the request (the reason is printed).
A server that requires the API token gets it from `SAM3D_API_TOKEN` (README "Security").
"""

import argparse
import json
import sys
import time

import yaml
from monailabel.client.client import MONAILabelClientException

from sam3d.monailabel.api_client import Sam3DClient


def parse_param(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--param {item!r} is not KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def task_status(client: Sam3DClient, task_id: str) -> dict:
    return next(t for t in client.json_request("GET", "/train/?all=true") if t["id"] == task_id)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="the MONAI Label server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default="sam3d", help="the train task (default sam3d)")
    ap.add_argument(
        "--param",
        action="append",
        type=parse_param,
        default=[],
        help="a train parameter KEY=VALUE (epochs, steps, lr, trainable, device, val_split, promote)",
    )
    ap.add_argument("--wait", action="store_true", help="wait until the run has finished and print its result")
    ap.add_argument("--timeout", type=float, default=24 * 3600, help="give up waiting after this many seconds")
    ap.add_argument("--poll", type=float, default=5.0, help="seconds between two looks at the run")
    args = ap.parse_args(argv)

    server = args.server.rstrip("/")
    client = Sam3DClient(server, client_id="retrain.py")  # with the API token when SAM3D_API_TOKEN is set
    try:
        task = client.train_start(args.model, dict(args.param))
    except MONAILabelClientException as e:
        print(f"refused: {e.msg}", file=sys.stderr)
        return 2
    except OSError as e:  # no server there
        print(f"cannot reach {server}: {e}", file=sys.stderr)
        return 2
    print(f"train task {task['id']}: {task['status']}" + (f" ({task['queued']})" if task.get("queued") else ""))
    if not args.wait:
        return 0

    deadline = time.monotonic() + args.timeout
    while (task := task_status(client, task["id"]))["status"] in ("SUBMITTED", "RUNNING"):
        if time.monotonic() > deadline:
            print(f"still {task['status']} after {args.timeout:.0f} s; it goes on in the server", file=sys.stderr)
            return 1
        time.sleep(args.poll)
    stats = client.info().get("train_stats", {}).get(args.model, {})
    print(f"train task {task['id']}: {task['status']}")
    print(json.dumps(stats, indent=1, default=str))
    return 0 if task["status"] == "DONE" else 1


if __name__ == "__main__":
    sys.exit(main())
