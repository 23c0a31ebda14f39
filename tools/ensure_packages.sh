#!/bin/sh
# Called by `make test`: the Debian packages some tests need, installed when missing and
# this is root on a machine with apt-get; otherwise it says which tests will not run, and
# why (those tests skip, and pytest names them).
#   chromium, chromium-driver: the dashboard's browser test (tests/test_dashboard.py)
#   iproute2 (`ip`): the multi-host tests' network namespaces (tests/netns.py)
#   redis-tools, openssl: a redis-server that speaks TLS, and its certificates (tests/test_tls.py)
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
[ -x /usr/bin/redis-check-rdb ] || missing="$missing redis-tools"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "make test: installing$missing for the browser, multi-host and TLS tests"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; then
        exit 0
    fi
    echo "make test: could not install$missing: the tests that need them will not run"
    exit 0
fi
echo "make test: missing$missing, and installing needs root and apt-get" \
     "(apt-get install$missing): the tests that need them will not run"
