#!/usr/bin/env bash
# Bootstrap the project's virtualenv (.venv) and run one of its entry points.
#
#   bash deploy/bootstrap.sh demo  [ARGS...]   install, then: dicomweb-gateway demo ARGS
#   bash deploy/bootstrap.sh test  [ARGS...]   install test deps, then: pytest ARGS (default: -q tests)
#   bash deploy/bootstrap.sh bench [ARGS...]   install test deps, then: python -m tests.bench.run ARGS
#                                              python -m tests.bench.wado ARGS
#                                              python -m tests.bench.stow ARGS
#                                              and python -m tests.bench.viewer ARGS
#   bash deploy/bootstrap.sh soak  [ARGS...]   install test deps, then: python -m tests.soak.soak ARGS
#
# Works on a stock Debian 12 machine: when `python3 -m venv` is unusable
# (python3-venv / ensurepip missing) it installs python3-venv as root, or
# otherwise creates the venv --without-pip and bootstraps pip from a wheel.
#
# Environment:
#   PYTHON=/path/to/python3   interpreter to build the venv from (>= 3.11; default python3)
#   BOOTSTRAP_FORCE_NO_VENV=1 skip `python -m venv` with pip and go straight to the
#                             --without-pip + pip-wheel fallback (lets CI exercise it)
#   BOOTSTRAP_VERBOSE=1       show pip's full output
#   PIP_*, pip.conf           honoured by every pip call and by the pip-wheel fallback
set -euo pipefail

MIN_PY_MAJOR=3
MIN_PY_MINOR=11

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: bash deploy/bootstrap.sh {demo|test|bench|soak} [ARGS...]
  demo   create/refresh .venv and run `dicomweb-gateway demo ARGS`
  test   install Debian test servers and tools (orthanc, orthanc-dicomweb, dcmtk, nginx,
         systemd for systemd-analyze; chromium, nodejs, npm for tests/browser) when root,
         run `npm ci` in tests/browser when its node_modules is missing or stale,
         create/refresh .venv with the test extras and run pytest (default: -q tests)
  bench  create/refresh .venv with the test extras and run `python -m tests.bench.run ARGS`
         (QIDO), `python -m tests.bench.wado ARGS` (WADO-RS retrieve),
         `python -m tests.bench.stow ARGS` (STOW-RS), then
         `python -m tests.bench.viewer ARGS` (a viewer opening a series)
  soak   install the test servers when root (as test does), create/refresh .venv with the
         test extras and run `python -m tests.soak.soak ARGS`: a mixed QIDO/WADO/STOW load
         through one gateway in front of Orthanc (default 20000 requests from 32 clients;
         --requests N --clients N --duration-limit S), checked for errors and for the gateway's
         RSS, threads, descriptors and associations back at their baseline (outside CI)
EOF
}

MODE="${1:-}"
case "$MODE" in
    demo | test | bench | soak) shift ;;
    -h | --help | help) usage; exit 0 ;;
    *) usage; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
[[ -f pyproject.toml ]] || die "no pyproject.toml in $ROOT"
VENV="$ROOT/.venv"
VENV_MARK="$VENV/.bootstrap-home"   # absolute path the venv was built for
STAMP="$VENV/.bootstrap-stamp"      # what was last installed into it
PY=""                               # interpreter the venv is built from (pick_python)

is_root() { [[ "$(id -u)" == 0 ]]; }
have() { command -v "$1" >/dev/null 2>&1; }
can_apt() { is_root && have apt-get && have dpkg-query; }

pip_quiet=(-q)
[[ "${BOOTSTRAP_VERBOSE:-}" == 1 ]] && pip_quiet=()

# ---------------------------------------------------------------- locking ---
# Two runs at once (e.g. demo in one terminal, test in another) must not build
# the same venv concurrently. The lock is released before exec.
if have flock && have sha256sum; then
    lock_file="${TMPDIR:-/tmp}/dicomweb-gateway-bootstrap.$(printf '%s' "$ROOT" | sha256sum | cut -c1-16).lock"
    if { exec 9>>"$lock_file"; } 2>/dev/null; then
        if ! flock -n 9; then
            log "another bootstrap is running for $ROOT; waiting for it"
            flock 9
        fi
    fi
