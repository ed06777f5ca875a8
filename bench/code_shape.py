"""The shape of the package's code: file sizes, the largest classes, long functions, where allowed values live.

    python bench/code_shape.py [--package transferkit]

Prints the numbers the engine refactor is judged by (issue 23): lines of ``train/engine.py``, the largest
class, functions over 60 lines, files over 400 lines, and the places that declare an allowed value or range
(``click.Choice``/``IntRange``/``FloatRange``, ``check_choice``, and hand-written ``must be`` checks).
Import cycles are checked by ``tests/test_architecture.py``.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

LONG_FUNCTION = 60
LONG_FILE = 400
DECLARATION = re.compile(r"IntRange|FloatRange|click\.Choice|check_choice\(|must be >|must be at least|must be positive"
                         r"|must be in \[")


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=str(Path(__file__).resolve().parents[1] / "transferkit"))
    args = parser.parse_args()
    root = Path(args.package)
    files = sorted(root.rglob("*.py"))
    classes, functions, long_files, declarations = [], [], [], 0
    for path in files:
        text = path.read_text()
        name = path.relative_to(root.parent).as_posix()
        lines = len(text.splitlines())
        if lines > LONG_FILE:
            long_files.append((lines, name))
        declarations += sum(1 for line in text.splitlines() if DECLARATION.search(line))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                classes.append((_span(node), f"{name}:{node.name}",
                                len({t.attr for n in ast.walk(node) if isinstance(n, ast.Assign)
                                     for t in n.targets if isinstance(t, ast.Attribute)})))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _span(node) > LONG_FUNCTION:
                functions.append((_span(node), f"{name}:{node.name}"))
    engine = root / "train" / "engine.py"
    print(f"{len(files)} modules, {sum(len(p.read_text().splitlines()) for p in files)} lines")
    print(f"train/engine.py: {len(engine.read_text().splitlines())} lines")
    print("largest classes (lines, attributes assigned):")
    for span, name, attrs in sorted(classes, reverse=True)[:5]:
        print(f"  {span:4d}  {attrs:3d}  {name}")
    print(f"functions over {LONG_FUNCTION} lines: {len(functions)}")
    for span, name in sorted(functions, reverse=True):
        print(f"  {span:4d}  {name}")
    print(f"files over {LONG_FILE} lines: {len(long_files)}")
    for lines, name in sorted(long_files, reverse=True):
        print(f"  {lines:4d}  {name}")
    print(f"lines declaring an allowed value or range outside the shared declarations: {declarations}")


if __name__ == "__main__":
    main()
