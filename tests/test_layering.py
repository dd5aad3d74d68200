"""The house's layering, read from every import statement (lazy ones inside functions too):

    testtime/  <-  lightning_modules/, datamodules/, callbacks/  <-  cli.py

`testtime/` is plain PyTorch + transformers (no Lightning, nothing above it); a method package
never imports another, except where it is built on it (TinyLoRA on the TTT model); nothing in the
middle layer imports the CLI.
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

METHODS = ("autodeco", "tnot", "tinylora", "ttt", "diffusion", "heads")
BUILT_ON = {"tinylora": {"ttt"}}  # the memory test with an adapter, TinyLoRA on the TTT model
ABOVE_TESTTIME = ("lightning", "pytorch_lightning", "lightning_modules", "datamodules", "callbacks", "cli")


def imports(path, root=ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file under `root`, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def method_of(module: str) -> str | None:
    """The method a `testtime.` module belongs to (its package, or a flat file named after it)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "testtime":
        return None
    return next((m for m in METHODS if parts[1] == m or parts[1].startswith(f"{m}_")), None) or \
        ("tinylora" if parts[1] == "grpo" else None)


def test_testtime_imports_nothing_above_it_and_no_method_imports_another():
    problems = []
    for path in sorted((ROOT / "testtime").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = method_of(module)
        for line, name in imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if name.split(".")[0] in ABOVE_TESTTIME:
                problems.append(where)
            other = method_of(name)
            if own and other and other != own and other not in BUILT_ON.get(own, set()):
                problems.append(where)
    assert not problems, "\n".join(problems)


def test_the_middle_layer_never_imports_the_cli():
    problems = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for folder in ("lightning_modules", "datamodules", "callbacks")
                for path in sorted((ROOT / folder).rglob("*.py"))
                for line, name in imports(path) if name.split(".")[0] == "cli"]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation(tmp_path):
    """The reader resolves relative imports and finds lazy ones: a sketch of a bad file."""
    bad = tmp_path / "testtime" / "ttt" / "probe.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from ..autodeco import x\n    import lightning\n")
    names = [name for _, name in imports(bad, root=tmp_path)]
    assert "testtime.autodeco" in names and "lightning" in names
    assert method_of("testtime.autodeco_export") == "autodeco" and method_of("testtime.grpo") == "tinylora"
