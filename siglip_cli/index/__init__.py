"""The output as a long-lived index of a photo library (see layouts.py for how it lies on disk).

- `files`: atomic writes, durable renames, one-line write errors, leftovers of killed runs
- `lock`: one run at a time per output
- `layouts`: a folder of parts, or a single file, behind one interface
- `rows`: the index proper: rows keyed by canonical path, pending files, moves, the prune policy
- `store`: an output opened for a run (lock + layout + index + the settings check)
- `reader`: the current rows, for people and for the commands that read an index
"""

from .files import METADATA_KEY, write_atomic
from .reader import read_index
from .rows import Root
from .store import Store

__all__ = ["METADATA_KEY", "Root", "Store", "read_index", "write_atomic"]
