"""Import layering (issue 14): eval (and scripts/) above llava above dymu, the dymu kernels on torch alone, no cycles.

The contracts live in the repository's ``.importlinter`` (import-linter, from the ``dev`` extra; also runnable by
hand: ``lint-imports --no-cache``). Each contract is its own test here, so a failure names the contract and the
import chains that break it. The cycle check is stricter than import-linter's ``acyclic_siblings`` contract (which
only compares siblings and names the imports to drop): it looks at every module of dymu, llava and eval, and prints
each cycle as a chain with the line of every import in it.

Imports inside functions count like module-level ones; imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import grimp
except ImportError:  # pragma: no cover - the dev extra brings it (with import-linter)
    grimp = None

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
PACKAGES = ("dymu", "llava", "eval")
KERNELS = ("dymu.merge", "dymu.vtu", "dymu.kv_cache")
KERNEL_EXTERNALS = {"torch"}  # besides the standard library
MAX_CYCLES = 50

# import-linter's own entry point, called in a child process: it puts the working directory first on sys.path, and
# a fresh process finds the packages under that directory rather than the ones this process has imported already.
_LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename=sys.argv[1], limit_to_contracts=tuple(sys.argv[2:]), no_cache=True))"
)


def _need_checker() -> None:
    if grimp is None:
        pytest.fail("the layering checks need import-linter (and its grimp): pip install -e '.[dev]'")


def _contract_ids(config: Path = CONFIG) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(config, encoding="utf-8")
    return [section.split(":", 2)[2] for section in parser.sections() if section.startswith("importlinter:contract:")]


def _lint(cwd: Path, *contracts: str) -> tuple[int, str]:
    """Run import-linter on ``cwd/.importlinter`` (only ``contracts`` if given): exit status, report without logo."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "240", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(
        [sys.executable, "-c", _LINT, str(cwd / ".importlinter"), *contracts],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # older import-linters colour regardless
    lines = out.splitlines()
    # The report proper starts at the rule above its "Contracts" heading; above it is the logo (if any).
    start = next((i - 1 for i, line in enumerate(lines) if line.strip() == "Contracts" and i > 0), 0)
    return proc.returncode, "\n".join(lines[start:]).strip()


@pytest.mark.parametrize("contract", _contract_ids())
def test_import_contract(contract):
    """One contract of .importlinter (layers, kernels, dymu-no-apps, acyclic) is kept by today's tree."""
    _need_checker()
    status, report = _lint(ROOT, contract)
    if status != 0:
        pytest.fail(f"import-linter contract {contract!r} in .importlinter is broken:\n\n{report}", pytrace=False)


# -- the strict cycle check -------------------------------------------------------------------------------------


def _where(module: str, line: int | None) -> str:
    base = ROOT / module.replace(".", "/")
    if (base / "__init__.py").is_file():
        name = (base / "__init__.py").relative_to(ROOT).as_posix()
    elif base.with_suffix(".py").is_file():
        name = base.with_suffix(".py").relative_to(ROOT).as_posix()
    else:
        name = module
    return f"{name}:{line}" if line is not None else name


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(graph, packages=PACKAGES) -> dict[str, dict[str, str | None]]:
    """Every import between modules of ``packages``: importer -> {imported: None, or how it is implied}.

    Besides the imports grimp records, importing ``a.b.c`` first runs ``a/__init__.py`` and ``a/b/__init__.py``:
    those packages count as imported too (except the importer's own ancestors, which run before it anyway), since a
    cycle through a package's ``__init__`` is as real at run time as any other.
    """
    modules = {m for m in graph.modules if m.split(".")[0] in packages}
    edges: dict[str, dict[str, str | None]] = {m: {} for m in modules}
    for importer in modules:
        own = set(_ancestors(importer)) | {importer}
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported not in modules or imported == importer:
                continue
            edges[importer][imported] = None
            for package in _ancestors(imported):
                if package in modules and package not in own:
                    edges[importer].setdefault(package, f"implied: importing {imported} first runs {package}")
    return edges


