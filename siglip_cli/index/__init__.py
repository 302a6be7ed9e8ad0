"""The output as a long-lived index of a photo library (see layouts.py for how it lies on disk).

- `files`: atomic writes, durable renames, one-line write errors, leftovers of killed runs
- `lock`: one run at a time per output
- `layouts`: a folder of parts, or a single file, behind one interface
- `rows`: the index proper: rows keyed by canonical path, pending files, moves, the prune policy
- `store`: an output opened for a run (lock + layout + index + the settings check)
- `reader`: the current rows, for people and for the commands that read an index
"""

import importlib

# imported when first used: `search` reads a sidecar through layouts' file naming without importing pyarrow
_FROM = {"METADATA_KEY": "files", "write_atomic": "files", "read_index": "reader", "Root": "rows", "Store": "store"}
__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
