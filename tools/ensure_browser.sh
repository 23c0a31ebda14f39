#!/bin/sh
# Called by `make test`: the dashboard's browser test (tests/test_dashboard.py) drives
# Debian's headless Chromium through chromedriver. Install both when missing and this is
# root on a machine with apt-get; otherwise say that the test will not run, and why.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "make test: installing chromium and chromium-driver for the dashboard's browser test"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; then
        exit 0
    fi
    echo "make test: could not install chromium and chromium-driver: the dashboard's browser test will not run"
    exit 0
fi
echo "make test: no chromium or chromedriver on PATH, and installing them needs root and apt-get" \
     "(apt-get install chromium chromium-driver): the dashboard's browser test will not run"
