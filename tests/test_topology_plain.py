"""The plain pass (keepsrc/topology/plain.py) on the inputs where it must step aside.

yaml-rs reads YAML 1.2 and PyYAML YAML 1.1: each case below is a value the two read apart, written
where a topology takes it. A file must mean what YAML 1.1 makes of it whichever pass answers, so
each test asserts the value a user gets, and that the plain pass declined the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keepsrc.topology import Topology, check_topology_text, plain
from keepsrc.topology.loader import check_plain, check_precisely
from keepsrc.topology.plain import read_plain
from tests.support.quickstart import QUICKSTART
from tests.test_tls import Pki


def http_listener(topology: Topology) -> object:
    return topology.proxies["ingress"].listeners[1]


def with_xff(xff: str) -> str:
    text = QUICKSTART.replace("xff: {use_remote_address: true, trusted_hops: 0}", f"xff: {xff}")
    assert text != QUICKSTART
    return text


def loaded(text: str) -> Topology:
    topology, diagnostics = check_topology_text(text, "t.yaml")
    assert topology is not None and not diagnostics, diagnostics
    assert (topology, diagnostics) == check_precisely(text, "t.yaml")
    return topology


def test_the_quickstart_is_answered_by_the_plain_pass() -> None:
    assert check_plain(QUICKSTART, "t.yaml") == loaded(QUICKSTART)


@pytest.mark.parametrize(
    ("written", "hops", "read_alike"),
    [
        ("017", 15, False),  # octal to YAML 1.1, 17 to YAML 1.2
        ("+017", 15, False),
        ("1_0", 10, False),  # YAML 1.2 has no underscores; yaml-rs reads 10 all the same
        ("0o17", None, False),  # text to YAML 1.1, 15 to YAML 1.2
        ("0x10", 16, True),
        ("12", 12, True),
    ],
)
def test_an_integer_means_what_yaml_1_1_reads(written: str, hops: int | None, read_alike: bool) -> None:
    text = with_xff(f"{{trusted_hops: {written}}}")
    assert (check_plain(text, "t.yaml") is not None) == read_alike
    if hops is None:
        topology, diagnostics = check_topology_text(text, "t.yaml")
        assert topology is None
        assert [d.message for d in diagnostics] == [f"expected an integer from 0 to 32, got '{written}'"]
    else:
        assert http_listener(loaded(text)).xff.trusted_hops == hops


@pytest.mark.parametrize(("written", "value"), [("on", True), ("Off", False), ("yes", True), ("true", True)])
def test_yaml_1_1_booleans_are_booleans(written: str, value: bool) -> None:
    text = with_xff(f"{{use_remote_address: {written}}}")
    assert http_listener(loaded(text)).xff.use_remote_address is value


@pytest.mark.parametrize("written", ["1e3", "1:20", "2001-12-14", "0.5", ".inf", "null", "no"])
def test_a_name_yaml_1_1_reads_as_another_type_is_refused_or_kept_as_written(written: str) -> None:
    # YAML 1.1: 1e3 is text (no dot), 1:20 a number (base 60), 2001-12-14 a date, .inf a number.
    text = QUICKSTART.replace("        service: echo\n", f"        service: echo\n        stat_prefix: {written}\n")
    assert check_topology_text(text, "t.yaml") == check_precisely(text, "t.yaml")
    topology, _ = check_topology_text(text, "t.yaml")
    if written == "1e3":
        assert topology is not None and topology.proxies["ingress"].listeners[0].stat_prefix == "1e3"
    else:
        assert topology is None
    assert check_plain(text, "t.yaml") is None


@pytest.mark.parametrize(
    "text",
    [
        QUICKSTART.replace("\n", "\r\n"),
        "%YAML 1.1\n---\n" + QUICKSTART,
        QUICKSTART.replace("send_proxy_protocol: v2", "send_proxy_protocol: !!str v2"),
        QUICKSTART.replace("# The built-in example", "# The built-in exämple"),
    ],
    ids=["crlf", "directive", "tag", "non-ascii"],
)
def test_text_the_plain_pass_declines_loads_as_before(text: str) -> None:
    assert check_plain(text, "t.yaml") is None
    assert loaded(text) == loaded(QUICKSTART)


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_block_nesting_deep_enough_to_crash_yaml_rs_never_reaches_it(depth: int) -> None:
    # yaml-rs 0.1.6 recurses once per level and dies of a stack overflow (SIGSEGV) past ~10,000.
    text = QUICKSTART + "extra:\n" + "- " * depth + "x\n"
    topology, diagnostics = check_topology_text(text, "t.yaml")
    assert topology is None and diagnostics
    assert check_plain(text, "t.yaml") is None


def test_tls_settings_load_through_the_plain_pass_as_through_the_precise_one(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    a_cert, a_key, _ = pki.issue("a.test", ["a.test"])
    d_cert, d_key, _ = pki.issue("default.test", ["default.test"])
    text = f"""apiVersion: keepsrc/v1
services:
  web: {{endpoints: ["127.0.0.1:8080"]}}
  up:
    endpoints: ["127.0.0.1:8443"]
    tls: {{ca: {pki.ca}, sni: upstream.test, client_certificate: {{cert: {a_cert}, key: {a_key}}}, min_version: "1.3"}}
proxies:
  ingress:
    listeners:
      - name: https
        address: 127.0.0.1:10443
        protocol: http
        tls:
          certificates:
            - {{cert: {a_cert}, key: {a_key}, server_names: [a.test]}}
            - {{cert: {d_cert}, key: {d_key}}}
          alpn: [h2]
        routes: [{{prefix: /up, service: up}}, {{prefix: /, service: web}}]
      - name: passthrough
        address: 127.0.0.1:10444
        protocol: tcp
        sni_routes: [{{server_names: [a.pass.test], service: web}}]
        service: up