fi

# -------------------------------------------------------------------- apt ---
APT_UPDATED=0
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0

remove_policy_rc() {
    if [[ "$POLICY_RC_OURS" == 1 ]]; then
        rm -f "$POLICY_RC"
        POLICY_RC_OURS=0
    fi
}

apt_install() {
    # apt_install PKG... (root only). Keeps maintainer scripts from starting
    # services (orthanc) via a temporary policy-rc.d.
    if [[ "$APT_UPDATED" == 0 ]]; then
        log "apt-get update"
        if ! DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2; then
            log "apt-get update failed"
            return 1
        fi
        APT_UPDATED=1
    fi
    if [[ ! -e "$POLICY_RC" ]]; then
        trap remove_policy_rc EXIT
        trap 'remove_policy_rc; exit 130' INT
        trap 'remove_policy_rc; exit 143' TERM
        printf '#!/bin/sh\n# temporary, from deploy/bootstrap.sh: start no services\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        POLICY_RC_OURS=1
    fi
    log "apt-get install $*"
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$@" >&2 || rc=$?
    remove_policy_rc
    trap - EXIT INT TERM
    return "$rc"
}

deb_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

ensure_test_servers() {
    # nginx and systemd (systemd-analyze): tests/deploy checks deploy/nginx and deploy/systemd with them
    local pkgs=(orthanc orthanc-dicomweb dcmtk nginx systemd) missing=() p
    if ! have dpkg-query; then
        log "not a Debian system: install Orthanc (with its DICOMweb plugin), DCMTK, nginx and systemd yourself," \
            "or the tests that need them fail under CI=true and are skipped otherwise"
        return 0
    fi
    for p in "${pkgs[@]}"; do
        deb_installed "$p" || missing+=("$p")
    done
    install_or_explain "the tests that need them" "${missing[@]}"
}

