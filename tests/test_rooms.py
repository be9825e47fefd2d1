"""The room rules, read from the source with `ast` (every import statement, also those inside functions).

- model/ imports only torch, numpy (host-side scalar loops of decoding, where a numpy op costs a
  fifth of a torch one), the standard library and pico.model: it knows tensors, not files, ranks
  or configs of other stages.
- data_prep/ never imports pico.model, pico.pipeline or pico.cluster: it writes shards and never
  trains. Its shared machinery (UserError, field_docs) comes from pico.configs.
- configs/ imports only the standard library, yaml, pico.configs and pico.model.config: it is the
  light room every other room may import.
- cluster/ holds no training logic and no network. Decision (lead, issue 14): besides itself it
  may import only the torch-free light modules pico.configs (config tree, errors, and
  pico.configs.runs: checkpoint discovery on disk), pico.model.config (the width rules:
  hidden_width, n_routed) and pico.model.flops (parameter and FLOP counts, GPU_PEAK_FLOPS; counting
  a routed config asks its router's class, which loads torch at that call, not at import: issue 27
  put each router's counts in the router's own file). Never pico.pipeline (trainer, checkpoint writer), pico.model.pico or
  pico.model.generate. It imports the FLOP counts and checkpoint discovery instead of copying them.

`pico.model`'s package __init__ loads its submodules lazily, so the light modules really are
light: the last test imports them in a fresh interpreter and checks that torch stayed out.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def imports(folder: str) -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every import statement under folder."""
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(REPO)), node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: relative import; write the full pico.* name"
                base = node.module or ""
                # `from pico.model import flops` may import the module pico.model.flops: keep the name
                found += [(str(path.relative_to(REPO)), node.lineno,
                           f"{base}.{a.name}" if under(base, "pico") else base) for a in node.names]
    assert found, f"no imports found under {folder}/"
    return found


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(folder: str, allowed) -> list[str]:
    return [f"{f}:{line}: imports {mod}" for f, line, mod in imports(folder) if not allowed(mod)]


def test_model_imports_only_torch_stdlib_and_itself():
    def ok(mod: str) -> bool:
        top = mod.split(".")[0]
        return top in STDLIB or top in ("torch", "numpy") or under(mod, "pico.model")

    assert violations("model", ok) == []


def test_data_prep_never_imports_model_pipeline_or_cluster():
    assert violations("data_prep", lambda m: not under(m, "pico.model", "pico.pipeline", "pico.cluster")) == []


def test_configs_import_only_light_modules():
    def ok(mod: str) -> bool:
        return mod.split(".")[0] in STDLIB or mod == "yaml" or under(mod, "pico.configs", "pico.model.config")

    assert violations("configs", ok) == []


CLUSTER_MAY_IMPORT = ("pico.cluster", "pico.configs", "pico.model.config", "pico.model.flops")


def test_cluster_imports_only_light_pico_modules():
    def ok(mod: str) -> bool:
        return not under(mod, "pico") or under(mod, *CLUSTER_MAY_IMPORT)

    assert violations("cluster", ok) == []


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checker is not vacuous: a forbidden import in a scratch room is reported with its line."""
    import tests.test_rooms as rooms

    room = tmp_path / "room"
    room.mkdir()
    (room / "bad.py").write_text("import os\n\ndef f():\n    from pico.pipeline.train import trainer\n")
    monkeypatch.setattr(rooms, "REPO", tmp_path)
    assert violations("room", lambda m: not under(m, "pico.pipeline")) == [
        "room/bad.py:4: imports pico.pipeline.train.trainer"]


@pytest.mark.parametrize("module", ["pico.cluster.plan", "pico.cluster.cli", "pico.configs.tree", "pico.configs.runs",
                                    "pico.model.flops", "pico.data_prep.cli"])
def test_light_modules_load_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {module} loaded torch"
