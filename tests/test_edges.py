"""Module edges: benchmarks/ uses only the public API; no checkpoint <-> hub import cycle;
LoRA's peft/diffusers export lives with LoRA. Imports are read from the source (lazy ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import peftvision as pv

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peftvision"


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports, at any depth (function-level too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # submodules imported by name
    return out


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        graph[name] = imported_modules(path, package)
    return {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for dep in graph[stack.pop()]:
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_hub_and_checkpoint_do_not_import_each_other():
    graph = package_graph()
    assert "peftvision.hub" in reachable(graph, "peftvision.loading")  # load_adapter downloads
    assert "peftvision.checkpoint" not in reachable(graph, "peftvision.hub")
    assert "peftvision.loading" not in reachable(graph, "peftvision.hub")
    assert reachable(graph, "peftvision.sharing") >= {"peftvision.checkpoint", "peftvision.hub"}


def test_benchmarks_use_only_the_public_api():
    offenders = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        text = path.read_text()
        private = sorted(m for m in imported_modules(path, "benchmarks")
                         if m.startswith("peftvision.")
                         and m.removeprefix("peftvision.").split(".")[0] not in pv.__all__)
        if private or "_peftvision_state" in text:
            offenders.append(f"{path.relative_to(ROOT)}: {private or '_peftvision_state'}")
    assert not offenders, offenders


def test_nothing_outside_the_library_reads_its_private_state():
    for folder in ("tests", "examples", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != Path(__file__).resolve():
                assert "_peftvision_state" not in path.read_text(), path


def test_peft_interop_is_one_codec_per_method_beside_its_method():
    graph = package_graph()
    for codec, method in (("peft_lora", "lora"), ("peft_lycoris", "loha"), ("peft_lycoris", "lokr"),
                          ("peft_ia3", "ia3"), ("peft_oft", "oft")):
        assert f"peftvision.methods.{method}" in graph[f"peftvision.interop.{codec}"]
    assert "peftvision.interop.peft" in graph["peftvision.checkpoint"]  # save_adapter(format="peft")
    # methods know nothing of other libraries' formats
    assert not any(dep.startswith("peftvision.interop") for name, deps in graph.items()
                   if name.startswith("peftvision.methods") for dep in deps)


def test_einops_the_declared_dependency_is_used():
    users = [p.name for p in PACKAGE.rglob("*.py") if "einops" in imported_modules(p, "peftvision")]
    assert len(users) >= 2, users


def test_no_library_file_is_past_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these (one purpose per file): {long}"
