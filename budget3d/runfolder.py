"""The run folder, the one contract between stages: reading its config.json and finding its scene.

``budget3d train`` stores the scene as an absolute path, so a run works from any directory.
Older runs stored the path as typed (relative to where training ran); and a run folder may move
with its scene beside or inside it (``budget3d process`` puts one in RUN/scene). So a stored path
that is not there is also looked for relative to the run folder, and then by its last name
inside the run folder; otherwise the error names the scene and says to pass ``--data``.
Commands that need no images (splat exports, serving, viewing splats) never call ``scene_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from budget3d.errors import UserError

CONFIG = "config.json"
WRITTEN_BY = "a folder written by 'budget3d train --out'"


def check_run_dir(run_dir) -> Path:
    """``run_dir`` as a Path, or a one-line error when it is missing or not a folder."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run folder; give {WRITTEN_BY}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run folder; give {WRITTEN_BY}")
    return run_dir


def read_config(run_dir) -> dict:
    """The run's config.json as a dict (one-line errors for a missing or damaged file)."""
    run_dir = check_run_dir(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no {CONFIG}); give {WRITTEN_BY}")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable run config ({type(e).__name__}: {e}); retrain the run "
                        "or restore the file") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a run config (a JSON object of settings); retrain the run or restore the file")
    return saved


def scene_path(run_dir, saved: dict, override: Optional[str] = None) -> Path:
    """Where the run's scene is: ``override`` (the ``--data`` flag), else the stored path, else
    that path relative to the run folder, else its last name inside the run folder."""
    run_dir = Path(run_dir)
    if override:
        p = Path(override).expanduser()
        if not p.exists():
            raise UserError(f"--data {override}: no such scene folder; give the folder the run was trained on")
        return Path(os.path.abspath(p))
    data = saved.get("data")
    if not data:
        raise UserError(f"{run_dir / CONFIG}: names no scene ('data'); pass --data PATH (the scene the run "
                        "was trained on)")
    p = Path(str(data)).expanduser()
    tried = [p] if p.is_absolute() else [p, run_dir / p]
    tried.append(run_dir / p.name)
    for c in tried:
        if c.exists():
            return Path(os.path.abspath(c))
    where = ", ".join(dict.fromkeys(str(c) for c in tried[1:]))
    raise UserError(f"{run_dir / CONFIG}: the run's scene {data} is missing (also looked for {where}); "
                    "pass --data PATH to point to the scene the run was trained on")


def load_run_scene(run_dir, saved: Optional[dict] = None, override: Optional[str] = None, **kw):
    """The run's scene (``budget3d.scene.load_scene``) at the run's downscale."""
    from budget3d.scene import load_scene

    saved = read_config(run_dir) if saved is None else saved
    try:
        downscale = int(saved.get("downscale", 1) or 1)
    except (TypeError, ValueError):
        raise UserError(f"{Path(run_dir) / CONFIG}: downscale {saved.get('downscale')!r} is not a whole number; "
                        "fix or retrain the run") from None
    return load_scene(str(scene_path(run_dir, saved, override)), downscale=downscale, **kw)
