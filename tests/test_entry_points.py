"""Every command-line program of the repo starts: `python <file> --help` exits 0 from a fresh process (an import
that only breaks when the file runs as a script, e.g. before its sys.path line, fails here)."""
import subprocess
import sys

import pytest

from conftest import ROOT

PROGRAMS = sorted(p for folder in ("scripts", "tools", "studies") for p in (ROOT / folder).glob("*.py")
                  if "__main__" in p.read_text())


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_program_starts(program):
    done = subprocess.run([sys.executable, str(program), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()
