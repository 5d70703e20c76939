# sohocloud build-time hook (mmdebstrap --customize-hook, on the build host): the tree's
# own /usr/bin/perl back in place (a rename: its hard link to perl5.* is kept) and the
# diversion gone (see perl-shadow.sh).
set -eu
r="$1"
. "$(dirname "$0")/divert.sh"
if [ -e "$r/usr/bin/perl.sohocloud" ]; then divert_out /usr/bin/perl /usr/bin/perl; fi
