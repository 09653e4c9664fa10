#!/usr/bin/env bash
# Install what is missing, then start the server or run the tests.
#
#   bash scripts/setup.sh server [start_server args...]  # sample datastore, http://127.0.0.1:8000
#   bash scripts/setup.sh server --weights NAME [...]    # serve published weights (fetched first when missing)
#   bash scripts/setup.sh fetch NAME [--dest DIR]        # download, check and install published weights
#   bash scripts/setup.sh test [pytest args...]          # python -m pytest (slow tests deselected)
#   bash scripts/setup.sh install                        # only install
#
# Installs into .venv (or $SAM3D_VENV): `pip install -r requirements.txt` and `pip install -e . --no-deps`,
# again only when requirements.txt or pyproject.toml changed (a hash stamp is kept inside the venv).
# As root with apt-get, also installs python3-venv if needed and Debian's mricron-data (sample volumes).
# server: builds sample-data/brain-mr (or $SAM3D_SAMPLE_DATA) if missing, unless you pass --studies;
# extra args go to `monailabel start_server` and win over the defaults, e.g.
#   bash scripts/setup.sh server --port 8080 --conf model sam_med3d_turbo --conf checkpoint /path/sam_med3d_turbo.pth
# fetch / --weights: NAME from sam3d.engine.weights_registry (sam_med3d_turbo, sam_vit_b), into --dest or
# $SAM3D_WEIGHTS_DIR (default ~/.cache/sam3d/weights); huggingface_hub honours HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SAM3D_VENV:-$ROOT/.venv}
SAMPLE=${SAM3D_SAMPLE_DATA:-$ROOT/sample-data/brain-mr}
STAMP=$VENV/.sam3d-requirements.sha256

log() { echo "[setup] $*" >&2; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
    log "apt-get install $*"
    # the package lists may be missing on a fresh machine
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

find_python() {
    local p
    for p in ${SAM3D_PYTHON:-} python3.11 python3; do
        if command -v "$p" >/dev/null 2>&1 &&
            "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    log "Python >= 3.11 not found (set SAM3D_PYTHON)"
    exit 1
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py=$(find_python)
        log "creating $VENV with $py"
        if ! "$py" -m venv "$VENV"; then
            can_apt || { log "'$py -m venv' failed; install your distribution's python3-venv"; exit 1; }
            rm -rf "$VENV"
            apt_install "python3-venv" || apt_install "$(basename "$py")-venv"
            "$py" -m venv "$VENV"
        fi
    fi
    local want
    want=$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
        log "installing requirements.txt into $VENV (first time: several GB, takes a while)"
        rm -f "$STAMP"
        "$VENV/bin/python" -m pip install ${CI:+--progress-bar off} -r "$ROOT/requirements.txt"
        "$VENV/bin/python" -m pip install ${CI:+--progress-bar off} --no-deps -e "$ROOT"
        echo "$want" >"$STAMP"
    elif [ "$("$VENV/bin/python" -c 'import sam3d, os; print(os.path.dirname(os.path.dirname(sam3d.__file__)))' 2>/dev/null)" != "$ROOT/lib" ]; then
        log "installing sam3d from $ROOT (editable)"
        "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
    fi
    # MONAI Label's launcher runs the first `python` on PATH ("No module named 'monailabel'" when started directly):
    # make it the venv's, and pass arguments with spaces through whole
    local launcher=$VENV/bin/monailabel
    if [ -f "$launcher" ] && grep -q 'MONAILABEL_PYEXE:-python}' "$launcher"; then
        sed -i -e "s|\${MONAILABEL_PYEXE:-python}|\${MONAILABEL_PYEXE:-$VENV/bin/python}|" \
            -e 's|monailabel.main \$\*$|monailabel.main "$@"|' "$launcher"
    fi
}

ensure_sample_sources() {
    if [ ! -d /usr/share/mricron/templates ] && can_apt; then
        apt_install mricron-data || log "could not install mricron-data; the sample datastore uses nilearn's MNI152 only"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
install)
    ensure_venv
    ensure_sample_sources
    ;;
server)
    ensure_venv
    # --weights NAME: published weights, fetched and checked when missing (offline: fails here, saying how to
    # place the file by hand), then `--conf model <its model config> --conf weights NAME`
    weights="" served=() rest=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --weights) [ $# -ge 2 ] || { log "--weights needs a name"; exit 2; }; weights=$2; shift 2 ;;
        --weights=*) weights=${1#*=}; shift ;;
        *) rest+=("$1"); shift ;;
        esac
    done
    set -- ${rest[@]+"${rest[@]}"}
    if [ -n "$weights" ]; then
        conf=$("$VENV/bin/python" -m sam3d.engine.weights_registry server-conf "$weights") || exit 1
        read -r -a served <<<"$conf"
    fi
    studies=(--studies "$SAMPLE")
    for a in "$@"; do
        case "$a" in -s | --studies | --studies=*) studies=() ;; esac
    done
    if [ ${#studies[@]} -gt 0 ] && ! compgen -G "$SAMPLE/*.nii.gz" >/dev/null; then
        ensure_sample_sources
        "$VENV/bin/python" "$ROOT/scripts/make_sample_datastore.py" "$SAMPLE"
    fi
    export PATH=$VENV/bin:$PATH # dcmqi's itkimage2segimage too: MONAI Label downloads it from GitHub otherwise
    # a DICOMweb datastore lists its series once per MONAI_LABEL_DICOMWEB_CACHE_EXPIRY seconds (MONAI Label: 7200)
    export MONAI_LABEL_DICOMWEB_CACHE_EXPIRY=${MONAI_LABEL_DICOMWEB_CACHE_EXPIRY:-60}
    log "monailabel start_server --app $ROOT/apps/sam3d ${studies[*]} --host 127.0.0.1 --port 8000 ${served[*]} $*"
    exec monailabel start_server --app "$ROOT/apps/sam3d" "${studies[@]}" --host 127.0.0.1 --port 8000 \
        "${served[@]}" "$@"
    ;;
fetch)
    # only sam3d and its dependencies are needed: a full install runs only when they cannot be imported
    "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("sam3d", "torch", "huggingface_hub", "filelock")))' 2>/dev/null ||
        ensure_venv
    exec "$VENV/bin/python" -m sam3d.engine.weights_registry fetch "$@"
    ;;
test)
    ensure_venv
    ensure_sample_sources
    export MONAI_LABEL_AUTO_UPDATE_SCORING=false
    export PATH=$VENV/bin:$PATH
    cd "$ROOT"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
*)
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ] || [ "$cmd" = help ]
    ;;
esac
