"""`siglip search` and `siglip dedup` over an index's vectors (see vectors.py): exact, blocked, bounded memory."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import numpy as np

from .errors import RunError, UsageError
from .heads import linked, probability
from .remote import Remote
from .report import Results
from .vectors import Vectors, as_tensor, top_k
from .weights import recorded_patches

# dedup's two starting points (cosine): copies that were resized or recompressed, and shots of one scene
NEAR_IDENTICAL = 0.99
SIMILAR = 0.92


@dataclass(frozen=True)
class Query:
    texts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    minus: tuple[str, ...] = ()  # texts to move away from
    minus_images: tuple[str, ...] = ()
    image_weight: float = 1.0
    k: int = 10
    min_score: float | None = None
    paths: tuple[str, ...] = ()  # globs: only rows whose path matches one
    model: str | None = None  # override the index's model
    device: str = "auto"
    server: str | None = None  # a running `siglip serve` of the index's model embeds the queries
    text_rules: str = "canonical"  # what a text becomes before the tokenizer (text.py)


def _weights(v: Vectors, q: Query) -> str | None:
    """The index's model's weights as its signature records them (a Hub commit, or "local:" and a local folder's
    content fingerprint), or None where --model overrides it or the index predates them."""
    return None if q.model else (v.meta.get("signature") or {}).get("weights")


def _encoder(v: Vectors, q: Query):
    from .config import ModelConfig
    from .model import Encoder

    meta = v.meta
    name = q.model or meta.get("model")
    revision = None if q.model else (meta.get("commit") or meta.get("revision"))
    dtype = meta.get("dtype", "float32") if meta.get("dtype") in ("float32", "bfloat16", "float16") else "auto"
    weights = _weights(v, q)
    if weights and weights.startswith("local:") and name and os.path.isdir(name):
        from .weights import local_fingerprint

        if (here := local_fingerprint(name)) != weights:  # another checkpoint by that name (./ckpt from elsewhere)
            raise RunError(
                f"the index was made with {name!r} (weights {weights}); here that is "
                f"{os.path.realpath(name)}, other weights ({here}): give --model the index's checkpoint"
            )
    # torch: converting a tower for OpenVINO costs more than one query saves (so400m's text tower: 16-20 s and
    # 7.6 GB once, on a slow CPU); `tag` and `classify` on a CPU convert it, and then _cached_text reads it
    try:
        # an image query is embedded as the index's images were: with its --max-patches (None: the default)
        patches = (meta.get("signature") or {}).get("max_patches")
        encoder = Encoder.load(
            ModelConfig(name, revision, q.device, dtype, patches, backend="torch", text_rules=q.text_rules)
        )
    except RunError as e:
        raise RunError(f"the index was made with {name!r}, which cannot be loaded here ({e}); give --model") from None
    if encoder.info.dim != v.matrix.shape[1]:
        raise RunError(f"{name!r} makes vectors of {encoder.info.dim} dimensions; the index holds {v.matrix.shape[1]}")
    return encoder


def _cached_text(v: Vectors, q: Query):
    """The index's model's text tower as the OpenVINO cache keeps it (ovtext), on the CPU, or None where it is
    not cached (a `tag` or `classify` on a CPU with the openvino extra converts it) or cannot be: no
    torch, no transformers, no model load."""
    from .encoders import ovtext

    meta = v.meta
    name, commit, weights = q.model or meta.get("model"), None if q.model else meta.get("commit"), _weights(v, q)
    local = weights if weights and weights.startswith("local:") else None  # found by content, wherever it is now
    if (
        q.device not in ("auto", "cpu")
        or not name
        or not (commit or local or os.path.isdir(name))
        or not ovtext.available()
    ):
        return None
    from .config import usable_cpus
    from .weights import fingerprint

    precision = ovtext.precision(meta.get("dtype", "float32"))
    folder = ovtext.place(local or fingerprint(name, commit), int(meta.get("text_length") or 64))
    if not ovtext.cached(folder):
        return None
    try:
        return ovtext.TextTower(folder, precision, usable_cpus())
    except Exception:  # a cached tower OpenVINO cannot compile here: the model, with torch
        return None


def _stored(v: Vectors, path: str) -> np.ndarray | None:
    from .sources import canonical

    at = v.rows.find(canonical(path))
    return np.asarray(v.matrix[at], np.float32) if at >= 0 else None


def query_vector(v: Vectors, q: Query, encoder_factory=None, remote: Remote | None = None) -> tuple[np.ndarray, bool]:
    """The unit query vector, and whether its score is SigLIP's probability (one text query alone)."""
    encoder = None

    def model():
        nonlocal encoder
        if encoder is None:
            encoder = (encoder_factory or _encoder)(v, q)
        return encoder

    if q.server and remote is None:
        remote = Remote(q.server, q.text_rules)
    if remote:  # a server's embeddings (or, in the server, its own: see serve's /search)
        remote.expect(
            q.model or v.meta.get("model"),
            v.matrix.shape[1],
            None if q.model else v.meta.get("commit"),
            _weights(v, q),
            recorded_patches(v.meta),
        )

    cached = False  # not looked for yet

    def texts(items):
        nonlocal cached
        if not items:
            return np.zeros((0, v.matrix.shape[1]), np.float32)
        if remote:
            return remote.texts(tuple(items))
        if cached is False:
            cached = _cached_text(v, q) if encoder_factory is None else None
        if cached is not None:
            from .text import prepare

            out = cached(prepare(items, q.text_rules))
            if out.shape[1] != v.matrix.shape[1]:  # --model's cached tower, of another size
                raise RunError(
                    f"{q.model!r} makes vectors of {out.shape[1]} dimensions; the index holds {v.matrix.shape[1]}"
                )
            return out
        return model().encode_texts(list(items)).cpu().numpy()

    def images(paths):
        out = []
        for p in paths:
            stored = _stored(v, p)
            if stored is None and remote:
                stored = remote.image(p)
            elif stored is None:  # not in the index: embedded now, as embed would
                from .decode import decode
                from .encode import embed_decoded
                from .sources import FileRecord

                if not os.path.isfile(p):
                    raise UsageError(f"--image {p}: no such file")
                d = decode(FileRecord(os.path.abspath(p)), model().spec)
                if d.error:
                    raise RunError(f"--image {p}: {d.error}")
                stored = embed_decoded(model(), [d], 1)[0]
            out.append(stored / np.linalg.norm(stored))
        return np.array(out, np.float32).reshape(-1, v.matrix.shape[1])

    plus = np.concatenate([texts(q.texts), q.image_weight * images(q.images)])
    minus = np.concatenate([texts(q.minus), q.image_weight * images(q.minus_images)])
    if not len(plus):
        raise UsageError("give a text query, or --image PATH")
    vec = plus.sum(axis=0) - minus.sum(axis=0)
    norm = np.linalg.norm(vec)
    if norm == 0:
        raise RunError("the query's parts cancel out")
    return (vec / norm).astype(np.float32), len(q.texts) == 1 and not (q.images or q.minus or q.minus_images)


