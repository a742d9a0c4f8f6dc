"""Maps the repository's root folders onto the single ``zoo`` import namespace.

The user's layout keeps ``zoo/``, ``backbones/``, ``multimodal/``, ``ops/`` and ``recipes/`` at the root, but nothing
may be installed under a generic top-level name (``ops`` and ``recipes`` collide with other distributions), so each
folder becomes a subpackage of ``zoo``. ``weights_manifest.yaml`` lives at the root and is copied into the package.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOTS = {"zoo": "zoo", "zoo.backbones": "backbones", "zoo.multimodal": "multimodal", "zoo.ops": "ops",
         "zoo.recipes": "recipes"}
HERE = os.path.dirname(os.path.abspath(__file__))


def find_packages_under_roots():
    """All packages (folders with ``__init__.py``) below each mapped root, under their ``zoo.*`` names."""
    packages = []
    for name, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(HERE, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(HERE, folder))
                packages.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return packages


class BuildPyWithManifest(build_py):
    """build_py that also ships the root ``weights_manifest.yaml`` inside the ``zoo`` package."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "zoo", "weights_manifest.yaml")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(HERE, "weights_manifest.yaml"), target)


setup(
    package_dir=ROOTS,
    packages=find_packages_under_roots(),
    package_data={"": ["*.yaml", "*.json", "*.txt", "*.cpp", "configs/*.yaml", "data/*"]},
    cmdclass={"build_py": BuildPyWithManifest},
)
