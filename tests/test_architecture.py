"""The package's shape: data flows one way, no import cycles, library code never imports the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

import attention_drift

PACKAGE = Path(attention_drift.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every attention_drift module ``path`` imports, anywhere in the file (function-local too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("attention_drift"):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = _imports(path, known) - {name}
        # a package importing its own submodules (editing/__init__ -> editing.api) is not a cycle source;
        # a submodule importing its package is recorded as it is written.
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # package -> own submodule
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, [node]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_the_cli():
    graph = _graph()
    offenders = sorted(m for m, edges in graph.items() if "attention_drift.cli" in edges and m != "attention_drift.cli")
    assert not offenders, f"library modules importing attention_drift.cli: {offenders}"


def test_cli_help_does_not_import_torch():
    """``attention-drift --help`` answers at once: nothing heavy is imported to parse arguments."""
    code = ("import sys; from attention_drift import cli; cli.build_parser();"
            "heavy = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hook_names_are_only_built_by_the_helper():
    """Every ``blocks.L.<hook>`` string is made by :func:`attention_drift.core.hooks.act_name`."""
    offenders = []
    for name, path in _modules().items():
        if name == "attention_drift.core.hooks":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if text.startswith("blocks.") and "hook_" in text:
                    offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"hand-built hook names: {offenders}"


LAYERS = ("core", "editing", "measure", "reports", "views", "runs")
"""The subpackages in data-flow order (load -> edit -> measure -> report -> view, and the runs that
drive them): a module may import its own layer and the layers before it, never a later one.
``cli``, ``demo`` and the package's ``__init__`` sit above every layer."""


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer():
    loose = sorted(m for m in _modules() if _layer(m) is None
                   and m not in ("attention_drift", "attention_drift.cli", "attention_drift.demo"))
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_layers_import_only_earlier_layers():
    offenders = []
    for module, edges in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        offenders += [f"{module} -> {e}" for e in sorted(edges) if (_layer(e) or 0) > mine
                      or e in ("attention_drift.cli", "attention_drift.demo")]
    assert not offenders, "imports against the data flow:\n" + "\n".join(offenders)


def test_editing_imports_neither_evaluation_nor_runs():
    """An edit does not depend on how it is scored: SADR+'s check reads scores through core."""
    offenders = sorted(f"{m} -> {e}" for m, edges in _graph().items() if m.startswith("attention_drift.editing")
                       for e in edges if e.startswith(("attention_drift.measure", "attention_drift.runs")))
    assert not offenders, offenders


def test_layer_rules_would_catch_a_backward_import(tmp_path):
    """The rule's own check: a core module importing a view is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from attention_drift.views.plots import save\n")
    assert _imports(bad, set(_modules())) == {"attention_drift.views.plots"}
    assert _layer("attention_drift.views.plots") > _layer("attention_drift.core.models")


def test_no_module_is_over_the_size_limit():
    """Modules stay readable in one sitting; the few cohesive exceptions are named in ARCHITECTURE.md."""
    allowed = {"attention_drift.cli", "attention_drift.views.explorer", "attention_drift.views.plots",
               "attention_drift.measure.drift", "attention_drift.measure.patching"}
    over = sorted(f"{m} ({n} lines)" for m, p in _modules().items()
                  if (n := len(p.read_text().splitlines())) > 600 and m not in allowed)
    assert not over, f"modules over 600 lines: {over}; split them or say why in ARCHITECTURE.md"
