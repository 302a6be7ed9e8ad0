"""`siglip search --server`: queries embedded by a running `siglip serve`. Standard library only at import:
the CLI sends a search's texts before it imports numpy and opens the index."""

from __future__ import annotations

import os

from .errors import RunError

# A server answers a query in seconds (so400m on a slow CPU: a text 0.4 s, a photo 2 s); a listener that never
# answers is said to be one within a minute, not after five
ANSWER_S = 60.0
SEARCH_S = 300.0


def same_model(a: tuple, b: tuple) -> bool:
    """Whether two (name, dim, commit, weights) are one model. weights is what an index records in its signature
    (the Hub commit, or a local folder's content fingerprint "local:...") and a server reports; where both know
    it, it decides (with the dimension): a folder named ./ckpt here may be another checkpoint than ./ckpt there.
    Otherwise: the same name, or the same local folder named another way (./ckpt, /abs/ckpt), the same
    dimension, and the same commit where both know it."""
    (name, dim, commit, weights), (other, other_dim, other_commit, other_weights) = a, b
    if dim != other_dim:
        return False
    if weights and other_weights:
        return weights == other_weights
    same = name == other or (
        bool(name)
        and bool(other)
        and os.path.isdir(name)
        and os.path.isdir(other)
        and os.path.realpath(name) == os.path.realpath(other)
    )
    return same and not (commit and other_commit and commit != other_commit)


def describe(model: tuple) -> str:
    name, dim, commit, weights = model
    return f"{name!r} (dim {dim}, " + (f"commit {commit})" if commit else f"weights {weights})")


def index_model(meta: dict, dim: int) -> tuple:
    """An index's model as same_model takes it, from the index's metadata."""
    return meta.get("model"), dim, meta.get("commit"), (meta.get("signature") or {}).get("weights")


def parse_url(url: str):
    """A --server URL's parts (urllib's SplitResult); a RunError in one line for anything else."""
    import urllib.parse

    if not url.startswith(("http://", "https://")):
        raise RunError(f"--server {url}: give the service's URL, like http://192.168.1.20:8002")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError as e:
        raise RunError(f"--server {url}: not a URL ({e})") from None
    if not parts.hostname:
        raise RunError(f"--server {url}: no host in it")
    if parts.username or parts.password:
        raise RunError("--server: put the token in SIGLIP_API_KEY, not in the URL")
    return parts


def bearer() -> str | None:
    """The Authorization header's value for $SIGLIP_API_KEY (its UTF-8 bytes, as the server compares them), or
    None without one. A key that a header cannot carry is one line that does not show it."""
    key = os.environ.get("SIGLIP_API_KEY", "").strip()
    if not key:
        return None
    if any(c in key for c in "\r\n\0"):
        raise RunError("SIGLIP_API_KEY holds a line break or a NUL: an HTTP header cannot carry it")
    return "Bearer " + key.encode("utf-8").decode("latin-1")


