"""The manual builds with --strict, its generated reference holds every flag of every command, and the README
stays a front door: short, linking into the manual, with no dated measurements (those live on the benchmarks
page, with their date, device and command)."""

import argparse
import importlib.util
import re
import subprocess
import sys
import tomllib
from html import unescape
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HOOK = REPO / "docs" / "hooks" / "reference.py"


def load_hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    # No --quiet: it hides the warnings that --strict turns into a failure.
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def section(html: str, title: str) -> str:
    """The HTML from the heading whose code text is ``title`` to the next heading of level 2 or 3."""
    match = re.search(rf"<h([23])[^>]*><code>{re.escape(title)}</code>", html)
    assert match, f"no heading for {title!r} in the CLI reference"
    following = re.compile(r"<h[23][ >]").search(html, match.end())
    return html[match.end():following.start() if following else len(html)]


def test_every_flag_of_every_command_is_in_the_built_reference(site):
    hook = load_hook()
    commands = hook.commands()
    names = {c.name for c in commands}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    # The discovery must find at least the console scripts and the training entry modules the first hour runs.
    assert set(scripts) | {"python -m training.run", "python -m training.evaluate",
                           "python -m training.synthetic"} <= names, names
    html = (site / "cli" / "index.html").read_text()
    checked = 0
    for command in commands:
        parsers = [hook.parser_of(command)]
        while parsers:
            parser = parsers.pop()
            parsers += hook.subcommands(parser).values()
            text = section(html, parser.prog)
            for action in parser._actions:
                if action.help == argparse.SUPPRESS:  # hidden on purpose (e.g. a benchmark's child-process flag)
                    continue
                for flag in action.option_strings:
                    assert re.search(rf"<code>{re.escape(flag)}[ <]", text), f"{parser.prog} {flag} is not documented"
                    checked += 1
    assert checked > 100  # every command's flags, not an empty page


def test_the_module_layout_lists_every_module(site):
    html = (site / "development" / "index.html").read_text()
    hook = load_hook()
    for folder in [*hook.packages(), *hook.SCRIPT_FOLDERS]:
        for path in hook.module_files(folder, (".py", ".sh")):
            assert f"<code>{path.relative_to(REPO).as_posix()}</code>" in html, path


def test_getting_started_shows_the_readmes_first_hour(site):
    html = (site / "index.html").read_text()
    text = unescape(re.sub(r"<[^>]+>", "", html))  # code blocks are split into highlighted spans
    readme = README.read_text()
    block = readme.split("<!-- first-hour:begin -->")[1].split("<!-- first-hour:end -->")[0]
    commands = [line for line in block.splitlines() if line and not line.startswith(("#", "```"))]
    assert len(commands) > 5 and all(command in text for command in commands)
    assert "agmm:" not in html  # every generated part's marker was replaced


def test_readme_is_a_short_front_door_without_dated_figures():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the manual (docs/) is the place for more"
    dated = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bmeasured\b|\bnot rerun\b|\breal output\b|\bissue \d+", re.I)
    offending = [f"{n}: {line}" for n, line in enumerate(lines, 1) if dated.search(line)]
    assert not offending, "dated figures and run notes belong on docs/benchmarks.md:\n" + "\n".join(offending)


def test_readme_links_into_the_manual_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "the README links into docs/"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    anchors = re.findall(r"\]\(#([^)]+)\)", text)
    headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, re.M)}
    assert set(anchors) <= headings, f"README.md links to missing headings: {set(anchors) - headings}"
