# A small image of the static operator binary. CI builds the same binary with
#   cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin medplum-operator
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin medplum-operator

# distroless/static carries CA certificates and a nonroot user, nothing else.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/dist/medplum-operator /medplum-operator
USER 65532:65532
ENTRYPOINT ["/medplum-operator"]
CMD ["run"]
