"""Re-execute the teaching notebooks from their jupytext sources, and re-sync each pair.

    python notebooks/sync.py                  # execute every NN_name.py, write NN_name.ipynb with its outputs
    python notebooks/sync.py 01 03            # only the notebooks whose names start with these
    python notebooks/sync.py --no-execute 02  # copy the cells over, keeping the outputs of unchanged cells
    python notebooks/sync.py --check          # exit 1, naming the first differing cell of each pair out of sync

Each notebook is a pair: `NN_name.py`, the jupytext percent-format source (`# %%` starts a code cell,
`# %% [markdown]` a markdown cell) that is edited and reviewed as code, and `NN_name.ipynb`, the same
cells with their executed outputs, committed so that the notebook reads on a code host without running.
Jupyter with jupytext installed opens either file as the pair (metadata `formats: ipynb,py:percent`).

The kernel (`python3`) runs in notebooks/, offline (HF_HUB_OFFLINE=1 unless set), with the pretrained
toy models cached under $NABLA_GFN_CACHE (default ~/.cache/nabla-gfn). tests/test_notebooks.py runs
the same execution headless and the same check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
PAIRING = {"formats": "ipynb,py:percent"}


def sources(folder: Path = HERE, prefixes: Tuple[str, ...] = ()) -> List[Path]:
    """The notebooks' jupytext sources NN_name.py in `folder`, optionally only names starting with a prefix."""
    found = sorted(folder.glob("[0-9][0-9]_*.py"))
    return [p for p in found if not prefixes or p.name.startswith(prefixes)]


def read_source(py: Path) -> nbformat.NotebookNode:
    """The notebook that `py` holds, without outputs; cell ids are stable (NN-ii) so that re-syncing gives no diff."""
    nb = jupytext.read(py)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{py.name[:2]}-{i:02d}"
    nb.metadata["jupytext"] = dict(PAIRING)
    nb.metadata.setdefault("kernelspec", {"display_name": "Python 3", "language": "python", "name": "python3"})
    return nb


def cells(nb: nbformat.NotebookNode) -> List[Tuple[str, str]]:
    """(cell type, source) of each cell: what a pair must agree on."""
    return [(c.cell_type, c.source) for c in nb.cells]


def mismatch(py: Path, ipynb: Optional[Path] = None) -> Optional[str]:
    """None if `py` and its .ipynb hold the same cells, else one line naming the first difference."""
    ipynb = py.with_suffix(".ipynb") if ipynb is None else ipynb
    if not ipynb.is_file():
        return f"{ipynb.name} is missing"
    source, committed = cells(jupytext.read(py)), cells(nbformat.read(ipynb, as_version=4))
    for i, (a, b) in enumerate(zip(source, committed)):
        if a != b:
            first = (a[1].strip().splitlines() or [""])[0][:60]
            return f"{ipynb.name} differs from {py.name} at cell {i} ({a[0]}, starting {first!r})"
    if len(source) != len(committed):
        return f"{ipynb.name} has {len(committed)} cells, {py.name} has {len(source)}"
    return None


def execute(nb: nbformat.NotebookNode, timeout: int = 600, env: Optional[Dict[str, str]] = None,
            cwd: Path = HERE) -> nbformat.NotebookNode:
    """Run every cell in a fresh `python3` kernel started in `cwd` (no timing metadata), in place.

    timeout: seconds per cell; env: the kernel's whole environment (default: this process's, offline).
    Raises nbclient's CellExecutionError on the first cell that fails.
    """
    from nbclient import NotebookClient

    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")} if env is None else env
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


def carry_outputs(nb: nbformat.NotebookNode, old: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Give each code cell of `nb` the outputs of the cell at the same index of `old` if its source is unchanged."""
    for cell, before in zip(nb.cells, old.cells):
        if cell.cell_type == "code" and before.cell_type == "code" and cell.source == before.source:
            cell.outputs, cell.execution_count = before.outputs, before.execution_count
    return nb


def sync(py: Path, run: bool = True) -> nbformat.NotebookNode:
    """Write py's .ipynb: its cells, executed (run=True) or with the previous outputs of unchanged cells."""
    nb, ipynb = read_source(py), py.with_suffix(".ipynb")
    if run:
        execute(nb, cwd=py.parent)
    elif ipynb.is_file():
        carry_outputs(nb, nbformat.read(ipynb, as_version=4))
    nbformat.write(nb, ipynb)
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="name prefixes of the notebooks to sync (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="copy the cells without executing them")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a pair is out of sync")
    parser.add_argument("--folder", type=Path, default=HERE, help="folder holding the pairs (default: notebooks/)")
    args = parser.parse_args(argv)
    pairs = sources(args.folder, tuple(args.only))
    if not pairs:
        raise SystemExit(f"error: no NN_name.py in {args.folder} starts with {args.only}")
    if args.check:
        problems = [m for m in map(mismatch, pairs) if m]
        print("\n".join(problems) or f"{len(pairs)} pairs in sync")
        raise SystemExit(1 if problems else 0)
    for py in pairs:
        start = time.time()
        nb = sync(py, run=not args.no_execute)
        took = "" if args.no_execute else f", executed in {time.time() - start:.0f} s"
        print(f"{py.with_suffix('.ipynb').name}: {len(nb.cells)} cells{took}")


if __name__ == "__main__":
    sys.exit(main())
