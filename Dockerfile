# Strait's container image: one static binary on distroless, running as a non-root user.
#
#   docker build -t strait:latest .
#   minikube image build -t strait:latest .
#
# The binary is linked against musl so that the runtime image needs no libc at all; mimalloc
# (the global allocator) and ring compile C, hence musl-gcc from musl-tools. It is built with
# profile-guided optimisation (deploy/build-pgo.sh: an instrumented build, a training load on
# loopback, then the optimised build), hence llvm-tools. deploy/kubernetes/ runs this image;
# docs/deploy.md describes it.

FROM rust:1.95-bookworm AS build
# Only a build stage: its packages never reach the runtime image, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl \
 && rustup component add llvm-tools
WORKDIR /src
COPY . .
# No BuildKit-only features (cache mounts): `minikube image build` may run the classic
# builder. So any change to the sources rebuilds every dependency, twice (instrumented, then
# optimised); it takes minutes. The training load needs only curl, which this image has.
RUN TARGET=x86_64-unknown-linux-musl deploy/build-pgo.sh \
 && install -D -m 0755 target/x86_64-unknown-linux-musl/release/strait /out/strait

# No shell, no package manager, no libc: nothing for an attacker to use, and nothing that
# needs patching but the binary. Strait writes nothing to disk, so the root filesystem can be
# mounted read-only.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/strait /strait
# distroless's "nonroot" user, numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# 8080: HTTP (Ingress routes, or the config's listeners); 8443: HTTPS; 9901: admin (/live,
# /ready, /metrics, /config). Unprivileged ports: no capability is needed to bind them.
EXPOSE 8080 8443 9901
# No HEALTHCHECK: the image has no curl or shell to run one, and orchestrators probe the admin
# port's /live and /ready themselves. No CMD either: the arguments say which mode to run,
# e.g. `--kubernetes` or `--config /etc/strait/strait.yaml`.
ENTRYPOINT ["/strait"]
