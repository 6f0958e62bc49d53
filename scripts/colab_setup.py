"""Prepare a Colab runtime for the lab: install what requirements.txt asks that the runtime lacks, and
say what changed. The notebook's first cell runs it in Colab only; `make colab-check` runs it in a
virtual environment pinned to Colab's published versions.

    python scripts/colab_setup.py          # pip install -r requirements.txt, then kept / replaced / added

pip keeps every installed package that already satisfies requirements.txt (only lower bounds), so
Colab's torch, numpy, matplotlib, tqdm, transformers and ipywidgets stay; datasets (>= 5.0.1 for
`reshard()` and chained resumes) and with it pyarrow (>= 21, what datasets 5 needs) are replaced.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"


def installed() -> dict[str, str]:
    """{distribution name, lower case: version} of every installed distribution."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower().replace("_", "-")] = dist.version
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """{"replaced": ["name old -> new", ...], "added": ["name version", ...]} between two listings."""
    replaced = [f"{n} {before[n]} -> {v}" for n, v in sorted(after.items()) if n in before and before[n] != v]
    added = [f"{n} {v}" for n, v in sorted(after.items()) if n not in before]
    return {"replaced": replaced, "added": added}


def required_names() -> list[str]:
    """The distribution names requirements.txt lists."""
    names = []
    for line in REQUIREMENTS.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            names.append(spec.split(">")[0].split("=")[0].split("<")[0].strip().lower())
    return names


def module_names(dists: list[str]) -> set[str]:
    """The top-level modules of distributions (pyarrow -> pyarrow, huggingface-hub -> huggingface_hub)."""
    modules = set()
    for name in dists:
        try:
            top = importlib.metadata.distribution(name).read_text("top_level.txt") or ""
        except importlib.metadata.PackageNotFoundError:
            top = ""
        modules |= set(top.split()) or {name.replace("-", "_")}
    return modules


def main() -> dict[str, list[str]]:
    """Install, print what changed, and return it; warns when a replaced module is already imported
    in this process (then the runtime must be restarted before the lab imports it)."""
    before = installed()
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)]
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    after = installed()
    changed = changes(before, after)
    kept = [f"{n} {after[n]}" for n in required_names() if n in before and before[n] == after.get(n)]
    print("kept (the runtime's own):", ", ".join(kept) or "none")
    print("replaced:", ", ".join(changed["replaced"]) or "none")
    print("added:", ", ".join(changed["added"]) or "none")
    names = [entry.split()[0] for entry in changed["replaced"]]
    stale = sorted(module_names(names) & set(sys.modules))
    if stale:
        print(
            f"already imported in this session: {', '.join(stale)}: Runtime > Restart session, then run all"
        )
    return changed


if __name__ == "__main__":
    main()
