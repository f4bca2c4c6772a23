"""Soak test of ``budget3d view``: several Chromium tabs (software WebGL) on loopback keep moving
their cameras for a while; the knobs change now and then and one tab leaves and a new one joins
halfway. Passes when no frame failed on the server and the server's memory stayed bounded.

    python scripts/soak_viewer.py /work/fixture/demo --seconds 60 --clients 3

Prints a JSON summary (frames, drops, errors, server RSS at start / after warm-up / end) and exits
1 on a failure. The server runs in this process, so its RSS is this process's (Chromium is separate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM = "/usr/lib/chromium/chromium"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def screenshots(browser, app, out: Path) -> None:
    """The viewer as a person sees it after moving the camera a little: side-by-side server frame."""
    out.mkdir(parents=True, exist_ok=True)
    for name, size, mobile in (("viewer_desktop.png", (1280, 800), False), ("viewer_phone.png", (390, 844), True)):
        ctx = browser.new_context(viewport={"width": size[0], "height": size[1]}, is_mobile=mobile, has_touch=mobile,
                                  device_scale_factor=2 if mobile else 1)
        page = ctx.new_page()
        before = set(app.sessions)
        page.goto(app.url)
        page.wait_for_selector("text=NeLF latency:", timeout=120000)
        sid = (set(app.sessions) - before).pop()
        s = app.sessions[sid]
        s.view_dd.value = "NeLF | 3DGS CPU"
        s._set(view="NeLF | 3DGS CPU")
        for k in range(6):  # a few frames for the chart
            n = s.frames_sent
            s.jump("train", 3 * k)
            t = time.time()
            while s.frames_sent == n and time.time() - t < 30:
                time.sleep(0.1)
        time.sleep(1.5)
        close = page.locator(".mantine-Notification-root button")  # the "software WebGL" notice
        for i in range(close.count()):
            try:
                close.nth(i).click(timeout=2000)
            except Exception:  # already gone
                pass
        time.sleep(0.5)
        page.screenshot(path=str(out / name))
        ctx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run folder")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--max-growth-mb", type=float, default=200.0,
                    help="fail when the server's RSS grows more than this after the warm-up")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--screenshots", default=None,
                    help="first save viewer_desktop.png (1280x800) and viewer_phone.png (390x844) in this folder")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from viewer.engine import RUNTIMES
    from viewer.server import ViewerApp

    rss0 = rss_mb()
    app = ViewerApp(args.run, port=0).start()
    samples = []
    summary = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
                                          "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                                          "--disable-backgrounding-occluded-windows"])

        if args.screenshots:
            screenshots(browser, app, Path(args.screenshots))

        def open_tab():
            # wide enough that viser's control panel (right) leaves the canvas on the left to drag in
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(app.url)
            page.wait_for_selector("text=NeLF latency:", timeout=120000)
            return page

        pages = [open_tab() for _ in range(args.clients)]
        t0 = time.time()
        rss_warm, step, swapped = None, 0, False
        runtimes = app.run.runtimes()
        while time.time() - t0 < args.seconds:
            el = time.time() - t0
            for k, page in enumerate(pages):  # each tab orbits a little
                a = 0.35 * step + k
                x, y = 300 + 80 * math.cos(a), 320 + 60 * math.sin(a)
                page.mouse.move(x, y)
                page.mouse.down()
                page.mouse.move(x + 25, y + 6, steps=2)
                page.mouse.up()
            step += 1
            if step % 15 == 0 and runtimes:  # turn the knobs: runtime, threads, resolution scale
                for i, s in enumerate(list(app.sessions.values())):
                    s.set_runtime(runtimes[(step // 15 + i) % len(runtimes)])
                    s.threads_dd.value = ["1", "2"][(step // 15) % 2]
                    s._set(threads=s.threads_dd.value)
            if not swapped and el > args.seconds / 2:  # one tab leaves mid-render, another joins
                pages[0].close()
                pages[0] = open_tab()
                swapped = True
            if rss_warm is None and el > 10:
                rss_warm = rss_mb()
            if not samples or time.time() - samples[-1][0] - t0 > 5:
                samples.append((time.time() - t0, round(rss_mb(), 1)))
        time.sleep(1.0)
        sessions = list(app.sessions.values())
        summary = {
            "run": str(args.run), "seconds": args.seconds, "clients": args.clients,
            "camera_drags": step * args.clients,
            "frames_rendered": app.frames_rendered,
            "frames_shown_live_clients": sum(s.frames_sent for s in sessions),
            "frames_dropped_live_clients": sum(s.frames_dropped for s in sessions),
            "server_errors": len(app.errors),
            "first_error": app.errors[0][1] if app.errors else None,
            "runtimes": runtimes,
            "nelf_ms_median_per_client": [s.stats()["nelf_ms"] for s in sessions],
            "rss_mb_start": round(rss0, 1), "rss_mb_after_warmup": round(rss_warm or rss_mb(), 1),
            "rss_mb_end": round(rss_mb(), 1), "rss_samples": samples,
        }
        for page in pages:
            page.close()
        browser.close()
    app.stop()
    growth = summary["rss_mb_end"] - summary["rss_mb_after_warmup"]
    summary["rss_growth_after_warmup_mb"] = round(growth, 1)
    summary["ok"] = summary["server_errors"] == 0 and growth <= args.max_growth_mb and summary["frames_rendered"] > 0
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
