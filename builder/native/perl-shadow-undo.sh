# sohocloud build-time hook (mmdebstrap --customize-hook, on the build host): the tree's
# own /usr/bin/perl back in place (a rename: its hard link to perl5.* is kept).
set -eu
r="$1"
if [ -e "$r/.sohocloud-native/perl.tree" ]; then mv -f "$r/.sohocloud-native/perl.tree" "$r/usr/bin/perl"; fi
