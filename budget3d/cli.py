"""The one command line: ``budget3d inspect | train | eval | demo | distill | export | bench | serve | view``.

This module parses and dispatches. ``demo``, ``export``, ``process``, ``bench``, ``serve`` and ``view`` live
with what they drive (``PLUGINS``): each of those modules has ``add_arguments(parser)`` (cheap imports only) and
``main(args)``. ``train``'s flags are ``TrainConfig``'s fields, their help the fields' metadata.

A user mistake (``UserError``) prints ``budget3d: error: <message>`` on one line and exits 2;
Ctrl-C exits 130 after saying how to resume; output into a closed pipe (``| head``) exits 1, quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Optional

from budget3d.demo import bundled_scene  # noqa: F401 - its old address (scripts/bench_budget.py, tests)
from budget3d.errors import UserError

NELF_PRESETS = ("grid-small", "grid-mobile", "tiny", "small", "mobile-int8", "mobile-r2l")  # budget3d.nelf.students


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line, exit 2) like every other mistake."""

    def error(self, message):
        raise UserError(f"{message} (see: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="budget3d", description="3D Gaussian Splatting trained to an exact Gaussian budget.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("inspect", help="summarise a scene folder (format, views, size, points, bounds)")
    q.add_argument("path", help="scene folder (Blender, nerfstudio/instant-ngp, COLMAP or LLFF)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--downscale", type=int, default=1, help="image downscale factor (default 1)")
    q.add_argument("--check", action="store_true",
                   help="also decode every image (slower): stops at the first unreadable or wrongly sized one")

    t = sub.add_parser("train", help="train Gaussians to an exact budget; writes a run folder")
    t.add_argument("--out", required=True, help="run folder to write (or to continue with --resume)")
    _add_config_flags(t)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any field above by name, e.g. --set densify_start=300 (repeatable; wins over the flags)")
    t.add_argument("--config", metavar="FILE",
                   help="start from the settings in a JSON object, e.g. a run's config.json (flags and --set win)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="re-evaluate a run folder on its test views (rewrites metrics.json), or score "
                                    "a splat file (ply, splat, spz, sog, glb, compressed.ply) on a scene's")
    e.add_argument("run", help="run folder written by 'budget3d train', or a splat file with --data SCENE")
    e.add_argument("--downscale", type=int, default=1, help="a splat file's scene: image downscale factor")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], default="auto")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--data", metavar="PATH", help="the run's scene folder, when it moved (default: the one the run's config.json names)")

    _plugin_parser(sub, "demo")

    n = sub.add_parser("distill",
                       help="distill a run's Gaussians into a MobileR2L-style neural light field (RUN/nelf/)")
    n.add_argument("run", help="run folder written by 'budget3d train'")
    n.add_argument("--preset", choices=list(NELF_PRESETS),
                   help="student network (default: small on CPU, mobile-r2l on CUDA)")
    n.add_argument("--iters", type=int, help="optimisation steps (default: 4000 on CPU, 20000 on CUDA)")
    n.add_argument("--minutes", type=float, help="stop after this many minutes of distillation and finish there "
                                                "(evaluation, student.pt), even before --iters")
    n.add_argument("--resolution", metavar="WxH|W",
                   help="output size, multiples of the preset's upsampling factor (default: the scene's image size)")
    n.add_argument("--batch", type=int, help="teacher views per step (default: 16 crops of 64x64 on CPU, 4 whole "
                                           "views on CUDA; under torchrun the global batch, split over the processes)")
    n.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    n.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], default="auto",
                   help="teacher renderer backend")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any DistillConfig field by name, e.g. --set crop=64 --set lr=0.005 (repeatable; "
                        "budget3d/nelf/distill.py lists them)")
    n.add_argument("--data", metavar="PATH", help="the run's scene folder, when it moved (default: the one the run's config.json names)")
    n.add_argument("--resume", action="store_true", help="continue the distillation in RUN/nelf from its checkpoint")
    n.add_argument("--quiet", action="store_true", help="no progress bar")

    for name in PLUGINS:
        if name != "demo":
            _plugin_parser(sub, name)
    return p


