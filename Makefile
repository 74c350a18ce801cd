# llm-relay: `make run` starts the relay on embedded defaults, `make test` runs everything CI runs.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/llm-relay/target
export RELAY_TEST_PG_URL ?= postgres://postgres:postgres@127.0.0.1:5432/postgres
export RELAY_TEST_REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: run build test lint bench deps ui

deps:
	@scripts/install-deps.sh build

# The admin UI (admin-ui/, Vue + Vite): dependencies from package-lock.json, then dist/, which
# the relay embeds. Each step runs again only when its inputs changed.
UI_SOURCES := $(shell find admin-ui/src admin-ui/index.html admin-ui/vite.config.ts admin-ui/tsconfig.json -type f 2>/dev/null)
admin-ui/node_modules/.package-lock.json: admin-ui/package.json admin-ui/package-lock.json
	cd admin-ui && npm ci --no-audit --no-fund
admin-ui/dist/index.html: admin-ui/node_modules/.package-lock.json $(UI_SOURCES)
	cd admin-ui && npm run build
ui: deps admin-ui/dist/index.html

build: deps ui
	cargo build --release --bin llm-relay

run: build
	$(CARGO_TARGET_DIR)/release/llm-relay serve

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test:
	@scripts/install-deps.sh test
	@$(MAKE) --no-print-directory admin-ui/dist/index.html
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo build --bin llm-relay
	cargo run --quiet --bin llm-relay -- check-config conf/relay.example.toml
	cargo test --workspace

# Criterion micro-benchmarks, then the load test (benches/load/run.sh: mock upstream, nginx
# baseline, relay). Installs nginx-light, wrk and curl when missing. BENCH_ARGS goes to criterion
# (e.g. BENCH_ARGS=--quick); BENCH_DURATION, BENCH_STREAMS, BENCH_SOAK tune the load test.
BENCH_ARGS ?=
bench: deps
	@benches/load/install.sh
	cargo bench --bench sse_usage --bench session_key --bench api_key --bench filter_chain --bench usage_write -- $(BENCH_ARGS)
	cargo build --release --bin llm-relay --example load_mock
	benches/load/run.sh
