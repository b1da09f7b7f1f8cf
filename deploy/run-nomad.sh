#!/usr/bin/env bash
# Store the executor's secrets in its Nomad Variable, then run the executor as a Nomad job.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/run-nomad.sh [options]

Stores the executor's tokens in the Nomad Variable nomad/jobs/<executor job>, then runs
nomad/tool-executor.nomad.hcl with `nomad job run`. The executor then registers, scales
and (on shutdown) removes the sandbox pool job itself. See docs/operations.md.

Needs the nomad CLI and, in the environment as the nomad CLI reads them:
  NOMAD_ADDR     the cluster's HTTP API, e.g. https://nomad.example:4646
  NOMAD_TOKEN    your ACL token: allowed to write the Variable and to submit the job
                 (may be unset on a cluster without ACLs)
  NOMAD_NAMESPACE, NOMAD_CACERT, ...  as usual for the nomad CLI

Secrets (read from the environment, never from arguments):
  EXECUTOR_NOMAD_TOKEN   the ACL token the executor itself uses; its policy is in
                         docs/operations.md. Default: NOMAD_TOKEN, with a warning.
  TOOL_EXECUTOR_TOKEN    the bearer token trainers send. Default: the one already stored,
                         else a new random one (read it back with
                         nomad var get -item=executor_token nomad/jobs/<executor job>)
  TOOL_EXECUTOR_TOOL_SERVER_TOKEN
                         optional: bearer token for TOOL_EXECUTOR_TOOL_SERVER_URL

Options:
  --job-file PATH    the executor job (default nomad/tool-executor.nomad.hcl)
  --var KEY=VALUE    passed to `nomad job run -var` (repeatable), e.g.
                     --var image=registry.example/atropos-tool-executor:1.0
                     --var sandbox_image=registry.example/atropos-sandbox:1.0
  --detach           do not wait for the executor's deployment
  --dry-run          say what would be done; store and run nothing
  -h, --help         show this help
EOF
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
job_file="$root/nomad/tool-executor.nomad.hcl"
run_args=()
dry_run=false

while (($# > 0)); do
    case "$1" in
        --job-file)
            job_file="${2:?--job-file needs a path}"
            shift
            ;;
        --var)
            run_args+=(-var "${2:?--var needs KEY=VALUE}")
            shift
            ;;
        --detach) run_args+=(-detach) ;;
        --dry-run) dry_run=true ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "run-nomad.sh: unknown argument: $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

die() {
    echo "run-nomad.sh: $*" >&2
    exit 1
}

[[ "$dry_run" == true ]] || command -v nomad >/dev/null 2>&1 ||
    die "the nomad CLI is not installed (https://developer.hashicorp.com/nomad/install)"
[[ -n "${NOMAD_ADDR:-}" ]] || die "set NOMAD_ADDR to the cluster's HTTP API address (see --help)"
[[ -f "$job_file" ]] || die "no job file at $job_file"
if [[ -z "${NOMAD_TOKEN:-}" ]]; then
    echo "run-nomad.sh: NOMAD_TOKEN is not set: fine only on a cluster without ACLs" >&2
fi

# The job's name: its tasks may read nomad/jobs/<name> through their workload identity.
job_name="$(sed -n 's/^job "\([^"]*\)".*/\1/p' "$job_file" | head -n 1)"
[[ -n "$job_name" ]] || die "found no job \"...\" block in $job_file"
variable_path="nomad/jobs/$job_name"

if [[ -n "${NOMAD_NAMESPACE:-}" ]]; then
    run_args+=(-var "namespace=$NOMAD_NAMESPACE")
fi

executor_nomad_token="${EXECUTOR_NOMAD_TOKEN:-}"
if [[ -z "$executor_nomad_token" && -n "${NOMAD_TOKEN:-}" ]]; then
    echo "run-nomad.sh: EXECUTOR_NOMAD_TOKEN is not set: the executor gets NOMAD_TOKEN;" \
        "a token with only the policy in docs/operations.md is safer" >&2
    executor_nomad_token="$NOMAD_TOKEN"
fi

if [[ "$dry_run" == true ]]; then
    echo "would store nomad_token, executor_token (and tool_server_token when set) in $variable_path"
    echo "would run: nomad job run ${run_args[*]+"${run_args[*]}"} $job_file"
    exit 0
fi

executor_token="${TOOL_EXECUTOR_TOKEN:-}"
if [[ -z "$executor_token" ]]; then
    executor_token="$(nomad var get -item=executor_token "$variable_path" 2>/dev/null || true)"
fi
if [[ -z "$executor_token" ]]; then
    executor_token="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    echo "generated a new trainers' token; read it with: nomad var get -item=executor_token $variable_path"
fi

# Each value goes through a private file (key=@file), so that no token is ever an argument of
# a process (visible in ps) or printed.
secrets_dir="$(umask 077 && mktemp -d)"
trap 'rm -rf "$secrets_dir"' EXIT
items=()
store() {
    local key="$1" value="$2"
    [[ -n "$value" ]] || return 0
    (umask 077 && printf '%s' "$value" >"$secrets_dir/$key")
    items+=("$key=@$secrets_dir/$key")
}
store nomad_token "$executor_nomad_token"
store executor_token "$executor_token"
store tool_server_token "${TOOL_EXECUTOR_TOOL_SERVER_TOKEN:-}"

nomad var put -force -out=none "$variable_path" "${items[@]}"
echo "stored ${#items[@]} items in $variable_path"

nomad job run ${run_args[@]+"${run_args[@]}"} "$job_file"
