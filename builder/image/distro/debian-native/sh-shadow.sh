# sohocloud build-time hook (mmdebstrap --extract-hook, on the build host; $1 is the tree,
# its essential packages unpacked but not yet installed). Never part of an image.
#
# Every maintainer script and every `sh -c` of dpkg and apt runs /bin/sh, i.e. the tree's
# dash: under qemu-user each start and the interpreting itself are emulated. When the build
# host's dash is the image's dash version, /bin/dash is diverted (so the essential install
# unpacks the package's binary beside it) and a wrapper runs the host's dash with its own
# loader and libc from /.sohocloud-native: the same shell, native. What the scripts run is
# still the tree's own programs. sh-shadow-undo.sh puts the tree's dash back.
set -eu
r="$1"; n="$r/.sohocloud-native"
. "$(dirname "$0")/divert.sh"
host_v=$(dpkg-query -W -f='${Version}' dash 2>/dev/null || true)
tree_v=$(deb_version dash)
if [ -z "$host_v" ] || [ "$host_v" != "$tree_v" ] || [ ! -x /usr/bin/dash ] || [ ! -e "$r/usr/bin/dash" ]; then
	echo "sohocloud: dash stays emulated (host dash ${host_v:-none}, tree ${tree_v:-none})" >&2
	exit 0
fi
copy_host_libs /usr/bin/dash
cp -L /usr/bin/dash "$n/dash.bin"
divert_in /bin/dash  # dash ships /bin/dash: dpkg knows the path as the package names it
cat > "$r/usr/bin/dash" <<'WRAP'
#!/.sohocloud-native/busybox sh
# sohocloud build-time wrapper (see builder/image/distro/debian-native/sh-shadow.sh): the host's dash
exec /.sohocloud-native/ld.so --library-path /.sohocloud-native/lib --argv0 sh /.sohocloud-native/dash.bin "$@"
WRAP
chmod 755 "$r/usr/bin/dash"
echo "sohocloud: dash $host_v runs natively during the install" >&2
