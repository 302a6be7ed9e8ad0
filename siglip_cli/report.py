"""Results of `search` and `dedup` for people and programs: a table on a terminal, JSON Lines, Parquet, and
a self-contained HTML page of thumbnails."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import sys
from dataclasses import dataclass

THUMB = 256  # pixels, the longer side
# the Parquet type of each column a result can have (sizes and resolutions as the index stores them)
TYPES = {
    "group": "int32",
    "representative": "bool_",
    "rank": "int32",
    "score": "float32",
    "path": "string",
    "width": "int32",
    "height": "int32",
    "size": "int64",
    "path_bytes": "binary",
}


@dataclass
class Results:
    """The rows of a search or a dedup (dicts, in the order of `columns`), and what their scores are."""

    columns: list[str]
    rows: list[dict]
    score: str  # "sigmoid probability" or "cosine"


def _table(results: Results):
    import pyarrow as pa

    schema = pa.schema([(c, getattr(pa, TYPES[c])()) for c in results.columns], metadata={"score": results.score})
    return pa.Table.from_pylist(results.rows, schema=schema)


def emit(results: Results, output: str | None, as_json: bool) -> None:
    """-o FILE.parquet: Parquet; --json or -o -: JSON Lines on stdout; otherwise an aligned table."""
    if output and output != "-":
        from .index import write_atomic

        table = _table(results)
        write_atomic(output, [table], table.schema)
        print(f"siglip: {table.num_rows} rows -> {output}", file=sys.stderr)
        return
    from .index.files import stdout_errors

    with stdout_errors():
        if as_json or output == "-" or not sys.stdout.isatty():
            for row in results.rows:
                sys.stdout.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        else:
            cols = [c for c in results.columns if c not in ("representative", "path_bytes")]
            rows = [[_cell(r[c]) for c in cols] for r in results.rows]
            widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
            print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
            for r in rows:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        sys.stdout.flush()


def _json_default(value) -> str:
    """path_bytes (the exact name, where it is not UTF-8) in base64, as the index's JSON Lines have it."""
    return base64.b64encode(value).decode() if isinstance(value, bytes) else str(value)


def _cell(v) -> str:
    """A value as the terminal table shows it: control characters (a file name's escape codes) escaped."""
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(v))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def thumbnail(path: str, timeout: float | None = None) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be read now: with decode's checks (a
    regular file, the pixel limit, a size its header explains) and within decode's timeout."""
    import threading

    from .config import DEFAULT_TIMEOUT

    out: list[str] = []
    worker = threading.Thread(target=lambda: out.append(_thumbnail(path)), name="siglip-thumbnail", daemon=True)
    worker.start()
    worker.join(DEFAULT_TIMEOUT if timeout is None else timeout)  # a stalled mount: shown as unreadable
    return out[0] if out else None


def _thumbnail(path: str) -> str | None:
    import stat

    from PIL import ImageOps

    from .config import DEFAULT_MAX_PIXELS
    from .decode import open_image, to_rgb

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO now at an indexed path would block forever
            return None
        with open(path, "rb") as f, open_image(f, st.st_size, DEFAULT_MAX_PIXELS) as im:
            im.draft("RGB", (THUMB, THUMB))
            im = to_rgb(ImageOps.exif_transpose(im))
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a missing or unreadable photo is shown as such
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:260px;background:#fff;border:1px solid #ddd;padding:6px}
.card img{max-width:256px;max-height:256px;display:block;margin:auto}.missing{height:120px;display:flex;
align-items:center;justify-content:center;color:#a00;background:#eee}.meta{font-size:12px;word-break:break-all}
.rep{border:2px solid #2a7}.group{margin-bottom:2em}h2{font-size:16px}"""


def _card(row: dict, label: str, rep: bool = False) -> str:
    uri = thumbnail(os.fsdecode(row["path_bytes"]) if row.get("path_bytes") else row["path"])
    img = (
        f'<img src="{uri}" alt="{html.escape(os.path.basename(row["path"]))}">'
        if uri
        else '<div class="missing">cannot read this file now</div>'
    )
    size = f"{row.get('width')}x{row.get('height')}, {row.get('size') or 0:,} bytes"
    return (
        f'<div class="card{" rep" if rep else ""}">{img}<div class="meta"><b>{html.escape(label)}</b><br>'
        f"{html.escape(row['path'])}<br>{size}</div></div>"
    )


def write_html(path: str, results: Results, title: str) -> None:
    """Search results as a grid, or dedup groups side by side (the representative framed); thumbnails are
    embedded, so the page opens anywhere."""
    rows = results.rows
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    if "group" in results.columns:
        groups: dict[int, list] = {}
        for r in rows:
            groups.setdefault(r["group"], []).append(r)
        for g, members in groups.items():
            parts.append(f'<div class="group"><h2>group {g}: {len(members)} files</h2><div class="grid">')
            parts += [
                _card(r, f"{'keep? ' if r['representative'] else ''}cos {r['score']:.4f}", r["representative"])
                for r in members
            ]
            parts.append("</div></div>")
    else:
        parts.append('<div class="grid">')
        parts += [_card(r, f"#{r['rank']}  score {r['score']:.4f}") for r in rows]
        parts.append("</div>")
    parts.append("</body></html>\n")
    from .index.files import write_error
    from .scratch import destination, scratch

    try:
        target = destination(path)
        with scratch(os.path.dirname(target) or ".") as folder:
            with open(os.path.join(folder, "page.html"), "w", encoding="utf-8") as f:
                f.write("".join(parts))
            os.replace(f.name, target)
    except OSError as e:
        raise write_error(path, e) from None
    print(f"siglip: {len(rows)} results -> {path}", file=sys.stderr)
