"""Splits a file into parts of at most --size MiB so that each part can travel to the GPU host in its own device
call (a call carries at most 64 MiB), one part per folder: OUT/p00/, OUT/p01/, ... Each folder holds its part
and a copy of the manifest, so whichever part arrives first brings the manifest along:

    FILE <sha256> <size> <name>
    PARTS <count>
    PART <k> <sha256> <size> <part name>       (one line per part, k from 0)

    python scripts/split_parts.py ~/.cache/ringllm/real-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    # -> .real-parts/p00 ... .real-parts/p07; on the host, per part: bash scripts/gpu_real_parts.sh store
    #    (carry .real-parts/pK), then bash scripts/gpu_real_parts.sh join

--expect-sha256 (or a `NAME.sha256` file beside the input, as tests/real_model.py writes one) refuses to split a
file whose digest differs. An existing OUT is replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

MIB = 1 << 20


def split(src: Path, out: Path, part_bytes: int) -> list[str]:
    """Writes the parts and the manifest under `out`; returns the manifest's lines."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    whole, parts = hashlib.sha256(), []
    with open(src, "rb") as f:
        k = 0
        while chunk := f.read(part_bytes):
            whole.update(chunk)
            name = f"{src.name}.part{k:02d}"
            folder = tmp / f"p{k:02d}"
            folder.mkdir(parents=True)
            (folder / name).write_bytes(chunk)
            parts.append(f"PART {k} {hashlib.sha256(chunk).hexdigest()} {len(chunk)} {name}")
            k += 1
    lines = [f"FILE {whole.hexdigest()} {src.stat().st_size} {src.name}", f"PARTS {len(parts)}", *parts]
    for folder in sorted(tmp.iterdir()):
        (folder / "MANIFEST").write_text("\n".join(lines) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--out", type=Path, default=Path(".real-parts"))
    ap.add_argument("--size", type=int, default=60, help="largest part, MiB (default 60)")
    ap.add_argument("--expect-sha256", default=None, help="default: the NAME.sha256 file beside the input, if any")
    a = ap.parse_args(argv)
    if not a.file.is_file():
        raise SystemExit(f"{a.file}: no such file")
    if a.size < 1:
        raise SystemExit("--size must be at least 1 MiB")
    stamp = a.file.with_suffix(".sha256")
    expect = a.expect_sha256 or (stamp.read_text().strip() if stamp.is_file() else None)
    lines = split(a.file, a.out, a.size * MIB)
    digest = lines[0].split()[1]
    if expect is not None and digest != expect:
        shutil.rmtree(a.out)
        raise SystemExit(f"{a.file}: sha256 {digest}, expected {expect}: not split")
    print("\n".join(lines))
    print(f"split: {len(lines) - 2} parts under {a.out}/p00 ... (carry one folder per call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
