"""Every document the repository cites is in the repository.

Students get the repository and nothing else: a docstring or comment that sends them to
a file kept outside it (the course authors' own notes) is a dead end. Published figures
belong in ``docs/references.md``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Names of documents that are not shipped; kept as pieces so this file does not cite them itself.
MISSING = [f"{name}.md" for name in ("REFERENCE", "FACTS", "DESIGN", "SEED_GUIDE")] + ["../" + "shared"]
PATTERN = re.compile("|".join(re.escape(m) for m in MISSING))


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return [ROOT / n.decode() for n in names if n and not n.endswith((b".png", b".gguf", b".safetensors", b".pdf"))]


def test_no_file_cites_a_document_outside_the_repo():
    offenders = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not offenders, "files cite documents that are not in the repository:\n" + "\n".join(offenders)
