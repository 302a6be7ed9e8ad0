"""`--ray`: the same run on Ray Data, for libraries that outgrow one machine.

This process (the driver) does what a local run does before and after the model: it lists the files, holds
the output's lock, works out what is pending from the index, and writes every row into the output's parts as
results come back (so a killed driver is finished by the next run, exactly as a killed local run is). Ray
runs the middle: decoding as CPU tasks (the same `decode`, one row per file, errors as rows) and the encoder
as an actor pool (the same `Encoder` and task, one GPU per actor on GPU nodes, CPU actors otherwise).

Per image, the network carries its path and stat to a decode task, its pixels at the model's size to an
encoder actor (uint8: 442 KB at 384x384, 150 KB at 224x224), and its row back to the driver (4.6 KB for a
float32 so400m embedding).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import RunConfig
from .decode import Decoded, ImageSpec, decode
from .errors import RunError
from .sources import FileRecord
from .worker import pixel_shape

BLOCK = 32  # files per decode task: a few seconds of work, enough blocks for every CPU of a cluster
META = "_siglip_meta"  # the column through which actors hand the driver the output's metadata


def connect(address: str):
    """Ray, connected: `local` starts a Ray on this machine (it ends with this process), anything else is
    given to ray.init (`auto`: the cluster `ray start` made here; `HOST:PORT`; `ray://HOST:PORT`)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RunError("--ray needs the ray extra: pip install 'siglip-cli[ray]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray for one run: no token to set up
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
        try:
            if address == "local":
                from .config import usable_cpus

                ray.init(num_cpus=usable_cpus(), **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RunError(f"cannot connect to Ray at {address!r}: {str(e).strip().splitlines()[0]} "
                           "(--ray local starts one here; --ray auto finds the one `ray start` made)") from None
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own
    return ray


def prepare(cfg: RunConfig) -> RunConfig:
    """The run's model settings as the actors will run them: their device kind (one GPU each where the cluster
    has GPUs, else the CPU) and a concrete dtype, so that the settings signature says what made the rows.

    `auto` dtype becomes bfloat16 on GPUs (give --dtype float16 on cards older than Ampere) and, on CPUs, what
    this machine's CPU would use.
    """
    import torch

    from .model import resolve_dtype

    if cfg.model.device not in ("auto", "cpu", "cuda"):
        raise RunError(f"--ray places each encoder on a GPU of its own, or on a CPU: give --device auto, cuda or "
                       f"cpu, not {cfg.model.device}")
    if cfg.model.device == "cpu":
        gpus = 0.0
    elif cfg.ray == "local":  # no Ray is started for a run that turns out to have nothing to do
        gpus = float(torch.cuda.device_count())
    else:
        gpus = connect(cfg.ray).cluster_resources().get("GPU", 0.0)
    if cfg.model.device == "cuda" and gpus < 1:
        raise RunError("--device cuda was asked for, but the Ray cluster has no GPUs; use --device cpu or auto")
    kind = "cuda" if gpus >= 1 else "cpu"
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" else str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    actors = cfg.ray_actors or (int(gpus) if kind == "cuda" else 1)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=kind, dtype=dtype), ray_actors=actors)


def _blocks(records: Iterable[FileRecord]) -> Iterator[pa.Table]:
    """The records as small Arrow tables (paths as bytes: a file name need not be UTF-8)."""
    from .sink import _utf8

    chunk: list[FileRecord] = []

    def table() -> pa.Table:
        return pa.table({
            "path": pa.array([os.fsencode(r.path) for r in chunk], pa.binary()),
            "size": pa.array([r.size for r in chunk], pa.int64()),
            "mtime_ns": pa.array([r.mtime_ns for r in chunk], pa.int64()),
            "error": pa.array([_utf8(r.error) for r in chunk], pa.string()),
        })

    for r in records:
        chunk.append(r)
        if len(chunk) == BLOCK:
            yield table()
            chunk = []
    if chunk:
        yield table()


def _records(table: pa.Table) -> list[FileRecord]:
    return [FileRecord(os.fsdecode(p), s, m, e) for p, s, m, e in zip(
        *(table.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "error")))]


def decode_block(table: pa.Table, spec: ImageSpec) -> pa.Table:
    """A Ray task: decode a block of files; one row each, its pixels (zeros for a file that failed) or its error."""
    from ray.data.extensions import ArrowTensorArray

    items = [decode(r, spec) for r in _records(table)]
    pixels = np.zeros((len(items), *pixel_shape(spec)), np.uint8)
    for i, d in enumerate(items):
        if d.pixels is not None:
            pixels[i, : len(d.pixels)] = d.pixels
    return table.select(["path", "size", "mtime_ns"]).append_column(
        "failure", pa.array([d.error for d in items], pa.string())).append_column(
        "sha256", pa.array([d.sha256 for d in items], pa.string())).append_column(
        "width", pa.array([d.width for d in items], pa.int64())).append_column(
        "height", pa.array([d.height for d in items], pa.int64())).append_column(
        "grid", pa.array([list(d.grid) for d in items], pa.list_(pa.int64(), 2))).append_column(
        "pixels", ArrowTensorArray.from_numpy(pixels))


class EncodeActor:
    """A Ray actor: the run's encoder and task; turns decoded blocks into output rows."""

    def __init__(self, cfg: RunConfig, signature: dict | None, batch_size: int):
        import torch

        from .model import Encoder
        from .pipeline import metadata
        from .sink import IMAGE_FIELDS, make_schema
        from .tasks import make_task

        self.encoder = Encoder.load(cfg.model)
        if self.encoder.device.type == "cpu" and self.encoder.backend == "torch":
            from .config import usable_cpus

            torch.set_num_threads(usable_cpus())  # Ray sets OMP_NUM_THREADS to the actor's nominal CPU share
        self.task = make_task(cfg.head, self.encoder)
        meta = metadata(self.encoder, {**self.task.metadata(), "signature": signature})
        self.schema = make_schema(IMAGE_FIELDS + self.task.fields(), meta)
        self.meta = pa.array([json.dumps(meta, sort_keys=True)], pa.string())
        self.spec = dataclasses.replace(self.encoder.spec, max_pixels=cfg.max_pixels, exact=cfg.exact)
        self.batch_size = batch_size

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from .loader import _batch
        from .pipeline import finite, launch
        from .sink import image_rows

        records = _records(table.select(["path", "size", "mtime_ns"]).append_column("error", pa.nulls(table.num_rows, pa.string())))
        items = [Decoded(r, sha, w, h, None, tuple(g), err) for r, sha, w, h, g, err in zip(
            records, *(table.column(c).to_pylist() for c in ("sha256", "width", "height", "grid", "failure")))]
        ok = [i for i, d in enumerate(items) if d.error is None]
        payload = {}
        if ok:
            column = table.column("pixels")
            pixels = np.concatenate([c.to_numpy() for c in column.chunks]) if column.num_chunks > 1 else column.chunk(0).to_numpy()
            batch = _batch(self.spec, torch.from_numpy(np.ascontiguousarray(pixels[ok])), items, ok, [items[i].grid for i in ok])
            arrays, ok = finite(batch, launch(self.encoder, self.task, batch, self.batch_size)())
            payload = self.task.host(arrays) if ok else {}
        rows = pa.Table.from_batches([image_rows(self.schema, items, ok, payload)])
        meta = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows.num_rows, np.int32)), self.meta)
        return rows.append_column(META, meta)


