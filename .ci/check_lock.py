"""Every package installed in this environment is pinned in constraints.txt at the installed version (a package
that the lock does not name was resolved freshly and can change under a fresh clone). Exits 1 naming each one."""

import re
import sys
from importlib.metadata import distributions
from pathlib import Path


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


lock_file = Path(__file__).resolve().parent.parent / "constraints.txt"
pins = {}
for number, line in enumerate(lock_file.read_text().splitlines(), 1):
    line = line.split("#", 1)[0].strip()
    if line:
        name, sep, version = line.partition("==")
        if not sep:
            sys.exit(f"{lock_file}:{number}: expected 'name==version', got '{line}'")
        pins[normalise(name)] = version.strip()

problems = []
for dist in distributions():
    name, version = normalise(dist.metadata["Name"]), dist.version
    if name in {"t2i-align", "pip", "setuptools", "wheel"}:
        continue
    pinned = pins.get(name)
    if pinned is None:
        problems.append(f"{name}=={version} is installed but not pinned")
    elif version.split("+")[0] != pinned:
        problems.append(f"{name}=={version} is installed, the lock pins {pinned}")
if problems:
    sys.exit(f"{lock_file} does not describe this environment:\n  " + "\n  ".join(problems))
print(f"lock ok: {len(pins)} pins, every installed package matches")