def find_cycles(edges: dict[str, dict[str, str | None]], limit: int = MAX_CYCLES) -> tuple[list[list[str]], bool]:
    """The elementary cycles of the import graph, each as [a, b, ..., a] starting at its smallest module (at most
    ``limit`` of them; the flag says whether more were left out)."""
    cycles: list[list[str]] = []
    for start in sorted(edges):
        path, on_path = [start], {start}

        def walk(node: str) -> bool:  # False: stop, the limit is reached
            for nxt in sorted(edges[node]):
                if nxt == start:
                    if len(cycles) == limit:
                        return False
                    cycles.append([*path, start])
                elif nxt > start and nxt not in on_path:
                    path.append(nxt)
                    on_path.add(nxt)
                    more = walk(nxt)
                    path.pop()
                    on_path.discard(nxt)
                    if not more:
                        return False
            return True

        if not walk(start):
            return cycles, True
    return cycles, False


def describe_cycles(graph, edges, cycles: list[list[str]], truncated: bool) -> str:
    lines = [f"{len(cycles)}{'+' if truncated else ''} import cycle(s) between modules of {', '.join(PACKAGES)}:"]
    for cycle in cycles:
        lines.append("")
        lines.append("  " + " -> ".join(cycle))
        for importer, imported in zip(cycle, cycle[1:]):
            implied = edges[importer][imported]
            details = [] if implied else graph.get_import_details(importer=importer, imported=imported)
            if not details:
                lines.append(f"      {_where(importer, None)}: -> {imported} ({implied or 'no line recorded'})")
            for detail in details:
                lines.append(f"      {_where(importer, detail['line_number'])}: {detail['line_contents'].strip()}")
    if truncated:
        lines.append(f"\n  (stopped after {MAX_CYCLES} cycles)")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def graph():
    _need_checker()
    return grimp.build_graph(
        *PACKAGES, include_external_packages=True, exclude_type_checking_imports=True, cache_dir=None
    )


def test_no_import_cycles(graph):
    """No module of dymu, llava or eval imports itself back through any chain (module- or function-level)."""
    edges = import_edges(graph)
    cycles, truncated = find_cycles(edges)
    if cycles:
        pytest.fail(describe_cycles(graph, edges, cycles, truncated), pytrace=False)


def test_kernels_import_only_torch_and_stdlib(graph):
    """The kernels' direct imports are torch, the standard library and other kernels: an allow-list, closing what
    the kernels contract's list of forbidden packages leaves open."""
    allowed = KERNEL_EXTERNALS | set(sys.stdlib_module_names) | set(KERNELS)
    bad = [
        f"  {_where(kernel, d['line_number'])}: {d['line_contents'].strip()}   ({kernel} -> {imported})"
        for kernel in KERNELS
        for imported in sorted(graph.find_modules_directly_imported_by(kernel))
        if imported not in allowed and imported.split(".")[0] not in KERNEL_EXTERNALS
        for d in graph.get_import_details(importer=kernel, imported=imported)
    ]
    if bad:
        message = "kernels may import only torch, the standard library and each other:\n" + "\n".join(bad)
        pytest.fail(message, pytrace=False)


# -- the checks themselves, on toy trees --------------------------------------------------------------------------


def test_cycle_finder_on_toy_graph():
    """The cycle finder reports each elementary cycle once, with the implied package imports, and nothing else."""
    _need_checker()
    toy = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c", "p.sub", "p.sub.x", "p.d", "q", "q.y"):
        toy.add_module(module)

    def imp(importer, imported, line):
        toy.add_import(importer=importer, imported=imported, line_number=line, line_contents=f"import {imported}")

    imp("p", "p.a", 1)  # the usual `from . import a` in __init__: no cycle by itself
    imp("p.a", "p.b", 2)
    imp("p.b", "p.c", 3)
    imp("p.c", "p.a", 4)  # p.a -> p.b -> p.c -> p.a
    imp("p.sub", "p.sub.x", 5)
    imp("p.sub.x", "p.d", 6)
    imp("p.d", "p.sub.x", 7)  # p.d -> p.sub.x, which runs p.sub first: p.d -> p.sub -> p.sub.x -> p.d as well
    imp("q.y", "p.a", 8)  # across packages, no cycle
    edges = import_edges(toy, packages=("p", "q"))
    cycles, truncated = find_cycles(edges)
    assert not truncated
    assert cycles == [
        ["p.a", "p.b", "p.c", "p.a"],
        ["p.d", "p.sub", "p.sub.x", "p.d"],
        ["p.d", "p.sub.x", "p.d"],
    ]
    text = describe_cycles(toy, edges, cycles, truncated)
    assert "p.a -> p.b -> p.c -> p.a" in text and "implied: importing p.sub.x first runs p.sub" in text
    assert find_cycles(edges, limit=1) == ([["p.a", "p.b", "p.c", "p.a"]], True)


