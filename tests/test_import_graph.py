"""The house rules of megalite's import graph, checked on the source (nothing is imported):

- packages import downward only: no cycle between megalite's packages (each top-level module, like
  megalite/train.py, counts as a package of its own), counting function-local imports too;
- megalite.config is a leaf: it imports no other megalite package;
- no private name (`_x`) is imported from another module, or reached as `module._x` through an
  imported module, in megalite/ or tools/.

The checker is tested on a planted tree first, so a broken checker cannot pass the real one.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ("config",)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in the file, however deeply nested."""
    module, is_package = module_name(path, root), path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            out += [(target, alias.name, node.lineno) for alias in node.names]
    return out


def package_of(module: str, top: str) -> str | None:
    """'megalite.config.loading' -> 'config'; 'megalite.train' -> 'train'; outside megalite -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == top and len(parts) > 1 else None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_attributes(path: Path, root: Path, top: str) -> list[str]:
    """`alias._name` where alias is a megalite module imported into this file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith(top + ".")})
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module_name(path, root), path.name == "__init__.py")
            for a in node.names:
                candidate = f"{target}.{a.name}"
                if target.startswith(top) and (root / Path(*candidate.split("."))).with_suffix(".py").exists():
                    aliases[a.asname or a.name] = candidate
    return [f"{path.relative_to(root)}:{n.lineno} {aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and _private(n.attr)]


def check_tree(root: Path, top: str = "megalite", extra_dirs: tuple[str, ...] = ()) -> list[str]:
    """Every broken house rule of the tree under `root` (package `top`), one line each."""
    problems, edges = [], {}
    files = sorted((root / top).rglob("*.py"))
    for path in files + [p for d in extra_dirs for p in sorted((root / d).rglob("*.py"))]:
        here = module_name(path, root)
        src = package_of(here, top)
        for target, name, line in imports_of(path, root):
            dst = package_of(target, top)
            if target.split(".")[0] != top:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if _private(name) or any(_private(p) for p in target.split(".")[1:]):
                problems.append(f"{where} imports the private name {target}.{name or ''}".rstrip("."))
            if src is None or dst is None or src == dst:
                continue
            edges.setdefault(src, {}).setdefault(dst, where)
            if src in LEAVES and f"{where}: {top}.{src} is a leaf but imports {target}" not in problems:
                problems.append(f"{where}: {top}.{src} is a leaf but imports {target}")
        problems += [f"{p} is a private name reached through its module" for p in _private_attributes(path, root, top)]
    problems += [f"import cycle between packages {', '.join(members)}: {' -> '.join(c)} (first edge at "
                 f"{edges[c[0]][c[1]]})" for members, c in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, dict[str, str]]) -> list[tuple[list[str], list[str]]]:
    """(members, one cycle through them) per strongly connected component of several packages (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append((sorted(comp), _path_through(sorted(comp), edges)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _path_through(comp: list[str], edges) -> list[str]:
    """A closed walk inside one strongly connected component, starting at its first member."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_planted_cycle_a_leaf_import_and_private_names(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config/__init__.py": "from pkg.config.sections import A\n",
        "pkg/config/sections.py": "A = 1\n",
        "pkg/a/__init__.py": "", "pkg/b/__init__.py": "",
        "pkg/a/x.py": "from pkg.b.y import f\n",
        "pkg/b/y.py": "def f():\n    from pkg.a import x  # function-local: still an edge\n    return x\n",
        "pkg/c.py": "from pkg.a.x import _hidden\nfrom pkg.b import y as why\nwhy._secret()\n",
        "pkg/config/bad.py": "from pkg.c import thing\n",
    })
    problems = check_tree(root, "pkg")
    text = "\n".join(problems)
    assert "import cycle between packages a, b: a -> b -> a" in text
    assert "pkg.config is a leaf but imports pkg.c" in text
    assert "imports the private name pkg.a.x._hidden" in text
    assert "pkg.b.y._secret is a private name reached through its module" in text
    assert check_tree(_plant(tmp_path / "clean", {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n",
                                                  "pkg/b.py": "X = 1\n"}), "pkg") == []


def test_megalite_keeps_the_house_rules():
    problems = check_tree(ROOT, "megalite", extra_dirs=("tools",))
    assert not problems, f"{len(problems)} broken rules:\n" + "\n".join(problems)
