"""What `siglip serve` and `search --server` decide before any work, as functions: the Host names answered, the
depth of a JSON body, whether an index and a server hold one model (siglip_cli/serve/protocol.py, remote.py)."""

from __future__ import annotations

from siglip_cli.remote import index_model, same_model
from siglip_cli.serve.protocol import LOOPBACK, MAX_JSON_DEPTH, ServeConfig, allowed_hosts, depth, host_of


# -- Host names (DNS rebinding) ---------------------------------------------------------------------------
def test_a_host_header_is_its_name_without_the_port():
    assert host_of("LOCALHOST:8002") == "localhost"
    assert host_of(" 127.0.0.1:80 ") == "127.0.0.1"
    assert host_of("photos.lan") == "photos.lan"
    assert host_of("[::1]:8002") == "[::1]" and host_of("[::1]") == "[::1]"
    assert host_of("::1") == "::1"  # a bare IPv6 address: its colons are not a port


def test_loopback_and_the_listening_address_are_answered_and_a_rebound_name_is_not():
    default = allowed_hosts(ServeConfig())
    assert set(LOOPBACK) <= default
    assert host_of("evil.example:8002") not in default  # a page whose name now points at 127.0.0.1
    lan = allowed_hosts(ServeConfig(host="192.168.1.5"))
    assert "192.168.1.5" in lan and set(LOOPBACK) <= lan
    six = allowed_hosts(ServeConfig(host="[fe80::1]"))
    assert {"fe80::1", "[fe80::1]"} <= six and host_of("[FE80::1]:8002") in six
    for everywhere in ("0.0.0.0", "::"):  # a wildcard is where it listens, never a name a request carries
        assert allowed_hosts(ServeConfig(host=everywhere)) == frozenset(LOOPBACK)


def test_allow_host_adds_names_compared_without_case():
    hosts = allowed_hosts(ServeConfig(host="0.0.0.0", allow_hosts=("Photos.LAN", "nas")))
    assert host_of("photos.lan:8002") in hosts and host_of("NAS") in hosts
    assert host_of("other.lan") not in hosts


# -- JSON depth -------------------------------------------------------------------------------------------
def test_depth_counts_nesting_and_stops_past_the_limit():
    assert depth(1) == 1 and depth([]) == 1 and depth({}) == 1
    assert depth({"input": ["a", "b"]}) == 3
    assert depth([[[]], [1, [2, [3]]]]) == 5  # the deepest branch: the 3, inside four lists
    deep = []
    for _ in range(100_000):  # far past Python's recursion limit: counted without recursion
        deep = [deep]
    assert depth(deep) == MAX_JSON_DEPTH + 1
    assert depth(deep, limit=5) == 6


# -- one model --------------------------------------------------------------------------------------------
def test_weights_decide_where_both_sides_know_them():
    assert not same_model(("ck", 32, None, "local:a"), ("ck", 32, None, "local:b"))  # saved over, same name
    assert same_model(("/x/ck", 32, None, "local:a"), ("ck", 32, None, "local:a"))  # moved, same weights
    assert not same_model(("ck", 32, None, "local:a"), ("ck", 16, None, "local:a"))  # never another dimension


def test_names_and_commits_decide_where_one_side_does_not_know_the_weights(tmp_path, monkeypatch):
    hub = "google/siglip2-base-patch16-224"
    assert same_model((hub, 768, None, None), (hub, 768, None, "abc"))
    assert same_model((hub, 768, "c1", None), (hub, 768, None, None))  # one commit unknown
    assert not same_model((hub, 768, "c1", None), (hub, 768, "c2", None))
    assert not same_model((hub, 768, None, None), ("google/siglip2-large-patch16-256", 768, None, None))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert same_model(("ckpt", 32, None, None), (str(folder), 32, None, None))  # one folder named two ways
    (tmp_path / "other").mkdir()
    assert not same_model(("other", 32, None, None), (str(folder), 32, None, None))


def test_an_index_s_model_is_read_from_its_metadata():
    meta = {"model": "ckpt", "commit": None, "signature": {"weights": "local:ab12"}}
    assert index_model(meta, 32) == ("ckpt", 32, None, "local:ab12")
    assert index_model({"model": "m"}, 8) == ("m", 8, None, None)  # written before weights were recorded
