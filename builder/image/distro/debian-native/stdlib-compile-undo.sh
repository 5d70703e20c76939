# sohocloud build-time hook (mmdebstrap --customize-hook, on the build host): the tree's own
# /usr/bin/python3.11 back in place and the diversion gone (see stdlib-compile-divert.sh).
set -eu
r="$1"
. "$(dirname "$0")/divert.sh"
divert_out /usr/bin/python3.11 /usr/bin/python3.11