def search(v: Vectors, q: Query, encoder_factory=None, remote: Remote | None = None) -> Results:
    """The k best rows: rank, score, path, width, height, size."""
    vec, as_probability = query_vector(v, q, encoder_factory, remote)
    keep = None
    if q.paths:
        paths = v.rows.paths()
        keep = np.array([any(fnmatch.fnmatchcase(p, g) for g in q.paths) for p in paths], bool)
    idx, cos = top_k(v.matrix, vec, q.k, keep, fast=v.fast)
    if as_probability:
        scores = probability(cos, np.float32(v.meta["logit_scale"]), np.float32(v.meta["logit_bias"]))
    else:
        scores = cos
    if q.min_score is not None:
        passed = scores.astype(np.float64) >= q.min_score  # float64: a score like -1e300 does not overflow
        idx, scores = idx[passed], scores[passed]
    rows = [
        {"rank": rank, "score": float(score), **v.rows.record(i)}
        for rank, (i, score) in enumerate(zip(idx.tolist(), scores.astype(np.float32)), start=1)
    ]
    return Results(
        ["rank", "score", "path", "width", "height", "size", "path_bytes"],
        rows,
        "sigmoid probability" if as_probability else "cosine",
    )


# dedup's first pass compares rows in the LOW dimensions that carry most of their length (a basis from a sample of
# the rows); what the other dimensions can add is bounded by the product of the rows' lengths outside it.
LOW = 128


