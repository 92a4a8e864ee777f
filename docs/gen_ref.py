"""Generate the API reference: one page per public module of ``attention_drift``, plus its nav.

mkdocs-gen-files runs this at build time (``mkdocs.yml``: ``plugins: gen-files: scripts``). The
module list comes from walking the package directory, so moving or adding modules needs no edit
here or in ``mkdocs.yml``. A module is public unless a part of its dotted name starts with ``_``
(``__init__`` stands for its package). Nothing is imported: mkdocstrings reads the sources
statically (griffe), so building the docs needs neither torch nor a model.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "attention_drift"
ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "reference"


def public_modules(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """Dotted names of the package's public modules and subpackages, sorted, package first."""
    names = []
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif not (path.parent / "__init__.py").is_file():
            continue
        # a directory without __init__.py is not a package (data, templates): skip what is below it
        if any(not (root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return sorted(names, key=lambda name: name.split("."))


def page_path(module: str, modules: list[str]) -> str:
    """Where ``module``'s page goes, relative to ``reference/``: a package's is its ``index.md``."""
    parts = module.split(".")
    if any(other.startswith(module + ".") for other in modules):
        return "/".join(parts) + "/index.md"
    return "/".join(parts) + ".md"


def summary(modules: list[str]) -> str:
    """The literate nav of ``reference/``, the package tree.

    The package's page comes first and its modules follow at the same level; a subpackage is a
    section holding its own page (under its full name) and then its modules.
    """
    lines = []
    for module in modules:
        parts = module.split(".")
        depth = max(len(parts) - 2, 0)
        path = page_path(module, modules)
        if len(parts) > 1 and path.endswith("/index.md"):
            lines.append(f"{'    ' * depth}* {parts[-1]}")
            lines.append(f"{'    ' * (depth + 1)}* [{module}]({path})")
        else:
            lines.append(f"{'    ' * depth}* [{module if len(parts) == 1 else parts[-1]}]({path})")
    return "\n".join(lines) + "\n"


def main() -> None:
    import mkdocs_gen_files

    modules = public_modules()
    for module in modules:
        path = f"{REFERENCE}/{page_path(module, modules)}"
        with mkdocs_gen_files.open(path, "w") as page:
            page.write(f"::: {module}\n")
    with mkdocs_gen_files.open(f"{REFERENCE}/SUMMARY.md", "w") as nav:
        nav.write(summary(modules))


if __name__ == "<run_path>":  # run by mkdocs-gen-files (runpy.run_path); importing it writes nothing
    main()
