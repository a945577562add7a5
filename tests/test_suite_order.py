"""tests/conftest.py's LONG_FIRST (the tests run first under pytest-xdist) names tests that exist:
a renamed test would silently lose its place at the front and stretch ``make test`` again."""
import os
import re

from conftest import LONG_FIRST, ROOT


def test_long_first_prefixes_name_existing_tests():
    for prefix in LONG_FIRST:
        path, _, rest = prefix.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), f"LONG_FIRST: no file {path}"
        if rest:
            name = re.match(r"\w+", rest).group(0)
            src = open(os.path.join(ROOT, path), encoding="utf-8").read()
            assert re.search(rf"^def {name}\w*\(", src, re.M), f"LONG_FIRST: no test {name}* in {path}"
