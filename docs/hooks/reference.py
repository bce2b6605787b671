"""MkDocs hook: the parts of the manual that are read from the code at build time, so they cannot drift.

A page asks for one with a marker line, replaced before the page is rendered:

=================================  ====================================================================
marker                             replaced with
=================================  ====================================================================
``<!-- agmm:cli-reference -->``    every command's usage, arguments, defaults and help, from its
                                   ``get_args_parser()`` (subcommands included), benchmarks too
``<!-- agmm:module-layout -->``    every module of the packages, benchmarks and scripts, with the first
                                   line of its docstring
``<!-- agmm:first-hour -->``       the README's first-hour block, the one ``tests/test_first_hour.py`` runs
``<!-- agmm:runtime-table -->``    the runtime table (``agmm_deploy.runtime.backends()``)
``<!-- agmm:precision-table -->``  the precision table (``agmm_deploy.export.precision.PRECISIONS``) with
                                   each row's parity gates
``<!-- agmm:settings-table -->``   the service's settings (``serving.settings.SETTINGS_TABLE``)
=================================  ====================================================================

The commands are found, not listed: every module of the packages pyproject.toml installs that defines a
top-level ``get_args_parser()`` is one, named by its ``[project.scripts]`` entry where it has one and
``python -m <module>`` otherwise, and so is every file of benchmarks/ and scripts/ that defines one (``python
benchmarks/<file>``). A flag added on any branch shows up here with no edit to the docs.
"""

from __future__ import annotations

import argparse
import ast
import html
import importlib
import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
README = REPO / "README.md"
FIRST_HOUR = ("<!-- first-hour:begin -->", "<!-- first-hour:end -->")  # the markers tests/test_first_hour.py reads
# Folders of runnable files that are not packages, listed in the layout beside the packages.
SCRIPT_FOLDERS = ("benchmarks", "scripts")


@dataclass(frozen=True)
class Command:
    name: str     # what a user types: agmm-export, python -m training.run, python benchmarks/loss_speed.py
    module: str   # the module that holds get_args_parser()
    path: Path | None = None  # for a script outside the packages: its file, imported from there


def packages() -> list[str]:
    """The top-level packages pyproject.toml installs (``[tool.setuptools.packages.find] include``)."""
    include = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in include]


