# sohocloud build-time hook (mmdebstrap --essential-hook, on the build host; $1 is the tree).
# Never part of an image.
#
# python3.11-minimal's and python3.11's postinsts byte-compile the whole standard library
# with the tree's own (here: emulated) /usr/bin/python3.11: ten seconds of a foreign-arch
# build. Bytecode does not depend on the CPU, so s2_rootfs compiles it natively once the
# install is done. Until then /usr/bin/python3.11 is diverted (dpkg-divert, so the package
# unpacks its binary beside it) and a wrapper skips exactly that py_compile call; any
# other use runs the real interpreter. stdlib-compile-undo.sh removes both again.
set -eu
r="$1"
. "$(dirname "$0")/divert.sh"
divert_in /usr/bin/python3.11
cat > "$r/usr/bin/python3.11" <<'WRAP'
#!/.sohocloud-native/busybox sh
# sohocloud build-time wrapper (builder/image/distro/debian-native/stdlib-compile-divert.sh)
case "$*" in
"-E -S /usr/lib/python3.11/py_compile.py "*|"-E -S -O /usr/lib/python3.11/py_compile.py "*) exit 0 ;;
esac
exec /usr/bin/python3.11.sohocloud "$@"
WRAP
chmod 755 "$r/usr/bin/python3.11"
