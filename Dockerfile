# ccload: a static binary on a distroless base, running as a non-root user.
#
#   docker build -t ccload --build-arg VERSION=v1.2.3 .
#   docker run -d -p 8080:8080 -v ccload-data:/app/data --env-file .env ccload
#
# The builder runs on the build machine's own platform and cross-compiles
# for the target one (TARGETOS/TARGETARCH come from buildx), so a
# multi-platform build needs no emulation.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The same flags as scripts/build-release.sh (docs_test.go checks it).
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o /out/ccload . \
 && mkdir -p -m 0700 /out/data

# static-debian12 holds CA certificates, tzdata and /etc/passwd; the nonroot
# tag runs as uid/gid 65532.
FROM gcr.io/distroless/static-debian12:nonroot
WORKDIR /app
COPY --from=build /out/ccload /app/ccload
# An empty data directory owned by the runtime user (mode 0700 in the
# builder): a named volume mounted here starts as a copy of it, so the
# database can be created.
COPY --from=build --chown=65532:65532 /out/data /app/data
ENV SQLITE_PATH=/app/data/ccload.db \
    PORT=8080
VOLUME ["/app/data"]
EXPOSE 8080
USER 65532:65532
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/app/ccload", "healthcheck"]
ENTRYPOINT ["/app/ccload"]