def shown(url: str) -> str:
    """A URL as an output records it: scheme, host, port and path, never a query or credentials."""
    parts = parse_url(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"


def check_transport(url: str, insecure: bool = False) -> None:
    """Refuse plain http:// to a host that is not on this machine or a private network (the token and the
    photos' pixels would cross the internet in the clear), unless `insecure`."""
    import ipaddress
    import socket

    parts = parse_url(url)
    if parts.scheme != "http" or insecure:
        return
    shared = ipaddress.ip_network("100.64.0.0/10")
    host = (parts.hostname or "").strip("[]")
    if host == "localhost" or host.endswith((".local", ".lan", ".internal", ".home.arpa")):
        return
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return  # cannot be resolved: connecting says so
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not (ip.is_loopback or ip.is_private or ip.is_link_local or ip in shared):  # shared: Tailscale, CGNAT
            raise RunError(
                f"--server {url}: plain http to {host}, which is not on this machine or a private network; "
                "use https:// (see docs/serve.md on TLS), or --insecure to send it in the clear anyway"
            )


class Remote:
    """Queries embedded by a running `siglip serve` (its /txt/embed and /img/embed routes): a search then needs
    no torch and no model load, only the scan. The server must run the index's model (name, dim, and commit
    where both know it): a vector from another model would rank the index by noise. Text queries are sent
    (`ask`) before the index's vectors are opened, so that the server embeds them meanwhile."""

    def __init__(self, url: str, text_rules: str = "canonical", insecure: bool = False):
        check_transport(url, insecure)
        self.url, self.asked, self.text_rules = url.rstrip("/"), {}, text_rules
        self.model = (None, None, None, None)  # what the index needs (expect): see same_model
        self.patches = None  # the index's --max-patches (None: the checkpoint's default), for image queries

    def expect(
        self, name: str, dim: int, commit: str | None, weights: str | None = None, patches: int | None = None
    ) -> None:
        self.model, self.patches = (name, dim, commit, weights), patches

    def _request(self, route: str, items: list | dict) -> dict:
        import json
        import urllib.error
        import urllib.request

        try:
            body = items if isinstance(items, dict) else {"input": items}
            req = urllib.request.Request(
                self.url + route, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            if key := bearer():  # never sent on to where a redirect points
                req.add_unredirected_header("Authorization", key)
            # /search may first rebuild the index's sidecar (a minute for 10M rows): it is given longer
            wait = SEARCH_S if route == "/search" else ANSWER_S
            with urllib.request.urlopen(req, timeout=wait) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            error = RunError(f"--server {self.url}{route}: HTTP {e.code}: {error_message(e.read(4096))}")
            error.status = e.code
            raise error from None
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise RunError(f"--server {self.url}{route}: no answer within {wait:.0f} s") from None
            raise RunError(f"--server {self.url}: {reason}") from None

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
        theirs = (body.get("model"), body.get("dim"), body.get("commit"), body.get("weights"))
        if not same_model(theirs, self.model):
            raise RunError(f"--server {self.url} runs {describe(theirs)}; the index needs {describe(self.model)}")
        if body.get("text_rules", self.text_rules) != self.text_rules:  # (an older server does not say)
            raise RunError(
                f"--server {self.url} cleans texts by --text-rules {body['text_rules']}; this search asks "
                f"for {self.text_rules} (start the server with that, or pass --text-rules {body['text_rules']})"
            )
        import numpy as np

        return np.asarray(body["embeddings"], np.float32).reshape(-1, self.model[1])

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
        body = self._request("/img/embed", [data])
        vector = self._vectors(body)[0]  # the model first: another model is told as such
        # an image is embedded as the index's were: with its --max-patches (an older server does not say)
        if "max_patches" in body and body["max_patches"] != self.patches:
            theirs, ours = ("the default" if n is None else n for n in (body["max_patches"], self.patches))
            raise RunError(
                f"--server {self.url} embeds images with --max-patches {theirs}; the index's were "
                f"embedded with {ours} (start the server with that, or search without --server)"
            )
        return vector

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
        import base64

        for row in body["rows"]:
            if row.get("path_bytes") is not None:
                row["path_bytes"] = base64.b64decode(row["path_bytes"])
        return Results(body["columns"], body["rows"], body["score"])


def error_message(body: bytes) -> str:
    """One line from an error's body: a siglip server's message, or the start of whatever else answered."""
    import json
    import re

    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return str(data["error"]["message"])[:300]
    if isinstance(data, dict) and "detail" in data:  # FastAPI's own answers (an unknown route, say)
        return str(data["detail"])[:300]
    text = " ".join(re.sub(r"<[^>]*>", " ", body.decode(errors="replace")).split())
    return (text[:200] or "(no message)") + " (is this a siglip serve?)"


def early(
    url: str | None, *texts: tuple[str, ...], text_rules: str = "canonical", insecure: bool = False
) -> Remote | None:
    """A Remote for url with these texts already sent (embedded meanwhile), or None without a url."""
    if not url:
        return None
    remote = Remote(url, text_rules, insecure)
    for t in texts:
        remote.ask(t)
    return remote
