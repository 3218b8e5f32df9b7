"""Function-level imports of fitscale's own modules stay only where they keep `fitscale --help` fast.

An import inside a function hides the dependency from whoever reads the module's top, and Python
only notices a cycle through it when a name is missing at call time. So a function-level import of a
`fitscale.*` module is allowed only:

- in a module that `fitscale --help` loads: the dispatcher (fitscale/cli.py), each package's cli.py,
  fitscale/lazy.py and whatever they import at top level. The set is computed, not listed: this
  tool imports fitscale.cli in a fresh interpreter, builds the parser with every subcommand's help,
  and reads sys.modules.
  Those modules defer the work of each command to the command's function, so `--help` imports no
  torch (tests/unit/test_cli_fast.py);
- or where the import statement carries a reason comment from this fixed vocabulary (REASONS):
  `# lazy: heavy`           the imported module pulls in torch/diffusers/matplotlib, and callers that
                            import this module without needing that function must not pay for it;
  `# lazy: optional extra`  the imported module needs a package of an optional extra that this
                            module's other callers may not have installed.
  A cycle is not a reason: the layers contract (`lint-imports`) forbids one, so restructure instead.

    python tools/check_local_imports.py          exit 1 and one line per disallowed import
    python tools/check_local_imports.py --list   every function-level fitscale import with its verdict

Run from the repository root (tools/test.sh does): the fitscale checked, read and imported, is the
one under the current directory.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

REASONS = ("heavy", "optional extra")
_REASON = re.compile(r"#\s*lazy:\s*([a-z][a-z ]*[a-z])")


@dataclass(frozen=True)
class LocalImport:
    """One function-level import statement of a fitscale module: where it is and what it imports."""

    path: Path  # the file, relative to the root given to `function_level_imports`
    line: int  # 1-based line of the statement's first line
    module: str  # the importing module's dotted name, e.g. "fitscale.train.trainer"
    target: str  # the imported fitscale module's dotted name (the first one for `import a, b`)
    reason: str | None  # the word(s) after `# lazy:` on the statement's lines, or None


def _module_name(path: Path) -> tuple[str, str]:
    """(the module's dotted name, the package that relative imports start from) of `path`."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted module names an import statement names (relative ones resolved against `package`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        return [".".join(base + ([node.module] if node.module else []))]
    return [node.module or ""]


def _comments(source: str) -> dict[int, str]:
    """The comment of each line of `source` that has one, by 1-based line number."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string
    return found


def _imports_in_functions(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of `tree` that sit inside a function or lambda body, at any depth."""
    found, pending = [], [(tree, False)]
    while pending:
        node, in_function = pending.pop()
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            pending.append((child, in_function or nested))
    return sorted(found, key=lambda node: node.lineno)


def function_level_imports(root: Path, package: str = "fitscale") -> list[LocalImport]:
    """Every import statement inside a function (or lambda) body, under `root / package`, that imports
    `package` or one of its modules; sorted by file and line.
    """
    found = []
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root)
        module, base = _module_name(relative)
        source = path.read_text(encoding="utf-8")
        comments = _comments(source)
        for node in _imports_in_functions(ast.parse(source, filename=str(path))):
            own = [t for t in _targets(node, base) if t == package or t.startswith(package + ".")]
            if own:
                lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                reasons = [m.group(1) for n in lines if (m := _REASON.search(comments.get(n, "")))]
                found.append(LocalImport(relative, node.lineno, module, own[0], (reasons or [None])[0]))
    return found


_PROBE = """
import sys
from fitscale.cli import build_parser
parser = build_parser()
parser.format_help()
for action in parser._subparsers._group_actions:
    for sub in action.choices.values():
        sub.format_help()
print(" ".join(sys.modules))
"""


def modules_loaded_by_help(root: Path) -> set[str]:
    """Every module (fitscale's and third-party) that `fitscale --help` and every subcommand's `--help`
    load, with the fitscale under `root`. Asked of a fresh interpreter, so what the caller imported does
    not count. Raises subprocess.CalledProcessError when fitscale.cli fails to import.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return set(result.stdout.split())


def dispatcher_modules(root: Path) -> set[str]:
    """The fitscale modules of `modules_loaded_by_help(root)`: where a function-level import needs no reason."""
    return {
        name for name in modules_loaded_by_help(root) if name == "fitscale" or name.startswith("fitscale.")
    }


def verdict(found: LocalImport, allowed: set[str]) -> str | None:
    """None when `found` is allowed, else what is wrong and what to do, in one line."""
    where = f"{found.path.as_posix()}:{found.line}: function-level import of {found.target}"
    if found.reason is None:
        if found.module in allowed:
            return None
        return (
            f"{where} in {found.module}, which `fitscale --help` does not load: move it to the top of the "
            f"module, or end the line with a reason ({', '.join('# lazy: ' + r for r in REASONS)})"
        )
    if found.reason in REASONS:
        return None
    return (
        f"{where} gives the reason '# lazy: {found.reason}', which is not one of "
        f"{', '.join(repr(r) for r in REASONS)} (a cycle is fixed by moving code, not by a lazy import)"
    )


def main(argv: list[str] | None = None) -> int:
    """Check the repository in the current directory; 0 when every function-level import is allowed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--list", action="store_true", help="list every function-level import and its verdict"
    )
    args = parser.parse_args(argv)
    found = function_level_imports(Path.cwd())
    allowed = dispatcher_modules(Path.cwd())
    problems = []
    for item in found:
        problem = verdict(item, allowed)
        if args.list:
            state = "dispatcher" if item.module in allowed and not item.reason else f"lazy: {item.reason}"
            print(
                f"{item.path.as_posix()}:{item.line}: {item.target}  [{'DISALLOWED' if problem else state}]"
            )
        if problem:
            problems.append(problem)
    if not args.list:
        for problem in problems:
            print(problem, file=sys.stderr)
    reasoned = sum(1 for item in found if item.reason in REASONS)
    print(
        f"check_local_imports: {len(found)} function-level fitscale imports, {reasoned} with a reason, "
        f"{len(problems)} disallowed",
        file=sys.stderr,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
