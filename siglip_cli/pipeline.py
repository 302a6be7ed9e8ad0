"""The run: sources -> decode workers -> batches -> encoder -> task -> sink, with progress and a summary."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import torch

from .config import RunConfig
from .decode import may_work_now
from .devices import default_batch_size, place, resolve_dtype
from .encode import finite, launch, made_with, metadata
from .errors import RunError
from .index import Root, Store
from .index.store import check_parent
from .loader import Batch, batches
from .model import Encoder
from .progress import Progress, Summary, progress_enabled
from .sink import IMAGE_FIELDS, TEXT_FIELDS, JsonLinesSink, PartSink, image_rows, make_schema, scatter, vector_type
from .sources import Skip, is_dir, iter_files, missing
from .tasks import make_task
from .vocab import Vocab
from .weights import MODEL_KEYS, checkpoint_json, model_signature, patches_setting, resolve_weights


def version_note(before: dict, now: dict) -> str | None:
    """A line for a run that continues an index whose newest rows were made under another major version."""
    changed = [
        f"{k} {before[k]} -> {v}"
        for k, v in now.items()
        if isinstance(before.get(k), str) and before[k].split(".")[0] != v.split(".")[0]
    ]
    if not changed:
        return None
    return (
        "siglip: note: this index was made under other major versions (" + ", ".join(changed) + "); new rows "
        "are added to it as usual (--overwrite rebuilds it under these)"
    )


# Rows are keyed by canonical absolute paths (version 2); indexes of version 1 (paths as typed) are refused.
INDEX_VERSION = 2


def resolve(cfg: RunConfig, served: dict | None = None, here: bool = True) -> tuple[RunConfig, dict]:
    """The run's config with the model's revision pinned to the commit it resolves to, and its signature:
    the settings that decide what a row holds. An output only takes rows made with the same ones.

    Known without loading the model (a Hub commit from its cached ref, or a local folder's fingerprint), so
    that an incremental run with nothing to do never loads it; loading then uses exactly that commit.
    `served`: the model's part as a --server reports it (or as the index recorded it), used as it is; `here`:
    the model runs in this process (its placement is made once, here), not on Ray's actors.
    """
    name = cfg.model.name
    text = cfg.model.text_rules if uses_text(cfg) else None  # an image embedding does not depend on it
    sig = {"index": INDEX_VERSION, "task": type(cfg.head).__name__ if cfg.head else "texts"}
    if served is not None:
        sig.update({k: v for k, v in served.items() if k in MODEL_KEYS and (k != "text_rules" or text)})
    else:
        weights = resolve_weights(name, cfg.model.revision)  # (its config.json is in the Hub's cache from here)
        if not here:  # (Ray: its actors' device and dtype were made concrete by the executor's prepare)
            dtype = str(resolve_dtype(cfg.model.dtype, [])).removeprefix("torch.")
        else:  # where the model runs, once: an absent device fails here, before any work
            naflex = checkpoint_json(name, cfg.model.revision, "config.json").get("model_type") == "siglip2"
            placement = place(cfg.model, naflex)
            cfg = dataclasses.replace(
                cfg, placement=placement, model=dataclasses.replace(cfg.model, quantize=placement.quantize)
            )
            dtype = str(placement.dtype).removeprefix("torch.")
        m = cfg.model
        sig.update(model_signature(name, weights, dtype, m.max_patches, m.quantize, m.int8_bound, text))
        # a local folder by its absolute path: the index's metadata then names it from anywhere (./ckpt from
        # another folder is another checkpoint, or none)
        local = os.path.isdir(name)
        model = dataclasses.replace(m, name=os.path.abspath(name) if local else name, commit=None if local else weights)
        cfg = dataclasses.replace(cfg, model=model)
    if cfg.head is not None:
        sig["exact"] = cfg.exact
        for f in dataclasses.fields(cfg.head):
            value = getattr(cfg.head, f.name)
            if f.name == "cache":
                continue
            if isinstance(value, Vocab):
                value = hashlib.sha256(json.dumps([value.tags, value.thresholds]).encode()).hexdigest()
            sig[f.name] = value
    return cfg, json.loads(json.dumps(sig))  # tuples -> lists, as they read back


def uses_text(cfg: RunConfig) -> bool:
    """Whether the run's rows depend on the text tower (tags, labels, texts), not on the images alone."""
    return cfg.head is None or type(cfg.head).__name__ != "EmbedSpec"


def _normalized(theirs, cfg: RunConfig, sig: dict):
    """An output's signature as this version records the same settings: an output made before --max-patches
    was normalized recorded the checkpoint's default, or a value that a fixed-resolution checkpoint ignores;
    one made before text rules were recorded cleaned texts by lowercasing them."""
    if isinstance(theirs, dict) and "text_rules" in sig and "text_rules" not in theirs:
        theirs = {**theirs, "text_rules": "lower"}
    if cfg.server:  # the model is not here to read its default patches from
        return theirs
    if not isinstance(theirs, dict) or theirs.get("max_patches") is None or theirs.get("weights") != sig["weights"]:
        return theirs
    patches = patches_setting(cfg.model.name, cfg.model.commit or cfg.model.revision, theirs["max_patches"])[0]
    return {**theirs, "max_patches": patches}


def roots(paths) -> list[Root]:
    """The folders given (and paths given that are missing, a dangling link's target too): the rows under them
    are this run's to prune."""
    return [Root(p, os.path.realpath(p), not gone) for p in paths if (gone := missing(p)) or is_dir(p)]


def run(cfg: RunConfig) -> Summary:
    """Embed, tag or classify every input file that needs it; one row each, written as the run goes.

    Into a file or folder, the run is incremental and resumable (index/); to stdout it streams everything.
    """
    out, src = cfg.output, cfg.sources
    if out.path != "-":
        check_parent(out.path)  # before the model is resolved: a typo in -o fails at once
    # An argument that is not there (a share not mounted, a typo, a link to either) gets no row: it is told, and
    # fails the run; when none is there, before the model or the output is touched. With --prune, the index
    # refuses to prune under it (check_roots); with --prune-anyway it is a folder deleted on purpose: its rows go.
    gone = [] if out.prune and out.prune_anyway else [p for p in src.paths if missing(p)]
    if gone and len(gone) == len(src.paths) and src.files_from is None:
        raise RunError(
            f"{', '.join(gone)}: no such file or folder (an unmounted share?); nothing done"
            + ("; not pruning (--prune-anyway prunes its rows if it is gone for good)" if out.prune else "")
        )
    for p in gone:
        print(f"siglip: error: {p}: no such file or folder (an unmounted share?)", file=sys.stderr)
    summary = _start(cfg)
    summary.missing = len(gone)
    return summary


def _start(cfg: RunConfig) -> Summary:
    out = cfg.output
    remote = served = None
    if cfg.server:  # the model is the server's: nothing of it is read here
        from .encoders.remote import RemoteEncoder

        remote = RemoteEncoder(cfg.server, cfg.insecure, cfg.server_retry, cfg.wire)
        if out.path != "-":
            served = _recorded(out.path) if not out.overwrite else None
            served = served or remote.describe()["signature"]  # (an index's own: checked when the model is needed)
    else:
        patches, note = patches_setting(cfg.model.name, cfg.model.revision, cfg.model.max_patches)
        if note:
            print(f"siglip: note: {note}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_patches=patches))
    executor = executor_for(cfg, remote)
    cfg = executor.prepare(cfg)  # (Ray: the device and dtype its actors will use, in the signature)
    if out.path == "-":
        return _run(cfg, None, executor)
    cfg, sig = resolve(cfg, served, here=executor.here)
    store = Store.open(out.path, sig, out.overwrite, out.wait, same=lambda theirs: _normalized(theirs, cfg, sig))
    if not out.overwrite and not remote and (note := version_note(store.made_with, made_with(openvino=False))):
        print(note, file=sys.stderr)
    try:
        if out.prune and not out.prune_anyway:  # a missing root: refuse before any work
            store.index.check_roots([r for r in roots(cfg.sources.paths) if not r.exists])
        return _run(cfg, store, executor)
    finally:
        store.close()


def _recorded(path: str) -> dict | None:
    """The model's part of the signature an existing index was made with, or None (no index there yet)."""
    from .sink import read_metadata

    try:
        sig = read_metadata(path).get("signature")
    except (OSError, IndexError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    if not isinstance(sig, dict):
        return None
    if sig.get("task") != "EmbedSpec":  # an index made before text rules were recorded lowercased its texts
        sig = {"text_rules": "lower", **sig}
    return {k: v for k, v in sig.items() if k in MODEL_KEYS}


def _encoders(cfg: RunConfig, store: Store | None, remote) -> list:
    """The run's encoders, one per device (a remote server: one per batch in flight)."""
    if remote is None:
        return Encoder.load_all(
            cfg.model, progress_enabled(cfg.quiet), batch_size=cfg.batch_size, placement=cfg.placement
        )
    return remote.start(cfg.model, uses_text(cfg), store.signature if store is not None else None)


class LocalRun:
    """The run's batches through encoders in this process: one per device, or a --server's lanes."""

    here = True

    def __init__(self, remote=None):
        self.remote = remote

    def prepare(self, cfg: RunConfig) -> RunConfig:
        return cfg

    def process(self, cfg: RunConfig, store: Store | None, records, progress: Progress) -> None:
        process(cfg, store, records, progress, _encoders(cfg, store, self.remote))


def executor_for(cfg: RunConfig, remote=None):
    """What runs the batches, picked once: this process (LocalRun), or Ray (cluster.RayRun)."""
    if cfg.ray:
        from .cluster import RayRun

        return RayRun()
    return LocalRun(remote)


def _run(cfg: RunConfig, store: Store | None, executor) -> Summary:
    src, out = cfg.sources, cfg.output
    skip = Skip(src.exclude, src.include_hidden, src.raw_pairs)
    records = iter_files(src.paths, src.files_from, src.extensions, skip)
    if store is None:
        records = _once(records)
    else:

        def retry(path: str, entry) -> bool:  # a file that failed before, unchanged since
            return out.retry_errors or may_work_now(entry.error, path, entry.pixels, cfg.max_pixels, cfg.timeout)

        records = store.pending(records, roots(src.paths), out.rehash, retry)
    recount = (
        None
        if src.files_from == "-"
        else lambda: sum(1 for _ in iter_files(src.paths, src.files_from, src.extensions, skip))
    )
    progress = Progress(progress_enabled(cfg.quiet), recount)
    first = next(records, None)
    if first is not None:  # only now is the model worth loading
        try:
            executor.process(cfg, store, itertools.chain([first], records), progress)
        except BaseException:
            progress.close()
            raise
    refused = None
    if store is not None:
        progress.summary.moved = store.copy_moves()
        if store.index.absent:
            print(
                f"siglip: note: {store.index.absent:,} files with rows in the index are not there now, or cannot be "
                "checked (an unmounted share?); their rows are kept",
                file=sys.stderr,
            )
        if out.prune:
            try:
                progress.summary.pruned = store.prune(roots(src.paths), out.prune_anyway)
            except RunError as e:  # the rows of this run are still made whole; then the run fails
                refused = e
        store.finish()
    summary = progress.close()
    if refused is not None:
        raise refused
    summary.skipped = store.skipped if store is not None else 0
    summary.output = out.path
    return summary


def _once(records):
    """Each path once (an index does this itself): a file named twice, or named and listed, is one row."""
    seen: set[str] = set()
    for rec in records:
        if rec.path not in seen:
            seen.add(rec.path)
            yield rec


def process(cfg: RunConfig, store: Store | None, records, progress: Progress, encoders: list[Encoder]) -> None:
    """Decode, encode and write the given records: into the store's parts, or as JSON Lines when None.

    With several devices, batch i goes to device i mod k, each device's work is started from a thread of its
    own, and the batches are finished in input order.
    """
    encoder = encoders[0]
    if encoder.device.type == "cuda":
        # This thread's current device: the loader's pinned buffers are allocated here, and on GPU 0 (the
        # default) they would create a CUDA context there even when the run is on cuda:1 only.
        torch.cuda.set_device(encoder.device)
    task = make_task(cfg.head, encoder)
    tasks = [task] + [task.on(e) for e in encoders[1:]]
    batch_size = encoder.batch_size(cfg.batch_size) if encoder.backend == "remote" else cfg.batch_size
    batch_size = batch_size or default_batch_size(encoder.device)
    for e in encoders:
        e.pad_to = batch_size if cfg.model.compile else 0
    spec = dataclasses.replace(encoder.spec, max_pixels=cfg.max_pixels, exact=cfg.exact)
    if encoder.backend == "openvino":
        from .encoders import openvino

        records = openvino.prepare(encoders, records, spec)
    extra = {"server": encoder.url} if encoder.backend == "remote" else {}  # (no query, no credentials)
    meta = metadata(encoder, {**task.metadata(), **extra, "signature": store.signature if store else None})
    schema = make_schema(IMAGE_FIELDS + task.fields(), meta)
    sink = JsonLinesSink() if store is None else PartSink(store, schema)
    progress.begin()

    def finish(batch: Batch, wait) -> None:
        ok, payload = batch.ok, {}
        if isinstance(wait, Future):
            wait = wait.result()
        if wait:
            arrays, ok = finite(batch, wait())
            payload = task.host(arrays) if ok else {}
        rows = image_rows(schema, batch.items, ok, payload)
        sink.write(rows)
        good = pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0  # rows that could not be recorded are errors
        progress.advance(good, rows.num_rows - good, store.skipped if store else 0)

    # One batch in flight per device: batch i+1 is on the device while the host writes batch i and collates i+2.
    k = len(encoders)
    lanes = [ThreadPoolExecutor(1, f"siglip-{i}-{e.device}") for i, e in enumerate(encoders)] if k > 1 else []
    pending: collections.deque = collections.deque()
    try:
        pin = encoder.device.type == "cuda"
        for i, batch in enumerate(batches(records, spec, batch_size, cfg.workers, pin, cfg.timeout)):
            j = i % k
            if not batch.ok:
                pending.append((batch, None))
            elif lanes:
                pending.append((batch, lanes[j].submit(launch, encoders[j], tasks[j], batch, batch_size)))
            else:
                pending.append((batch, launch(encoder, task, batch, batch_size)))
            while len(pending) > k:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    finally:
        for e in dict.fromkeys(encoders):
            e.close()  # (a remote one: lanes still waiting on the server stop)
        for lane in lanes:
            lane.shutdown(wait=False, cancel_futures=True)
        sink.close()  # even when interrupted: the rows finished so far are kept, and a rerun skips them


def run_texts(cfg: RunConfig, texts: list[str]) -> Summary:
    """Text embeddings in the image embeddings' space, one row per text, in one file (or stdout)."""
    path, out = cfg.output.path, cfg.output
    store = remote = None
    if cfg.server:
        from .encoders.remote import RemoteEncoder

        remote = RemoteEncoder(cfg.server, cfg.insecure, cfg.server_retry)
    if path != "-":  # the same rules as images: the lock, the settings, no other kind of output replaced
        check_parent(path)
        cfg, sig = resolve(cfg, remote and remote.describe()["signature"])
        store = Store.open(
            path, sig, out.overwrite, out.wait, images=False, same=lambda theirs: _normalized(theirs, cfg, sig)
        )
    try:
        return _run_texts(cfg, texts, store, remote)
    finally:
        if store is not None:
            store.close()


def _run_texts(cfg: RunConfig, texts: list[str], store: Store | None, remote=None) -> Summary:
    path = cfg.output.path
    if remote:
        encoder = _encoders(cfg, store, remote)[0]
    else:
        encoder = Encoder.load(cfg.model, progress_enabled(cfg.quiet), placement=cfg.placement)
    field = pa.field("embedding", vector_type(encoder.info.dim, cfg.output.float16))
    schema = make_schema(
        TEXT_FIELDS + [field], metadata(encoder, {"task": "embed-text", "signature": store and store.signature})
    )
    progress = Progress(progress_enabled(cfg.quiet), label="texts")
    emb = encoder.encode_texts(texts).cpu().numpy().astype("float16" if cfg.output.float16 else "float32")
    n = len(texts)
    table = pa.Table.from_arrays(
        [
            pa.array(texts, pa.string()),
            pa.array(["ok"] * n),
            pa.nulls(n, pa.string()),
            scatter(field, emb, range(n), n),
        ],
        schema=schema,
    )
    if store is None:
        JsonLinesSink().write(table)
    else:
        store.replace(table)
    progress.advance(n, 0)
    summary = progress.close()
    summary.output = path
    return summary
