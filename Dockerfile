# The keepsrc image docker-compose.yml runs: the control plane (`keepsrc serve`), the host plan of
# original_src nodes (`keepsrc netplan --apply`, hence iptables and iproute2), the demo backends
# (`python -m keepsrc.demo.backends`) and the demo client (curl, nc).
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 curl netcat-openbsd \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the wheel is built from, so an edit to tests or docs does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY keepsrc ./keepsrc
RUN pip install --no-cache-dir --disable-pip-version-check .

WORKDIR /
ENTRYPOINT ["keepsrc"]
CMD ["--help"]
