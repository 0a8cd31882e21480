# syntax=docker/dockerfile:1
# One image for the three services, their migration initContainers and the edge's
# descriptor initContainer (deploy/k8s names it cosnap/backend). Build from the repository
# root: `docker build -t cosnap/backend:<version> .`
#
# The bases are pinned by exact version tag. Pin them by digest too when you build for a
# release (`docker buildx imagetools inspect <image>` prints it; append @sha256:...): no
# registry is reachable from the machines this was written on, so no digest could be read.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG NODE_IMAGE=node:20.19.5-bookworm-slim

# --- buf, from npm as package-lock.json pins it (the codegen's first step) ---------------------
FROM ${NODE_IMAGE} AS buf
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
    && cp node_modules/@bufbuild/buf-linux-*/bin/buf /usr/local/bin/buf \
    && /usr/local/bin/buf --version

# --- dependencies and generated code ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN python -m venv /opt/venv
# Exact versions of everything the services import, and of what those import in turn.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements.lock
# The codegen runs here, so build/descriptor.binpb (for Envoy) and build/gen (the stubs)
# are the contract of exactly this image.
COPY --from=buf /usr/local/bin/buf /usr/local/bin/buf
COPY buf.yaml ./
COPY protos/ protos/
COPY tools/codegen.py tools/
RUN BUF=/usr/local/bin/buf python tools/codegen.py --out /app/build \
    && rm -rf /app/build/third_party

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# uid/gid 10001: the manifests' runAsUser/runAsGroup (tests/deploy/test_image.py checks both).
RUN groupadd --system --gid 10001 cosnap \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cosnap
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/build/ build/
COPY services/ services/
COPY gateway/ gateway/
# The code runs from /app (as `make` arranges in a checkout): the repository root and the
# generated stubs on the path.
RUN printf '/app\n/app/build/gen\n' > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cosnap.pth" \
    && python -c 'import services.analytics.app, services.effects.app, services.monitoring.app, gateway.app'
USER 10001:10001
EXPOSE 50051 50052 50053 9101 9102 9103
# Which service: the manifests set the command (`python -m services.<name> [migrate]`).
CMD ["python", "-m", "services.analytics"]
