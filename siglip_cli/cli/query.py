"""`search` and `dedup`: what an index holds."""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from .app import EXIT_CODES, app
from .boundary import checked_texts, one_line, show_results, usage
from .options import Device, Insecure, TextRules, finite, written_name

Index = Annotated[
    str,
    typer.Argument(
        help="An index made by `siglip embed` or `siglip tag --with-embeddings` (folder or file).", show_default=False
    ),
]
ResultsOut = Annotated[
    Optional[str],
    typer.Option(
        "--output",
        "-o",
        callback=written_name,
        help="FILE.parquet, or - for JSON Lines on stdout (default: a table on a terminal, JSON Lines in a pipe).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON Lines on stdout.")]
Html = Annotated[
    Optional[str],
    typer.Option(
        "--html",
        callback=written_name,
        help="Also write a self-contained page of thumbnails to this file.",
        show_default=False,
    ),
]


@app.command(epilog=EXIT_CODES)
def search(
    index: Index,
    query: Annotated[
        Optional[List[str]], typer.Argument(help="Text queries (their vectors are added).", show_default=False)
    ] = None,
    image: Annotated[
        Optional[List[str]],
        typer.Option(
            "--image",
            help="An image query (repeatable): a file in the index reuses its stored vector.",
            show_default=False,
        ),
    ] = None,
    minus: Annotated[
        Optional[List[str]], typer.Option("--minus", help="A text to move away from (repeatable).", show_default=False)
    ] = None,
    minus_image: Annotated[
        Optional[List[str]],
        typer.Option("--minus-image", help="An image to move away from (repeatable).", show_default=False),
    ] = None,
    image_weight: Annotated[
        float, typer.Option("--image-weight", callback=finite, help="Weight of the image parts against the texts' 1.")
    ] = 1.0,
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="How many results.")] = 10,
    min_score: Annotated[
        Optional[float],
        typer.Option("--min-score", callback=finite, help="Drop results scoring below this.", show_default=False),
    ] = None,
    path: Annotated[
        Optional[List[str]],
        typer.Option("--path", help="Only rows whose path matches this glob (repeatable).", show_default=False),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", "-m", help="Embed text queries with this model instead of the index's.", show_default=False
        ),
    ] = None,
    device: Device = "auto",
    text_rules: TextRules = "canonical",
    server: Annotated[
        Optional[str],
        typer.Option(
            "--server",
            envvar="SIGLIP_SERVER",
            help=(
                "Embed the queries with a running `siglip serve` of the index's model (URL; its token from "
                "SIGLIP_API_KEY): no model load and no torch in this process. \\[env: SIGLIP_SERVER]"
            ),
            show_default=False,
            show_envvar=False,
        ),
    ] = None,
    insecure: Insecure = False,
    output: ResultsOut = None,
    json_out: AsJson = False,
    html: Html = None,
) -> None:
    """Search an index by text, by image, or both: exact top-k over the stored vectors.

    A single text query scores SigLIP's own sigmoid probability; image queries and combinations score the cosine."""
    checked_texts(query or [], "query")
    checked_texts(minus or [], "--minus")

    def work():
        from ..remote import Remote, early

        if server and query and not (image or minus_image or model):  # a server holding this index searches it
            found = Remote(server, text_rules, insecure).search(
                index,
                {
                    "query": query,
                    "minus": minus or [],
                    "k": k,
                    "min_score": min_score,
                    "path": path or [],
                    "text_rules": text_rules,
                },
            )
            if found is not None:
                return found
        remote = early(server, tuple(query or ()), tuple(minus or ()), text_rules=text_rules, insecure=insecure)
        from .. import search as s
        from ..vectors import load

        q = s.Query(
            tuple(query or ()),
            tuple(image or ()),
            tuple(minus or ()),
            tuple(minus_image or ()),
            image_weight,
            k,
            min_score,
            tuple(path or ()),
            model,
            device,
            server,
            text_rules,
        )
        return s.search(load(index), q, remote=remote)

    show_results(work, output, json_out, html, f"siglip search: {' '.join(query or image or [])}")


DedupIndex = Annotated[
    Optional[str],
    typer.Argument(help="An index made by `siglip embed`, `tag` or `classify` (folder or file).", show_default=False),
]

DedupExact = Annotated[
    bool,
    typer.Option("--exact", help="Group files with identical bytes (by the index's content hashes; no model)."),
]

