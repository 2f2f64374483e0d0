"""The package stays readable: no function or method in lora_dist/ is longer than 80 lines."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lora_dist")
LIMIT = 80


def long_functions(root=PKG, limit=LIMIT):
    """(path:line name, lines) for every def longer than `limit` lines (decorators to last line)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    n = node.end_lineno - start + 1
                    if n > limit:
                        out.append((f"{os.path.relpath(path, os.path.dirname(root))}:{node.lineno} {node.name}", n))
    return out


def test_the_checker_sees_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 81 + "\ndef g():\n    pass\n")
    assert long_functions(str(tmp_path)) == [(f"{tmp_path.name}/m.py:1 f", 82)]


def test_no_function_in_the_package_is_longer_than_80_lines():
    found = long_functions()
    assert not found, "functions over 80 lines: " + ", ".join(f"{w} ({n} lines)" for w, n in found)
