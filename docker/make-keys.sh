#!/usr/bin/env bash
# Make the four peers' signing keys and their chain settings for compose.yaml:
#
#   docker/make-keys.sh [--force] [OUT_DIR]      (OUT_DIR default: docker/peers)
#
# Writes OUT_DIR/peer-{a,b,c,d}.pem (private keys, mode 0600) and OUT_DIR/chain.toml
# (all four public keys, threshold 3), and sets PEER_UID/PEER_GID in docker/.env
# (KNHK_ENV_FILE overrides the path) so that the peers' containers run as the
# user who can read the keys. Nothing here is committed (docker/.gitignore).
#
# knhk-stream comes from $KNHK_STREAM, else the repository's .venv, else PATH,
# else the knhk-stream:local image (built with `docker compose build topics`).
# Existing keys are never replaced without --force: a new key is a new peer.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
peers=(peer-a peer-b peer-c peer-d)
threshold=3   # floor(n/2)+1 <= threshold <= n; for n = 4: 3 or 4

force=()
out=""
for arg in "$@"; do
  case "$arg" in
    --force) force=(--force) ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make-keys.sh: unknown option $arg" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out="${out:-$here/peers}"
env_file="${KNHK_ENV_FILE:-$here/.env}"

if [[ -e "$out/chain.toml" && ${#force[@]} -eq 0 ]]; then
  echo "make-keys.sh: $out/chain.toml exists; keeping the keys (--force makes new ones, and a new chain)" >&2
  exit 1
fi
mkdir -p "$out"
chmod 0700 "$out"
out="$(cd "$out" && pwd)"

uid="$(id -u)"
gid="$(id -g)"

# The knhk-stream command: a local one, else the image (writing as this user).
if [[ -n "${KNHK_STREAM:-}" ]]; then
  cli=("$KNHK_STREAM"); dir="$out"
elif [[ -x "$repo/.venv/bin/knhk-stream" ]]; then
  cli=("$repo/.venv/bin/knhk-stream"); dir="$out"
elif command -v knhk-stream >/dev/null 2>&1; then
  cli=(knhk-stream); dir="$out"
else
  docker compose -f "$here/compose.yaml" build topics >&2
  cli=(docker run --rm --user "$uid:$gid" --volume "$out:/keys" knhk-stream:local); dir=/keys
fi

tmp="$(mktemp "$out/chain.toml.XXXXXX")"
errors="$(mktemp)"
trap 'rm -f "$tmp" "$errors"' EXIT
{
  echo "# Chain settings of the compose.yaml peers, made by docker/make-keys.sh."
  echo "# Every peer and auditor of the chain loads this same file."
  echo 'chain_id = "knhk"'
  echo "tick_ms = 125"
  echo "max_triples = 1024"
  echo 'hook = "canonical@1"'
  echo "threshold = $threshold"
} > "$tmp"
for peer in "${peers[@]}"; do
  # prints the public key (hex) on stdout, the [[peers]] entry on stderr
  if ! pub="$("${cli[@]}" keys generate --peer-id "$peer" --out "$dir/$peer.pem" ${force[@]+"${force[@]}"} 2>"$errors")" \
      || [[ ! "$pub" =~ ^[0-9a-f]{64}$ ]]; then
    echo "make-keys.sh: knhk-stream keys generate failed for $peer:" >&2
    cat "$errors" >&2
    exit 1
  fi
  printf '\n[[peers]]\nid = "%s"\npublic_key = "%s"\n' "$peer" "$pub" >> "$tmp"
  echo "$peer  $pub" >&2
done
chmod 0644 "$tmp"
mv "$tmp" "$out/chain.toml"

# The containers run as PEER_UID:PEER_GID. The key files are mode 0600, so that
# must be their owner. Root's files go to the image's own user instead.
if [[ "$uid" == 0 ]]; then
  chown 10001:10001 "$out"/*.pem "$out/chain.toml"
  uid=10001
  gid=10001
fi
touch "$env_file"
grep -v -E '^(PEER_UID|PEER_GID)=' "$env_file" > "$env_file.tmp" || true
printf 'PEER_UID=%s\nPEER_GID=%s\n' "$uid" "$gid" >> "$env_file.tmp"
mv "$env_file.tmp" "$env_file"

echo "wrote $out/chain.toml (${#peers[@]} peers, threshold $threshold) and PEER_UID/PEER_GID=$uid:$gid in $env_file" >&2
