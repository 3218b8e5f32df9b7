"""Every public class and function of fitscale has a docstring.

Public: a module-level class or function, or a method of a public class, whose name has no leading
underscore, in any module under fitscale/ (functions nested inside functions are private by
construction). The docstring says what it computes, the shapes and units of tensors, the errors
raised, and the paper section or release file it implements, where it implements one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fitscale"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def undocumented(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, qualified name) of every public definition of a module without a docstring.

    A method that overrides a documented method of a base class defined in the same module inherits
    its docstring, as `inspect.getdoc` does (e.g. each ParallelBackend implementation).
    """
    missing = []
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def documented_in_bases(cls: ast.ClassDef, name: str) -> bool:
        for base in cls.bases:
            parent = classes.get(base.id) if isinstance(base, ast.Name) else None
            if parent is None:
                continue
            for node in parent.body:
                if isinstance(node, DEFINITIONS) and node.name == name and ast.get_docstring(node):
                    return True
            if documented_in_bases(parent, name):
                return True
        return False

    def visit(scope: ast.AST, prefix: str) -> None:
        for node in ast.iter_child_nodes(scope):
            if not isinstance(node, DEFINITIONS) or node.name.startswith("_"):
                continue
            inherited = isinstance(scope, ast.ClassDef) and documented_in_bases(scope, node.name)
            if ast.get_docstring(node) is None and not inherited:
                missing.append((node.lineno, prefix + node.name))
            if isinstance(node, ast.ClassDef):
                visit(node, f"{prefix}{node.name}.")

    visit(tree, "")
    return missing


def test_the_checker_finds_public_definitions_without_a_docstring():
    source = '''
def public(): pass
def _private(): pass
def documented():
    """Yes."""
    def nested(): pass
class Public:
    def method(self): pass
    def _helper(self): pass
    @property
    def size(self):
        """Documented."""
class _Private:
    def method(self): pass
class Base:
    """Documented."""
    def step(self):
        """Documented once, for every implementation."""
    def other(self): pass
class Impl(Base):
    """Documented."""
    def step(self): pass
    def other(self): pass
    def new(self): pass
'''
    assert undocumented(ast.parse(source)) == [
        (2, "public"), (7, "Public"), (8, "Public.method"), (19, "Base.other"), (23, "Impl.other"), (24, "Impl.new")
    ]  # fmt: skip


def test_every_public_class_and_function_has_a_docstring():
    missing = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in undocumented(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert not missing, f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing)
