"""The package's layout from its imports: each top-level folder's modules, the import edges between top-level
folders and modules, every import cycle between modules, and any edge that points up the layers. Run from the
repository root: `python scripts/layout.py` (the suite asserts "none" for cycles and upward edges)."""
import ast, sys
from pathlib import Path
PKG = Path("logitcache")
mods = {}
for p in sorted(PKG.rglob("*.py")):
    parts = list(p.with_suffix("").parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    mods[".".join(parts)] = p
edges = {m: set() for m in mods}
for m, p in mods.items():
    pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(p.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                b = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(b + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods: t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != m and t != "logitcache": edges[m].add(t)
top = lambda m: ".".join(m.split(".")[:2])
folders = {}
for m in mods: folders.setdefault(top(m), []).append(m.split(".", 2)[-1] if m.count(".") > 1 else "")
print(f"{len(folders)} top-level modules and folders:")
for f, ms in folders.items(): print(f"  {f}: {', '.join(x for x in ms if x) or '(module)'}")
top_edges = {(top(a), top(b)) for a in edges for b in edges[a] if top(a) != top(b)}
print(f"import edges between them: {len(top_edges)}")
# cycles: strongly connected components of the module graph
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: visit(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
for v in mods:
    if v not in index: visit(v)
print("import cycles between modules:", sccs or "none")
ORDER = [["logitcache", "logitcache.__main__"], ["logitcache.cli"], ["logitcache.integrations"],
         ["logitcache.sequence"],
         ["logitcache.teacher", "logitcache.student"], ["logitcache.read"], ["logitcache.specs", "logitcache.config"],
         ["logitcache.store"], ["logitcache.augment"], ["logitcache.encoding"],
         ["logitcache.compute", "logitcache.datasets", "logitcache.models", "logitcache.errors", "logitcache.progress",
          "logitcache.distributed", "logitcache.version"]]
rank = {m: i for i, layer in enumerate(ORDER) for m in layer}
SIBLINGS = ("logitcache.teacher", "logitcache.student")  # one layer, and neither imports the other
up = sorted((a, b) for a, b in top_edges
            if rank.get(a, 99) > rank.get(b, 99) or (a in SIBLINGS and b in SIBLINGS))
print("edges that point up the layers (cli > integrations > sequence > teacher, student > read > specs, config > "
      "store > augment > encoding > shared):", up or "none")
