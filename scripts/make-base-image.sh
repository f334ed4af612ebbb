#!/usr/bin/env bash
# Build a local Debian bookworm image with Python 3.11 for machines that cannot pull from a
# container registry. It replaces python:3.11-slim-bookworm as the Dockerfile's BASE_IMAGE and
# contains Debian's python3 (3.11) with venv and pip, CA certificates and useradd.
#
# The root filesystem comes from debootstrap (minbase variant) and the host's Debian mirror,
# then `docker import` turns it into an image. Needs root, debootstrap and a running Docker
# engine. It took 4-5 minutes on a 2-core machine, including the security updates.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/make-base-image.sh [--tag IMAGE] [--mirror URL] [--security-mirror URL|none]

  --tag IMAGE              image to create (default edgeface-base:bookworm)
  --mirror URL             Debian mirror (default: the first bookworm entry in
                           /etc/apt/sources.list and /etc/apt/sources.list.d/, else
                           http://deb.debian.org/debian)
  --security-mirror URL    Debian security mirror whose bookworm-security updates are applied
                           (default: the host's bookworm-security entry; "none" skips updates)
EOF
}

# Print the first URI that the host's APT sources list for SUITE, in either the one-line
# format (`deb [options] URI SUITE ...`) or the deb822 format (`URIs:` and `Suites:` fields).
host_mirror_for_suite() {
    local suite=$1
    local files=() file
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $file ]] && files+=("$file")
    done
    [[ ${#files[@]} -gt 0 ]] || return 0
    awk -v suite="$suite" '
        function flush() {
            if (uris != "" && (" " suites " ") ~ (" " suite " ")) { print uris; found = 1; exit }
            uris = ""; suites = ""
        }
        FNR == 1 { flush() }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]*#/ { next }
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i + 1) == suite) { print $i; found = 1; exit }
            next
        }
        $1 == "URIs:" { uris = $2 }
        $1 == "Suites:" { suites = ""; for (i = 2; i <= NF; i++) suites = suites " " $i }
        END { if (!found) flush() }
    ' "${files[@]}" | head -n 1
}

tag=edgeface-base:bookworm
mirror=""
security_mirror=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --tag) tag=${2:?--tag needs an image name}; shift 2 ;;
        --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
        --security-mirror) security_mirror=${2:?--security-mirror needs a URL or none}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make-base-image.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "make-base-image.sh: debootstrap needs root: run it with sudo" >&2
    exit 1
fi
for tool in debootstrap docker tar; do
    if ! command -v "$tool" >/dev/null; then
        echo "make-base-image.sh: '$tool' not found: on Debian, apt-get install -y debootstrap docker.io" >&2
        exit 1
    fi
done
if ! docker info >/dev/null 2>&1; then
    echo "make-base-image.sh: cannot reach the Docker engine: start dockerd first" >&2
    exit 1
fi

mirror=${mirror:-$(host_mirror_for_suite bookworm)}
mirror=${mirror:-http://deb.debian.org/debian}
security_mirror=${security_mirror:-$(host_mirror_for_suite bookworm-security)}

rootfs=$(mktemp -d /tmp/edgeface-base-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
started=$SECONDS

echo "debootstrap bookworm from $mirror into $rootfs"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$rootfs" "$mirror"

# Keep manual pages, documentation (except copyright files) and translations out, now and in
# later installs, as debian:bookworm-slim (the parent of the official slim Python images) does.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim-excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*

# APT in the chroot runs as root throughout: its _apt sandbox user cannot write to the
# download folders that debootstrap created.
apt_in_root=(chroot "$rootfs" apt-get -o APT::Sandbox::User=root)

if [[ -n $security_mirror && $security_mirror != none ]]; then
    echo "applying bookworm-security updates from $security_mirror"
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
    "${apt_in_root[@]}" update -q
    DEBIAN_FRONTEND=noninteractive "${apt_in_root[@]}" upgrade -y -q
else
    echo "no bookworm-security mirror given: the image has the packages of the bookworm release only"
fi
"${apt_in_root[@]}" clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old

# The same LANG and PATH as the official python:3.11-slim-bookworm image.
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null

echo "created $tag in $((SECONDS - started)) s: $(docker run --rm "$tag" python3 --version)"
