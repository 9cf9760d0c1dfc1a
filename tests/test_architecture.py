"""The import graph of moe/, parallel/ and train/ (docs/architecture.md): imports point down, no cycles.

  parallel/    mesh, rules, transports, multi-host start-up, error types: imports neither moe nor train
  moe/         the model: imports parallel, never train
  train/core/  the trainer's library: imports moe and parallel, never a tool
  train/*.py   the tools (CLIs): may import anything below them

Every import statement counts, including those inside functions (a lazy import is still a
dependency); an import of a package's name resolves to the module it names.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe", "parallel", "train")


def modules() -> dict[str, Path]:
  """Dotted module name -> file, for every .py file of the three packages."""
  out = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports_of(path: Path, known: dict) -> set[str]:
  """The project modules a file imports (module names from `known`)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from a.b import c`: the module a.b.c if there is one, else a.b
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
    else:
      continue
    out.update(n for n in names if n in known)
  return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports_of(path, known) - {name} for name, path in known.items()}


def layer(module: str) -> str:
  if module.startswith("train.core") or module == "train":
    return "train.core"
  if module.startswith("train."):
    return "tool"
  return module.split(".")[0]


ALLOWED = {
    "parallel": {"parallel"},
    "moe": {"moe", "parallel"},
    "train.core": {"train.core", "moe", "parallel"},
    "tool": {"tool", "train.core", "moe", "parallel"},
}


def test_the_graph_is_read(graph):
  assert len(graph) > 40
  assert "parallel.common.errors" in graph["moe.config"] and "moe.model" in graph["train.core.loop"]
  assert "moe.hf" in graph["moe"]  # moe.from_hf: imported inside a function, still counted


def test_imports_point_down(graph):
  wrong = [(m, d) for m, deps in graph.items() for d in deps if layer(d) not in ALLOWED[layer(m)]]
  assert not wrong, "imports against the layering: " + ", ".join(f"{m} -> {d}" for m, d in wrong)


def test_the_common_layer_imports_nothing_of_the_project(graph):
  """parallel.common (errors, typed-config checks) is what every layer uses, so it uses none of them."""
  wrong = [(m, d) for m, deps in graph.items() if m.startswith("parallel.common") for d in deps
           if not d.startswith("parallel.common")]
  assert not wrong and "parallel.common.errors" in graph["parallel.common.typed_config"]


def test_no_import_cycles(graph):
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_model_code_never_asks_for_the_backend():
  """Implementations are chosen once from the target devices (moe.runtime), never by asking JAX
  which backend runs while a layer is traced."""
  offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "moe").rglob("*.py")
               if "default_backend" in p.read_text() or "get_abstract_mesh" in p.read_text()]
  offenders += [str(p.relative_to(ROOT)) for p in (ROOT / "parallel").rglob("*.py")
                if "default_backend" in p.read_text() or "_any_axis_manual" in p.read_text()]
  assert not offenders, offenders


def test_every_imported_package_is_declared():
  """Each third-party package the code imports is a dependency in pyproject.toml (the tests' own
  under the `test` extra; the tools' optional lm-eval under `eval`)."""
  import importlib.metadata
  import re
  import sys
  import tomllib

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  normal = lambda name: re.split(r"[<>=!~\[ ;]", name, maxsplit=1)[0].lower().replace("_", "-")
  runtime = {normal(d) for d in project["dependencies"]}
  test = runtime | {normal(d) for d in project["optional-dependencies"]["test"]}
  tools = runtime | {normal(d) for extra in ("eval", "bench-eval")  # (train.eval --tasks, train.bench_eval)
                     for d in project["optional-dependencies"][extra]}
  dists = importlib.metadata.packages_distributions()
  missing = []
  for folder, declared in (("moe", runtime), ("parallel", runtime), ("train", tools), ("tests", test)):
    for path in (ROOT / folder).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          tops = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          tops = [node.module.split(".")[0]]
        else:
          continue
        for top in tops:
          if top in sys.stdlib_module_names or top in PACKAGES + ("tests",):
            continue
          if not {normal(d) for d in dists.get(top, [top])} & declared:
            missing.append(f"{path.relative_to(ROOT)}: {top}")
  assert not missing, missing
