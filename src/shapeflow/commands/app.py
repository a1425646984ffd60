"""``shapeflow app``: the local web app (generate, reconstruct, browse data); needs ``pip install -e ".[app]"``."""

from __future__ import annotations

import argparse
import ipaddress
import sys

LOOPBACK_NAMES = ("localhost",)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app",
        help="local web app: generate, reconstruct and browse preprocessed data in the browser",
        description="Serves a gradio page at http://HOST:PORT with three tabs: Generate (the shipped tiny "
                    "generators and every DiT found under --runs), Reconstruct (upload a mesh, see the watertight "
                    "surface and a VAE's reconstruction with metrics) and Data (the preprocessed folders under "
                    "--data and --runs). Each visitor's files go to OUT/sessions/<their session>/. The app has "
                    "no authentication: keep the default loopback host unless every machine that can reach "
                    "the port may use it. Needs the app extra: pip install -e \".[app]\".",
        epilog="examples:\n  shapeflow app\n  shapeflow app --runs runs --data data/prep --port 7861\n"
               "  shapeflow app --host 0.0.0.0 --runs /scratch/runs   # a GPU server, reached over an SSH tunnel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs", action="append", default=[], metavar="DIR",
                   help="folder searched for checkpoints (training runs, model folders, released weights) and "
                        "preprocessed folders; repeatable. Typed checkpoint paths must lie under one of them")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="folder searched for preprocessed folders (manifest.jsonl); repeatable")
    p.add_argument("--out", default="runs/app", metavar="DIR",
                   help="the app's output folder: visitors' results, uploads, data pictures (default runs/app); "
                        "the server hands out no file outside it")
    p.add_argument("--max-upload-mb", type=float, default=100.0, metavar="MB", help="upload size limit (default 100)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="model requests run at once; the others wait in the queue (default 1)")
    p.add_argument("--image-encoder", default="facebook/dinov2-large", metavar="NAME_OR_DIR",
                   help="DINOv2 for image-conditional DiTs")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from shapeflow.app import configure_environment  # gradio reads its folders at import: set them first

    if not is_loopback(args.host):
        print(f"shapeflow app: WARNING: listening on {args.host}: the app has no authentication; anyone who can "
              "reach this port can run models and upload files", file=sys.stderr)
    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port {args.port}: not a port number")
    if args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    configure_environment(args.out)
    try:
        from shapeflow.app import ui
    except ImportError as e:
        raise ValueError(f"the web app needs gradio: pip install -e \".[app]\" ({e})") from None
    from shapeflow.app.handlers import App

    app = App(args.out, runs=args.runs, data=args.data, max_upload_mb=args.max_upload_mb,
              image_encoder=args.image_encoder, device=args.device)
    print(f"shapeflow app: http://{args.host}:{args.port} (outputs in {app.out}; {len(app.catalog.generators)} "
          f"generators, {len(app.catalog.vaes)} VAEs, {len(app.catalog.datasets)} data folders)", flush=True)
    ui.launch(app, host=args.host, port=args.port, concurrency=args.concurrency,
              max_upload_mb=args.max_upload_mb)
    return 0
