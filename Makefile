# The two commands a fresh machine needs (see README): `make demo` and `make test`.
PYTHON ?= python3
PG_VERSION = $(shell ls /etc/postgresql 2>/dev/null | head -n1)

.PHONY: setup services demo test

setup:  ## install the project, its test tools (Chromium for the web page's tests) and the Fashion-MNIST files
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	$(PYTHON) -m pip install -q -e ".[test]"

services:  ## start PostgreSQL and Redis if they are down
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $(PG_VERSION) main start
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /tmp --logfile /tmp/redis-ci.log
	@for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && exit 0; sleep 1; done; echo "services did not come up" >&2; exit 1

demo: setup  ## backdoor a small Fashion-MNIST model, then sanitize it into demo-out/
	$(PYTHON) -m bench.demo --out demo-out

# Two processes, one thread each (two cores): the engine's tests run beside the service's, which
# mostly wait on servers and workers; tests/conftest.py orders the slow ones first.
test: setup services  ## the whole test suite
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder
