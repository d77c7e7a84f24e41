"""The package layout: every package folder is installed, under the name docs/architecture.md gives it."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {name: Path(path) for name, path in config["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_top_level_folders_import_as_workbench_subpackages():
    import workbench.apps
    import workbench.kernels
    import workbench.store

    assert Path(workbench.store.__file__).parent == ROOT / "store"
    assert Path(workbench.kernels.__file__).parent == ROOT / "kernels"
    assert Path(workbench.apps.__file__).parent == ROOT / "apps"