def _basis(matrix: np.ndarray, device, sample: int = 262144):
    """(d, LOW) orthonormal float32 columns: the top eigenvectors of the rows' second moment (over up to `sample`
    rows spread over the matrix, 16,384 at a time). Any orthonormal basis keeps the first pass exact; a good one
    keeps it short (on random rows, a moment of half the rows made --similar twice as slow as one of all)."""
    import torch

    d = matrix.shape[1]
    step = max(1, -(-len(matrix) // sample))
    moment = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, len(matrix), 16384 * step):
        rows = as_tensor(matrix[start : start + 16384 * step : step]).to(device).float()
        moment += (rows.T @ rows).double()
    _, vectors = torch.linalg.eigh(moment.cpu())  # ascending eigenvalues
    return vectors[:, -LOW:].float().contiguous().to(device)


TIE = 1e-6  # float32 rounding of a cosine: two identical vectors score 0.99999994 as often as 1


def pairs(matrix: np.ndarray, threshold: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with cosine >= threshold: (i, j, cosine). Upper triangle only, in blocks, float32 results.

    A first pass compares each pair's projections p onto LOW basis vectors (where the rows are wide enough for it
    to pay): x.y = p_x.p_y + r_x.r_y with r the parts outside, and |r_x.r_y| <= |r_x||r_y|. A pair passes when
    p_x.p_y + |r_x||r_y| reaches the threshold less a margin for rounding (and for bfloat16, where the CPU does
    it natively or on a GPU); every pair that passes is rechecked in float32. Where over 1% of a block's pairs
    pass (rows much alike), the block is compared in full instead, so it never costs much more than a plain
    float32 all-pairs. Memory: the rows' projections (n x LOW) and a block of each."""
    import torch

    from .devices import cpu_bf16_native

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    fast = torch.bfloat16 if device.type == "cuda" or cpu_bf16_native() else torch.float32
    margin = 0.02 if fast != torch.float32 else 1e-3
    n, d = matrix.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    basis = _basis(matrix, device) if d >= 4 * LOW and n > 2 * block else None
    P, R, N = [], [], []  # every row's first-pass form, its length outside the basis (rounded up), its length
    for start in range(0, n, 16384):
        rows = as_tensor(matrix[start : start + 16384]).to(device).float()
        N.append(rows.norm(dim=1))
        if basis is None:
            P.append(rows.to(fast))
            R.append(torch.zeros(len(rows), device=device))
            continue
        p = rows @ basis
        rest = (rows.double() ** 2).sum(dim=1) - (p.double() ** 2).sum(dim=1)  # float64: no cancellation error
        P.append(p.to(fast))
        R.append(torch.sqrt(rest.clamp(min=0) + 1e-4).float())  # + 1e-4: the float32 projection's own error
    P, R, N = torch.cat(P), torch.cat(R).to(fast), torch.cat(N)
    # Every block's products land in the same few buffers: fresh multi-megabyte tensors of changing shapes
    # fragment the C heap (a 100,000-row --similar run grew to 12 GB that way).
    Sbuf, mask = (
        torch.empty(block, block, dtype=fast, device=device),
        torch.empty(block, block, dtype=torch.bool, device=device),
    )
    rows_ab = torch.empty(2, block, d, device=device)

    def full(k: int, lo: int):
        out = rows_ab[k, : min(block, n - lo)]
        out.copy_(as_tensor(matrix[lo : lo + block]))
        return out

    out_i, out_j, out_s = [], [], []
    for a in range(0, n, block):
        A = None
        for b in range(a, n, block):
            low_a, low_b = P[a : a + block], P[b : b + block]
            S = torch.matmul(low_a, low_b.T, out=Sbuf[: len(low_a), : len(low_b)])
            S.addr_(R[a : a + block], R[b : b + block])  # p_x.p_y + |r_x||r_y|: at least x.y
            hit = torch.ge(S, threshold - margin, out=mask[: len(low_a), : len(low_b)]).nonzero()
            if b == a:
                hit = hit[hit[:, 0] < hit[:, 1]]
            if not len(hit):
                continue
            A = full(0, a) if A is None else A
            B = A if b == a else full(1, b)
            if len(hit) > S.numel() // 100:  # rows much alike: one float32 product beats gathering the pairs
                S = A @ B.T
                hit = (S >= (threshold - TIE) * torch.outer(N[a : a + len(A)], N[b : b + len(B)])).nonzero()
                hit = hit[hit[:, 0] < hit[:, 1]] if b == a else hit
                exact = S[hit[:, 0], hit[:, 1]]
            else:  # the recheck, in float32, a bounded number of pairs at a time
                exact = torch.cat([(A[h[:, 0]] * B[h[:, 1]]).sum(dim=1) for h in hit.split(4096)])
            # the cosine: stored vectors are unit length only to their rounding (float16: |x|^2 from 0.99992 to
            # 1.00008), and an identical copy must reach --threshold 1 (it scored 0.99992)
            exact = exact / (N[hit[:, 0] + a] * N[hit[:, 1] + b])
            ok = exact >= threshold - TIE
            out_i.append((hit[ok, 0] + a).cpu().numpy())
            out_j.append((hit[ok, 1] + b).cpu().numpy())
            out_s.append(exact[ok].cpu().numpy())
    cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
    return cat(out_i, np.int64), cat(out_j, np.int64), cat(out_s, np.float32)


def dedup(v: Vectors, threshold: float) -> Results:
    """Groups of near-duplicates: one row per member (group, path, score to the group's representative, size,
    resolution, whether it is the representative: the member with the most pixels, then the largest file)."""
    i, j, _ = pairs(v.matrix, threshold)
    return group_results(v, linked(zip(i.tolist(), j.tolist())))


def group_results(v: Vectors, groups: list[list[int]]) -> Results:
    """Groups of rows (row numbers, in order) as dedup's table: one row per member, the representative first."""
    rows = {x: v.rows.record(x) for group in groups for x in group}
    out = []
    for g, group in enumerate(sorted(groups, key=lambda m: rows[m[0]]["path"]), start=1):
        rep = max(group, key=lambda x: ((rows[x]["width"] or 0) * (rows[x]["height"] or 0), rows[x]["size"] or 0, -x))
        r = np.asarray(v.matrix[rep], np.float32)
        r = r / np.linalg.norm(r)
        for x in sorted(group, key=lambda x: (x != rep, rows[x]["path"])):
            u = np.asarray(v.matrix[x], np.float32)
            score = float(np.float32(np.dot(u / np.linalg.norm(u), r)))  # a cosine, as pairs finds them
            out.append({"group": g, "representative": x == rep, "score": score, **rows[x]})
    return Results(["group", "representative", "score", "path", "width", "height", "size", "path_bytes"], out, "cosine")
