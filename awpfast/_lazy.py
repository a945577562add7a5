"""Names a package imports on first use (PEP 562 module ``__getattr__``), so that importing it (and a
CLI's argument checks) does not pay for torch. Imports nothing from awpfast."""
import importlib
import sys


def lazy_getattr(package: str, table: dict):
    """A module ``__getattr__`` for ``package``: ``table`` maps a name to the module that defines it,
    relative to the package (``".rules"``), or to ``None`` for a submodule of that name. The value is
    cached in the package's namespace on first use."""
    def __getattr__(name):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = table[name]
        value = importlib.import_module(f".{name}" if where is None else where, package)
        if where is not None:
            value = getattr(value, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
