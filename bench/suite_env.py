"""Packages for bench/gpu_suite.py on a machine without a package index: what the interpreter
has, and which carried wheels (bench/prepare_wheels.sh) to install into a private folder that
goes first on the children's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from suite_jobs import StageError

PINNED = {"transformers", "peft", "deepspeed", "datasets", "jsonargparse"}
REQUIRED = ("torch", "transformers", "peft", "deepspeed", "datasets", "jsonargparse",
            "sentencepiece", "safetensors", "accelerate")

def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def older(have: str, want: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(have) < Version(want)
    except InvalidVersion:
        return False


def install_plan(wheels: list[Path], installed: dict[str, str | None],
                 keep_image: bool) -> list[tuple[Path, str]]:
    plan = []
    for w in wheels:
        dist, ver = w.name.split("-")[0].lower().replace("_", "-"), w.name.split("-")[1]
        have = installed.get(dist)
        if have is None:
            why = "missing"
        elif dist in PINNED and have != ver and not keep_image:
            why = f"image has {have}"
        elif dist not in PINNED and older(have, ver):
            why = f"image has older {have}"
        else:
            continue
        plan.append((w, why))
    return plan


def ensure_packages(a: argparse.Namespace, work: Path, info: dict, timeout: float) -> None:
    folder = Path(a.wheels)
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    installed = {d: version_of(d) for d in sorted(set(REQUIRED) | names)}
    plan = install_plan(wheels, installed, a.keep_image_packages)
    info.update(before=installed, wheels_dir=str(folder), wheels_found=len(wheels),
                installed_from_wheels=[])
    covered = {w.name.split("-")[0].lower().replace("_", "-") for w, _ in plan}
    info["missing"] = [d for d in REQUIRED if installed[d] is None and d not in covered]
    if "torch" in info["missing"]:
        info["missing_note"] = "torch is not carried (GBs): the suite relies on the image's"
    if plan:
        site = work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
               *(str(w) for w, _ in plan)]
        with open(work / "logs" / "pip_install.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=max(timeout, 1)).returncode
        if rc:
            raise StageError(f"pip install from {folder} failed (rc {rc}); see pip_install.log")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
        info["installed_from_wheels"] = [f"{w.name.split('-')[0]} {w.name.split('-')[1]} ({why})"
                                         for w, why in plan]
    if info["missing"]:
        raise StageError(f"missing and not in {folder}: {', '.join(info['missing'])} "
                         "(bash bench/prepare_wheels.sh here, carry bench/wheels)")
