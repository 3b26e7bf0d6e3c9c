# NTMobile: one image for every role (chain, deploy job, DC, RS, node).
#   docker compose up            # see docker-compose.yml
#   docker build -t ntmobile .   # alone
# The anvil npm package is linux-amd64 only: build and run the image as linux/amd64.
FROM python:3.11-slim

# Node.js + npm from Debian: only to install the anvil devnode and solcjs from package-lock.json.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# npm first: the lock file changes less often than the Python code (better layer cache).
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY ntm ./ntm
COPY chain ./chain
COPY daemon ./daemon
COPY dc ./dc
COPY rs ./rs
COPY node ./node
COPY scripts ./scripts
RUN pip install --no-cache-dir . \
 && useradd --create-home --uid 1000 ntm \
 && mkdir -p /chain /shared /data /home/ntm/.ntm \
 && chown -R ntm:ntm /chain /shared /data /home/ntm/.ntm

# `anvil` on PATH (scripts/anvil.py finds it there too); the node's home for `ntm`.
ENV PATH=/app/node_modules/@foundry-rs/anvil-linux-amd64/bin:$PATH \
    NTM_HOME=/home/ntm/.ntm \
    PYTHONUNBUFFERED=1

USER ntm
# The tunnel port, DC HTTP + keepalive, RS relay + control, chain RPC.
EXPOSE 4330/udp 8330 4331/udp 4340/udp 8340 8545
CMD ["ntm", "--help"]
