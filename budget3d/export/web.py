"""Placeholder while this part is being built (replaced by its owner)."""

from budget3d.errors import UserError


def add_arguments(p):
    p.add_argument("run", help="run folder written by 'budget3d train'")


def main(args) -> int:
    raise UserError("this command is not built yet in this version")


def export_web(run, out):
    raise UserError("--format web is not built yet in this version")
