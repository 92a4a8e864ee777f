"""Griffe extension: read this package's Google-style docstrings, written for Sphinx, as Markdown.

mkdocstrings loads it (``mkdocs.yml``: ``extensions``) and it rewrites each docstring's text
before it is parsed, leaving the source untouched:

- ``a, b: description`` entries of ``Args:`` / ``Attributes:`` sections (names may wrap onto
  the next lines) become one ``a: description`` entry per name, so griffe checks every name
  against the signature;
- Sphinx roles (``:func:`~attention_drift.x.f```, ``:class:`Name```, ``:meth:`title <target>```)
  become cross-references, resolved the way Sphinx does (fully qualified, or relative to the
  object, its class, its module and the packages above): linked where the target has a page,
  code text otherwise;
- a paragraph ending in ``::`` (an RST literal block follows) ends in ``:``.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

import griffe

# under mkdocs' logger: a warning counts towards `mkdocs build --strict`
logger = logging.getLogger("mkdocs.plugins.griffe_sphinx_compat")

ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<text>[^`]+)`")
LITERAL_OR_ROLE = re.compile(rf"(?P<literal>``.+?``)|{ROLE.pattern}", re.DOTALL)
EXPLICIT = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")
SECTION = re.compile(
    r"^(?P<indent>\s*)(?:Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments"
    r"|Other Parameters|Attributes):\s*$"
)
NAMES = re.compile(r"^(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)\s*:(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_entries(text: str) -> str:
    """One entry per name in ``Args:``-like sections: ``a, b: desc`` -> ``a: desc`` / ``b: desc``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        section = SECTION.match(line)
        if not section:
            continue
        outer = len(section["indent"])
        entry_indent = None
        while i < len(lines):
            line = lines[i]
            if line.strip() and _indent(line) <= outer:
                break  # the section ended
            if not line.strip() or (entry_indent is not None and _indent(line) > entry_indent):
                out.append(line)
                i += 1
                continue
            entry_indent = _indent(line) if entry_indent is None else entry_indent
            # an entry: its first line, then its continuation lines (deeper, or blank)
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > entry_indent):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():
                end -= 1
            entry = lines[i:end]
            out.extend(_split_entry(entry, entry_indent))
            i = end
    return "\n".join(out)


def _split_entry(entry: list[str], indent: int) -> list[str]:
    # the names may wrap: join lines while the head ends with a comma and has no colon yet
    head_lines = 1
    head = entry[0].strip()
    while ":" not in head and head.endswith(",") and head_lines < len(entry):
        head += " " + entry[head_lines].strip()
        head_lines += 1
    match = NAMES.match(head)
    if not match:
        return entry
    names = [name.strip() for name in match["names"].split(",")]
    body = entry[head_lines:]
    pad = " " * indent
    out = []
    for name in names:
        out.append(f"{pad}{name}:{match['rest']}")
        out.extend(body)
    return out


def lookup(collection: griffe.ModulesCollection, path: str) -> griffe.Object | None:
    """The object at dotted ``path`` (re-exports followed, inherited members found), or None."""
    head, *rest = path.split(".")
    try:
        obj = collection.members[head]
        for part in rest:
            obj = (obj.all_members if obj.is_class else obj.members)[part]
            if obj.is_alias:
                obj = obj.final_target
    except Exception:  # noqa: BLE001 - unknown name, alias to an unloaded package: no target
        return None
    return obj


def resolve(target: str, obj: griffe.Object, collection: griffe.ModulesCollection) -> str | None:
    """The path of the object ``target`` names as seen from ``obj``'s docstring, or None.

    Like Sphinx: relative to ``obj``, then to each object it is in (class, module, packages),
    then as a full path.
    """
    target = target.lstrip(".")
    candidates = []
    scope: griffe.Object | None = obj
    while scope is not None:
        candidates.append(f"{scope.path}.{target}")
        scope = scope.parent
    candidates.append(target)
    for candidate in candidates:
        found = lookup(collection, candidate)
        if found is not None:
            return found.path
    return None


def convert_roles(text: str, obj: griffe.Object, collection: griffe.ModulesCollection) -> str:
    """Sphinx roles -> mkdocs-autorefs references (optional: unresolved ones render as code).

    A role whose target is a full path into ``obj``'s own package that names nothing (a module
    moved, a function renamed) is logged as a warning, which fails a strict build; short
    names that resolve nowhere (lazy package exports, other libraries) are left as code.
    """

    def replace(match: re.Match) -> str:
        text = match["text"]
        explicit = EXPLICIT.match(text)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = text.lstrip("~")
            title = target.rpartition(".")[2] if text.startswith("~") else target
        code = f"<code>{html.escape(title)}</code>"
        target = target.lstrip("~")
        path = resolve(target, obj, collection)
        if path is None:
            if target.startswith(obj.package.name + "."):
                logger.warning(
                    "%s:%s: %s: no such object %r", obj.relative_filepath, obj.docstring.lineno, obj.path, target
                )
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    prose: list[str] = []  # lines outside RST literal blocks, converted together
    out: list[str] = []

    def flush() -> None:
        # an inline literal (``...``, which may wrap) is code: roles inside it stay as written
        out.extend(LITERAL_OR_ROLE.sub(lambda m: m[0] if m["literal"] else replace(m), "\n".join(prose)).split("\n"))
        prose.clear()

    literal_indent = None  # inside an RST literal block (after "::"): leave the lines alone
    for line in text.split("\n"):
        if literal_indent is not None:
            if not line.strip() or _indent(line) > literal_indent:
                out.append(line)
                continue
            literal_indent = None
        if line.rstrip().endswith("::"):
            literal_indent = _indent(line)
            stripped = line.rstrip()[:-2].rstrip()
            line = stripped + ":" if stripped else ""
            prose.append(line)
            flush()
            continue
        prose.append(line)
    flush()
    return "\n".join(out)


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias and member.parent is obj:
            yield from _objects(member)


class SphinxCompat(griffe.Extension):
    """Rewrites the docstrings of every loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                value = split_grouped_entries(obj.docstring.value)
                obj.docstring.value = convert_roles(value, obj, loader.modules_collection)
