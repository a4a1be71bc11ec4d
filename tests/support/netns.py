"""keepsrc.demo.netns for tests: the `netlab` fixture, which needs root and `ip` (skip on a laptop,
fail under KEEPSRC_STRICT=1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keepsrc.demo.netns import Lab, NetNs, sweep_leftovers, wait_for
from tests.support.strict import require_binary, require_root

__all__ = ["GATEWAY_ADDRESSES", "Lab", "NetNs", "gateway_scene", "netlab_fixture", "wait_for"]


@pytest.fixture(name="netlab")
def netlab_fixture() -> Iterator[Lab]:
    """Pytest fixture `netlab`: import `netlab_fixture` into a test module to use it."""
    require_root()
    require_binary("ip")
    sweep_leftovers()
    with Lab() as lab:
        yield lab


# A gateway placement: client -> Envoy's host (eth0 down, eth1 up) -> upstream host, whose
# default route points back through Envoy's host, as behind a gateway or middlebox.
GATEWAY_ADDRESSES = {
    # family: client, proxy (client side), proxy (upstream side), upstream, prefix length
    4: ("198.18.1.1", "198.18.1.2", "198.18.2.1", "198.18.2.2", 24),
    6: ("2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1", "2001:db8:2::2", 64),
}


def gateway_scene(lab: Lab, family: int, upstream: str) -> tuple[NetNs, NetNs, NetNs]:
    """Namespaces client, proxy and `upstream`, linked and routed as above."""
    client_ip, proxy_down, proxy_up, upstream_ip, bits = GATEWAY_ADDRESSES[family]
    client, proxy, server = lab.ns("client"), lab.ns("proxy"), lab.ns(upstream)
    lab.link(client, "eth0", f"{client_ip}/{bits}", proxy, "eth0", f"{proxy_down}/{bits}")
    lab.link(proxy, "eth1", f"{proxy_up}/{bits}", server, "eth0", f"{upstream_ip}/{bits}")
    client.run("ip", f"-{family}", "route", "add", "default", "via", proxy_down)
    server.run("ip", f"-{family}", "route", "add", "default", "via", proxy_up)
    return client, proxy, server
