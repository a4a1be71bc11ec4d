# The keepsrc image docker-compose.yml runs: the control plane (`keepsrc serve`), the host plan of
# original_src nodes (`keepsrc netplan --apply`, hence iptables and iproute2; that one runs as root
# with NET_ADMIN), the demo backends (`python -m keepsrc.demo.backends`) and the demo client (curl,
# nc). Everything else runs as the unprivileged user keepsrc. About 360 MB (README: Docker Compose).
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 curl netcat-openbsd \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin keepsrc

WORKDIR /src
# Only what the wheel is built from, so an edit to tests or docs does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY keepsrc ./keepsrc
RUN pip install --no-cache-dir --disable-pip-version-check . \
 && rm -rf /src

WORKDIR /
USER keepsrc
ENV PYTHONUNBUFFERED=1
# `keepsrc serve` answers gRPC health (grpc.health.v1): service "" is SERVING once a topology is
# loaded. KEEPSRC_HEALTH_ADDR: where serve listens, when not on port 18000. KEEPSRC_HEALTH_TLS: a
# `keepsrc certs` directory, when serve runs mutual TLS: the check connects as keepsrc-admin
# (admin.pem) and wants keepsrc's certificate to chain to ca.pem and name localhost. Containers of
# this image that do not serve (netplan, backends, client) turn it off in docker-compose.yml.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; address = os.environ.get('KEEPSRC_HEALTH_ADDR', '127.0.0.1:18000'); tls = os.environ.get('KEEPSRC_HEALTH_TLS'); read = lambda name: open(os.path.join(tls, name), 'rb').read(); channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(read('ca.pem'), read('admin-key.pem'), read('admin.pem')), [('grpc.ssl_target_name_override', 'localhost')]) if tls else grpc.insecure_channel(address); reply = rpc.HealthStub(channel).Check(pb.HealthCheckRequest(service=''), timeout=4); print(pb.HealthCheckResponse.ServingStatus.Name(reply.status)); sys.exit(reply.status != pb.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["keepsrc"]
CMD ["--help"]