def module_files(folder: str, suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*") if p.suffix in suffixes and "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defines_parser(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    return any(isinstance(node, ast.FunctionDef) and node.name == "get_args_parser" for node in tree.body)


def commands() -> list[Command]:
    """Every command: console scripts first (in pyproject.toml's order), then ``python -m`` modules by name,
    then the benchmark and script files run as ``python <file>``."""
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    by_module = {target.split(":")[0]: name for name, target in scripts.items()}
    found = [module_name(p) for package in packages() for p in module_files(package) if defines_parser(p)]
    named = [Command(by_module[m], m) for m in by_module if m in found]
    modules = [Command(f"python -m {m}", m) for m in found if m not in by_module]
    files = [Command(f"python {p.relative_to(REPO).as_posix()}", f"agmm_docs_{p.parent.name}_{p.stem}", p)
             for folder in SCRIPT_FOLDERS for p in module_files(folder) if defines_parser(p)]
    return named + modules + files


def parser_of(command: Command) -> argparse.ArgumentParser:
    if command.path is None:
        module = import_repo_module(command.module)
    else:  # benchmarks/ and scripts/ are folders of files, not packages
        import_repo_module("agmm_deploy")  # puts the repository on sys.path, as running the file from it does
        spec = importlib.util.spec_from_file_location(command.module, command.path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[command.module] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    parser = module.get_args_parser()
    parser.prog = command.name  # a parser without its own prog would be named after sys.argv[0] (mkdocs)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def escape(text: str) -> str:
    """Help text as literal Markdown in a table cell: no emphasis, links or HTML from its * _ [ ] < |."""
    text = html.escape(" ".join(text.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + formatter._format_args(action, action.dest.upper())
            flags = ", ".join(f"`{flag}{metavar}`" for flag in action.option_strings)
        else:
            flags = f"`{formatter._metavar_formatter(action, action.dest)(1)[0]}`"
        default = action.default
        shown = ("" if default in (None, argparse.SUPPRESS, False) or action.nargs == 0 or action.required
                 else f"`{default}`")
        help_text = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            help_text = "required. " + help_text
        rows.append(f"| {flags} | {shown} | {escape(help_text)} |")
    return rows


def render_parser(parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{parser.prog}`", ""]
    if parser.description:
        lines += [escape(parser.description), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    lines += argument_rows(parser) + [""]
    if parser.epilog:
        lines += ["```text", parser.epilog.strip(), "```", ""]
    for sub in subcommands(parser).values():
        lines += render_parser(sub, level + 1)
    return lines


def cli_reference() -> str:
    lines = []
    for command in commands():
        lines += render_parser(parser_of(command), 2)
    return "\n".join(lines)


def first_docstring_line(path: Path) -> str:
    """A module's docstring up to its first blank line; a shell script's first comment after the shebang."""
    if path.suffix == ".sh":
        comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines()[1:] if line.startswith("#")]
        return comments[0] if comments else ""
    doc = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def module_layout() -> str:
    lines = []
    for folder in [*packages(), *SCRIPT_FOLDERS]:
        lines += [f"### `{folder}/`", "", "| file | what it is |", "|---|---|"]
        for path in module_files(folder, (".py", ".sh")):
            lines.append(f"| `{path.relative_to(REPO).as_posix()}` | {escape(first_docstring_line(path))} |")
        lines.append("")
    return "\n".join(lines)


def first_hour() -> str:
    text = README.read_text()
    begin, end = FIRST_HOUR
    return text.split(begin)[1].split(end)[0].strip()


def import_repo_module(name: str):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(name)


def runtime_table() -> str:
    runtime = import_repo_module("agmm_deploy.runtime")
    lines = ["| runtime | artifact | file suffixes | devices | precisions | install |", "|---|---|---|---|---|---|"]
    for row in runtime.backends():
        lines.append(f"| `{row.name}` | {row.artifact} | {', '.join(f'`{s}`' for s in row.suffixes)} | "
                     f"{', '.join(row.devices)} | {', '.join(row.precisions)} | {escape(row.install)} |")
    return "\n".join(lines)


def gate_cells(gates) -> list[str]:
    """The three parity gates of a precision as table cells: logits allclose, argmax agreement, mIoU delta."""
    if gates is None:
        return ["-", "-", "-"]
    allclose = escape(f"|diff| <= {gates.formula()}") if gates.allclose_checked() else "-"
    agreement = f">= {gates.min_agreement * 100:g} %" if gates.min_agreement is not None else "-"
    miou = f"<= {gates.max_miou_delta:g}" if gates.max_miou_delta is not None else "-"
    return [allclose, agreement, miou]


def precision_table() -> str:
    precision = import_repo_module("agmm_deploy.export.precision")
    parity = import_repo_module("agmm_deploy.export.parity")
    lines = ["| precision | runtime | file | made for | calibration | logits allclose | argmax agreement "
             "| mIoU delta |", "|---|---|---|---|---|---|---|---|"]
    for row in precision.PRECISIONS:
        cells = [row.name, f"`{row.runtime}`", f"`{row.file_name}`", row.device,
                 "`--calib-images`" if row.calibrated else "-", *gate_cells(parity.DEFAULT_GATES.get(row.name))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_table() -> str:
    settings = import_repo_module("serving.settings")
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for variable, default, meaning in settings.SETTINGS_TABLE:
        lines.append(f"| `{variable}` | `{default}` | {escape(meaning)} |")
    return "\n".join(lines)


GENERATORS = {"<!-- agmm:cli-reference -->": cli_reference, "<!-- agmm:module-layout -->": module_layout,
              "<!-- agmm:first-hour -->": first_hour, "<!-- agmm:runtime-table -->": runtime_table,
              "<!-- agmm:precision-table -->": precision_table,
              "<!-- agmm:settings-table -->": settings_table}


def on_page_markdown(markdown: str, **kwargs) -> str:
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
