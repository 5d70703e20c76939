# sohocloud build-time hook (mmdebstrap --customize-hook, on the build host): the tree's own
# /usr/bin/python3.11 back in place and the diversion gone (see stdlib-compile-divert.sh).
set -eu
r="$1"
rm -f "$r/usr/bin/python3.11"
chroot "$r" dpkg-divert --quiet --local --rename --remove /usr/bin/python3.11
# dpkg-divert's backup of the diversions file now names only our diversion: not for the image.
if grep -q '^/usr/bin/python3.11.sohocloud$' "$r/var/lib/dpkg/diversions-old" 2>/dev/null; then
	rm -f "$r/var/lib/dpkg/diversions-old"
fi
