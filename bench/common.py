"""What the bench scripts share: running fastvae's own commands."""

import shlex
import subprocess
import sys


def fv(*args, capture=True):
    """Run ``python -m fastvae ARGS`` (printing the command); its stdout when
    ``capture``. A failing command raises CalledProcessError."""
    cmd = ["fastvae", *map(str, args)]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    r = subprocess.run([sys.executable, "-m", "fastvae", *map(str, args)], check=True,
                       capture_output=capture, text=True)
    return r.stdout