def _plugin_parser(sub, name: str) -> None:
    module, text = PLUGINS[name]
    importlib.import_module(module).add_arguments(sub.add_parser(name, help=text))


# subcommands whose arguments and code live in their own module (add_arguments + main)
PLUGINS = {
    "demo": ("budget3d.demo", "train on the bundled scene in a few minutes and show where the results are"),
    "export": ("budget3d.export.run",
               "write a run's Gaussians as ply/splat/spz (or its NeLF as ONNX) into RUN/export/"),
    "process": ("budget3d.capture.build",
                "photos or a video -> a COLMAP scene folder (pycolmap structure from motion) to train"),
    "bench": ("budget3d.export.bench",
              "measure every variant in a run (3DGS, NeLF torch/ONNX fp32/int8/mixed): latency, size, quality"),
    "serve": ("budget3d.export.web", "serve a folder written by 'budget3d export --format web' (127.0.0.1 by default)"),
    "view": ("viewer.app", "open a run in the browser: splats and NeLF side by side, live latency and quality"),
}


# ----------------------------------------------------------------------------- commands


def cmd_inspect(args) -> int:
    from budget3d.scene import describe, load_scene

    with warnings.catch_warnings(record=True) as caught:  # e.g. skipped frames: one line each, no source line
        warnings.simplefilter("always", UserWarning)
        scene = load_scene(args.path, downscale=args.downscale, cache=False)
    for w in caught:
        print(f"budget3d: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    info = describe(scene)
    if args.check:  # images load lazily, so a corrupt or wrongly sized one only shows when decoded
        for view in scene.train + scene.test:
            view.image()
        info["n_images_checked"] = len(scene.train) + len(scene.test)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


# ----------------------------------------------------------------------------- train settings

# Every TrainConfig field is a flag (its metadata: help, and choices/metavar/action where needed; see config.py).
NOT_SETTABLE = ("out", "resolved", "world_size")  # --out names the run folder; resolved and world_size are the trainer's records
CLI_NAMES = ("command", "set", "config", "resume", "quiet")  # a field of one of these names gets only --set
RESUME_OVERRIDES = ("device", "backend", "data")  # runtime choices that do not change the result's recipe
_TRUE, _FALSE, _NONE = ("true", "1", "yes"), ("false", "0", "no"), ("auto", "none", "null")


def _converter(tp):
    """str -> value of a field annotated ``tp`` (bool, int, float, str, Optional of those; else JSON).
    Optional fields take auto/none for None. A bad value is an ArgumentTypeError (a one-line error)."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    kind, metavar = {bool: ("true or false", "BOOL"), int: ("a whole number", "N"), float: ("a number", "X"),
                     str: ("text", "TEXT")}.get(base, ("a JSON value", "JSON"))

    def convert(text):
        t = str(text).strip()
        try:
            if optional and t.lower() in _NONE:
                return None
            if base is bool:
                if t.lower() in _TRUE + _FALSE:
                    return t.lower() in _TRUE
                raise ValueError(t)
            return base(t) if base in (int, float, str) else json.loads(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}{' or auto' if optional else ''}, got {text!r}") from None

    convert.metavar = metavar + ("|auto" if optional else "")
    return convert


def _config_fields(cls=None) -> dict:
    """{name: (converter, default)} of every settable field of ``cls`` (TrainConfig by default),
    read now (fields may be added)."""
    if cls is None:
        from budget3d.train import TrainConfig as cls

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_SETTABLE or f.name.startswith("_"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = (_converter(hints.get(f.name, str)), default)
    return out


def _show(value) -> str:
    return "auto" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def _add_config_flags(t: argparse.ArgumentParser) -> None:
    from budget3d.train import TrainConfig

    settable = _config_fields()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in settable or f.name in CLI_NAMES:
            continue
        convert, default = settable[f.name]
        kw = {"type": convert, "metavar": convert.metavar, "help": "", **f.metadata}
        if "action" in kw or "choices" in kw:
            kw.pop("metavar")
        if "action" in kw:
            kw.pop("type")
        shown = kw.pop("shown", _show(default))
        kw["help"] = (f"{kw['help']} (default: {shown})" if default != "" else kw["help"]).strip().replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS: a flag not given leaves no attribute, so an explicit "auto" (None) still wins over --config
        t.add_argument(*dict.fromkeys([flag, flag.lower()]), dest=f.name, default=argparse.SUPPRESS, **kw)


def _field_name(key: str, fields: dict, where: str, hint: str = "see: budget3d train --help") -> str:
    name = key.strip().replace("-", "_")
    name = {k.lower(): k for k in fields}.get(name.lower(), name)  # shn_lr: shN_lr
    if name == "out":
        raise UserError(f"{where}{key!r}: give the run folder with --out")
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else hint
        raise UserError(f"{where}unknown setting {key!r}; {hint}")
    return name


def _convert(fields: dict, name: str, text: str, where: str):
    try:
        return fields[name][0](text)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{where}: {e}") from None


def _parse_sets(items: list, fields: dict, hint: str = "see: budget3d train --help") -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set densify_start=300")
        name = _field_name(key, fields, "--set: ", hint)
        out[name] = _convert(fields, name, value, f"--set {item}")
    return out


def _read_config(path: str, fields: dict) -> dict:
    """The settings in a JSON object file; a run's config.json works as is (its out and resolved are ignored)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the --config file ({e.strerror or e}); check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: the --config file is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the --config file must hold a JSON object of settings, e.g. a run's config.json")
    out = {}
    for key, value in data.items():
        if key.replace("-", "_") in NOT_SETTABLE:
            continue
        name = _field_name(key, fields, f"{path}: ")
        out[name] = _convert(fields, name, value if isinstance(value, str) else json.dumps(value), f"{path}: {key}")
    return out


def cmd_train(args) -> int:
    from budget3d.demo import print_summary
    from budget3d.train import train

    cfg = train_config(args)
    metrics = train(cfg, resume=args.resume, progress=not args.quiet)
    if "psnr" in metrics:  # under torchrun only rank 0 has the whole model and its metrics
        print_summary(metrics, Path(args.out))
    return 0


def train_config(args):
    """The run's TrainConfig: dataclass defaults < --config < flags < --set (with --resume: device, backend)."""
    from budget3d.train import TrainConfig

    fields = _config_fields()
    flags = {k: getattr(args, k) for k in fields if k not in CLI_NAMES and hasattr(args, k)}
    sets = _parse_sets(args.set, fields)
    if args.resume:
        fixed = ["--" + k.replace("_", "-") for k in sorted(flags) if k not in RESUME_OVERRIDES]
        fixed += [f"--set {k}" for k in sorted(sets) if k not in RESUME_OVERRIDES] + ["--config"] * bool(args.config)
        if fixed:
            raise UserError(f"--resume continues {args.out} with its saved config; drop {', '.join(fixed)} "
                            "(or start a new run in another --out folder)")
        given = {**flags, **sets}
        return TrainConfig(out=args.out, device=given.get("device", "auto"), backend=given.get("backend", "auto"),
                           data=given.get("data") or "")
    given = {**(_read_config(args.config, fields) if args.config else {}), **flags, **sets}
    if not given.get("data"):
        raise UserError("train needs --data PATH (a scene folder), or --resume to continue a run")
    if (Path(args.out) / "checkpoint.pt").is_file():
        raise UserError(f"{args.out} already holds a run; continue it with --resume, or choose another --out")
    return TrainConfig(**given, out=args.out)


def cmd_eval(args) -> int:
    from budget3d.demo import print_summary
    from budget3d.train import evaluate_run

    metrics = evaluate_run(args.run, device=args.device, backend=args.backend, data=args.data,
                           downscale=args.downscale)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "per_view"}))
    elif "file" in metrics:
        print(f"{metrics['file']}: {metrics['num_gaussians']:,} Gaussians, test PSNR {metrics['psnr']:.2f} dB, "
              f"SSIM {metrics['ssim']:.4f} ({metrics.get('n_views', len(metrics.get('per_view', [])))} views)")
    else:
        print_summary(metrics, Path(args.run))
    return 0


