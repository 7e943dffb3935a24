# qrouter: the two commands that set everything up are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the test suite uses (installed by `make test` when run as root and missing).
DEB_PACKAGES := util-linux mount e2fsprogs qpsmtpd swaks libnet-ip-perl maildrop procmail tmux stress-ng nsd pflogsumm \
	logwatch dovecot-core dovecot-lmtpd ldnsutils unbound redis-server
# What `make test-under-load` runs: the whole suite, or e.g. TESTS=tests/test_config.py
TESTS ?=
# The suite runs in this many processes, a test file in one of them (its servers are shared by its
# tests). Most tests wait on daemons and peers rather than compute, so more processes than CPUs.
TEST_PROCESSES ?= 4
PYTEST := $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile

.PHONY: run test test-under-load coverage bench venv deb-packages run-as-root needs-root clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed run-as-root
	@mkdir -p var/mail
	@echo "qrouter: spool ./var/spool, mail delivered into ./var/mail/DOMAIN/USER (Maildir)."
	@if [ "$$(id -u)" = 0 ]; then echo "qrouter: started as root: supervisor and workers run as user qrouter"; \
	else echo "qrouter: supervisor and workers run as $$(id -un)"; fi
	@echo "qrouter: in another shell, queue a message with:"
	@printf '%s\n' "  printf 'Subject: hi\\n\\nhello\\n' | $(VENV)/bin/qrouter enqueue --queue-dir var/spool -f you@example.org user@example.org"
	@echo "  $(VENV)/bin/qrouter status --queue-dir var/spool"
	$(VENV)/bin/qrouter run --foreground --queue-dir var/spool --workers 2 \
		--default-transport 'queue/maildir var/mail/%d/%u'

# Run as root, the daemon becomes the unprivileged user qrouter (router/config/privileges.py), as a package
# would set it up: the user exists, owns the Maildirs it writes, and can reach the interpreter
# (a Python under a private home directory gets that directory made traversable, o+x only).
run-as-root:
	@if [ "$$(id -u)" = 0 ]; then \
		id qrouter >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin qrouter; \
		mkdir -p var/mail && chown qrouter var/mail; \
		d=$$(dirname "$$(readlink -f $(PY))"); \
		while [ "$$d" != / ]; do \
			if [ -n "$$(find "$$d" -maxdepth 0 ! -perm -o+x)" ]; then chmod o+x "$$d"; echo "made $$d traversable (o+x) for user qrouter"; fi; \
			d=$$(dirname "$$d"); \
		done; \
	fi

deb-packages:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing Debian packages:$$missing (run make test as root, or install them)"; exit 1; fi; \
		case " $$missing " in *" redis-server "*) \
			systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true; \
			echo "stopped the redis-server service the package started: the tests run their own";; esac; \
	fi

# The suite makes unix users, mounts small filesystems and starts the daemon as root to see it
# drop to its own user: as anyone else every test would fail in its setup. Said once, first.
needs-root:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test needs root: the suite creates unix users, mounts small filesystems and starts the daemon as root; run: sudo make test"; \
		exit 1; \
	fi

test: needs-root $(VENV)/.installed deb-packages run-as-root
	$(VENV)/bin/ruff check .
	$(PYTEST)

# The suite three times in a row while stress-ng keeps four CPUs busy beside it, as on a loaded
# machine; it fails if any run failed. stress-ng is stopped at the end whatever happens: by the
# shell's trap, and by its parent-death signal (setpriv --pdeathsig) should the shell be killed.
test-under-load: needs-root $(VENV)/.installed deb-packages run-as-root
	@setpriv --pdeathsig TERM stress-ng --cpu 4 --quiet & stress=$$!; \
	trap 'kill $$stress 2>/dev/null; wait $$stress 2>/dev/null' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	failed=""; \
	for run in 1 2 3; do \
		echo "test-under-load: run $$run of 3, beside stress-ng --cpu 4 (pid $$stress)"; \
		$(PYTEST) $(TESTS) || failed="$$failed $$run"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-under-load: failed in run(s)$$failed"; exit 1; fi; \
	echo "test-under-load: passed three times"

# The suite under coverage.py, counting the lines the daemon, its workers and the commands run in
# their own processes (pyproject.toml [tool.coverage.run]); the data goes where the daemon's own
# user can write it.
coverage: needs-root $(VENV)/.installed deb-packages run-as-root
	rm -rf /tmp/qrouter-coverage && install -d -m 1777 /tmp/qrouter-coverage
	$(PY) -m coverage run -m pytest -n $(TEST_PROCESSES) --dist loadfile $(TESTS)
	$(PY) -m coverage combine -q
	$(PY) -m coverage report

bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH)

clean:
	rm -rf $(VENV) var
