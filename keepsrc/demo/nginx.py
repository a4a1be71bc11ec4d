"""nginx as the demo and the tests run it: in the foreground, everything it writes in one directory."""

from __future__ import annotations

_PREAMBLE = """daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
"""


def nginx_conf(http: str) -> str:
    """A config template (str.format, `{dir}` the directory) whose http block ends with `http`."""
    return _PREAMBLE + http + "}}\n"
