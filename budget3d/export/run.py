"""``budget3d export``: a run's Gaussians as ply / splat / spz / sog / glb / compressed-ply
(``splats``), its NeLF student as ONNX or ExecuTorch (``onnx``, ``pte``), or both as a web page
(``web``), into RUN/export/.

Like the other subcommands with a module of their own: ``add_arguments(parser)`` (cheap imports
only) and ``main(args)``."""

from __future__ import annotations

from pathlib import Path

from budget3d.errors import UserError

SPLAT_FORMATS = ("ply", "splat", "spz", "sog", "glb", "compressed-ply")
# what each splat format is (for --help); budget3d.export.splats.FILES names the files
SPLAT_HELP = ("ply: Inria float .ply (lossless); splat: antimatter15 .splat (degree 0); spz: Niantic .spz; "
              "sog: PlayCanvas SOG v2 (.sog zip of lossless WebP, SH palette); glb: glTF binary with "
              "KHR_gaussian_splatting (float, +Y up: a half turn about z from the .ply's axes); "
              "compressed-ply: PlayCanvas compressed.ply (16 bytes a splat, chunks of 256)")
NELF_FORMATS = ("onnx", "onnx-int8", "onnx-mixed", "pte")
BUNDLE_FORMATS = ("web",)
EXPORT_FORMATS = SPLAT_FORMATS + NELF_FORMATS + BUNDLE_FORMATS


def add_arguments(x) -> None:
    x.add_argument("run", help="run folder written by 'budget3d train', or a splat file (any format below) to "
                               "convert into the splat formats (with --budget: pruned by orbit-view scores)")
    x.add_argument("--format", metavar="FMT[,FMT...]",
                   help=f"one or more of {', '.join(EXPORT_FORMATS)}, comma-separated (with --lod, the splat "
                        f"formats are the levels' formats). Splats: {SPLAT_HELP}")
    x.add_argument("--budget", metavar="N",
                   help="splats: keep only the N Gaussians of highest Taming score (over a few training views; "
                        "over orbit views of the model itself when the run's scene is gone), e.g. 50000 or 50k; "
                        "no fine-tune")
    x.add_argument("--lod", metavar="N[,N...]",
                   help="a budget ladder in OUT/lod/: nested levels, each the top-N Gaussians by the --budget "
                        "score, as counts (10k,30k,100k) or fractions (0.1,0.3,1.0), smallest first; one "
                        "budget-ordered lod.splat whose byte prefixes are the levels, each level as the splat "
                        "formats in --format (default spz), and lod.json (counts, sizes, byte ranges, test PSNR); "
                        "--format web then streams the ladder")
    x.add_argument("--lod-finetune", type=int, default=0, metavar="STEPS",
                   help="--lod: train every Gaussian of the ladder this many steps on the mean loss of all its "
                        "levels (the levels keep their members; small ones gain, the largest gives up some; "
                        "docs/export.md); default 0: each level is the run's Gaussians unchanged")
    x.add_argument("--lod-ms", type=float, default=33.0, metavar="MS",
                   help="web: the frame-time target of the streamed ladder: the page shows a larger level only "
                        "while frames take less (default 33; the page's ?lod_ms= overrides it)")
    x.add_argument("--out", metavar="DIR", help="output folder (default RUN/export)")
    x.add_argument("--resolution", metavar="WxH|W", help="NeLF formats: output size (default: the student's own)")
    x.add_argument("--max-mb", type=float, help="onnx-mixed: stop keeping layers in float once the file is this small")
    x.add_argument("--max-drop-db", type=float, help="onnx-mixed: PSNR drop allowed against fp32 (default 0.3)")
    x.add_argument("--web-nelf", choices=["int8", "fp32"], default="int8",
                   help="web: which ONNX the page runs (default int8: smaller and faster on phones)")
    x.add_argument("--data", metavar="PATH", help="the run's scene folder, when it moved (NeLF formats and --budget "
                                                  "use its views; splat formats need no scene)")


