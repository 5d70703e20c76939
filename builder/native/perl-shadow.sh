# sohocloud build-time hook (mmdebstrap --essential-hook, runs on the build host; $1 is the
# tree). Sourced by s2_rootfs only for foreign-arch installs, never part of an image.
#
# Maintainer scripts spend most of an emulated install in Perl (debconf's frontend,
# deb-systemd-helper, adduser, update-rc.d): each start of an emulated perl costs
# about half a second. When the build host's perl is the image's perl version, the
# tree's /usr/bin/perl is set aside and a wrapper runs the host's perl (its loader,
# libraries and XS modules copied into /.sohocloud-native) on the same scripts and
# the tree's own pure-Perl modules. perl-shadow-undo.sh puts the tree's perl back.
set -eu
r="$1"; n="$r/.sohocloud-native"
host_v=$(dpkg-query -W -f='${Version}' perl-base | sed 's/-.*//')
tree_v=$(dpkg-query --admindir="$r/var/lib/dpkg" -W -f='${Version}' perl-base 2>/dev/null | sed 's/-.*//')
triplet=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
if [ "$host_v" != "$tree_v" ] || [ ! -x /usr/bin/perl ] || [ ! -e "$r/usr/bin/perl" ]; then
	echo "sohocloud: perl stays emulated (host perl-base $host_v, tree $tree_v)" >&2
	exit 0
fi
mkdir -p "$n/lib" "$n/perl5"
for lib in $(ldd /usr/bin/perl | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
	cp -L "$lib" "$n/lib/"
done
loader=$(ldd /usr/bin/perl | awk '$1 ~ /^\// {print $1}' | head -n1)
cp -L "$loader" "$n/ld.so"
cp -L /usr/bin/perl "$n/perl.bin"
cp -a "/usr/lib/$triplet/perl-base" "$n/perl5/base"
if [ -d "/usr/lib/$triplet/perl/5.36" ]; then cp -a "/usr/lib/$triplet/perl/5.36" "$n/perl5/arch"; fi
mv "$r/usr/bin/perl" "$n/perl.tree"
cat > "$r/usr/bin/perl" <<'WRAP'
#!/.sohocloud-native/busybox sh
# sohocloud build-time wrapper (see builder/native/perl-shadow.sh): the host's perl
export PERL5LIB="/.sohocloud-native/perl5/base:/.sohocloud-native/perl5/arch${PERL5LIB:+:$PERL5LIB}"
exec /.sohocloud-native/ld.so --library-path /.sohocloud-native/lib /.sohocloud-native/perl.bin "$@"
WRAP
chmod 755 "$r/usr/bin/perl"
echo "sohocloud: perl $host_v runs natively during the install" >&2
