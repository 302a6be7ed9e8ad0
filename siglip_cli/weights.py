"""What identifies a checkpoint's weights without loading them (no torch): the Hub commit a revision points at,
or a local folder's content; the key of every cache of derived data (text embeddings, converted towers)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

from .errors import RunError, first_line


def missing_folder(name: str) -> str | None:
    """The one-line error for a --model that names a local folder (a path, not a Hub id) that is not there."""
    if os.path.isdir(name):
        return None
    path_like = (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or name.endswith(("/", "\\"))
        or "\\" in name
    )
    if not path_like:
        return None
    what = "is a file, not a folder saved with save_pretrained" if os.path.exists(name) else "does not exist"
    return f"--model {name}: that folder {what}"


def resolve_weights(name: str, revision: str | None) -> str:
    """What decides the weights, known without loading them: the Hub commit that `revision` (default: main)
    points at, or a local folder's fingerprint (see local_fingerprint).

    For a Hub id this fetches config.json (a few KB) the way loading does, so that a repo updated since the
    last run is noticed: online, the ref is checked with the Hub; offline, the cached ref is used.
    """
    if os.path.isdir(name):
        return local_fingerprint(name)
    if (error := missing_folder(name)) is not None:
        raise RunError(error)
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(name, "config.json", revision=revision)
    except Exception as e:  # offline and not cached, no such repo or revision, no network, a bad id
        first = first_line(e)
        raise RunError(
            f"cannot load model {name!r}: {first} "
            "(give a Hub id such as google/siglip2-so400m-patch14-384, or a folder saved with save_pretrained)"
        ) from None
    return os.path.basename(os.path.dirname(config))  # .../snapshots/<commit>/config.json


# The files of a local checkpoint that decide its numbers: weights, configs, tokenizer (not a README).
CHECKPOINT_FILES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")


def local_fingerprint(folder: str) -> str:
    """A local checkpoint's identity: the sha256 of the files that decide its numbers, whatever the folder's
    path or the files' times (a copy without -p is the same checkpoint). Each file's hash is remembered by
    path, size and mtime, so a nightly run reads nothing."""
    from .index.files import file_hash, write_json
    from .vocab import cache_dir

    memo_path = os.path.join(cache_dir(), "fingerprints.json")
    try:
        with open(memo_path) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    files, changed = [], False
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if e.name.startswith(".") or not e.name.endswith(CHECKPOINT_FILES) or not e.is_file():
            continue
        st = e.stat()
        key = f"{os.path.realpath(e.path)}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key], changed = file_hash(e.path), True
        files.append((e.name, memo[key]))
    if changed:
        write_json(memo_path, memo)
    return "local:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def cached_commit(name: str, revision: str | None) -> str | None:
    """The Hub commit whose files the cache holds for `revision` (None for a local folder, or when not cached)."""
    if os.path.isdir(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a repo id
        return None
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None


def fingerprint(name: str, commit: str | None) -> str:
    """Identifies the exact weights (for caches of derived data): the Hub commit, or a local folder's content."""
    if commit:
        return f"{name}@{commit}"
    if os.path.isdir(name):
        return local_fingerprint(name)
    return name


@functools.lru_cache(maxsize=32)
def checkpoint_json(name: str, revision: str | None, filename: str) -> dict:
    """One of a checkpoint's JSON config files (a local folder's, or the Hub's, cached as loading caches it);
    {} when it cannot be read. Remembered for the process: not to be changed."""
    try:
        if os.path.isdir(name):
            path = os.path.join(name, filename)
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, filename, revision=revision)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except Exception:  # absent, offline and not cached: the loader says what is wrong, with the model's name
        return {}


def patches_setting(name: str, revision: str | None, max_patches: int | None) -> tuple[int | None, str | None]:
    """--max-patches as an output records it: None for the checkpoint's own default (so that `--max-patches 256`
    on a checkpoint whose default is 256 is the same setting as leaving it out) and for a checkpoint of fixed
    resolution, where it means nothing (then also a note to say it is ignored)."""
    if max_patches is None:
        return None, None
    kind = checkpoint_json(name, revision, "config.json").get("model_type")
    if kind is None:  # its config cannot be read (here, now): the value stands, and loading says what is wrong
        return max_patches, None
    if kind != "siglip2":
        return None, f"--max-patches is for NaFlex checkpoints; {name} takes images of one fixed size, so it is ignored"
    default = checkpoint_json(name, revision, "preprocessor_config.json").get("max_num_patches", 256)
    return (None if max_patches == default else max_patches), None


def recorded_patches(meta: dict) -> int | None:
    """An index's --max-patches as this version records it (see patches_setting): an index written before
    recorded the checkpoint's default as a number, and a value a fixed-resolution checkpoint ignores."""
    given = (meta.get("signature") or {}).get("max_patches")
    return patches_setting(meta.get("model") or "", meta.get("commit") or meta.get("revision"), given)[0]


# The settings of a run's signature that the model decides: a `siglip serve` reports these for its model.
MODEL_KEYS = ("model", "weights", "dtype", "max_patches", "quantize", "int8_bound", "text_rules")


def model_signature(
    name: str, weights: str | None, dtype: str, max_patches: int | None, quantize: str, bound, text_rules: str | None
) -> dict:
    """The model's part of a run's signature (see pipeline.resolve); text_rules None where no text is encoded."""
    sig = {
        "model": "local folder" if os.path.isdir(name) else name,
        "weights": weights,
        "dtype": dtype,
        "max_patches": max_patches,
        "quantize": quantize,
    }
    if quantize == "int8":
        sig["int8_bound"] = list(bound)
    if text_rules is not None:
        sig["text_rules"] = text_rules
    return sig
