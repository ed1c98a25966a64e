import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hostile_parser_demo_survives():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hostile_parser", "demo.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "parser crashed" in out and "SIGSEGV" in out
    assert "timed out" in out
    assert "rejected: not a TIMG file" in out
    assert out.count("Header(") == 3  # every good image parsed, also after the crash
    assert "main survived; parser instances replaced after a crash: 1" in out