DedupKeep = Annotated[
    str,
    typer.Option(
        "--keep",
        help="Which file of a group is kept: largest (most pixels, then bytes), oldest (modification time), "
        "or path-prefix:FOLDER (the one under FOLDER).",
    ),
]

DedupPlan = Annotated[
    Optional[str],
    typer.Option(
        "--plan",
        callback=written_name,
        help="Also write a plan to this file: one JSON line per file to move into a quarantine folder (every "
        "member but its group's keeper). Review it, then run `siglip dedup --apply FILE`.",
        show_default=False,
    ),
]

DedupQuarantine = Annotated[
    Optional[str],
    typer.Option(
        "--quarantine",
        help="Where --plan moves files (default: beside the library, LIBRARY.siglip-quarantine).",
        show_default=False,
    ),
]

DedupApply = Annotated[
    Optional[str],
    typer.Option(
        "--apply",
        help="Carry out a plan --plan wrote: refused whole if a file changed since, or its keeper is gone. "
        "Files are moved, never deleted.",
        show_default=False,
    ),
]

DedupSimilar = Annotated[
    bool,
    typer.Option(
        "--similar", help="Group similar shots (bursts, cosine >= 0.92) instead of near-identical copies (>= 0.99)."
    ),
]

DedupBursts = Annotated[
    Optional[float],
    typer.Option(
        "--bursts",
        callback=finite,
        min=0.0,
        help="Group bursts instead: shots of one folder taken within SECONDS of one another (EXIF capture time) "
        "that look alike (cosine >= 0.92, or --threshold).",
        show_default=False,
    ),
]

DedupThreshold = Annotated[
    Optional[float],
    typer.Option(
        "--threshold",
        callback=finite,
        min=-1.0,
        max=1.0,
        help="Cosine at which two photos join a group (overrides the presets).",
        show_default=False,
    ),
]


@app.command(epilog=EXIT_CODES)
def dedup(
    index: DedupIndex = None,
    exact: DedupExact = False,
    keep: DedupKeep = "largest",
    plan: DedupPlan = None,
    quarantine: DedupQuarantine = None,
    apply: DedupApply = None,
    similar: DedupSimilar = False,
    bursts: DedupBursts = None,
    threshold: DedupThreshold = None,
    output: ResultsOut = None,
    json_out: AsJson = False,
    html: Html = None,
) -> None:
    """Find groups of near-duplicate photos in an index (never deletes anything).

    By default near-identical copies (resized, recompressed: cosine >= 0.99); --similar groups shots of one scene;
    --bursts SECONDS shots of one folder taken within SECONDS of one another that look alike."""

    from .. import plan as plans

    if (index is None) == (apply is None):
        raise typer.BadParameter("give an index to look in, or --apply PLAN (one of them)")
    if sum((exact, similar, bursts is not None)) > 1:
        raise typer.BadParameter("one tier at a time: --exact, --similar or --bursts SECONDS")
    usage(lambda: plans.check_rule(keep))
    if apply is not None:
        with one_line():
            moved, where = plans.apply_plan(apply)
        typer.echo(f"siglip: moved {moved:,} files" + (f" into {where}" if where else ""), err=True)
        return

    def work():
        from .. import search as s

        if exact:
            found = plans.as_results(plans.exact_groups(index), keep)
        else:
            from ..vectors import load

            v = load(index)
            limit = (
                threshold
                if threshold is not None
                else (s.SIMILAR if similar or bursts is not None else s.NEAR_IDENTICAL)
            )
            if bursts is None:
                found = s.dedup(v, limit)
            else:
                from ..bursts import burst_groups
                from ..sources import stored_path

                records = [v.rows.record(i) for i in range(len(v.matrix))]
                paths = [stored_path(r["path"], r.get("path_bytes")) for r in records]
                found = s.group_results(v, burst_groups(paths, v.matrix, bursts, limit))
        if plan is not None:
            tier = "exact" if exact else "similar" if similar else "bursts" if bursts is not None else "near-identical"
            n = plans.write_plan(plans.groups_of(found), tier, keep, plan, quarantine)
            print(
                f"siglip: {n:,} moves planned in {plan}; review it, then: siglip dedup --apply {plan}", file=sys.stderr
            )
        return found

    show_results(work, output, json_out, html, "siglip dedup")
