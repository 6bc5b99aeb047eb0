"""Lists pairs of resnext-core modules that import each other (outside kernels/).

    python tools/module_cycles.py [resnext-core/src]

A module is a top-level item of the crate (`ops`, `nn`, `model`, `weights`, ...); inside
a folder module each file is a module of its own too (`model/block` and `model/layer`).
An import is any `crate::a::b` path or a `super::x` / `use super::{x, y}` path in a file.
Exits 1 and prints the pairs when there is a cycle, else prints "no cycles".
"""

import pathlib
import re
import sys


def module_of(rel: pathlib.Path) -> tuple[str, str]:
    """(top-level module, file module) of a source file."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if not parts or parts == ["lib"]:
        return ("lib", "lib")
    return (parts[0], "/".join(parts))


def main() -> int:
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "resnext-core/src")
    files = sorted(p for p in src.rglob("*.rs"))
    top_edges: set[tuple[str, str]] = set()
    file_edges: set[tuple[str, str]] = set()
    for f in files:
        rel = f.relative_to(src)
        top, mod = module_of(rel)
        if top in ("kernels", "lib"):
            continue
        text = re.sub(r"//.*", "", f.read_text())
        for m in re.finditer(r"crate::(\w+)(?:::(\w+))?", text):
            other = m.group(1)
            if other in ("Result", "Error"):
                other = "error"  # lib.rs re-exports error::{Error, Result}
            if other != top:
                top_edges.add((top, other))
            elif other == top and m.group(2):
                file_edges.add((mod, f"{top}/{m.group(2)}"))
        if "/" in mod or rel.name == "mod.rs":
            parent = mod if rel.name == "mod.rs" else mod.rsplit("/", 1)[0]
            for m in re.finditer(r"super::\{([^}]*)\}|super::(\w+)", text):
                names = m.group(1).split(",") if m.group(1) else [m.group(2)]
                for n in names:
                    n = n.strip().split("::")[0].split(" ")[0]
                    if n and n != "self":
                        file_edges.add((mod, f"{parent}/{n}"))
    known = {module_of(f.relative_to(src))[1] for f in files}
    file_edges = {(a, b) for a, b in file_edges if b in known and a != b}
    cycles = sorted(
        {tuple(sorted(e)) for e in top_edges if (e[1], e[0]) in top_edges}
        | {tuple(sorted(e)) for e in file_edges if (e[1], e[0]) in file_edges}
    )
    for a, b in cycles:
        print(f"{a} <-> {b}")
    if cycles:
        return 1
    print(f"no cycles ({len(top_edges)} imports between modules, {len(file_edges)} within them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
