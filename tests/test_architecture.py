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
