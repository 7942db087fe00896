# Ferry's container image: ferry-router, ferry-prefill, ferry-decode, ferry and ferry-bench in
# /usr/local/bin and the model under /models, as the manifests of `ferry cluster gen k8s` expect
# (docs/cluster.md). A CPU build (GPU nodes: the offline bundle, `make bundle`, docs/gpu.md).
# From the source root, after `make setup` (which fetches the default model into models/):
#
#   docker build -t ferry:latest .
#   docker build -t ferry:latest --build-arg MODEL=models/other.gguf .
#
# The image serves whatever spec or flags it is started with; the model file is the only data
# in it; the daemons run as nobody and UCX needs the /dev/shm every container gets.

FROM debian:bookworm AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config meson ninja-build python3 \
      libucx-dev libuv1-dev libprotobuf-c-dev protobuf-c-compiler libnghttp2-dev libssl-dev \
      libopenblas-dev libyaml-dev libcjson-dev libhttp-parser-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN meson setup /build /src --buildtype=release -Dtests=false -Dcuda=disabled \
    && ninja -C /build \
    && DESTDIR=/stage meson install -C /build --no-rebuild

FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libucx0 ucx-utils libuv1 libprotobuf-c1 libnghttp2-14 libssl3 libopenblas0 libyaml-0-2 \
      libcjson1 libhttp-parser2.9 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /stage/usr/local/ /usr/local/
RUN ldconfig
ARG MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
COPY ${MODEL} /models/
# The RPC ports the manifests use (router, prefill, decode and its UCX listener, HTTP API).
EXPOSE 50051 50061 50071 50072 8000
USER nobody
ENTRYPOINT []
CMD ["ferry", "--help"]
