# llm-relay: `make run` starts the relay on embedded defaults, `make test` runs everything CI runs.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/llm-relay/target
export RELAY_TEST_PG_URL ?= postgres://postgres:postgres@127.0.0.1:5432/postgres
export RELAY_TEST_REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: run build test lint bench deps

deps:
	@scripts/install-deps.sh build

build: deps
	cargo build --release --bin llm-relay

run: build
	$(CARGO_TARGET_DIR)/release/llm-relay serve

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test:
	@scripts/install-deps.sh test
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo build --bin llm-relay
	cargo run --quiet --bin llm-relay -- check-config conf/relay.example.toml
	cargo test --workspace