def cmd_distill(args) -> int:
    from budget3d.nelf.distill import DistillConfig, distill
    from budget3d.runtime import pick_device

    given = {k: getattr(args, k) for k in ("preset", "iters", "minutes", "resolution", "batch")
             if getattr(args, k) is not None}
    fields = {k: v for k, v in _config_fields(DistillConfig).items() if k not in ("run", "device", "backend", "data")}
    given.update(_parse_sets(args.set, fields, "the settings are: " + ", ".join(fields)))
    from budget3d.nelf.config import check_config

    if not args.resume:  # the flags first, in the words they were typed
        check_config(DistillConfig(**given))
    if args.resume:
        if given:
            flags = ", ".join("--" + k for k in sorted(given))
            raise UserError(f"--resume continues {args.run}/nelf with its saved settings; drop {flags}")
        cfg = DistillConfig(run=args.run, device=args.device, backend=args.backend, data=args.data or "")
    else:
        if (Path(args.run) / "nelf" / "checkpoint.pt").is_file():
            raise UserError(f"{args.run}/nelf already holds a distillation; continue it with --resume, "
                            "or move that folder away to start again")
        cuda = pick_device(args.device, args.backend).type == "cuda"
        # CPU: DistillConfig's defaults (`small`, 64x64 crops, 16 a step: docs/distill.md);
        # CUDA: the paper's network on whole views
        defaults = {"preset": "mobile-r2l", "iters": 20000, "crop": 0, "batch": 4} if cuda else {}
        cfg = DistillConfig(run=args.run, device=args.device, backend=args.backend, data=args.data or "",
                            **{**defaults, **given})
    m = distill(cfg, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return 0
    fmt = lambda v, nd=2: "n/a" if v is None else f"{v:.{nd}f}"  # noqa: E731
    out = Path(args.run) / "nelf"
    print(f"student:      {m['preset']}, {m['params'] / 1e6:.2f} M params, {m['macs_per_frame'] / 1e9:.2f} GMAC "
          f"per {m['resolution'][0]}x{m['resolution'][1]} frame")
    print(f"test PSNR:    student {fmt(m.get('student_psnr'))} dB   teacher {fmt(m.get('teacher_psnr'))} dB   "
          f"student vs teacher {fmt(m.get('student_vs_teacher_psnr'))} dB   SSIM {fmt(m.get('student_ssim'), 4)}")
    print(f"distilled:    {m['iters']} steps in {m['distill_seconds']:.1f} s")
    print(f"files:        {out / 'metrics.json'}, {out / 'student.pt'}, {out / 'strip.png'}, {out / 'progress.png'}")
    return 0


COMMANDS = {"inspect": cmd_inspect, "train": cmd_train, "eval": cmd_eval, "distill": cmd_distill}


def _plugin(name: str):
    return lambda args: importlib.import_module(PLUGINS[name][0]).main(args)


COMMANDS.update({name: _plugin(name) for name in PLUGINS})


def main(argv: Optional[list] = None) -> int:
    try:
        try:
            parser = _parser()
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return 2
            return COMMANDS[args.command](args)
        finally:
            sys.stdout.flush()  # a reader gone early ("| head") shows here, not in the flush at exit
    except BrokenPipeError:  # Python's recipe (signal docs, "Note on SIGPIPE"): quiet, exit 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 1
    except UserError as e:
        _clear_progress_bars()
        msg = " ".join(str(e).split())  # one line, always
        print(f"budget3d: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _clear_progress_bars()
        msg = " ".join(str(e).split()) or "interrupted; nothing half-written was left behind"
        print(f"budget3d: {msg}", file=sys.stderr)
        return 130


def _clear_progress_bars() -> None:
    """Erase the progress bars still on screen, so the error is the one line left on stderr."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.leave = False
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


if __name__ == "__main__":
    raise SystemExit(main())
