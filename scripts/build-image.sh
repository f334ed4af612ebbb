#!/usr/bin/env bash
# Build the edgeface component image from the Dockerfile at the repository root and print its
# size. It runs from any folder, and the build context is always the repository root. See
# docs/image.md.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
local_base_tag=edgeface-base:bookworm

usage() {
    cat <<EOF
Usage: scripts/build-image.sh [options] [-- docker build options]

  --tag IMAGE            image to build (default \$EDGEFACE_IMAGE, else edgeface:dev)
  --base-image IMAGE     BASE_IMAGE build argument (default python:3.11-slim-bookworm)
  --local-base           use $local_base_tag as BASE_IMAGE, and make it with
                         scripts/make-base-image.sh first if it does not exist. For machines
                         that cannot pull from a container registry.
  --torch-index-url URL  TORCH_INDEX_URL build argument (default in the Dockerfile: the
                         PyTorch CPU-only index)
  --pip-index-url URL    PIP_INDEX_URL build argument (default in the Dockerfile: PyPI)
  --wheels DIR           serve the wheels in DIR from 127.0.0.1 as both TORCH_INDEX_URL and
                         PIP_INDEX_URL, so the build downloads nothing else (it then uses the
                         host network). DIR must hold every requirement of pyproject.toml, the
                         kfp extra and the build system, with their dependencies, as wheels for
                         Linux x86_64 and CPython 3.11.
  --fetch-wheels         before the build, fill DIR with 'python3 -m pip wheel' of those
                         requirements. That uses the host's pip configuration (its indexes,
                         find-links, constraints and certificates) and needs Python 3.11.
  --network MODE         network for the RUN steps of the build (docker build --network)
  -h, --help             show this help

Environment: EDGEFACE_IMAGE (default tag), EDGEFACE_WHEELS_PORT (port of the --wheels server,
default 38765).
EOF
}

fail() {
    echo "build-image.sh: $*" >&2
    exit 1
}

# Print what the image build installs from pyproject.toml, one requirement per line: the
# dependencies, the kfp extra, and the build system that `pip install .` needs.
image_requirements() {
    python3 - "$repo_root/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    pyproject = tomllib.load(file)
project = pyproject["project"]
requirements = (
    project["dependencies"]
    + project["optional-dependencies"]["kfp"]
    + pyproject["build-system"]["requires"]
)
print("\n".join(requirements))
EOF
}

# Fill the folder $1 with wheels of every image requirement and their dependencies.
fetch_wheels() {
    local folder=$1
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || fail "--fetch-wheels needs python3 3.11 on the host, the Python of the image, but found $(python3 --version)"
    echo "building or downloading wheels of the image requirements into $folder"
    # pip wheel, unlike pip download, also turns source-only distributions into wheels, so
    # the image build needs no build backends beyond setuptools.
    python3 -m pip wheel --quiet --wheel-dir "$folder" -r <(image_requirements)
}

