# MediaStream in a container, built with the README's own install step (scripts/install.sh).
#
#   docker build -t mediastream .
#   docker run --network host -v "$PWD/config:/config:ro" -v mediastream-data:/data mediastream
#
# Host networking: WebRTC media goes over UDP on ports the server picks per viewer, which a
# container's port mapping can't publish ahead of time (see docs/deployment.md).
FROM debian:12-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mediastream
COPY pyproject.toml README.md ./
COPY src ./src
COPY web ./web
COPY scripts ./scripts
RUN ./scripts/install.sh

# /config/mediastream.toml is optional: without it the demo streams play.
VOLUME ["/config", "/data"]
EXPOSE 8107
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "if [ -f /config/mediastream.toml ]; then exec .venv/bin/mediastream serve --config /config/mediastream.toml; else exec .venv/bin/mediastream serve; fi"]
