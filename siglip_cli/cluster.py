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
import re
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import RunConfig
from .decode import Decoded, ImageSpec
from .errors import RunError
from .sources import FileRecord
from .worker import pixel_shape

DECODED = 16  # files a decode task hands on at a time (16 x 442 KB of pixels at 384x384)
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
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
        try:
            if address == "local":  # a Ray of its own, even where RAY_ADDRESS names another or one runs here
                from .config import usable_cpus

                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # for one run: no token to set up
                ray.init(address="local", num_cpus=usable_cpus(), **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RunError(
                f"cannot connect to Ray at {address!r}: {str(e).strip().splitlines()[0]} "
                "(--ray local starts one here; --ray auto finds the one `ray start` made)"
            ) from None
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own
    return ray


def prepare(cfg: RunConfig) -> RunConfig:
    """The run's model settings as the actors will run them: their device kind (one GPU each where the cluster
    has GPUs, else the CPU) and a concrete dtype, so that the settings signature says what made the rows.

    `auto` dtype is what a local run would choose on those devices: asked of one of the cluster's GPUs (bfloat16
    from Ampere on, float16 before), or of this machine's CPU for CPU actors.
    """
    import torch

    from .devices import resolve_devices, resolve_dtype

    if cfg.model.device not in ("auto", "cpu", "cuda"):
        raise RunError(
            f"--ray places each encoder on a GPU of its own, or on a CPU: give --device auto, cuda or "
            f"cpu, not {cfg.model.device}"
        )
    local = cfg.ray == "local"  # no Ray is started for a run that turns out to have nothing to do
    if cfg.model.device == "cpu":
        gpus = 0.0
    elif local:
        gpus = float(torch.cuda.device_count())
    else:
        gpus = connect(cfg.ray).cluster_resources().get("GPU", 0.0)
    if cfg.model.device == "cuda" and gpus < 1:
        raise RunError("--device cuda was asked for, but the Ray cluster has no GPUs; use --device cpu or auto")
    kind = "cuda" if gpus >= 1 else "cpu"
    dtype = cfg.model.dtype
    if dtype == "auto":  # as a local run on the actors' devices would choose
        if kind == "cuda" and not local:
            ray = connect(cfg.ray)
            dtype = "bfloat16" if ray.get(ray.remote(num_gpus=1)(_bf16_native).remote()) else "float16"
        else:
            devices = resolve_devices("cuda") if kind == "cuda" else [torch.device("cpu")]
            dtype = str(resolve_dtype("auto", devices)).removeprefix("torch.")
    actors = cfg.ray_actors or (int(gpus) if kind == "cuda" else 1)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=kind, dtype=dtype), ray_actors=actors)


def _bf16_native() -> bool:
    """A Ray task on a GPU of the cluster: whether that GPU does bfloat16 natively (the choice of --dtype auto;
    a cluster is taken to have GPUs of one kind)."""
    import torch

    from .devices import cuda_bf16_native

    return cuda_bf16_native(torch.device("cuda", 0))


def _tables(records: Iterable[FileRecord], size: int = 4096) -> Iterator[pa.Table]:
    """The records as Arrow tables (compact however many there are; paths as bytes: a name need not be UTF-8)."""
    from .sink import utf8

    chunk: list[FileRecord] = []

    def table() -> pa.Table:
        return pa.table(
            {
                "path": pa.array([os.fsencode(r.path) for r in chunk], pa.binary()),
                "size": pa.array([r.size for r in chunk], pa.int64()),
                "mtime_ns": pa.array([r.mtime_ns for r in chunk], pa.int64()),
                "error": pa.array([utf8(r.error) for r in chunk], pa.string()),
            }
        )

    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield table()
            chunk = []
    if chunk:
        yield table()


