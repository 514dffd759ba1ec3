"""BUILD lists every module, example and test file, and nothing that is not there."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_text():
    return (ROOT / "BUILD").read_text()


def test_every_python_file_is_listed_in_build():
    listed = set(re.findall(r'"([\w/]+\.py)"', build_text()))
    tests = re.search(r"for name in \[(.*?)\]", build_text(), re.S).group(1)
    listed |= {f"tests/{name}.py" for name in re.findall(r'"(\w+)"', tests)}
    on_disk = {str(p.relative_to(ROOT)) for folder in ("jep", "jep_kernels", "tests", "examples")
               for p in (ROOT / folder).rglob("*.py")}
    assert on_disk - listed == set(), "add these to BUILD"
    assert listed - on_disk == set(), "BUILD names files that do not exist"


def test_every_test_file_has_its_own_py_test():
    tests = re.search(r"for name in \[(.*?)\]", build_text(), re.S).group(1)
    names = set(re.findall(r'"(\w+)"', tests))
    assert names == {p.stem for p in (ROOT / "tests").glob("test_*.py")}



def test_every_kernel_source_is_listed_in_build():
    listed = set(re.findall(r'"([\w/]+\.(?:cc|cu|h))"', build_text()))
    on_disk = {str(p.relative_to(ROOT)) for ext in ("cc", "cu", "h")
               for p in (ROOT / "jep_kernels").rglob(f"*.{ext}")}
    assert on_disk == listed
