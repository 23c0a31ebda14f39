"""Create a virtual environment with pip, also where ensurepip is missing.

Debian and Ubuntu ship ensurepip in a separate package (python3-venv). Without it,
`python3 -m venv` fails; this makes the venv without pip and installs pip from its
wheel on PyPI instead, so `make run` needs nothing but Python and make.
Usage: python3 tools/bootstrap_venv.py .venv
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import venv
from pathlib import Path


def main(target: str) -> int:
    path = Path(target)
    python = path / "bin" / "python"
    try:
        venv.create(path, with_pip=True)
        return 0
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"ensurepip is not available ({exc}); installing pip from PyPI instead", file=sys.stderr)
    venv.create(path, with_pip=False, clear=True)
    index = "https://pypi.org/pypi/pip/json"
    with urllib.request.urlopen(index, timeout=60) as answer:
        release = json.load(answer)
    wheel = next(f for f in release["urls"] if f["filename"].endswith(".whl"))
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(tmp) / wheel["filename"]
        urllib.request.urlretrieve(urllib.parse.urljoin(index, wheel["url"]), wheel_path)
        # A pip wheel can run itself: install pip from its own wheel into the venv.
        subprocess.run([str(python), f"{wheel_path}/pip", "install", "--quiet", str(wheel_path)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".venv"))
