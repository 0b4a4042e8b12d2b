"""The documentation stands on its own: nothing points outside the repository, the README stays short, every
relative link (and its #anchor) resolves, and every CLI command and option is documented in docs/cli.md.

Oracles: git's own list of tracked files, the file system, GitHub's heading-anchor rule written out here, and
the typer app itself (the commands and options that actually exist), not a list kept by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# Written in pieces so that this file does not match its own search.
OUTSIDE = ["../" + "shared", "shared" + "/spec", "RECIPES" + " §", "RECIPES" + ".md"]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (git ls-files is the list of files that belong to the repository)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        for needle in OUTSIDE:
            for lineno, line in enumerate(data.split(b"\n"), start=1):
                if needle.encode() in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {needle}")
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < 260, f"README.md has {n} lines; move detail into docs/ (limit 260)"


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks (a `[x](y)` inside code is not a link)."""
    out, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
            continue
        if not in_code:
            out.append(line)
    return out


def github_anchor(heading: str) -> str:
    """GitHub's rule: drop markup, lower-case, keep letters, digits, spaces, '-' and '_', spaces become '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        a = github_anchor(m.group(1))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def test_github_anchor_rule():
    assert github_anchor("Speed-up (onnxruntime CPU, 1 thread, dense vs pruned interleaved in one run)") == \
        "speed-up-onnxruntime-cpu-1-thread-dense-vs-pruned-interleaved-in-one-run"
    assert github_anchor("MiniLM-L6 (`benchmarks/quant_minilm.py`)") == "minilm-l6-benchmarksquant_minilmpy"
    assert github_anchor("`compress bench-kernels`") == "compress-bench-kernels"


def test_every_relative_link_resolves():
    broken = []
    for md in markdown_files():
        for line in prose_lines(md.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                    continue
                file_part, _, anchor = target.partition("#")
                dest = md if not file_part else (md.parent / file_part).resolve()
                where = f"{md.relative_to(ROOT)}: ({target})"
                if not dest.exists():
                    broken.append(f"{where}: no such file")
                elif not dest.resolve().is_relative_to(ROOT):
                    broken.append(f"{where}: points outside the repository")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def cli_commands() -> dict[str, list[str]]:
    """{'run': ['--recipe', ...], 'recipes list': [...]} from the typer app itself."""
    import typer

    from compressor.cli import app

    out: dict[str, list[str]] = {}

    def walk(cmd, prefix: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*prefix, name])
        else:
            opts = [o for p in cmd.params if p.name != "help" for o in p.opts if o.startswith("--")]
            out[" ".join(prefix)] = opts

    walk(typer.main.get_command(app), [])
    return out


def test_every_cli_command_and_option_is_documented():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    sections = {m.group(1): m.start() for m in re.finditer(r"^### `compress ([^`]+)`\s*$", text, re.M)}
    commands = cli_commands()
    assert len(commands) >= 9, commands  # the walk found the app's commands, not an empty group
    missing = []
    for name, opts in sorted(commands.items()):
        if name not in sections:
            missing.append(f"compress {name}: no '### `compress {name}`' section")
            continue
        start = sections[name]
        end = min([s for s in sections.values() if s > start], default=len(text))
        body = text[start:end]
        missing += [f"compress {name}: option {o} not in its section" for o in opts if f"`{o}`" not in body]
    assert not missing, "docs/cli.md is missing:\n" + "\n".join(missing)


def test_index_links_every_page():
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {t.partition("#")[0] for t in LINK.findall(text)}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages and not pages - linked, f"docs/index.md does not link {sorted(pages - linked)}"