def process(cfg: RunConfig, store, records, progress) -> None:
    """Decode and encode the records on Ray; write their rows here (the store's parts, or JSON Lines)."""
    from .index import METADATA_KEY
    from .model import load_spec
    from .pipeline import default_batch_size
    from .sink import JsonLinesSink, PartSink

    import torch

    ray = connect(cfg.ray)
    spec = dataclasses.replace(load_spec(cfg.model), max_pixels=cfg.max_pixels, exact=cfg.exact)
    gpu = cfg.model.device == "cuda"
    batch_size = cfg.batch_size or default_batch_size(torch.device(cfg.model.device))
    blocks = list(_blocks(records))
    if not blocks:
        return
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_block, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None, num_cpus=1)
    # An encoder actor asks for less than a whole CPU: Ray then keeps decoding and encoding apart (it would fuse
    # two stages with the same resources into one actor) and leaves the decode tasks every core. A CPU actor's
    # torch uses all the node's cores anyway.
    ds = ds.map_batches(
        EncodeActor, fn_constructor_kwargs={"cfg": cfg, "signature": store.signature if store else None,
                                            "batch_size": batch_size},
        batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.ray_actors),
        num_gpus=1 if gpu else 0, num_cpus=0.5,
    )
    sink, schema, seen = None, None, set()
    progress.begin()
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if schema is None:
                meta = json.loads(table.column(META)[0].as_py())
                fields = [f for f in table.schema if f.name != META]
                schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
                sink = JsonLinesSink() if store is None else PartSink(store, schema)
            table = table.drop_columns([META])
            keys = list(zip(table.column("path").to_pylist(), table.column("path_bytes").to_pylist()))
            fresh = [i for i, key in enumerate(keys) if key not in seen]  # a retried task's rows, once
            if len(fresh) < table.num_rows:
                table = table.take(pa.array(fresh, pa.int64()))
            seen.update(keys)
            table = table.cast(schema)
            for batch in table.to_batches():
                sink.write(batch)
            good = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
            progress.advance(good, table.num_rows - good, store.skipped if store else 0)
    finally:
        if sink is not None:
            sink.close()