_TOY_CLEAN = {
    "dymu/__init__.py": "from . import budget, kv_cache, merge, patch, thresholds, vtu\n",
    "dymu/merge.py": "import torch\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llava\n",
    "dymu/vtu.py": "import torch\n",
    "dymu/kv_cache.py": "import torch\nfrom .vtu import expand\n",
    "dymu/budget.py": "from .merge import rule\n",
    "dymu/atomic.py": "import os\n",
    "dymu/checkpoint.py": "from .atomic import write\n",
    "dymu/vis.py": "import numpy\nfrom .merge import rule\n",
    "dymu/_compat.py": "import torch\n",
    "dymu/thresholds.py": "import tqdm\nfrom .checkpoint import load\nfrom .patch import vit\n",
    "dymu/patch/__init__.py": "import transformers\nfrom . import vit\n",
    "dymu/patch/vit.py": "from ..merge import rule\n",
    "llava/__init__.py": "import dymu\nfrom dymu.patch import vit\n",
    "eval/__init__.py": "import hydra\nimport wandb\nimport llava\n",
}
# One break per contract, each as its own toy file edit: (contract id, file, text appended, what the report names)
_TOY_BREAKS = [
    ("layers", "dymu/checkpoint.py", "def f():\n    from eval import x\n", "dymu.checkpoint -> eval"),
    ("kernels", "dymu/kv_cache.py", "from transformers.cache_utils import Cache\n", "dymu.kv_cache -> transformers"),
    ("dymu-no-apps", "dymu/vis.py", "def g():\n    import wandb\n", "dymu.vis -> wandb"),
    ("acyclic", "dymu/atomic.py", "from .checkpoint import load\n", "No cycles are allowed in dymu."),
    ("llava-no-apps", "llava/__init__.py", "def h():\n    import omegaconf\n", "llava -> omegaconf"),
]


def _toy_tree(root: Path, extra: dict[str, str]) -> Path:
    root.mkdir()
    (root / ".importlinter").write_text(CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    for name, text in _TOY_CLEAN.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + extra.get(name, ""), encoding="utf-8")
    return root


def _verdicts(report: str) -> dict[str, str]:
    """Contract name -> KEPT or BROKEN, from import-linter's summary."""
    return dict(re.findall(r"^(.*\S) (KEPT|BROKEN)$", report, flags=re.MULTILINE))


def test_contracts_on_toy_trees(tmp_path):
    """.importlinter's contracts keep a clean toy tree with the same module names (a TYPE_CHECKING import of llava
    in a kernel included), and each breaks on its own violation, naming it."""
    _need_checker()
    parser = configparser.ConfigParser()
    parser.read(CONFIG, encoding="utf-8")
    names = {cid: parser[f"importlinter:contract:{cid}"]["name"] for cid in _contract_ids()}
    assert sorted(names) == sorted(b[0] for b in _TOY_BREAKS), "every contract needs a toy break here"

    status, report = _lint(_toy_tree(tmp_path / "clean", {}))
    assert status == 0, f"a clean toy tree breaks .importlinter:\n{report}"
    assert _verdicts(report) == {name: "KEPT" for name in names.values()}, report

    broken = _toy_tree(tmp_path / "broken", {file: text for _, file, text, _ in _TOY_BREAKS})
    status, report = _lint(broken)
    assert status != 0, report
    assert _verdicts(report) == {name: "BROKEN" for name in names.values()}, report
    for _, _, _, named in _TOY_BREAKS:
        assert named in report, f"the report does not name {named!r}:\n{report}"
    assert "dymu.merge -> llava" not in report, f"an import under TYPE_CHECKING counted:\n{report}"
