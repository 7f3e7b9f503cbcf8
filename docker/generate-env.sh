#!/bin/sh
# Create .env from .env.example (when missing) and fill every empty secret, the variables marked
# "# secret" in .env.example, with 48 random hex characters from /dev/urandom. Idempotent: a
# secret that has a value is kept, so a second run changes nothing. Prints the names it filled,
# never a value; no value is ever on a command line. The file is written with mode 0600.
#   sh docker/generate-env.sh [ENV_FILE]        (default: .env beside docker-compose.yml)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
example="$root/.env.example"
env_file="${1:-$root/.env}"

umask 077
if [ ! -f "$env_file" ]; then
  cp "$example" "$env_file"
fi

secrets=$(awk '/^# secret/ { marked = 1; next }
               marked && /^[A-Z_][A-Z0-9_]*=/ { sub(/=.*/, ""); print }
               { marked = 0 }' "$example")

tmp="$env_file.tmp.$$"
awk -v secrets="$secrets" '
  BEGIN { n = split(secrets, names, "\n"); for (i = 1; i <= n; i++) wanted[names[i]] = 1 }
  {
    name = $0; sub(/=.*/, "", name)
    if ((name in wanted) && $0 == name "=") {
      cmd = "od -An -N24 -tx1 /dev/urandom"
      value = ""
      while ((cmd | getline chunk) > 0) value = value chunk
      close(cmd)
      gsub(/[^0-9a-f]/, "", value)
      if (length(value) != 48) { print "generate-env.sh: no randomness from /dev/urandom" > "/dev/stderr"; exit 1 }
      print name "=" value
      print name > "/dev/stderr"
      next
    }
    print
  }' "$env_file" > "$tmp" 2> "$tmp.names" || { cat "$tmp.names" >&2; rm -f "$tmp" "$tmp.names"; exit 1; }
mv -f "$tmp" "$env_file"
chmod 600 "$env_file"
if [ -s "$tmp.names" ]; then
  echo "generate-env.sh: generated $(tr '\n' ' ' < "$tmp.names")in $env_file"
else
  echo "generate-env.sh: every secret in $env_file already has a value"
fi
rm -f "$tmp.names"
