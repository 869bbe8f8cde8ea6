# Builds the stepgate binary and ships it on a slim Debian image.
FROM rust:1-bookworm AS build
WORKDIR /src
# pg_query compiles PostgreSQL's parser (libpg_query); bindgen needs libclang.
RUN apt-get update && apt-get install -y --no-install-recommends clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin stepgate

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/stepgate stepgate \
    && mkdir -p /var/lib/stepgate && chown stepgate /var/lib/stepgate
COPY --from=build /src/target/release/stepgate /usr/local/bin/stepgate
USER stepgate
EXPOSE 6432
ENTRYPOINT ["stepgate"]
CMD ["serve", "--config", "/etc/stepgate/stepgate.toml"]
