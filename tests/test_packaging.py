"""pyproject.toml lists its packages by hand: a package missing there works in the editable install of this
checkout but is absent from a wheel (`pip install .`), so every package in the tree must be listed."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {name: ROOT / cfg.get("package-dir", {}).get(name, name.replace(".", "/")) for name in listed}
    assert all((d / "__init__.py").is_file() for d in dirs.values()), dirs
    found = set()
    for name, d in dirs.items():  # every package directory below a listed one, as its dotted name
        for init in d.rglob("__init__.py"):
            rel = init.parent.relative_to(d).parts
            if "__pycache__" not in rel and not any(p.startswith(".") for p in rel):
                found.add(".".join((name, *rel)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
