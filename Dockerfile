# syntax=docker/dockerfile:1
# The nvo3 image: one image for every nvo3 process in compose.yaml (IMA, NVE,
# agent, operator commands). It has no ENTRYPOINT on purpose: each compose
# `command` is a complete argv starting with `nvo3`, exactly what
# tests/test_compose.py runs locally.
#
#   docker build -t nvo3:local .
#   docker run --rm nvo3:local nvo3 demo    # self-contained: servers from the wheels

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
# /pki is where compose.yaml mounts the named volume `pki`: an empty volume takes
# the owner and mode of its mount point from the image, so the `pki` job (this
# user) can write the credentials there; the server images read them as root.
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent nvo3 \
 && mkdir -m 0700 /pki && chown nvo3 /pki
USER nvo3
WORKDIR /tmp
CMD ["nvo3", "--help"]