install_or_explain() {
    # install_or_explain WHO PKG...: apt-get install the packages as root; otherwise say how, and
    # go on (the tests that need them fail under CI=true and are skipped otherwise)
    local who="$1"
    shift
    [[ $# == 0 ]] && return 0
    if can_apt; then
        apt_install "$@" || die "apt-get install $* failed"
    else
        log "missing Debian packages: $*"
        log "  install them with: sudo apt-get install --no-install-recommends $*"
        log "  (continuing: $who fail under CI=true and are skipped otherwise)"
    fi
}

ensure_browser_tools() {
    # tests/browser drives the OHIF viewer in Debian's Chromium with Node.js. node and npm are
    # checked as commands: a Node.js from elsewhere (e.g. one that bundles npm) is fine as it is,
    # and Debian's npm package would conflict with it.
    local missing=()
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    have node || missing+=(nodejs)
    have npm || missing+=(npm)
    install_or_explain "the browser tests" "${missing[@]}"
}

ensure_browser_npm() {
    # npm ci in tests/browser (the OHIF viewer's prebuilt bundle and playwright-core, pinned by its
    # package-lock.json) when node_modules is missing or was installed from another lock.
    local dir="$ROOT/tests/browser" stamp hash out
    [[ -f "$dir/package-lock.json" ]] || return 0
    stamp="$dir/node_modules/.bootstrap-lock"
    if ! have npm; then
        log "npm not found: the browser tests fail under CI=true and are skipped otherwise"
        return 0
    fi
    hash="$(cat "$dir/package.json" "$dir/package-lock.json" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
        return 0
    fi
    log "installing the browser tests' npm packages (npm ci in tests/browser)"
    rm -f "$stamp"
    if [[ "${BOOTSTRAP_VERBOSE:-}" == 1 ]]; then
        (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund) >&2 || die "npm ci in tests/browser failed"
    elif ! out="$(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error 2>&1)"; then
        printf '%s\n' "$out" | tail -n 20 >&2
        die "npm ci in tests/browser failed"
    fi
    printf '%s\n' "$hash" >"$stamp"
}

# ----------------------------------------------------------------- python ---
py_ok() {
    # py_ok EXE: EXE runs and is >= the minimum version
    "$1" -c "import sys; sys.exit(0 if sys.version_info >= ($MIN_PY_MAJOR, $MIN_PY_MINOR) else 1)" \
        >/dev/null 2>&1
}

py_ver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

pick_python() {
    local cand
    if [[ -n "${PYTHON:-}" ]]; then
        have "$PYTHON" || die "PYTHON=$PYTHON not found"
        if ! py_ok "$PYTHON"; then
            die "PYTHON=$PYTHON ($("$PYTHON" -V 2>&1 | head -n1 || true)) is unusable or too old;" \
                "Python >= $MIN_PY_MAJOR.$MIN_PY_MINOR is required"
        fi
        PY="$PYTHON"
        return
    fi
    for cand in python3 python3.13 python3.12 python3.11; do
        if have "$cand" && py_ok "$cand"; then
            PY="$cand"
            return
        fi
    done
    if ! have python3 && can_apt; then
        apt_install python3 python3-venv ca-certificates || die "apt-get install python3 failed"
        py_ok python3 && { PY=python3; return; }
    fi
    if have python3; then
        die "python3 is $(python3 -V 2>&1); Python >= $MIN_PY_MAJOR.$MIN_PY_MINOR is required" \
            "(set PYTHON=/path/to/python3.11-or-newer)"
    fi
    die "no python3 found; install Python >= $MIN_PY_MAJOR.$MIN_PY_MINOR (Debian: apt-get install python3 python3-venv)"
}

# ------------------------------------------------------------------- venv ---
venv_healthy() {
    [[ -x "$VENV/bin/python" ]] || return 1
    # Built for this location? (a copied or moved repo has scripts and an
    # editable install that point at the old place.)
    if [[ -f "$VENV_MARK" ]]; then
        [[ "$(cat "$VENV_MARK")" == "$VENV" ]] || return 1
    else
        # a venv made by hand: adopt it if its activate script names this path
        grep -qF "$VENV" "$VENV/bin/activate" 2>/dev/null || return 1
    fi
    py_ok "$VENV/bin/python" || return 1
    # An explicit PYTHON must match the venv's version; otherwise any >= minimum will do.
    if [[ -n "${PYTHON:-}" ]]; then
        [[ "$(py_ver "$VENV/bin/python")" == "$(py_ver "$PYTHON")" ]] || return 1
    fi
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || return 1
    [[ -f "$VENV_MARK" ]] || printf '%s\n' "$VENV" >"$VENV_MARK"
}

fetch_pip_wheel() {
    # fetch_pip_wheel DIR: put a pip-*.whl into DIR and print its path.
    # Looks in local wheel dirs first (pip's find-links, Debian's
    # python3-pip-whl), then asks the configured package index (pip.conf /
    # PIP_INDEX_URL, default PyPI) through its simple API.
    "$PY" - "$1" <<'PYEOF'
import configparser, hashlib, html.parser, json, os, re, shutil, ssl, sys
import base64, urllib.parse, urllib.request

dest = sys.argv[1]
WHEEL = re.compile(r"^pip-(\d+(?:\.\d+)*)-py3-none-any\.whl$")

def say(msg):
    print("[bootstrap] " + msg, file=sys.stderr, flush=True)

def pip_config():
    files = []
    home = os.path.expanduser("~")
    xdg = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    files += [os.path.join(d, "pip", "pip.conf") for d in xdg]
    files += ["/etc/pip.conf", os.path.join(home, ".pip", "pip.conf"),
              os.path.join(os.environ.get("XDG_CONFIG_HOME", os.path.join(home, ".config")),
                           "pip", "pip.conf")]
    if os.environ.get("PIP_CONFIG_FILE") and os.environ["PIP_CONFIG_FILE"] != os.devnull:
        files.append(os.environ["PIP_CONFIG_FILE"])
    cp = configparser.RawConfigParser()
    try:
        cp.read(files)
    except configparser.Error:
        pass
    def get(key):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            return env
        for section in ("install", "download", "global"):
            if cp.has_option(section, key):
                return cp.get(section, key)
        return ""
    return get

get = pip_config()
find_links = get("find-links").split()
indexes = (get("index-url").split() or ["https://pypi.org/simple/"]) + get("extra-index-url").split()
cafile = get("cert") or os.environ.get("SSL_CERT_FILE", "")
ctx = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)

def version(name):
    m = WHEEL.match(name)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None

# 1) local wheels
local = []
for d in [x for x in find_links if os.path.isdir(x)] + ["/usr/share/python-wheels"]:
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if version(name):
            local.append((version(name), os.path.join(d, name)))
if local:
    best = max(local)[1]
    say("using local pip wheel " + best)
    out = os.path.join(dest, os.path.basename(best))
    shutil.copyfile(best, out)
    print(out)
    sys.exit(0)

# 2) the package index (simple API, JSON or HTML)
def request(url, accept=None):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and os.path.isdir(urllib.request.url2pathname(parts.path)):
        url = url.rstrip("/") + "/index.html"  # a local simple index, as pip reads it
    headers = {"User-Agent": "dicomweb-gateway-bootstrap"}
    if accept:
        headers["Accept"] = accept
    if parts.username is not None:
        cred = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        netloc = parts.hostname + (":%d" % parts.port if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60, context=ctx)

class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []
    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]

def candidates(page):
    """(version, url, sha256-or-None) for each pip wheel listed on page."""
    out = []
    with request(page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1") as r:
        ctype = r.headers.get("Content-Type", "")
        body = r.read().decode("utf-8", "replace")
        base = r.geturl()
    if "json" in ctype:
        for f in json.loads(body).get("files", []):
            v = version(f.get("filename", ""))
            if v and not f.get("yanked"):
                out.append((v, urllib.parse.urljoin(base, f["url"]), f.get("hashes", {}).get("sha256")))
    else:
        p = Links()
        p.feed(body)
        for href in p.hrefs:
            url, _, frag = urllib.parse.urljoin(base, href).partition("#")
            v = version(urllib.parse.unquote(url.rsplit("/", 1)[-1]))
            if v:
                out.append((v, url, frag[7:] if frag.startswith("sha256=") else None))
    return out

pages = [u.rstrip("/") + "/pip/" for u in indexes] + [u for u in find_links if "://" in u]
errors = []
for page in pages:
    try:
        found = candidates(page)
    except Exception as e:  # try the next index
        errors.append("%s: %s" % (page, e))
        continue
    if not found:
        errors.append("%s: no pip wheel listed" % page)
        continue
    _, url, sha = max(found)
    name = urllib.parse.unquote(url.rsplit("/", 1)[-1])
    say("downloading %s from %s" % (name, urllib.parse.urlsplit(url).hostname or page))
    try:
        with request(url) as r:
            data = r.read()
    except Exception as e:
        errors.append("%s: %s" % (url, e))
        continue
    if sha and hashlib.sha256(data).hexdigest() != sha:
        errors.append("%s: sha256 mismatch" % url)
        continue
    out = os.path.join(dest, name)
    with open(out, "wb") as fh:
        fh.write(data)
    print(out)
    sys.exit(0)
say("could not get a pip wheel:\n  " + "\n  ".join(errors))
sys.exit(1)
PYEOF
}

venv_without_pip() {
    log "creating $VENV without pip and bootstrapping pip from a wheel"
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "$VENV" >&2 || die "$PY -m venv --without-pip failed"
    local tmp whl
    tmp="$(mktemp -d)"
    if ! whl="$(fetch_pip_wheel "$tmp")" || [[ ! -f "$whl" ]]; then
        rm -rf "$tmp"
        die "could not obtain pip; install python3-venv (Debian: apt-get install python3-venv) and retry"
    fi
    # A wheel is a zip of importable code: run pip from it to install itself.
    if ! "$VENV/bin/python" "$whl/pip" install "${pip_quiet[@]}" --no-index --no-deps \
        --disable-pip-version-check "$whl" >&2; then
        rm -rf "$tmp"
        die "bootstrapping pip from $whl failed"
    fi
    rm -rf "$tmp"
}

create_venv() {
    rm -rf "$VENV"
    if [[ "${BOOTSTRAP_FORCE_NO_VENV:-}" == 1 ]]; then
        log "BOOTSTRAP_FORCE_NO_VENV=1: skipping '$PY -m venv'"
        venv_without_pip
        return
    fi
    log "creating $VENV with $PY ($("$PY" -V 2>&1))"
    local out
    if out="$("$PY" -m venv "$VENV" 2>&1)"; then
        return
    fi
    log "'$PY -m venv' failed: $(printf '%s\n' "$out" | grep -m1 -iE 'ensurepip|error|no module' || printf '%s\n' "$out" | head -n1)"
    rm -rf "$VENV"
    # Debian's own python without python3-venv: install it when we can.
    if can_apt && [[ "$("$PY" -c 'import sys; print(sys.base_prefix)')" == /usr ]]; then
        local ver pkg
        ver="$(py_ver "$PY")"
        pkg="python$ver-venv"
        if [[ -x /usr/bin/python3 && "$(py_ver /usr/bin/python3)" == "$ver" ]]; then
            pkg=python3-venv
        fi
        if apt_install "$pkg"; then
            if out="$("$PY" -m venv "$VENV" 2>&1)"; then
                return
            fi
            log "'$PY -m venv' still fails after installing $pkg"
            rm -rf "$VENV"
        else
            log "apt-get install $pkg failed"
        fi
    fi
    venv_without_pip
}

ensure_venv() {
    if venv_healthy; then
        return
    fi
    if [[ -n "${PYTHON:-}" ]]; then
        pick_python   # validates PYTHON before the existing venv is touched
    fi
    [[ -e "$VENV" ]] && log "existing $VENV is unusable or stale; recreating it"
    [[ -n "${PY:-}" ]] || pick_python
    create_venv
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || die "pip does not work in $VENV"
    printf '%s\n' "$VENV" >"$VENV_MARK"
}

# ---------------------------------------------------------------- install ---
ensure_installed() {
    # ensure_installed [EXTRA]: pip install -e .[EXTRA] unless the stamp shows
    # the same pyproject.toml was already installed with (at least) EXTRA.
    local extra="${1:-}" hash stamp_hash="" stamp_extras="" spec="."
    hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ -f "$STAMP" ]]; then
        stamp_hash="$(sed -n 's/^pyproject=//p' "$STAMP")"
        stamp_extras="$(sed -n 's/^extras=//p' "$STAMP")"
    fi
    if [[ "$stamp_hash" == "$hash" && -x "$VENV/bin/dicomweb-gateway" ]] &&
        { [[ -z "$extra" ]] || [[ ",$stamp_extras," == *",$extra,"* ]]; }; then
        log "$VENV is up to date"
        return
    fi
    [[ -n "$extra" ]] && spec=".[$extra]"
    log "installing the gateway into $VENV (pip install -e '$spec')"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install "${pip_quiet[@]}" --disable-pip-version-check -e "$spec" >&2 ||
        die "pip install -e '$spec' failed"
    printf 'pyproject=%s\nextras=%s\n' "$hash" "$extra" >"$STAMP"
}

