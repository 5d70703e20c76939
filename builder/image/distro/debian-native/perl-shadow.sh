# sohocloud build-time hook (mmdebstrap --extract-hook, on the build host; $1 is the tree,
# its essential packages unpacked but not yet installed). Never part of an image.
#
# Maintainer scripts spend much of an emulated install in Perl (debconf's frontend,
# deb-systemd-helper, adduser, update-rc.d): each start of an emulated perl costs about
# half a second. When the build host's perl is the image's perl version, the tree's
# /usr/bin/perl is diverted (so the essential install unpacks perl-base's binary, and its
# hard link perl5.*, beside it) and a wrapper runs the host's perl (its loader, libraries
# and XS modules copied into /.sohocloud-native) on the same scripts and the tree's own
# pure-Perl modules. perl-shadow-undo.sh puts the tree's perl back.
set -eu
r="$1"; n="$r/.sohocloud-native"
. "$(dirname "$0")/divert.sh"
host_v=$(dpkg-query -W -f='${Version}' perl-base | sed 's/-.*//')
tree_v=$(deb_version perl-base | sed 's/-.*//')
triplet=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
if [ "$host_v" != "$tree_v" ] || [ ! -x /usr/bin/perl ] || [ ! -e "$r/usr/bin/perl" ]; then
	echo "sohocloud: perl stays emulated (host perl-base $host_v, tree ${tree_v:-none})" >&2
	exit 0
fi
copy_host_libs /usr/bin/perl
mkdir -p "$n/perl5"
cp -L /usr/bin/perl "$n/perl.bin"
cp -a "/usr/lib/$triplet/perl-base" "$n/perl5/base"
if [ -d "/usr/lib/$triplet/perl/5.36" ]; then cp -a "/usr/lib/$triplet/perl/5.36" "$n/perl5/arch"; fi
divert_in /usr/bin/perl
cat > "$r/usr/bin/perl" <<'WRAP'
#!/.sohocloud-native/busybox sh
# sohocloud build-time wrapper (see builder/image/distro/debian-native/perl-shadow.sh): the host's perl
export PERL5LIB="/.sohocloud-native/perl5/base:/.sohocloud-native/perl5/arch${PERL5LIB:+:$PERL5LIB}"
exec /.sohocloud-native/ld.so --library-path /.sohocloud-native/lib /.sohocloud-native/perl.bin "$@"
WRAP
chmod 755 "$r/usr/bin/perl"
echo "sohocloud: perl $host_v runs natively during the install" >&2