def blocks(tables: list[pa.Table], cpus: int) -> list[pa.Table]:
    """Decode tasks' inputs: about four per CPU of the cluster, of 32 to 4,096 files (fewer, bigger blocks cost
    the driver less to hand to Ray; more, smaller ones spread a small run over every CPU)."""
    n = sum(t.num_rows for t in tables)
    size = min(4096, max(32, -(-n // (4 * max(1, cpus)))))
    return [t.slice(i, size) for t in tables for i in range(0, t.num_rows, size)]


def _records(table: pa.Table) -> list[FileRecord]:
    return [
        FileRecord(os.fsdecode(p), s, m, e)
        for p, s, m, e in zip(*(table.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "error")))
    ]


_KEPT: dict = {}  # this Ray worker's decode process, kept from one task to the next (loader.decoded_chunks)


def decode_block(table: pa.Table, spec: ImageSpec, timeout: float) -> Iterator[pa.Table]:
    """A Ray task: decode a block of files, DECODED at a time; one row each, its pixels (zeros for a file that
    failed) or its error.

    Files are decoded in a process of their own, as in a local run: a file that crashes the decoder or stalls
    past --timeout is an error row, never a task that Ray retries for ever.
    """
    from ray.data.extensions import ArrowTensorArray

    from .loader import decoded_chunks

    shape, start = pixel_shape(spec), 0
    for items in decoded_chunks(_records(table), spec, 1, DECODED, timeout, keep=_KEPT):
        pixels = np.zeros((len(items), *shape), np.uint8)
        for i, d in enumerate(items):
            if d.pixels is not None:  # a view into shared memory until the next chunk: copied now
                pixels[i, : len(d.pixels)] = d.pixels
        part = table.slice(start, len(items)).drop_columns(["error"])
        start += len(items)
        columns = {  # `error` now: the record's own, or what decoding found
            "error": pa.array([d.error for d in items], pa.string()),
            "sha256": pa.array([d.sha256 for d in items], pa.string()),
            "width": pa.array([d.width for d in items], pa.int64()),
            "height": pa.array([d.height for d in items], pa.int64()),
            "grid": pa.array([list(d.grid) for d in items], pa.list_(pa.int64(), 2)),
            "pixels": ArrowTensorArray.from_numpy(pixels),
        }
        for name, column in columns.items():
            part = part.append_column(name, column)
        yield part


class EncodeActor:
    """A Ray actor: the run's encoder and task; turns decoded blocks into output rows."""

    def __init__(self, cfg: RunConfig, signature: dict | None, batch_size: int):
        import torch

        from .encode import metadata
        from .model import Encoder
        from .sink import IMAGE_FIELDS, make_schema
        from .tasks import make_task

        self.encoder = Encoder.load(cfg.model, batch_size=batch_size)
        if self.encoder.device.type == "cpu" and self.encoder.backend == "torch":
            from .config import usable_cpus

            torch.set_num_threads(usable_cpus())  # Ray sets OMP_NUM_THREADS to the actor's nominal CPU share
        self.task = make_task(cfg.head, self.encoder)
        meta = metadata(self.encoder, {**self.task.metadata(), "signature": signature})
        self.schema = make_schema(IMAGE_FIELDS + self.task.fields(), meta)
        self.meta = pa.array([json.dumps(meta, sort_keys=True)], pa.string())
        self.spec = dataclasses.replace(self.encoder.spec, max_pixels=cfg.max_pixels, exact=cfg.exact)
        self.batch_size = batch_size
        self.encoder.pad_to = batch_size if cfg.model.compile else 0  # one compiled graph for every batch

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from .encode import finite, launch
        from .loader import collate
        from .sink import image_rows

        items = [
            Decoded(r, sha, w, h, None, tuple(g), r.error)
            for r, sha, w, h, g in zip(
                _records(table), *(table.column(c).to_pylist() for c in ("sha256", "width", "height", "grid"))
            )
        ]
        ok = [i for i, d in enumerate(items) if d.error is None]
        payload = {}
        if ok:
            pixels = np.concatenate([c.to_numpy() for c in table.column("pixels").chunks])[ok]
            batch = collate(self.spec, torch.from_numpy(pixels), items, ok, [items[i].grid for i in ok])
            arrays, ok = finite(batch, launch(self.encoder, self.task, batch, self.batch_size)())
            payload = self.task.host(arrays) if ok else {}
        rows = pa.Table.from_batches([image_rows(self.schema, items, ok, payload)])
        meta = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows.num_rows, np.int32)), self.meta)
        return rows.append_column(META, meta)


def _message(error: BaseException) -> str:
    """One line for an error raised on Ray: ours as we worded it, anything else by its last line."""
    from .errors import SiglipError

    cause = error
    while cause is not None:
        if isinstance(cause, SiglipError):
            return str(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(error)
    ours = re.findall(r"siglip_cli\.errors\.\w+: (.+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return ours[-1] if ours else f"on Ray: {lines[-1] if lines else type(error).__name__}"


class RayRun:
    """The run's batches on Ray Data: decode tasks and an encoder actor pool; the driver keeps the lock, the
    pending set and the writes (pipeline.LocalRun's counterpart)."""

    here = False  # the model runs on the actors

    def prepare(self, cfg: RunConfig) -> RunConfig:
        if cfg.model.quantize == "auto":  # the actors' CPUs are not known here
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="none"))
        return prepare(cfg)

    def process(self, cfg: RunConfig, store, records, progress) -> None:
        process(cfg, store, records, progress)


def process(cfg: RunConfig, store, records, progress) -> None:
    """Decode and encode the records on Ray; write their rows here (the store's parts, or JSON Lines)."""
    import torch

    from .checkpoint import load_spec
    from .devices import default_batch_size, resolve_backend
    from .index import METADATA_KEY
    from .sink import JsonLinesSink, PartSink

    tables = list(_tables(records))
    if not tables:
        return
    ray = connect(cfg.ray)
    spec = dataclasses.replace(load_spec(cfg.model), max_pixels=cfg.max_pixels, exact=cfg.exact)
    device = torch.device(cfg.model.device)
    resolve_backend(cfg.model, device, spec.naflex)  # a combination the actors would refuse fails here, in one line
    batch_size = cfg.batch_size or default_batch_size(device)
    ds = ray.data.from_arrow(blocks(tables, int(ray.cluster_resources().get("CPU", 1))))
    del tables
    ds = ds.map_batches(
        decode_block,
        fn_kwargs={"spec": spec, "timeout": cfg.timeout},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=1,
    )
    # An encoder actor asks for less than a whole CPU: Ray then keeps decoding and encoding apart (it would fuse
    # two stages with the same resources into one actor) and leaves the decode tasks every core. A CPU actor's
    # torch uses all the node's cores anyway.
    ds = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"cfg": cfg, "signature": store.signature if store else None, "batch_size": batch_size},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.ray_actors),
        num_gpus=1 if device.type == "cuda" else 0,
        num_cpus=0.5,
    )
    sink, schema = None, None
    progress.begin()
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if schema is None:
                meta = json.loads(table.column(META)[0].as_py())
                fields = [f for f in table.schema if f.name != META]
                schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
                sink = JsonLinesSink() if store is None else PartSink(store, schema)
            table = table.drop_columns([META]).cast(schema)
            for batch in table.to_batches():
                sink.write(batch)
            good = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
            progress.advance(good, table.num_rows - good, store.skipped if store else 0)
    except ray.exceptions.RayError as e:
        raise RunError(_message(e)) from None
    finally:
        if sink is not None:
            sink.close()
