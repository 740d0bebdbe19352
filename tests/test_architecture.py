"""The package's shape, as docs/architecture.md states it: no import cycle among calibjax's
modules, no private name used outside its module, and ``import calibjax`` loading the array
core alone."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"calibjax": ROOT / "calibjax", "calibjax_kernels": ROOT / "kernels",
            "experiments": ROOT / "experiments"}


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for package, folder in PACKAGES.items():
    for path in folder.rglob("*.py"):
      parts = (package,) + path.relative_to(folder).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports(name: str, path: pathlib.Path, known) -> list[tuple[str, str, bool]]:
  """``(imported module, name used, at module level)`` for each import in a module."""
  tree = ast.parse(path.read_text())
  top = set(map(id, tree.body))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    level = id(node) in top
    if isinstance(node, ast.Import):
      out += [(a.name, a.name, level) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        out.append((full if full in known else base, a.name, level))
  return out


def test_no_import_cycle_among_module_level_imports():
  known = modules()
  graph = {name: {m for m, _, level in imports(name, path, known) if level and m in known
                  and m != name}
           for name, path in known.items()}
  # a package's __init__ importing its own submodules is not a cycle of concepts
  for name in graph:
    graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_no_private_name_crosses_a_module():
  known = modules()
  crossing = []
  for name, path in known.items():
    for module, used, _ in imports(name, path, known):
      if used.startswith("_") and not used.startswith("__") and module != "__future__":
        crossing.append(f"{name} imports {module}.{used}")
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id not in ("self", "cls") and node.value.id in {
              used for module, used, _ in imports(name, path, known) if module in known}):
        crossing.append(f"{name} uses {node.value.id}.{node.attr}")
  assert not crossing, crossing


def test_import_calibjax_is_the_array_core_alone():
  code = ("import sys, calibjax\n"
          "heavy = ('sentencepiece', 'outlines_core', 'matplotlib', 'orbax', 'gguf', 'tokenizers',"
          " 'flax', 'optax', 'tqdm')\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or 'pallas' in m))\n"
          "print(sorted(m for m in sys.modules if m.startswith('calibjax.') and not "
          "m.startswith(('calibjax.core', 'calibjax.errors'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout.splitlines()
  assert out == ["[]", "[]"], out
  # and the layers above load when first used
  code = "import calibjax; print(calibjax.tasks.load('coin_flip').name, calibjax.oracle_gap.__name__)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout.split()
  assert out == ["coin_flip", "oracle_gap"]
