"""MkDocs hooks: the CLI reference page is generated from the Typer app, so it always says what the command does;
the benchmark results (benchmarks/RESULTS.md, its records and figures) are pages of the site without a copy in docs/,
and the pages' links to them (../benchmarks/RESULTS.md, which resolve outside the site too) point at those pages."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from mkdocs.structure.files import File

BENCHMARK_FILES = {  # site path -> file under benchmarks/
    "results.md": "RESULTS.md",
    "RECORDS.md": "RECORDS.md",
    "sequence_accuracy_vs_budget.png": "sequence_accuracy_vs_budget.png",
    "sequence_accuracy_vs_time.png": "sequence_accuracy_vs_time.png",
}

MARK = "<!-- cli-reference -->"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _reference() -> str:
    import typer

    from logitcache.cli import app

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        out += [f"## `logitcache {name}`", "", _cell(cmd.help or ""), ""]
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        if args:
            out += ["Arguments: " + ", ".join(f"`{a.name.upper()}` ({_cell(a.help or '')})" for a in args), ""]
        out += ["| option | default | what it does |", "|---|---|---|"]
        for p in cmd.params:
            if p.param_type_name != "option" or getattr(p, "hidden", False):
                continue
            flags = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            kind = getattr(getattr(p, "type_descriptor", None), "annotation", None)
            if isinstance(kind, type) and issubclass(kind, Enum):  # a fixed set of choices
                flags += " " + "/".join(f"`{c.value}`" for c in kind)
            value = getattr(p.default, "value", p.default)
            default = "required" if p.required else ("" if value in (None, False) else f"`{_cell(value)}`")
            out.append(f"| {flags} | {default} | {_cell(p.help or '')} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    # The pages link to ../benchmarks/RESULTS.md (and its records and figures), which resolves where the files are
    # read as they are (a code host, an editor); on the site those are pages of their own (on_files).
    for uri, name in BENCHMARK_FILES.items():
        markdown = markdown.replace(f"](../benchmarks/{name}", f"]({uri}")
    return markdown.replace(MARK, _reference()) if MARK in markdown else markdown


def on_files(files, config):
    benchmarks = Path(config.config_file_path).parent / "benchmarks"
    for uri, name in BENCHMARK_FILES.items():
        files.append(File.generated(config, uri, abs_src_path=str(benchmarks / name)))
    return files
