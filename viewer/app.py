"""``budget3d view RUN``: open a run in the browser (viser). Cheap imports only at the top: the CLI
imports this module to build its parser."""

from __future__ import annotations

import time


def add_arguments(p):
    p.add_argument("run", help="run folder written by 'budget3d train' (with nelf/ and export/ when they exist), "
                               "or a splat file (ply, splat, spz, sog, glb, compressed.ply; --data SCENE for cameras)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (0: any free port)")
    p.add_argument("--data", metavar="PATH", help="the run's scene folder, when it moved (for the camera buttons)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the server renders the splats (auto: the GPU when gsplat's kernels load there, "
                        "else the CPU)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C)")


def main(args) -> int:
    from budget3d.errors import UserError
    from viewer.server import ViewerApp

    if not 0 <= int(args.port) <= 65535:
        raise UserError(f"--port {args.port}: expected 0..65535")
    app = ViewerApp(args.run, host=args.host, port=args.port, data=args.data, device=args.device)
    app.start()
    runtimes = ", ".join(app.run.runtimes()) or "none (no NeLF yet: budget3d distill RUN, then budget3d export RUN)"
    print(f"budget3d view: {app.run.path} · {app.run.n_gaussians:,} Gaussians · NeLF runtimes: {runtimes}")
    print(f"open {app.url} in a browser (Ctrl-C stops)", flush=True)
    t0 = time.time()
    try:
        while args.seconds is None or time.time() - t0 < args.seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.stop()
    return 0