# Lay out the wheels of $1 as a PEP 503 simple index in $2: one folder per normalised project
# name, holding symbolic links to that project's wheels.
make_simple_index() {
    local wheels=$1 index=$2 wheel file project
    for wheel in "$wheels"/*.whl; do
        [[ -e $wheel ]] || continue
        file=$(basename "$wheel")
        project=$(echo "${file%%-*}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g')
        mkdir -p "$index/$project"
        ln -sf "$(cd "$(dirname "$wheel")" && pwd)/$file" "$index/$project/$file"
    done
}

# Serve the folder $1 on 127.0.0.1 and set index_url and index_server_pid. The port is fixed,
# because the index URLs are build arguments and Docker reuses cached layers only when the
# build arguments are unchanged.
start_index_server() {
    local folder=$1 port=${EDGEFACE_WHEELS_PORT:-38765} attempt
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=1)" 2>/dev/null; then
        fail "port $port on 127.0.0.1 is in use: set EDGEFACE_WHEELS_PORT to a free port"
    fi
    python3 -m http.server --bind 127.0.0.1 --directory "$folder" "$port" \
        >"$work_dir/index-server.log" 2>&1 &
    index_server_pid=$!
    index_url="http://127.0.0.1:$port/"
    for attempt in $(seq 1 50); do
        if python3 -c "import urllib.request; urllib.request.urlopen('${index_url}torch/', timeout=1)" 2>/dev/null; then
            echo "serving the wheels of $wheels at $index_url (pid $index_server_pid)"
            return 0
        fi
        sleep 0.2
    done
    fail "the wheel index server at $index_url did not answer within 10 s: see $work_dir/index-server.log"
}

cleanup() {
    if [[ -n ${index_server_pid:-} ]]; then
        kill "$index_server_pid" 2>/dev/null || true
        wait "$index_server_pid" 2>/dev/null || true
    fi
    rm -rf "${work_dir:-}"
}

tag=${EDGEFACE_IMAGE:-edgeface:dev}
base_image=""
local_base=false
torch_index_url=""
pip_index_url=""
wheels=""
fetch=false
network=""
extra_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --tag) tag=${2:?--tag needs an image name}; shift 2 ;;
        --base-image) base_image=${2:?--base-image needs an image name}; shift 2 ;;
        --local-base) local_base=true; shift ;;
        --torch-index-url) torch_index_url=${2:?--torch-index-url needs a URL}; shift 2 ;;
        --pip-index-url) pip_index_url=${2:?--pip-index-url needs a URL}; shift 2 ;;
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --fetch-wheels) fetch=true; shift ;;
        --network) network=${2:?--network needs a mode such as host}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra_args=("$@"); break ;;
        *) echo "build-image.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ $local_base == true && -n $base_image ]]; then
    fail "--local-base and --base-image both set the base image: pass only one"
fi
if [[ -n $wheels && ( -n $torch_index_url || -n $pip_index_url ) ]]; then
    fail "--wheels sets both package indexes: leave out --torch-index-url and --pip-index-url"
fi
if [[ $fetch == true && -z $wheels ]]; then
    fail "--fetch-wheels needs --wheels DIR to say where the wheels go"
fi
docker info >/dev/null 2>&1 || fail "cannot reach the Docker engine: start dockerd (or Docker Desktop) first"

work_dir=$(mktemp -d /tmp/edgeface-build-image.XXXXXX)
index_server_pid=""
trap cleanup EXIT
# Bash runs the EXIT trap after these signals only when they have traps of their own.
trap 'exit 130' INT
trap 'exit 143' TERM HUP

if [[ $local_base == true ]]; then
    base_image=$local_base_tag
    if ! docker image inspect "$base_image" >/dev/null 2>&1; then
        echo "$base_image not found: making it with scripts/make-base-image.sh"
        "$repo_root/scripts/make-base-image.sh" --tag "$base_image"
    fi
fi

build_args=()
[[ -n $base_image ]] && build_args+=(--build-arg "BASE_IMAGE=$base_image")
[[ -n $torch_index_url ]] && build_args+=(--build-arg "TORCH_INDEX_URL=$torch_index_url")
[[ -n $pip_index_url ]] && build_args+=(--build-arg "PIP_INDEX_URL=$pip_index_url")

if [[ -n $wheels ]]; then
    mkdir -p "$wheels"
    [[ $fetch == true ]] && fetch_wheels "$wheels"
    compgen -G "$wheels/torch-*.whl" >/dev/null \
        || fail "no torch wheel in $wheels: add --fetch-wheels, or put the wheels there"
    make_simple_index "$wheels" "$work_dir/index"
    start_index_server "$work_dir/index"
    build_args+=(--build-arg "TORCH_INDEX_URL=$index_url" --build-arg "PIP_INDEX_URL=$index_url")
    # The build containers reach the server on 127.0.0.1 only through the host network.
    network=host
fi
[[ -n $network ]] && build_args+=(--network "$network")

echo "building $tag from $repo_root"
started=$SECONDS
docker build --tag "$tag" "${build_args[@]}" "${extra_args[@]}" "$repo_root"
build_seconds=$((SECONDS - started))

size_bytes=$(docker image inspect --format '{{.Size}}' "$tag")
torch_build=$(docker run --rm "$tag" python3 -c \
    'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda or "none (CPU-only)")')
echo "built $tag in ${build_seconds} s: $((size_bytes / 1000000)) MB ($size_bytes bytes), $torch_build"
