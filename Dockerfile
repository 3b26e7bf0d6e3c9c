# NTMobile: one image for every role (deploy job, DC, RS, node, and the anvil dev chain).
#   docker compose up            # see docker-compose.yml
#   docker build -t ntmobile .   # alone
# The anvil binary is linux-amd64 only: build and run the image as linux/amd64.
# Base images are pinned to exact releases (bump them on purpose, not by a rebuild).

# ---- stage 1: npm fetches the anvil binary from package-lock.json (nodejs stays in this stage)
FROM node:20.18.1-bookworm-slim AS anvil
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
 && cp node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil /build/anvil

# ---- stage 2: the runtime: Python, our packages, the anvil binary; no nodejs, no npm
FROM python:3.11.11-slim-bookworm
WORKDIR /app
COPY --from=anvil /build/anvil /usr/local/bin/anvil

COPY pyproject.toml README.md constraints.txt ./
COPY contracts ./contracts
COPY ntm ./ntm
COPY chain ./chain
COPY daemon ./daemon
COPY dc ./dc
COPY rs ./rs
COPY cs ./cs
COPY node ./node
COPY scripts ./scripts
# constraints.txt pins every dependency, direct and indirect: the image runs what the tests ran.
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --create-home --uid 1000 ntm \
 && mkdir -p /chain /shared /data /home/ntm/nodes \
 && chown -R ntm:ntm /chain /shared /data /home/ntm/nodes

ENV NTM_HOME=/home/ntm/nodes/node1 \
    PYTHONUNBUFFERED=1

USER ntm
# The tunnel port, DC HTTP + keepalives, RS relay + control, Cache Server, anvil's RPC.
EXPOSE 4330/udp 8330 4331/udp 4332/udp 4340/udp 8340 8350 8545
CMD ["ntm", "--help"]
