#!/usr/bin/env bash
# Build the Dockerfile's two images: the sandbox server and the executor service.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/build-images.sh [--push] [-h|--help]

Builds both targets of the repository's Dockerfile:
  sandbox    the sandbox server each pool allocation runs   tag: $SANDBOX_IMAGE
  executor   the executor service trainers talk to          tag: $EXECUTOR_IMAGE

Environment:
  SANDBOX_IMAGE      tag of the sandbox image (default atropos-sandbox:local);
                     the executor's TOOL_EXECUTOR_IMAGE must name it
  EXECUTOR_IMAGE     tag of the executor image (default atropos-tool-executor:local)
  DOCKER             container CLI to use (default docker)
  DOCKER_BUILD_ARGS  extra arguments for every build, split on spaces,
                     e.g. "--pull --platform linux/amd64"

Options:
  --push      push both tags after building, for a registry the Nomad clients pull from
  -h, --help  show this help

Needs a container engine that can build (a Docker engine, or podman with DOCKER=podman).
Nomad clients pull the sandbox image by its tag: with a ":local" tag, build it on every
client, or push it to a registry and set SANDBOX_IMAGE to the registry's name.
EOF
}

push=false
while (($# > 0)); do
    case "$1" in
        --push) push=true ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "build-images.sh: unknown argument: $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

sandbox_image="${SANDBOX_IMAGE:-atropos-sandbox:local}"
executor_image="${EXECUTOR_IMAGE:-atropos-tool-executor:local}"
docker="${DOCKER:-docker}"
read -r -a extra_args <<<"${DOCKER_BUILD_ARGS:-}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v "$docker" >/dev/null 2>&1; then
    echo "build-images.sh: '$docker' not found: install Docker (or set DOCKER=podman)" >&2
    exit 1
fi

build() {
    local target="$1" tag="$2"
    echo "building target $target as $tag"
    "$docker" build ${extra_args[@]+"${extra_args[@]}"} \
        --file "$root/Dockerfile" --target "$target" --tag "$tag" "$root"
}

build sandbox "$sandbox_image"
build executor "$executor_image"

if [[ "$push" == true ]]; then
    "$docker" push "$sandbox_image"
    "$docker" push "$executor_image"
fi

echo "built $sandbox_image and $executor_image"
