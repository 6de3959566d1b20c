# Sourced by scripts/for_*.sh: `need PATH WHAT WHERE` stops with one line naming the missing input and where to put it.
need() {
  if [ ! -f "$1" ]; then
    echo "$(basename "$0"): $2 not found at $1: $3" >&2
    exit 2
  fi
}
# `check_options ARGS...` stops with one line at an option that scripts/run_task.py does not take, before
# anything else is checked (a typo such as --embeded would otherwise surface only as a missing checkpoint).
check_options() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --) return 0 ;;
      --only|--preset|--out|--report) shift ;;
      --only=*|--preset=*|--out=*|--report=*|--overwrite|-h|--help) ;;
      -*) echo "$(basename "$0"): unknown option $1 (run_task takes --only, --preset, --out, --report, --overwrite;" \
               "run flags go after --; the usage is at the top of scripts/$(basename "$0"))" >&2
          exit 2 ;;
    esac
    shift
  done
}
