"""Check that every ELF shared object under the given folders loads on a 16K-page arm64 kernel.

    python scripts/arm64/pagesize.py DIR...

The Raspberry Pi 5's kernel (Raspberry Pi OS, ``kernel_2712.img``) uses 16 KiB pages. A
library whose loadable segments are aligned to less than the page size cannot be mapped there
(the loader fails with "ELF load command address/offset not page-aligned"); qemu-user runs with
the host's 4 KiB pages, so the emulated run cannot show this. The alignment is in the ELF
program headers, so it is checked here directly.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

PT_LOAD = 1
NEEDED = 16 * 1024


def load_alignments(path: Path) -> list[int] | None:
    """``p_align`` of each PT_LOAD segment of a 64-bit little-endian ELF file, or None if it is not one."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == PT_LOAD:
            out.append(struct.unpack_from("<Q", table, i * phentsize + 48)[0])
    return out


def main(dirs: list[str]) -> int:
    checked, bad = 0, []
    for d in dirs:
        for path in sorted(Path(d).rglob("*.so*")):
            if not path.is_file() or path.is_symlink():
                continue
            aligns = load_alignments(path)
            if aligns is None:
                continue
            checked += 1
            if min(aligns, default=NEEDED) < NEEDED:
                bad.append(f"{path}: LOAD alignment {min(aligns):#x}")
    print(f"16K pages: {checked} shared objects checked, {len(bad)} aligned below 16 KiB")
    for line in bad:
        print(f"  {line}")
    return 1 if bad or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