def parse_count(text: str, what: str) -> int:
    """A Gaussian count as typed: 50000, 50k, 1.5m, 50_000."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 1000, "m": 1000000}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise UserError(f"{what} {text}: expected a count such as 50000 or 50k") from None
    if n < 1:
        raise UserError(f"{what} {text}: keep at least one Gaussian")
    return n


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"


def main(args) -> int:
    run = Path(args.run)
    lod = getattr(args, "lod", None)
    if args.format is None and lod is None:
        raise UserError(f"export: give --format FMT[,FMT...] ({', '.join(EXPORT_FORMATS)}) or --lod N[,N...]")
    fmts = [f.strip().lower() for f in (args.format or "").split(",") if f.strip()]
    unknown = [f for f in fmts if f not in EXPORT_FORMATS]
    if unknown or (not fmts and lod is None):
        raise UserError(f"--format {args.format}: unknown format {', '.join(unknown) or '(none)'}; "
                        f"choose from {', '.join(EXPORT_FORMATS)}")
    from budget3d.export.splats import is_splat_file
    from budget3d.runfolder import check_run_dir

    source = run if is_splat_file(run) else None  # another tool's file: converted, pruned with --budget
    if source is not None:
        from budget3d.export.splats import sniff

        try:
            sniff(run)
        except UserError as e:
            raise UserError(f"{run}: is a file, not a run folder; give a run folder written by 'budget3d train', or "
                            f"a splat file to convert ({str(e).split(': ', 1)[-1]})") from None
        other = [f for f in fmts if f not in SPLAT_FORMATS]
        if lod is not None or other:
            raise UserError(f"{run}: a splat file converts to the splat formats ({', '.join(SPLAT_FORMATS)}); "
                            f"{', '.join(other) or '--lod'} need(s) a run folder written by 'budget3d train'")
    else:
        check_run_dir(run)
        if (lod is not None or any(f in SPLAT_FORMATS for f in fmts)) and not (run / "gaussians.ply").is_file():
            raise UserError(f"{run}: no gaussians.ply; this is not a finished run folder (train it with 'budget3d train')")
    out = Path(args.out) if args.out else (run / "export" if source is None else run.parent / f"{run.stem}-export")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror}); choose another --out") from None
    budget = parse_count(args.budget, "--budget") if args.budget is not None else None
    if lod is None and getattr(args, "lod_finetune", 0):
        raise UserError(f"--lod-finetune {args.lod_finetune}: it fine-tunes a ladder; give the levels with --lod")
    if lod is not None:
        if budget is not None:
            raise UserError("--lod and --budget: give one (the ladder's largest level is its budget)")
        from budget3d.export.lod import export_lod, summary

        manifest = export_lod(run, lod, out, formats=[f for f in fmts if f in SPLAT_FORMATS] or ["spz"],
                              data=args.data, finetune_steps=getattr(args, "lod_finetune", 0))
        print(summary(manifest))
        fmts = [f for f in fmts if f not in SPLAT_FORMATS]  # the levels are the splat files
    params = None
    for fmt in fmts:
        if fmt in SPLAT_FORMATS:
            from budget3d.export.splats import FILES, orbit_scores, reprune, run_scores, save_any
            from budget3d.splat import load_ply

            if params is None:
                if source is not None:
                    from budget3d.export.splats import load_any

                    params = load_any(source)
                else:
                    params = load_ply(run / "gaussians.ply")
                before = len(params["means"])
                if budget is not None and budget < before:
                    scores, what = (None, "a file has no scene") if source is not None else \
                        run_scores(run, params, data=args.data)
                    if scores is None:
                        scores = orbit_scores(params)
                        what = f"Taming score over 8 orbit views of itself, as {what}"
                    params = reprune(params, budget, scores)
                    print(f"budget:   kept {len(params['means'])} of {before} Gaussians by {what}")
            path = out / FILES[fmt]
            n = save_any(params, path, fmt)
            print(f"{fmt:9s} {path}  {_size(path.stat().st_size)}  {n} Gaussians")
        elif fmt == "web":
            from budget3d.export.web import export_web

            result = export_web(run, out, variant=args.web_nelf, data=args.data,
                                lod_target_ms=getattr(args, "lod_ms", 33.0))
            print(f"{fmt:9s} " + "  ".join(f"{k}: {v}" for k, v in (result or {}).items()))
        else:
            opts = {"resolution": args.resolution, "max_mb": args.max_mb, "max_drop_db": args.max_drop_db,
                    "data": args.data}
            if fmt == "pte":
                from budget3d.export.pte import export_pte as export
            else:
                from budget3d.export.onnx import export
            result = export(run, fmt, out, **opts)
            print(f"{fmt:9s} " + "  ".join(f"{k}: {v}" for k, v in (result or {}).items()))
    return 0
