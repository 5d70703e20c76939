# sohocloud build-time hook (mmdebstrap --customize-hook, on the build host): the tree's own
# /bin/dash back in place and the diversion gone (see sh-shadow.sh).
set -eu
r="$1"
. "$(dirname "$0")/divert.sh"
if [ -e "$r/usr/bin/dash.sohocloud" ]; then divert_out /bin/dash /usr/bin/dash; fi
