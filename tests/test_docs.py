"""The API reference's generator (docs/gen_ref.py) and its docstring extension (docs/griffe_sphinx_compat.py).

Cheap checks, no mkdocs build (``make docs`` does that, strict, in CI): every public module gets a
page and a nav entry, found without importing the package; the extension splits grouped ``Args``
entries and resolves Sphinx roles, and warns on a full path that names nothing.
"""

import importlib.util
import logging
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(path: Path, prefix: str) -> list[str]:
    """Modules and packages under ``path`` as the import system sees them (nothing imported)."""
    names = []
    for info in pkgutil.iter_modules([str(path)]):
        if info.name.startswith("_"):
            continue
        names.append(prefix + info.name)
        if info.ispkg:
            names += _walk(path / info.name, f"{prefix}{info.name}.")
    return names


def test_every_public_module_gets_a_page_and_a_nav_entry():
    gen_ref = _load("gen_ref")
    modules = gen_ref.public_modules()
    assert modules == sorted(modules, key=lambda m: m.split(".")) and modules[0] == "attention_drift"
    assert set(modules) == {"attention_drift", *_walk(ROOT / "attention_drift", "attention_drift.")}
    pages = [gen_ref.page_path(m, modules) for m in modules]
    assert len(set(pages)) == len(pages)
    assert gen_ref.page_path("attention_drift.editing", modules) == "attention_drift/editing/index.md"
    # each page once in the nav, each nested under its package's section
    nav = gen_ref.summary(modules)
    linked = re.findall(r"\]\(([^)]+)\)", nav)
    assert sorted(linked) == sorted(pages)
    assert "* editing\n    * [attention_drift.editing](attention_drift/editing/index.md)\n    * [alphaedit](" in nav


def test_generator_skips_private_modules_and_data_folders(tmp_path):
    gen_ref = _load("gen_ref")
    pkg = tmp_path / "pkg"
    for rel in ["__init__.py", "a.py", "_private.py", "__main__.py", "sub/__init__.py", "sub/b.py",
                "_hidden/__init__.py", "_hidden/c.py", "templates/d.py"]:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text('"""Doc."""\n')
    assert gen_ref.public_modules(tmp_path, "pkg") == ["pkg", "pkg.a", "pkg.sub", "pkg.sub.b"]


def test_landing_page_links_point_at_readme_sections():
    """docs/index.md links into the repository (mkdocs cannot check those): README anchors must exist."""
    readme = (ROOT / "README.md").read_text()
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    links = re.findall(r"\]\(\.\./README\.md#([^)]+)\)", (ROOT / "docs" / "index.md").read_text())
    assert links and set(links) <= slugs


def test_extension_splits_grouped_args_and_resolves_roles(tmp_path, caplog):
    griffe = pytest.importorskip("griffe", reason="the docs extra (make docs) is not installed")
    compat = _load("griffe_sphinx_compat")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Package: :func:`~pkg.mod.f`, :class:`mod.Child`."""\n')
    (pkg / "mod.py").write_text('''"""Module: :meth:`Child.to_dict`, :func:`pkg.mod.gone`, :func:`elsewhere`.

Typical use::

    f(:func:`not_a_role`)
"""


class Base:
    def to_dict(self) -> dict:
        """A dict, as ``{"x" (of :data:`pkg.mod.nothing`)}``."""


class Child(Base):
    """See :meth:`to_dict` and :meth:`the function <pkg.mod.f>`."""


def f(a: int, b: int, c: int, d: int) -> None:
    """Do it.

    Args:
        a, b: the first two,
            on two lines.
        c,
            d: the last two.
    """
''')
    loader = griffe.GriffeLoader(search_paths=[str(tmp_path)], extensions=griffe.load_extensions(compat.SphinxCompat))
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.griffe_sphinx_compat"):
        package = loader.load("pkg")
    # only the full path into the package that names nothing warns (not the short name, not a literal)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].endswith("pkg/mod.py:1: pkg.mod: no such object 'pkg.mod.gone'")

    mod = package["mod"]
    ref = '<autoref identifier="{}" optional><code>{}</code></autoref>'
    assert package.docstring.value == (
        f"Package: {ref.format('pkg.mod.f', 'f')}, {ref.format('pkg.mod.Child', 'mod.Child')}."
    )
    assert mod.docstring.value.startswith(
        f"Module: {ref.format('pkg.mod.Base.to_dict', 'Child.to_dict')}, <code>pkg.mod.gone</code>, "
        "<code>elsewhere</code>.\n\nTypical use:\n\n    f(:func:`not_a_role`)"
    )
    assert mod["Base.to_dict"].docstring.value == 'A dict, as ``{"x" (of :data:`pkg.mod.nothing`)}``.'
    assert mod["Child"].docstring.value == (
        f"See {ref.format('pkg.mod.Base.to_dict', 'to_dict')} and {ref.format('pkg.mod.f', 'the function')}."
    )
    parameters = mod["f"].docstring.parse(griffe.Parser.google, warn_unknown_params=True)[1].value
    assert [(p.name, p.description) for p in parameters] == [
        ("a", "the first two,\non two lines."), ("b", "the first two,\non two lines."),
        ("c", "the last two."), ("d", "the last two."),
    ]
