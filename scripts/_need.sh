# Sourced by scripts/for_*.sh: `need PATH WHAT WHERE` stops with one line naming the missing input and where to put it.
need() {
  if [ ! -f "$1" ]; then
    echo "$(basename "$0"): $2 not found at $1: $3" >&2
    exit 2
  fi
}
