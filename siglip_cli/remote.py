"""`siglip search --server`: queries embedded by a running `siglip serve`. Standard library only at import:
the CLI sends a search's texts before it imports numpy and opens the index."""

from __future__ import annotations

import os

from .errors import RunError


def same_model(a: tuple, b: tuple) -> bool:
    """Whether two (name, dim, commit) are one model: the same name, or the same local folder named another way
    (./ckpt here, /abs/ckpt there), the same dimension, and the same commit where both know it."""
    (name, dim, commit), (other, other_dim, other_commit) = a, b
    same = name == other or (bool(name) and bool(other) and os.path.isdir(name) and os.path.isdir(other)
                             and os.path.realpath(name) == os.path.realpath(other))
    return same and dim == other_dim and not (commit and other_commit and commit != other_commit)


class Remote:
    """Queries embedded by a running `siglip serve` (its /txt/embed and /img/embed routes): a search then needs
    no torch and no model load, only the scan. The server must run the index's model (name, dim, and commit
    where both know it): a vector from another model would rank the index by noise. Text queries are sent
    (`ask`) before the index's vectors are opened, so that the server embeds them meanwhile."""

    def __init__(self, url: str):
        if not url.startswith(("http://", "https://")):
            raise RunError(f"--server {url}: give the service's URL, like http://127.0.0.1:8002")
        self.url, self.asked = url.rstrip("/"), {}
        self.name = self.dim = self.commit = None  # what the index needs (expect)

    def expect(self, name: str, dim: int, commit: str | None) -> None:
        self.name, self.dim, self.commit = name, dim, commit

    def _request(self, route: str, items: list | dict) -> dict:
        import json
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if key := os.environ.get("SIGLIP_API_KEY"):
            headers["Authorization"] = f"Bearer {key}"
        try:
            body = items if isinstance(items, dict) else {"input": items}
            req = urllib.request.Request(self.url + route, json.dumps(body).encode(), headers)
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            error = RunError(f"--server {self.url}{route}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}")
            error.status = e.code
            raise error from None
        except (OSError, ValueError) as e:
            raise RunError(f"--server {self.url}: {getattr(e, 'reason', e)}") from None

    def ask(self, texts: tuple[str, ...]) -> None:
        """Send texts to be embedded now, in a thread; texts() of the same texts takes the answer."""
        import threading

        if not texts or texts in self.asked:
            return
        answer: list = []

        def run():
            try:
                answer.append(self._request("/txt/embed", list(texts)))
            except BaseException as e:  # raised again where the answer is taken
                answer.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.asked[texts] = (thread, answer)

    def _vectors(self, body: dict):
        theirs = (body.get("model"), body.get("dim"), body.get("commit"))
        if not same_model(theirs, (self.name, self.dim, self.commit)):
            raise RunError(f"--server {self.url} runs {theirs[0]!r} (dim {theirs[1]}, commit {theirs[2]}); the index "
                           f"needs {self.name!r} (dim {self.dim}, commit {self.commit})")
        import numpy as np

        return np.asarray(body["embeddings"], np.float32).reshape(-1, self.dim)

    def texts(self, items: tuple[str, ...]):
        self.ask(items)
        thread, answer = self.asked.pop(items)
        thread.join()
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return self._vectors(answer[0])

    def image(self, path: str):
        import base64

        try:
            with open(path, "rb") as f:
                data = base64.b64encode(f.read()).decode()
        except OSError as e:
            raise RunError(f"--image {path}: {e.strerror or e}") from None
        return self._vectors(self._request("/img/embed", [data]))[0]

    def search(self, index: str, query: dict):
        """The results of a search the server runs over its own `--index` (sidecar warm, model loaded: the whole
        query in the time of its text embedding and one scan), or None where it serves another index or none."""
        from .index.layouts import state
        from .report import Results

        try:
            here = state(index)
        except OSError:
            return None  # the local search says what is wrong
        try:
            body = self._request("/search", {"index": os.path.realpath(index), "state": here, **query})
        except RunError as e:
            if getattr(e, "status", None) in (404, 405, 501):  # another index, or a server without /search
                return None
            raise
        return Results(body["columns"], body["rows"], body["score"])


def early(url: str | None, *texts: tuple[str, ...]) -> Remote | None:
    """A Remote for url with these texts already sent, or None without a url."""
    if not url:
        return None
    remote = Remote(url)
    for t in texts:
        remote.ask(t)
    return remote
