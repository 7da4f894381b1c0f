"""How much a bare ``pip install .`` adds to an empty virtual environment, torch excepted.

pip resolves the install without performing it (``--dry-run --ignore-installed --report``), which lists
every distribution a fresh environment would get; the size of each is the sum of the files its installed
copy in this environment records (``importlib.metadata``). torch and its CUDA companions are left out:
the README installs torch separately, from the CPU index.

Run from the checkout, in an environment that has the constraints' versions installed:

    python benchmarks/install_size.py constraints/stack-a.txt [EXTRAS]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.utils import canonicalize_name

# torch is installed first and apart; these come with PyPI's Linux torch build only.
LEFT_OUT = ("torch", "triton", "nvidia-", "cuda-")


def planned(constraints: str, extras: str) -> list[tuple[str, str]]:
    """(name, version) of every distribution ``pip install .[extras] -c constraints`` adds to an empty venv."""
    target = f".[{extras}]" if extras else "."
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--disable-pip-version-check", "--report", str(report), target, "-c", constraints],
            check=True,
        )
        items = json.loads(report.read_text())["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in items]


def installed_bytes(name: str) -> int:
    files = distribution(name).files or []
    return sum(f.size or 0 for f in files)


def main() -> None:
    constraints = sys.argv[1] if len(sys.argv) > 1 else "constraints/stack-a.txt"
    extras = sys.argv[2] if len(sys.argv) > 2 else ""
    rows, missing = [], []
    for name, version in planned(constraints, extras):
        key = canonicalize_name(name)
        if key == "merge-hooks" or key.startswith(LEFT_OUT):
            continue
        try:
            rows.append((installed_bytes(name), name, version))
        except PackageNotFoundError:
            missing.append(name)
    rows.sort(reverse=True)
    total = sum(size for size, _, _ in rows)
    for size, name, version in rows[:15]:
        print(f"{size / 1e6:9.1f} MB  {name}=={version}")
    print(f"{total / 1e6:9.1f} MB  in {len(rows)} distributions (torch and CUDA libraries left out)")
    if missing:
        print(f"not installed here, not counted: {', '.join(missing)}")


if __name__ == "__main__":
    main()
