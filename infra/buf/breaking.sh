#!/usr/bin/env bash
# Runs `buf breaking` on the working tree against the proto module as it is on main.
#
#   BUF=path/to/buf infra/buf/breaking.sh
#
# The baseline is the merge base of HEAD and main (so changes that landed on main after this
# branch forked are not reported as this branch deleting them); on main itself that is HEAD,
# so uncommitted edits are checked. `main` is the local branch, else origin/main; override
# with BREAKING_AGAINST=<ref>. The baseline is exported with `git archive` rather than read
# through buf's `.git#branch=main` input, which needs the full history and fails in git
# worktrees. Nothing to compare (first landing, or no main in a shallow/single-branch
# clone) is a skip with a message, not a failure.
set -euo pipefail

case "${BUF:?set BUF to the buf binary}" in
  */*) BUF="$(cd "$(dirname "$BUF")" && pwd)/$(basename "$BUF")" ;;
esac
cd "$(dirname "$0")/../.."

ref=${BREAKING_AGAINST:-}
if [ -z "$ref" ]; then
  for candidate in refs/heads/main refs/remotes/origin/main; do
    if git rev-parse --verify --quiet "$candidate^{commit}" >/dev/null; then
      ref=$candidate
      break
    fi
  done
fi
if [ -z "$ref" ] || ! git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
  echo "proto-breaking: SKIPPED: no '${ref:-main}' to compare against (shallow or single-branch clone?)." >&2
  echo "  Fetch it first, e.g. \`git fetch origin main:main\`, or set BREAKING_AGAINST=<ref>." >&2
  exit 0
fi

name=${ref#refs/heads/}
name=${name#refs/remotes/}
if base=$(git merge-base HEAD "$ref" 2>/dev/null); then
  what="merge base of HEAD and $name"
else
  base=$(git rev-parse "$ref^{commit}")
  what="tip of $name (no merge base with HEAD: shallow clone or unborn branch)"
fi
what="$what, $(git rev-parse --short "$base")"

if ! git cat-file -e "$base:buf.yaml" 2>/dev/null \
  || [ -z "$(git ls-tree -r --name-only "$base" -- proto | grep '\.proto$' || true)" ]; then
  echo "proto-breaking: no proto module at the $what: first landing, nothing to compare."
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive --format=tar "$base" -- buf.yaml proto | tar -x -C "$tmp"

echo "proto-breaking: comparing against the $what"
"$BUF" breaking --against "$tmp"
echo "proto-breaking: no breaking changes"
