"""The code's shape, as the developer guide asks: no script imported as a library, no function past a
screen, lines within 100 characters (a few exceptions), the removed options gone from the flags."""
import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = sorted(glob.glob(os.path.join(ROOT, "*.py"))
                 + glob.glob(os.path.join(ROOT, "judges", "*.py")))


def is_script(path):
    return 'if __name__ == "__main__":' in open(path).read()


def test_no_file_imports_a_script():
    scripts = {os.path.splitext(os.path.basename(p))[0] for p in PRODUCT if is_script(p)}
    assert {"train_cdsvae", "test_sprite", "make_sprites", "make_figs"} <= scripts
    for path in PRODUCT:
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[-1] not in scripts, f"{path} imports the script {name}"


def test_no_function_over_80_lines():
    for path in PRODUCT:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{os.path.basename(path)}: {node.name} has {length} lines"


def test_lines_within_100_characters():
    lines = [line for path in PRODUCT for line in open(path).read().splitlines()]
    long = [line for line in lines if len(line) > 100]
    assert len(long) <= 0.05 * len(lines), f"{len(long)} of {len(lines)} lines over 100 characters"


def test_the_removed_options_are_not_offered():
    helps = subprocess.run([sys.executable, "train_cdsvae.py", "--help"], capture_output=True,
                           text=True, cwd=ROOT).stdout
    assert "--nEpoch" in helps
    for flag in ("--f_film", "--c_aug_flip", "--weight_cyc", "--recon_m_aug", "--weight_swap"):
        assert flag not in helps
