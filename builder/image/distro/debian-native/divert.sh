# sohocloud build-time helper, sourced by the shadow hooks here (on the build host; never
# part of an image). A local dpkg diversion of one of the tree's files, with --rename, so
# the package's copy is unpacked (or kept) beside it under PATH.sohocloud, and undone again.
# $r is the tree.
divert_in() {
	chroot "$r" dpkg-divert --quiet --local --rename --divert "$1.sohocloud" --add "$1"
}
divert_out() {  # $1: the path as its package names it; $2: where it is in the tree
	rm -f "$r$2"
	chroot "$r" dpkg-divert --quiet --local --rename --remove "$1"
	# dpkg-divert's backup of the diversions file then names only our own diversions
	if grep -q '\.sohocloud$' "$r/var/lib/dpkg/diversions-old" 2>/dev/null; then
		rm -f "$r/var/lib/dpkg/diversions-old"
	fi
}
# The version of the tree's package $1, from its .deb (at extract time dpkg knows none yet).
deb_version() {
	deb=$(ls "$r"/var/cache/apt/archives/"$1"_*.deb 2>/dev/null | head -n1)
	[ -n "$deb" ] && dpkg-deb -f "$deb" Version 2>/dev/null || true
}
# The host's copy of the loader and the libraries of program $1 in /.sohocloud-native.
copy_host_libs() {
	mkdir -p "$n/lib"
	for lib in $(ldd "$1" | awk '$3 ~ /^\// {print $3}'); do cp -L "$lib" "$n/lib/"; done
	cp -L "$(ldd "$1" | awk '$1 ~ /^\// {print $1}' | head -n1)" "$n/ld.so"
}
