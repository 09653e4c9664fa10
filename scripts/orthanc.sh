#!/usr/bin/env bash
# A local Orthanc PACS with DICOMweb, for OHIF and the app, reachable from this machine only.
#
#   bash scripts/orthanc.sh [start] [--dir DIR] [--port 8042]   # write DIR/orthanc.json, run Orthanc (Ctrl-C stops)
#   bash scripts/orthanc.sh upload PATH... [--url URL]           # send DICOM files (or folders of them) to Orthanc
#   bash scripts/orthanc.sh config [--dir DIR] [--port 8042]     # only write DIR/orthanc.json
#   bash scripts/orthanc.sh install                              # only install Orthanc (as root; .ci/run does)
#
# Installs Debian's orthanc and orthanc-dicomweb when they are missing (as root with apt-get). DIR defaults to
# .orthanc in the project (DICOM files in DIR/db). Orthanc answers HTTP on 127.0.0.1:PORT only (remote access
# refused), without a password (nothing else can reach it) and without its DICOM (DIMSE) port; DICOMweb is at
# http://127.0.0.1:PORT/dicom-web, which is what the app is started on:
#   bash scripts/setup.sh server --studies http://127.0.0.1:8042/dicom-web
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$ROOT/.orthanc PORT=8042 URL="" PLUGIN_DIRS="/usr/share/orthanc/plugins /usr/lib/orthanc/plugins"

log() { echo "[orthanc] $*" >&2; }

ensure_orthanc() {
    if ! command -v Orthanc >/dev/null 2>&1 || ! dicomweb_plugin >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "apt-get install orthanc orthanc-dicomweb"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb \
                >/dev/null 2>&1 || { apt-get update -q >/dev/null &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb \
                    >/dev/null; }
        else
            log "Orthanc and its DICOMweb plugin are missing: install Debian's orthanc and orthanc-dicomweb"
            exit 1
        fi
    fi
}

dicomweb_plugin() {
    local d
    for d in $PLUGIN_DIRS; do
        [ -f "$d/libOrthancDicomWeb.so" ] && { echo "$d/libOrthancDicomWeb.so"; return 0; }
    done
    return 1
}

write_config() {
    mkdir -p "$DIR/db"
    cat >"$DIR/orthanc.json" <<EOF
{
  "Name": "sam3d-orthanc",
  "StorageDirectory": "$DIR/db",
  "IndexDirectory": "$DIR/db",
  "HttpPort": $PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "HttpTimeout": 60,
  "StableAge": 5,
  "Plugins": ["$(dicomweb_plugin)"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado",
               "Host": "127.0.0.1:$PORT", "Ssl": false}
}
EOF
    log "wrote $DIR/orthanc.json (HTTP 127.0.0.1:$PORT, DICOMweb http://127.0.0.1:$PORT/dicom-web)"
}

upload() {
    local url=${URL:-http://127.0.0.1:$PORT} n=0 f
    [ $# -gt 0 ] || { log "upload: name DICOM files or folders"; exit 2; }
    while IFS= read -r -d '' f; do
        curl -fsS -X POST -H "Expect:" --data-binary "@$f" "$url/instances" >/dev/null ||
            { log "upload of $f to $url failed (not DICOM, or Orthanc not running?)"; exit 1; }
        n=$((n + 1))
    done < <(find "$@" -type f \( -iname '*.dcm' -o ! -name '*.*' \) -print0)
    log "uploaded $n files to $url"
}

cmd=start
case "${1:-}" in start | upload | config | install) cmd=$1; shift ;; esac
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --dir) DIR=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --url) URL=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
    esac
done

case "$cmd" in
install) ensure_orthanc ;;
config) ensure_orthanc; write_config ;;
start)
    ensure_orthanc
    write_config
    log "Orthanc $DIR/orthanc.json (Ctrl-C stops it)"
    exec Orthanc "$DIR/orthanc.json"
    ;;
upload) upload ${args[@]+"${args[@]}"} ;;
esac
