"""The documentation stays true: every relative link in README.md and docs/*.md resolves (file and,
for Markdown targets, the #anchor), every ``budget3d ...`` command they show parses with the CLI's
own argparse parser (a real subcommand with real flags; placeholders such as RUN or SCENE are fine
as values), and the README's test command is exactly the one ``.ci/run`` runs. No training."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
INLINE_COMMAND = re.compile(r"\s*(budget3d|python3? -m budget3d|torchrun\s.*-m budget3d)\s")
SHELL_OPS = {"&&", "||", ";", "|", "&", ";;", "|&"}


def split_page(text: str):
    """(prose lines, fenced code blocks) of a Markdown page; each block is a list of lines."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    seen, out = {}, set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path):
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    for line in prose:
        line = INLINE_CODE.sub("", line)
        for m in (*MD_LINK.finditer(line), *HTML_LINK.finditer(line)):
            yield m.group(1)


def test_there_are_pages_and_links():
    names = {p.name for p in PAGES}
    assert {"README.md", "training.md", "distill.md", "export.md", "viewer.md", "capture.md"} <= names, names
    assert len(list(links(ROOT / "README.md"))) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def shell_commands(page: Path):
    """Every ``budget3d ...`` invocation the page shows: in fenced blocks (continuation lines
    joined, comments dropped, split at && ; | etc.) and in inline code spans; ``python -m budget3d``
    and ``torchrun ... -m budget3d`` count too. Yields (source text, argv after 'budget3d', whether
    it is an inline mention: prose may name a command alone, as in "`budget3d process` needs ...")."""
    prose, blocks = split_page(page.read_text(encoding="utf-8"))
    texts = [("\n".join(b).replace("\\\n", " "), False) for b in blocks]
    for line in prose:
        texts += [(m.group(2), True) for m in INLINE_CODE.finditer(line) if INLINE_COMMAND.match(m.group(2))]
    for text, inline in texts:
        for line in text.splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            lex.commenters = "#"
            try:
                tokens = list(lex)
            except ValueError:
                continue  # not shell (e.g. a folder tree)
            seg = []
            for tok in tokens + [";"]:
                if tok in SHELL_OPS:
                    argv = budget3d_argv(seg)
                    if argv is not None:
                        yield line.strip(), argv, inline
                    seg = []
                else:
                    seg.append(tok)


def budget3d_argv(seg):
    if not seg:
        return None
    if seg[0] == "budget3d":
        return seg[1:]
    for i in range(len(seg) - 1):
        if seg[i] == "-m" and seg[i + 1] == "budget3d" and (seg[0].startswith("python") or seg[0] == "torchrun"):
            return seg[i + 2:]
    return None


@pytest.fixture(scope="module")
def parser():
    from budget3d.cli import _parser

    return _parser()


def subcommands(parser) -> set:
    import argparse

    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def check_parses(parser, argv):
    from budget3d.errors import UserError

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help prints and exits 0
        return None if e.code == 0 else f"exit {e.code}: {out.getvalue().strip()[-300:]}"
    except UserError as e:
        return str(e)
    if args.command is None:
        return "no subcommand"
    return None


def test_readme_shows_commands():
    argvs = [argv for _, argv, _ in shell_commands(ROOT / "README.md")]
    shown = {argv[0] for argv in argvs if argv}
    # the pipeline table names every stage
    assert {"process", "inspect", "train", "eval", "distill", "export", "bench", "view", "serve", "demo"} <= shown, shown


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_budget3d_command_parses(parser, page):
    bad = []
    commands = subcommands(parser)
    for source, argv, inline in shell_commands(page):
        if inline and len(argv) == 1 and not argv[0].startswith("-"):  # a command named in prose: it must exist
            err = None if argv[0] in commands else f"no subcommand {argv[0]!r}"
        else:
            err = check_parses(parser, argv)
        if err:
            bad.append(f"`{source}`: {err}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_a_wrong_command_is_caught(parser):
    assert check_parses(parser, ["train", "--data", "SCENE", "--out", "RUN"]) is None
    assert check_parses(parser, ["train", "--no-such-flag", "1", "--out", "RUN"])
    assert check_parses(parser, ["no-such-command"])
    assert check_parses(parser, ["serve"])  # its folder is required


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    cmd = [line.strip() for line in ci if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(cmd) == 1, cmd
    _, blocks = split_page((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any(line.strip() == cmd[0] for b in blocks for line in b), f"README lacks the exact CI command: {cmd[0]}"
