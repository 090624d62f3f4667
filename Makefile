# Session Audit Service. `make run` starts everything; `make test` passes the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(sort $(wildcard proto/session_audit/v1/*.proto))
GEN    := src/session_audit/v1
DESC   := envoy/session_audit.pb
PROTOC  = PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
          -I$$($(BIN)/python -c 'import grpc_tools,os;print(os.path.join(os.path.dirname(grpc_tools.__file__),"_proto"))') \
          -I$$($(BIN)/python -c 'import google.api.annotations_pb2 as m,os;print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')

.PHONY: all venv proto check-proto descriptor openapi check-openapi buf-lint buf-baseline lint test \
        soak test-citus fuzz run bench bench-reports bench-analytics bench-analytics-citus bench-retention \
        bench-throughput bench-loop bench-growth clean

all: venv descriptor

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Regenerate the committed Python code from the protos.
proto: $(STAMP)
	rm -f $(GEN)/*_pb2*.py $(GEN)/*_pb2*.pyi
	$(PROTOC) --python_out=src --grpc_python_out=src --mypy_out=src --mypy_grpc_out=src $(PROTOS)

# Fails when the committed generated code is stale.
check-proto: $(STAMP)
	rm -rf .gen-check && mkdir -p .gen-check
	$(PROTOC) --python_out=.gen-check --grpc_python_out=.gen-check --mypy_out=.gen-check \
	          --mypy_grpc_out=.gen-check $(PROTOS)
	diff -r -x __init__.py -x py.typed -x __pycache__ .gen-check/session_audit/v1 $(GEN) \
	  || (echo "generated code is stale: run 'make proto' and commit" >&2; rm -rf .gen-check; exit 1)
	rm -rf .gen-check

$(DESC): $(PROTOS) $(STAMP)
	$(PROTOC) --include_imports --include_source_info --descriptor_set_out=$(DESC) $(PROTOS)

descriptor: $(DESC)

# The OpenAPI description (envoy/openapi.json) and Envoy's route table (in envoy/envoy.yaml),
# generated from the protos' http bindings and comments. Commit both.
openapi: $(DESC)
	$(BIN)/python -m session_audit.openapi write

# Fails when either is stale.
check-openapi: $(DESC)
	$(BIN)/python -m session_audit.openapi check

# buf (from the buf-bin wheel) reads the protos with the google/api ones from the
# googleapis-common-protos wheel, linked into build/buf-deps (a second module of buf.yaml's
# workspace), so it needs no network. Lint: STANDARD with the exceptions listed in buf.yaml.
# Breaking: the contract must stay wire- and JSON-compatible with BUF_BASELINE (docs/contract.md).
BUF_BASELINE := proto/buf-image-baseline.binpb
BUF_DEPS      = mkdir -p build/buf-deps/google && ln -sfn \
                "$$($(BIN)/python -c 'import google.api.annotations_pb2 as m,os;print(os.path.dirname(m.__file__))')" \
                build/buf-deps/google/api

buf-lint: $(STAMP)
	$(BUF_DEPS)
	$(BIN)/buf lint
	$(BIN)/buf breaking proto --against $(BUF_BASELINE)

# Only when a break is intended and announced: the current contract becomes the baseline.
buf-baseline: $(STAMP)
	$(BUF_DEPS)
	$(BIN)/buf build proto --exclude-source-info -o $(BUF_BASELINE)

lint: $(STAMP) buf-lint
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: $(STAMP) check-proto $(DESC) check-openapi lint
	$(BIN)/pytest

# Reliability soak (docs/reliability.md): concurrent overlapping ingest, kill -9 and replay,
# mixed load with p50/p99 per call, event-loop probe. Bounded: about 5 minutes, at most 10.
soak: $(STAMP) $(DESC)
	SOAK=1 timeout 600 $(BIN)/pytest tests/soak -s -p no:cacheprovider --basetemp=.pytest-soak

# The API test modules on a Citus cluster: a coordinator and two workers started for the run
# (binaries from CITUS_PG_BIN, else built by ../shared/citus/build-citus), stopped afterwards.
# Includes the router-plan check (tests/test_citus_router.py). See docs/scaling.md.
CITUS_TESTS ?= tests/test_citus_router.py tests/test_sessions_list.py tests/test_sessions_ingest.py \
               tests/test_analytics_api.py tests/test_analytics_rollups.py tests/test_analytics_weeks.py \
               tests/test_analytics_duration_split.py tests/test_analytics_names.py \
               tests/test_reports_api.py \
               tests/test_reports_downloads.py tests/test_reports_filters.py \
               tests/test_reports_scheduler.py tests/test_reports_crash.py tests/test_contract.py \
               tests/test_instances.py tests/test_retention.py tests/test_trail.py \
               tests/test_holds_batched.py
test-citus: $(STAMP) $(DESC)
	$(BIN)/python -m tests.citus_cluster run -- $(BIN)/pytest -p no:cacheprovider \
	  --basetemp=.pytest-tmp-citus $(CITUS_TESTS)

# Hostile-input fuzzing against the real stack (server + Envoy + PostgreSQL): schemathesis over
# envoy/openapi.json and hypothesis strategies for every parameter; prints counts by status.
fuzz: $(STAMP) $(DESC)
	$(BIN)/python -m tests.fuzz $(FUZZ_ARGS)

run: $(STAMP) $(DESC)
	$(BIN)/session-audit run

bench: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_sessions.py $(BENCH_ARGS)

# Reports: generation and downloads at 10k, 100k and 1M sessions (figures, not assertions).
bench-reports: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_reports.py $(BENCH_ARGS)

# Aggregations at 10M sessions; the data set is kept in .bench-data-analytics/ and reused.
bench-analytics: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_analytics.py $(BENCH_ARGS)

# The rollup cases at several data sizes in one run, requests interleaved across sizes (the
# data sets bench-analytics loaded): BENCH_ARGS="--data-dirs DIR_1M,DIR_3M,DIR_10M".
bench-growth: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_growth.py $(BENCH_ARGS)

# Requests/s of cheap calls, REST (wrk, through Envoy) and gRPC, WORKERS=2 and 1; 30 s each.
bench-throughput: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_throughput.py $(BENCH_ARGS)

# The same bench against a fresh 3-node Citus cluster (docs/scaling.md: --seed, --t-end and
# --answers in BENCH_ARGS give the same data as a single-node run, to compare answers).
bench-analytics-citus: $(STAMP) $(DESC)
	$(BIN)/python -m tests.citus_cluster run -- $(BIN)/python bench/bench_analytics.py $(BENCH_ARGS)

# Retention: purge 1M expired of 3M sessions (default) under load, the trail's ingest cost, verify at 1M
# entries (figures in docs/retention.md).
bench-retention: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_retention.py $(BENCH_ARGS)

# Event-loop responsiveness: health-probe p50/p99 and the server's own loop stalls (LOOP_STALL_MS)
# while ten 1,000-session batches, a report generation and a PDF download run; about a minute.
bench-loop: $(STAMP) $(DESC)
	$(BIN)/python bench/bench_loop.py $(BENCH_ARGS)

clean:
	rm -rf .gen-check $(DESC) .pytest_cache .mypy_cache .ruff_cache build/buf-deps