release_lock() { exec 9>&-; }

# ------------------------------------------------------------------- main ---
case "$MODE" in
    demo)
        ensure_venv
        ensure_installed ""
        release_lock
        exec "$VENV/bin/dicomweb-gateway" demo "$@"
        ;;
    test)
        ensure_test_servers
        ensure_browser_tools
        ensure_browser_npm
        ensure_venv
        ensure_installed test
        release_lock
        [[ $# == 0 ]] && set -- -q tests
        log "running: python -m pytest $*"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        ensure_venv
        ensure_installed test
        release_lock
        # both benchmarks take the same --smoke and --out style options; the first failure stops
        log "running: python -m tests.bench.run $* (QIDO)"
        "$VENV/bin/python" -m tests.bench.run "$@"
        log "running: python -m tests.bench.wado $* (WADO-RS retrieve)"
        "$VENV/bin/python" -m tests.bench.wado "$@"
        log "running: python -m tests.bench.stow $* (STOW-RS)"
        "$VENV/bin/python" -m tests.bench.stow "$@"
        log "running: python -m tests.bench.viewer $* (viewer: series metadata, then every frame)"
        exec "$VENV/bin/python" -m tests.bench.viewer "$@"
        ;;
    soak)
        ensure_test_servers
        ensure_venv
        ensure_installed test
        release_lock
        log "running: python -m tests.soak.soak $*"
        exec "$VENV/bin/python" -m tests.soak.soak "$@"
        ;;
esac
