"""What each image target's Python environment weighs, measured without a Docker engine.

The Dockerfile's two targets differ only in the virtual environment they copy to /opt/modelloop:
`serving` installs `.[serving]` (no torch, no Evidently), `full` installs the CPU build of torch
and `.[all]`. This builds the same two virtual environments for real, from a copy of the sources,
and prints what each weighs on disk (`du -s`) with its largest installed folders. The CUDA base
image and the apt packages are the same in both targets and are not included (docs/deploy.md).

    python scripts/image_sizes.py                      # torch==2.13.0, like the Dockerfile
    python scripts/image_sizes.py --torch-spec torch==2.13.0 --keep /tmp/sizes
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "modelloop", "training", "serving", "monitoring"]


def du_bytes(path: Path) -> int:
    """Bytes on disk, as `du -s` counts them (hard links once)."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def copy_sources(dest: Path) -> Path:
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def build_venv(venv: Path, installs: list[list[str]]) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    for args in installs:
        subprocess.run(pip + args, check=True)


def largest(venv: Path, n: int = 5) -> list[tuple[str, int]]:
    (site,) = venv.glob("lib/python*/site-packages")
    sizes = [(p.name, du_bytes(p)) for p in site.iterdir() if p.is_dir()]
    return sorted(sizes, key=lambda s: -s[1])[:n]


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-spec", default="torch==2.13.0",
                        help="what the full target installs first (the Dockerfile's TORCH_SPEC)")
    parser.add_argument("--keep", type=Path, help="build here and keep the environments")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="modelloop-sizes-"))
    work.mkdir(parents=True, exist_ok=True)
    src = copy_sources(Path(tempfile.mkdtemp(prefix="src-", dir=work)))
    targets = {
        "serving": [[f"{src}[serving]"]],
        "full": [[args.torch_spec], [f"{src}[all]"]],
    }
    rows = []
    try:
        for target, installs in targets.items():
            venv = work / f"venv-{target}"
            shutil.rmtree(venv, ignore_errors=True)
            build_venv(venv, installs)
            rows.append((target, du_bytes(venv), largest(venv)))
    finally:
        shutil.rmtree(src, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'target':8}  {'venv (du -s)':>12}  largest folders in site-packages")
    for target, size, top in rows:
        print(f"{target:8}  {human(size):>12}  " + ", ".join(f"{n} {human(s)}" for n, s in top))


if __name__ == "__main__":
    main()
