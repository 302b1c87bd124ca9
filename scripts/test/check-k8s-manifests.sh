#!/usr/bin/env bash
# Checks every Kubernetes manifest under docs/kubernetes (*.yaml, *.yml, *.json:
# what `kubectl apply -f docs/kubernetes/` reads) against the Kubernetes API
# schemas, offline, with kubernetes-validate (pinned in tests/requirements.txt;
# it carries the schemas in its wheel). Strict: a field the schema does not have
# (a misspelling, a field in the wrong place) fails. So does what the tool itself
# only warns about and passes: a kind or apiVersion it has no schema for. A file
# that does not parse, or holds no object, fails too. Checked against the oldest
# and the newest Kubernetes whose schemas the pinned version carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
versions=(1.25 1.37)
mapfile -t files < <(find docs/kubernetes -type f \( -name '*.yaml' -o -name '*.yml' -o -name '*.json' \) | sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "check-k8s-manifests: FAILED: no manifests under docs/kubernetes" >&2
  exit 1
fi
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "check-k8s-manifests: FAILED: kubernetes-validate is not installed (python3 -m pip install -r tests/requirements.txt)" >&2
  exit 1
fi
args=(--strict)
for v in "${versions[@]}"; do args+=(-k "$v"); done
failed=()
checks=0
# One run per file: a file that does not parse stops the tool, and would hide
# the files after it.
for f in "${files[@]}"; do
  rc=0
  out=$(python3 -m kubernetes_validate "${args[@]}" "$f" 2>&1) || rc=$?
  # All INFO lines when every object passed; WARN (no schema), ERROR, FATAL
  # and anything else (a parse error, a traceback) fail.
  bad=$(grep -v '^INFO ' <<<"$out" || true)
  passed=$(grep -c "^INFO $f passed " <<<"$out" || true)
  if [ "$rc" -ne 0 ] || [ -n "$bad" ] || [ "$passed" -eq 0 ]; then
    failed+=("$f")
    echo "check-k8s-manifests: $f (kubernetes-validate exit $rc):" >&2
    if [ -z "$bad" ]; then
      echo "  no Kubernetes object in it" >&2
    elif [ "$(wc -l <<<"$bad")" -le 30 ]; then
      echo "$bad" | sed 's/^/  /' >&2
    else
      # A traceback (the tool crashes on some objects, e.g. one with no
      # metadata.name) prints whole schemas: its head says what failed
      # validation, its tail what crashed.
      { head -n 8 <<<"$bad"; echo "..."; tail -n 3 <<<"$bad"; } | sed 's/^/  /' >&2
    fi
  fi
  checks=$((checks + passed))
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "check-k8s-manifests: FAILED: ${#failed[@]} of ${#files[@]} files do not match the Kubernetes schemas: ${failed[*]}" >&2
  exit 1
fi
echo "check-k8s-manifests: ${#files[@]} files, $checks object checks passed (strict, Kubernetes ${versions[*]})"
