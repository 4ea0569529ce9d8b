"""The real OpenPCDet source for the tests: a user's checkout (``PCDET_SRC=DIR``) or the unmodified
upstream tarball in ``../shared/third_party/`` extracted once per session (never modified, never
vendored). Tests that use it are skipped with the reason when neither exists or pcdet's
dependencies are not installed (``pip install -e .[pcdet]``)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PCDET_TARBALL = ROOT.parent / "shared" / "third_party" / "OpenPCDet-8caccce.tar.gz"
# What pcdet imports that `pip install -e .[pcdet]` provides (module names).
PCDET_DEPS = (
    "spconv.pytorch",
    "easydict",
    "yaml",
    "numba",
    "SharedArray",
    "pyquaternion",
    "skimage",
)


@pytest.fixture(scope="session")
def pcdet_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OpenPCDet checkout (the directory holding ``pcdet/`` and ``tools/``)."""
    for module in PCDET_DEPS:
        pytest.importorskip(module, reason=f"{module} not installed: pip install -e .[pcdet]")
    if os.environ.get("PCDET_SRC"):
        src = Path(os.environ["PCDET_SRC"])
        if not (src / "pcdet" / "__init__.py").is_file():
            pytest.fail(
                f"PCDET_SRC={src} holds no pcdet/__init__.py; point it at an OpenPCDet checkout"
            )
        return src
    if not PCDET_TARBALL.is_file():
        pytest.skip(f"no OpenPCDet source: neither PCDET_SRC nor {PCDET_TARBALL} exists")
    dest = tmp_path_factory.mktemp("pcdet_src")
    with tarfile.open(PCDET_TARBALL) as tar:
        # The "data" filter refuses links and paths leaving dest (Python >= 3.10.12 has it).
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, **kwargs)
    return dest / "OpenPCDet"