"""
    plain = check_plain(text, "t.yaml")
    assert plain is not None and plain == loaded(text)
    # The same server name on both certificates: the plain pass steps aside and the precise one places it.
    default = f"- {{cert: {d_cert}, key: {d_key}}}"
    clash = text.replace(default, default[:-1] + ", server_names: [a.test]}")
    assert check_plain(clash, "t.yaml") is None
    _, diagnostics = check_topology_text(clash, "t.yaml")
    lines = clash.splitlines()
    line = next(i for i, text in enumerate(lines, 1) if str(d_cert) in text)
    col = lines[line - 1].index("[a.test]") + 1
    assert [str(d) for d in diagnostics] == [
        f"t.yaml:{line}:{col}: error: proxies.ingress.listeners[0].tls.certificates[1].server_names: server name"
        f" 'a.test' is already served by certificates[0] (line {line - 1}); each name picks one certificate"
    ]


@pytest.mark.parametrize("digits", [25, 5_000, 1_000_000])
def test_a_long_number_is_refused_with_its_size_and_never_read_by_yaml_rs_when_over_a_scalar(digits: int) -> None:
    # yaml-rs reads a million digits into an int in 0.8 s (quadratic), and Python refuses to print one
    # of over 4,300 digits; a value over 4,096 characters is refused unread by the precise pass.
    text = with_xff(f"{{trusted_hops: {'9' * digits}}}")
    topology, diagnostics = check_topology_text(text, "t.yaml")
    assert topology is None and len(diagnostics) == 1
    if digits <= 4096:
        assert diagnostics[0].message == f"'{'9' * digits}' is out of range; valid: 0 to 32"  # as written: 2**64 and up
    else:
        expected = f"expected an integer from 0 to 32, got a value of {digits:,} characters"
        assert diagnostics[0].message.startswith(expected)
        assert read_plain(text) is None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("xff: {{trusted_hops: {}}}", "'0xffff"),
        ("original_src: {{table: {}}}", "table '0xffff"),
    ],
)
def test_a_number_too_long_for_python_to_print_is_shown_as_written(setting: str, message: str) -> None:
    # 4,002 characters (under the 4,096 of a scalar) for a number of 4,816 digits: Python refuses to
    # print one of over 4,300, and the message used to end validation with a ValueError.
    hex_number = "0x" + "f" * 4000
    text = QUICKSTART.replace("        routes: [", f"        {setting.format(hex_number)}\n        routes: [")
    text = text.replace("        xff: {use_remote_address: true, trusted_hops: 0}\n", "")
    topology, diagnostics = check_topology_text(text, "t.yaml")
    assert topology is None
    assert [d.message[: len(message)] for d in diagnostics] == [message]


def test_a_large_varied_topology_loads_the_same_through_both_passes() -> None:
    """Every section the plain pass reads, many times over, integers and booleans included."""

    def service(i: int) -> str:
        endpoints = ", ".join(f'"10.{i // 250}.{i % 250}.{j + 1}:{8000 + j}"' for j in range(i % 7 + 1))
        lb = ["round_robin", "least_request", "ring_hash", "maglev"][i % 4]
        extra = "    send_proxy_protocol: v2\n" if i % 3 == 0 else ""
        extra += "    sticky: client_ip\n" if i % 4 >= 2 else ""  # with ring_hash or maglev
        return f"""  svc-{i:03d}:
    endpoints: [{endpoints}]
    connect_timeout: {i % 9 + 1}00ms
    lb: {lb}
    health_check: {{interval: {i % 5 + 1}s, unhealthy_threshold: {i % 10 + 1}, healthy_threshold: 2}}
{extra}"""

    def proxy(p: int) -> str:
        routes = ", ".join(f"{{prefix: /s{q}/, service: svc-{q:03d}}}" for q in range(p, p + 20))
        return f"""  edge-{p}:
    listeners:
      - name: tcp-in
        address: 0.0.0.0:{10000 + p}
        protocol: tcp
        service: svc-{p:03d}
        accept_proxy_protocol: {{versions: [v1, v2], optional: {str(p % 2 == 0).lower()}}}
        allow_from: [10.0.0.0/8, 192.0.2.7, "2001:db8::/32"]
        idle_timeout: 30s
        stat_prefix: edge_{p}.tcp
      - name: http-in
        address: "[::]:{8000 + p}"
        protocol: http
        routes: [{routes}, {{prefix: /, service: svc-299}}]
        xff: {{use_remote_address: true, trusted_hops: {p % 3}, skip_append: false}}
        deny_from: [198.18.0.0/15]
        match: direct_peer
        access_log: /var/log/envoy/edge-{p}.log
      - name: udp-in
        address: 127.0.0.1:{5060 + p}
        protocol: udp
        service: svc-{p + 1:03d}
        original_src: {{mark: {100 + p}, placement: gateway, upstream_interface: eth1, table: {200 + p}}}
"""

    services = "".join(service(i) for i in range(300))
    proxies = "".join(proxy(p) for p in range(0, 40, 3))
    text = f"apiVersion: keepsrc/v1\nservices:\n{services}proxies:\n{proxies}"
    plain = check_plain(text, "t.yaml")
    assert plain is not None and len(plain.services) == 300
    assert plain == loaded(text)


def test_a_panic_inside_yaml_rs_hands_the_file_to_the_precise_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Rust panic reaches Python as pyo3's PanicException, which is a BaseException, not an Exception.
    class PanicException(BaseException):
        pass

    def panics(text: str, **options: object) -> object:
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(plain.yaml_rs, "loads", panics)
    assert read_plain(QUICKSTART) is None
    assert loaded(QUICKSTART).proxies["ingress"].listeners[0].name == "tcp-in"
