#!/usr/bin/env bash
# Builds the container image the chart runs, daemonless and reproducibly: `FROM scratch` with the
# static musl `dist` binary, Debian's CA bundle and a passwd/group entry for 65532, `USER 65532:65532`,
# OCI labels. Every timestamp is the commit's time (SOURCE_DATE_EPOCH) and the build never reuses a
# cached layer, so two builds of one commit give the same image digest (tests/e2e/image.rs checks it).
#
#   hack/image.sh            builds ghcr.io/medplum-operator/medplum-operator:<chart appVersion> into
#                            podman's local storage and writes target/medplum-operator-image.oci.tar
#   IMAGE=name:tag hack/image.sh   another name; OCI_ARCHIVE=path another archive
#   OPERATOR_BINARY=path hack/image.sh
#                            packs a static binary built before instead of running cargo (the tests do:
#                            cargo run from inside `cargo test` would rebuild the dist profile)
#
# Prints the image name and digest on stdout (`<name> sha256:...`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

command -v podman >/dev/null || { echo "hack/image.sh: podman is needed: apt-get install podman" >&2; exit 1; }
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[[ -f $ca_bundle ]] || { echo "hack/image.sh: $ca_bundle is needed: apt-get install ca-certificates" >&2; exit 1; }

app_version=$(awk -F'"' '/^appVersion:/ {print $2}' charts/medplum-operator/Chart.yaml)
version=$(awk -F'"' '/^version =/ {print $2; exit}' Cargo.toml)
image=${IMAGE:-ghcr.io/medplum-operator/medplum-operator:$app_version}
revision=$(git rev-parse HEAD)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

binary=${OPERATOR_BINARY:-}
if [[ -z $binary ]]; then
  rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl >&2
  command -v musl-gcc >/dev/null || { echo "hack/image.sh: musl-gcc is needed: apt-get install musl-tools" >&2; exit 1; }
  cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin medplum-operator >&2
  binary=target/x86_64-unknown-linux-musl/dist/medplum-operator
fi
file -L "$binary" | grep -q "static" || { echo "hack/image.sh: $binary is not a static binary" >&2; exit 1; }

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/etc/ssl/certs"
install -m 0755 "$binary" "$context/rootfs/medplum-operator"
install -m 0644 "$ca_bundle" "$context/rootfs/etc/ssl/certs/ca-certificates.crt"
echo "nonroot:x:65532:65532:nonroot:/:/sbin/nologin" >"$context/rootfs/etc/passwd"
echo "nonroot:x:65532:" >"$context/rootfs/etc/group"
chmod 0644 "$context/rootfs/etc/passwd" "$context/rootfs/etc/group"
cat >"$context/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
USER 65532:65532
ENTRYPOINT ["/medplum-operator"]
CMD ["run"]
EOF

podman build --quiet --no-cache --timestamp "$SOURCE_DATE_EPOCH" \
  --label org.opencontainers.image.title=medplum-operator \
  --label org.opencontainers.image.source=https://github.com/medplum-operator/medplum-operator \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.created=$created" \
  --tag "$image" --file "$context/Containerfile" "$context" >&2
archive=${OCI_ARCHIVE:-target/medplum-operator-image.oci.tar}
mkdir -p "$(dirname "$archive")"
rm -f "$archive"
podman save --quiet --format oci-archive --output "$archive" "$image"
echo "$image $(podman image inspect --format '{{.Digest}}' "$image")"
