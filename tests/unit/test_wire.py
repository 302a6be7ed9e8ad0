"""The pixels a remote run sends (wire.py) and where it may send them (remote.check_transport)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from siglip_cli.decode import ImageSpec
from siglip_cli.errors import RunError
from siglip_cli.remote import check_transport
from siglip_cli.wire import WireError, describe, pack, spec_of, unpack

FIXED = ImageSpec(height=24, width=32)
NAFLEX = ImageSpec(naflex=True, patch_size=4, max_patches=12)


def images(spec: ImageSpec, grids):
    rng = np.random.default_rng(0)
    if spec.naflex:
        shape = (spec.max_patches, spec.patch_size**2 * 3)  # padded, as the loader gives them
    else:
        shape = (spec.height, spec.width, 3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in grids]


@pytest.mark.parametrize("encoding", ["raw", "webp"])
@pytest.mark.parametrize("spec", [FIXED, NAFLEX], ids=["fixed", "naflex"])
def test_pixels_arrive_exactly_as_they_were_sent(spec, encoding):
    grids = [(3, 4), (2, 2), (1, 5)] if spec.naflex else [(0, 0)] * 3
    sent = images(spec, grids)
    header, got = unpack(pack(spec, sent, grids, encoding, {"weights": "w"}), spec, 16)
    assert header["expect"] == {"weights": "w"}
    for pixels, grid, (back, back_grid) in zip(sent, grids, got):
        real = pixels[: grid[0] * grid[1]] if spec.naflex else pixels
        assert back_grid == tuple(grid) and np.array_equal(back, real)


def test_only_the_real_patches_of_a_naflex_image_are_sent():
    grids = [(1, 2)]
    body = pack(NAFLEX, images(NAFLEX, grids), grids, "raw", {})
    assert len(body.split(b"\n", 1)[1]) == 2 * NAFLEX.patch_size**2 * 3


def test_a_body_for_other_preprocessing_is_refused():
    body = pack(FIXED, images(FIXED, [(0, 0)]), [(0, 0)], "raw", {})
    with pytest.raises(WireError, match="fixed images of 48x32"):
        unpack(body, ImageSpec(height=48, width=32), 16)
    with pytest.raises(WireError, match="1 to 0 images"):
        unpack(body, FIXED, 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h.update(grids=[[4, 4]]), "item 0: a grid"),
        (lambda h: h.update(sizes=[5]), "sizes do not add up"),
        (lambda h: h.update(encoding="gzip"), "encoding must be"),
    ],
)
def test_a_lying_header_is_refused_naming_what_is_wrong(change, message):
    grids = [(3, 4)]
    body = pack(NAFLEX, images(NAFLEX, grids), grids, "raw", {})
    line, data = body.split(b"\n", 1)
    header = json.loads(line)
    change(header)
    with pytest.raises(WireError, match=message):
        unpack(json.dumps(header).encode() + b"\n" + data, NAFLEX, 16)


def test_a_server_described_spec_is_the_spec_it_has():
    for spec in (FIXED, NAFLEX):
        assert spec_of(json.loads(json.dumps(describe(spec)))) == spec


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8002",
        "http://localhost:1",
        "http://192.168.1.20:8002",
        "http://10.0.0.5",
        "http://[::1]:8002",
        "https://8.8.8.8",
        "http://nas.local:8002",
    ],
)
def test_http_to_this_machine_or_a_private_network_is_allowed(url):
    check_transport(url)


def test_plain_http_to_a_public_address_needs_insecure():
    with pytest.raises(RunError, match="--insecure"):
        check_transport("http://8.8.8.8:8002")
    check_transport("http://8.8.8.8:8002", insecure=True)


def test_http_over_tailscale_addresses_is_allowed():
    check_transport("http://100.101.102.103:8002")


@pytest.mark.parametrize("url", ["http://gpubox:80o2", "http://gpubox:99999", "http://[::1", "ftp://gpubox", "http://"])
def test_a_url_that_is_not_one_is_a_one_line_error(url):
    with pytest.raises(RunError, match="--server"):
        check_transport(url)


def test_the_token_is_read_as_the_server_compares_it_and_never_shown(monkeypatch):
    from siglip_cli.remote import bearer

    monkeypatch.setenv("SIGLIP_API_KEY", "s3cret\n")  # a secret mounted from a file ends in a newline
    assert bearer() == "Bearer s3cret"
    monkeypatch.setenv("SIGLIP_API_KEY", "clé")
    assert bearer().encode("latin-1") == "Bearer clé".encode()  # its UTF-8 bytes
    monkeypatch.setenv("SIGLIP_API_KEY", "s3c\nret")
    with pytest.raises(RunError) as e:
        bearer()
    assert "s3c" not in str(e.value)
    monkeypatch.delenv("SIGLIP_API_KEY")
    assert bearer() is None


def test_an_output_records_the_servers_address_without_its_query():
    from siglip_cli.remote import shown

    assert shown("http://gpubox.lan:8002/siglip/?token=abc") == "http://gpubox.lan:8002/siglip"
