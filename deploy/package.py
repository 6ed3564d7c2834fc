"""Build what a cluster needs to run the jobs: the code and the executors' Python environment.

* ``dist/listing_similarity.zip`` — ``lib/``, ``jobs/`` and ``schemas/`` for ``--py-files``.
* ``dist/listing_similarity-<version>-py3-none-any.whl`` — the same code as a wheel (``--wheel``),
  for clusters or images that ``pip install`` it.
* ``pyenv-<fingerprint>.zip`` — the project's virtual environment (torch, pandas, pyarrow,
  deltalake…) for ``--archives …#env``, so executors need no cluster-wide install. The code is
  *not* in it (it travels in the zip), so the archive only changes when a dependency does and
  is cached under ``--cache-dir`` keyed by a fingerprint of the installed distributions.

Usage: ``python deploy/package.py [--wheel] [--env] [--compress]``; prints one JSON line.

The archive is the venv minus what executors never use (Spark's own jars: the cluster's Spark
provides them; this project's editable-install hook, which would point executors back at the
repo on this machine; tests, headers, dev tools). Like venv-pack's output it relies on the same
base interpreter installation (``pyvenv.cfg``'s ``home``, shared libpython) existing on every
worker; a Docker image (``deploy/k8s/``) is the way to ship the interpreter too.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("lib", "jobs", "schemas")
ZIP_NAME = "listing_similarity.zip"
PROJECT_DIST = "listing_similarity"
# Bump when ENV_EXCLUDES or the archive layout changes: cached archives then get rebuilt.
ARCHIVE_LAYOUT_VERSION = 4
SITE = "lib/python3.*/site-packages"
# fnmatch patterns on paths relative to the venv (``*`` also matches ``/``); a matching
# directory is skipped whole.
ENV_EXCLUDES = (
    f"{SITE}/pyspark/jars",  # the cluster's Spark brings its own jars
    f"{SITE}/__editable__*",  # would point executors back at this checkout
    f"{SITE}/__pycache__/__editable__*",
    f"{SITE}/{PROJECT_DIST}-*.dist-info",
    f"{SITE}/*/tests",
    f"{SITE}/torch/include",
    f"{SITE}/torch/test",
    f"{SITE}/torch/bin/test_*",
    f"{SITE}/pip",
    f"{SITE}/ruff*",
    # The dev extra (tests and the README's readers) is no executor's business: ~350 MB less
    # to unpack per executor and application.
    f"{SITE}/duckdb*",
    f"{SITE}/_duckdb*",
    f"{SITE}/adbc_driver_duckdb*",
    f"{SITE}/polars*",
    f"{SITE}/_polars*",
    f"{SITE}/pytest*",
    f"{SITE}/_pytest",
    f"{SITE}/chispa*",
    f"{SITE}/prettytable*",
    f"{SITE}/pluggy*",
    f"{SITE}/iniconfig*",
    "bin/ruff",
    "bin/listing-similarity",
    "include",
    ".installed",
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("LISTING_SIMILARITY_CACHE", f"{base}/listing-similarity"))


def build_code_zip(out_dir: Path, repo: Path = REPO) -> Path:
    """Zip ``lib/``, ``jobs/``, ``schemas/`` (Python sources only) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ZIP_NAME
    tmp = target.with_name(f".{ZIP_NAME}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for package in CODE_PACKAGES:
            for path in sorted((repo / package).rglob("*.py")):
                if "__pycache__" not in path.parts:
                    archive.write(path, path.relative_to(repo).as_posix())
    os.replace(tmp, target)
    return target


def build_wheel(out_dir: Path, repo: Path = REPO, python: str = sys.executable) -> Path:
    """``pip wheel`` the project (no dependencies) into ``out_dir``; returns the wheel path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob(f"{PROJECT_DIST}-*.whl"))
    for old in before:
        old.unlink()
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out_dir),
            str(repo),
        ],
        check=True,
    )
    wheels = sorted(out_dir.glob(f"{PROJECT_DIST}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {out_dir}, found {wheels}")
    # setuptools leaves build/ and *.egg-info behind in the source tree.
    shutil.rmtree(repo / "build", ignore_errors=True)
    return wheels[0]


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob(SITE))
    if len(found) != 1:
        raise FileNotFoundError(f"{venv}: expected one {SITE}, found {found}")
    return found[0]


def env_fingerprint(venv: Path) -> str:
    """A hash of the interpreter and the installed distributions (name-version), code excluded."""
    cfg = (venv / "pyvenv.cfg").read_text()
    dists = sorted(
        p.name
        for p in site_packages(venv).glob("*.dist-info")
        if not p.name.startswith(f"{PROJECT_DIST}-")
    )
    payload = json.dumps([ARCHIVE_LAYOUT_VERSION, ENV_EXCLUDES, cfg, dists])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def env_archive_name(fingerprint: str) -> str:
    return f"pyenv-{fingerprint}.zip"


def _excluded(relative: str) -> bool:
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in ENV_EXCLUDES)


def env_members(venv: Path) -> Iterator[tuple[Path, str]]:
    """(file, name in the archive) for every file of ``venv`` that executors need.

    Symlinked files are stored as the file they point to (``bin/python`` becomes the real
    interpreter binary, which finds ``pyvenv.cfg`` beside it); symlinked directories
    (``lib64 -> lib``) are left out, their content is there under the real name.
    """
    for folder, dirnames, filenames in os.walk(venv):
        base = Path(folder)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not (base / d).is_symlink() and not _excluded(_relative(base / d, venv))
        )
        for name in sorted(filenames):
            path = base / name
            relative = _relative(path, venv)
            if not _excluded(relative) and path.is_file():
                yield path, relative


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def build_env_archive(
    venv: Path, cache_dir: Path, *, compress: bool = False, keep: int = 2
) -> tuple[Path, bool]:
    """Archive ``venv`` for ``--archives`` into ``cache_dir``; returns (path, reused).

    A zip, because Spark unpacks ``.zip`` with Java keeping the permission bits (its ``.tar``
    path drops them, so ``bin/python`` would not be executable; its ``.tar.gz`` path needs a
    gunzip per driver and executor per submit: ~35 s each here). Stored, not deflated, by
    default: unpacking is then a plain copy; ``compress=True`` for clusters that pull it over a
    slow link. Reuses an archive with the same fingerprint; keeps the ``keep`` newest archives
    in ``cache_dir`` and deletes older ones (each is over a gigabyte).
    """
    if not (venv / "pyvenv.cfg").is_file():
        raise FileNotFoundError(f"{venv} is not a virtual environment (no pyvenv.cfg)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = env_fingerprint(venv) + ("z" if compress else "")
    target = cache_dir / env_archive_name(fingerprint)
    if target.is_file():
        os.utime(target)
        return target, False
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with zipfile.ZipFile(tmp, "w", method, compresslevel=1 if compress else None) as archive:
            for path, name in env_members(venv):
                archive.write(path, name)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    archives = sorted(cache_dir.glob("pyenv-*.zip"), key=lambda p: p.stat().st_mtime)
    for old in archives[:-keep] if keep else []:
        if old != target:
            old.unlink(missing_ok=True)
    return target, True


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "dist", help="zip and wheel go here")
    p.add_argument("--wheel", action="store_true", help="also build the wheel")
    p.add_argument("--env", action="store_true", help="also build the environment archive")
    p.add_argument("--venv", type=Path, default=Path(sys.prefix), help="venv to archive")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--compress", action="store_true", help="deflate the environment zip")
    args = p.parse_args(argv)

    result: dict[str, object] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    result["zip"] = str(build_code_zip(args.out))
    seconds["zip"] = round(time.perf_counter() - started, 2)
    if args.wheel:
        started = time.perf_counter()
        result["wheel"] = str(build_wheel(args.out))
        seconds["wheel"] = round(time.perf_counter() - started, 2)
    if args.env:
        started = time.perf_counter()
        archive, built = build_env_archive(args.venv, args.cache_dir, compress=args.compress)
        seconds["env"] = round(time.perf_counter() - started, 2)
        result.update(env_archive=str(archive), env_built=built, env_bytes=archive.stat().st_size)
    result["seconds"] = seconds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
