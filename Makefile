# qrouter: the two commands that set everything up are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the test suite uses (installed by `make test` when run as root and missing).
DEB_PACKAGES := util-linux mount e2fsprogs qpsmtpd swaks libnet-ip-perl

.PHONY: run test bench venv deb-packages clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	@mkdir -p var
	@echo "qrouter: spool ./var/spool, mail delivered into ./var/mail/DOMAIN/USER (Maildir)."
	@echo "qrouter: in another shell, queue a message with:"
	@printf '%s\n' "  printf 'Subject: hi\\n\\nhello\\n' | $(VENV)/bin/qrouter enqueue --queue-dir var/spool -f you@example.org user@example.org"
	@echo "  $(VENV)/bin/qrouter status --queue-dir var/spool"
	$(VENV)/bin/qrouter run --foreground --queue-dir var/spool --workers 2 \
		--default-transport 'queue/maildir var/mail/%d/%u'

deb-packages:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing Debian packages:$$missing (run make test as root, or install them)"; exit 1; fi; \
	fi

test: $(VENV)/.installed deb-packages
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH)

clean:
	rm -rf $(VENV) var
