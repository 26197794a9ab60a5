#!/usr/bin/env bash
# Install smoke (issue 12): what users get, each in a fresh venv, from a wheel of this checkout.
#   runtime venv  `pip install angle-rt`: no torch; encodes a bundle the dev venv exported and
#                 gets the dev venv's vectors
#   export venv   torch CPU, then `pip install 'angle-rt[export]'`: `angle-export --int8` exits 0
#                 and the manifest lists a gated int8 artifact
# Run by .ci/run after the tests; alone: `bash .ci/smoke.sh` (needs the dev venv: make setup).
# SMOKE_KEEP=1 keeps the work folder; PYTHON, VENV, TORCH, TORCH_INDEX as in the Makefile.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
DEV="$ROOT/${VENV:-.venv}/bin"
TORCH="${TORCH:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-}"
if [ -d "${ANGLE_RT_DATA:-/nonexistent}" ]; then ANGLE_RT_DATA="$(cd "$ANGLE_RT_DATA" && pwd)"; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/angle-smoke.XXXXXX")"
# on any exit: let a background install finish, then remove the work folder (venvs: ~1.5 GB)
cleanup() {
  wait || true
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then echo "smoke: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
START=$SECONDS
section() { printf '\n==== smoke: %s (t=%ss) ====\n' "$*" "$((SECONDS - START))"; }
# run quietly into $WORK/<name>.log; print the log if it fails
logged() {
  local name="$1"; shift
  if ! "$@" >"$WORK/$name.log" 2>&1; then
    cat "$WORK/$name.log"
    echo "SMOKE FAILED: $*" >&2
    exit 1
  fi
}
[ -x "$DEV/angle-export" ] || { echo "SMOKE FAILED: no dev venv at $DEV (make setup)" >&2; exit 1; }

section "wheel of this checkout (tracked + untracked, not ignored)"
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -cf - -T - 2>/dev/null | tar -xf - -C "$WORK/src"
logged wheel "$DEV/python" -m pip wheel --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/angle_rt-*.whl)"
echo "$WHEEL"

# Installs use --no-compile: byte-compiling torch & co. took over half the smoke's time.
section "export venv: $TORCH, then pip install 'angle-rt[export]' (in the background)"
(
  logged venv-ex "$PYTHON" -m venv "$WORK/ex"
  # shellcheck disable=SC2086  # TORCH_INDEX is a list of pip options
  logged pip-torch "$WORK/ex/bin/python" -m pip install --no-compile "$TORCH" $TORCH_INDEX
  logged pip-ex "$WORK/ex/bin/python" -m pip install --no-compile "$WHEEL[export]"
) >"$WORK/ex-install.log" 2>&1 &
EX_INSTALL=$!

section "dev venv: tiny BERT, fp32 bundle (angle-export), reference vectors"
logged model "$DEV/python" .ci/smoke.py model "$WORK"
(cd "$WORK" && logged export-dev "$DEV/angle-export" --model tiny-bert --max-length 64 -q \
  -o bundle)
(cd "$WORK" && "$DEV/python" "$ROOT/.ci/smoke.py" reference bundle expected.npy)

section "runtime venv: pip install angle-rt (no extras)"
logged venv-rt "$PYTHON" -m venv "$WORK/rt"
logged pip-rt "$WORK/rt/bin/python" -m pip install --no-compile "$WHEEL"
"$WORK/rt/bin/python" -m pip check
(cd "$WORK" && rt/bin/python "$ROOT/.ci/smoke.py" runtime bundle expected.npy)

section "export venv: wait for its install; angle-export --int8"
if ! wait "$EX_INSTALL"; then cat "$WORK/ex-install.log"; exit 1; fi
"$WORK/ex/bin/python" -m pip check
# with shared data (CI) the INT8 gate finds STS-B dev itself, as for a user with the data;
# without it, a small STS file keeps the gate's Spearman (scipy) in the run
STS=()
if [ ! -d "${ANGLE_RT_DATA:-/nonexistent}/sts" ]; then STS=(--sts-data sts.jsonl); fi
(cd "$WORK" && logged export-int8 ex/bin/angle-export --model tiny-bert --max-length 64 --int8 \
  -q "${STS[@]}" -o bundle-int8)
(cd "$WORK" && ex/bin/python "$ROOT/.ci/smoke.py" int8 bundle-int8)

rm -rf "$WORK/rt" "$WORK/ex"
section "passed in $((SECONDS - START)) s, venvs removed"
